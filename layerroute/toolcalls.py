"""Tool calls in generated text (Hermes / Qwen2.5 ``<tool_call>`` form): parsing them, and keeping their names to the
bound tools while they are generated."""

from __future__ import annotations

import bisect
import itertools
import json
import re
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor

TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)


@dataclass
class ParsedToolCall:
    name: str
    arguments: dict


@dataclass
class InvalidToolCall:
    text: str
    error: str
    name: str | None = None


@dataclass
class ParsedOutput:
    """Generated text split into prose, well-formed tool calls and malformed ones."""

    content: str
    tool_calls: list[ParsedToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


def parse_tool_calls(text: str) -> ParsedOutput:
    """Find every ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in ``text``.

    A block that is not closed (generation stopped mid-call), not JSON, or lacks a name or object arguments becomes an
    :class:`InvalidToolCall` carrying the raw text and the reason, never an exception.
    """
    calls, invalid = [], []
    for match in TOOL_CALL_BLOCK.finditer(text):
        raw = match.group(1).strip()
        closed = match.group(0).rstrip().endswith("</tool_call>")
        try:
            payload = json.loads(raw)
        except json.JSONDecodeError as error:
            name = re.search(r'"name"\s*:\s*"([^"]+)"', raw)
            reason = f"not valid JSON ({error.msg})" + ("" if closed else "; the <tool_call> block is not closed")
            invalid.append(InvalidToolCall(raw, reason, name.group(1) if name else None))
            continue
        name = payload.get("name") if isinstance(payload, dict) else None
        arguments = payload.get("arguments", payload.get("parameters", {})) if isinstance(payload, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(name, str) or not name:
            invalid.append(InvalidToolCall(raw, "no function name"))
        elif not isinstance(arguments, dict):
            invalid.append(InvalidToolCall(raw, "arguments are not a JSON object", name))
        else:
            calls.append(ParsedToolCall(name, arguments))
    content = TOOL_CALL_BLOCK.sub("", text).strip()
    return ParsedOutput(content, calls, invalid)


def calls_match(generated: list[ParsedToolCall], reference: list[dict]) -> bool:
    """Exact match: the same calls (name and arguments) as the reference canonical ``tool_calls``, in any order."""
    want = sorted(
        json.dumps({"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}, sort_keys=True)
        for c in reference
    )
    got = sorted(json.dumps({"name": c.name, "arguments": c.arguments}, sort_keys=True) for c in generated)
    return got == want


class TokenPieces:
    """The text of every token of a tokenizer, indexed for prefix lookups (built once per tokenizer: ~1 s for a
    49k vocabulary).

    ``consistent`` is false for tokenizers whose tokens do not decode one by one into the text they decode to
    together (SentencePiece's dropped leading spaces); a constraint built on such pieces would mask the wrong tokens.
    """

    def __init__(self, tokenizer) -> None:
        self.pieces = tokenizer.batch_decode([[index] for index in range(len(tokenizer))])
        self.by_piece: dict[str, list[int]] = {}
        for index, piece in enumerate(self.pieces):
            if piece:
                self.by_piece.setdefault(piece, []).append(index)
        self.sorted_pieces = sorted(self.by_piece)
        sample = tokenizer('<tool_call>\n{"name": "get_weather", "arguments": {}}', add_special_tokens=False).input_ids
        self.consistent = "".join(self.pieces[i] for i in sample) == tokenizer.decode(sample)

    def starting_with(self, text: str) -> list[int]:
        """Tokens whose text starts with ``text`` (non-empty)."""
        found = []
        for piece in itertools.islice(self.sorted_pieces, bisect.bisect_left(self.sorted_pieces, text), None):
            if not piece.startswith(text):
                break
            found.extend(self.by_piece[piece])
        return found

    def prefixes_of(self, text: str) -> list[int]:
        """Tokens whose text is a non-empty prefix of ``text``."""
        return [index for end in range(1, len(text) + 1) for index in self.by_piece.get(text[:end], ())]


class ToolNameConstraint(LogitsProcessor):
    """Keeps the name of every generated ``<tool_call>`` to one of the bound tools.

    Small models invent tool names or copy the placeholder of the call instructions (``<function-name>``), and a
    call to a tool that is not bound can only fail. From the ``<tool_call>`` tag to the closing quote of the name,
    only tokens that keep the text a prefix of ``{"name": "<a bound name>"`` (JSON spacing variants allowed) may be
    generated; the arguments, and everything outside a call, are free. A block the model has already broken (another
    key first, say) is left alone, so the constraint never traps generation.

    Args:
        pieces: :class:`TokenPieces` of the model's tokenizer.
        tokenizer: the model's tokenizer.
        names: the bound tools' names.
        prompt_length: tokens of the prompt; generated text starts after them.
        prefix: text of the answer already in the prompt (a forced ``<tool_call>\\n``).
    """

    OPEN = "<tool_call>"

    def __init__(self, pieces: TokenPieces, tokenizer, names: list[str], prompt_length: int, prefix: str = "") -> None:
        self.pieces, self.tokenizer = pieces, tokenizer
        self.prompt_length, self.prefix = prompt_length, prefix
        self.completions = [f'{before}{{{inside}"name":{after}{json.dumps(name)}'
                            for name in names for before in ("", "\n", " ") for inside in ("", " ", "\n")
                            for after in ("", " ")]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            text = self.prefix + self.tokenizer.decode(input_ids[row, self.prompt_length :])
            opened = text.rfind(self.OPEN)
            if opened < 0:
                continue
            written = text[opened + len(self.OPEN) :]
            rests = [c[len(written) :] for c in self.completions if c.startswith(written) and len(c) > len(written)]
            if not rests:  # the name is complete, or the block went another way
                continue
            allowed = {index for rest in rests for index in self.pieces.prefixes_of(rest)}
            allowed.update(index for rest in rests for index in self.pieces.starting_with(rest))
            mask = torch.full_like(scores[row], float("-inf"))
            mask[[index for index in allowed if index < mask.shape[0]]] = 0.0  # a tokenizer may outgrow the head
            scores[row] = scores[row] + mask
        return scores
