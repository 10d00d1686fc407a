"""Agent logs in, canonical traces out.

Every reader turns one record of a log format into a :class:`Trace` in the canonical OpenAI chat-completions form
of DESIGN.md: ``{"id", "source", "tools": [...], "messages": [...]}``, assistant messages carrying ``tool_calls``
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
import gzip
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("openai", "sharegpt", "glaive", "gsm8k", "langsmith", "layerroute")
ROLES = ("system", "user", "assistant", "tool")


class RecordError(ValueError):
    """A record that cannot be read; the message says why."""


class BadRecordError(ValueError):
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
    source: str
    line: int
    reason: str


@dataclass
class ReadResult:
    traces: list[Trace]
    skipped: list[SkippedRecord]

    def skipped_summary(self) -> dict[str, int]:
        """How many records were skipped, by reason."""
        return dict(Counter(record.reason for record in self.skipped))


# ---------------------------------------------------------------------------------------------- canonical checks
def tool_call(name: str, arguments, call_id: str) -> dict:
    if not isinstance(name, str) or not name:
        raise RecordError("tool call without a function name")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise RecordError(f"arguments of tool call {name!r} are not valid JSON: {error}") from None
    if not isinstance(arguments, dict):
        raise RecordError(f"arguments of tool call {name!r} must be a JSON object, got {type(arguments).__name__}")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def normalize_tool(tool) -> dict:
    """A tool schema in OpenAI form: ``{"type": "function", "function": {"name", "description", "parameters"}}``."""
    if not isinstance(tool, dict):
        raise RecordError(f"a tool schema must be an object, got {type(tool).__name__}")
    function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RecordError("a tool schema has no function name")
    return {"type": "function", "function": function}


def validate_messages(messages) -> list[dict]:
    """Check and normalise canonical messages (arguments as JSON strings, ids on every tool call)."""
    if not isinstance(messages, list) or not messages:
        raise RecordError("`messages` must be a non-empty list")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(f"message {index} is not an object")
        role = message.get("role")
        if role not in ROLES:
            raise RecordError(f"message {index} has role {role!r}; expected one of {ROLES}")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if content is not None and not isinstance(content, str):
            raise RecordError(f"message {index} content must be a string")
        out = {"role": role, "content": content or ""}
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for number, call in enumerate(message["tool_calls"]):
                function = call.get("function", call) if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    raise RecordError(f"message {index} tool call {number} is not an object")
                arguments = function.get("arguments", function.get("args", {}))
                calls.append(tool_call(function.get("name"), arguments, call.get("id") or f"call_{index}_{number}"))
            out["tool_calls"] = calls
        if role == "tool":
            out["tool_call_id"] = message.get("tool_call_id") or ""
            out["name"] = message.get("name") or ""
        normalized.append(out)
    if not any(m["role"] == "assistant" for m in normalized):
        raise RecordError("the trace has no assistant message, so no step to learn from")
    return normalized


# ---------------------------------------------------------------------------------------------- format readers
def read_openai(record: dict, record_id: str) -> Trace:
    tools = [normalize_tool(t) for t in record.get("tools") or []]
    source = record.get("source")
    source = source if isinstance(source, str) and source else "unknown"
    return Trace(str(record.get("id", record_id)), validate_messages(record.get("messages")), tools, source)


TOOLS_BLOCK = re.compile(r"<tools>(.*?)</tools>", re.S)
TOOL_CALL_TAG = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
TOOL_RESPONSE_TAG = re.compile(r"<tool_response>(.*?)</tool_response>", re.S)


def parse_loose_json(text: str):
    """JSON, or a Python literal (Hermes data often writes tool calls with single quotes)."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise RecordError(f"cannot parse {text[:80]!r} as JSON") from None


def json_objects(text: str) -> list:
    """Every JSON value in ``text`` (tools listed one after another, or as one list)."""
    decoder, values, position = json.JSONDecoder(), [], 0
    while True:
        start = min((i for i in (text.find("{", position), text.find("[", position)) if i >= 0), default=-1)
        if start < 0:
            return values
        try:
            value, position = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
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
    messages, tools, pending_calls = [], [normalize_tool(t) for t in listed], []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in roles or not isinstance(turn.get("value"), str):
            raise RecordError(f"conversation turn {index} needs `from` in {sorted(roles)} and a string `value`")
        role, value = roles[turn["from"]], turn["value"]
        if role == "system":
            for block in TOOLS_BLOCK.findall(value):
                tools.extend(normalize_tool(t) for t in json_objects(block))
            messages.append({"role": "system", "content": TOOLS_BLOCK.sub("", value).strip()})
        elif role == "assistant":
            calls = []
            for number, raw in enumerate(TOOL_CALL_TAG.findall(value)):
                call = parse_loose_json(raw)
                if not isinstance(call, dict):
                    raise RecordError(f"turn {index}: a <tool_call> must hold an object")
                calls.append(tool_call(call.get("name"), call.get("arguments", {}), f"call_{index}_{number}"))
            message = {"role": "assistant", "content": TOOL_CALL_TAG.sub("", value).strip()}
            if calls:
                message["tool_calls"] = calls
            pending_calls = list(calls)
            messages.append(message)
        elif role == "function_call":  # LLaMA-Factory: the call (or a list of parallel calls) as JSON
            value = parse_loose_json(value)
            calls = []
            for number, call in enumerate(value if isinstance(value, list) else [value]):
                if not isinstance(call, dict):
                    raise RecordError(f"turn {index}: a function_call must hold an object or a list of objects")
                calls.append(tool_call(call.get("name"), call.get("arguments", {}), f"call_{index}_{number}"))
            pending_calls = list(calls)
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif role == "tool":
            responses = TOOL_RESPONSE_TAG.findall(value) or [value]
            for response in responses:
                call = pending_calls.pop(0) if pending_calls else None
                name = call["function"]["name"] if call else ""
                if not name:  # no call to answer: Hermes responses may name the function themselves
                    try:
                        name = (json.loads(response) or {}).get("name", "") if response.strip().startswith("{") else ""
                    except (json.JSONDecodeError, AttributeError):
                        name = ""
                messages.append({
                    "role": "tool",
                    "content": response.strip(),
                    "tool_call_id": call["id"] if call else "",
                    "name": name if isinstance(name, str) else "",
                })
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
    last_call = None
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
                    call = parse_loose_json(raw)
                    name, arguments = call.get("name"), call.get("arguments", {})
                last_call = tool_call(name, arguments, f"call_{index}")
                messages.append({"role": "assistant", "content": text[: match.start()].strip(),
                                 "tool_calls": [last_call]})
            else:
                messages.append({"role": "assistant", "content": text})
        else:
            messages.append({
                "role": "tool",
                "content": text,
                "tool_call_id": last_call["id"] if last_call else "",
                "name": last_call["function"]["name"] if last_call else "",
            })
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
    if not isinstance(message, dict):
        raise RecordError(f"a message must be an object, got {type(message).__name__}")
    if "role" in message:
        return message
    if message.get("lc") == 1 and "kwargs" in message:
        kind, fields = message["id"][-1], message["kwargs"]
    else:
        kind, fields = message.get("type"), message.get("data", message)
    role = LANGCHAIN_ROLES.get(kind)
    if role is None:
        raise RecordError(f"unknown LangChain message type {kind!r}")
    out = {"role": role, "content": fields.get("content") or ""}
    if role == "assistant":
        calls = fields.get("tool_calls") or []
        if calls:
            out["tool_calls"] = [
                {"id": c.get("id") or f"call_{i}", "function": {"name": c.get("name"), "arguments": c.get("args", {})}}
                if "function" not in c else c
                for i, c in enumerate(calls)
            ]
        elif fields.get("additional_kwargs", {}).get("tool_calls"):
            out["tool_calls"] = fields["additional_kwargs"]["tool_calls"]
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
        first = outputs["generations"][0]
        first = first[0] if isinstance(first, list) else first
        generation = first.get("message") or {"role": "assistant", "content": first.get("text", "")}
    elif outputs.get("output") is not None or outputs.get("message") is not None:
        generation = outputs.get("output") if outputs.get("output") is not None else outputs["message"]
    if generation is None:
        raise RecordError("`outputs` holds no generation (expected `generations`, `output` or `message`)")
    converted = [langchain_message(m) for m in messages] + [langchain_message(generation)]
    invocation = (record.get("extra") or {}).get("invocation_params") or {}
    tools = [normalize_tool(t) for t in invocation.get("tools") or inputs.get("tools") or []]
    return Trace(str(record.get("id", record_id)), validate_messages(converted), tools)


def read_layerroute(record: dict, record_id: str) -> Trace:
    if "messages" not in record or "output" not in record:
        raise RecordError("this step record has no `messages` / `output`: record it with record_messages=True")
    messages = validate_messages(list(record["messages"]) + [record["output"]])
    tools = [normalize_tool(t) for t in record.get("tools") or []]
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
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
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
    raise RecordError(f"unrecognised record with keys {sorted(record)[:8]}; pass format= one of {FORMATS}")


# ---------------------------------------------------------------------------------------------- files
def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _records(path: Path) -> Iterator[tuple[int, object]]:
    """``(line, record)`` pairs: JSONL line by line, or a JSON document (a list of records or one record)."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    with _open_text(path) as handle:
        if name.endswith(".json"):
            text = handle.read()
            try:
                document = json.loads(text)
            except json.JSONDecodeError:
                document = None  # JSON Lines saved as .json (BFCL does this)
            if document is not None:
                yield from ((1, r) for r in (document if isinstance(document, list) else [document]))
                return
            lines = text.splitlines()
        else:
            lines = handle
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line.strip())
                except json.JSONDecodeError as error:
                    yield number, RecordError(f"invalid JSON: {error.msg} at column {error.colno}")


def read_traces(paths, format: str | None = None, on_bad_record: str = "raise") -> ReadResult:
    """Read agent logs (JSON / JSONL, optionally gzipped) into canonical traces.

    Args:
        paths: a path or a list of paths.
        format: force one of :data:`FORMATS`; default: detected per file from its first record.
        on_bad_record: ``"raise"`` stops at the first unreadable record with file, line and reason;
            ``"skip"`` skips it and records why in :attr:`ReadResult.skipped`.

    Raises:
        BadRecordError: an unreadable record, with ``on_bad_record="raise"``.
        FileNotFoundError: a path does not exist.
    """
    if on_bad_record not in ("raise", "skip"):
        raise ValueError(f"on_bad_record must be 'raise' or 'skip', got {on_bad_record!r}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known formats: {', '.join(FORMATS)}")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    traces, skipped = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"agent log {path} does not exist")
        file_format = format
        for line, record in _records(path):
            try:
                if isinstance(record, RecordError):
                    raise record
                file_format = file_format or detect_format(record)
                traces.append(READERS[file_format](record, f"{path.stem}-{line}-{len(traces)}"))
            except RecordError as error:
                if on_bad_record == "raise":
                    raise BadRecordError(
                        f"{path}:{line}: {error} (pass on_bad_record='skip' / --on-bad-record skip to skip such "
                        "records)"
                    ) from None
                skipped.append(SkippedRecord(str(path), line, str(error)))
    return ReadResult(traces, skipped)


HUB_DATASETS = {
    "NousResearch/hermes-function-calling-v1": "sharegpt",
    "glaiveai/glaive-function-calling-v2": "glaive",
    "openai/gsm8k": "gsm8k",
}


def load_hub_traces(name: str, split: str = "train", format: str | None = None, on_bad_record: str = "raise"):
    """Read a public dataset through ``datasets`` (needs a reachable hub)."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, "main", split=split) if name == "openai/gsm8k" else \
            datasets.load_dataset(name, split=split)
    except Exception as error:  # datasets raises many types for an unreachable hub
        raise OSError(
            f"could not load dataset {name!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "On an offline machine export it to JSON / JSONL elsewhere and pass the file."
        ) from error
    file_format = format or HUB_DATASETS.get(name)
    traces, skipped = [], []
    for index, record in enumerate(dataset):
        try:
            traces.append(READERS[file_format or detect_format(record)](record, f"{name}-{index}"))
        except RecordError as error:
            if on_bad_record == "raise":
                raise BadRecordError(f"{name}[{index}]: {error}") from None
            skipped.append(SkippedRecord(name, index, str(error)))
    return ReadResult(traces, skipped)


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
