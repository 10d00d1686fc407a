"""The held-out evaluation sets (training/data/heldout/): readable, labelled, shortcut-controlled, well-formed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from layerroute.steps import trace_steps
from layerroute.traces import read_sources

HELDOUT = Path(__file__).parents[1] / "training" / "data" / "heldout"
SOURCES = ("glaive", "reason_tool_use", "complexfuncbench", "mmlu_cot", "acpbench_cot")
# Never part of the corpus nor of these sets (DESIGN.md, "More real data offline, and reserved data").
RESERVED = ("math", "minerva", "champ", "bigbench", "agentdojo", "tau2")


@pytest.fixture(scope="module")
def heldout():
    return {source: read_sources([HELDOUT / f"{source}.jsonl.gz"], on_bad_record="raise").traces
            for source in SOURCES}


def test_every_heldout_file_is_read_strictly_and_labelled(heldout):
    assert sorted(p.name for p in HELDOUT.glob("*.jsonl.gz")) == sorted(f"{s}.jsonl.gz" for s in SOURCES)
    for source, traces in heldout.items():
        assert traces, source
        assert {t.source for t in traces} == {source}
        assert len({t.id for t in traces}) == len(traces)
    assert not any(word in source for source in SOURCES for word in RESERVED)
    assert sum(p.stat().st_size for p in HELDOUT.glob("*.jsonl.gz")) <= 1.5 * 2**20


def corpus_system_prompts() -> list[str]:
    spec = importlib.util.spec_from_file_location("build_corpus", HELDOUT.parent / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # definitions only; main() is not run
    return module.SYSTEM_PROMPTS


def test_tools_and_a_shared_system_prompt_in_every_context(heldout):
    prompts = tuple(corpus_system_prompts())
    for traces in heldout.values():
        for trace in traces:
            assert trace.tools, trace.id  # shortcut control: tools sit in planning contexts too
            assert trace.messages[0]["role"] == "system"
            assert trace.messages[0]["content"].startswith(prompts), trace.id


def test_tool_calls_are_answered_by_their_ids(heldout):
    for traces in heldout.values():
        for trace in traces:
            names = {t["function"]["name"] for t in trace.tools}
            open_calls = {}
            for position, message in enumerate(trace.messages):
                if message["role"] == "tool":
                    assert open_calls.pop(message["tool_call_id"]) == message["name"], trace.id
                    continue
                if message["role"] == "assistant" or position == len(trace.messages) - 1:
                    assert not open_calls, trace.id  # every call is answered before the agent acts again
                for call in message.get("tool_calls") or []:
                    assert call["function"]["name"] in names, trace.id
                    assert isinstance(json.loads(call["function"]["arguments"]), dict)
                    open_calls[call["id"]] = call["function"]["name"]
            last = trace.messages[-1]
            assert not open_calls or (last["role"] == "assistant" and last.get("tool_calls")), trace.id


def test_heldout_step_mix(heldout):
    def after_tool_result(trace):
        return sum(1 for step in trace_steps(trace)
                   if step.step_type == "planning" and step.context[-1]["role"] == "tool")

    glaive = heldout["glaive"]
    assert sum(after_tool_result(t) for t in glaive) >= 100  # answers written after reading a tool result
    assert all(any(m.get("tool_calls") for m in t.messages) for t in glaive)
    assert sum(s.step_type == "tool_call" for t in heldout["complexfuncbench"] for s in trace_steps(t)) >= 500
    assert all(s.step_type == "planning" for t in heldout["mmlu_cot"] for s in trace_steps(t))
    stats = json.loads((HELDOUT / "stats.json").read_text())
    for source, traces in heldout.items():
        steps = [s for t in traces for s in trace_steps(t)]
        assert stats[source] == {
            "traces": len(traces),
            "tool_call": sum(s.step_type == "tool_call" for s in steps),
            "planning": sum(s.step_type == "planning" for s in steps),
            "planning_after_tool_result": sum(after_tool_result(t) for t in traces),
        }
