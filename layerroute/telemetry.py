"""OpenTelemetry spans of generations: one span ``chat {model}`` per answered step.

:meth:`~layerroute.chat.ChatEngine.generate` emits them, so ``ChatLayerRoute`` and ``layerroute serve`` (and any other
front end of the engine) report the same spans. Attributes follow the OpenTelemetry GenAI semantic conventions
(``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.usage.input_tokens``,
``gen_ai.usage.output_tokens``, ...) plus LayerRoute's own namespace: ``layerroute.step.type``,
``layerroute.flops.executed``, ``layerroute.flops.skipped``, ``layerroute.skip_fraction`` (of the step's full-depth
FLOPs), ``layerroute.layers.skipped`` (a count), ``layerroute.layers.total``.

Optional: needs ``opentelemetry-api`` (``pip install "layerroute[otel]"``) and, to export anything, an SDK
``TracerProvider`` configured by the application. Without the API installed this module imports nothing and every
function here returns at once; with the API but no SDK the spans are OpenTelemetry's no-op spans.

A span's parent is the OpenTelemetry context current where the step was *prepared*
(:meth:`~layerroute.chat.ChatEngine.prepare`), not where it is generated: a server's batching thread or a streaming
worker thread still parents each span under the request or the caller's span.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .flops import flops_executed

try:  # the `otel` extra; without it, nothing below imports or records anything
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace
except ImportError:  # pragma: no cover - exercised by reloading this module with the package hidden
    otel_context = otel_trace = None

ENABLED = otel_trace is not None
"""Whether ``opentelemetry-api`` is importable (spans are emitted at all)."""
PROVIDER = "layerroute"
OPERATION = "chat"
INSTRUMENTATION_NAME = "layerroute"

logger = logging.getLogger(__name__)


@dataclass
class SpanParent:
    """What a step's span needs from the place it was prepared: the OpenTelemetry context then current, and the model
    name the caller asked for (a server's served name; ``None``: the engine's name)."""

    context: Any
    request_model: str | None = None


def capture(request_model: str | None = None, headers: Any = None) -> SpanParent | None:
    """The current OpenTelemetry context, to parent a span emitted later (or elsewhere); ``None`` without the API.

    Args:
        request_model: the model name the caller asked for (``gen_ai.request.model`` and the span's name).
        headers: a request's headers (a mapping): where no span is current (the server is not instrumented itself),
            a W3C ``traceparent`` in them continues the client's trace.
    """
    if not ENABLED:
        return None
    context = otel_context.get_current()
    if headers is not None and not otel_trace.get_current_span(context).get_span_context().is_valid:
        from opentelemetry import propagate

        context = propagate.extract(headers, context=context)
    return SpanParent(context, request_model)


def now_ns() -> int:
    """Wall-clock time in nanoseconds, as span timestamps want it."""
    return time.time_ns()


def record_generations(model: str, steps: Sequence[Any], answers: Sequence[Any], start_ns: int,
                       end_ns: int | None = None) -> None:
    """Emit one finished ``chat {model}`` span per answered step of one generation (a batch of ``steps``).

    Args:
        model: the engine's model name (``gen_ai.response.model``, and the request model unless the step's
            :class:`SpanParent` names another).
        steps: :class:`~layerroute.chat.ChatStep` s, each with ``telemetry`` (a :class:`SpanParent` or ``None``).
        answers: their :class:`~layerroute.chat.ChatAnswer` s, in order.
        start_ns, end_ns: when the generation began and ended (``end_ns`` default: now).
    """
    if not ENABLED:
        return
    end_ns = end_ns or now_ns()
    try:  # observability never fails a generation
        tracer = otel_trace.get_tracer(INSTRUMENTATION_NAME)
        for step, answer in zip(steps, answers):
            parent = getattr(step, "telemetry", None)
            request_model = (parent.request_model if parent is not None else None) or model
            span = tracer.start_span(f"{OPERATION} {request_model}", context=parent.context if parent else None,
                                     kind=otel_trace.SpanKind.INTERNAL, start_time=start_ns)
            if span.is_recording():
                span.set_attributes(span_attributes(model, request_model, step, answer, len(steps)))
            span.end(end_time=end_ns)
    except Exception:
        logger.exception("could not record the OpenTelemetry spans of a generation")


def span_attributes(model: str, request_model: str, step: Any, answer: Any, batch_rows: int = 1) -> dict[str, Any]:
    """The attributes of one step's span (see the module docstring)."""
    route = answer.route
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": OPERATION,
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": request_model,
        "gen_ai.response.model": model,
        "gen_ai.request.max_tokens": step.max_new_tokens,
        "gen_ai.request.temperature": step.temperature,
        "gen_ai.request.top_p": step.top_p,
        "gen_ai.response.finish_reasons": [answer.finish_reason],
        "gen_ai.usage.input_tokens": answer.prompt_tokens,
        "gen_ai.usage.output_tokens": answer.completion_tokens,
        "layerroute.step.type": route["step_type"],
        "layerroute.routing": step.routing,
        "layerroute.flops.total": route["flops_total"],
        "layerroute.flops.executed": flops_executed(route),
        "layerroute.flops.discarded": route.get("flops_discarded", 0),
        "layerroute.retried": bool(route.get("retried", False)),
        "layerroute.flops.skipped": route["flops_skipped"],
        "layerroute.skip_fraction": route["flops_skipped_frac"],
        "layerroute.layers.skipped": len(route["skipped_layers"]),
        "layerroute.layers.skipped_indices": list(route["skipped_layers"]),
        "layerroute.layers.total": route["num_layers"],
        "layerroute.batch.rows": batch_rows,
    }
    if step.seed is not None:
        attributes["gen_ai.request.seed"] = step.seed
    if step.stop:
        attributes["gen_ai.request.stop_sequences"] = list(step.stop)
    return attributes


__all__ = ["ENABLED", "SpanParent", "capture", "now_ns", "record_generations", "span_attributes"]
