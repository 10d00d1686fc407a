"""Agent logs in, canonical traces out.

Every reader turns one record of a log format into a :class:`Trace` in the canonical OpenAI chat-completions form:
``{"id", "source", "tools": [...], "messages": [...]}``, assistant messages carrying ``tool_calls``
(arguments as a JSON string) and ``tool`` messages carrying ``tool_call_id`` and ``name``. ``source`` names the data
set a trace comes from (read from the ``openai`` form's ``source`` field; ``"unknown"`` when a record has none).

Formats (detected per file from its first record, or forced with ``format=``):

- ``openai``: the canonical form itself (``messages``, optional ``tools``).
- ``sharegpt``: ShareGPT / Hermes function calling (``conversations`` of ``from`` / ``value``; tools in the system
  prompt inside ``<tools>``; ``<tool_call>`` and ``<tool_response>`` tags), and LLaMA-Factory's ShareGPT variant
  (``function_call`` / ``observation`` turns, tools as a JSON list in a ``tools`` field).
- ``glaive``: Glaive function-calling v2 (``system`` + ``chat`` text with ``USER:``, ``ASSISTANT:``,
  ``<functioncall>``, ``FUNCTION RESPONSE:``).
- ``gsm8k``: ``{question, answer}`` records (one planning step each).
- ``langsmith``: LangSmith run exports (``inputs`` holding messages, ``outputs`` holding the generation).
- ``layerroute``: step records written by LayerRoute's own cost callback with ``record_messages=True``.
"""

from __future__ import annotations

import ast
import codecs
import gzip
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MissingInputError, UserError
from .extras import require

FORMATS = ("openai", "sharegpt", "glaive", "gsm8k", "langsmith", "layerroute")
ROLES = ("system", "user", "assistant", "tool")
GZIP_MAGIC = b"\x1f\x8b"


class RecordError(ValueError):
    """A record that cannot be read; the message says why.

    ``kind`` is the reason without the record's particulars (which message, which column), so that skipped records
    can be counted by reason; it defaults to the message itself.
    """

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind or message


class BadRecordError(UserError, ValueError):
    """Raised when a record cannot be read and bad records are not skipped; names the file and line."""


@dataclass
class Trace:
    """One agent run in canonical form."""

    id: str
    messages: list[dict]
    tools: list[dict] = field(default_factory=list)
    source: str = "unknown"

    def to_dict(self) -> dict:
        return {"id": self.id, "source": self.source, "tools": self.tools, "messages": self.messages}


@dataclass
class SkippedRecord:
    """A record left out under ``on_bad_record="skip"``: where it is, why (``reason``) and the kind of reason."""

    source: str
    line: int
    reason: str
    kind: str


@dataclass
class ReadResult:
    traces: list[Trace]
    skipped: list[SkippedRecord]

    def skipped_summary(self) -> dict[str, int]:
        """How many records were skipped, by kind of reason."""
        return dict(Counter(record.kind for record in self.skipped))


# ---------------------------------------------------------------------------------------------- canonical checks
JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def expect(value, kind: type, what: str, where: str = ""):
    """``value`` if it is a ``kind``; else a :class:`RecordError` whose kind (``what`` must be ...) leaves out
    ``where`` (which message, which turn), so that such records count together."""
    if isinstance(value, kind):
        return value
    reason = f"{what} must be {JSON_NAMES[kind]}"
    got = JSON_NAMES.get(type(value), type(value).__name__)
    raise RecordError(f"{where}: {reason}, got {got}" if where else f"{reason}, got {got}", kind=reason)


def parse_arguments(text: str, name: str):
    try:
        return json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError) as error:  # ValueError: JSONDecodeError, or an integer past the digit limit
        raise RecordError(f"arguments of tool call {name!r} are not valid JSON: {error}",
                          kind="tool call arguments are not valid JSON") from None


def tool_call(name: str, arguments, call_id) -> dict:
    if not isinstance(name, str) or not name:
        raise RecordError("tool call without a function name")
    if not isinstance(call_id, str) or not call_id:
        raise RecordError(f"tool call {name!r} has an id that is not a non-empty string: {call_id!r}",
                          kind="tool call id is not a non-empty string")
    if isinstance(arguments, str):
        arguments = parse_arguments(arguments, name)
    if not isinstance(arguments, dict):
        raise RecordError(f"arguments of tool call {name!r} must be a JSON object, got "
                          f"{JSON_NAMES.get(type(arguments), type(arguments).__name__)}",
                          kind="tool call arguments are not a JSON object")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def normalize_tool(tool) -> dict:
    """A tool schema in OpenAI form: ``{"type": "function", "function": {"name", "description", "parameters"}}``.

    Checked as far as rendering relies on it (:func:`layerroute.steps.tool_signature`); the schema inside
    ``properties`` is rendered as it comes.
    """
    expect(tool, dict, "a tool schema")
    function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise RecordError("a tool schema has no function name")
    where = f"tool {function['name']!r}"
    if function.get("description") is not None:
        expect(function["description"], str, "a tool's description", where)
    parameters = expect(function.get("parameters") or {}, dict, "a tool's parameters", where)
    expect(parameters.get("properties") or {}, dict, "a tool's parameter properties", where)
    required = expect(parameters.get("required") or [], list, "a tool's required parameters", where)
    for name in required:
        expect(name, str, "a required parameter's name", where)
    return {"type": "function", "function": function}


def validate_messages(messages) -> list[dict]:
    """Check and normalise canonical messages (arguments as JSON strings, ids on every tool call, every tool result
    tied to the call it answers) and the order of the conversation (:func:`check_conversation`)."""
    if not isinstance(messages, list) or not messages:
        raise RecordError("`messages` must be a non-empty list")
    normalized = []
    for index, message in enumerate(messages):
        where = f"message {index}"
        expect(message, dict, "a message", where)
        role = message.get("role")
        if role not in ROLES:
            raise RecordError(f"message {index} has role {role!r}; expected one of {ROLES}", kind="unknown role")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            parts = [part for part in content if isinstance(part, dict) and "text" in part]
            content = "".join(expect(part["text"], str, "the text of a content part", where) for part in parts)
        if content is not None:
            expect(content, str, "message content", where)
        out = {"role": role, "content": content or ""}
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for number, call in enumerate(expect(message["tool_calls"], list, "`tool_calls`", where)):
                expect(call, dict, "a tool call", f"{where} tool call {number}")
                function = expect(call.get("function", call), dict, "a tool call's function",
                                  f"{where} tool call {number}")
                arguments = function.get("arguments", function.get("args", {}))
                calls.append(tool_call(function.get("name"), arguments, call.get("id") or f"call_{index}_{number}"))
            out["tool_calls"] = calls
        if role == "tool":
            out["tool_call_id"] = expect(message.get("tool_call_id") or "", str, "a tool result's `tool_call_id`",
                                         where)
            out["name"] = expect(message.get("name") or "", str, "a tool result's `name`", where)
        normalized.append(out)
    if not any(m["role"] == "assistant" for m in normalized):
        raise RecordError("the trace has no assistant message, so no step to learn from")
    check_conversation(normalized)
    return normalized


def check_conversation(messages: list[dict]) -> None:
    """The order a model step's context must have, checked in place on normalised messages.

    After any system messages the user speaks first. Every tool result answers a call of the latest assistant message
    that made calls, by ``tool_call_id``; a result without one answers the first call not yet answered, and gets its
    id and function name filled in. Every call is answered before the next user or assistant message (a trace may
    end on calls: that last step is a call to learn). System messages may stand anywhere (some frameworks add them
    mid-run).
    """
    first = next(index for index, message in enumerate(messages) if message["role"] != "system")
    if messages[first]["role"] != "user":
        raise RecordError(f"message {first} ({messages[first]['role']}) comes before any user message",
                          kind="the conversation does not start with a user message")
    pending: dict[str, dict] = {}  # id -> call of the latest assistant message with calls, not answered yet
    answered: set[str] = set()
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "tool":
            call_id = message["tool_call_id"] or next(iter(pending), "")
            if call_id not in pending:
                if call_id in answered:
                    raise RecordError(f"message {index} answers tool call {call_id!r} a second time",
                                      kind="a tool call answered twice")
                raise RecordError(f"message {index} is a tool result for {call_id or 'no id'!r}, which answers no call "
                                  "of the assistant message before it", kind="a tool result answering no call")
            call = pending.pop(call_id)
            answered.add(call_id)
            message["tool_call_id"] = call_id
            message["name"] = message["name"] or call["function"]["name"]
        elif role in ("user", "assistant") and pending:
            raise RecordError(f"message {index} ({role}) follows tool call(s) {sorted(pending)} without their results",
                              kind="tool calls without results")
        if role == "assistant" and message.get("tool_calls"):
            ids = [call["id"] for call in message["tool_calls"]]
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            if repeated:
                raise RecordError(f"message {index} gives more than one tool call the id {repeated[0]!r}",
                                  kind="duplicated tool call ids")
            pending = {call["id"]: call for call in message["tool_calls"]}
            answered = set()


# ---------------------------------------------------------------------------------------------- format readers
def read_openai(record: dict, record_id: str) -> Trace:
    tools = [normalize_tool(t) for t in expect(record.get("tools") or [], list, "`tools`")]
    source = record.get("source")
    source = source if isinstance(source, str) and source else "unknown"
    return Trace(str(record.get("id", record_id)), validate_messages(record.get("messages")), tools, source)


TOOLS_BLOCK = re.compile(r"<tools>(.*?)</tools>", re.S)
TOOL_CALL_TAG = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
TOOL_RESPONSE_TAG = re.compile(r"<tool_response>(.*?)</tool_response>", re.S)


def parse_loose_json(text: str):
    """JSON, or a Python literal (Hermes data often writes tool calls with single quotes), as JSON values."""
    text = text.strip()
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    unparseable = RecordError(f"cannot parse {text[:80]!r} as JSON", kind="embedded JSON that does not parse")
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # what literal_eval raises on bad input
        raise unparseable from None
    try:  # a Python literal may hold what JSON cannot (sets, bytes, tuple keys); JSON's own form normalises the rest
        return json.loads(json.dumps(value))
    except (TypeError, ValueError, RecursionError):
        raise unparseable from None


def json_objects(text: str) -> list:
    """Every JSON value in ``text`` (tools listed one after another, or as one list)."""
    decoder, values, position = json.JSONDecoder(), [], 0
    while True:
        start = min((i for i in (text.find("{", position), text.find("[", position)) if i >= 0), default=-1)
        if start < 0:
            return values
        try:
            value, position = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            value = parse_loose_json(text[start:])  # raises with a clear reason
            position = len(text)
        values.extend(value if isinstance(value, list) else [value])


def read_sharegpt(record: dict, record_id: str) -> Trace:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordError("`conversations` must be a non-empty list")
    roles = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "function_call": "function_call", "tool": "tool", "function_response": "tool", "observation": "tool"}
    listed = record.get("tools") or []  # LLaMA-Factory keeps the tools beside the turns, as a JSON string
    if isinstance(listed, str):
        listed = parse_loose_json(listed) if listed.strip() else []
    if not isinstance(listed, list):
        raise RecordError("`tools` must be a list of tool schemas (or a JSON string holding one)")
    messages, tools = [], [normalize_tool(t) for t in listed]
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or turn["from"] not in roles \
                or not isinstance(turn.get("value"), str):
            raise RecordError(f"conversation turn {index} needs `from` in {sorted(roles)} and a string `value`",
                              kind="a conversation turn without a known `from` and a string `value`")
        role, value = roles[turn["from"]], turn["value"]
        if role == "system":
            for block in TOOLS_BLOCK.findall(value):
                tools.extend(normalize_tool(t) for t in json_objects(block))
            messages.append({"role": "system", "content": TOOLS_BLOCK.sub("", value).strip()})
        elif role == "assistant":
            calls = []
            for number, raw in enumerate(TOOL_CALL_TAG.findall(value)):
                call = expect(parse_loose_json(raw), dict, "a <tool_call>", f"turn {index}")
                calls.append(tool_call(call.get("name"), call.get("arguments", {}), f"call_{index}_{number}"))
            message = {"role": "assistant", "content": TOOL_CALL_TAG.sub("", value).strip()}
            if calls:
                message["tool_calls"] = calls
            messages.append(message)
        elif role == "function_call":  # LLaMA-Factory: the call (or a list of parallel calls) as JSON
            value = parse_loose_json(value)
            calls = []
            for number, call in enumerate(value if isinstance(value, list) else [value]):
                expect(call, dict, "a function_call", f"turn {index}")
                calls.append(tool_call(call.get("name"), call.get("arguments", {}), f"call_{index}_{number}"))
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif role == "tool":  # tied to the calls they answer, in order, by validate_messages
            messages.extend({"role": "tool", "content": response.strip(), "tool_call_id": "", "name": ""}
                            for response in TOOL_RESPONSE_TAG.findall(value) or [value])
        else:
            messages.append({"role": "user", "content": value})
    return Trace(str(record.get("id", record_id)), validate_messages(messages), tools)


GLAIVE_TURN = re.compile(r"(USER|ASSISTANT|FUNCTION RESPONSE):")
GLAIVE_CALL = re.compile(r"<functioncall>\s*(\{.*\})", re.S)
GLAIVE_ARGUMENTS = re.compile(r"""^\{\s*"name"\s*:\s*"([^"]+)"\s*,\s*"arguments"\s*:\s*'(.*)'\s*\}$""", re.S)


def read_glaive(record: dict, record_id: str) -> Trace:
    system, chat = record.get("system"), record.get("chat")
    if not isinstance(system, str) or not isinstance(chat, str):
        raise RecordError("glaive records need string `system` and `chat` fields")
    system_text = re.sub(r"^\s*SYSTEM:\s*", "", system)
    first_brace = system_text.find("{")
    tools = [normalize_tool(t) for t in json_objects(system_text[first_brace:])] if first_brace >= 0 else []
    prompt = system_text[:first_brace].strip() if first_brace >= 0 else system_text.strip()
    messages = [{"role": "system", "content": prompt}] if prompt else []
    parts = GLAIVE_TURN.split(chat)
    for index in range(1, len(parts) - 1, 2):
        speaker, text = parts[index], parts[index + 1].replace("<|endoftext|>", "").strip()
        if speaker == "USER":
            messages.append({"role": "user", "content": text})
        elif speaker == "ASSISTANT":
            match = GLAIVE_CALL.search(text)
            if match:
                raw = match.group(1).strip()
                quoted = GLAIVE_ARGUMENTS.match(raw)
                if quoted:
                    name, arguments = quoted.group(1), quoted.group(2)
                else:
                    call = expect(parse_loose_json(raw), dict, "a <functioncall>", f"turn {index // 2}")
                    name, arguments = call.get("name"), call.get("arguments", {})
                messages.append({"role": "assistant", "content": text[: match.start()].strip(),
                                 "tool_calls": [tool_call(name, arguments, f"call_{index}")]})
            else:
                messages.append({"role": "assistant", "content": text})
        else:  # tied to the call it answers by validate_messages
            messages.append({"role": "tool", "content": text, "tool_call_id": "", "name": ""})
    return Trace(str(record.get("id", record_id)), validate_messages(messages), tools)


def read_gsm8k(record: dict, record_id: str) -> Trace:
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str) or not question or not answer:
        raise RecordError("gsm8k records need non-empty string `question` and `answer`")
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Trace(str(record.get("id", record_id)), messages, [])


LANGCHAIN_ROLES = {"human": "user", "HumanMessage": "user", "ai": "assistant", "AIMessage": "assistant",
                   "AIMessageChunk": "assistant", "system": "system", "SystemMessage": "system", "tool": "tool",
                   "ToolMessage": "tool", "user": "user", "assistant": "assistant"}


def langchain_message(message) -> dict:
    """An OpenAI-form message from a serialised LangChain message (constructor form, dict form or OpenAI form)."""
    expect(message, dict, "a message")
    if "role" in message:
        return message
    if message.get("lc") == 1 and "kwargs" in message:
        path = expect(message.get("id"), list, "a serialised LangChain message's `id`")
        kind, fields = path[-1] if path else None, expect(message["kwargs"], dict, "a LangChain message's `kwargs`")
    else:
        kind, fields = message.get("type"), expect(message.get("data", message), dict, "a LangChain message's `data`")
    role = LANGCHAIN_ROLES.get(kind) if isinstance(kind, str) else None
    if role is None:
        raise RecordError(f"unknown LangChain message type {kind!r}", kind="unknown LangChain message type")
    out = {"role": role, "content": fields.get("content") or ""}
    if role == "assistant":
        calls = expect(fields.get("tool_calls") or [], list, "a LangChain message's `tool_calls`")
        if calls:
            out["tool_calls"] = [
                {"id": c.get("id"), "function": {"name": c.get("name"), "arguments": c.get("args", {})}}
                if "function" not in c else c
                for c in (expect(c, dict, "a LangChain tool call") for c in calls)
            ]
        else:
            extra = expect(fields.get("additional_kwargs") or {}, dict, "a LangChain message's `additional_kwargs`")
            if extra.get("tool_calls"):
                out["tool_calls"] = extra["tool_calls"]
    if role == "tool":
        out["tool_call_id"], out["name"] = fields.get("tool_call_id", ""), fields.get("name") or ""
    return out


def read_langsmith(record: dict, record_id: str) -> Trace:
    inputs, outputs = record.get("inputs"), record.get("outputs")
    if not isinstance(inputs, dict) or not isinstance(outputs, dict):
        raise RecordError("LangSmith runs need `inputs` and `outputs` objects")
    messages = inputs.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], list):
        messages = messages[0]  # chat model runs store a batch of one
    if not isinstance(messages, list):
        raise RecordError("`inputs.messages` is missing: only chat-model (LLM) runs hold a model step")
    generation = None
    if outputs.get("generations"):
        first = expect(outputs["generations"], list, "`outputs.generations`")[0]
        first = first[0] if isinstance(first, list) and first else first
        expect(first, dict, "a generation")
        generation = first.get("message") or {"role": "assistant", "content": first.get("text", "")}
    elif outputs.get("output") is not None or outputs.get("message") is not None:
        generation = outputs.get("output") if outputs.get("output") is not None else outputs["message"]
    if generation is None:
        raise RecordError("`outputs` holds no generation (expected `generations`, `output` or `message`)")
    converted = [langchain_message(m) for m in messages] + [langchain_message(generation)]
    extra = expect(record.get("extra") or {}, dict, "`extra`")
    invocation = expect(extra.get("invocation_params") or {}, dict, "`extra.invocation_params`")
    tools = expect(invocation.get("tools") or inputs.get("tools") or [], list, "the run's tools")
    return Trace(str(record.get("id", record_id)), validate_messages(converted), [normalize_tool(t) for t in tools])


def read_layerroute(record: dict, record_id: str) -> Trace:
    if "messages" not in record or "output" not in record:
        raise RecordError("this step record has no `messages` / `output`: record it with record_messages=True")
    messages = validate_messages(expect(record["messages"], list, "`messages`") + [record["output"]])
    tools = [normalize_tool(t) for t in expect(record.get("tools") or [], list, "`tools`")]
    return Trace(str(record.get("run_id", record_id)), messages, tools)


READERS: dict[str, Callable[[dict, str], Trace]] = {
    "openai": read_openai,
    "sharegpt": read_sharegpt,
    "glaive": read_glaive,
    "gsm8k": read_gsm8k,
    "langsmith": read_langsmith,
    "layerroute": read_layerroute,
}


def detect_format(record: dict) -> str:
    expect(record, dict, "a record")
    if record.get("record_type") == "layerroute.step":
        return "layerroute"
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "chat" in record and "system" in record:
        return "glaive"
    if "question" in record and "answer" in record:
        return "gsm8k"
    if "inputs" in record and "outputs" in record:
        return "langsmith"
    raise RecordError(f"unrecognised record with keys {sorted(record)[:8]}; pass format= one of {FORMATS}",
                      kind="unrecognised record")


# ---------------------------------------------------------------------------------------------- files
def _raw_lines(path: Path) -> Iterator[tuple[int, bytes | RecordError]]:
    """``(line, bytes)`` of a file, gunzipped when it is gzip (by its magic bytes, whatever its name says). A
    compressed stream that breaks off (a copy cut short, a corrupt block) ends the lines with a :class:`RecordError`
    at the line where the damage starts: what came before is still read."""
    try:
        with path.open("rb") as probe:
            compressed = probe.read(2) == GZIP_MAGIC
        handle = gzip.open(path, "rb") if compressed else path.open("rb")
    except OSError as error:
        raise UserError(f"cannot read agent log {path}: {error.strerror or error}") from None
    number = 0
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                yield number, line
        except (EOFError, OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
            yield number + 1, RecordError(f"the file is truncated or corrupt from here on ({error})",
                                          kind="truncated or corrupt file")


def _decode(line: bytes, number: int) -> str | RecordError:
    if number == 1:
        line = line.removeprefix(codecs.BOM_UTF8)  # editors on Windows write one
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        return RecordError(f"not UTF-8 text (byte 0x{line[error.start]:02x} at column {error.start + 1})",
                           kind="not UTF-8 text")


def _parse(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        return RecordError(f"invalid JSON: {error.msg} at column {error.colno}", kind="invalid JSON")
    except (ValueError, RecursionError) as error:  # an integer past Python's digit limit; nesting past the stack
        return RecordError(f"invalid JSON: {error}", kind="invalid JSON")


BETWEEN_ITEMS = re.compile(r"[\s,]*")


def _document(lines: list[tuple[int, bytes]]) -> list[tuple[int, object]] | None:
    """The records of a whole-file JSON document, each with the line it starts on (a list of records, or one record);
    ``None`` when the file is not one JSON document."""
    text = _decode(b"".join(line for _, line in lines), 1)
    if isinstance(text, RecordError) or isinstance(document := _parse(text), RecordError):
        return None
    if not isinstance(document, list):
        return [(1, document)]
    decoder, records = json.JSONDecoder(), []
    position, line = text.index("[") + 1, 1 + text.count("\n", 0, text.index("["))
    for _ in document:  # parsed once more item by item, only to learn where each one starts
        start = BETWEEN_ITEMS.match(text, position).end()
        line += text.count("\n", position, start)
        value, position = decoder.raw_decode(text, start)
        records.append((line, value))
        line += text.count("\n", start, position)
    return records


def _records(path: Path) -> Iterator[tuple[int, object]]:
    """``(line, record)`` pairs, a :class:`RecordError` in place of a record that cannot be parsed: JSONL line by
    line, or a ``.json`` file's JSON document (a list of records or one record)."""
    lines = _raw_lines(path)
    if path.name.removesuffix(".gz").endswith(".json"):
        lines = list(lines)
        complete = lines and not isinstance(lines[-1][1], RecordError)
        document = _document(lines) if complete else None
        if document is not None:
            yield from document
            return
        # else JSON Lines saved as .json (BFCL does this), or a broken document: read line by line for the line numbers
    for number, line in lines:
        text = line if isinstance(line, RecordError) else _decode(line, number)
        if isinstance(text, RecordError):
            yield number, text
        elif text.strip():
            yield number, _parse(text)


def read_traces(paths, format: str | None = None, on_bad_record: str = "raise") -> ReadResult:
    """Read agent logs (JSON / JSONL, optionally gzipped) into canonical traces.

    Every malformed input (broken compression, bytes that are not UTF-8, invalid JSON, a record of the wrong shape,
    a conversation out of order: see :func:`validate_messages`) is either read or reported as ``file:line: reason``.

    Args:
        paths: a path or a list of paths.
        format: force one of :data:`FORMATS`; default: detected per file from its first record.
        on_bad_record: ``"raise"`` stops at the first unreadable record with file, line and reason;
            ``"skip"`` skips it and records why in :attr:`ReadResult.skipped` (counted by kind of reason with
            :meth:`ReadResult.skipped_summary`).

    Raises:
        BadRecordError: an unreadable record, with ``on_bad_record="raise"``.
        MissingInputError: a path does not exist (a ``FileNotFoundError``).
        UserError: a path cannot be opened (permissions).
    """
    check_options(format, on_bad_record)
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    traces, skipped = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise MissingInputError(f"agent log {path} does not exist" if not path.exists() else
                                    f"agent log {path} is not a file")
        result = _read_records(_records(path), str(path), path.stem, format, on_bad_record, f"{path}:{{}}")
        traces += result.traces
        skipped += result.skipped
    return ReadResult(traces, skipped)


def check_options(format: str | None, on_bad_record: str) -> None:
    if on_bad_record not in ("raise", "skip"):
        raise ValueError(f"on_bad_record must be 'raise' or 'skip', got {on_bad_record!r}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known formats: {', '.join(FORMATS)}")


def _read_records(records, source: str, id_prefix: str, format: str | None, on_bad_record: str,
                  where: str) -> ReadResult:
    """Traces from ``(line, record)`` pairs of one source (a :class:`RecordError` in place of a record that did not
    parse); ``where`` formats the line into the location a bad record is reported at."""
    traces, skipped = [], []
    for line, record in records:
        try:
            if isinstance(record, RecordError):
                raise record
            format = format or detect_format(record)
            try:
                traces.append(READERS[format](expect(record, dict, "a record"), f"{id_prefix}-{line}-{len(traces)}"))
            except RecursionError:  # JSON nested nearly as deep as the parser allows, met again while normalising
                raise RecordError("the record is nested too deeply to read", kind="nested too deeply") from None
        except RecordError as error:
            if on_bad_record == "raise":
                raise BadRecordError(
                    f"{where.format(line)}: {error} (pass on_bad_record='skip' / --on-bad-record skip to skip such "
                    "records)"
                ) from None
            skipped.append(SkippedRecord(source, line, str(error), error.kind))
    return ReadResult(traces, skipped)


HUB_DATASETS = {
    "NousResearch/hermes-function-calling-v1": "sharegpt",
    "glaiveai/glaive-function-calling-v2": "glaive",
    "openai/gsm8k": "gsm8k",
}


def load_hub_traces(name: str, split: str = "train", format: str | None = None, on_bad_record: str = "raise"):
    """Read a public dataset through ``datasets`` (needs a reachable hub)."""
    check_options(format, on_bad_record)
    datasets = require("datasets", "hub", f"reading {name!r} as a Hugging Face Hub dataset (it is not a local file)")

    try:
        dataset = datasets.load_dataset(name, "main", split=split) if name == "openai/gsm8k" else \
            datasets.load_dataset(name, split=split)
    except Exception as error:  # datasets raises many types for an unreachable hub
        raise MissingInputError(
            f"could not load dataset {name!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "On an offline machine export it to JSON / JSONL elsewhere and pass the file."
        ) from error
    return _read_records(enumerate(dataset), name, name, format or HUB_DATASETS.get(name), on_bad_record,
                         f"{name}[{{}}]")


def read_sources(sources, format: str | None = None, on_bad_record: str = "raise") -> ReadResult:
    """Files and public dataset names, mixed: a source that is not an existing path is read as a dataset name."""
    traces, skipped = [], []
    for source in [sources] if isinstance(sources, (str, Path)) else sources:
        if Path(source).exists() or str(source).endswith((".json", ".jsonl", ".gz")):
            result = read_traces([source], format, on_bad_record)
        else:
            result = load_hub_traces(str(source), format=format, on_bad_record=on_bad_record)
        traces += result.traces
        skipped += result.skipped
    return ReadResult(traces, skipped)
