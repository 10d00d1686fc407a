"""``ChatLayerRoute``: a LangChain chat model served by a LayerRoute-routed local LM."""

from __future__ import annotations

import asyncio
import contextvars
import json
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from layerroute.chat import ChatAnswer, ChatEngine, ChatStep
from layerroute.costs import PriceModel, price_step, prompt_flops
from layerroute.toolcalls import normalize_tool_choice


class ChatLayerRoute(BaseChatModel):
    """Chat model whose every answer skips the transformer blocks its routers judge unneeded for that step.

    Each returned ``AIMessage`` carries ``response_metadata["layerroute"]`` with ``step_type`` (``tool_call`` or
    ``planning``), ``skipped_layers``, ``num_layers``, ``layers_skipped_frac``, ``flops_total``, ``flops_skipped``,
    ``flops_skipped_frac`` and ``latency_s``.

    With a ``price`` (a :class:`~layerroute.costs.PriceModel`), ``response_metadata["layerroute"]`` adds the step's
    cost in dollars, ``input_cost``, ``output_cost`` and ``total_cost`` (the FLOPs actually executed, priced), beside
    ``full_depth_input_cost``, ``full_depth_output_cost``, ``full_depth_total_cost`` and ``saved_cost`` (what every
    block running would have cost); ``usage_metadata`` carries the three executed costs too, in LangSmith's fields,
    except on streamed answers: the installed langchain-core cannot merge float usage across stream chunks
    (langchain-ai/langchain#36015, see docs/observability.md). LangSmith gets ``ls_provider="layerroute"`` and
    ``ls_model_name``.

    Generation is constrained (:mod:`layerroute.grammar`): with tools bound, every ``<tool_call>`` names a bound tool
    and carries arguments valid under its JSON schema, and ``tool_choice`` is enforced; structured output
    (``with_structured_output``, or ``response_format`` bound) is JSON valid under its schema.

    Construction is cheap: the model loads on the first call, once per process for each base model, adapter and
    device (instances that differ only in generation settings share it).

    Limits: a prompt must leave ``max_tokens`` positions free within the base model's maximum positions
    (``max_position_embeddings``, or the tokenizer's ``model_max_length`` when smaller) and stay within
    ``context_budget`` when one is set. By default (``context_overflow="error"``) a prompt over either limit raises
    :class:`layerroute.chat.ContextBudgetError`, a ``ValueError`` whose message and attributes give the token counts;
    with ``context_overflow="truncate"`` the conversation is cut from the left instead: the system prompt and the tool
    schemas are kept, the oldest messages dropped (a tool call always together with its results), and
    ``response_metadata["dropped_messages"]`` says how many. ``timeout`` stops a generation after that many seconds:
    the answer then has ``finish_reason="length"`` and ``response_metadata["timed_out"]`` true.

    Thread-safe: concurrent ``invoke`` / ``ainvoke`` calls on one instance, each with its own bound tools, get their
    own tool calls and route stats.

    Example:
        ```python
        from langchain_layerroute import ChatLayerRoute

        llm = ChatLayerRoute()  # embedded SmolLM2-135M-Instruct with the shipped adapter
        llm.bind_tools([get_weather]).invoke("What's the weather in Paris?")
        ```
    """

    model: str | None = Field(default=None, alias="model_name")
    """Base model: hub id, local directory or ``.gguf`` file; ``None`` is the embedded SmolLM2-135M-Instruct."""
    adapter: str | None = None
    """LayerRoute adapter directory; ``None`` uses the adapter shipped for the embedded model (when the base is the
    embedded model), ``"none"`` runs the base with fresh routers that keep every block."""
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    seed: int | None = None
    """Seeds sampling (process-wide torch RNG, taken under a lock) for reproducible non-greedy answers."""
    timeout: float | None = None
    """Wall-clock limit in seconds for one generation (HF ``max_time``); an answer it stops has
    ``finish_reason="length"`` and ``response_metadata["timed_out"]`` true. Also per call."""
    context_budget: int | None = None
    """The most prompt tokens a step may bring, below the base model's own limit; ``None``: only that limit (the
    model's maximum positions less ``max_tokens``). Also per call."""
    context_overflow: Literal["error", "truncate"] = "error"
    """A prompt over the limit: ``"error"`` raises ``ContextBudgetError`` (a ``ValueError``) with the token counts;
    ``"truncate"`` drops the oldest messages, keeping the system prompt, the tools and tool call/result pairs. Also per
    call."""
    max_retries: int = 0
    """Accepted for interface compatibility; local generation is not retried."""
    streaming: bool = False
    device: str | None = None
    trust_remote_code: bool = False
    routing: Literal["auto", "off"] = "auto"
    """``"off"`` runs every block (the same adapter at full depth), for A/B comparisons against routing; also per
    call (``invoke(..., routing="off")``)."""
    skip_threshold: float | None = None
    """A block is skipped where its router's keep probability is below this; ``None`` is the adapter's own threshold.
    Also per call (``invoke(..., skip_threshold=0.3)``): the compute dial."""
    retry_empty: bool = True
    """A routed answer that ends empty (no text, no call) is generated again with every block running; its
    ``response_metadata["layerroute"]`` then says ``retried`` and counts the discarded attempt in ``flops_discarded``.
    Also per call (``invoke(..., retry_empty=False)``)."""
    price: PriceModel | None = None
    """Prices FLOPs (``PriceModel(usd_per_gpu_hour=2.0, achieved_tflops=100.0)``): each answer's ``usage_metadata``
    then carries ``input_cost`` / ``output_cost`` / ``total_cost`` and its route metadata the full-depth costs;
    ``None`` (default): token counts only."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    _runtime: ChatEngine | None = PrivateAttr(default=None)

    # ------------------------------------------------------------------ identity
    @property
    def _llm_type(self) -> str:
        return "layerroute"

    @property
    def model_name(self) -> str:
        return self.model or "embedded:SmolLM2-135M-Instruct"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model_name, "adapter": self.adapter, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        """LangSmith's ``ls_*`` run metadata: provider ``layerroute``, the model name, ``chat``, and the generation
        settings of this call (per-call ``temperature`` / ``max_tokens`` / ``stop`` over the instance's)."""
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "layerroute"
        params["ls_model_name"] = kwargs.get("model") or self.model_name
        params["ls_model_type"] = "chat"
        params["ls_temperature"] = kwargs.get("temperature", self.temperature)
        params["ls_max_tokens"] = kwargs.get("max_tokens", self.max_tokens)
        stop = stop or kwargs.get("stop") or self.stop
        if stop:
            params["ls_stop"] = [stop] if isinstance(stop, str) else list(stop)
        else:
            params.pop("ls_stop", None)
        return params

    # ------------------------------------------------------------------ loading
    def _load(self) -> ChatEngine:
        if self._runtime is None:
            self._runtime = ChatEngine.load(self.model, self.adapter, self.device, self.trust_remote_code)
        return self._runtime

    def get_token_ids(self, text: str) -> list[int]:
        return self._load().tokenizer(text, add_special_tokens=False).input_ids

    # ------------------------------------------------------------------ tools
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | bool | dict | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (OpenAI schemas, LangChain tools, pydantic models or functions).

        ``tool_choice``: ``"auto"`` (default), ``"none"`` (tools hidden), ``"any"`` / ``"required"`` / ``True``
        (must call some tool), a tool name or ``{"type": "function", "function": {"name": ...}}`` (must call it).
        ``parallel_tool_calls=False``: an answer makes at most one call (default: as many as the model writes).
        """
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        names = [tool["function"]["name"] for tool in formatted]
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(tools=formatted, tool_choice=normalize_tool_choice(tool_choice, names), **kwargs)

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Answers parsed into ``schema`` (a pydantic class, TypedDict, JSON schema or OpenAI tool schema).

        ``method``: ``"json_schema"`` (default) constrains the answer to JSON valid under the schema;
        ``"function_calling"`` forces a call of a tool whose parameters are the schema, constrained the same way;
        ``"json_mode"`` constrains it to some JSON object, the prompt saying which (the schema is only used to parse).
        With ``include_raw`` the result is ``{"raw": AIMessage, "parsed": ..., "parsing_error": ...}``.
        """
        kwargs.pop("strict", None)  # answers are always held to the schema
        if kwargs:
            raise ValueError(f"unsupported arguments {sorted(kwargs)}")
        pydantic_schema = is_basemodel_subclass(schema)  # pydantic v2 or v1
        if method == "function_calling":
            tool = convert_to_openai_tool(schema)
            name = tool["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format={
                "kwargs": {"method": method}, "schema": tool})
            parser: Runnable = (PydanticToolsParser(tools=[schema], first_tool_only=True) if pydantic_schema
                                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method in ("json_schema", "json_mode"):
            json_schema = convert_to_json_schema(schema)
            response_format = ({"type": "json_object"} if method == "json_mode" else
                               {"type": "json_schema", "json_schema": {"name": json_schema.get("title", "answer"),
                                                                       "schema": json_schema}})
            llm = self.bind(response_format=response_format, ls_structured_output_format={
                "kwargs": {"method": method}, "schema": json_schema})
            parser = PydanticOutputParser(pydantic_object=schema) if pydantic_schema else JsonOutputParser()
        else:
            raise ValueError(f"unknown method {method!r}; use 'json_schema', 'function_calling' or 'json_mode'")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([unparsed], exception_key="parsing_error")

    # ------------------------------------------------------------------ generation
    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict) -> ChatStep:
        if kwargs.get("model") not in (None, self.model, self.model_name):
            raise ValueError(f"this ChatLayerRoute serves {self.model_name!r}; construct another ChatLayerRoute "
                             f"for {kwargs['model']!r}")
        return self._load().prepare(
            [_to_openai_message(message) for message in messages],
            tools=kwargs.get("tools") or [],
            tool_choice=kwargs.get("tool_choice"),
            parallel_tool_calls=kwargs.get("parallel_tool_calls", True),
            response_format=kwargs.get("response_format"),
            max_tokens=kwargs.get("max_tokens", self.max_tokens),
            temperature=kwargs.get("temperature", self.temperature),
            top_p=kwargs.get("top_p", self.top_p),
            stop=stop or kwargs.get("stop") or self.stop,
            seed=kwargs.get("seed", self.seed),
            routing=kwargs.get("routing", self.routing),
            skip_threshold=kwargs.get("skip_threshold", self.skip_threshold),
            retry_empty=kwargs.get("retry_empty", self.retry_empty),
            timeout=kwargs.get("timeout", self.timeout),
            context_budget=kwargs.get("context_budget", self.context_budget),
            context_overflow=kwargs.get("context_overflow", self.context_overflow),
        )

    def _message(self, answer: ChatAnswer, streamed: bool = False) -> AIMessage:
        tool_calls = [{"name": c.name, "args": c.arguments, "id": c.id, "type": "tool_call"} for c in answer.tool_calls]
        invalid = [{"name": c.name, "args": c.text, "id": c.id, "error": c.error, "type": "invalid_tool_call"}
                   for c in answer.invalid_tool_calls]
        usage = UsageMetadata(input_tokens=answer.prompt_tokens, output_tokens=answer.completion_tokens,
                              total_tokens=answer.prompt_tokens + answer.completion_tokens)
        route = dict(answer.route)
        if self.price is not None:
            costs = price_step(self.price, route, prompt_flops(self._load().model, answer.prompt_tokens))
            route.update(costs)
            if not streamed:  # LangSmith's UsageMetadata cost fields (floats, dollars); token counts stay integers
                usage.update({key: costs[key] for key in ("input_cost", "output_cost", "total_cost")})
        return AIMessage(
            content=answer.content,
            tool_calls=tool_calls,
            invalid_tool_calls=invalid,
            usage_metadata=usage,
            response_metadata={
                "model_name": self.model_name,
                "model_provider": "layerroute",
                "finish_reason": answer.finish_reason,
                "timed_out": answer.timed_out,
                "dropped_messages": answer.dropped_messages,
                "layerroute": route,
            },
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine = self._load()
        [answer] = engine.generate([self._prepare(messages, stop, kwargs)])
        return ChatResult(generations=[ChatGeneration(message=self._message(answer))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # Generation is compute-bound torch work; a worker thread keeps the event loop free, and route stats are
        # per thread, so concurrent calls never mix them up.
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        engine = self._load()
        step = self._prepare(messages, stop, kwargs)
        deltas = engine.text_deltas(step)
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        done = object()
        result: dict[str, Any] = {}

        def worker():
            try:
                [result["answer"]] = engine.generate([step], on_token=lambda _, token: pieces.put(deltas.push(token)))
            except BaseException as error:  # re-raised in the caller's thread
                result["error"] = error
            pieces.put(done)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        while (piece := pieces.get()) is not done:
            if piece:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        thread.join()
        if "error" in result:
            raise result["error"]
        final = self._message(result["answer"], streamed=True)
        tail = deltas.tail(result["answer"].content)
        chunk = ChatGenerationChunk(message=AIMessageChunk(
            content=tail,
            tool_call_chunks=[{"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i,
                               "type": "tool_call_chunk"} for i, c in enumerate(final.tool_calls)],
            invalid_tool_calls=final.invalid_tool_calls,
            usage_metadata=final.usage_metadata,
            response_metadata=final.response_metadata,
            chunk_position="last",
        ))
        if run_manager and tail:
            run_manager.on_llm_new_token(tail, chunk=chunk)
        yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        done = object()

        def produce():
            try:
                for chunk in self._stream(messages, stop, None, **kwargs):
                    loop.call_soon_threadsafe(chunks.put_nowait, chunk)
            except BaseException as error:
                loop.call_soon_threadsafe(chunks.put_nowait, error)
            loop.call_soon_threadsafe(chunks.put_nowait, done)

        # in the caller's context (as asyncio.to_thread would): the OpenTelemetry span parents under the caller's
        producer = loop.run_in_executor(None, contextvars.copy_context().run, produce)
        while (item := await chunks.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            if run_manager and item.text:
                await run_manager.on_llm_new_token(item.text, chunk=item)
            yield item
        await producer


def _to_openai_message(message: BaseMessage) -> dict:
    content = message.content if isinstance(message.content, str) else "".join(
        part.get("text", "") if isinstance(part, dict) else str(part) for part in message.content
    )
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": content}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": content}
    if isinstance(message, AIMessage):
        out: dict[str, Any] = {"role": "assistant", "content": content}
        if message.tool_calls:
            out["tool_calls"] = [{"id": c.get("id") or f"call_{i}", "type": "function",
                                  "function": {"name": c["name"], "arguments": json.dumps(c["args"])}}
                                 for i, c in enumerate(message.tool_calls)]
        return out
    if isinstance(message, ToolMessage):
        return {"role": "tool", "content": content, "tool_call_id": message.tool_call_id,
                "name": message.name or ""}
    if isinstance(message, ChatMessage) and message.role in ("system", "user", "assistant"):
        return {"role": message.role, "content": content}
    raise ValueError(f"ChatLayerRoute cannot render a {type(message).__name__}")
