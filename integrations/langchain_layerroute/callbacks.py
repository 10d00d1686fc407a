"""Recording what every ``ChatLayerRoute`` step of an agent run cost, as LayerRoute step-cost records."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult
from langchain_core.tracers.context import register_configure_hook

from layerroute.costs import CostReport, PriceModel, StepCostRecord

from .chat_models import _to_openai_message


class LayerRouteCostCallback(BaseCallbackHandler):
    """Collects one :class:`~layerroute.costs.StepCostRecord` per ``ChatLayerRoute`` answer; thread-safe.

    Records carry the trace id, run id, step index within the trace, LangGraph node and step where present, step
    type, tokens, FLOPs executed and skipped, and latency. Give ``path`` to append them to a JSONL file as they
    arrive; ``record_messages=True`` also stores each step's input messages, tools and output, so the file can be
    trained on (``python training/finetune.py --data costs.jsonl``).

    A trace is one top-level run: an agent's ``invoke``, with every model call inside it, however deeply LangGraph
    nests them. The handler follows the run tree through the chain events it receives, so it must see the whole run
    (``layerroute_cost_tracking`` or ``config={"callbacks": [handler]}`` on the agent); a handler given to the
    model alone sees no chains and groups by the model call's parent run. A ``trace_id`` in the run's metadata
    overrides the grouping.
    """

    raise_error = False
    run_inline = True  # bookkeeping only: keeps parents recorded before their children in async runs too

    def __init__(self, path: str | Path | None = None, record_messages: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.record_messages = record_messages
        self.records: list[StepCostRecord] = []
        self._lock = threading.Lock()
        self._runs: dict[UUID, dict[str, Any]] = {}
        self._steps_per_trace: dict[str, int] = {}
        self._trace_of_run: dict[UUID, str] = {}  # open chain and tool runs -> the trace they belong to

    def _open(self, run_id: UUID, parent_run_id: UUID | None, metadata: dict[str, Any] | None) -> str:
        """Record a run starting; returns its trace id. Call with the lock held."""
        trace = str((metadata or {}).get("trace_id") or self._trace_of_run.get(parent_run_id)
                    or parent_run_id or run_id)
        self._trace_of_run[run_id] = trace
        return trace

    def on_chain_start(self, serialized: dict[str, Any] | None, inputs: Any, *, run_id: UUID,
                       parent_run_id: UUID | None = None, metadata: dict[str, Any] | None = None,
                       **kwargs: Any) -> None:
        with self._lock:
            self._open(run_id, parent_run_id, metadata)

    def on_tool_start(self, serialized: dict[str, Any] | None, input_str: str, *, run_id: UUID,
                      parent_run_id: UUID | None = None, metadata: dict[str, Any] | None = None,
                      **kwargs: Any) -> None:
        with self._lock:
            self._open(run_id, parent_run_id, metadata)

    def _close(self, result: Any = None, *, run_id: UUID, **kwargs: Any) -> None:
        with self._lock:
            trace = self._trace_of_run.pop(run_id, None)
            if trace is not None and trace == str(run_id):  # the trace's root ended: no step can join it any more
                self._steps_per_trace.pop(trace, None)

    on_chain_end = on_chain_error = on_tool_end = on_tool_error = _close

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID,
                            parent_run_id: UUID | None = None, metadata: dict[str, Any] | None = None,
                            **kwargs: Any) -> None:
        metadata = metadata or {}
        invocation = kwargs.get("invocation_params") or {}
        with self._lock:
            self._runs[run_id] = {
                "parent_run_id": parent_run_id,
                "trace_id": self._open(run_id, parent_run_id, metadata),
                "node": metadata.get("langgraph_node"),
                "graph_step": metadata.get("langgraph_step"),
                "messages": messages[0] if messages else [],
                "tools": invocation.get("tools"),
            }

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, parent_run_id: UUID | None = None,
                   **kwargs: Any) -> None:
        with self._lock:
            run = self._runs.pop(run_id, None)
            self._trace_of_run.pop(run_id, None)
        for generations in response.generations:
            for generation in generations:
                message = getattr(generation, "message", None)
                route = (getattr(message, "response_metadata", None) or {}).get("layerroute")
                if route is None:
                    continue  # not a ChatLayerRoute answer
                run = run or {"trace_id": str(parent_run_id or run_id), "parent_run_id": parent_run_id}
                usage = getattr(message, "usage_metadata", None) or {}
                with self._lock:
                    index = self._steps_per_trace.get(run["trace_id"], 0)
                    if run["trace_id"] != str(run_id):  # a model call that is its own trace has no later steps
                        self._steps_per_trace[run["trace_id"]] = index + 1
                record = StepCostRecord(
                    trace_id=run["trace_id"], run_id=str(run_id), step_index=index,
                    step_type=route["step_type"], input_tokens=int(usage.get("input_tokens", 0)),
                    output_tokens=int(usage.get("output_tokens", 0)), flops_total=int(route["flops_total"]),
                    flops_skipped=int(route["flops_skipped"]), skipped_layers=list(route["skipped_layers"]),
                    flops_discarded=int(route.get("flops_discarded", 0)),
                    num_layers=int(route["num_layers"]), latency_s=float(route["latency_s"]),
                    model_name=message.response_metadata.get("model_name", ""), node=run.get("node"),
                    graph_step=run.get("graph_step"),
                    parent_run_id=str(run["parent_run_id"]) if run.get("parent_run_id") else None,
                    timestamp=time.time(),
                )
                if self.record_messages:
                    record.messages = [_to_openai_message(m) for m in run.get("messages", [])]
                    record.tools = run.get("tools") or []
                    record.output = _to_openai_message(message)
                with self._lock:
                    self.records.append(record)
                    if self.path is not None:
                        with self.path.open("a") as handle:
                            handle.write(json.dumps(record.to_dict()) + "\n")

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        with self._lock:
            self._runs.pop(run_id, None)
            self._trace_of_run.pop(run_id, None)

    def report(self, price: PriceModel | None = None, steps_per_day: int = 1_000_000) -> CostReport:
        with self._lock:
            records = list(self.records)
        return CostReport.from_records(records, price, steps_per_day)


_tracker: ContextVar[LayerRouteCostCallback | None] = ContextVar("layerroute_cost_callback", default=None)
register_configure_hook(_tracker, inheritable=True)


@contextmanager
def layerroute_cost_tracking(path: str | Path | None = None, record_messages: bool = False
                             ) -> Iterator[LayerRouteCostCallback]:
    """Record every ``ChatLayerRoute`` step run inside the block, with no callback wiring.

    Example:
        ```python
        with layerroute_cost_tracking("costs.jsonl") as costs:
            agent.invoke({"messages": [("user", "...")]})
        print(costs.report().to_markdown())
        ```
    """
    handler = LayerRouteCostCallback(path, record_messages)
    token = _tracker.set(handler)
    try:
        yield handler
    finally:
        _tracker.reset(token)
