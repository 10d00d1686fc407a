"""Does skipping k blocks save what the FLOP count promises? Wall-clock against the full model, same process.

For k = 0, 3, 6, ... blocks forced off (spread evenly over the depth), times a prefill of --prompt-tokens tokens and a
generation of --new-tokens tokens (greedy, KV cache), takes the median of --repeats runs, and prints the measured
time ratio against k = 0 next to the ideal ratio from the FLOP count; then the same for the decode alone (each
repeat's generation less its prefill, against the decode forwards' own FLOP count, and against the plain base model
with the same k blocks deleted outright: what a model of that depth decodes at on this machine, where a FLOP need not
cost the same at every depth). Also measures the overhead of routing with nothing skipped against the plain base
model. LoRA is merged into the weights, as a server would run it
(--no-merge keeps the LoRA matmuls, which cost about 20% on this model at batch 1 on CPU).

At each of --batch-sizes it times the generation of a batch whose rows share one skip set of k blocks against the
same batch at full depth, and rows that each skip their own k blocks (the spread shifted by one block per row): one
batch executes every block some row keeps, so a server decodes such rows apart (``layerroute.batching``), and they
are timed that way, one generation per row.

    python benchmarks/skip_speed.py                # embedded SmolLM2-135M, batch 1, CPU
    python benchmarks/skip_speed.py --model PATH   # any supported model (hub id, directory, .gguf)
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from layerroute import LayerRouteModel, load_base_model  # noqa: E402


def interleaved_times(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run, one per repeat; every repeat runs all of them once, in a fresh random order, so drift in
    the machine's speed (other processes, thermal state) hits every configuration alike."""
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    shuffler = random.Random(0)
    for _ in range(repeats):
        shuffler.shuffle(order)
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def spread(num_layers: int, k: int) -> list[int]:
    """k block indices spread evenly over the depth."""
    return sorted({round((i + 0.5) * num_layers / k - 0.5) for i in range(k)}) if k else []


def without_blocks(model: torch.nn.Module, blocks: list[int]) -> torch.nn.Module:
    """A copy of the HF causal LM ``model`` whose listed decoder blocks are removed, sharing its weights."""
    pruned = copy.deepcopy(model, memo={id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]})
    kept = [block for index, block in enumerate(pruned.model.layers) if index not in set(blocks)]
    pruned.model.layers = torch.nn.ModuleList(kept)
    pruned.config.num_hidden_layers = len(kept)
    for index, block in enumerate(kept):
        block.self_attn.layer_idx = index  # the KV cache is indexed by position in the stack
    return pruned


def shifted(blocks: list[int], by: int, num_layers: int) -> list[int]:
    """The same number of blocks, each ``by`` blocks deeper (wrapping around): another row's skip set."""
    return sorted((block + by) % num_layers for block in blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base model (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--step", type=int, default=3, help="k grows by this many blocks per row")
    parser.add_argument("--no-merge", action="store_true", help="keep LoRA unmerged")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[4, 8],
                        help="batches (rows > 1) timed at --batch-skips; none: batch 1 only")
    parser.add_argument("--batch-skips", type=int, nargs="+", default=[9, 21], help="k timed at every batch size")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base, _ = load_base_model(args.model)
    plain = copy.deepcopy(base)
    model = LayerRouteModel.from_base(base).eval()
    if not args.no_merge:
        model.merge_lora()
    num_layers = model.num_layers
    input_ids = torch.randint(100, model.shape.vocab_size, (1, args.prompt_tokens),
                              generator=torch.Generator().manual_seed(0))
    generate_kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    # Prefill as a server runs it: the prompt through every block, logits for the last position only.
    prefill_kwargs = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False)

    skips = {k: spread(num_layers, k) for k in range(0, num_layers, args.step)}
    runs: dict[str, Callable[[], object]] = {
        "plain prefill": lambda: plain.generate(input_ids, **prefill_kwargs),
        "plain generate": lambda: plain.generate(input_ids, **generate_kwargs),
        # Fresh routers keep every block, so this is the price of routing itself: routers, wrappers, routed cache.
        "routed prefill": lambda: model.generate(input_ids, **prefill_kwargs),
        "routed generate": lambda: model.generate(input_ids, **generate_kwargs),
    }
    for k, skip in skips.items():
        runs[f"{k} prefill"] = lambda skip=skip: model.generate(input_ids, forced_skip=skip, **prefill_kwargs)
        runs[f"{k} generate"] = lambda skip=skip: model.generate(input_ids, forced_skip=skip, **generate_kwargs)
        if k:  # fresh LoRA is zero, so the plain model with these blocks deleted computes what the routed one does
            deleted = without_blocks(plain, skip)
            runs[f"{k} deleted prefill"] = lambda deleted=deleted: deleted.generate(input_ids, **prefill_kwargs)
            runs[f"{k} deleted generate"] = lambda deleted=deleted: deleted.generate(input_ids, **generate_kwargs)
    batches = {rows: torch.randint(100, model.shape.vocab_size, (rows, args.prompt_tokens),
                                   generator=torch.Generator().manual_seed(rows)) for rows in args.batch_sizes}
    for rows, batch in batches.items():
        runs[f"batch {rows} full"] = lambda batch=batch: model.generate(batch, forced_skip=(), **generate_kwargs)
        for k in args.batch_skips:
            runs[f"batch {rows} k {k} shared"] = lambda batch=batch, k=k: model.generate(
                batch, forced_skip=spread(num_layers, k), **generate_kwargs)
            runs[f"batch {rows} k {k} apart"] = lambda batch=batch, k=k: [
                model.generate(batch[row:row + 1], forced_skip=shifted(spread(num_layers, k), row, num_layers),
                               **generate_kwargs) for row in range(len(batch))]

    print(f"model={model.base_model_name_or_path} blocks={num_layers} prompt={args.prompt_tokens} "
          f"new_tokens={args.new_tokens} repeats={args.repeats} threads={torch.get_num_threads()} "
          f"lora={'unmerged' if args.no_merge else 'merged'}")
    with torch.no_grad():
        times = interleaved_times(runs, args.repeats)
        seconds = {name: statistics.median(values) for name, values in times.items()}
        # decode alone: a generation less the prefill of the same repeat (the first new token comes from the prefill)
        def decode(name: str) -> float:
            return statistics.median(g - p for g, p in zip(times[f"{name} generate"], times[f"{name} prefill"]))

        decode_seconds = {k: decode(str(k)) for k in skips}
        deleted_decode_seconds = {k: decode(f"{k} deleted") for k in skips if k}
        rows = []
        for k, skip in skips.items():
            model.generate(input_ids, forced_skip=skip, **prefill_kwargs)
            prefill_route = model.last_route
            model.generate(input_ids, forced_skip=skip, **generate_kwargs)
            rows.append((k, seconds[f"{k} prefill"], seconds[f"{k} generate"], prefill_route, model.last_route))
    plain_prefill, plain_generate = seconds["plain prefill"], seconds["plain generate"]
    routed_prefill, routed_generate = seconds["routed prefill"], seconds["routed generate"]

    base_prefill, base_generate = rows[0][1], rows[0][2]
    print()
    print("| k skipped | prefill ms | prefill ratio | ideal | generate ms | generate ratio | ideal | "
          "saving achieved (prefill / generate) | blocks deleted: generate ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, prefill_s, generate_s, prefill_route, route in rows:
        prefill_ratio, generate_ratio = prefill_s / base_prefill, generate_s / base_generate
        ideal_prefill, ideal_generate = 1 - prefill_route.flops_skipped_frac, 1 - route.flops_skipped_frac
        achieved = (
            f"{(1 - prefill_ratio) / (1 - ideal_prefill):.0%} / {(1 - generate_ratio) / (1 - ideal_generate):.0%}"
            if k else "-"
        )
        deleted = f"{seconds[f'{k} deleted generate'] / base_generate:.3f}" if k else "-"
        print(f"| {k} | {prefill_s * 1e3:.1f} | {prefill_ratio:.3f} | {ideal_prefill:.3f} | {generate_s * 1e3:.1f} | "
              f"{generate_ratio:.3f} | {ideal_generate:.3f} | {achieved} | {deleted} |")
    # The generation's FLOP ideal weighs a prefill FLOP like a decode FLOP, but at batch 1 a decode FLOP costs far
    # more time (one token per pass over the weights), so decode, with its unskippable LM head, is judged on its own.
    print()
    print("| k skipped | decode ms per token | decode ratio | ideal | saving achieved (decode) | "
          "blocks deleted: ms per token | ratio | routed against deleted |")
    print("|---|---|---|---|---|---|---|---|")
    decode_tokens = args.new_tokens - 1
    base_decode = decode_seconds[0]
    for k, _, _, prefill_route, route in rows:
        ratio = decode_seconds[k] / base_decode
        decode_flops = route.flops_total - prefill_route.flops_total
        ideal = 1 - (route.flops_skipped - prefill_route.flops_skipped) / decode_flops
        achieved = f"{(1 - ratio) / (1 - ideal):.0%}" if k else "-"
        deleted = "- | - | -"
        if k:
            deleted_s = deleted_decode_seconds[k]
            deleted = (f"{deleted_s * 1e3 / decode_tokens:.2f} | {deleted_s / base_decode:.3f} | "
                       f"{decode_seconds[k] / deleted_s - 1:+.1%}")
        print(f"| {k} | {decode_seconds[k] * 1e3 / decode_tokens:.2f} | {ratio:.3f} | {ideal:.3f} | {achieved} | "
              f"{deleted} |")
    print()
    print("| routing overhead, nothing skipped | plain base ms | routed ms | overhead |")
    print("|---|---|---|---|")
    print(f"| prefill | {plain_prefill * 1e3:.1f} | {routed_prefill * 1e3:.1f} | "
          f"{routed_prefill / plain_prefill - 1:+.1%} |")
    print(f"| generate | {plain_generate * 1e3:.1f} | {routed_generate * 1e3:.1f} | "
          f"{routed_generate / plain_generate - 1:+.1%} |")
    print("\n(routed = LayerRoute with its routers running and keeping every block; plain = the base model without "
          "LayerRoute)")
    if not batches:
        return
    ideal = {k: 1 - route.flops_skipped_frac for k, *_, route in rows}
    print()
    print("| batch | k skipped | full depth ms | shared skip set ms | ratio | ideal | saving achieved | "
          "own skip set per row, decoded apart: ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in batches:
        full = seconds[f"batch {size} full"]
        for k in args.batch_skips:
            shared, apart = seconds[f"batch {size} k {k} shared"], seconds[f"batch {size} k {k} apart"]
            # the ideal at batch 1 holds for every row of the batch: same prompt length, same skip count
            expected = ideal.get(k)
            achieved = f"{(1 - shared / full) / (1 - expected):.0%}" if expected is not None else "-"
            print(f"| {size} | {k} | {full * 1e3:.1f} | {shared * 1e3:.1f} | {shared / full:.3f} | "
                  f"{'-' if expected is None else f'{expected:.3f}'} | {achieved} | {apart * 1e3:.1f} | "
                  f"{apart / full:.3f} |")


if __name__ == "__main__":
    main()
