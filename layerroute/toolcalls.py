"""Tool calls in generated text (Hermes / Qwen2.5 ``<tool_call>`` form): ``tool_choice`` normalisation, parsing the
calls, and scoring them against a reference as BFCL's AST checker does.

Generation itself is constrained by :mod:`layerroute.grammar`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import jsonschema

TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
TOOL_CHOICE_KEYWORDS = ("auto", "none", "any", "required")


def normalize_tool_choice(tool_choice, names: list[str]) -> tuple | None:
    """OpenAI / LangChain ``tool_choice`` as one of ``None`` (auto), ``("none",)``, ``("required",)`` or
    ``("name", NAME)``, given the bound tools' ``names``; a clear ``ValueError`` for anything else, a name that is not
    bound included. ``"any"`` / ``"required"`` / ``True`` with a single bound tool is that tool's name."""
    if tool_choice is None or tool_choice == "auto" or tool_choice is False:
        return None
    if isinstance(tool_choice, tuple):
        return tool_choice
    if tool_choice == "none":
        return ("none",)
    if tool_choice in ("any", "required") or tool_choice is True:
        if not names:
            raise ValueError(f"tool_choice={tool_choice!r} needs at least one bound tool")
        return ("required",) if len(names) > 1 else ("name", names[0])
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if not isinstance(name, str):
            raise ValueError(f"tool_choice dict must name a function, got {tool_choice!r}")
        tool_choice = name
    if isinstance(tool_choice, str):
        if tool_choice not in names:
            raise ValueError(
                f"tool_choice={tool_choice!r} is neither one of {TOOL_CHOICE_KEYWORDS} nor a bound tool "
                f"(bound: {names})"
            )
        return ("name", tool_choice)
    raise ValueError(f"unsupported tool_choice {tool_choice!r}; use one of {TOOL_CHOICE_KEYWORDS}, a tool name or "
                     "{'type': 'function', 'function': {'name': ...}}")


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


# ---------------------------------------------------------------------------------------------- scoring
@dataclass
class CallScore:
    """One generated step scored against its reference calls.

    Attributes:
        valid: at least one call was generated, and every generated block parsed and calls a bound tool with
            arguments valid under its parameter schema (what a tool executor would accept).
        names_correct: the generated calls name the reference's tools, as many times each (order free).
        arguments_correct: every reference call is matched by a distinct generated call with the same name and
            matching arguments (:func:`arguments_match`), and nothing more was called.
        error: why the step is not fully correct (``None`` when it is).
    """

    valid: bool
    names_correct: bool
    arguments_correct: bool
    error: str | None = None


def score_calls(parsed: ParsedOutput, reference: list[dict], tools: list[dict]) -> CallScore:
    """Score generated calls against a reference step's canonical ``tool_calls``, with the bound ``tools`` (OpenAI
    function tools) giving each tool's parameter schema."""
    schemas = {tool["function"]["name"]: tool["function"].get("parameters") or {} for tool in tools}
    generated = parsed.tool_calls
    invalid = [f"{call.name or '?'}: {call.error}" for call in parsed.invalid_tool_calls]
    for call in generated:
        if call.name not in schemas:
            invalid.append(f"{call.name}: not a bound tool")
            continue
        try:
            jsonschema.validate(call.arguments, schemas[call.name])
        except jsonschema.ValidationError as error:
            invalid.append(f"{call.name}: {error.message}")
        except jsonschema.SchemaError:
            pass  # a tool's own broken schema says nothing about the call
    valid = bool(generated) and not invalid
    wanted = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reference]
    names_correct = sorted(c.name for c in generated) == sorted(name for name, _ in wanted)
    if not names_correct:
        got = ", ".join(c.name for c in generated) or "no call"
        wrong = f"called {got}; expected {', '.join(n for n, _ in wanted)}"
        return CallScore(valid, False, False, "; ".join(invalid + [wrong]))
    unmatched, mismatches = list(generated), []
    for name, arguments in wanted:
        reasons = []
        for call in unmatched:
            if call.name == name:
                reason = arguments_match(call.arguments, acceptable_values(arguments, schemas.get(name, {})),
                                         schemas.get(name, {}))
                if reason is None:
                    unmatched.remove(call)
                    break
                reasons.append(reason)
        else:
            mismatches.append(f"{name}: {'; '.join(reasons)}")
    return CallScore(valid, True, not mismatches, "; ".join(invalid + mismatches) or None)


def acceptable_values(reference_arguments: dict, schema: dict) -> dict[str, list]:
    """A reference call's arguments in BFCL's possible-answer form: each parameter's acceptable values, ``""`` marking
    "may be left out". An optional parameter may be left out when the reference leaves it out or gives its schema
    default; a reference that leaves it out also accepts that default."""
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    acceptable = {}
    for name, value in reference_arguments.items():
        default = (properties.get(name) or {}).get("default", _NO_DEFAULT)
        acceptable[name] = [value, ""] if name not in required and value == default else [value]
    for name, spec in properties.items():
        if name not in acceptable and name not in required:
            default = (spec or {}).get("default", _NO_DEFAULT)
            acceptable[name] = [""] if default is _NO_DEFAULT else ["", default]
    return acceptable


def arguments_match(arguments: dict, acceptable: dict[str, list], schema: dict) -> str | None:
    """``None`` when ``arguments`` match, else the reason; the rules of BFCL's AST checker: every required parameter
    present, no parameter the schema or the reference does not know, each value among its acceptable values, and an
    omitted parameter only where ``""`` is acceptable. Values compare after type coercion (an integer for a number)
    and, for strings (inside lists and objects too), case-, space- and punctuation-insensitively."""
    properties = schema.get("properties") or {}
    for name in schema.get("required") or []:
        if name not in arguments:
            return f"missing required argument {name!r}"
    for name, value in arguments.items():
        if name not in acceptable or (properties and name not in properties):
            return f"unexpected argument {name!r}"
        options = [option for option in acceptable[name] if option != ""]
        if not options:
            return f"argument {name!r} given where the reference leaves it out"
        if not any(_same_value(value, option, properties.get(name) or {}) for option in options):
            return f"{name}={value!r}, expected {' or '.join(repr(o) for o in options)}"
    for name, options in acceptable.items():
        if name not in arguments and "" not in options:
            return f"missing argument {name!r}"
    return None


_NO_DEFAULT = object()
_STRING_NOISE = re.compile(r"[ ,./\-_*^]")


def _standard(text: str) -> str:
    return _STRING_NOISE.sub("", text).lower().replace("'", '"')


def _same_value(value, expected, schema: dict) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return type(value) is type(expected) and value == expected
    if isinstance(expected, (int, float)):
        return isinstance(value, (int, float)) and float(value) == float(expected)
    if isinstance(expected, str):
        return isinstance(value, str) and _standard(value) == _standard(expected)
    if isinstance(expected, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return isinstance(value, list) and len(value) == len(expected) and all(
            _same_value(v, e, items) for v, e in zip(value, expected))
    if isinstance(expected, dict):
        properties = schema.get("properties") or {}
        return isinstance(value, dict) and set(value) == set(expected) and all(
            _same_value(value[key], expected[key], properties.get(key) or {}) for key in expected)
    return value == expected

