"""Held-out evaluation: skip rates, FLOPs and perplexity per step type, agent quality of generated steps (valid calls,
tool names, arguments as BFCL compares them, answers after tool results), wall-clock.

Step types are read here, after training, to prove the differential emerged; they never reach training.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
import time
import warnings
from collections import Counter, defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

from .extras import MissingExtraError, require
from .flops import step_route_stats
from .grammar import DecodingGrammars
from .model import LayerRouteModel
from .steps import STEP_TYPES, Step, TokenizedStep, tokenize_step
from .toolcalls import parse_tool_calls, score_calls


@torch.no_grad()
def scored_steps(model: LayerRouteModel, examples: list[TokenizedStep], forced_skip=None,
                 skip_threshold: float | None = None, lora: bool = True) -> list[dict]:
    """Route and score each step in one forward over its context and target, as generation would route it.

    The routers decide from the context tokens only; the target's summed negative log-likelihood is measured under
    that decision. ``forced_skip`` and ``skip_threshold`` override the routers as in :meth:`LayerRouteModel.forward`;
    without ``forced_skip``, a step whose context ends with a role the routers do not decide after runs every block,
    as the adapter serves it (:meth:`LayerRouteConfig.routes_after`). ``lora=False`` scores the frozen base.

    Returns one record per example, in order: ``source``, ``step_type``, ``route`` (the :class:`RouteStats` of
    producing the target under the decision), ``nll`` and ``target_tokens``.
    """
    model.eval()
    records = []
    for example in tqdm(examples, desc="scoring steps", leave=False):
        skip = _forced_skip_after(model, example.context_role, forced_skip)
        context, target = len(example.context_ids), len(example.target_ids)
        ids = torch.tensor([example.context_ids + example.target_ids], device=model.device)
        context_mask = torch.zeros_like(ids, dtype=torch.bool)
        context_mask[:, :context] = True
        labels = torch.full_like(ids, -100)
        labels[:, context:] = ids[:, context:]
        with nullcontext() if lora else model.lora_disabled():
            out = model(ids, context_mask=context_mask, labels=labels, forced_skip=skip, skip_threshold=skip_threshold)
        keep = out.keep[0].tolist()
        route = step_route_stats([i for i, kept in enumerate(keep) if not kept], model.num_layers, model.shape.block,
                                 context_tokens=context, forwarded_tokens=context + target - 1,
                                 lm_head_logits=target * model.shape.vocab_size,
                                 extra_flops_per_token=model.lora_flops_per_token)
        records.append({"source": example.source, "step_type": example.step_type, "route": route,
                        "nll": float(out.token_nll.sum()), "target_tokens": target})
    return records


def _forced_skip_after(model: LayerRouteModel, context_role: str | None, forced_skip):
    """``forced_skip``, or none skipped (every block runs) where the routers would decide after a context role they
    do not decide after (do-no-harm routing, :meth:`LayerRouteConfig.routes_after`)."""
    return () if forced_skip is None and not model.config.routes_after(context_role) else forced_skip


def routing_summary(records: list[dict], num_layers: int, by_source: bool = False) -> dict:
    """Per step type of :func:`scored_steps` records: steps, mean fraction of blocks skipped, FLOP-skip fraction and
    per-block skip rate, and the differential in points; with ``by_source``, the same per source and step type under
    ``"by_source"`` (per-block rates left out)."""
    by_type = _route_summary(records, num_layers)
    report = {"by_step_type": by_type}
    if "tool_call" in by_type and "planning" in by_type:
        report["flops_skip_differential_points"] = 100 * (
            by_type["tool_call"]["flops_skipped_frac"] - by_type["planning"]["flops_skipped_frac"]
        )
    if by_source:
        report["by_source"] = {}
        for source in sorted({r["source"] for r in records}):
            summary = _route_summary([r for r in records if r["source"] == source], num_layers)
            for values in summary.values():
                values.pop("block_skip_rate")
            report["by_source"][source] = summary
    return report


def routing_report(model: LayerRouteModel, examples: list[TokenizedStep], by_source: bool = False) -> dict:
    """:func:`routing_summary` of ``model``'s routes on ``examples``."""
    return routing_summary(scored_steps(model, examples), model.num_layers, by_source)


def _route_summary(records: list[dict], num_layers: int) -> dict:
    per_type = defaultdict(list)
    for record in records:
        per_type[record["step_type"]].append(record["route"])
    return {
        kind: {
            "steps": len(routes),
            "layers_skipped_frac": statistics.fmean(r.layers_skipped_frac for r in routes),
            "flops_skipped_frac": sum(r.flops_skipped for r in routes) / sum(r.flops_total for r in routes),
            "block_skip_rate": [sum(i in r.skipped_layers for r in routes) / len(routes) for i in range(num_layers)],
        }
        for kind in STEP_TYPES if (routes := per_type.get(kind))
    }


def perplexity(records: list[dict]) -> dict[str, float]:
    """Target-token perplexity per step type of :func:`scored_steps` records."""
    totals = defaultdict(lambda: [0.0, 0])
    for record in records:
        totals[record["step_type"]][0] += record["nll"]
        totals[record["step_type"]][1] += record["target_tokens"]
    return {kind: math.exp(totals[kind][0] / totals[kind][1]) for kind in STEP_TYPES if totals.get(kind, (0, 0))[1]}


def perplexity_by_source(records: list[dict]) -> dict[str, dict[str, float]]:
    """:func:`perplexity` per source."""
    return {source: perplexity([r for r in records if r["source"] == source])
            for source in sorted({r["source"] for r in records})}


def cases_by_type(steps: list[Step], tokenizer, max_length: int, max_target_length: int, seed: int,
                  per_source: int | None = None) -> tuple[dict[str, list[tuple[Step, TokenizedStep]]], Counter]:
    """``steps`` shuffled by ``seed`` and tokenized (:func:`layerroute.steps.tokenize_step`), as ``(step, tokenized)``
    pairs per step type, with the count per type of the steps over the ``max_length`` context budget (left out).

    With ``per_source``, at most that many steps of each source and type are taken (the first ones of the shuffle
    that fit), and the steps after a source's cap is reached are neither tokenized nor counted."""
    steps = list(steps)
    random.Random(seed).shuffle(steps)
    cases: dict[str, list] = {kind: [] for kind in STEP_TYPES}
    over_budget, taken = Counter(), Counter()
    for step in steps:
        if per_source is not None and taken[step.source, step.step_type] >= per_source:
            continue
        try:
            cases[step.step_type].append((step, tokenize_step(step, tokenizer, max_length, max_target_length)))
        except ValueError:  # over the context budget
            over_budget[step.step_type] += 1
            continue
        taken[step.source, step.step_type] += 1
    return cases, over_budget


def across_sources(cases: list, limit: int) -> list:
    """Up to ``limit`` of ``cases`` (tuples whose first item is the :class:`Step`), taken from each source in turn,
    so a large source does not crowd out the others; a smaller ``limit`` takes a prefix of a larger one's choice."""
    by_source: dict[str, list] = {}
    for case in cases:
        by_source.setdefault(case[0].source, []).append(case)
    queues = [iter(group) for _, group in sorted(by_source.items())]
    chosen = []
    while queues and len(chosen) < limit:
        for queue in list(queues):
            case = next(queue, None)
            if case is None:
                queues.remove(queue)
            elif len(chosen) < limit:
                chosen.append(case)
    return chosen


def answers_after_tool_results(step: Step) -> bool:
    """Whether ``step`` is a planning step written right after a tool result (an agent's final answer)."""
    return step.step_type == "planning" and bool(step.context) and step.context[-1]["role"] == "tool"


@torch.no_grad()
def agent_quality(model: LayerRouteModel, tokenizer, grammars: DecodingGrammars,
                  cases: list[tuple[Step, TokenizedStep]], forced_skip=None, skip_threshold: float | None = None,
                  lora: bool = True, extra_tokens: int = 32) -> list[dict]:
    """Greedy-generate each step as an agent would, with its tools bound and tool calls grammar-constrained
    (:mod:`layerroute.grammar`, ``tool_choice`` auto), and score what was generated. A tool-call step whose reference
    makes one call is generated with ``parallel_tool_calls`` off (the answer ends after one call), as BFCL's single-call
    categories are; one whose reference makes several may make several.

    Tool-call steps get :func:`layerroute.toolcalls.score_calls` against the reference calls (``valid``,
    ``names_correct``, ``arguments_correct``), ``called_a_tool`` (the answer began a ``<tool_call>`` block, finished
    or not) and, when it did, ``valid_when_called``: the form the grammar holds, apart from the choice to call.
    Answers after tool results get ``called_a_tool``, ``answer_f1`` (token F1 against the reference answer) and
    ``final_number_correct`` (the last number of the answer equals the reference's, when the reference has one).
    Each step may generate its reference's length plus ``extra_tokens``.

    Returns one record per case, in order, so two models' records pair up step by step; each keeps the ``generated``
    text, so that a wrong call can be read.
    """
    model.eval()
    records = []
    for step, example in tqdm(cases, desc="agent quality", leave=False):
        ids = torch.tensor([example.context_ids], device=model.device)
        parallel = step.step_type != "tool_call" or len(step.target["tool_calls"]) > 1
        processor = (DecodingGrammars.processor(grammars.tool_calls(step.tools, None, parallel)) if step.tools
                     else None)
        with nullcontext() if lora else model.lora_disabled():
            out = model.generate(ids, forced_skip=_forced_skip_after(model, example.context_role, forced_skip),
                                 skip_threshold=skip_threshold, do_sample=False,
                                 max_new_tokens=len(example.target_ids) + extra_tokens,
                                 pad_token_id=tokenizer.pad_token_id,
                                 logits_processor=LogitsProcessorList([processor] if processor else []))
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        parsed = parse_tool_calls(text)
        record = {"trace_id": step.trace_id, "index": step.index, "source": step.source,
                  "step_type": step.step_type, "flops_skipped_frac": model.last_route.flops_skipped_frac,
                  "generated": text, "called_a_tool": bool(parsed.tool_calls or parsed.invalid_tool_calls)}
        if step.step_type == "tool_call":
            score = score_calls(parsed, step.target["tool_calls"], step.tools)
            record.update(valid=score.valid, names_correct=score.names_correct,
                          arguments_correct=score.arguments_correct, error=score.error)
            if record["called_a_tool"]:  # what the grammar answers for: a call, once begun, is valid
                record["valid_when_called"] = score.valid
        else:
            reference = step.target.get("content") or ""
            record["answer_f1"] = token_f1(parsed.content, reference)
            expected = _last_number(reference)
            if expected is not None:
                record["final_number_correct"] = _last_number(parsed.content) == expected
        records.append(record)
    return records


QUALITY_RATES = ("valid", "valid_when_called", "names_correct", "arguments_correct", "final_number_correct")


def quality_summary(records: list[dict]) -> dict:
    """Per metric: the rate over the steps that have it, its 95% Wilson interval and the step count; the mean answer
    token F1 with its standard error."""
    summary = {}
    for key in QUALITY_RATES:
        values = [r[key] for r in records if key in r]
        if values:
            low, high = wilson_interval(sum(values), len(values))
            summary[key] = {"rate": sum(values) / len(values), "ci95": [low, high], "steps": len(values)}
    f1 = [r["answer_f1"] for r in records if "answer_f1" in r]
    if f1:
        spread = statistics.stdev(f1) / math.sqrt(len(f1)) if len(f1) > 1 else 0.0
        summary["answer_f1"] = {"mean": statistics.fmean(f1), "stderr": spread, "steps": len(f1)}
    return summary


def paired_difference(first: list[dict], second: list[dict], key: str) -> dict | None:
    """How two models' records of the same steps differ on the yes/no metric ``key``: the steps only the first got
    right, only the second, and the difference in points (second minus first) with its 95% interval for paired
    proportions. ``None`` when no step has the metric."""
    pairs = [(a[key], b[key]) for a, b in zip(first, second, strict=True) if key in a and key in b]
    if not pairs:
        return None
    first_only = sum(a and not b for a, b in pairs)
    second_only = sum(b and not a for a, b in pairs)
    n = len(pairs)
    difference = (second_only - first_only) / n
    spread = 1.96 * math.sqrt(max(first_only + second_only - n * difference**2, 0.0)) / n
    return {"steps": n, "first_only": first_only, "second_only": second_only,
            "difference_points": 100 * difference,
            "ci95_points": [100 * (difference - spread), 100 * (difference + spread)]}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    rate = successes / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


_WORD = re.compile(r"\w+")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 on lower-cased words."""
    predicted, wanted = Counter(_WORD.findall(prediction.lower())), Counter(_WORD.findall(reference.lower()))
    common = sum((predicted & wanted).values())
    if common == 0:
        return float(predicted == wanted)  # both empty: 1.0
    precision, recall = common / sum(predicted.values()), common / sum(wanted.values())
    return 2 * precision * recall / (precision + recall)


def _last_number(text: str) -> float | None:
    numbers = NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


@torch.no_grad()
def wall_clock_by_type(model: LayerRouteModel, examples: list[TokenizedStep], repeats: int = 3,
                       skip_threshold: float | None = None) -> dict:
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
            for name, forced_skip in (("routed", _forced_skip_after(model, example.context_role, None)),
                                      ("full", ())):
                began = time.perf_counter()
                model.generate(ids, forced_skip=forced_skip, skip_threshold=skip_threshold, **kwargs)
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
    try:
        plot(output / "report.png", report, metrics)
    except MissingExtraError as error:  # the figure is the one part of the report that needs an extra
        warnings.warn(f"report.png not drawn: {error}", stacklevel=2)


def _moving_average(values: list[float], window: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def plot(path: Path, report: dict, metrics: list[dict]) -> None:
    """Draw ``report.png``: per-block skip rate by step type, and the training curves. Needs the plot extra."""
    matplotlib = require("matplotlib", "plot", "drawing the training report's figure")
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
