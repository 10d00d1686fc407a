"""Can a check on the routers' features tell the steps of unseen sources from the training ones, and would falling
back to full depth on the steps it flags do no harm there?

    python benchmarks/novelty.py runs/generalisation/cpu-seed0/bfcl+gsm        # a fold run of generalisation.py

For a fold run of ``benchmarks/generalisation.py`` (its adapter, trained without the fold's sources, and the traces
it wrote), every router's features are read on ``--fit-steps`` training steps (contexts within the training budget,
the adapter's routers deciding, familiarity off), and three novelty scores are fitted per block on part of them:

- ``diagonal``: the root mean square of the channels' standardised deviations (what ``layerroute.familiarity``
  checks);
- ``subspace``: the norm of what is left of the features after projecting out the fitted steps' top
  ``--components`` principal directions;
- ``mahalanobis``: the distance under the fitted steps' covariance, shrunk towards its mean variance
  (``--shrinkage``).

Each block's threshold is the ``--quantile`` of the score on the other training steps (``--calibration-steps``,
never fitted on), and a step is flagged where any block's score passes its threshold. Reported, for the in-distribution
test steps (the fold's own sources) and the held-out ones: the share of steps flagged, per step type, the area
under the ROC curve of held-out against in-distribution, and the FLOPs skipped and skip cost (perplexity routed
against the same adapter at full depth) when flagged steps run at full depth: a step-level fallback, scored
exactly from the two scorings (routers alone, full depth). The shipped do-no-harm cascade is scored beside it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layerroute import LayerRouteModel  # noqa: E402
from layerroute.adapter_files import read_adapter_config  # noqa: E402
from layerroute.errors import MissingInputError, UserError, check_output_directory, command  # noqa: E402
from layerroute.evaluation import cases_by_type, perplexity, routing_summary, scored_steps  # noqa: E402
from layerroute.familiarity import MIN_SCALE_FRACTION, familiarity_ignored  # noqa: E402
from layerroute.loading import load_base_model  # noqa: E402
from layerroute.model import ADAPTER_CONFIG, FINGERPRINT_ROWS  # noqa: E402
from layerroute.steps import STEP_TYPES, trace_steps  # noqa: E402
from layerroute.traces import read_sources  # noqa: E402
from layerroute.training import read_router_features  # noqa: E402

CORPUS = ROOT / "training" / "data" / "corpus"
SCORES = ("diagonal", "subspace", "mahalanobis")


def load_generalisation():
    spec = importlib.util.spec_from_file_location("generalisation", ROOT / "benchmarks" / "generalisation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fitted_scores(fit: torch.Tensor, components: int, shrinkage: float):
    """Novelty score functions fitted on ``fit`` ``(steps, hidden)``: each maps ``(n, hidden)`` to ``(n,)``."""
    mean = fit.mean(0)
    centred = fit - mean
    spread = centred.std(0)
    scale = spread.clamp_min(MIN_SCALE_FRACTION * float(spread.mean()) + 1e-12)  # as layerroute.familiarity
    _, _, right = torch.linalg.svd(centred, full_matrices=False)
    directions = right[:components]  # (components, hidden)
    covariance = centred.T @ centred / (len(fit) - 1)
    target = covariance.diagonal().mean().clamp_min(1e-12)  # a channel-free covariance stays invertible
    shrunk = (1 - shrinkage) * covariance + shrinkage * target * torch.eye(len(mean))
    precision = torch.linalg.inv(shrunk)

    def diagonal(x):
        return ((x - mean) / scale).pow(2).mean(-1).sqrt()

    def subspace(x):
        deviation = x - mean
        return (deviation - (deviation @ directions.T) @ directions).norm(dim=-1)

    def mahalanobis(x):
        deviation = x - mean
        return ((deviation @ precision) * deviation).sum(-1).clamp_min(0).sqrt()

    return {"diagonal": diagonal, "subspace": subspace, "mahalanobis": mahalanobis}


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counting half."""
    above = (positive[:, None] > negative[None, :]).float().mean()
    ties = (positive[:, None] == negative[None, :]).float().mean()
    return float(above + ties / 2)


def summary(records: list[dict], num_layers: int, full: list[dict]) -> dict:
    skipped = routing_summary(records, num_layers)["by_step_type"]
    routed, depth = perplexity(records), perplexity(full)
    return {kind: {"flops_skipped_frac": skipped[kind]["flops_skipped_frac"],
                   "skip_cost": routed[kind] / depth[kind] - 1} for kind in STEP_TYPES if kind in depth}


@command("novelty")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fold", type=Path, help="a fold directory of generalisation.py (adapter/, *.jsonl.gz)")
    parser.add_argument("--test", type=Path, default=CORPUS / "test.jsonl.gz", help="in-distribution test split")
    parser.add_argument("--fit-steps", type=int, default=300)
    parser.add_argument("--calibration-steps", type=int, default=100, help="of --fit-steps, kept for thresholds")
    parser.add_argument("--components", type=int, default=32)
    parser.add_argument("--shrinkage", type=float, default=0.1)
    parser.add_argument("--quantile", type=float, nargs="+", default=[0.95, 0.99])
    parser.add_argument("--steps-per-source", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    adapter = args.fold / "adapter"
    if not (adapter / ADAPTER_CONFIG).is_file() or not (adapter / "report.json").is_file():
        raise MissingInputError(f"{args.fold} holds no finished fold adapter ({adapter / ADAPTER_CONFIG} and "
                                f"{adapter / 'report.json'} are written when its training ends)")
    check_output_directory("--output", args.output)
    generalisation = load_generalisation()

    train = read_sources([args.fold / "train.jsonl.gz"]).traces
    held_out = read_sources([args.fold / "held_out.jsonl.gz"]).traces
    held_sources = {t.source for t in held_out}
    inside = [t for t in read_sources([args.test]).traces if t.source not in held_sources]
    _, recorded = read_adapter_config(adapter / ADAPTER_CONFIG, FINGERPRINT_ROWS)
    base, tokenizer = load_base_model(recorded["name_or_path"])
    model = LayerRouteModel.from_pretrained(adapter, base_model=copy.deepcopy(base)).eval()
    run = json.loads((adapter / "report.json").read_text())["run"]  # the TrainingConfig the fold trained with
    cases, _ = cases_by_type([s for t in train for s in trace_steps(t)], tokenizer, run["max_length"],
                             run["max_target_length"], args.seed, per_source=args.fit_steps)
    pool = [example for kind in STEP_TYPES for _, example in cases[kind]]
    drawn = random.Random(args.seed).sample(pool, min(args.fit_steps, len(pool)))
    if len(drawn) - args.calibration_steps < 2 or args.calibration_steps < 1:
        raise UserError(f"{len(drawn)} training steps fit the budget: too few for --calibration-steps "
                        f"{args.calibration_steps} and at least 2 to fit on")
    gen_args = argparse.Namespace(max_length=2048, seed=args.seed, steps_per_source=args.steps_per_source)
    evaluated = {"in distribution": generalisation.examples_of(inside, tokenizer, gen_args),
                 "held out": generalisation.examples_of(held_out, tokenizer, gen_args)}

    with torch.no_grad(), familiarity_ignored(model):
        fit_features = read_router_features(model, drawn, tokenizer.pad_token_id)
        features = {name: read_router_features(model, examples, tokenizer.pad_token_id)
                    for name, examples in evaluated.items()}
        alone = {name: scored_steps(model, examples) for name, examples in evaluated.items()}
    full = {name: scored_steps(model, examples, forced_skip=()) for name, examples in evaluated.items()}
    cascade = {name: scored_steps(model, examples) for name, examples in evaluated.items()}

    calibration, fitted = fit_features[:args.calibration_steps], fit_features[args.calibration_steps:]
    result = {"fold": str(args.fold), "held_out": sorted(held_sources), "fit_steps": len(fitted),
              "calibration_steps": len(calibration), "steps": {n: len(e) for n, e in evaluated.items()},
              "routers alone": {n: summary(alone[n], model.num_layers, full[n]) for n in evaluated},
              "do-no-harm cascade (shipped)": {n: summary(cascade[n], model.num_layers, full[n]) for n in evaluated},
              "scores": {}}
    blocks = [fitted_scores(fitted[:, block], args.components, args.shrinkage) for block in range(model.num_layers)]
    for name in SCORES:
        calibrated = torch.stack([scores[name](calibration[:, b]) for b, scores in enumerate(blocks)], 1)
        scored = {n: torch.stack([scores[name](f[:, b]) for b, scores in enumerate(blocks)], 1)
                  for n, f in features.items()}
        entry = {}
        for quantile in args.quantile:
            threshold = torch.quantile(calibrated, quantile, dim=0)  # (num_layers,)
            ratio = {n: (s / threshold).amax(1) for n, s in scored.items()}
            flagged = {n: (r > 1).tolist() for n, r in ratio.items()}
            fallback = {n: [f if flag else a for a, f, flag in zip(alone[n], full[n], flagged[n])]
                        for n in evaluated}
            entry[str(quantile)] = {
                "auroc_held_out_vs_in_distribution": auroc(ratio["held out"], ratio["in distribution"]),
                "flagged": {n: {kind: sum(flag for flag, e in zip(flagged[n], evaluated[n]) if e.step_type == kind)
                                / max(1, sum(e.step_type == kind for e in evaluated[n])) for kind in STEP_TYPES}
                            for n in evaluated},
                "step-level fallback": {n: summary(fallback[n], model.num_layers, full[n]) for n in evaluated},
            }
        result["scores"][name] = entry
    print(markdown(result))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def markdown(result: dict) -> str:
    names = ("in distribution", "held out")
    lines = [f"fold {result['fold']} (held out: {', '.join(result['held_out'])}); steps: "
             + ", ".join(f"{n} {c}" for n, c in result["steps"].items()), "",
             "| setting | flagged: in-dist tool / planning, held-out tool / planning | AUROC | "
             + " | ".join(f"{n}: tool calls, planning (FLOPs skipped, skip cost)" for n in names) + " |",
             "|---|---|---|---|---|"]

    def cells(entry):
        return " | ".join(", ".join(f"{entry[n][k]['flops_skipped_frac']:.1%} {entry[n][k]['skip_cost']:+.1%}"
                                    for k in STEP_TYPES if k in entry[n]) for n in names)

    for setting in ("routers alone", "do-no-harm cascade (shipped)"):
        lines.append(f"| {setting} | - | - | {cells(result[setting])} |")
    for name, by_quantile in result["scores"].items():
        for quantile, entry in by_quantile.items():
            flagged = ", ".join(f"{entry['flagged'][n][k]:.0%}" for n in names for k in STEP_TYPES)
            lines.append(f"| {name} q{quantile} | {flagged} | {entry['auroc_held_out_vs_in_distribution']:.2f} | "
                         f"{cells(entry['step-level fallback'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
