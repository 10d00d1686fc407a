"""Held-out evaluation: skip rates, FLOPs and perplexity per step type, tool-call exact match, wall-clock.

Step types are read here, after training, to prove the differential emerged; they never reach training.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .flops import step_route_stats
from .model import LayerRouteModel
from .steps import STEP_TYPES, TokenizedStep
from .toolcalls import calls_match, parse_tool_calls


@torch.no_grad()
def step_routes(model: LayerRouteModel, example: TokenizedStep, forced_skip=None):
    """Decisions from the step's context, and the route stats of producing its target under them."""
    context = torch.tensor([example.context_ids], device=model.device)
    keep = model(context, forced_skip=forced_skip).keep[0].cpu()
    skipped = [i for i in range(model.num_layers) if not keep[i]]
    target = len(example.target_ids)
    return step_route_stats(skipped, model.num_layers, model.shape.block, model.shape.vocab_size,
                            context_tokens=len(example.context_ids),
                            forwarded_tokens=len(example.context_ids) + target - 1,
                            lm_head_positions=target, extra_flops_per_token=model.lora_flops_per_token)


@torch.no_grad()
def routing_report(model: LayerRouteModel, examples: list[TokenizedStep]) -> dict:
    """Per step type: steps, mean fraction of blocks skipped, FLOP-skip fraction and per-block skip rate."""
    model.eval()
    per_type = defaultdict(list)
    for example in tqdm(examples, desc="routes", leave=False):
        per_type[example.step_type].append(step_routes(model, example))
    by_type = {}
    for kind in STEP_TYPES:
        routes = per_type.get(kind, [])
        if not routes:
            continue
        by_type[kind] = {
            "steps": len(routes),
            "layers_skipped_frac": statistics.fmean(r.layers_skipped_frac for r in routes),
            "flops_skipped_frac": sum(r.flops_skipped for r in routes) / sum(r.flops_total for r in routes),
            "block_skip_rate": [sum(i in r.skipped_layers for r in routes) / len(routes)
                                for i in range(model.num_layers)],
        }
    report = {"by_step_type": by_type}
    if "tool_call" in by_type and "planning" in by_type:
        report["flops_skip_differential_points"] = 100 * (
            by_type["tool_call"]["flops_skipped_frac"] - by_type["planning"]["flops_skipped_frac"]
        )
    return report


@torch.no_grad()
def perplexity_by_type(model: LayerRouteModel, examples: list[TokenizedStep], forced_skip=None,
                       lora: bool = True) -> dict[str, float]:
    """Target-token perplexity per step type; routers decide from the context only (as in generation)."""
    model.eval()
    totals = defaultdict(lambda: [0.0, 0])
    for example in tqdm(examples, desc="perplexity", leave=False):
        ids = torch.tensor([example.context_ids + example.target_ids], device=model.device)
        context_mask = torch.zeros_like(ids, dtype=torch.bool)
        context_mask[:, : len(example.context_ids)] = True
        labels = torch.full_like(ids, -100)
        labels[:, len(example.context_ids):] = ids[:, len(example.context_ids):]
        with nullcontext() if lora else model.lora_disabled():
            out = model(ids, context_mask=context_mask, labels=labels, forced_skip=forced_skip)
        totals[example.step_type][0] += float(out.token_nll.sum())
        totals[example.step_type][1] += int((labels[:, 1:] != -100).sum())
    return {kind: math.exp(nll / count) for kind, (nll, count) in totals.items() if count}


@torch.no_grad()
def tool_call_exact_match(model: LayerRouteModel, tokenizer, examples: list[TokenizedStep], references: list[list],
                          forced_skip=None, lora: bool = True) -> dict:
    """Greedy-generate each tool-call step; a match is the same function names and arguments as the reference."""
    model.eval()
    hits = 0
    for example, reference in tqdm(list(zip(examples, references)), desc="tool-call exact match", leave=False):
        ids = torch.tensor([example.context_ids], device=model.device)
        with nullcontext() if lora else model.lora_disabled():
            out = model.generate(ids, forced_skip=forced_skip, do_sample=False,
                                 max_new_tokens=len(example.target_ids) + 16, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        hits += calls_match(parse_tool_calls(text).tool_calls, reference)
    return {"steps": len(examples), "exact_match": hits / max(len(examples), 1)}


@torch.no_grad()
def wall_clock_by_type(model: LayerRouteModel, examples: list[TokenizedStep], repeats: int = 3) -> dict:
    """Measured time per step, routed against full depth (same adapter, every block running), per step type.

    Each step generates exactly as many tokens as its reference target (greedy), so both runs do the same work but
    for the skipped blocks. Runs alternate and each step is timed ``repeats`` times; a step's time is its median,
    and a type's ratio is the sum of its steps' routed medians over the sum of their full-depth medians, next to the
    FLOP ratio of the same steps.
    """
    model.eval()
    per_type = defaultdict(lambda: {"routed_s": 0.0, "full_s": 0.0, "flops_routed": 0, "flops_full": 0, "steps": 0})
    for example in tqdm(examples, desc="wall clock", leave=False):
        ids = torch.tensor([example.context_ids], device=model.device)
        length = len(example.target_ids)
        kwargs = dict(do_sample=False, max_new_tokens=length, min_new_tokens=length)
        times = {"routed": [], "full": []}
        for _ in range(repeats):
            for name, forced_skip in (("routed", None), ("full", ())):
                began = time.perf_counter()
                model.generate(ids, forced_skip=forced_skip, **kwargs)
                times[name].append(time.perf_counter() - began)
                if name == "routed":
                    route = model.last_route
        entry = per_type[example.step_type]
        entry["routed_s"] += statistics.median(times["routed"])
        entry["full_s"] += statistics.median(times["full"])
        entry["flops_routed"] += route.flops_total - route.flops_skipped
        entry["flops_full"] += route.flops_total
        entry["steps"] += 1
    return {
        kind: {"steps": v["steps"], "routed_s": v["routed_s"], "full_depth_s": v["full_s"],
               "time_saved_frac": 1 - v["routed_s"] / v["full_s"],
               "flops_saved_frac": 1 - v["flops_routed"] / v["flops_full"]}
        for kind, v in per_type.items()
    }


def write_training_report(output: Path, report: dict, metrics_path: Path, run: dict) -> None:
    """``report.json``, ``report.md`` and ``report.png`` (per-block skip rate by step type; training curves)."""
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    full = {"run": run, "held_out": report,
            "final_train_lm_loss": statistics.fmean(m["lm_loss"] for m in metrics[-10:]) if metrics else None,
            "seconds_per_step": statistics.median(m["seconds"] for m in metrics) if metrics else None}
    (output / "report.json").write_text(json.dumps(full, indent=2) + "\n")
    lines = ["# LayerRoute training report", "", "| step type | held-out steps | blocks skipped | FLOPs skipped |",
             "|---|---|---|---|"]
    for kind, values in report["by_step_type"].items():
        lines.append(f"| {kind} | {values['steps']} | {values['layers_skipped_frac']:.1%} | "
                     f"{values['flops_skipped_frac']:.1%} |")
    if "flops_skip_differential_points" in report:
        lines += ["", f"Differential (tool_call minus planning FLOP skip): "
                      f"{report['flops_skip_differential_points']:.1f} points."]
    lines += ["", f"Run settings: `{json.dumps(run)}`", "", "![per-block skip rate and training curves](report.png)"]
    (output / "report.md").write_text("\n".join(lines) + "\n")
    plot(output / "report.png", report, metrics)


def _moving_average(values: list[float], window: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def plot(path: Path, report: dict, metrics: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (blocks, curves) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.4
    for offset, (kind, values) in zip((-width / 2, width / 2), report["by_step_type"].items()):
        rates = values["block_skip_rate"]
        blocks.bar([i + offset for i in range(len(rates))], rates, width, label=kind)
    blocks.set(title="held-out skip rate per block", xlabel="block", ylabel="fraction of steps skipping")
    blocks.legend()
    if metrics:
        steps = [m["step"] for m in metrics]
        curves.plot(steps, _moving_average([m["lm_loss"] for m in metrics]), color="tab:gray", label="LM loss")
        curves.set(title="training (moving average over 10 steps)", xlabel="step", ylabel="LM loss")
        twin = curves.twinx()
        for kind, color in zip(STEP_TYPES, ("tab:blue", "tab:orange")):
            # per-type rates are logged for the report only; steps without that type carry the last value over
            rates, last = [], 0.0
            for m in metrics:
                last = m.get("skip_rate_by_type", {}).get(kind, last)
                rates.append(last)
            twin.plot(steps, _moving_average(rates), color=color, label=f"{kind} blocks skipped")
        twin.set_ylabel("fraction of blocks skipped")
        twin.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
