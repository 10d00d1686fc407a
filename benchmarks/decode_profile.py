"""Where does a decode token's time go? One decode step profiled (torch.profiler, CPU) at k blocks skipped.

For each k (default 0, 9 and 21 blocks forced off, spread evenly over the depth as in ``skip_speed.py``), and for the
plain base model without LayerRoute, it runs greedy generations of --new-tokens tokens after a --prompt-tokens prompt
under ``torch.profiler``, with every part of the decode step marked by ``record_function``:

- blocks: the decoder blocks that run (attention and MLP), without their KV-cache writes;
- routing wrappers: LayerRoute's ``RoutedBlock`` around each block (the kept/skipped decision read per token);
- KV cache: cache update, sequence length and mask sizes (``Cache`` methods, inside and outside the blocks);
- LM head: the output projection;
- rest of forward: embeddings, final norm, rotary and mask construction, HF model code between the blocks;
- logits processors, stopping criteria, sampling (argmax / softmax / multinomial on the scores);
- generate bookkeeping: ``prepare_inputs_for_generation`` and ``_update_model_kwargs_for_generation``;
- rest (Python / HF generate loop): what is left of the decode time once all the above are taken out.

Only the decode part of each generation is counted (from the end of the prefill forward to the end of ``generate``),
and divided by its decode forwards (--new-tokens - 1). Times are exclusive: a block's time excludes the cache writes
inside it. The profiler adds a little per recorded op, so the last rows also give the unprofiled decode time per token
(median over --repeats of (t(new_tokens) - t(1)) / (new_tokens - 1)) beside the profiled one. LoRA is merged, as a
server runs it.

    python benchmarks/decode_profile.py                       # embedded SmolLM2-135M, batch 1, CPU
    python benchmarks/decode_profile.py --skips 0,6,12,21     # other k
    python benchmarks/decode_profile.py --trace-dir traces/   # also write Chrome traces (chrome://tracing, Perfetto)
"""

from __future__ import annotations

import argparse
import copy
import functools
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from layerroute import LayerRouteModel, find_decoder_blocks, load_base_model  # noqa: E402
from layerroute.model import RoutedCache  # noqa: E402

ROOT = "decode_profile::generate"
CATEGORIES = {  # record_function label -> table row
    "decode_profile::block": "blocks",
    "decode_profile::routed_block": "routing wrappers",
    "decode_profile::kv_cache": "KV cache",
    "decode_profile::lm_head": "LM head",
    "decode_profile::forward": "rest of forward",
    "decode_profile::logits_processors": "logits processors",
    "decode_profile::stopping_criteria": "stopping criteria",
    "decode_profile::sampling": "sampling",
    "decode_profile::bookkeeping": "generate bookkeeping",
}
FORWARD = "decode_profile::forward"
SAMPLING_OPS = {"aten::argmax", "aten::softmax", "aten::_softmax", "aten::multinomial"}
ROWS = [*dict.fromkeys(CATEGORIES.values()), "rest (Python / HF generate loop)"]


def spread(num_layers: int, k: int) -> list[int]:
    """k block indices spread evenly over the depth (as in skip_speed.py)."""
    return sorted({round((i + 0.5) * num_layers / k - 0.5) for i in range(k)}) if k else []


def labelled(function, label: str):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return function(*args, **kwargs)

    return wrapper


def label_module(module: nn.Module, label: str) -> None:
    module.forward = labelled(module.forward, label)  # nn.Module.__call__ calls the instance's forward


def label_model(base: nn.Module, routed: LayerRouteModel | None) -> None:
    """Mark the parts of one model's decode step (its own modules and bound methods only)."""
    label_module(base, FORWARD)
    label_module(base.get_output_embeddings(), "decode_profile::lm_head")
    if routed is not None:
        for wrapper in routed.blocks:
            label_module(wrapper, "decode_profile::routed_block")
            label_module(wrapper.block, "decode_profile::block")
    else:
        for block in find_decoder_blocks(base):
            label_module(block, "decode_profile::block")
    for name in ("prepare_inputs_for_generation", "_update_model_kwargs_for_generation"):
        setattr(base, name, labelled(getattr(base, name), "decode_profile::bookkeeping"))


def label_shared_classes() -> None:
    """Mark the cache and generation helpers every model uses (class attributes, for this process)."""
    for cls in (Cache, DynamicLayer, RoutedCache):
        for name in ("update", "get_seq_length", "get_mask_sizes"):
            if name in vars(cls):
                setattr(cls, name, labelled(vars(cls)[name], "decode_profile::kv_cache"))
    LogitsProcessorList.__call__ = labelled(LogitsProcessorList.__call__, "decode_profile::logits_processors")
    StoppingCriteriaList.__call__ = labelled(StoppingCriteriaList.__call__, "decode_profile::stopping_criteria")


def decode_breakdown(events, decode_forwards: int) -> tuple[dict[str, float], float]:
    """Exclusive microseconds per table row over the decode part of every ``ROOT`` range, per decode forward, and
    the decode time per forward."""
    root = [e for e in events if e.name == ROOT]
    thread = root[0].thread
    interesting = [e for e in events if e.thread == thread and (e.name in CATEGORIES or e.name in SAMPLING_OPS
                                                                 or e.name == ROOT)]
    interesting.sort(key=lambda e: (e.time_range.start, -e.time_range.end))
    totals: dict[str, float] = defaultdict(float)
    window = 0.0
    for generate in root:
        start, end = generate.time_range.start, generate.time_range.end
        inside = [e for e in interesting
                  if e is not generate and start <= e.time_range.start and e.time_range.end <= end]
        prefill = next(e for e in inside if e.name == FORWARD)
        decode_start = prefill.time_range.end
        window += end - decode_start
        stack: list[list] = []  # [event, label, child time]
        counted: list[list] = []
        for event in inside:
            if event.time_range.start < decode_start:
                continue
            while stack and stack[-1][0].time_range.end <= event.time_range.start:
                stack.pop()
            if event.name in SAMPLING_OPS:
                if stack:  # a softmax inside the model or a logits processor is theirs, not sampling
                    continue
                label = "decode_profile::sampling"
            else:
                label = event.name
            duration = event.time_range.end - event.time_range.start
            if stack:
                stack[-1][2] += duration
            entry = [event, label, 0.0]
            stack.append(entry)
            counted.append(entry)
        for event, label, children in counted:
            totals[CATEGORIES[label]] += (event.time_range.end - event.time_range.start) - children
    per_forward = {row: totals.get(row, 0.0) / decode_forwards for row in ROWS[:-1]}
    per_forward[ROWS[-1]] = window / decode_forwards - sum(per_forward.values())
    return per_forward, window / decode_forwards


def unprofiled_decode_us(runs: dict, input_ids: torch.Tensor, generate_kwargs: dict, one_token: dict,
                         repeats: int) -> dict[str, float]:
    """Microseconds per decode token without the profiler: (median t(new_tokens) - median t(1)) / (new_tokens - 1),
    every repeat running all configurations in a fresh random order (drift in machine speed hits them alike)."""
    new_tokens = generate_kwargs["max_new_tokens"]
    for generate in runs.values():
        generate(input_ids, **generate_kwargs)  # warm-up
    times = {name: ([], []) for name in runs}
    order, shuffler = list(runs), random.Random(0)
    for _ in range(repeats):
        shuffler.shuffle(order)
        for name in order:
            for kwargs, record in ((one_token, times[name][0]), (generate_kwargs, times[name][1])):
                start = time.perf_counter()
                runs[name](input_ids, **kwargs)
                record.append(time.perf_counter() - start)
    return {name: (statistics.median(full) - statistics.median(single)) / (new_tokens - 1) * 1e6
            for name, (single, full) in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base model (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32, help="at least 2 (one decode forward)")
    parser.add_argument("--repeats", type=int, default=5, help="profiled generations per configuration")
    parser.add_argument("--skips", default="0,9,21", help="comma-separated k (blocks forced off)")
    parser.add_argument("--no-plain", action="store_true", help="leave out the plain base model column")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--trace-dir", type=Path, default=None, help="write one Chrome trace per configuration")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: one token comes from the prefill, the rest are decode steps")
    if args.threads:
        torch.set_num_threads(args.threads)

    base, _ = load_base_model(args.model)
    plain = None if args.no_plain else copy.deepcopy(base).eval()
    model = LayerRouteModel.from_base(base).eval()
    model.merge_lora()
    num_layers = model.num_layers
    ks = [int(k) for k in args.skips.split(",")]
    if any(not 0 <= k <= num_layers for k in ks):
        parser.error(f"--skips must lie in 0..{num_layers}")
    input_ids = torch.randint(100, model.shape.vocab_size, (1, args.prompt_tokens),
                              generator=torch.Generator().manual_seed(0))
    generate_kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    one_token = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False)
    runs = {f"k={k}": functools.partial(model.generate, forced_skip=spread(num_layers, k)) for k in ks}
    if plain is not None:
        runs["plain HF"] = plain.generate

    print(f"model={model.base_model_name_or_path} blocks={num_layers} prompt={args.prompt_tokens} "
          f"new_tokens={args.new_tokens} repeats={args.repeats} threads={torch.get_num_threads()} lora=merged")
    with torch.no_grad():
        unprofiled = unprofiled_decode_us(runs, input_ids, generate_kwargs, one_token, args.repeats)
        label_shared_classes()  # the labels go on after the unprofiled timing, which they would slow a little
        label_model(model.base_model, model)
        if plain is not None:
            label_model(plain, None)
        breakdown, profiled = {}, {}
        if args.trace_dir:
            args.trace_dir.mkdir(parents=True, exist_ok=True)
        for name, generate in runs.items():
            generate(input_ids, **generate_kwargs)  # warm-up, labelled
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.repeats):
                    with record_function(ROOT):
                        generate(input_ids, **generate_kwargs)
            breakdown[name], profiled[name] = decode_breakdown(prof.events(), args.repeats * (args.new_tokens - 1))
            if args.trace_dir:
                prof.export_chrome_trace(str(args.trace_dir / f"decode_{name.replace(' ', '_')}.json"))
            print(f"  {name}: {profiled[name] / 1e3:.1f} ms per decode token profiled", flush=True)

    names = list(runs)
    print()
    print("Milliseconds per decode token (share of the profiled decode time):")
    print()
    print("| part | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in ROWS:
        cells = [f"{breakdown[n][row] / 1e3:.2f} ({breakdown[n][row] / profiled[n]:.0%})" for n in names]
        print(f"| {row} | " + " | ".join(cells) + " |")
    print("| **decode token, profiled** | " + " | ".join(f"{profiled[n] / 1e3:.2f}" for n in names) + " |")
    print("| decode token, unprofiled | " + " | ".join(f"{unprofiled[n] / 1e3:.2f}" for n in names) + " |")
    print("| decode tokens/s, unprofiled | " + " | ".join(f"{1e6 / unprofiled[n]:.1f}" for n in names) + " |")
    print(f"\n(k = blocks forced off of {num_layers}, spread over the depth; plain HF = the base model's own generate "
          "without LayerRoute; batch 1, greedy, KV cache)")


if __name__ == "__main__":
    main()
