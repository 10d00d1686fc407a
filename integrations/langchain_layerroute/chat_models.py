"""``ChatLayerRoute``: a LangChain chat model served by a LayerRoute-routed local LM."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

import torch
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
from transformers import LogitsProcessorList, TextIteratorStreamer

from layerroute import LayerRouteModel, load_base_model
from layerroute.grammar import DecodingGrammars
from layerroute.loading import default_adapter_dir
from layerroute.steps import render_chat
from layerroute.toolcalls import normalize_tool_choice, parse_tool_calls

JSON_SCHEMA_INSTRUCTION = "Answer with a JSON object, and nothing else, that is valid under this JSON schema:\n{schema}"
JSON_OBJECT_INSTRUCTION = "Answer with a JSON object, and nothing else."


class _Runtime:
    """A loaded model and its tokenizer, shared by every ``ChatLayerRoute`` with the same base, adapter and device."""

    def __init__(self, model: LayerRouteModel, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.seed_lock = threading.Lock()
        self._grammars: DecodingGrammars | None = None
        self._grammars_lock = threading.Lock()

    def grammars(self) -> DecodingGrammars:
        """The grammar compiler for this tokenizer, built on first use (reading the vocabulary takes a moment)."""
        with self._grammars_lock:
            if self._grammars is None:
                vocab_size = self.model.base_model.get_output_embeddings().weight.shape[0]
                self._grammars = DecodingGrammars(self.tokenizer, vocab_size)
        return self._grammars


_RUNTIMES: dict[tuple, _Runtime] = {}
_RUNTIMES_LOCK = threading.Lock()


def _shared_runtime(model: str | None, adapter: str | None, device: str | None, trust_remote_code: bool) -> _Runtime:
    """One loaded model per (base, adapter, device) in the process: chat models that differ only in generation
    settings (temperature, max_tokens, bound tools...) share the weights instead of loading a copy each."""
    key = (model, adapter, device, trust_remote_code)
    with _RUNTIMES_LOCK:
        if key not in _RUNTIMES:
            base, tokenizer = load_base_model(model, device=device, trust_remote_code=trust_remote_code)
            if adapter:
                routed = LayerRouteModel.from_pretrained(adapter, base_model=base)
            else:
                routed = LayerRouteModel.from_base(base)
            routed.eval()
            routed.merge_lora()
            _RUNTIMES[key] = _Runtime(routed, tokenizer)
        return _RUNTIMES[key]


class ChatLayerRoute(BaseChatModel):
    """Chat model whose every answer skips the transformer blocks its routers judge unneeded for that step.

    Each returned ``AIMessage`` carries ``response_metadata["layerroute"]`` with ``step_type`` (``tool_call`` or
    ``planning``), ``skipped_layers``, ``num_layers``, ``layers_skipped_frac``, ``flops_total``, ``flops_skipped``,
    ``flops_skipped_frac`` and ``latency_s``.

    Generation is constrained (:mod:`layerroute.grammar`): with tools bound, every ``<tool_call>`` names a bound tool
    and carries arguments valid under its JSON schema, and ``tool_choice`` is enforced; structured output
    (``with_structured_output``, or ``response_format`` bound) is JSON valid under its schema.

    Construction is cheap: the model loads on the first call, once per process for each base model, adapter and
    device (instances that differ only in generation settings share it).

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
    """Wall-clock limit in seconds for one generation (HF ``max_time``)."""
    max_retries: int = 0
    """Accepted for interface compatibility; local generation is not retried."""
    streaming: bool = False
    device: str | None = None
    trust_remote_code: bool = False
    routing: Literal["auto", "off"] = "auto"
    """``"off"`` runs every block (the same adapter at full depth), for A/B comparisons against routing; also per
    call (``invoke(..., routing="off")``)."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    _runtime: _Runtime | None = PrivateAttr(default=None)

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
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "layerroute"
        params["ls_model_name"] = kwargs.get("model", self.model_name)
        params["ls_temperature"] = self.temperature
        params["ls_max_tokens"] = self.max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # ------------------------------------------------------------------ loading
    def _load(self) -> _Runtime:
        if self._runtime is None:
            adapter = self.adapter
            if adapter is None and self.model is None and default_adapter_dir().is_dir():
                adapter = str(default_adapter_dir())
            if adapter == "none":
                adapter = None
            self._runtime = _shared_runtime(self.model, adapter, self.device, self.trust_remote_code)
        return self._runtime

    def get_token_ids(self, text: str) -> list[int]:
        return self._load().tokenizer(text, add_special_tokens=False).input_ids

    # ------------------------------------------------------------------ tools
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | bool | dict | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (OpenAI schemas, LangChain tools, pydantic models or functions).

        ``tool_choice``: ``"auto"`` (default), ``"none"`` (tools hidden), ``"any"`` / ``"required"`` / ``True``
        (must call some tool), a tool name or ``{"type": "function", "function": {"name": ...}}`` (must call it).
        """
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        names = [tool["function"]["name"] for tool in formatted]
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
    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict) -> dict:
        if kwargs.get("model") not in (None, self.model, self.model_name):
            raise ValueError(f"this ChatLayerRoute serves {self.model_name!r}; construct another ChatLayerRoute "
                             f"for {kwargs['model']!r}")
        runtime = self._load()
        tools = kwargs.get("tools") or []
        tool_choice = normalize_tool_choice(kwargs.get("tool_choice"), [t["function"]["name"] for t in tools])
        canonical = [_to_openai_message(message) for message in messages]
        visible_tools = [] if tool_choice == ("none",) else tools
        grammar = None
        if kwargs.get("response_format"):
            if visible_tools:
                raise ValueError("response_format and bound tools cannot be combined; use tool_choice='none' or "
                                 "with_structured_output(method='function_calling')")
            grammar, instruction = _response_grammar(runtime.grammars(), kwargs["response_format"])
            canonical = _with_instruction(canonical, instruction)
        elif tools:
            grammar = runtime.grammars().tool_calls(visible_tools, tool_choice)
        prompt = render_chat(runtime.tokenizer, canonical, visible_tools, add_generation_prompt=True)
        inputs = runtime.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        stop = list(stop or kwargs.get("stop") or self.stop or [])
        generate_kwargs: dict[str, Any] = {
            "max_new_tokens": kwargs.get("max_tokens", self.max_tokens),
            "pad_token_id": runtime.tokenizer.pad_token_id,
        }
        temperature = kwargs.get("temperature", self.temperature)
        if temperature and temperature > 0:
            generate_kwargs.update(do_sample=True, temperature=temperature, top_p=kwargs.get("top_p", self.top_p))
        else:
            generate_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            generate_kwargs.update(stop_strings=stop, tokenizer=runtime.tokenizer)
        if self.timeout:
            generate_kwargs["max_time"] = self.timeout
        if grammar is not None:
            generate_kwargs["logits_processor"] = LogitsProcessorList([DecodingGrammars.processor(grammar)])
        routing = kwargs.get("routing", self.routing)
        if routing not in ("auto", "off"):
            raise ValueError(f"routing must be 'auto' or 'off', got {routing!r}")
        device = runtime.model.device
        return {"runtime": runtime, "input_ids": inputs.input_ids.to(device), "full_depth": routing == "off",
                "attention_mask": inputs.attention_mask.to(device), "generate_kwargs": generate_kwargs,
                "stop": stop, "seed": kwargs.get("seed", self.seed)}

    def _run(self, prepared: dict, streamer=None) -> tuple[torch.Tensor, Any, float]:
        runtime = prepared["runtime"]
        began = time.perf_counter()

        def call():
            return runtime.model.generate(prepared["input_ids"], prepared["attention_mask"], streamer=streamer,
                                          forced_skip=() if prepared["full_depth"] else None,
                                          **prepared["generate_kwargs"])

        if prepared["seed"] is not None and prepared["generate_kwargs"].get("do_sample"):
            with runtime.seed_lock:
                torch.manual_seed(prepared["seed"])
                sequences = call()
        else:
            sequences = call()
        return sequences, runtime.model.last_route, time.perf_counter() - began

    def _finish(self, prepared: dict, sequences: torch.Tensor, route, latency: float) -> AIMessage:
        runtime = prepared["runtime"]
        new_tokens = sequences[0, prepared["input_ids"].shape[1]:]
        text = runtime.tokenizer.decode(new_tokens, skip_special_tokens=True)
        text = _cut_at_stop(text, prepared["stop"])
        parsed = parse_tool_calls(text)
        tool_calls = [{"name": c.name, "args": c.arguments, "id": f"call_{uuid.uuid4().hex[:24]}",
                       "type": "tool_call"} for c in parsed.tool_calls]
        invalid = [{"name": c.name, "args": c.text, "id": f"call_{uuid.uuid4().hex[:24]}", "error": c.error,
                    "type": "invalid_tool_call"} for c in parsed.invalid_tool_calls]
        output_tokens = int(new_tokens.numel())
        input_tokens = int(prepared["input_ids"].shape[1])
        return AIMessage(
            content=parsed.content if (tool_calls or invalid) else text.strip(),
            tool_calls=tool_calls,
            invalid_tool_calls=invalid,
            usage_metadata=UsageMetadata(input_tokens=input_tokens, output_tokens=output_tokens,
                                         total_tokens=input_tokens + output_tokens),
            response_metadata={
                "model_name": self.model_name,
                "model_provider": "layerroute",
                "finish_reason": "tool_calls" if tool_calls else "stop",
                "layerroute": {"step_type": "tool_call" if (tool_calls or invalid) else "planning",
                               **route.to_dict(), "latency_s": latency},
            },
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prepared = self._prepare(messages, stop, kwargs)
        message = self._finish(prepared, *self._run(prepared))
        return ChatResult(generations=[ChatGeneration(message=message)])

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
        prepared = self._prepare(messages, stop, kwargs)
        streamer = TextIteratorStreamer(prepared["runtime"].tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def worker():
            try:
                result["value"] = self._run(prepared, streamer)
            except BaseException as error:  # re-raised in the caller's thread
                result["error"] = error
                streamer.end()

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        # Prose streams as it arrives; once a tool call starts, text is held back and the parsed calls come at the
        # end, so no raw <tool_call> markup ever reaches the consumer.
        emitted, holding = "", False
        for piece in streamer:
            if holding:
                continue
            pending = emitted + piece
            cut = _safe_prefix(_cut_at_stop(pending, prepared["stop"]), prepared["stop"])
            if "<tool_call>" in pending:
                cut = pending[: pending.index("<tool_call>")]
                holding = True
            if len(cut) > len(emitted):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=cut[len(emitted):]))
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
                emitted = cut
        thread.join()
        if "error" in result:
            raise result["error"]
        final = self._finish(prepared, *result["value"])
        full_text = final.content if isinstance(final.content, str) else ""
        tail = full_text[len(emitted.strip()):] if full_text.startswith(emitted.strip()) else ""
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
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def produce():
            try:
                for chunk in self._stream(messages, stop, None, **kwargs):
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except BaseException as error:
                loop.call_soon_threadsafe(queue.put_nowait, error)
            loop.call_soon_threadsafe(queue.put_nowait, done)

        producer = loop.run_in_executor(None, produce)
        while (item := await queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            if run_manager and item.text:
                await run_manager.on_llm_new_token(item.text, chunk=item)
            yield item
        await producer


def _response_grammar(grammars: DecodingGrammars, response_format: dict):
    """The grammar and the prompt instruction of an OpenAI ``response_format`` (``json_schema`` or
    ``json_object``)."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return grammars.json_schema(schema), JSON_SCHEMA_INSTRUCTION.format(schema=json.dumps(schema))
    if kind == "json_object":
        return grammars.json_object(), JSON_OBJECT_INSTRUCTION
    raise ValueError(f"unsupported response_format {response_format!r}; use {{'type': 'json_schema', "
                     "'json_schema': {'name': ..., 'schema': {...}}} or {'type': 'json_object'}")


def _with_instruction(messages: list[dict], instruction: str) -> list[dict]:
    """``messages`` with ``instruction`` at the end of the system prompt (a system prompt of its own if none)."""
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{instruction}".strip()}, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


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


def _cut_at_stop(text: str, stop: list[str]) -> str:
    positions = [text.find(s) for s in stop if s and s in text]
    return text[: min(positions)] if positions else text


def _safe_prefix(text: str, stop: list[str]) -> str:
    """Hold back a trailing partial ``<tool_call>`` tag or stop sequence: streamed text never shows either."""
    for marker in ["<tool_call>", *stop]:
        for length in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:length]):
                text = text[:-length]
                break
    return text

