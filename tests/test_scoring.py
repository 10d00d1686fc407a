"""Scoring generated agent steps: tool calls as BFCL's AST checker compares them, answers by token F1 and final
number, and the intervals that say whether two models differ."""

from __future__ import annotations

import json

import pytest

from layerroute.evaluation import paired_difference, quality_summary, token_f1, wilson_interval
from layerroute.toolcalls import acceptable_values, arguments_match, parse_tool_calls, score_calls

SCHEMA = {"type": "object", "required": ["city"], "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"type": "string", "default": "celsius"},
    "tags": {"type": "array", "items": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": {"name": "forecast", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "convert", "parameters": {
             "type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}}}]


def call(name: str, **arguments) -> dict:
    return {"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def generated(*calls: tuple[str, dict]) -> str:
    return "\n".join(f'<tool_call>\n{json.dumps({"name": n, "arguments": a})}\n</tool_call>' for n, a in calls)


@pytest.mark.parametrize(("arguments", "reason"), [
    ({"city": "new york ny", "days": 3}, None),  # strings compare without case, spaces or punctuation
    ({"city": "New York, NY", "days": 3, "unit": "celsius"}, None),  # the schema default may be spelt out
    ({"city": "New York, NY", "days": 3.0}, None),  # 3.0 is the number 3
    ({"city": "New York, NY"}, "missing argument 'days'"),  # optional in the schema, but the reference gives it
    ({"days": 3}, "missing required argument 'city'"),
    ({"city": "Boston", "days": 3}, "city='Boston'"),
    ({"city": "New York, NY", "days": 3, "unit": "kelvin"}, "unit='kelvin', expected 'celsius'"),  # left out, default only
    ({"city": "New York, NY", "days": 3, "tags": []}, "'tags' given where the reference leaves it out"),
    ({"city": "New York, NY", "days": 3, "country": "US"}, "unexpected argument 'country'"),
    ({"city": "New York, NY", "days": True}, "days=True"),  # a boolean is not a number
])
def test_arguments_match_as_bfcl_does(arguments, reason):
    acceptable = acceptable_values({"city": "New York, NY", "days": 3}, SCHEMA)
    result = arguments_match(arguments, acceptable, SCHEMA)
    assert result is None if reason is None else reason in result


def test_several_acceptable_values_and_nested_lists():
    acceptable = {"city": ["NYC", "New York"], "tags": [["Rain", "wind"]], "days": ["", 1]}
    assert arguments_match({"city": "new york", "tags": ["rain", "Wind"]}, acceptable, SCHEMA) is None
    assert arguments_match({"city": "nyc", "tags": ["wind", "rain"], "days": 1}, acceptable, SCHEMA) is not None


def test_score_calls_separates_form_names_and_arguments():
    reference = [call("forecast", city="Oslo"), call("convert", x=2)]
    right = score_calls(parse_tool_calls(generated(("convert", {"x": 2}), ("forecast", {"city": "oslo"}))),
                        reference, TOOLS)
    assert (right.valid, right.names_correct, right.arguments_correct, right.error) == (True, True, True, None)
    wrong_value = score_calls(parse_tool_calls(generated(("forecast", {"city": "Rome"}), ("convert", {"x": 2}))),
                              reference, TOOLS)
    assert (wrong_value.valid, wrong_value.names_correct, wrong_value.arguments_correct) == (True, True, False)
    one_missing = score_calls(parse_tool_calls(generated(("forecast", {"city": "Oslo"}))), reference, TOOLS)
    assert not one_missing.names_correct and "expected forecast, convert" in one_missing.error
    schema_broken = score_calls(parse_tool_calls(generated(("forecast", {"city": 7}))), reference[:1], TOOLS)
    assert not schema_broken.valid and "7 is not of type 'string'" in schema_broken.error
    unbound = score_calls(parse_tool_calls(generated(("weather", {}))), reference[:1], TOOLS)
    assert not unbound.valid and not unbound.names_correct
    cut_short = score_calls(parse_tool_calls('<tool_call>\n{"name": "forecast", "arguments": {"ci'), reference[:1],
                            TOOLS)
    assert not cut_short.valid and not cut_short.names_correct
    assert "not closed" in cut_short.error and "called no call" in cut_short.error  # why, not only what
    assert not score_calls(parse_tool_calls("It is sunny."), reference[:1], TOOLS).valid


def test_answer_scores():
    assert token_f1("The total is 42 apples.", "the total is 42 apples") == 1.0
    assert 0 < token_f1("total 42", "The total is 42 apples") < 1
    assert token_f1("", "") == 1.0 and token_f1("yes", "") == 0.0


def test_intervals_and_paired_differences():
    low, high = wilson_interval(50, 100)
    assert low < 0.5 < high and high - low == pytest.approx(0.192, abs=0.002)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    first = [{"ok": True}] * 90 + [{"ok": False}] * 10 + [{"other": 1.0}]
    second = [{"ok": True}] * 80 + [{"ok": False}] * 20 + [{"other": 1.0}]
    paired = paired_difference(first, second, "ok")
    assert (paired["steps"], paired["first_only"], paired["second_only"]) == (100, 10, 0)
    assert paired["difference_points"] == -10.0 and paired["ci95_points"][1] < 0  # a real drop
    assert paired_difference(first, second, "missing") is None
    summary = quality_summary([{"valid": True, "answer_f1": 0.5}, {"valid": False, "answer_f1": 1.0}])
    assert summary["valid"]["rate"] == 0.5 and summary["valid"]["steps"] == 2
    assert summary["answer_f1"]["mean"] == 0.75
