"""Property-based tests of the agent-log readers: whatever the bytes, a log is read or its bad records are reported.

Mutated real records (the fixtures of every format and lines of the embedded corpus, with values replaced, deleted,
duplicated and reordered, text fields spliced with the markup the readers parse) and random bytes go through every
reader, as JSONL, as a JSON document, gzipped and gzipped then cut short. The only outcomes allowed:

- ``on_bad_record="raise"``: traces, or a :class:`BadRecordError` that starts ``file:line:``;
- ``on_bad_record="skip"``: traces plus skipped records, each with its line and kind of reason, the first of them
  where ``raise`` stopped; in a JSONL file every non-blank line is a trace or a skipped record (nothing lost).

Whatever is read renders as a model step's context (tool signatures included), so a bad shape cannot slip through to
tokenisation. The step-cost records behind ``layerroute report`` get the same treatment: read and rendered (Markdown
and HTML), or a :class:`BadRecordError` at ``file:line``.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerroute.costs import CostReport, read_records
from layerroute.steps import hermes_messages, tool_signature, trace_steps
from layerroute.traces import FORMATS, GZIP_MAGIC, BadRecordError, read_traces

ROOT = Path(__file__).parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def seed_records() -> list:
    records = []
    for path in sorted(FIXTURES.iterdir()):
        if path.suffix == ".json":
            records += json.loads(path.read_text())
        else:
            records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()
                        and not line.startswith('{"id": "bad-json"')]
    with gzip.open(ROOT / "training" / "data" / "corpus" / "validation.jsonl.gz", "rt") as handle:
        corpus = [json.loads(line) for line in handle]
    for source in sorted({record["source"] for record in corpus}):  # a few traces of every source
        records += [record for record in corpus if record["source"] == source][:2]
    return records


SEEDS = seed_records()
# Text the readers look for, so that spliced strings reach their parsers rather than only their type checks.
MARKUP = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>",
          "<functioncall>", "USER:", "ASSISTANT:", "FUNCTION RESPONSE:", "SYSTEM:", "{", "}", "[", "]", "'", '"',
          ":", ",", "\\", "{'name': 'f', 'arguments': {}}", '{"name": "f", "arguments": "{}"}', "\n", "\x00", "\ufeff"]
VALUES = ["user", "assistant", "tool", "system", "function_call", "observation", "human", "gpt", "c1", "call_0",
          "function", "layerroute.step", "constructor", ""]

json_leaves = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
               | st.sampled_from(VALUES) | st.text(max_size=12))
json_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(VALUES) | st.text(max_size=6), inner, max_size=4),
                           max_leaves=8)


def paths(value, prefix=()):
    """Every path into a JSON value, the root included."""
    yield prefix
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from paths(child, prefix + (key,))


def at(value, path):
    for key in path:
        value = value[key]
    return value


COST_RECORDS = [json.loads(line) for line in (ROOT / "docs" / "cost-report-records.jsonl").read_text().splitlines()]


@st.composite
def mutated_records(draw, seeds=SEEDS):
    record = copy.deepcopy(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(list(paths(record))))
        target = at(record, path)
        operation = draw(st.sampled_from(["replace", "delete", "duplicate", "swap", "splice"]))
        if operation == "replace":
            if not path:
                record = draw(json_values)
                continue
            at(record, path[:-1])[path[-1]] = draw(json_values)
        elif operation == "delete" and path:
            del at(record, path[:-1])[path[-1]]
        elif operation in ("duplicate", "swap") and isinstance(target, list) and target:
            i, j = draw(st.integers(0, len(target) - 1)), draw(st.integers(0, len(target) - 1))
            if operation == "duplicate":
                target.insert(j, copy.deepcopy(target[i]))
            else:
                target[i], target[j] = target[j], target[i]
        elif operation == "splice" and isinstance(target, str) and path:
            cut = draw(st.integers(0, len(target)))
            insert = draw(st.sampled_from(MARKUP) | st.text(max_size=4))
            at(record, path[:-1])[path[-1]] = target[:cut] + insert + target[cut + draw(st.integers(0, 3)):]
    return record


@st.composite
def log_bytes(draw, seeds=SEEDS) -> bytes:
    """JSONL lines of mutated records, with now and then a line of random bytes or a byte flipped."""
    lines = [json.dumps(draw(mutated_records(seeds)), ensure_ascii=draw(st.booleans())).encode()
             for _ in range(draw(st.integers(1, 4)))]
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.binary(max_size=40)))
    data = b"\n".join(lines) + b"\n"
    if draw(st.booleans()):
        position = draw(st.integers(0, len(data) - 1))
        data = data[:position] + bytes([draw(st.integers(0, 255))]) + data[position + 1:]
    return data


def expected_records(data: bytes) -> int:
    """Non-blank lines of a JSONL file, as the readers split them (undecodable lines are never blank)."""
    count = 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            text = (line.removeprefix(b"\xef\xbb\xbf") if number == 1 else line).decode("utf-8")
        except UnicodeDecodeError:
            count += 1
            continue
        count += bool(text.strip())
    return count


def write(directory: Path, data: bytes, container: str, cut: float) -> Path:
    if container == "jsonl":
        path, content = directory / "log.jsonl", data
    elif container == "json":  # the same records as one JSON document where they parse, else JSON Lines
        path, content = directory / "log.json", data
        try:
            content = json.dumps([json.loads(line) for line in data.splitlines() if line.strip()]).encode()
        except ValueError:
            pass
    else:
        path, content = directory / "log.jsonl.gz", gzip.compress(data, mtime=0)
        if container == "gzip, cut short":
            content = content[: max(1, int(len(content) * cut))]
    path.write_bytes(content)
    return path


def check_reads(path: Path, data: bytes, container: str, format: str | None) -> None:
    try:
        first = read_traces(path, format=format).traces
        stopped_at = None
    except BadRecordError as error:
        match = re.match(rf"{re.escape(str(path))}:(\d+): \S", str(error))
        assert match, f"no file:line in {error}"
        first, stopped_at = None, int(match.group(1))
    result = read_traces(path, format=format, on_bad_record="skip")
    for skipped in result.skipped:
        assert skipped.source == str(path) and skipped.line >= 1 and skipped.reason and skipped.kind
    if stopped_at is None:
        assert not result.skipped and len(result.traces) == len(first)
    else:
        assert result.skipped and result.skipped[0].line == stopped_at
    assert sum(result.skipped_summary().values()) == len(result.skipped)
    if container in ("jsonl", "gzip") and not data.startswith(GZIP_MAGIC):  # else read as gzip, whatever its name
        assert len(result.traces) + len(result.skipped) == expected_records(data)
    for trace in result.traces:
        json.dumps(trace.to_dict())
        for step in trace_steps(trace):
            hermes_messages(step.context + [step.target], step.tools)
            for tool in step.tools:
                tool_signature(tool)


CONTAINERS = st.sampled_from(["jsonl", "json", "gzip", "gzip, cut short"])
FUZZ = settings(max_examples=150, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(data=log_bytes(), container=CONTAINERS, cut=st.floats(0.05, 0.95),
       format=st.sampled_from((None,) + FORMATS))
def test_mutated_real_records_are_read_or_reported(tmp_path, data, container, cut, format):
    check_reads(write(tmp_path, data, container, cut), data, container, format)


@FUZZ
@given(data=st.binary(max_size=300), container=CONTAINERS, cut=st.floats(0.05, 0.95),
       format=st.sampled_from((None,) + FORMATS))
def test_random_bytes_are_read_or_reported(tmp_path, data, container, cut, format):
    check_reads(write(tmp_path, data, container, cut), data, container, format)


@FUZZ
@given(data=log_bytes(COST_RECORDS) | st.binary(max_size=300))
def test_step_cost_records_are_read_and_rendered_or_reported(tmp_path, data):
    path = tmp_path / "records.jsonl"
    path.write_bytes(data)
    try:
        records = read_records(path)
    except BadRecordError as error:
        assert re.match(rf"{re.escape(str(path))}:\d+: not a LayerRoute step-cost record \(", str(error)), error
        return
    if records:
        report = CostReport.from_records(records)
        report.to_markdown()
        report.to_html()
