"""Evaluate a LayerRoute adapter on held-out agent steps, per step type and per source.

    python training/evaluate.py --adapter runs/default --data training/data/corpus/test.jsonl.gz \\
        --lora-only runs/lora-only --static-pruning runs/static

Prints JSON on stdout and writes evaluation.md beside the adapter:
- routing: per step type and per source, steps, mean blocks skipped and the FLOP-skip fraction;
- perplexity of the frozen base, of LayerRoute routed, of the same adapter at full depth (every block running: the
  difference to routed is what skipping costs) and of the LoRA-only and static-pruning adapters when given;
- agent quality of generated steps, tools bound and calls grammar-constrained: valid-call rate, tool-name accuracy,
  argument match (BFCL's AST rules), and for answers after tool results token F1 and the final number; each with
  its 95% interval, and routed against full depth step by step (steps only one of them got right);
- measured wall-clock per step against full depth, per step type;
- how many steps did not fit ``--max-length``, per step type.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layerroute import LayerRouteModel, load_base_model  # noqa: E402
from layerroute.adapter_files import read_adapter_config  # noqa: E402
from layerroute.config import check_skip_threshold  # noqa: E402
from layerroute.errors import MissingInputError, UserError, check_output_directory, command, user_input  # noqa: E402
from layerroute.evaluation import (  # noqa: E402
    QUALITY_RATES,
    across_sources,
    agent_quality,
    answers_after_tool_results,
    cases_by_type,
    paired_difference,
    perplexity,
    perplexity_by_source,
    quality_summary,
    routing_summary,
    scored_steps,
    wall_clock_by_type,
)
from layerroute.grammar import DecodingGrammars  # noqa: E402
from layerroute.model import ADAPTER_CONFIG, FINGERPRINT_ROWS  # noqa: E402
from layerroute.steps import STEP_TYPES, trace_steps  # noqa: E402
from layerroute.traces import read_sources  # noqa: E402


@command("evaluate")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True, help="directory written by finetune.py")
    parser.add_argument("--data", nargs="+", default=[str(ROOT / "training" / "data" / "corpus" / "test.jsonl.gz")])
    parser.add_argument("--lora-only", type=Path, default=None, help="adapter trained with --no-routing")
    parser.add_argument("--static-pruning", type=Path, default=None, help="adapter trained with --static-prune K")
    parser.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter)")
    parser.add_argument("--max-length", type=int, default=2048,
                        help="context budget in tokens (real agents carry many tool schemas); longer steps are "
                             "counted, not evaluated")
    parser.add_argument("--max-target-length", type=int, default=192)
    parser.add_argument("--max-steps", type=int, default=300,
                        help="steps per type for skip rates and perplexity, taken from each source in turn")
    # Sized for a CPU session (generation costs 5-10 s a step here); the samples that separate models, 200 / 100 /
    # 100, are a flag away: --generation-steps 200 --answer-steps 100 --baseline-generation-steps 100.
    parser.add_argument("--generation-steps", type=int, default=60,
                        help="tool-call steps generated routed and at full depth, taken from each source in turn")
    parser.add_argument("--answer-steps", type=int, default=20,
                        help="answers after tool results generated routed and at full depth")
    parser.add_argument("--baseline-generation-steps", type=int, default=20,
                        help="tool-call steps (and at most as many answers) for the frozen base and the LoRA-only "
                             "and static-pruning adapters")
    parser.add_argument("--extra-tokens", type=int, default=32,
                        help="a generated step may run this many tokens past its reference's length; a call still "
                             "open then is scored invalid (cut by the budget)")
    parser.add_argument("--timing-steps", type=int, default=8, help="steps per type timed routed vs full depth")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--skip-threshold", type=float, default=None,
                        help="decision threshold for LayerRoute's routers instead of the adapter's router_threshold "
                             "(a block runs when its keep probability is above it; lower skips less)")
    parser.add_argument("--records", type=Path, default=None,
                        help="also write every generated step here, one JSON object per line: model, step, what was "
                             "generated and its scores (the reason a call is invalid included)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--on-bad-record", choices=("raise", "skip"), default="raise")
    args = parser.parse_args(argv)

    # what the user passed is checked, and the data read, before any model loads
    with user_input("--skip-threshold"):
        check_skip_threshold(args.skip_threshold)
    if args.extra_tokens < 0:
        raise UserError(f"--extra-tokens must be at least 0, got {args.extra_tokens}")
    adapters = {"--adapter": args.adapter, "--lora-only": args.lora_only, "--static-pruning": args.static_pruning}
    for flag, path in adapters.items():
        if path is not None and not (path / ADAPTER_CONFIG).is_file():
            raise MissingInputError(f"{flag} {path} is not a LayerRoute adapter directory (it has no {ADAPTER_CONFIG})")
    check_output_directory("--records", args.records)
    read = read_sources(args.data, on_bad_record=args.on_bad_record)
    if read.skipped:
        print(f"skipped {len(read.skipped)} unreadable records: {read.skipped_summary()}", file=sys.stderr)
    steps = [s for t in read.traces for s in trace_steps(t)]
    if not steps:
        raise UserError(f"no assistant steps in {args.data}")
    with user_input(f"--adapter {args.adapter}"):
        _, recorded = read_adapter_config(args.adapter / ADAPTER_CONFIG, FINGERPRINT_ROWS)
    with user_input("--model"):
        base, tokenizer = load_base_model(args.model or recorded["name_or_path"])
    # wrapping modifies a base in place: each adapter gets its own copy, loaded up front so that one that does not
    # fit the base fails before the evaluation runs
    baselines = {}
    for name, flag in (("lora_only", "--lora-only"), ("static_pruning", "--static-pruning")):
        if adapters[flag] is not None:
            with user_input(f"{flag} {adapters[flag]}"):
                baselines[name] = LayerRouteModel.from_pretrained(adapters[flag], base_model=copy.deepcopy(base)).eval()
    with user_input(f"--adapter {args.adapter}"):
        model = LayerRouteModel.from_pretrained(args.adapter, base_model=base).eval()
    cases, over_budget = cases_by_type(steps, tokenizer, args.max_length, args.max_target_length, args.seed)
    every = [example for kind in STEP_TYPES for _, example in across_sources(cases[kind], args.max_steps)]
    answers = [case for case in cases["planning"] if answers_after_tool_results(case[0])]
    generated = across_sources(cases["tool_call"], args.generation_steps) + across_sources(answers, args.answer_steps)
    for_baselines = (across_sources(cases["tool_call"], args.baseline_generation_steps)
                     + across_sources(answers, min(args.answer_steps, args.baseline_generation_steps)))

    result = {"adapter": str(args.adapter), "data": args.data, "max_length": args.max_length,
              "steps_over_max_length": {kind: over_budget.get(kind, 0) for kind in STEP_TYPES}}
    scored = {
        "base": scored_steps(model, every, forced_skip=(), lora=False),
        "layerroute": scored_steps(model, every, skip_threshold=args.skip_threshold),
        "layerroute_full_depth": scored_steps(model, every, forced_skip=()),
    }
    result.update(routing_summary(scored["layerroute"], model.num_layers, by_source=True))
    by_type = result["by_step_type"]
    perplexities = {name: perplexity(records) for name, records in scored.items()}
    by_source = {name: perplexity_by_source(records) for name, records in scored.items()}
    for source, kinds in result["by_source"].items():
        for kind, values in kinds.items():
            ppl = values["perplexity"] = {name: by_source[name][source][kind] for name in scored}
            # what skipping costs, apart from what LoRA does: routed against the same adapter at full depth
            values["skip_cost"] = ppl["layerroute"] / ppl["layerroute_full_depth"] - 1
    grammars = DecodingGrammars(tokenizer, base.get_output_embeddings().weight.shape[0])
    generations = [
        ("layerroute", model, generated, {"skip_threshold": args.skip_threshold}),
        ("layerroute_full_depth", model, generated, {"forced_skip": ()}),
        ("base", model, for_baselines, {"forced_skip": (), "lora": False}),
    ]
    for name, baseline in baselines.items():
        # LoRA-only never skips; static pruning skips through its constant routers
        forced_skip = () if name == "lora_only" else None
        baseline_scored = scored_steps(baseline, every, forced_skip=forced_skip)
        perplexities[name] = perplexity(baseline_scored)
        generations.append((name, baseline, for_baselines, {"forced_skip": forced_skip}))
        if name == "static_pruning":
            static = routing_summary(baseline_scored, baseline.num_layers)["by_step_type"]
            result["static_pruning"] = {kind: {k: v for k, v in values.items() if k != "block_skip_rate"}
                                        for kind, values in static.items()}
    for kind in by_type:
        by_type[kind].pop("block_skip_rate")
        ppl = by_type[kind]["perplexity"] = {name: values.get(kind) for name, values in perplexities.items()}
        by_type[kind]["skip_cost"] = ppl["layerroute"] / ppl["layerroute_full_depth"] - 1
    records = {}
    with args.records.open("w") if args.records else nullcontext() as record_file:
        for name, generating_model, generation_cases, options in generations:
            records[name] = agent_quality(generating_model, tokenizer, grammars, generation_cases,
                                          extra_tokens=args.extra_tokens, **options)
            if record_file:  # each model's lines as soon as they exist: a long run stopped early keeps them
                record_file.writelines(json.dumps({"model": name, **record}, ensure_ascii=False) + "\n"
                                       for record in records[name])
                record_file.flush()
    result["agent_quality"] = {name: quality_summary(r) for name, r in records.items()}
    result["agent_quality_by_source"] = {
        name: {source: quality_summary([r for r in records[name] if r["source"] == source])
               for source in sorted({r["source"] for r in records[name]})}
        for name in ("layerroute", "layerroute_full_depth")}
    result["routed_against_full_depth"] = {
        key: paired for key in QUALITY_RATES
        if (paired := paired_difference(records["layerroute_full_depth"], records["layerroute"], key))}
    model.merge_lora()  # timed as served
    timed = [e for _, e in cases["tool_call"][: args.timing_steps] + cases["planning"][: args.timing_steps]]
    result["wall_clock_by_type"] = wall_clock_by_type(model, timed, args.timing_repeats, args.skip_threshold)
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
    skipped = result["steps_over_max_length"]
    lines += ["", f"Steps over the {result['max_length']}-token budget (not evaluated): "
              + ", ".join(f"{kind} {count}" for kind, count in skipped.items()) + "."]
    lines += ["", "Per source; skip cost is routed perplexity against the same adapter at full depth:", "",
              "| source | step type | steps | FLOPs skipped | ppl base | ppl full depth | ppl routed | skip cost |",
              "|---|---|---|---|---|---|---|---|"]
    for source, kinds in result["by_source"].items():
        for kind, v in kinds.items():
            ppl = v["perplexity"]
            lines.append(f"| {source} | {kind} | {v['steps']} | {v['flops_skipped_frac']:.1%} | {ppl['base']:.3f} | "
                         f"{ppl['layerroute_full_depth']:.3f} | {ppl['layerroute']:.3f} | {v['skip_cost']:+.1%} |")
    lines += ["", "Agent quality of generated steps (tools bound, calls grammar-constrained; 95% intervals):", "",
              "| model | valid calls | valid when calling | right tool | right arguments | final number | answer F1 |",
              "|---|---|---|---|---|---|---|"]
    for name, summary in result["agent_quality"].items():
        cells = [_rate(summary.get(key)) for key in QUALITY_RATES]  # the columns, in order
        f1 = summary.get("answer_f1")
        cells.append(f"{f1['mean']:.3f} ± {f1['stderr']:.3f} ({f1['steps']})" if f1 else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| routed against full depth | steps | only full depth right | only routed right | "
                  "difference (points, 95% interval) |", "|---|---|---|---|---|"]
    for key, paired in result["routed_against_full_depth"].items():
        low, high = paired["ci95_points"]
        lines.append(f"| {key} | {paired['steps']} | {paired['first_only']} | {paired['second_only']} | "
                     f"{paired['difference_points']:+.1f} [{low:+.1f}, {high:+.1f}] |")
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


def _rate(summary: dict | None) -> str:
    if not summary:
        return "-"
    low, high = summary["ci95"]
    return f"{summary['rate']:.1%} [{low:.0%}, {high:.0%}] ({summary['steps']})"


if __name__ == "__main__":
    sys.exit(main())
