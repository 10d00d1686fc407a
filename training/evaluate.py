"""Evaluate a LayerRoute adapter on held-out agent steps, per step type.

    python training/evaluate.py --adapter runs/default --data training/data/corpus/test.jsonl.gz \\
        --lora-only runs/lora-only --static-pruning runs/static

Prints JSON on stdout and writes evaluation.md beside the adapter: per step type the number of steps, mean blocks
skipped, FLOP-skip fraction, perplexity of the frozen base, of LayerRoute (routing on), of a LoRA-only adapter and of
a static-pruning adapter trained with the same budget; tool-call exact match for each; measured wall-clock per step
against the full model (same adapter and LoRA, every block running), per step type.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layerroute import LayerRouteModel, load_base_model  # noqa: E402
from layerroute.evaluation import (  # noqa: E402
    perplexity_by_type,
    routing_report,
    tool_call_exact_match,
    wall_clock_by_type,
)
from layerroute.model import ADAPTER_CONFIG  # noqa: E402
from layerroute.steps import tokenize_step, trace_steps  # noqa: E402
from layerroute.traces import read_sources  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True, help="directory written by finetune.py")
    parser.add_argument("--data", nargs="+", default=[str(ROOT / "training" / "data" / "corpus" / "test.jsonl.gz")])
    parser.add_argument("--lora-only", type=Path, default=None, help="adapter trained with --no-routing")
    parser.add_argument("--static-pruning", type=Path, default=None, help="adapter trained with --static-prune K")
    parser.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter)")
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--max-target-length", type=int, default=192)
    parser.add_argument("--max-steps", type=int, default=300, help="steps per type for skip and perplexity")
    parser.add_argument("--generation-steps", type=int, default=40, help="tool-call steps to generate per model")
    parser.add_argument("--timing-steps", type=int, default=8, help="steps per type timed routed vs full depth")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--on-bad-record", choices=("raise", "skip"), default="raise")
    args = parser.parse_args(argv)

    recorded = json.loads((args.adapter / ADAPTER_CONFIG).read_text())["base_model"]["name_or_path"]
    base, tokenizer = load_base_model(args.model or recorded)
    # wrapping modifies a base in place: each baseline adapter gets its own copy
    baselines = {name: (path, copy.deepcopy(base)) for name, path in
                 (("lora_only", args.lora_only), ("static_pruning", args.static_pruning)) if path}
    model = LayerRouteModel.from_pretrained(args.adapter, base_model=base).eval()
    steps = [s for t in read_sources(args.data, on_bad_record=args.on_bad_record).traces for s in trace_steps(t)]
    if not steps:
        raise SystemExit(f"no assistant steps in {args.data}")
    random.Random(args.seed).shuffle(steps)
    examples, references, dropped = {"tool_call": [], "planning": []}, [], 0
    for step in steps:
        if len(examples[step.step_type]) >= args.max_steps:
            continue
        try:
            example = tokenize_step(step, tokenizer, args.max_length, args.max_target_length)
        except ValueError:
            dropped += 1
            continue
        examples[step.step_type].append(example)
        if step.step_type == "tool_call":
            references.append(step.target["tool_calls"])
    every = examples["tool_call"] + examples["planning"]
    generation = examples["tool_call"][: args.generation_steps]
    generation_refs = references[: args.generation_steps]

    result = {"adapter": str(args.adapter), "data": args.data, "dropped_over_budget": dropped}
    result.update(routing_report(model, every))
    by_type = result["by_step_type"]
    perplexities = {
        "base": perplexity_by_type(model, every, forced_skip=(), lora=False),
        "layerroute": perplexity_by_type(model, every),
    }
    matches = {
        "base": tool_call_exact_match(model, tokenizer, generation, generation_refs, forced_skip=(), lora=False),
        "layerroute": tool_call_exact_match(model, tokenizer, generation, generation_refs),
        "layerroute_full_depth": tool_call_exact_match(model, tokenizer, generation, generation_refs, forced_skip=()),
    }
    for name, (path, copy_of_base) in baselines.items():
        baseline = LayerRouteModel.from_pretrained(path, base_model=copy_of_base).eval()
        # LoRA-only never skips; static pruning skips through its constant routers
        forced_skip = () if name == "lora_only" else None
        perplexities[name] = perplexity_by_type(baseline, every, forced_skip=forced_skip)
        matches[name] = tool_call_exact_match(baseline, tokenizer, generation, generation_refs, forced_skip=forced_skip)
        if name == "static_pruning":
            result["static_pruning"] = {kind: {k: v for k, v in values.items() if k != "block_skip_rate"}
                                        for kind, values in routing_report(baseline, every)["by_step_type"].items()}
    for kind in by_type:
        by_type[kind].pop("block_skip_rate")
        by_type[kind]["perplexity"] = {name: values.get(kind) for name, values in perplexities.items()}
    result["tool_call_exact_match"] = {name: m["exact_match"] for name, m in matches.items()}
    result["tool_call_steps_generated"] = len(generation)
    model.merge_lora()  # timed as served
    timed = examples["tool_call"][: args.timing_steps] + examples["planning"][: args.timing_steps]
    result["wall_clock_by_type"] = wall_clock_by_type(model, timed, args.timing_repeats)
    print(json.dumps(result, indent=2))
    write_markdown(args.adapter / "evaluation.md", result)
    return 0


def write_markdown(path: Path, result: dict) -> None:
    names = list(next(iter(result["by_step_type"].values()))["perplexity"])
    lines = [f"# Evaluation of `{result['adapter']}` on {', '.join(result['data'])}", "",
             "| step type | steps | blocks skipped | FLOPs skipped | " + " | ".join(f"ppl {n}" for n in names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for kind, values in result["by_step_type"].items():
        ppl = " | ".join(f"{values['perplexity'][n]:.3f}" for n in names)
        lines.append(f"| {kind} | {values['steps']} | {values['layers_skipped_frac']:.1%} | "
                     f"{values['flops_skipped_frac']:.1%} | {ppl} |")
    if "flops_skip_differential_points" in result:
        lines += ["", f"FLOP-skip differential: {result['flops_skip_differential_points']:.1f} points."]
    lines += ["", f"Tool-call exact match over {result['tool_call_steps_generated']} generated steps: "
              + ", ".join(f"{n} {v:.1%}" for n, v in result["tool_call_exact_match"].items()) + "."]
    if "static_pruning" in result:
        lines += ["", "Static pruning (same blocks deleted for every step): "
                  + ", ".join(f"{kind} {v['flops_skipped_frac']:.1%} of FLOPs skipped"
                              for kind, v in result["static_pruning"].items()) + "."]
    lines += ["", "| step type | timed steps | LayerRoute s | full depth s | time saved | FLOPs saved |",
              "|---|---|---|---|---|---|"]
    for kind, clock in result["wall_clock_by_type"].items():
        lines.append(f"| {kind} | {clock['steps']} | {clock['routed_s']:.2f} | {clock['full_depth_s']:.2f} | "
                     f"{clock['time_saved_frac']:.1%} | {clock['flops_saved_frac']:.1%} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
