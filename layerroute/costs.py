"""Step-cost records and the trace cost report: framework-free, so any integration can produce records.

A step-cost record is one JSON object per model step (written by e.g. the LangChain callback). The report
aggregates records per step type, turns FLOPs into money with a :class:`PriceModel`, and projects savings.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import report_html
from .errors import MissingInputError
from .flops import block_flops, causal_key_reads, flops_executed
from .traces import BadRecordError, RecordError, SkippedRecord, check_options

RECORD_TYPE = "layerroute.step"


@dataclass
class StepCostRecord:
    """One model step of an agent run.

    ``flops_total`` is what the full-depth model would spend on the step; ``flops_executed`` what LayerRoute spent:
    ``flops_total - flops_skipped``, plus ``flops_discarded``, the routed attempt thrown away when an answer that
    ended empty was generated again at full depth (:attr:`layerroute.chat.ChatStep.retry_empty`).
    """

    trace_id: str
    run_id: str
    step_index: int
    step_type: str
    input_tokens: int
    output_tokens: int
    flops_total: int
    flops_skipped: int
    skipped_layers: list[int]
    num_layers: int
    latency_s: float
    model_name: str = ""
    node: str | None = None
    graph_step: int | None = None
    parent_run_id: str | None = None
    timestamp: float | None = None
    tools: list[dict] | None = None
    messages: list[dict] | None = None
    output: dict | None = None
    flops_discarded: int = 0
    record_type: str = RECORD_TYPE

    @property
    def flops_executed(self) -> int:
        return self.flops_total - self.flops_skipped + self.flops_discarded

    def to_dict(self) -> dict:
        values = {k: v for k, v in asdict(self).items() if v is not None}
        values["flops_executed"] = self.flops_executed
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "StepCostRecord":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class PriceModel:
    """Turns FLOPs into dollars: either ``usd_per_tflop`` directly, or a GPU-hour price at an achieved FLOP rate."""

    usd_per_gpu_hour: float = 2.0
    achieved_tflops: float = 100.0
    usd_per_tflop: float | None = None

    def __post_init__(self) -> None:
        if self.usd_per_tflop is None and (self.usd_per_gpu_hour <= 0 or self.achieved_tflops <= 0):
            raise ValueError("usd_per_gpu_hour and achieved_tflops must be positive (or give usd_per_tflop)")

    def usd(self, flops: float) -> float:
        per_tflop = self.usd_per_tflop if self.usd_per_tflop is not None else \
            self.usd_per_gpu_hour / 3600.0 / self.achieved_tflops
        return flops / 1e12 * per_tflop

    def describe(self) -> str:
        if self.usd_per_tflop is not None:
            return f"${self.usd_per_tflop:g} per TFLOP"
        return f"${self.usd_per_gpu_hour:g} per GPU-hour at {self.achieved_tflops:g} TFLOP/s achieved"


def prompt_flops(model, prompt_tokens: int) -> int:
    """Full-depth FLOPs of prefilling a ``prompt_tokens``-token prompt through every block of a
    :class:`~layerroute.LayerRouteModel` (no LM head): the input share of a step's ``flops_total``."""
    per_block = block_flops(model.shape.block, prompt_tokens, causal_key_reads(0, prompt_tokens),
                            model.lora_flops_per_token)
    return per_block * model.num_layers


def price_step(price: PriceModel, route: dict, prompt_full_flops: int) -> dict[str, float]:
    """What one step cost, in dollars, split as LangSmith splits a run's cost, for what ran and for the full depth.

    The input share is the prompt's prefill (``prompt_full_flops`` at full depth, :func:`prompt_flops`); the output
    share the rest of the step (every decode forward, and the LM head). Skipping a block saves its share of both.

    Args:
        route: a step's route metadata (``flops_total``, ``flops_skipped``, ``skipped_layers``, ``num_layers``, and
            ``flops_discarded`` where a discarded routed attempt was retried at full depth: priced in the output
            share, so a retried step costs more than its full depth and saves a negative amount).

    Returns:
        ``input_cost``, ``output_cost``, ``total_cost`` (FLOPs executed, priced), ``full_depth_input_cost``,
        ``full_depth_output_cost``, ``full_depth_total_cost`` (every block run) and ``saved_cost`` (their
        difference); ``total_cost == input_cost + output_cost``, and likewise at full depth.
    """
    full = int(route["flops_total"])
    layers = int(route["num_layers"])
    kept = layers - len(route["skipped_layers"])
    input_full = min(int(prompt_full_flops), full)
    input_executed = input_full * kept // layers
    output_executed = flops_executed(route) - input_executed
    costs = {"input_cost": price.usd(input_executed), "output_cost": price.usd(output_executed),
             "full_depth_input_cost": price.usd(input_full), "full_depth_output_cost": price.usd(full - input_full)}
    costs["total_cost"] = costs["input_cost"] + costs["output_cost"]
    costs["full_depth_total_cost"] = costs["full_depth_input_cost"] + costs["full_depth_output_cost"]
    costs["saved_cost"] = costs["full_depth_total_cost"] - costs["total_cost"]
    return costs


@dataclass
class CostRecords:
    """The step-cost records of a file, and the lines left out as unreadable under ``on_bad_record="skip"``."""

    records: list[StepCostRecord]
    skipped: list[SkippedRecord] = field(default_factory=list)

    def skipped_summary(self) -> dict[str, int]:
        """How many lines were skipped, by kind of reason."""
        return dict(Counter(record.kind for record in self.skipped))


def read_cost_records(path: str | Path, on_bad_record: str = "raise") -> CostRecords:
    """The step-cost records of a JSONL file (blank lines ignored).

    Args:
        on_bad_record: ``"raise"`` stops at the first line that is not a step-cost record, naming file, line and
            reason; ``"skip"`` leaves such lines out and lists them in :attr:`CostRecords.skipped` (counted by kind
            of reason with :meth:`CostRecords.skipped_summary`), as the trace readers do.

    Raises:
        MissingInputError: the file does not exist.
        BadRecordError: a line is not a step-cost record, with ``on_bad_record="raise"``.
    """
    check_options(None, on_bad_record)
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"step-cost records {path} do not exist")
    read = CostRecords([])
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            read.records.append(_parse_record(line))
        except RecordError as error:
            if on_bad_record == "raise":
                raise BadRecordError(f"{path}:{number}: not a LayerRoute step-cost record ({error}) (pass "
                                     "on_bad_record='skip' / --on-bad-record skip to skip such records)") from None
            read.skipped.append(SkippedRecord(str(path), number, str(error), error.kind))
    return read


def read_records(path: str | Path, on_bad_record: str = "raise") -> list[StepCostRecord]:
    """The step-cost records of a JSONL file; see :func:`read_cost_records` (which also says what was skipped).

    Raises:
        MissingInputError: the file does not exist.
        BadRecordError: a line is not a step-cost record (the error names the file and line).
    """
    return read_cost_records(path, on_bad_record).records


def _parse_record(line: bytes) -> StepCostRecord:
    """One JSONL line as a checked record; a :class:`~layerroute.traces.RecordError` (with its kind) if it is not."""
    try:
        values = json.loads(line)  # bytes: not UTF-8 is a UnicodeDecodeError, a ValueError
    except UnicodeDecodeError as error:
        raise RecordError(f"not UTF-8 text ({error.reason})", kind="not UTF-8") from None
    except RecursionError:
        raise RecordError("nested too deeply to read", kind="nested too deeply") from None
    except json.JSONDecodeError as error:
        raise RecordError(f"not JSON: {error.msg} at column {error.colno}", kind="not JSON") from None
    except ValueError as error:
        raise RecordError(f"not JSON: {error}", kind="not JSON") from None
    if not isinstance(values, dict):
        raise RecordError(f"a record must be a JSON object, got {type(values).__name__}", kind="not a JSON object")
    if values.get("record_type") != RECORD_TYPE:
        raise RecordError(f"record_type is {values.get('record_type')!r}, expected {RECORD_TYPE!r}",
                          kind="not a step-cost record")
    try:
        record = StepCostRecord.from_dict(values)
    except TypeError as error:  # a required field missing
        raise RecordError(str(error).replace("StepCostRecord.__init__() ", ""), kind="missing fields") from None
    try:
        return check_record(record)
    except RecordError:
        raise
    except (TypeError, ValueError) as error:
        raise RecordError(str(error), kind="invalid values") from None
    except RecursionError:  # a field nested nearly as deep as the parser allows, met again in the message
        raise RecordError("a field is nested too deeply to read", kind="nested too deeply") from None


# What each annotation of StepCostRecord admits from JSON (a bool is an int to Python, never a count in a record).
FIELD_TYPES = {"str": str, "int": int, "float": (int, float), "list[int]": list, "str | None": (str, type(None)),
               "int | None": (int, type(None)), "float | None": (int, float, type(None)),
               "list[dict] | None": (list, type(None)), "dict | None": (dict, type(None))}


def check_record(record: StepCostRecord) -> StepCostRecord:
    """``record`` if its fields hold what the report computes with; else a ``ValueError`` naming the field."""
    for name, spec in StepCostRecord.__dataclass_fields__.items():
        value = getattr(record, name)
        if isinstance(value, bool) or not isinstance(value, FIELD_TYPES[spec.type]):
            raise RecordError(f"`{name}` must be {spec.type}, got {value!r}", kind=f"`{name}` not {spec.type}")
    if record.num_layers < 1 or not 0 <= record.flops_skipped <= record.flops_total or record.flops_discarded < 0:
        raise RecordError("needs num_layers >= 1, 0 <= flops_skipped <= flops_total and flops_discarded >= 0",
                          kind="inconsistent counts")
    if not all(type(layer) is int and 0 <= layer < record.num_layers for layer in record.skipped_layers):
        raise RecordError(f"`skipped_layers` must be block indices below num_layers, got {record.skipped_layers}",
                          kind="inconsistent counts")
    return record


@dataclass
class CostReport:
    """Per step type: steps, tokens, FLOPs spent against full depth, savings, latency; plus a daily projection.

    A report of no records is valid: every count is zero, and the markdown and HTML say there are no steps.
    """

    by_step_type: dict[str, dict]
    totals: dict
    price: PriceModel
    projection: dict = field(default_factory=dict)
    records: list[StepCostRecord] = field(default_factory=list)  # for the HTML report's per-trace timelines
    skipped_records: dict[str, int] = field(default_factory=dict)
    """Unreadable lines left out of the report (``on_bad_record="skip"``), by kind of reason."""

    @property
    def empty(self) -> bool:
        return not self.totals["steps"]

    @classmethod
    def from_records(cls, records: list[StepCostRecord], price: PriceModel | None = None,
                     steps_per_day: int = 1_000_000, skipped_records: dict[str, int] | None = None) -> "CostReport":
        price = price or PriceModel()
        skipped_records = dict(skipped_records or {})
        if not records:
            totals = {**cls._aggregate([], price), "traces": 0}
            projection = {"steps_per_day": steps_per_day, "observed_mix": {}, "full_depth_usd_per_day": 0.0,
                          "layerroute_usd_per_day": 0.0, "saved_usd_per_day": 0.0, "by_step_type": {}}
            return cls({}, totals, price, projection, [], skipped_records)
        groups = defaultdict(list)
        for record in records:
            groups[record.step_type].append(record)
        by_type = {kind: cls._aggregate(items, price) for kind, items in sorted(groups.items())}
        totals = cls._aggregate(records, price)
        totals["traces"] = len({r.trace_id for r in records})
        mix = {kind: len(items) / len(records) for kind, items in groups.items()}
        per_step_full = totals["flops_total"] / len(records)
        per_step_spent = totals["flops_executed"] / len(records)
        projection = {
            "steps_per_day": steps_per_day,
            "observed_mix": mix,
            "full_depth_usd_per_day": price.usd(per_step_full * steps_per_day),
            "layerroute_usd_per_day": price.usd(per_step_spent * steps_per_day),
        }
        projection["saved_usd_per_day"] = projection["full_depth_usd_per_day"] - projection["layerroute_usd_per_day"]
        # each type's share of the day, at what its recorded steps cost on average; the shares sum to the totals above
        projection["by_step_type"] = {}
        for kind, row in by_type.items():
            full = price.usd(row["flops_total"] / len(records) * steps_per_day)
            spent = price.usd(row["flops_executed"] / len(records) * steps_per_day)
            projection["by_step_type"][kind] = {
                "share": mix[kind], "steps_per_day": mix[kind] * steps_per_day, "full_depth_usd_per_day": full,
                "layerroute_usd_per_day": spent, "saved_usd_per_day": full - spent}
        return cls(by_type, totals, price, projection, list(records), skipped_records)

    @staticmethod
    def _aggregate(records: list[StepCostRecord], price: PriceModel) -> dict:
        total = sum(r.flops_total for r in records)
        executed = sum(r.flops_executed for r in records)
        return {
            "steps": len(records),
            "input_tokens": sum(r.input_tokens for r in records),
            "output_tokens": sum(r.output_tokens for r in records),
            "flops_total": total,
            "flops_executed": executed,
            "flops_saved_frac": 1 - executed / total if total else 0.0,
            "mean_layers_skipped_frac": statistics.fmean(len(r.skipped_layers) / r.num_layers for r in records)
            if records else 0.0,
            "median_latency_s": statistics.median(r.latency_s for r in records) if records else 0.0,
            "usd_full_depth": price.usd(total),
            "usd_layerroute": price.usd(executed),
        }

    def to_dict(self) -> dict:
        values = {"by_step_type": self.by_step_type, "totals": self.totals, "price_model": self.price.describe(),
                  "projection": self.projection}
        if self.skipped_records:
            values["skipped_records"] = self.skipped_records
        return values

    def _skipped_note(self) -> str:
        if not self.skipped_records:
            return ""
        count = sum(self.skipped_records.values())
        reasons = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.skipped_records.items()))
        return f"{count} unreadable record{'s' * (count != 1)} skipped ({reasons})."

    def _counts(self) -> str:
        steps, traces = self.totals["steps"], self.totals["traces"]
        return f"{steps} step{'s' * (steps != 1)} in {traces} trace{'s' * (traces != 1)}"

    def to_markdown(self) -> str:
        if self.empty:
            lines = ["# LayerRoute trace cost report", "", "No steps: there are no step-cost records to report on."]
            if self._skipped_note():
                lines += ["", self._skipped_note()]
            return "\n".join(lines) + "\n"
        lines = ["# LayerRoute trace cost report", "",
                 f"{self._counts()}; prices: {self.price.describe()}.",
                 "", "| step type | steps | tokens in / out | GFLOPs spent | GFLOPs full depth | saved | "
                 "blocks skipped | median latency |", "|---|---|---|---|---|---|---|---|"]
        for kind, row in [*self.by_step_type.items(), ("all", self.totals)]:
            lines.append(
                f"| {kind} | {row['steps']} | {row['input_tokens']} / {row['output_tokens']} | "
                f"{row['flops_executed'] / 1e9:.1f} | {row['flops_total'] / 1e9:.1f} | {row['flops_saved_frac']:.1%} | "
                f"{row['mean_layers_skipped_frac']:.1%} | {row['median_latency_s']:.3f} s |"
            )
        p = self.projection
        lines += ["", f"Projection at {p['steps_per_day']:,} steps a day with the observed mix "
                      f"({', '.join(f'{k} {v:.0%}' for k, v in p['observed_mix'].items())}): "
                      f"full depth ${p['full_depth_usd_per_day']:,.2f}/day, LayerRoute "
                      f"${p['layerroute_usd_per_day']:,.2f}/day, saving ${p['saved_usd_per_day']:,.2f}/day."]
        if self._skipped_note():
            lines += ["", self._skipped_note()]
        return "\n".join(lines) + "\n"

    def to_html(self, max_traces: int = 50) -> str:
        """A self-contained page: per-type tables and chart, the projection, and a timeline of every trace's steps.

        At most ``max_traces`` timelines (the most expensive traces) keep a large day's report openable.
        """
        return report_html.render(self, max_traces)
