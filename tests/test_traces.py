"""Readers for every supported agent-log format, step typing and rendering, and bad-record handling."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from layerroute.cli import main as cli_main
from layerroute.steps import count_steps, hermes_messages, tokenize_step, trace_steps
from layerroute.traces import BadRecordError, read_traces

FIXTURES = Path(__file__).parent / "fixtures"


def only_trace(name: str):
    result = read_traces(FIXTURES / name)
    assert not result.skipped
    return result.traces


def test_openai_format_keeps_parallel_calls_and_tool_results():
    first, second = only_trace("openai.jsonl")
    assert first.id == "t1" and first.tools[0]["function"]["name"] == "get_weather"
    call_step, answer_step = trace_steps(first)
    assert call_step.step_type == "tool_call" and answer_step.step_type == "planning"
    assert [json.loads(c["function"]["arguments"]) for c in call_step.target["tool_calls"]] == [
        {"city": "Paris"},
        {"city": "Rome"},
    ]
    assert [m["role"] for m in answer_step.context] == ["system", "user", "assistant", "tool", "tool"]
    assert count_steps([first, second]) == {"tool_call": 1, "planning": 2}


def test_hermes_sharegpt_with_single_quoted_calls():
    (trace,) = only_trace("hermes.json")
    assert trace.tools[0]["function"]["name"] == "get_stock_price"
    assert "<tools>" not in trace.messages[0]["content"]
    call = trace.messages[2]["tool_calls"][0]
    assert call["function"]["name"] == "get_stock_price"
    assert json.loads(call["function"]["arguments"]) == {"symbol": "AAPL"}
    tool = trace.messages[3]
    assert tool["role"] == "tool" and tool["tool_call_id"] == call["id"] and tool["name"] == "get_stock_price"


def test_glaive_function_calling_v2():
    (trace,) = only_trace("glaive.jsonl")
    assert trace.tools[0]["function"]["name"] == "calculate_bmi"
    assert [m["role"] for m in trace.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert json.loads(trace.messages[2]["tool_calls"][0]["function"]["arguments"]) == {"weight": 70, "height": 1.75}
    assert trace.messages[4]["content"] == "Your BMI is 22.86, which is in the healthy range."


def test_gsm8k_records_are_one_planning_step_each():
    traces = only_trace("gsm8k.jsonl")
    assert count_steps(traces) == {"tool_call": 0, "planning": 2}
    assert trace_steps(traces[0])[0].target["content"].endswith("#### 7")


def test_langsmith_run_export():
    (trace,) = only_trace("langsmith.jsonl")
    assert trace.id == "run-1"
    assert [m["role"] for m in trace.messages] == ["system", "user", "assistant"]
    assert trace.messages[2]["tool_calls"][0]["function"]["name"] == "search"
    assert trace.tools[0]["function"]["name"] == "search"


def test_layerroute_callback_records():
    (trace,) = only_trace("layerroute_steps.jsonl")
    assert trace.messages[-1] == {"role": "assistant", "content": "First gather data, then decide."}


def test_bad_record_stops_with_file_line_and_reason():
    with pytest.raises(BadRecordError, match=r"malformed\.jsonl:2: invalid JSON"):
        read_traces(FIXTURES / "malformed.jsonl")


def test_bad_records_can_be_skipped_and_are_all_reported():
    result = read_traces(FIXTURES / "malformed.jsonl", on_bad_record="skip")
    assert [t.id for t in result.traces] == ["ok"]
    assert [record.line for record in result.skipped] == [2, 3, 4, 5]
    reasons = " | ".join(record.reason for record in result.skipped)
    assert "role 'robot'" in reasons and "not valid JSON" in reasons and "no assistant message" in reasons


def test_unrecognised_record_and_forced_format(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(BadRecordError, match=r"odd\.jsonl:1: unrecognised record"):
        read_traces(path)
    with pytest.raises(BadRecordError, match="need non-empty string `question`"):
        read_traces(path, format="gsm8k")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_traces(tmp_path / "nope.jsonl")


def test_cli_counts_steps(capsys):
    assert cli_main(["steps", str(FIXTURES / "openai.jsonl"), str(FIXTURES / "glaive.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "traces": 3,
        "steps": {"tool_call": 2, "planning": 3},
        "skipped_records": 0,
    }
    assert cli_main(["steps", str(FIXTURES / "malformed.jsonl")]) == 2
    assert "malformed.jsonl:2" in capsys.readouterr().err
    assert cli_main(["steps", "--on-bad-record", "skip", str(FIXTURES / "malformed.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_records"] == 4


def test_hermes_fallback_rendering_puts_tools_in_the_system_prompt():
    (trace,) = only_trace("glaive.jsonl")
    rendered = hermes_messages(trace.messages, trace.tools)
    assert rendered[0]["role"] == "system" and "<tools>" in rendered[0]["content"]
    assert rendered[2]["content"].startswith("<tool_call>\n{\"name\": \"calculate_bmi\"")
    assert rendered[3] == {"role": "user", "content": '<tool_response>\n{"bmi": 22.86}\n</tool_response>'}


@pytest.mark.slow
def test_tokenized_step_targets_and_left_truncation_on_smollm2(smollm2):
    _, tokenizer = smollm2
    (trace, _) = only_trace("openai.jsonl")
    call_step, answer_step = trace_steps(trace)
    tokenized = tokenize_step(call_step, tokenizer)
    assert tokenizer.decode(tokenized.target_ids).startswith('<tool_call>\n{"name": "get_weather"')
    assert tokenizer.decode(tokenized.target_ids).endswith("<|im_end|>")
    assert tokenizer.decode(tokenized.context_ids).endswith("<|im_start|>assistant\n")
    full = tokenize_step(answer_step, tokenizer)
    budget = len(full.context_ids) - 20
    cut = tokenize_step(answer_step, tokenizer, max_context_tokens=budget)
    assert len(cut.context_ids) == budget
    assert cut.context_ids[-(budget - 200):] == full.context_ids[-(budget - 200):]
    assert "get_weather" in tokenizer.decode(cut.context_ids[:200])  # tool schemas kept
    with pytest.raises(ValueError, match="system prompt and tool schemas alone"):
        tokenize_step(answer_step, tokenizer, max_context_tokens=50)


def test_qwen_style_templates_render_tools_natively():
    from layerroute.steps import supports_tools

    class Template:
        chat_template = "{% if tools %}...{% endif %}{% for m in messages %}{{ m.tool_calls }}{% endfor %}"

    assert supports_tools(Template())


def test_embedded_corpus_has_enough_real_steps_of_both_types():
    corpus = Path(__file__).parents[1] / "training" / "data" / "corpus"
    result = read_traces(sorted(corpus.glob("*.jsonl.gz")))
    counts = count_steps(result.traces)
    assert counts["tool_call"] >= 2500 and counts["planning"] >= 1400
    assert sum(p.stat().st_size for p in corpus.iterdir()) <= 10 * 2**20
    multi_call = [t for t in result.traces if sum(bool(m.get("tool_calls")) for m in t.messages) > 1]
    assert len(multi_call) >= 100
    planning_with_tools = [t for t in result.traces if t.tools and not any(m.get("tool_calls") for m in t.messages)]
    assert len(planning_with_tools) >= 1000  # tools sit in planning contexts too
    splits = {p.name.split(".")[0]: {t.id for t in read_traces(p).traces} for p in corpus.glob("*.jsonl.gz")}
    assert not (splits["train"] & splits["test"]) and not (splits["train"] & splits["validation"])


def test_public_dataset_name_without_a_hub_fails_clearly():
    from layerroute.traces import read_sources

    with pytest.raises(OSError, match="could not load dataset 'glaiveai/glaive-function-calling-v2'.*offline"):
        read_sources(["glaiveai/glaive-function-calling-v2"])


class CharTokenizer:
    """A template-less tokenizer (one id per character), enough to run tokenize_step without a model."""

    chat_template = ""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=[ord(c) for c in text])


def test_trace_source_is_kept_through_steps_and_tokenized_steps(tmp_path):
    (first, _) = only_trace("openai.jsonl")
    record = {**first.to_dict(), "source": "complexfuncbench"}
    path = tmp_path / "with_source.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (trace,) = read_traces(path).traces
    assert trace.source == "complexfuncbench"
    assert trace.to_dict()["source"] == "complexfuncbench"
    steps = trace_steps(trace)
    assert [s.source for s in steps] == ["complexfuncbench", "complexfuncbench"]
    assert tokenize_step(steps[1], CharTokenizer()).source == "complexfuncbench"


def test_missing_source_becomes_unknown(tmp_path):
    from layerroute.steps import TokenizedStep

    traces = only_trace("openai.jsonl") + only_trace("glaive.jsonl")  # neither file names a source
    assert {t.source for t in traces} == {"unknown"}
    assert all(t.to_dict()["source"] == "unknown" for t in traces)
    path = tmp_path / "odd_sources.jsonl"
    path.write_text("".join(json.dumps({**traces[0].to_dict(), "id": str(i), "source": value}) + "\n"
                            for i, value in enumerate([None, "", 7])))
    result = read_traces(path)
    assert [t.source for t in result.traces] == ["unknown"] * 3  # never dropped, never an error
    assert {s.source for s in trace_steps(traces[0])} == {"unknown"}
    assert TokenizedStep([1], [2], "planning", "t").source == "unknown"  # older constructors keep working


def test_llamafactory_sharegpt_function_call_and_observation(tmp_path):
    record = {
        "conversations": [
            {"from": "human", "value": "Find me a pasta recipe."},
            {"from": "function_call", "value": '{"name": "search_recipes", "arguments": {"query": "pasta"}}'},
            {"from": "observation", "value": '{"name": "Pasta al pomodoro", "minutes": 20}'},
            {"from": "gpt", "value": "Try pasta al pomodoro: 20 minutes."},
        ],
        "tools": '[{"name": "search_recipes", "description": "Search recipes", "parameters": {"type": "object", '
                 '"properties": {"query": {"type": "string"}}, "required": ["query"]}}]',
    }
    path = tmp_path / "llamafactory.json"
    path.write_text(json.dumps([record]))
    (trace,) = read_traces(path).traces
    assert trace.tools[0]["function"]["name"] == "search_recipes"
    assert [m["role"] for m in trace.messages] == ["user", "assistant", "tool", "assistant"]
    call = trace.messages[1]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"query": "pasta"}
    tool = trace.messages[2]
    assert tool["tool_call_id"] == call["id"] and tool["name"] == "search_recipes"  # not the result's "name"
    assert [s.step_type for s in trace_steps(trace)] == ["tool_call", "planning"]


# ---------------------------------------------------------------------------------------------- malformed input
def write_trace(tmp_path, messages, name="log.jsonl"):
    path = tmp_path / name
    path.write_text(json.dumps({"id": "t", "messages": messages}) + "\n")
    return path


USER = {"role": "user", "content": "Weather in Paris and Rome?"}
CALLS = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"id": "c2", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}
ANSWER = {"role": "assistant", "content": "21 C and 25 C."}


def result(call_id=None, name=None):
    return {"role": "tool", "content": "{}", **({"tool_call_id": call_id} if call_id else {}),
            **({"name": name} if name else {})}


@pytest.mark.parametrize("messages, reason", [
    ([USER, CALLS, result("c1"), result("c9"), ANSWER], r"message 3 is a tool result for 'c9', which answers no call"),
    ([USER, result("c1"), ANSWER], r"message 1 is a tool result for 'c1', which answers no call"),
    ([USER, ANSWER, result(), ANSWER], r"message 2 is a tool result for 'no id', which answers no call"),
    ([USER, CALLS, result("c1"), result("c1"), ANSWER], r"message 3 answers tool call 'c1' a second time"),
    ([USER, {**CALLS, "tool_calls": [CALLS["tool_calls"][0]] * 2}],
     r"message 1 gives more than one tool call the id 'c1'"),
    ([USER, CALLS, result("c1"), USER, ANSWER], r"message 3 \(user\) follows tool call\(s\) \['c2'\] without"),
    ([USER, CALLS, ANSWER], r"message 2 \(assistant\) follows tool call\(s\) \['c1', 'c2'\] without"),
    ([{"role": "system", "content": "s"}, ANSWER, USER, ANSWER], r"message 1 \(assistant\) comes before any user"),
    ([result("c1"), USER, ANSWER], r"message 0 \(tool\) comes before any user message"),
])
def test_conversations_out_of_order_are_reported_with_file_and_line(tmp_path, messages, reason):
    path = write_trace(tmp_path, messages)
    with pytest.raises(BadRecordError, match=rf"log\.jsonl:1: {reason}"):
        read_traces(path)


def test_results_without_ids_answer_the_calls_in_order_and_a_trace_may_end_on_calls(tmp_path):
    path = write_trace(tmp_path, [USER, CALLS, result(), result(), ANSWER, USER, CALLS])
    (trace,) = read_traces(path).traces
    assert [(m["tool_call_id"], m["name"]) for m in trace.messages if m["role"] == "tool"] == [
        ("c1", "get_weather"), ("c2", "get_weather")]
    assert [s.step_type for s in trace_steps(trace)] == ["tool_call", "planning", "tool_call"]


def test_skipped_records_are_counted_by_kind_of_reason(tmp_path):
    path = tmp_path / "log.jsonl"
    good = {"id": "ok", "messages": [USER, ANSWER]}
    path.write_text("\n".join([json.dumps(good), json.dumps({"messages": [USER, result("a"), ANSWER]}),
                               json.dumps({"messages": [USER, result("b"), ANSWER]}), "{oops", ""]))
    result_ = read_traces(path, on_bad_record="skip")
    assert [t.id for t in result_.traces] == ["ok"]
    assert result_.skipped_summary() == {"a tool result answering no call": 2, "invalid JSON": 1}
    assert (result_.skipped[0].line, result_.skipped[0].kind) == (2, "a tool result answering no call")
    assert "'a'" in result_.skipped[0].reason and "'b'" in result_.skipped[1].reason  # particulars kept per record


def test_a_truncated_gzip_log_keeps_what_came_before_and_names_the_line(tmp_path):
    records = [json.dumps({"id": str(i), "messages": [USER, ANSWER]}) for i in range(2000)]
    data = gzip.compress(("\n".join(records) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadRecordError, match=r"cut\.jsonl\.gz:\d+: the file is truncated or corrupt from here on"):
        read_traces(path)
    read = read_traces(path, on_bad_record="skip")
    assert 0 < len(read.traces) < 2000 and [t.id for t in read.traces] == [str(i) for i in range(len(read.traces))]
    assert read.skipped_summary() == {"truncated or corrupt file": 1}
    assert read.skipped[0].line == len(read.traces) + 1


def test_binary_and_misencoded_logs_name_file_line_and_byte(tmp_path):
    path = tmp_path / "log.jsonl"
    good = json.dumps({"id": "ok", "messages": [USER, ANSWER]}).encode()
    path.write_bytes(good + b"\n" + "caf\u00e9".encode("latin-1") + b"\n" + good + b"\n")
    with pytest.raises(BadRecordError, match=r"log\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 4\)"):
        read_traces(path)
    assert len(read_traces(path, on_bad_record="skip").traces) == 2


def test_a_byte_order_mark_and_gzip_under_any_name_are_read(tmp_path):
    record = json.dumps({"id": "ok", "messages": [USER, ANSWER]})
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + record.encode() + b"\n")
    zipped = tmp_path / "zipped.jsonl"  # compressed, though its name does not say so
    zipped.write_bytes(gzip.compress(record.encode()))
    assert [len(read_traces(p).traces) for p in (bom, zipped)] == [1, 1]


def test_records_of_a_json_document_are_reported_at_the_line_they_start_on(tmp_path):
    path = tmp_path / "log.json"
    good = {"id": "ok", "messages": [USER, ANSWER]}
    path.write_text(json.dumps([good, good, {"id": "bad", "messages": []}], indent=2))
    starts = [number for number, text in enumerate(path.read_text().splitlines(), start=1) if text == "  {"]
    assert len(starts) == 3
    line = starts[2]  # the third record's opening brace
    with pytest.raises(BadRecordError, match=rf"log\.json:{line}: `messages` must be a non-empty list"):
        read_traces(path)


def test_json_nested_past_the_parser_and_wrong_shapes_are_reported(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(["[" * 100_000, '{"messages": [{"role": "user", "content": 5}]}',
                               '{"messages": "hi"}', '{"tools": 3, "messages": []}', "7"]) + "\n")
    reasons = [s.reason for s in read_traces(path, on_bad_record="skip").skipped]
    assert reasons[0].startswith("invalid JSON: maximum recursion depth")
    assert reasons[1] == "message 0: message content must be a string, got a number"
    assert reasons[2] == "`messages` must be a non-empty list"
    assert reasons[3] == "`tools` must be a list, got a number"
    assert reasons[4] == "a record must be an object, got a number"


def test_a_missing_log_is_a_user_error(tmp_path):
    from layerroute.errors import MissingInputError

    with pytest.raises(MissingInputError, match="does not exist"):
        read_traces(tmp_path / "nope.jsonl")
    with pytest.raises(MissingInputError, match="is not a file"):
        read_traces(tmp_path)
