"""``layerroute serve``: an OpenAI-compatible HTTP server (FastAPI) for a routed model.

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus). Every
completion carries a top-level ``layerroute`` object with the fields of ``response_metadata["layerroute"]``
(``step_type``, ``skipped_layers``, ``num_layers``, ``layers_skipped_frac``, ``flops_total``, ``flops_skipped``,
``flops_skipped_frac``, ``latency_s``, ``retried``, ``flops_discarded``); non-streaming responses also carry them as
``x-layerroute-*`` headers, and a stream carries them on its final chunk (the usage chunk when
``stream_options.include_usage`` asks for one). A request may set ``{"layerroute": {"routing": "auto" | "off",
"skip_threshold": x, "retry_empty": false}}`` (the ``openai`` client's ``extra_body``;
:meth:`~layerroute.chat.ChatEngine.prepare` says what each does).

Requests are prepared and answered by :mod:`layerroute.chat` (the code path of ``ChatLayerRoute``) and batched by
:class:`~layerroute.batching.BatchScheduler`. Needs the ``serve`` extra: ``pip install "layerroute[serve]"``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import telemetry
from .batching import BatchScheduler, Job, Served
from .chat import CONTEXT_OVERFLOWS, ChatEngine, ContextBudgetError, canonical_messages, canonical_tools

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_CONTEXT_BUDGET = 2048
DEFAULT_MAX_TOKENS = 256
ROUTE_HEADER_PREFIX = "x-layerroute-"
ENDPOINTS = ("/v1/chat/completions", "/v1/models")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# ---------------------------------------------------------------------------------------------- request bodies
class RouteDial(BaseModel):
    """The per-request compute dial: ``{"layerroute": {"routing": "off"}}`` runs the full depth."""

    model_config = ConfigDict(extra="forbid")
    routing: Literal["auto", "off"] = "auto"
    skip_threshold: float | None = None
    retry_empty: bool = True


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat-completions fields this server reads; others (``user``, ``metadata``, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Any]
    tools: list[Any] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True
    response_format: dict | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=1, description="one choice per request")
    layerroute: RouteDial | None = None


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, **fields: Any):
        super().__init__(message)
        self.status = status
        self.fields = fields  # code, param, kind and extra members of the error object

    def response(self) -> JSONResponse:
        return _error_response(self.status, str(self), **self.fields)


def _error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                    kind: str = "invalid_request_error", **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code, **extra}},
                        status_code=status)


# ---------------------------------------------------------------------------------------------- metrics
class ServerMetrics:
    """The server's Prometheus metrics, in a registry of their own (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("layerroute_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.cancelled = Counter("layerroute_requests_cancelled", "completions abandoned by their client",
                                 registry=r)
        self.abandoned_tokens = Counter("layerroute_abandoned_tokens", "tokens generated for abandoned completions "
                                        "(their rows stop at the next token)", registry=r)
        self.prompt_tokens = Counter("layerroute_prompt_tokens", "prompt tokens by step type", ["step_type"],
                                     registry=r)
        self.completion_tokens = Counter("layerroute_completion_tokens", "generated tokens by step type",
                                         ["step_type"], registry=r)
        self.flops_executed = Counter("layerroute_flops_executed", "forward FLOPs executed by step type",
                                      ["step_type"], registry=r)
        self.flops_skipped = Counter("layerroute_flops_skipped", "forward FLOPs of the full model not executed "
                                     "(blocks every row of the batch skipped) by step type", ["step_type"], registry=r)
        self.retried = Counter("layerroute_retried", "completions whose routed answer ended empty and were generated "
                               "again at full depth, by step type", ["step_type"], registry=r)
        self.latency = Histogram("layerroute_request_duration_seconds", "completion latency in the server by step "
                                 "type", ["step_type"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("layerroute_time_to_first_token_seconds", "streamed completions: "
                                             "time to the first content piece", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("layerroute_queue_wait_seconds", "time a completion waited for its batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("layerroute_batch_rows", "rows of the batch that served a completion",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

    def abandon(self, job: Job) -> None:
        """Cancel ``job``, whose client has gone, and count what its row generated before it stopped."""
        job.cancel()
        self.cancelled.inc()

        def count(future) -> None:
            if not future.cancelled() and future.exception() is None:
                self.abandoned_tokens.inc(future.result().answer.completion_tokens)

        job.future.add_done_callback(count)

    def record(self, served: Served, latency: float) -> None:
        answer, kind = served.answer, served.answer.step_type
        self.prompt_tokens.labels(kind).inc(answer.prompt_tokens)
        self.completion_tokens.labels(kind).inc(answer.completion_tokens)
        self.flops_executed.labels(kind).inc(served.flops_executed)
        discarded = answer.route["flops_discarded"]
        self.flops_skipped.labels(kind).inc(answer.route["flops_total"] - (served.flops_executed - discarded))
        if answer.route["retried"]:
            self.retried.labels(kind).inc()
        self.latency.labels(kind).observe(latency)
        self.queue_wait.observe(served.queue_s)
        self.batch_rows.observe(served.batch_rows)


# ---------------------------------------------------------------------------------------------- the app
def create_app(
    engine: ChatEngine,
    *,
    model_name: str | None = None,
    context_budget: int = DEFAULT_CONTEXT_BUDGET,
    context_overflow: str = "error",
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    api_key: str | None = None,
    max_batch_size: int = 16,
    batch_window_ms: float = 5.0,
    grouping: bool = True,
) -> FastAPI:
    """The OpenAI-compatible app serving ``engine``.

    Args:
        model_name: the model id clients name in requests (``GET /v1/models`` lists it); default ``engine.name``.
        context_budget: the most prompt tokens a request may bring (the base model's maximum positions, less the
            request's ``max_tokens``, bound it too).
        context_overflow: a prompt over either limit is answered 400 ``context_length_exceeded`` with the counts
            (``"error"``), or cut from the left (``"truncate"``: system prompt and tools kept, the oldest messages
            dropped, tool calls with their results); see :meth:`~layerroute.chat.ChatEngine.prepare`.
        default_max_tokens: generated tokens when a request sets neither ``max_tokens`` nor ``max_completion_tokens``.
        api_key: when set, ``/v1/*`` demands ``Authorization: Bearer <api_key>`` (401 otherwise).
        max_batch_size, batch_window_ms, grouping: the batching (:class:`~layerroute.batching.BatchScheduler`).
    """
    if context_overflow not in CONTEXT_OVERFLOWS:
        raise ValueError(f"context_overflow must be 'error' or 'truncate', got {context_overflow!r}")
    served_name = model_name or engine.name
    metrics = ServerMetrics()
    state: dict[str, BatchScheduler] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["scheduler"] = BatchScheduler(engine, max_batch_size=max_batch_size, window_s=batch_window_ms / 1000,
                                            grouping=grouping)
        try:
            yield
        finally:
            await run_in_threadpool(state.pop("scheduler").close)

    app = FastAPI(title="LayerRoute", lifespan=lifespan)
    app.add_middleware(_AuthorizeAndCount, api_key=api_key, metrics=metrics)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        if first.get("type") == "json_invalid":
            return _error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
                                   .rstrip(": "), code="invalid_json")
        return _error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return _error_response(error.status_code, str(error.detail), kind="invalid_request_error")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error_response(500, "internal server error", kind="server_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served_name}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": 0,
                                            "owned_by": "layerroute"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        began = time.perf_counter()
        if body.model != served_name:
            raise OpenAIError(404, f"the model {body.model!r} does not exist; this server serves {served_name!r}",
                              code="model_not_found", param="model")
        step = await run_in_threadpool(_prepare, engine, body, context_budget, context_overflow, default_max_tokens)
        step.telemetry = telemetry.capture(served_name, request.headers)  # its span: `chat {served_name}`
        scheduler = state["scheduler"]
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(scheduler, step, request, metrics, completion_id, created, served_name, include_usage, began),
                media_type="text/event-stream", headers={"cache-control": "no-cache"})
        job = scheduler.submit(step)
        served = await _await_unless_disconnected(job, request)
        if served is None:
            metrics.abandon(job)
            return Response(status_code=499)  # the client is gone; nobody reads this
        latency = time.perf_counter() - began
        metrics.record(served, latency)
        route = {**served.answer.route, "latency_s": latency}
        body_out = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": served_name,
            "choices": [{"index": 0, "message": _message(served), "finish_reason": served.answer.finish_reason,
                         "logprobs": None}],
            "usage": _usage(served),
            "layerroute": route,
        }
        return JSONResponse(body_out, headers=route_headers(route))

    return app


class _AuthorizeAndCount:
    """ASGI middleware: ``Authorization: Bearer`` on ``/v1/*`` when the server has an API key, and the request
    counter. (A plain ASGI middleware leaves ``receive`` alone, which disconnect detection reads.)"""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"  # bounded label values
        if self.api_key is not None:
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), self.api_key.encode()):
                self.metrics.requests.labels(endpoint, "401").inc()
                response = _error_response(401, "Incorrect API key provided: pass it as 'Authorization: Bearer "
                                           "<key>'", code="invalid_api_key")
                await response(scope, receive, send)
                return
        status = {"code": 500}

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()


def route_headers(route: dict) -> dict[str, str]:
    """``x-layerroute-*`` headers of a route: ``x-layerroute-step-type``, ``x-layerroute-skipped-layers`` (comma
    separated block indices), ``x-layerroute-flops-skipped-frac``, ..."""
    headers = {}
    for key, value in route.items():
        text = (",".join(str(v) for v in value) if isinstance(value, list) else
                str(value).lower() if isinstance(value, bool) else str(value))
        headers[ROUTE_HEADER_PREFIX + key.replace("_", "-")] = text
    return headers


def _prepare(engine: ChatEngine, body: ChatCompletionRequest, context_budget: int, context_overflow: str,
             default_max_tokens: int):
    """The request as a prepared :class:`~layerroute.chat.ChatStep`; bad input as :class:`OpenAIError` (400)."""
    dial = body.layerroute or RouteDial()
    response_format = body.response_format if (body.response_format or {}).get("type") != "text" else None
    try:
        tools = canonical_tools(body.tools)
        return engine.prepare(
            canonical_messages(body.messages, tools),
            tools=tools,
            tool_choice=body.tool_choice,
            parallel_tool_calls=body.parallel_tool_calls,
            response_format=response_format,
            max_tokens=body.max_completion_tokens or body.max_tokens or default_max_tokens,
            temperature=body.temperature if body.temperature is not None else 0.0,
            top_p=body.top_p if body.top_p is not None else 1.0,
            stop=body.stop,
            seed=body.seed,
            routing=dial.routing,
            skip_threshold=dial.skip_threshold,
            retry_empty=dial.retry_empty,
            context_budget=context_budget,
            context_overflow=context_overflow,
        )
    except ContextBudgetError as error:
        raise OpenAIError(400, str(error), code="context_length_exceeded", param="messages",
                          prompt_tokens=error.prompt_tokens, max_tokens=error.max_tokens,
                          context_budget=error.budget, max_positions=error.max_positions) from None
    except ValueError as error:
        raise OpenAIError(400, str(error)) from None


async def _await_unless_disconnected(job: Job, request: Request) -> Served | None:
    """The job's result, or ``None`` when the client disconnects first."""
    result = asyncio.shield(asyncio.wrap_future(job.future))
    disconnect = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait({result, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    if result in done:
        disconnect.cancel()
        return result.result()
    return None


async def _disconnected(request: Request) -> None:
    # The body has been read: what the server receives next is the client's disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _content(answer) -> str:
    # OpenAI has no field for malformed calls (a call cut by max_tokens): the client gets the text as written
    return answer.text.strip() if answer.invalid_tool_calls else answer.content


def _message(served: Served) -> dict:
    answer = served.answer
    message: dict[str, Any] = {"role": "assistant", "content": _content(answer) or (None if answer.tool_calls else "")}
    if answer.tool_calls:
        message["tool_calls"] = [_tool_call(call) for call in answer.tool_calls]
    return message


def _tool_call(call, index: int | None = None) -> dict:
    out = {"id": call.id, "type": "function",
           "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
    return out if index is None else {"index": index, **out}


def _usage(served: Served) -> dict:
    answer = served.answer
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


async def _stream(scheduler: BatchScheduler, step, request: Request, metrics: ServerMetrics, completion_id: str,
                  created: int, model: str, include_usage: bool, began: float) -> AsyncIterator[str]:
    """Server-sent events of one streamed completion, ending with ``data: [DONE]``; a client that disconnects
    cancels it (its batch row freed)."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    done = object()
    job = scheduler.submit(step, on_text=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
    job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, done))
    disconnect = asyncio.ensure_future(_disconnected(request))

    def event(delta: dict, finish_reason: str | None = None, **extra: Any) -> str:
        chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    try:
        yield event({"role": "assistant", "content": ""})
        first = True
        while True:
            piece = asyncio.ensure_future(pieces.get())
            await asyncio.wait({piece, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if not piece.done():
                piece.cancel()
                return  # the client is gone; the finally clause frees the row
            if (piece := piece.result()) is done:
                break
            if first:
                metrics.time_to_first_token.observe(time.perf_counter() - began)
                first = False
            yield event({"content": piece})
        try:
            served: Served = job.future.result()
        except Exception as error:  # reported to the client as the stream's last event
            logger.exception("a streamed completion failed")
            yield f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error'}})}\n\n"
            return
        latency = time.perf_counter() - began
        metrics.record(served, latency)
        answer = served.answer
        route = {**answer.route, "latency_s": latency}
        tail = job.deltas.tail(_content(answer))
        if tail:
            yield event({"content": tail})
        if answer.tool_calls:
            yield event({"tool_calls": [_tool_call(call, i) for i, call in enumerate(answer.tool_calls)]})
        if include_usage:
            yield event({}, answer.finish_reason)
            usage = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [], "usage": _usage(served), "layerroute": route}
            yield f"data: {json.dumps(usage)}\n\n"
        else:
            yield event({}, answer.finish_reason, layerroute=route)
        yield "data: [DONE]\n\n"
    finally:
        disconnect.cancel()
        if not job.future.done():  # the client went away mid-stream: free the row
            metrics.abandon(job)


def serve(engine: ChatEngine, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info",
          **app_options: Any) -> None:
    """Run the app with uvicorn until interrupted; ``log_level`` is uvicorn's (its startup and access log)."""
    import uvicorn

    app = create_app(engine, **app_options)
    logger.info("serving %s on http://%s:%d (OpenAI-compatible: /v1/chat/completions, /v1/models; /health, /metrics)",
                app_options.get("model_name") or engine.name, host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
