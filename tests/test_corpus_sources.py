"""The embedded corpus's sources (training/data/corpus/): readable, labelled, split within every source,
shortcut-controlled, well-formed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from layerroute.steps import trace_steps
from layerroute.traces import read_sources

CORPUS = Path(__file__).parents[1] / "training" / "data" / "corpus"
SPLITS = ("train", "validation", "test")
SOURCES = ("bfcl_single_turn", "bfcl_multi_turn", "gsm8k", "gsm_symbolic", "glaive", "reason_tool_use",
           "complexfuncbench", "mmlu_cot", "acpbench_cot")
# Reserved for independent evaluation: never part of the corpus.
RESERVED = ("math", "minerva", "champ", "bigbench", "agentdojo", "tau2")


@pytest.fixture(scope="module")
def splits():
    return {split: read_sources([CORPUS / f"{split}.jsonl.gz"], on_bad_record="raise").traces for split in SPLITS}


@pytest.fixture(scope="module")
def corpus(splits):
    """Every trace of the corpus, per source."""
    return {source: [t for traces in splits.values() for t in traces if t.source == source] for source in SOURCES}


def test_every_source_is_labelled_and_split_within_itself(splits, corpus):
    assert {t.source for traces in splits.values() for t in traces} == set(SOURCES)
    assert not any(word in source for source in SOURCES for word in RESERVED)
    ids = [t.id for traces in splits.values() for t in traces]
    assert len(set(ids)) == len(ids)  # no trace in two splits
    for source in SOURCES:  # leave-one-source-out folds and per-source test numbers need every source everywhere
        for split, traces in splits.items():
            assert any(t.source == source for t in traces), (source, split)
    assert sum(p.stat().st_size for p in CORPUS.glob("*.jsonl.gz")) <= 3 * 2**20


def corpus_system_prompts() -> list[str]:
    spec = importlib.util.spec_from_file_location("build_corpus", CORPUS.parent / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # definitions only; main() is not run
    return module.SYSTEM_PROMPTS


def test_tools_and_a_shared_system_prompt_in_every_context(corpus):
    prompts = tuple(corpus_system_prompts())
    for traces in corpus.values():
        for trace in traces:
            assert trace.tools, trace.id  # shortcut control: tools sit in planning contexts too
            assert trace.messages[0]["role"] == "system"
            assert trace.messages[0]["content"].startswith(prompts), trace.id


def test_tool_calls_are_answered_by_their_ids(corpus):
    for traces in corpus.values():
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


def test_step_mix_and_stats(splits, corpus):
    def after_tool_result(trace):
        return sum(1 for step in trace_steps(trace)
                   if step.step_type == "planning" and step.context[-1]["role"] == "tool")

    glaive = corpus["glaive"]
    assert sum(after_tool_result(t) for t in glaive) >= 150  # answers written after reading a tool result
    assert all(any(m.get("tool_calls") for m in t.messages) for t in glaive)
    assert sum(s.step_type == "tool_call" for t in corpus["complexfuncbench"] for s in trace_steps(t)) >= 500
    for source in ("gsm8k", "gsm_symbolic", "mmlu_cot", "acpbench_cot"):
        assert all(s.step_type == "planning" for t in corpus[source] for s in trace_steps(t)), source
    for source in ("bfcl_single_turn", "bfcl_multi_turn", "complexfuncbench"):
        assert all(s.step_type == "tool_call" for t in corpus[source] for s in trace_steps(t)), source
    stats = json.loads((CORPUS / "stats.json").read_text())
    for split, traces in splits.items():
        for source in SOURCES:
            chosen = [t for t in traces if t.source == source]
            steps = [s for t in chosen for s in trace_steps(t)]
            assert stats[split]["by_source"][source] == {
                "traces": len(chosen),
                "tool_call": sum(s.step_type == "tool_call" for s in steps),
                "planning": sum(s.step_type == "planning" for s in steps),
                "planning_after_tool_result": sum(after_tool_result(t) for t in chosen),
            }, (split, source)
