"""What does grammar-constrained decoding cost per token? Constrained against free decoding, same steps, same run.

For --steps tool-call steps of the test split (their real tool schemas bound), the routed model first generates
each step under the grammar (greedy) to learn its length n. Then three runs are timed with exactly n forward passes:
free (min = max = n new tokens); constrained with the full LM head (`restrict_lm_head=False`: every logit computed,
then masked); and constrained as served, the LM head computing only the logits the grammar allows where it allows
few (layerroute.lm_head). The grammar ends the call, and the answer, at n tokens. Runs alternate, each step's time is
the median of --repeats, and a configuration's per-token time is its total time over its total tokens. Also printed:
the share of the full head's logits the restricted head computed (from the FLOP count), and the grammar's compile
time per step (tools never seen before) and from the cache.

    python benchmarks/grammar_cost.py                 # embedded SmolLM2-135M with the shipped adapter, CPU
    python benchmarks/grammar_cost.py --steps 40 --repeats 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from layerroute import LayerRouteModel, load_base_model  # noqa: E402
from layerroute.grammar import DecodingGrammars  # noqa: E402
from layerroute.loading import default_adapter_dir  # noqa: E402
from layerroute.steps import tokenize_step, trace_steps  # noqa: E402
from layerroute.traces import read_traces  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base model (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default=None, help="adapter directory (default: the shipped one)")
    parser.add_argument("--data", default=str(ROOT / "training" / "data" / "corpus" / "test.jsonl.gz"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base, tokenizer = load_base_model(args.model)
    vocabulary = base.get_output_embeddings().weight.shape[0]
    model = LayerRouteModel.from_pretrained(args.adapter or default_adapter_dir(), base_model=base).eval()
    model.merge_lora()  # as served
    steps = [s for t in read_traces(args.data).traces for s in trace_steps(t) if s.step_type == "tool_call"]
    random.Random(0).shuffle(steps)
    steps = steps[: args.steps]

    began = time.perf_counter()
    grammars = DecodingGrammars(tokenizer, vocabulary)
    setup_s = time.perf_counter() - began
    compile_s, cached_s, cases = [], [], []
    for step in steps:
        began = time.perf_counter()
        grammar = grammars.tool_calls(step.tools, None)
        compile_s.append(time.perf_counter() - began)
        began = time.perf_counter()
        grammars.tool_calls(step.tools, None)
        cached_s.append(time.perf_counter() - began)
        ids = torch.tensor([tokenize_step(step, tokenizer, args.max_length).context_ids])
        out = model.generate(ids, do_sample=False, max_new_tokens=128,
                             logits_processor=LogitsProcessorList([grammars.processor(grammar)]))
        cases.append((ids, grammar, out.shape[1] - ids.shape[1]))

    configurations = ("free", "constrained, full LM head", "constrained")
    totals = dict.fromkeys(configurations, 0.0)
    tokens = head_flops = full_head_flops = 0
    flops = {}
    with torch.no_grad():
        for ids, grammar, length in cases:
            times = {name: [] for name in configurations}
            for _ in range(args.repeats):
                for name in configurations:
                    began = time.perf_counter()
                    if name == "free":
                        model.generate(ids, do_sample=False, max_new_tokens=length, min_new_tokens=length)
                    else:
                        model.generate(ids, do_sample=False, max_new_tokens=length,
                                       restrict_lm_head=name == "constrained",
                                       logits_processor=LogitsProcessorList([grammars.processor(grammar)]))
                    times[name].append(time.perf_counter() - began)
                    flops[name] = model.last_route.flops_total
            for name in totals:
                totals[name] += statistics.median(times[name])
            tokens += length
            # the same route and tokens, so the FLOP difference is the head's rows not computed
            full_head = 2 * length * model.shape.block.hidden_size * vocabulary
            full_head_flops += full_head
            head_flops += full_head - (flops["constrained, full LM head"] - flops["constrained"])

    print(f"model={model.base_model_name_or_path} steps={len(cases)} tokens={tokens} repeats={args.repeats} "
          f"threads={torch.get_num_threads()} vocabulary={vocabulary}")
    print()
    print("| decoding | total s | ms per token | vs free |")
    print("|---|---|---|---|")
    for name in configurations:
        print(f"| {name} | {totals[name]:.2f} | {1e3 * totals[name] / tokens:.1f} | "
              f"{totals[name] / totals['free'] - 1:+.1%} |")
    print()
    print(f"The restricted LM head computed {head_flops / full_head_flops:.1%} of the full head's logits.")
    print(f"(time per step includes its prefill; all runs do the same number of forward passes. Grammar setup for "
          f"the tokenizer: {setup_s:.2f} s once; compile per step's tools: median {1e3 * statistics.median(compile_s):.1f}"
          f" ms, from the cache {1e3 * statistics.median(cached_s):.3f} ms)")


if __name__ == "__main__":
    main()
