"""Chat steps on a routed model, framework-free: OpenAI-style messages and tools in, an answer with parsed tool calls,
token counts and route stats out.

This is the one code path behind every chat front end: ``ChatLayerRoute`` (LangChain) converts its messages into the
OpenAI dicts this module takes, and ``layerroute serve`` passes request bodies through almost as they come. Both
render, constrain, generate, parse and report here, so a step answers the same wherever it is asked.

A step is :meth:`ChatEngine.prepare`\\ d (rendered, tokenized, its grammar compiled) and then generated, alone or in a
batch with other prepared steps that share its generation settings (:meth:`ChatEngine.generate`)::

    engine = ChatEngine.load()  # embedded SmolLM2-135M-Instruct with the shipped adapter
    step = engine.prepare([{"role": "user", "content": "Weather in Oslo?"}], tools=[weather_tool])
    [answer] = engine.generate([step])
    answer.tool_calls, answer.route["flops_skipped_frac"]
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.nn import functional as F
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from . import telemetry
from .architectures import text_config
from .config import check_skip_threshold
from .flops import flops_executed
from .grammar import TOOL_CALL_TAG, DecodingGrammars
from .loading import EMBEDDED_MODEL, default_adapter_dir, load_base_model
from .model import LayerRouteModel, RoutedCache
from .router import ROUTING_STATE, RoutingState
from .steps import render_chat
from .toolcalls import normalize_tool_choice, parse_tool_calls

ROUTING_MODES = ("auto", "off")
# what prepare does with a prompt over its limit: refuse it with the counts, or drop the oldest messages
CONTEXT_OVERFLOWS = ("error", "truncate")
JSON_SCHEMA_INSTRUCTION = "Answer with a JSON object, and nothing else, that is valid under this JSON schema:\n{schema}"
JSON_OBJECT_INSTRUCTION = "Answer with a JSON object, and nothing else."
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


class ContextBudgetError(ValueError):
    """The prompt does not fit: it has more tokens than the context budget allows, or than the base model's maximum
    positions leave once ``max_tokens`` more are generated.

    Attributes:
        prompt_tokens: the prompt's tokens (with ``context_overflow="truncate"``, those of its shortest cut).
        max_tokens: the tokens the step asked to generate.
        budget: the configured context budget, or ``None``.
        max_positions: the base model's maximum positions, or ``None`` when it states none.
        limit: the most prompt tokens accepted, ``min(budget, max_positions - max_tokens)``.
    """

    def __init__(self, prompt_tokens: int, max_tokens: int, budget: int | None, max_positions: int | None,
                 truncated: bool = False):
        self.prompt_tokens, self.max_tokens, self.budget, self.max_positions = (prompt_tokens, max_tokens, budget,
                                                                                max_positions)
        self.limit = _prompt_limit(max_tokens, budget, max_positions)
        prompt = (f"even with every older message dropped, the system prompt, tool schemas and last message take "
                  f"{prompt_tokens} tokens" if truncated else f"the prompt has {prompt_tokens} tokens")
        if self.limit == budget:
            message = (f"{prompt}, over this model's context budget of {budget} tokens; shorten the messages or the "
                       "tool schemas")
        else:
            message = (f"{prompt} and max_tokens asks for {max_tokens} more: {prompt_tokens + max_tokens} positions, "
                       f"over the base model's maximum of {max_positions}; shorten the messages or the tool schemas, "
                       "or lower max_tokens")
        super().__init__(message)


def _prompt_limit(max_tokens: int, budget: int | None, max_positions: int | None) -> int | None:
    """The most prompt tokens a step generating ``max_tokens`` may bring (``None``: no limit)."""
    limits = [limit for limit in (budget, None if max_positions is None else max_positions - max_tokens)
              if limit is not None]
    return min(limits) if limits else None


def max_positions(model, tokenizer) -> int | None:
    """The most positions (prompt plus generated tokens) ``model`` takes: the smaller of its config's
    ``max_position_embeddings`` and the tokenizer's ``model_max_length``, of those that are set (transformers puts a
    huge placeholder in an unset ``model_max_length``); ``None`` when neither is."""
    limits = [getattr(text_config(model), "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    real = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < VERY_LARGE_INTEGER]
    return min(real) if real else None


@dataclass
class ChatStep:
    """One prepared step: the prompt as token ids and how to generate its answer.

    Steps whose :attr:`batch_key` is equal can be generated in one batch.

    Attributes:
        prompt_ids: ``(prompt_tokens,)`` token ids of the rendered context, ending with the assistant prompt.
        grammar: the compiled grammar the answer must follow (bound tools or a response format), or ``None``.
        routing: ``"auto"`` (the routers decide) or ``"off"`` (every block runs: asked for, or the conversation ends
            with a role the adapter's routers do not decide after, :meth:`LayerRouteConfig.routes_after`).
        skip_threshold: a block is skipped where its router's keep probability is below this; ``None`` is the
            adapter's own threshold.
        max_time: wall-clock limit of the generation in seconds, or ``None``.
        retry_empty: an answer that ends empty (no text, no call) after its routers skipped blocks is generated
            again with every block running (:meth:`ChatEngine.generate`).
        dropped_messages: how many of the oldest messages were dropped to fit the context
            (``context_overflow="truncate"``).
        telemetry: the OpenTelemetry context the step was prepared in, parent of its span
            (:mod:`layerroute.telemetry`; ``None`` without the ``otel`` extra).
    """

    prompt_ids: torch.Tensor
    grammar: Any
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    routing: str
    skip_threshold: float | None
    max_time: float | None
    retry_empty: bool = True
    dropped_messages: int = 0
    telemetry: telemetry.SpanParent | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    @property
    def batch_key(self) -> tuple:
        """What steps generated in one batch must share. A seeded sampled step is keyed by itself: it runs alone, so
        that its seed alone decides its answer."""
        seeded = id(self) if self.do_sample and self.seed is not None else None
        return (self.max_new_tokens, self.do_sample, self.temperature if self.do_sample else None,
                self.top_p if self.do_sample else None, self.stop, self.max_time, seeded)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict


@dataclass
class MalformedToolCall:
    id: str
    name: str | None
    text: str
    error: str


@dataclass
class ChatAnswer:
    """A generated answer.

    Attributes:
        content: the prose of the answer (tool-call markup removed when it carries calls).
        text: everything generated, stop sequences cut, special tokens dropped.
        finish_reason: ``"tool_calls"``, ``"length"`` (``max_new_tokens`` ran out, or the step's timeout did:
            :attr:`timed_out` says which) or ``"stop"``.
        route: ``step_type``, the :class:`~layerroute.RouteStats` fields, ``latency_s``, ``retried`` (the routed
            answer ended empty and this one was generated at full depth, :attr:`ChatStep.retry_empty`) and
            ``flops_discarded`` (the FLOPs the discarded routed attempt executed, else 0): what
            ``response_metadata["layerroute"]`` and the server's ``layerroute`` object carry. FLOPs executed for the
            step: ``flops_total - flops_skipped + flops_discarded`` (:func:`~layerroute.flops.flops_executed`).
        timed_out: the step's timeout stopped its generation before the answer ended.
        dropped_messages: the oldest messages dropped to fit the context (:attr:`ChatStep.dropped_messages`).
    """

    content: str
    text: str
    tool_calls: list[ToolCall]
    invalid_tool_calls: list[MalformedToolCall]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    route: dict
    timed_out: bool = False
    dropped_messages: int = 0

    @property
    def step_type(self) -> str:
        return self.route["step_type"]


class ChatEngine:
    """A loaded routed model, its tokenizer and grammar compiler: prepares chat steps and generates them.

    Thread-safe for preparing; :meth:`generate` may be called from several threads (route stats are per thread).

    Args:
        model: the routed model, in eval mode.
        tokenizer: its tokenizer (with a chat template).
        name: the model's name, as front ends report it.

    Attributes:
        max_positions: the most positions, prompt plus generated tokens, the base model takes (:func:`max_positions`);
            :meth:`prepare` never lets a step exceed them.
    """

    def __init__(self, model: LayerRouteModel, tokenizer, name: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.seed_lock = threading.Lock()
        self._grammars: DecodingGrammars | None = None
        self._grammars_lock = threading.Lock()
        eos = model.base_model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.max_positions = max_positions(model.base_model, tokenizer)

    @classmethod
    def load(cls, model: str | None = None, adapter: str | None = None, device: str | None = None,
             trust_remote_code: bool = False) -> ChatEngine:
        """The engine of a base model and adapter, loaded once per process for each (base, adapter, device).

        Args:
            model: hub id, local directory or ``.gguf`` file; ``None`` is the embedded SmolLM2-135M-Instruct.
            adapter: LayerRoute adapter directory; ``None`` uses the adapter shipped for the embedded model (when the
                base is the embedded model), ``"none"`` runs the base with fresh routers that keep every block.
        """
        if adapter is None and model is None and default_adapter_dir().is_dir():
            adapter = str(default_adapter_dir())
        if adapter == "none":
            adapter = None
        key = (model, adapter, device, trust_remote_code)
        with _ENGINES_LOCK:
            if key not in _ENGINES:
                base, tokenizer = load_base_model(model, device=device, trust_remote_code=trust_remote_code)
                routed = (LayerRouteModel.from_pretrained(adapter, base_model=base) if adapter
                          else LayerRouteModel.from_base(base))
                routed.eval()
                routed.merge_lora()  # serving: same outputs, no LoRA matmuls per token
                _ENGINES[key] = cls(routed, tokenizer, model or EMBEDDED_MODEL)
            return _ENGINES[key]

    def grammars(self) -> DecodingGrammars:
        """The grammar compiler for this tokenizer, built on first use (reading the vocabulary takes a moment)."""
        with self._grammars_lock:
            if self._grammars is None:
                vocab_size = self.model.base_model.get_output_embeddings().weight.shape[0]
                self._grammars = DecodingGrammars(self.tokenizer, vocab_size)
        return self._grammars

    # ------------------------------------------------------------------ preparing
    def prepare(
        self,
        messages: Sequence[dict],
        *,
        tools: Sequence[dict] = (),
        tool_choice: Any = None,
        parallel_tool_calls: bool = True,
        response_format: dict | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        routing: str = "auto",
        skip_threshold: float | None = None,
        timeout: float | None = None,
        context_budget: int | None = None,
        context_overflow: str = "error",
        retry_empty: bool = True,
    ) -> ChatStep:
        """Render, tokenize and constrain one step.

        Args:
            messages: canonical OpenAI-style messages (see :func:`canonical_messages` for raw request bodies).
            tools: OpenAI function tools; with ``tool_choice`` (OpenAI or LangChain form, see
                :func:`~layerroute.toolcalls.normalize_tool_choice`) they constrain the answer's calls.
            parallel_tool_calls: ``False``: the answer makes at most one call (it ends after it).
            response_format: OpenAI ``{"type": "json_schema", "json_schema": {"schema": ...}}`` or
                ``{"type": "json_object"}``: the answer is JSON under that grammar; cannot be combined with tools.
            temperature: 0 is greedy decoding; above it samples, from the ``top_p`` nucleus.
            seed: seeds sampling, for reproducible non-greedy answers.
            routing: ``"auto"`` or ``"off"`` (every block runs: the same adapter at full depth, for A/B tests).
            skip_threshold: a block is skipped where its router's keep probability is below this (``None``: the
                adapter's threshold).
            timeout: wall-clock limit of the generation in seconds; a generation it stops ends with
                ``finish_reason="length"`` and ``timed_out=True``.
            context_budget: the most prompt tokens accepted (``None``: no budget of its own).
            context_overflow: what happens to a prompt over ``context_budget``, or one that does not leave
                ``max_tokens`` positions free within the base model's :attr:`max_positions`. ``"error"`` (the default)
                raises :class:`ContextBudgetError` with the counts. ``"truncate"`` cuts the conversation from the left:
                the leading system messages (with a ``response_format``'s instruction) and the tool schemas stay
                whole, and the oldest of the other messages are dropped, as few as make it fit. An assistant message
                that calls tools is dropped together with the tool results that follow it, so no call is left
                without its result nor a result without its call; the last message (with the results answering it)
                is never dropped, and when it does not fit even so, :class:`ContextBudgetError` is raised.
            retry_empty: an answer that ends empty (no text, no call) after the routers skipped blocks is generated
                again with every block running, and that answer returned: keeping a block is always safe, and an
                empty step helps no agent. Its route then says ``retried`` and counts the discarded attempt in
                ``flops_discarded``. ``False`` returns the empty answer (as A/B measurements of routing need).

        Raises:
            ContextBudgetError: the prompt does not fit (see ``context_overflow``); a ``ValueError``.
            ValueError: an argument the engine cannot serve (the message says which and why).
        """
        tools = list(tools or [])
        choice = normalize_tool_choice(tool_choice, [tool["function"]["name"] for tool in tools])
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be 'auto' or 'off', got {routing!r}")
        check_skip_threshold(skip_threshold)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
        if context_overflow not in CONTEXT_OVERFLOWS:
            raise ValueError(f"context_overflow must be 'error' or 'truncate', got {context_overflow!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        messages = list(messages)
        if routing == "auto" and messages and not self.model.config.routes_after(messages[-1]["role"]):
            routing = "off"  # do-no-harm routing: the routers were not fitted to decide after this role
        visible_tools = [] if choice == ("none",) else tools
        grammar = None
        if response_format:
            if visible_tools:
                raise ValueError("response_format and bound tools cannot be combined: use tool_choice='none', or "
                                 "a tool whose parameters are the schema, with tool_choice naming it")
            grammar, instruction = _response_grammar(self.grammars(), response_format)
            messages = _with_instruction(messages, instruction)
        elif tools:
            grammar = self.grammars().tool_calls(visible_tools, choice, parallel_tool_calls)
        prompt_ids = self._prompt_ids(messages, visible_tools)
        limit = _prompt_limit(max_tokens, context_budget, self.max_positions)
        dropped = 0
        if limit is not None and prompt_ids.shape[0] > limit:
            if context_overflow == "error":
                raise ContextBudgetError(int(prompt_ids.shape[0]), max_tokens, context_budget, self.max_positions)
            messages, prompt_ids, dropped = self._cut_to_fit(messages, visible_tools, limit)
            if prompt_ids.shape[0] > limit:
                raise ContextBudgetError(int(prompt_ids.shape[0]), max_tokens, context_budget, self.max_positions,
                                         truncated=True)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        return ChatStep(prompt_ids=prompt_ids, grammar=grammar, max_new_tokens=max_tokens,
                        temperature=float(temperature or 0.0), top_p=float(top_p), stop=tuple(s for s in stop if s),
                        seed=seed, routing=routing, skip_threshold=skip_threshold, max_time=timeout,
                        retry_empty=retry_empty, dropped_messages=dropped, telemetry=telemetry.capture())

    def _prompt_ids(self, messages: list[dict], tools: list[dict]) -> torch.Tensor:
        """``(prompt_tokens,)``: ``messages`` and ``tools`` rendered with the assistant prompt, tokenized."""
        prompt = render_chat(self.tokenizer, messages, tools, add_generation_prompt=True)
        return self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids[0]

    def _cut_to_fit(self, messages: list[dict], tools: list[dict], limit: int) -> tuple[list[dict], torch.Tensor, int]:
        """``messages`` with the fewest oldest messages dropped that bring the prompt within ``limit`` tokens (see
        ``context_overflow`` in :meth:`prepare`), its prompt ids and how many were dropped; the shortest cut when none
        fits. Dropping more never lengthens the prompt, so the cut is found by bisection: a few renderings."""
        head = 0
        while head < len(messages) and messages[head]["role"] == "system":
            head += 1
        # where a kept tail may begin: at any message after the system prompt but a tool result, which stays with
        # the call it answers
        starts = [index for index in range(head, len(messages)) if messages[index]["role"] != "tool"] or [head]
        low, high = 0, len(starts) - 1  # the answer lies in starts[low..high]; starts[high] is the shortest cut
        cuts: dict[int, torch.Tensor] = {}

        def prompt_of(position: int) -> torch.Tensor:
            if position not in cuts:
                cuts[position] = self._prompt_ids(messages[:head] + messages[starts[position]:], tools)
            return cuts[position]

        while low < high:
            middle = (low + high) // 2
            if prompt_of(middle).shape[0] <= limit:
                high = middle
            else:
                low = middle + 1
        return messages[:head] + messages[starts[low]:], prompt_of(low), starts[low] - head

    # ------------------------------------------------------------------ generating
    def generate(
        self,
        steps: Sequence[ChatStep],
        *,
        prefills: Sequence[Prefill] | None = None,
        on_token: Callable[[int, int], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[ChatAnswer]:
        """Generate the answers of ``steps`` in one batch (left-padded); they must share their :attr:`batch_key`.

        Args:
            prefills: the steps already routed and prefilled (:func:`prefill_step`), all skipping the same blocks:
                generation continues from their caches with those blocks off. Without them, the routers decide per
                row (a block then runs when any row keeps it).
            on_token: ``on_token(row, token_id)`` for every generated token of every row, from this thread.
            cancelled: ``cancelled(row)``: a row for which it turns true stops generating (its answer is then cut).

        Returns:
            One :class:`ChatAnswer` per step, in order; ``route["latency_s"]`` is this call's wall time (a retried
            answer's: both attempts', see :attr:`ChatStep.retry_empty`; a retry streams nothing to ``on_token``,
            its text comes with the answer).
        """
        if not steps:
            return []
        began_ns = telemetry.now_ns()
        answers = self._generate_batch(steps, prefills, on_token, cancelled)
        # the rows of one batch share max_time and latency, so the retried rows share their settings: one batch
        max_time = steps[0].max_time
        time_left = max_time - answers[0].route["latency_s"] if max_time else None
        retry = [row for row, (step, answer) in enumerate(zip(steps, answers))
                 if step.retry_empty and _ended_empty(answer) and not (cancelled and cancelled(row))]
        if retry and (time_left is None or time_left > 0):
            again = self._generate_batch([replace(steps[row], routing="off", max_time=time_left) for row in retry],
                                         None, None, None)
            for row, answer in zip(retry, again):
                answers[row] = _retried(answers[row], answer)
        telemetry.record_generations(self.name, steps, answers, began_ns)  # one `chat {model}` span per step
        return answers

    def _generate_batch(self, steps: Sequence[ChatStep], prefills: Sequence[Prefill] | None,
                        on_token: Callable[[int, int], None] | None,
                        cancelled: Callable[[int], bool] | None) -> list[ChatAnswer]:
        """One generation of ``steps`` as one batch (see :meth:`generate`), without retries."""
        if len({step.batch_key for step in steps}) > 1:
            raise ValueError("steps generated in one batch must share their generation settings (batch_key)")
        first = steps[0]
        input_ids, attention_mask = self._left_padded([step.prompt_ids for step in steps])
        kwargs: dict[str, Any] = {"max_new_tokens": first.max_new_tokens, "pad_token_id": self.pad_token_id}
        if prefills is not None:
            if len({prefill.skip for prefill in prefills}) != 1 or len(prefills) != len(steps):
                raise ValueError("prefilled steps generated in one batch must skip the same blocks, one per step")
            forced_skip = prefills[0].skip
            kwargs["prefilled"] = (prefills[0].cache if len(prefills) == 1 else
                                   _stacked_cache(self.model, [p.cache for p in prefills], input_ids.shape[1] - 1))
        elif len({(step.routing, step.skip_threshold) for step in steps}) > 1:
            raise ValueError("a batch routed by its routers needs one routing mode and one skip_threshold; prefill "
                             "the steps (prefill_step) and group them by skip set instead")
        else:
            forced_skip = () if first.routing == "off" else None
        if first.do_sample:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if first.stop:
            kwargs.update(stop_strings=list(first.stop), tokenizer=self.tokenizer)
        if forced_skip is None:
            kwargs["skip_threshold"] = first.skip_threshold
        if any(step.grammar is not None for step in steps):
            kwargs["logits_processor"] = LogitsProcessorList(
                [DecodingGrammars.processor([step.grammar for step in steps])])
        criteria = StoppingCriteriaList()
        if cancelled is not None:
            criteria.append(_RowsCancelled(cancelled, len(steps)))
        deadline = None
        if first.max_time:
            deadline = _Deadline(first.max_time)  # HF's max_time, but the answers learn whether it stopped them
            criteria.append(deadline)
        if criteria:
            kwargs["stopping_criteria"] = criteria
        if on_token is not None:
            kwargs["streamer"] = _RowStreamer(on_token)
        began = time.perf_counter()
        if first.do_sample and first.seed is not None:
            with self.seed_lock:
                torch.manual_seed(first.seed)
                sequences = self.model.generate(input_ids, attention_mask, forced_skip=forced_skip, **kwargs)
        else:
            sequences = self.model.generate(input_ids, attention_mask, forced_skip=forced_skip, **kwargs)
        latency = time.perf_counter() - began
        routes = self.model.last_routes
        new_tokens = [tokens[:length] for tokens, length in
                      zip(sequences[:, input_ids.shape[1]:].tolist(), self.model.last_lengths)]
        timed_out = deadline is not None and deadline.expired
        return [self._answer(step, tokens, route, latency, timed_out)
                for step, tokens, route in zip(steps, new_tokens, routes)]

    def _left_padded(self, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch, longest)`` input ids and attention mask, prompts aligned on the right (generation continues them
        all at the same position)."""
        longest = max(prompt.shape[0] for prompt in prompts)
        input_ids = torch.full((len(prompts), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - prompt.shape[0]:] = prompt
            attention_mask[row, longest - prompt.shape[0]:] = 1
        device = self.model.device
        return input_ids.to(device), attention_mask.to(device)

    def _generated(self, tokens: list[int]) -> list[int]:
        """A row's generated ids without the padding that follows its end: up to and including its first
        end-of-sequence token (rows of a batch that finish early are padded while the others go on)."""
        for position, token in enumerate(tokens):
            if token in self.eos_token_ids:
                return tokens[: position + 1]
        return tokens

    def _answer(self, step: ChatStep, tokens: list[int], route, latency: float, deadline_expired: bool) -> ChatAnswer:
        """The answer of a row that generated ``tokens``; ``deadline_expired``: the batch's timeout stopped it."""
        tokens = self._generated(tokens)
        decoded = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text = cut_at_stop(decoded, step.stop)
        parsed = parse_tool_calls(text)
        calls = [ToolCall(_call_id(), call.name, call.arguments) for call in parsed.tool_calls]
        invalid = [MalformedToolCall(_call_id(), call.name, call.text, call.error)
                   for call in parsed.invalid_tool_calls]
        ended = bool(tokens) and tokens[-1] in self.eos_token_ids or text != decoded  # an end token, a stop sequence
        cut_short = len(tokens) >= step.max_new_tokens and not ended
        timed_out = deadline_expired and not ended and not cut_short
        finish_reason = "tool_calls" if calls else "length" if cut_short or timed_out else "stop"
        return ChatAnswer(
            content=parsed.content if (calls or invalid) else text.strip(),
            text=text,
            tool_calls=calls,
            invalid_tool_calls=invalid,
            prompt_tokens=step.prompt_tokens,
            completion_tokens=len(tokens),
            finish_reason=finish_reason,
            route={"step_type": "tool_call" if (calls or invalid) else "planning", **route.to_dict(),
                   "latency_s": latency, "retried": False, "flops_discarded": 0},
            timed_out=timed_out,
            dropped_messages=step.dropped_messages,
        )

    def text_deltas(self, step: ChatStep) -> TextDeltas:
        """A fresh :class:`TextDeltas` for streaming ``step``'s answer."""
        return TextDeltas(self.tokenizer, step.stop, self.eos_token_ids)


def _ended_empty(answer: ChatAnswer) -> bool:
    """``answer`` ended (not cut by length or time) with neither text nor a call, and its routers skipped blocks: an
    empty step gives an agent nothing, and only a step that skipped blocks can answer otherwise at full depth."""
    return (bool(answer.route["skipped_layers"]) and answer.finish_reason == "stop" and not answer.text.strip()
            and not answer.tool_calls and not answer.invalid_tool_calls)


def _retried(empty: ChatAnswer, again: ChatAnswer) -> ChatAnswer:
    """``again`` (generated at full depth) as the answer, its route counting the ``empty`` attempt's time and FLOPs."""
    route = {**again.route, "latency_s": empty.route["latency_s"] + again.route["latency_s"], "retried": True,
             "flops_discarded": flops_executed(empty.route)}
    return replace(again, route=route)


@dataclass
class Prefill:
    """A step routed and prefilled alone, ready to be decoded in a batch with others that skip the same blocks.

    Attributes:
        skip: the blocks its routers skip (none with ``routing="off"``).
        cache: ``(1, ..., prompt_tokens - 1, ...)`` KV entries of its prompt but the last token, none in the skipped
            blocks; the last token's entries and the blocks' outputs at it wait in ``cache.pending``: generation feeds
            that token for its logits, and its first forward takes them from there instead of running it again.
    """

    skip: frozenset[int]
    cache: RoutedCache


@torch.no_grad()
def prefill_step(engine: ChatEngine, step: ChatStep) -> Prefill:
    """Decide ``step``'s route from its prompt and keep the prompt's KV cache, in one forward of the decoder (batch of
    one, so that no other row makes it run a block it skips; no LM head).

    Routes are decided from the prompt alone, so a server can route every step of a batch first and then decode each
    group of steps that skip the same blocks as one batch with those blocks forced off
    (``ChatEngine.generate(steps, prefills=...)``): every row keeps its own savings, and no prompt position runs
    twice: the decoding batch appends the last prompt position from here (:class:`~layerroute.router.Replay`), so a
    prefilled step executes, and is counted, exactly as the same step generated alone.
    """
    model = engine.model
    input_ids = step.prompt_ids[None].to(model.device)
    attention_mask = torch.ones_like(input_ids)
    state = RoutingState(context_mask=attention_mask.bool(), skip_threshold=step.skip_threshold,
                         forced_skip=frozenset() if step.routing == "off" else None, last_outputs={})
    cache = RoutedCache(config=model.base_model.config)
    token = ROUTING_STATE.set(state)
    try:
        model.base_model.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
    finally:
        ROUTING_STATE.reset(token)
    skip = frozenset(i for i in range(model.num_layers) if not bool(state.keep[i][0]))
    cache.pending = {index: (cache.layers[index].keys[..., -1:, :].clone(),
                             cache.layers[index].values[..., -1:, :].clone(), output)
                     for index, output in state.last_outputs.items()}
    cache.crop(-1)
    return Prefill(skip, cache)


def _stacked_cache(model: LayerRouteModel, caches: list[RoutedCache], length: int) -> RoutedCache:
    """One-row caches of steps that skip the same blocks as one cache of ``length`` positions, each row left-padded
    as its prompt is (the attention mask hides the padding)."""
    stacked = RoutedCache(config=model.base_model.config)
    for index in range(len(caches[0].layers)):
        layers = [cache.layers[index] for cache in caches]
        if not layers[0].is_initialized:  # a block the steps skip holds no entries
            continue
        keys = torch.cat([F.pad(layer.keys, (0, 0, length - layer.keys.shape[-2], 0)) for layer in layers])
        values = torch.cat([F.pad(layer.values, (0, 0, length - layer.values.shape[-2], 0)) for layer in layers])
        stacked.update(keys, values, index)
    if all(cache.pending is not None for cache in caches):
        stacked.pending = {index: tuple(torch.cat([cache.pending[index][part] for cache in caches])
                                        for part in range(3)) for index in caches[0].pending}
    return stacked


# ---------------------------------------------------------------------------------------------- messages
def canonical_messages(messages: Sequence[Any], tools: Sequence[dict] = ()) -> list[dict]:
    """OpenAI chat-completions messages as they arrive in a request, in the canonical form :meth:`ChatEngine.prepare`
    renders: text content only (text parts joined), ``developer`` read as ``system``, tool-call arguments as JSON
    strings, every tool message answering an earlier call (and named after its tool).

    Raises:
        ValueError: a message that is not a JSON object, an unknown role, non-text content, a malformed tool call,
            a call of a tool the request does not declare, or a tool message that answers no call.
    """
    names = {tool["function"]["name"] for tool in tools}
    calls: dict[str, str] = {}
    canonical = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with a 'role', got {type(message).__name__}")
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise ValueError(f"{where} has unknown role {role!r}; use one of {', '.join(MESSAGE_ROLES)}")
        content = _text_content(message.get("content"), where)
        if role in ("system", "developer", "user"):
            canonical.append({"role": "system" if role == "developer" else role, "content": content})
        elif role == "assistant":
            out: dict[str, Any] = {"role": "assistant", "content": content}
            if message.get("tool_calls"):
                out["tool_calls"] = [_canonical_call(call, f"{where}.tool_calls[{i}]", names)
                                     for i, call in enumerate(message["tool_calls"])]
                calls.update({call["id"]: call["function"]["name"] for call in out["tool_calls"]})
            canonical.append(out)
        else:
            call_id = message.get("tool_call_id")
            if call_id not in calls:
                raise ValueError(f"{where} (role 'tool') answers tool_call_id {call_id!r}, which no earlier assistant "
                                 "message called")
            canonical.append({"role": "tool", "content": content, "tool_call_id": call_id, "name": calls[call_id]})
    if not canonical:
        raise ValueError("messages must hold at least one message")
    return canonical


def canonical_tools(tools: Sequence[Any] | None) -> list[dict]:
    """OpenAI function tools, checked: ``{"type": "function", "function": {"name": ..., "parameters": {...}}}``."""
    checked = []
    for index, tool in enumerate(tools or []):
        is_function = isinstance(tool, dict) and tool.get("type", "function") == "function"
        function = tool.get("function") if is_function else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ..., "
                             "'parameters': {...}}}")
        if not isinstance(function.get("parameters", {}), dict):
            raise ValueError(f"tools[{index}].function.parameters must be a JSON schema object")
        checked.append({"type": "function", "function": function})
    return checked


def _text_content(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"{where} has a content part of type {kind!r}; this model reads text only")
        return "".join(parts)
    raise ValueError(f"{where}.content must be a string or a list of text parts")


def _canonical_call(call: Any, where: str, names: set[str]) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"{where} must be {{'id': ..., 'type': 'function', 'function': {{'name': ..., "
                         "'arguments': '...'}}}")
    if function["name"] not in names:
        raise ValueError(f"{where} calls {function['name']!r}, which is not among the request's tools "
                         f"({', '.join(sorted(names)) or 'none'})")
    arguments = function.get("arguments") or "{}"
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    try:
        if not isinstance(json.loads(arguments), dict):
            raise ValueError
    except ValueError:
        raise ValueError(f"{where}.function.arguments must be a JSON object encoded as a string") from None
    return {"id": str(call.get("id") or _call_id()), "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


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


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop sequence."""
    positions = [text.find(s) for s in stop if s and s in text]
    return text[: min(positions)] if positions else text


# ---------------------------------------------------------------------------------------------- streaming
class TextDeltas:
    """A row's generated tokens as the text a streaming client may see, piece by piece.

    Prose streams as it arrives. Once a tool call starts, text is held back (the parsed calls come with the final
    answer), so no raw ``<tool_call>`` markup ever reaches the client; neither does a stop sequence, nor a trailing
    piece that may be the start of either, nor half a UTF-8 character.
    """

    def __init__(self, tokenizer, stop: Sequence[str], eos_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.eos_token_ids = eos_token_ids
        self.tokens: list[int] = []
        self.emitted = ""
        self.holding = False
        self.ended = False

    def push(self, token_id: int) -> str:
        """The new visible text after ``token_id`` (often ``""``)."""
        if self.ended or self.holding:
            return ""
        if token_id in self.eos_token_ids:
            self.ended = True  # what follows is the padding of a finished row
            return ""
        self.tokens.append(token_id)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            return ""
        visible = _safe_prefix(cut_at_stop(text, self.stop), self.stop)
        if TOOL_CALL_TAG in text:
            visible = text[: text.index(TOOL_CALL_TAG)]
            self.holding = True
        if len(visible) <= len(self.emitted) or not visible.startswith(self.emitted):
            return ""
        delta, self.emitted = visible[len(self.emitted):], visible
        return delta

    def tail(self, content: str) -> str:
        """What of the answer's final ``content`` has not been streamed yet."""
        streamed = self.emitted.strip()
        return content[len(streamed):] if content.startswith(streamed) else ""


def _safe_prefix(text: str, stop: Sequence[str]) -> str:
    """Hold back a trailing partial ``<tool_call>`` tag or stop sequence: streamed text never shows either."""
    for marker in [TOOL_CALL_TAG, *stop]:
        for length in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:length]):
                text = text[:-length]
                break
    return text


class _RowStreamer(BaseStreamer):
    """HF streamer that hands every generated token of every row to ``on_token(row, token_id)``."""

    def __init__(self, on_token: Callable[[int, int], None]):
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate puts the prompt first
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            self.on_token(row, token)

    def end(self) -> None:
        pass


class _Deadline(StoppingCriteria):
    """Stops every row once ``seconds`` have passed since it was made (HF's ``max_time``), and remembers it did."""

    def __init__(self, seconds: float):
        self.ends = time.perf_counter() + seconds
        self.expired = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.expired = self.expired or time.perf_counter() >= self.ends
        return torch.full((input_ids.shape[0],), self.expired, dtype=torch.bool, device=input_ids.device)


class _RowsCancelled(StoppingCriteria):
    """Stops the rows whose request was cancelled (``cancelled(row)``); generation ends when every row has."""

    def __init__(self, cancelled: Callable[[int], bool], rows: int):
        self.cancelled = cancelled
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tensor([self.cancelled(row) for row in range(self.rows)], dtype=torch.bool,
                            device=input_ids.device)


_ENGINES: dict[tuple, ChatEngine] = {}
_ENGINES_LOCK = threading.Lock()


__all__ = ["CONTEXT_OVERFLOWS", "ChatAnswer", "ChatEngine", "ChatStep", "ContextBudgetError", "MalformedToolCall",
           "Prefill", "TextDeltas", "ToolCall", "canonical_messages", "canonical_tools", "cut_at_stop", "max_positions",
           "prefill_step"]
