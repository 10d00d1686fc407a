"""Parsing tool calls out of generated text (Hermes / Qwen2.5 ``<tool_call>`` form)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

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
