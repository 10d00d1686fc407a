"""What does routing cost in training? LayerRoute against plain peft LoRA, same model, data and batch.

Times forward + backward + optimizer step for both, interleaved in one process (median of --repeats), and reports
tokens per second and peak resident memory growth. Target: LayerRoute at most 10% slower than plain LoRA.

    python benchmarks/train_cost.py             # embedded SmolLM2-135M, embedded corpus, batch 4, CPU
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layerroute import LayerRouteConfig, LayerRouteModel, load_base_model  # noqa: E402
from layerroute.traces import read_traces  # noqa: E402
from layerroute.training import SkipBudget, build_examples, collate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()

    base, tokenizer = load_base_model(args.model)
    traces = read_traces(ROOT / "training" / "data" / "corpus" / "validation.jsonl.gz").traces
    examples = build_examples(traces, tokenizer, args.max_length, 160).examples
    batches = [collate(examples[i : i + args.batch_size], tokenizer.pad_token_id)
               for i in range(0, args.batch_size * args.repeats, args.batch_size)]

    config = LayerRouteConfig()
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                                           target_modules=config.lora_target_modules))
    routed = LayerRouteModel.from_base(base, config).train()
    plain.train()
    budget = SkipBudget(config, multiplier=1.0)
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for name, m in (("plain LoRA", plain), ("LayerRoute", routed))}

    def plain_step(batch):
        labels = batch["labels"]
        out = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        out.loss.backward()
        optimizers["plain LoRA"].step()
        optimizers["plain LoRA"].zero_grad()

    def routed_step(batch):
        out = routed(**batch)
        (out.loss + budget.penalty(out.keep_probs, out.keep)).backward()
        optimizers["LayerRoute"].step()
        optimizers["LayerRoute"].zero_grad()

    steps = {"plain LoRA": plain_step, "LayerRoute": routed_step}
    for step in steps.values():
        step(batches[0])  # warm-up
    times = {name: [] for name in steps}
    for batch in batches:
        for name, step in steps.items():
            began = time.perf_counter()
            step(batch)
            times[name].append(time.perf_counter() - began)
    tokens = statistics.median(int(b["attention_mask"].sum()) for b in batches)
    print(f"model={routed.base_model_name_or_path} batch={args.batch_size} max_length={args.max_length} "
          f"repeats={args.repeats} threads={torch.get_num_threads()} median tokens/batch={tokens}")
    print("\n| trainer | median s/step | tokens/s | vs plain LoRA |\n|---|---|---|---|")
    reference = statistics.median(times["plain LoRA"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {tokens / median:.0f} | {median / reference - 1:+.1%} |")
    print(f"\npeak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
          "(both trainers; plain LoRA computes logits for every position, LayerRoute only on targets)")


if __name__ == "__main__":
    main()
