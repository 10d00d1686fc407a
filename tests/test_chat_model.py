"""ChatLayerRoute on a tiny random Llama (tokenizer and chat template from the embedded SmolLM2; see conftest):
metadata, streaming, tool-call parsing, tool_choice, concurrency and cost tracking."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_layerroute import ChatLayerRoute, LayerRouteCostCallback, layerroute_cost_tracking
from langchain_layerroute.chat_models import _normalize_tool_choice
from layerroute.costs import read_records
from layerroute.toolcalls import TokenPieces, ToolNameConstraint, parse_tool_calls

METADATA_KEYS = {"step_type", "skipped_layers", "num_layers", "layers_skipped_frac", "flops_total",
                 "flops_skipped", "flops_skipped_frac", "latency_s"}


@pytest.fixture(scope="session")
def llm(tiny_chat_dir):
    return ChatLayerRoute(model=tiny_chat_dir, max_tokens=12)


@tool
def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    return f"sunny in {city}"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class ChatLayerRouteCapabilities:
    """What ChatLayerRoute declares to langchain-tests' standard suites (unit and integration)."""

    @property
    def chat_model_class(self):
        return ChatLayerRoute

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True


class TestChatLayerRouteStandard(ChatLayerRouteCapabilities, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict:
        return {"model": "unused-until-first-call"}


def test_construction_is_lazy():
    llm = ChatLayerRoute(model="/no/such/model/until/first/call")
    assert llm._runtime is None  # nothing loaded, no error


def test_instances_with_the_same_model_share_one_loaded_copy(llm, tiny_chat_dir):
    other = ChatLayerRoute(model=tiny_chat_dir, max_tokens=3, temperature=0.7)
    assert other._load() is llm._load()
    assert ChatLayerRoute(model=tiny_chat_dir, adapter="none")._load() is llm._load()  # "none" = fresh routers


def test_invoke_carries_route_metadata_and_integer_usage(llm):
    message = llm.invoke([SystemMessage("Be brief."), HumanMessage("Hello there")])
    assert isinstance(message, AIMessage)
    assert message.response_metadata["model_name"] == llm.model
    route = message.response_metadata["layerroute"]
    assert set(route) == METADATA_KEYS
    assert route["num_layers"] == 3 and route["flops_total"] > 0 and route["latency_s"] > 0
    assert route["step_type"] in ("tool_call", "planning")
    usage = message.usage_metadata
    assert all(isinstance(usage[k], int) for k in ("input_tokens", "output_tokens", "total_tokens"))
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert 0 < usage["output_tokens"] <= 12
    assert llm.get_token_ids("hello world") == llm._load().tokenizer("hello world", add_special_tokens=False).input_ids


def test_stream_puts_metadata_on_exactly_one_chunk(llm):
    chunks = list(llm.stream("Tell me a story"))
    with_route = [c for c in chunks if "layerroute" in c.response_metadata]
    assert len(with_route) == 1 and chunks[-1] is with_route[0]
    assert sum(1 for c in chunks if c.usage_metadata) == 1
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert set(merged.response_metadata["layerroute"]) == METADATA_KEYS
    assert "<tool_call>" not in merged.content


async def test_astream_and_ainvoke(llm):
    chunks = [chunk async for chunk in llm.astream("Hi")]
    assert "layerroute" in chunks[-1].response_metadata
    message = await llm.ainvoke("Hi")
    assert "layerroute" in message.response_metadata


def test_named_tool_choice_forces_a_call_of_that_tool(llm):
    message = llm.bind_tools([get_weather, add], tool_choice="get_weather").invoke("Weather in Oslo?")
    calls = message.tool_calls + message.invalid_tool_calls
    assert calls and calls[0]["name"] == "get_weather"  # a random model may mangle the arguments, never the name
    assert message.response_metadata["layerroute"]["step_type"] == "tool_call"


@pytest.mark.parametrize("constrained", [True, False])
def test_tool_names_are_constrained_to_the_bound_tools(tiny_chat_dir, constrained):
    # a random model writes garbage; inside a <tool_call> the constraint leaves it only the bound names to write
    llm = ChatLayerRoute(model=tiny_chat_dir, max_tokens=40, constrain_tool_names=constrained)
    message = llm.bind_tools([get_weather, add], tool_choice="any").invoke("Weather in Oslo?")
    names = [call["name"] for call in message.tool_calls + message.invalid_tool_calls]
    assert bool(names and names[0] in ("get_weather", "add")) == constrained


def test_tool_name_constraint_allows_exactly_the_continuations_of_bound_names(smollm2):
    _, tokenizer = smollm2
    pieces = TokenPieces(tokenizer)
    assert pieces.consistent

    def allowed(generated: str, prefix: str = "") -> set[str]:
        ids = tokenizer(generated, add_special_tokens=False, return_tensors="pt").input_ids
        constraint = ToolNameConstraint(pieces, tokenizer, ["get_weather", "add"], prompt_length=0, prefix=prefix)
        scores = constraint(ids, torch.zeros(1, len(tokenizer)))
        return {pieces.pieces[i] for i in torch.nonzero(scores[0] == 0).flatten().tolist()}

    # the only tokens of this vocabulary that begin `"get_weather"` or `"add"` after the key, spacing included
    assert allowed('<tool_call>\n{"name":') == {" ", ' "', '"'}  # not ' <' (a placeholder) nor ' "search'
    assert allowed('<tool_call>\n{"name": "get_we') == {"a", "at", "ath", "athe", "ather"}
    assert allowed('<tool_call>\n{"name": "get_weather') >= {'"', '",'}  # the closing quote may bring more
    assert allowed("{", prefix="<tool_call>\n") == allowed("<tool_call>\n{")  # a forced prefix counts
    everything = set(pieces.by_piece)
    assert allowed('<tool_call>\n{"name": "add", "arg') == everything  # the arguments are free
    assert allowed("I think so") == everything  # outside a call
    assert allowed('<tool_call>\n{"arguments": {') == everything  # a block that went another way is left alone


def test_tool_choice_none_hides_tools(llm):
    bound = llm.bind_tools([get_weather], tool_choice="none")
    message = bound.invoke("Weather in Oslo?")
    assert message.response_metadata["layerroute"]["step_type"] in ("planning", "tool_call")


def test_tool_choice_values():
    assert _normalize_tool_choice(None, ["a"]) is None
    assert _normalize_tool_choice("auto", ["a"]) is None
    assert _normalize_tool_choice("none", ["a"]) == ("none",)
    assert _normalize_tool_choice("any", ["a", "b"]) == ("required",)
    assert _normalize_tool_choice("required", ["a"]) == ("name", "a")
    assert _normalize_tool_choice({"type": "function", "function": {"name": "b"}}, ["a", "b"]) == ("name", "b")
    with pytest.raises(ValueError, match="neither one of"):
        _normalize_tool_choice("sometimes", ["a"])
    with pytest.raises(ValueError, match="needs at least one bound tool"):
        _normalize_tool_choice("any", [])
    with pytest.raises(ValueError, match="unsupported tool_choice"):
        _normalize_tool_choice(3, ["a"])
    with pytest.raises(ValueError, match="neither one of"):
        ChatLayerRoute(model="x").bind_tools([get_weather], tool_choice="add")


def test_parsing_good_partial_and_malformed_tool_calls():
    good = parse_tool_calls('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                            "</tool_call>")
    assert good.content == "Let me check." and not good.invalid_tool_calls
    assert [(c.name, c.arguments) for c in good.tool_calls] == [("get_weather", {"city": "Oslo"})]
    parallel = parse_tool_calls('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
                                '<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert [(c.name, c.arguments) for c in parallel.tool_calls] == [("a", {}), ("b", {"x": 1})]
    partial = parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os')
    assert not partial.tool_calls and partial.invalid_tool_calls[0].name == "get_weather"
    assert "not closed" in partial.invalid_tool_calls[0].error
    malformed = parse_tool_calls("<tool_call>{'name': oops}</tool_call><tool_call>{\"arguments\": {}}</tool_call>")
    assert [c.error for c in malformed.invalid_tool_calls][1] == "no function name"
    assert parse_tool_calls("plain answer").content == "plain answer"


def test_multi_turn_history_with_tool_messages_renders(llm):
    history = [
        HumanMessage("Weather in Oslo?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Oslo"}, "id": "c1"}]),
        ToolMessage("sunny", tool_call_id="c1", name="get_weather"),
    ]
    message = llm.bind_tools([get_weather]).invoke(history)
    assert "layerroute" in message.response_metadata


def test_stop_sequences_cut_the_answer(llm):
    free = llm.invoke("Count: one two three")
    assert free.content, "the random model should say something"
    stop = free.content.strip()[:1]
    cut = llm.invoke("Count: one two three", stop=[stop])
    assert stop not in cut.content


def test_concurrent_invokes_each_carry_their_own_route(tiny_chat_dir):
    llm = ChatLayerRoute(model=tiny_chat_dir, max_tokens=6)
    runtime = llm._load()
    for router in runtime.model.routers:  # make routing depend on the whole prompt
        router.pooling = "mean"
        torch.nn.init.normal_(router.proj.weight, std=200.0)
        torch.nn.init.zeros_(router.proj.bias)
    words = ["zebra", "42 + 17", "Bonjour", "<tool>", "SELECT *", "def f():", "!!!", "weather"]
    prompts = [f"{i} " + words[i] * 5 for i in range(8)]
    expected = {p: llm.invoke(p).response_metadata["layerroute"]["skipped_layers"] for p in prompts}
    assert len({tuple(v) for v in expected.values()}) > 1
    results, barrier = {}, threading.Barrier(len(prompts))

    def call(prompt):
        barrier.wait()
        results[prompt] = llm.invoke(prompt).response_metadata["layerroute"]["skipped_layers"]

    threads = [threading.Thread(target=call, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == expected

    async def gather():
        return await asyncio.gather(*(llm.ainvoke(p) for p in prompts))

    answers = asyncio.run(gather())
    assert [a.response_metadata["layerroute"]["skipped_layers"] for a in answers] == [expected[p] for p in prompts]


def test_cost_callback_aggregates_a_multi_step_run(llm, tmp_path):
    tool_llm = llm.bind_tools([get_weather, add], tool_choice="get_weather")
    plain_llm = llm.bind_tools([get_weather, add], tool_choice="none")

    def agent(question: str) -> str:  # three model steps inside one run: call, call, answer
        tool_llm.invoke(question)
        tool_llm.invoke(question + " and tomorrow?")
        return plain_llm.invoke("Summarise.").content

    path = tmp_path / "costs.jsonl"
    with layerroute_cost_tracking(path, record_messages=True) as costs:
        RunnableLambda(agent).invoke("Weather in Oslo?")
        RunnableLambda(agent).invoke("Weather in Rome?")
    records = read_records(path)
    assert len(records) == len(costs.records) == 6
    assert len({r.trace_id for r in records}) == 2
    for trace in {r.trace_id for r in records}:
        assert sorted(r.step_index for r in records if r.trace_id == trace) == [0, 1, 2]
    assert [r.step_type for r in records].count("tool_call") >= 4
    report = costs.report(steps_per_day=1000)
    assert report.totals["steps"] == 6 and report.totals["traces"] == 2
    assert report.totals["flops_total"] == sum(r.flops_total for r in records)
    assert sum(row["steps"] for row in report.by_step_type.values()) == 6
    # Recorded messages make the file a training source.
    from layerroute.traces import read_traces

    traces = read_traces(path).traces
    assert len(traces) == 6 and traces[0].messages[-1]["role"] == "assistant"


def test_one_langgraph_run_is_one_trace(llm, caplog):
    """LangGraph runs each model call inside its own node run; the steps of one invoke still form one trace."""
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph

    class State(TypedDict):
        text: str

    def node(state: State) -> State:
        return {"text": llm.invoke(state["text"]).content[:20]}

    graph = StateGraph(State)
    for name in ("plan", "act", "answer"):
        graph.add_node(name, node)
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "act")
    graph.add_edge("act", "answer")
    graph.add_edge("answer", END)
    app = graph.compile()

    with layerroute_cost_tracking() as costs:
        app.invoke({"text": "Weather in Oslo?"})
        asyncio.run(app.ainvoke({"text": "Weather in Rome?"}))
        app.invoke({"text": "Tagged"}, {"metadata": {"trace_id": "ticket-7"}})
    traces = {}
    for record in costs.records:
        traces.setdefault(record.trace_id, []).append(record)
    assert len(traces) == 3 and "ticket-7" in traces
    for records in traces.values():
        assert [r.step_index for r in records] == [0, 1, 2]
        assert [r.node for r in records] == ["plan", "act", "answer"]
        assert [r.graph_step for r in records] == [1, 2, 3]
    assert costs.report().totals["traces"] == 3
    assert "LayerRouteCostCallback" not in caplog.text  # no handler errors swallowed by LangChain


def test_callback_handler_can_be_passed_explicitly(llm):
    handler = LayerRouteCostCallback()
    llm.invoke("hi", config={"callbacks": [handler]})
    assert len(handler.records) == 1 and handler.records[0].step_type in ("tool_call", "planning")
    assert json.loads(json.dumps(handler.records[0].to_dict()))["flops_executed"] <= handler.records[0].flops_total


def test_adapter_for_another_base_fails_at_load(tiny_chat_dir, tmp_path):
    from conftest import tiny_qwen2

    from layerroute import LayerRouteModel

    LayerRouteModel.from_base(tiny_qwen2(), base_model_name_or_path="tiny").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not fit this base model"):
        ChatLayerRoute(model=tiny_chat_dir, adapter=str(tmp_path)).invoke("hi")
