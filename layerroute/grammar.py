"""Constrained decoding: tool calls that are valid under the bound tools' JSON schemas, and JSON answers.

Grammars are built and enforced by xgrammar (https://github.com/mlc-ai/xgrammar); this module only maps LayerRoute's
tool-call form onto it. Tool calls use the Hermes / Qwen ``<tool_call>`` form that :mod:`layerroute.steps` renders
and :func:`layerroute.toolcalls.parse_tool_calls` reads::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Oslo"}}
    </tool_call>

Inside a ``<tool_call>`` block only a bound tool's name may follow, and its ``arguments`` must be a JSON object valid
under that tool's parameter schema (required keys, types, enums), its keys in the schema's order. Outside the blocks the
text is free, except where ``tool_choice`` says otherwise:

- ``None`` (auto): prose, calls, or both;
- ``("none",)``: prose only, a ``<tool_call>`` tag can never be written;
- ``("required",)``: at least one call;
- ``("name", NAME)``: exactly one call, of that tool.

With ``parallel_tool_calls=False`` (OpenAI's parameter of that name) the answer ends after its first call.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from functools import lru_cache

import torch
import xgrammar as xgr
from transformers import LogitsProcessor
from xgrammar.structural_tag import AnyTextFormat

logger = logging.getLogger(__name__)

# The Hermes tool-call layout (<tool_call>\n{"name": "...", "arguments": {...}}\n</tool_call>) is xgrammar's
# "qwen_3" model format with the reasoning block disabled.
TOOL_CALL_FORMAT = "qwen_3"
TOOL_CALL_TAG = "<tool_call>"
# JSON whitespace runs are capped: small models can otherwise emit whitespace until max_tokens, and the JSON both
# chat renderings train on (json.dumps) never has more than one space in a row outside strings.
MAX_JSON_WHITESPACE = 2
_ENGINE_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[12:00:00] /project/cpp/x.cc:42: " before messages


class DecodingGrammars:
    """Compiles grammars for one tokenizer, and makes the logits processors that enforce them in ``generate``.

    Compiled grammars are cached (by tools, tool choice or schema), so a recurring request compiles once. Thread-safe.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        vocab_size: rows of the model's LM head (may exceed ``len(tokenizer)`` through padding).
    """

    def __init__(self, tokenizer, vocab_size: int) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(info)
        self._lock = threading.Lock()
        self._tool_calls = lru_cache(maxsize=256)(self._compile_tool_calls)
        self._json_schema = lru_cache(maxsize=256)(self._compile_json_schema)

    def tool_calls(self, tools: list[dict], tool_choice: tuple | None,
                   parallel_tool_calls: bool = True) -> xgr.CompiledGrammar:
        """The grammar of an answer with ``tools`` bound (OpenAI function tools) under a normalised ``tool_choice``
        (see :func:`layerroute.toolcalls.normalize_tool_choice`); without ``parallel_tool_calls`` the answer ends
        after its first call.

        A tool whose parameter schema xgrammar cannot compile keeps its name constrained but its arguments free (any
        JSON object), with a warning naming the tool and the reason; a call never fails on a schema.
        """
        # the JSON text is the cache key; keys keep their order, since the grammar holds properties in schema order
        return self._tool_calls(json.dumps(tools), tool_choice, parallel_tool_calls)

    def json_schema(self, schema: dict) -> xgr.CompiledGrammar:
        """The grammar of a JSON value valid under ``schema``; a ``ValueError`` names what the engine rejects."""
        return self._json_schema(json.dumps(schema))

    def json_object(self) -> xgr.CompiledGrammar:
        """The grammar of any JSON value (OpenAI's ``json_object`` response format)."""
        with self._lock:
            return self._compiler.compile_builtin_json_grammar()

    @staticmethod
    def processor(grammar: xgr.CompiledGrammar | list[xgr.CompiledGrammar | None]) -> LogitsProcessor:
        """A fresh logits processor for one ``generate`` call (it holds each row's parse state, so it serves exactly
        one call): ``grammar`` enforced on every row, or a list with each row's grammar (``None``: the row is free)."""
        return RowGrammars(grammar)

    # ------------------------------------------------------------------ compilation (cached)
    def _compile_tool_calls(self, tools_json: str, tool_choice: tuple | None,
                            parallel_tool_calls: bool) -> xgr.CompiledGrammar:
        if tool_choice == ("none",):
            tag = xgr.StructuralTag(format=AnyTextFormat(excludes=[TOOL_CALL_TAG]))
        else:
            tools = [self._constrainable(tool) for tool in json.loads(tools_json)]
            choice = ("auto" if tool_choice is None else "required" if tool_choice == ("required",)
                      else {"type": "function", "function": {"name": tool_choice[1]}})
            tag = xgr.get_model_structural_tag(TOOL_CALL_FORMAT, tools=tools, tool_choice=choice,
                                               reasoning="disabled", max_whitespace_cnt=MAX_JSON_WHITESPACE,
                                               parallel_tool_calls=parallel_tool_calls)
        with self._lock:
            return self._compiler.compile_structural_tag(tag)

    def _compile_json_schema(self, schema_json: str) -> xgr.CompiledGrammar:
        try:
            with self._lock:
                return self._compiler.compile_json_schema(schema_json, max_whitespace_cnt=MAX_JSON_WHITESPACE)
        except RuntimeError as error:
            raise ValueError(f"the grammar engine cannot compile this JSON schema: {_reason(error)}") from None

    def _constrainable(self, tool: dict) -> dict:
        """``tool`` as xgrammar's tool-call builder takes it: a schema it cannot compile becomes "any JSON object",
        and ``strict`` is removed, since xgrammar reads ``strict: false`` as "do not constrain"."""
        function = {key: value for key, value in tool["function"].items() if key != "strict"}
        parameters = function.get("parameters")
        if parameters is not None:
            try:
                self._json_schema(json.dumps(parameters))
            except ValueError as error:
                logger.warning("tool %r: %s; its arguments are not constrained", function["name"], error)
                function["parameters"] = {"type": "object"}
        return {"type": "function", "function": function}


class RowGrammars(LogitsProcessor):
    """Enforces grammars in ``generate``: one for every row, or one per row of a batch (``None`` leaves a row free).

    A row that has finished (its grammar terminated, or generation stopped it early: a stop sequence, a cancelled
    request) is padded while the others go on; its padding is not fed to its grammar, and its logits are left alone.

    The parse state advances by one token per decode step, in :meth:`advance` or, when nothing called that for the
    step, in ``__call__``. :class:`layerroute.model.LayerRouteModel` advances it as each forward starts, so that
    :meth:`allowed_tokens` is known before the LM head runs and the head computes only those logits.

    Args:
        grammars: a compiled grammar for every row, or ``(batch,)`` compiled grammars or ``None``.
    """

    def __init__(self, grammars: xgr.CompiledGrammar | list[xgr.CompiledGrammar | None]) -> None:
        self.grammars = grammars
        constrained = grammars if not isinstance(grammars, list) else next(g for g in grammars if g is not None)
        self.vocab_size = constrained.tokenizer_info.vocab_size
        self.matchers: list[xgr.GrammarMatcher | None] | None = None
        self.prompt_length: int | None = None

    def advance(self, new_tokens: torch.LongTensor) -> None:
        """Feed one forward's input: ``(batch, n)`` token ids. The first forward is the prompt (or its last token,
        after a prefill) and only starts the parse; every later one carries the token generated last."""
        if self.matchers is None:
            self._start(new_tokens.shape[0])
        else:
            self._accept(new_tokens[:, -1])

    def allowed_tokens(self, max_tokens: int) -> torch.LongTensor | None:
        """``(n,)`` ids of the tokens some unfinished row may take next, when there are at most ``max_tokens`` of
        them and every row is constrained (finished rows are padded, so their logits do not matter); else ``None``."""
        if self.matchers is None or not self._rows or any(matcher is None for matcher in self.matchers):
            return None
        # the engine's own masking on zeros marks what each row allows, whatever the bitmask's layout
        allowed = torch.zeros(len(self._rows), self.vocab_size)
        xgr.apply_token_bitmask_inplace(allowed, self.bitmask[self._rows], vocab_size=self.vocab_size)
        ids = (allowed == 0).any(dim=0).nonzero().flatten()
        return ids if len(ids) <= max_tokens else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.matchers is None:  # the first call: the prompt, nothing generated yet
            self._start(input_ids.shape[0])
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        elif input_ids.shape[1] - self.prompt_length > self._accepted:  # no forward advanced the parse this step
            self._accept(input_ids[:, -1])
        if self._rows:
            # a copy, since generate keeps the tensor it passes as the raw logits (output_logits); xgrammar masks
            # logits on CUDA or CPU only
            masked = scores.clone() if scores.device.type in ("cuda", "cpu") else scores.to("cpu", copy=True)
            xgr.apply_token_bitmask_inplace(masked, self.bitmask.to(masked.device), vocab_size=self.vocab_size,
                                            indices=self._rows)
            scores = masked.to(scores.device)
        return scores

    def _start(self, batch: int) -> None:
        grammars = self.grammars if isinstance(self.grammars, list) else [self.grammars] * batch
        if len(grammars) != batch:
            raise ValueError(f"{len(grammars)} grammars for a batch of {batch} rows")
        self.matchers = [None if grammar is None else xgr.GrammarMatcher(grammar) for grammar in grammars]
        self.finished = [matcher is None for matcher in self.matchers]
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), self.vocab_size)
        self._accepted = 0
        self._fill_bitmask()

    def _accept(self, tokens: torch.LongTensor) -> None:
        for row, matcher in enumerate(self.matchers):
            if not self.finished[row] and not matcher.accept_token(int(tokens[row])):
                self.finished[row] = True  # the token is padding after the row stopped early
        self._accepted += 1
        self._fill_bitmask()

    def _fill_bitmask(self) -> None:
        """The next token's bitmask for every row still parsing; ``_rows`` lists them."""
        self._rows = []
        for row, matcher in enumerate(self.matchers):
            if not self.finished[row] and matcher.is_terminated():
                self.finished[row] = True
            if not self.finished[row]:
                matcher.fill_next_token_bitmask(self.bitmask, row)
                self._rows.append(row)


def _reason(error: Exception) -> str:
    return _ENGINE_LOCATION.sub("", str(error).strip().splitlines()[0] if str(error).strip() else repr(error))
