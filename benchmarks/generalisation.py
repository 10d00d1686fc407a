"""Routing on sources the routers never saw: FLOPs skipped and skip cost per source, with and without do-no-harm.

    python benchmarks/generalisation.py                       # shipped adapter, corpus test split + held-out sources
    python benchmarks/generalisation.py --adapter runs/mine --steps-per-source 100

For every source and step type it reports the share of FLOPs skipped and the skip cost: target perplexity routed
against the *same adapter at full depth*, which isolates what skipping costs from what LoRA does. Four ways of
routing are compared on the same steps:
- ``routers alone``: the routers' decisions at the adapter's threshold, familiarity check off;
- ``margin``: the same with a cautious ``--margin-threshold`` (a block is skipped only where its keep probability is
  at most that);
- ``do no harm``: the adapter as it serves, a step running every block from the first block where its features leave
  the familiar region of the steps the routers were fitted on (``layerroute.familiarity``).
Sources in the training corpus (``--in-distribution``) are marked as such; the rest were never trained on.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layerroute import LayerRouteModel  # noqa: E402
from layerroute.adapter_files import read_adapter_config  # noqa: E402
from layerroute.evaluation import perplexity, perplexity_by_source, routing_summary, scored_steps  # noqa: E402
from layerroute.familiarity import familiarity_ignored  # noqa: E402
from layerroute.loading import load_base_model  # noqa: E402
from layerroute.model import ADAPTER_CONFIG, FINGERPRINT_ROWS  # noqa: E402
from layerroute.steps import STEP_TYPES, tokenize_step, trace_steps  # noqa: E402
from layerroute.traces import read_sources  # noqa: E402

SHIPPED = ROOT / "layerroute" / "adapters" / "smollm2-135m-instruct"
DATA = ROOT / "training" / "data"
IN_DISTRIBUTION = ("bfcl_single_turn", "bfcl_multi_turn", "gsm8k", "gsm_symbolic")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, default=SHIPPED)
    parser.add_argument("--data", nargs="+",
                        default=[str(DATA / "corpus" / "test.jsonl.gz"), *map(str, sorted((DATA / "heldout").glob(
                            "*.jsonl.gz")))])
    parser.add_argument("--in-distribution", nargs="*", default=list(IN_DISTRIBUTION),
                        help="sources the adapter was trained on (the rest count as unseen)")
    parser.add_argument("--steps-per-source", type=int, default=15, help="steps per source and step type")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--margin-threshold", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)

    _, recorded = read_adapter_config(args.adapter / ADAPTER_CONFIG, FINGERPRINT_ROWS)
    base, tokenizer = load_base_model(recorded["name_or_path"])
    model = LayerRouteModel.from_pretrained(args.adapter, base_model=base).eval()
    steps = [s for t in read_sources(args.data).traces for s in trace_steps(t)]
    random.Random(args.seed).shuffle(steps)
    examples, taken = [], {}
    for step in steps:
        key = (step.source, step.step_type)
        if taken.get(key, 0) >= args.steps_per_source:
            continue
        try:
            examples.append(tokenize_step(step, tokenizer, args.max_length, 192))
        except ValueError:  # over the context budget
            continue
        taken[key] = taken.get(key, 0) + 1

    full = scored_steps(model, examples, forced_skip=())
    with familiarity_ignored(model):
        settings = {"routers alone": scored_steps(model, examples),
                    "margin": scored_steps(model, examples, skip_threshold=args.margin_threshold)}
    settings["do no harm"] = scored_steps(model, examples)
    settings["do no harm + margin"] = scored_steps(model, examples, skip_threshold=args.margin_threshold)
    full_ppl = perplexity_by_source(full)
    result = {"adapter": str(args.adapter), "margin_threshold": args.margin_threshold,
              "familiarity_quantile": model.config.familiarity_quantile, "settings": {}}
    for name, records in settings.items():
        routing = routing_summary(records, model.num_layers, by_source=True)["by_source"]
        ppl = perplexity_by_source(records)
        result["settings"][name] = {
            source: {kind: {"steps": values["steps"], "flops_skipped_frac": values["flops_skipped_frac"],
                            "perplexity_full_depth": full_ppl[source][kind], "perplexity_routed": ppl[source][kind],
                            "skip_cost": ppl[source][kind] / full_ppl[source][kind] - 1}
                     for kind, values in kinds.items()}
            for source, kinds in routing.items()}
        result["settings"][name]["summary"] = summarise(records, full, args.in_distribution)
    print(markdown(result, args.in_distribution))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def summarise(records: list[dict], full: list[dict], in_distribution: list[str]) -> dict:
    """FLOPs skipped per step type, the differential and the skip cost, pooled over in-distribution and unseen
    sources."""
    summary = {}
    for group, inside in (("in_distribution", True), ("unseen", False)):
        chosen = [i for i, r in enumerate(records) if (r["source"] in in_distribution) == inside]
        if not chosen:
            continue
        routed, reference = [records[i] for i in chosen], [full[i] for i in chosen]
        skipped = routing_summary(routed, routed[0]["route"].num_layers)["by_step_type"]
        routed_ppl, reference_ppl = perplexity(routed), perplexity(reference)
        entry = {kind: {"flops_skipped_frac": values["flops_skipped_frac"],
                        "skip_cost": routed_ppl[kind] / reference_ppl[kind] - 1} for kind, values in skipped.items()}
        if len(entry) == 2:
            entry["differential_points"] = 100 * (entry["tool_call"]["flops_skipped_frac"]
                                                  - entry["planning"]["flops_skipped_frac"])
        summary[group] = entry
    return summary


def markdown(result: dict, in_distribution: list[str]) -> str:
    names = list(result["settings"])
    lines = ["| source | step type | steps | ppl full depth | " + " | ".join(
        f"{n}: FLOPs skipped, skip cost" for n in names) + " |", "|---|---|---|---|" + "---|" * len(names)]
    first = result["settings"][names[0]]
    for source in sorted((s for s in first if s != "summary"), key=lambda s: (s not in in_distribution, s)):
        for kind, values in first[source].items():
            cells = [f"{result['settings'][n][source][kind]['flops_skipped_frac']:.1%}, "
                     f"{result['settings'][n][source][kind]['skip_cost']:+.1%}" for n in names]
            label = source + ("" if source in in_distribution else " (unseen)")
            lines.append(f"| {label} | {kind} | {values['steps']} | {values['perplexity_full_depth']:.3f} | "
                         + " | ".join(cells) + " |")
    lines += ["", "| pooled | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for group in ("in_distribution", "unseen"):
        for kind in STEP_TYPES:
            cells = []
            for n in names:
                entry = result["settings"][n]["summary"].get(group, {}).get(kind)
                cells.append(f"{entry['flops_skipped_frac']:.1%}, {entry['skip_cost']:+.1%}" if entry else "-")
            lines.append(f"| {group} {kind}: FLOPs skipped, skip cost | " + " | ".join(cells) + " |")
        cells = [f"{result['settings'][n]['summary'].get(group, {}).get('differential_points', float('nan')):.1f}"
                 for n in names]
        lines.append(f"| {group} differential (points) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
