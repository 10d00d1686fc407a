"""The dial's curve: what each routing threshold saves and what it costs, per step type, for one trained adapter.

    python benchmarks/dial.py --plot dial.png --output dial.json    # shipped adapter, corpus test split: ~10 min
    python benchmarks/dial.py --steps-per-type 150 --generation-steps 60 --routers-alone --plot dial.png
        # the sample that separates neighbouring settings, argument match included: a few hours on 2 CPU cores
    python benchmarks/dial.py --adapter runs/generalisation/cpu-seed0/glaive+reason/adapter \
        --data runs/generalisation/cpu-seed0/glaive+reason/held_out.jsonl.gz   # a fold, on the sources it never saw
    python benchmarks/dial.py --adapter runs/mine --thresholds 0.05,0.1,0.3,0.5

A block runs when its router's keep probability is above the threshold (``skip_threshold``): a lower threshold
skips less. For each threshold of ``--thresholds`` (the adapter's own ``router_threshold``, the shipped setting, is
always included and marked), with do-no-harm routing as the adapter ships (``layerroute.familiarity``: from the first
block where a step's features leave the familiar region of the steps the routers were fitted on, every block runs)
and, with ``--routers-alone``, without it, it reports per step type:

- **FLOPs skipped**: the share of the full model's forward FLOPs of the steps that the skipped blocks would have
  executed;
- **skip cost**: target perplexity routed against the *same adapter at full depth* (routed / full depth - 1), which
  isolates what skipping costs from what LoRA does; every step is scored in one forward over its context and target,
  the routers deciding from the context only, as generation routes it;
- **argument match** (``--generation-steps N`` tool-call steps; 0, the default, turns it off: a generated step costs
  5-30 s on a 2-core CPU): each step greedily generated with its tools bound and the call grammar-constrained
  (``layerroute.evaluation.agent_quality``), scored by BFCL's rules (valid call, right tool, right arguments), with
  95% Wilson intervals, and routed against full depth step by step (paired difference in points, 95% interval).

Full depth is computed once: it does not depend on the threshold. A generated step runs the blocks its routers chose
at that setting (the decision that was scored for perplexity, held for the whole step); greedy decoding through the
same blocks generates the same tokens, so a step whose decision repeats one already generated (at full depth, or at
another setting) is reused, not generated again. Steps are drawn from each source in turn (``across_sources``), the
same steps at every setting. With several ``--data`` files the curve pools them; run once per set to compare sets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layerroute import LayerRouteModel  # noqa: E402
from layerroute.adapter_files import read_adapter_config  # noqa: E402
from layerroute.config import check_skip_threshold  # noqa: E402
from layerroute.evaluation import (  # noqa: E402
    across_sources,
    agent_quality,
    cases_by_type,
    paired_difference,
    perplexity,
    quality_summary,
    routing_summary,
    scored_steps,
)
from layerroute.extras import require  # noqa: E402
from layerroute.familiarity import familiarity_ignored  # noqa: E402
from layerroute.grammar import DecodingGrammars  # noqa: E402
from layerroute.loading import load_base_model  # noqa: E402
from layerroute.model import ADAPTER_CONFIG, FINGERPRINT_ROWS  # noqa: E402
from layerroute.steps import STEP_TYPES, trace_steps  # noqa: E402
from layerroute.traces import read_sources  # noqa: E402

SHIPPED = ROOT / "layerroute" / "adapters" / "smollm2-135m-instruct"
TEST_SPLIT = ROOT / "training" / "data" / "corpus" / "test.jsonl.gz"
MODES = ("do no harm", "routers alone")
CALL_METRICS = ("valid", "names_correct", "arguments_correct")
DEFAULT_THRESHOLDS = "0.02,0.05,0.1,0.2,0.3,0.5,0.7"


def parse_thresholds(text: str) -> list[float]:
    """``"0.1,0.5"`` -> ``[0.1, 0.5]``: sorted, without repeats, each a valid ``skip_threshold``."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--thresholds takes numbers separated by commas, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("--thresholds needs at least one threshold")
    for value in values:
        try:
            check_skip_threshold(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return sorted(set(values))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, default=SHIPPED, help="adapter directory (default: the shipped one)")
    parser.add_argument("--data", nargs="+", default=[str(TEST_SPLIT)],
                        help="agent traces (default: the corpus test split)")
    parser.add_argument("--thresholds", type=parse_thresholds, default=DEFAULT_THRESHOLDS,
                        help="skip thresholds, comma-separated (the adapter's router_threshold is always added)")
    parser.add_argument("--routers-alone", action="store_true",
                        help="also sweep with do-no-harm routing off (the routers' decisions alone)")
    parser.add_argument("--steps-per-type", type=int, default=40, help="steps per step type, from each source in turn")
    parser.add_argument("--generation-steps", type=int, default=0,
                        help="tool-call steps generated for argument match at every setting and at full depth "
                             "(0: off; 5-30 s a step on a 2-core CPU)")
    parser.add_argument("--max-length", type=int, default=2048, help="context budget in tokens; longer steps are "
                                                                      "left out")
    parser.add_argument("--max-target-length", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON result here")
    parser.add_argument("--plot", type=Path, default=None, help="draw the curve to this PNG (needs the plot extra)")
    args = parser.parse_args(argv)
    if args.plot is not None:  # before the model loads: a missing extra should not cost a sweep
        require("matplotlib", "plot", "drawing the dial's curve")

    began = time.perf_counter()
    config, recorded = read_adapter_config(args.adapter / ADAPTER_CONFIG, FINGERPRINT_ROWS)
    shipped = config.router_threshold
    thresholds = sorted(set(args.thresholds) | {shipped})
    base, tokenizer = load_base_model(recorded["name_or_path"])
    model = LayerRouteModel.from_pretrained(args.adapter, base_model=base).eval()
    steps = [s for t in read_sources(args.data).traces for s in trace_steps(t)]
    cases, over_budget = cases_by_type(steps, tokenizer, args.max_length, args.max_target_length, args.seed)
    chosen = {kind: across_sources(cases[kind], args.steps_per_type) for kind in STEP_TYPES}
    examples = [example for kind in STEP_TYPES for _, example in chosen[kind]]
    if not examples:
        raise SystemExit(f"no steps within {args.max_length} tokens in {args.data}")
    generated = across_sources(cases["tool_call"], args.generation_steps) if args.generation_steps > 0 else []
    # the generated steps are the first scored tool-call steps (a smaller limit takes a prefix); any beyond those are
    # routed on their own, for their decisions
    extra = [example for _, example in generated[len(chosen["tool_call"]):]]
    modes = MODES if args.routers_alone else MODES[:1]

    full = scored_steps(model, examples, forced_skip=())
    full_ppl = perplexity(full)
    generator = Generations(model, tokenizer, generated)
    full_quality = generator.records([()] * len(generated))
    result = {"adapter": str(args.adapter), "data": args.data, "shipped_threshold": shipped,
              "familiarity_quantile": model.config.familiarity_quantile, "max_length": args.max_length,
              "steps": {kind: len(chosen[kind]) for kind in STEP_TYPES},
              "steps_over_max_length": {kind: over_budget[kind] for kind in STEP_TYPES},
              "generation_steps": len(generated),
              "full_depth": {"perplexity": full_ppl, "agent_quality": _calls(quality_summary(full_quality))},
              "settings": []}
    settings = [(mode, threshold) for mode in modes for threshold in thresholds]
    for mode, threshold in tqdm(settings, desc="dial settings"):
        with familiarity_ignored(model) if mode == "routers alone" else nullcontext():
            records = scored_steps(model, examples, skip_threshold=threshold)
            extra_records = scored_steps(model, extra, skip_threshold=threshold) if extra else []
        by_type = routing_summary(records, model.num_layers)["by_step_type"]
        routed_ppl = perplexity(records)
        entry = {"mode": mode, "threshold": threshold, "shipped": mode == MODES[0] and threshold == shipped,
                 "by_step_type": {
            kind: {"steps": values["steps"], "layers_skipped_frac": values["layers_skipped_frac"],
                   "flops_skipped_frac": values["flops_skipped_frac"], "perplexity_full_depth": full_ppl[kind],
                   "perplexity_routed": routed_ppl[kind], "skip_cost": routed_ppl[kind] / full_ppl[kind] - 1}
            for kind, values in by_type.items()}}
        if "tool_call" in by_type and "planning" in by_type:
            entry["flops_skip_differential_points"] = 100 * (by_type["tool_call"]["flops_skipped_frac"]
                                                             - by_type["planning"]["flops_skipped_frac"])
        if generated:
            tool_records = [r for r in records if r["step_type"] == "tool_call"] + extra_records
            decisions = [tuple(r["route"].skipped_layers) for r in tool_records[:len(generated)]]
            before = generator.generated
            quality = generator.records(decisions)
            entry["agent_quality"] = _calls(quality_summary(quality))
            entry["routed_against_full_depth"] = {
                key: paired for key in CALL_METRICS if (paired := paired_difference(full_quality, quality, key))}
            entry["generated"] = generator.generated - before
            entry["reused"] = len(generated) - entry["generated"]
        result["settings"].append(entry)
    result["seconds"] = time.perf_counter() - began
    print(markdown(result))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(args.plot, result)
    return 0


class Generations:
    """Agent-quality records of ``cases`` under given decisions (the blocks each step skips), each (step, decision)
    generated once: greedy decoding through the same blocks gives the same tokens, so a repeat is reused."""

    def __init__(self, model, tokenizer, cases: list):
        self.model, self.tokenizer, self.cases = model, tokenizer, cases
        vocabulary = model.base_model.get_output_embeddings().weight.shape[0]
        self.grammars = DecodingGrammars(tokenizer, vocabulary) if cases else None
        self.done: dict[tuple[int, tuple[int, ...]], dict] = {}
        self.generated = 0

    def records(self, decisions: list[tuple[int, ...]]) -> list[dict]:
        """One record per case, in order, case ``i`` skipping the blocks ``decisions[i]``."""
        wanted = defaultdict(list)  # decision -> indices still to generate
        for index, skipped in enumerate(decisions):
            if (index, skipped) not in self.done:
                wanted[skipped].append(index)
        for skipped, indices in wanted.items():
            out = agent_quality(self.model, self.tokenizer, self.grammars, [self.cases[i] for i in indices],
                                forced_skip=skipped)
            for index, record in zip(indices, out, strict=True):
                self.done[index, skipped] = record
            self.generated += len(indices)
        return [self.done[index, skipped] for index, skipped in enumerate(decisions)]


def _calls(summary: dict) -> dict:
    return {key: summary[key] for key in CALL_METRICS if key in summary}


def _rate(summary: dict | None) -> str:
    if not summary:
        return "-"
    low, high = summary["ci95"]
    return f"{summary['rate']:.0%} [{low:.0%}, {high:.0%}]"


def markdown(result: dict) -> str:
    kinds = [kind for kind in STEP_TYPES if result["steps"].get(kind)]
    generation = result["generation_steps"] > 0
    header = "| routing | threshold | " + " | ".join(f"{kind}: FLOPs skipped | {kind}: skip cost" for kind in kinds)
    rule = "|---|---|" + "---|---|" * len(kinds)
    if generation:
        header += " | valid calls | right arguments | arguments vs full depth (points, 95%) | generated"
        rule += "---|---|---|---|"
    lines = [f"Adapter `{result['adapter']}` on {', '.join(result['data'])}: "
             + ", ".join(f"{result['steps'][kind]} {kind} steps" for kind in kinds)
             + f"; shipped: do no harm at threshold {result['shipped_threshold']:g} (marked *). Full-depth perplexity: "
             + ", ".join(f"{kind} {result['full_depth']['perplexity'][kind]:.3f}" for kind in kinds) + ".", ""]
    if result["familiarity_quantile"] is None:
        lines[0] += " This adapter has no familiar region fitted: do no harm is the routers alone."
    if generation:
        quality = result["full_depth"]["agent_quality"]
        lines[0] += (f" Argument match on {result['generation_steps']} generated tool-call steps at full depth: "
                     f"{_rate(quality.get('arguments_correct'))} (valid {_rate(quality.get('valid'))}).")
    else:
        lines[0] += " Argument match: off (--generation-steps 0)."
    lines += [header + " |", rule]
    for entry in result["settings"]:
        mark = "*" if entry["shipped"] else ""
        cells = []
        for kind in kinds:
            values = entry["by_step_type"].get(kind)
            cells += [f"{values['flops_skipped_frac']:.1%}", f"{values['skip_cost']:+.1%}"] if values else ["-", "-"]
        if generation:
            quality = entry["agent_quality"]
            paired = entry["routed_against_full_depth"].get("arguments_correct")
            difference = (f"{paired['difference_points']:+.1f} [{paired['ci95_points'][0]:+.1f}, "
                          f"{paired['ci95_points'][1]:+.1f}]" if paired else "-")
            cells += [_rate(quality.get("valid")), _rate(quality.get("arguments_correct")), difference,
                      f"{entry['generated']} (reused {entry['reused']})"]
        lines.append(f"| {entry['mode']} | {entry['threshold']:g}{mark} | " + " | ".join(cells) + " |")
    over = result["steps_over_max_length"]
    lines += ["", f"Steps over the {result['max_length']}-token budget (left out): "
              + ", ".join(f"{kind} {count}" for kind, count in over.items()) + f". Took {result['seconds']:.0f} s."]
    return "\n".join(lines)


def plot(path: Path, result: dict) -> None:
    """FLOPs skipped (x) against skip cost (y), one line per step type and routing mode, thresholds labelled and the
    shipped setting ringed; beside it, with generation, tool-call argument match against tool-call FLOPs skipped."""
    matplotlib = require("matplotlib", "plot", "drawing the dial's curve")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generation = result["generation_steps"] > 0
    figure, axes = plt.subplots(1, 2 if generation else 1, figsize=(13 if generation else 7, 5), squeeze=False)
    curve = axes[0][0]
    colours = dict(zip(STEP_TYPES, ("tab:blue", "tab:orange")))
    styles = dict(zip(MODES, ("-", "--")))
    modes = list(dict.fromkeys(entry["mode"] for entry in result["settings"]))
    shipped_label = f"shipped (do no harm, threshold {result['shipped_threshold']:g})"
    for mode in modes:
        entries = [entry for entry in result["settings"] if entry["mode"] == mode]
        for kind in STEP_TYPES:
            points = [(100 * e["by_step_type"][kind]["flops_skipped_frac"], 100 * e["by_step_type"][kind]["skip_cost"],
                       e) for e in entries if kind in e["by_step_type"]]
            if not points:
                continue
            curve.plot([x for x, _, _ in points], [y for _, y, _ in points], styles[mode], marker="o",
                       color=colours[kind], label=f"{kind}, {mode}")
            for x, y, entry in points:
                curve.annotate(f"{entry['threshold']:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                               fontsize=7, color=colours[kind])
                if entry["shipped"]:
                    curve.scatter([x], [y], s=180, facecolors="none", edgecolors="black", linewidths=1.5, zorder=3,
                                  label=shipped_label)
                    shipped_label = None  # one legend entry
    curve.axhline(0, color="grey", linewidth=0.8)
    curve.set(title="the dial: what skipping saves and costs (labels: skip threshold)",
              xlabel="FLOPs skipped (%)", ylabel="skip cost: routed / full-depth perplexity - 1 (%)")
    curve.legend(fontsize=8)
    if generation:
        match = axes[0][1]
        full = result["full_depth"]["agent_quality"].get("arguments_correct")
        if full:
            match.axhline(100 * full["rate"], color="grey", linestyle=":", label="full depth")
        for mode in modes:
            points = [(100 * e["by_step_type"]["tool_call"]["flops_skipped_frac"], e["agent_quality"]
                       ["arguments_correct"], e) for e in result["settings"]
                      if e["mode"] == mode and "tool_call" in e["by_step_type"] and "arguments_correct" in
                      e["agent_quality"]]
            if not points:
                continue
            xs = [x for x, _, _ in points]
            rates = [100 * q["rate"] for _, q, _ in points]
            errors = [[100 * (q["rate"] - q["ci95"][0]) for _, q, _ in points],
                      [100 * (q["ci95"][1] - q["rate"]) for _, q, _ in points]]
            match.errorbar(xs, rates, yerr=errors, fmt=styles[mode] + "o", color=colours["tool_call"], capsize=3,
                           label=f"tool_call, {mode}")
            for x, rate, (_, _, entry) in zip(xs, rates, points):
                match.annotate(f"{entry['threshold']:g}", (x, rate), textcoords="offset points", xytext=(4, 4),
                               fontsize=7)
                if entry["shipped"]:
                    match.scatter([x], [rate], s=180, facecolors="none", edgecolors="black", linewidths=1.5,
                                  zorder=3)
        match.set(title=f"tool-call argument match ({result['generation_steps']} generated steps, 95% intervals)",
                  xlabel="tool-call FLOPs skipped (%)", ylabel="right arguments (%)", ylim=(-3, 103))
        match.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
