"""ChatLayerRoute on a tiny random Llama (tokenizer and chat template from the embedded SmolLM2; see conftest):
metadata, streaming, tool-call parsing, tool_choice, concurrency and cost tracking."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from typing import Literal

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import BaseModel
from transformers import AutoTokenizer

from conftest import METADATA_KEYS
from langchain_layerroute import ChatLayerRoute, LayerRouteCostCallback, layerroute_cost_tracking
from layerroute.costs import read_records
from layerroute.toolcalls import normalize_tool_choice, parse_tool_calls


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


def test_construction_loads_nothing_and_the_first_call_loads_and_names_a_missing_model(monkeypatch):
    import layerroute.chat

    loads = []
    real = layerroute.chat.load_base_model
    monkeypatch.setattr(layerroute.chat, "load_base_model",
                        lambda name, **kwargs: loads.append(name) or real(name, **kwargs))
    missing = "/no/such/model/until/first/call"
    llm = ChatLayerRoute(model=missing, max_tokens=3)  # no error: nothing is read yet
    assert loads == []
    with pytest.raises(OSError, match=f"could not load '{missing}'"):
        llm.invoke("hi")
    assert loads == [missing]


def test_zero_max_tokens_is_refused_before_generating_with_the_reason(tiny_chat_dir):
    # LayerRouteModel.generate returns the prompt for max_new_tokens=0 (test_generate_edge_cases); a chat answer of
    # no tokens is a caller's mistake, refused as OpenAI's API refuses it
    with pytest.raises(ValueError, match="max_tokens must be at least 1, got 0"):
        ChatLayerRoute(model=tiny_chat_dir, max_tokens=0).invoke("hi")


def test_instances_with_the_same_model_load_it_once(tiny_chat_dir, tmp_path, monkeypatch):
    import layerroute.chat

    model = str(shutil.copytree(tiny_chat_dir, tmp_path / "model"))  # a model this process has not loaded yet
    loads = []
    real = layerroute.chat.load_base_model
    monkeypatch.setattr(layerroute.chat, "load_base_model",
                        lambda name, **kwargs: loads.append(name) or real(name, **kwargs))
    for llm in (ChatLayerRoute(model=model, max_tokens=2), ChatLayerRoute(model=model, max_tokens=3, temperature=0.7),
                ChatLayerRoute(model=model, adapter="none", max_tokens=2)):  # "none" = fresh routers, the same
        assert "layerroute" in llm.invoke("hi").response_metadata
    assert loads == [model]


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
    tokenizer = AutoTokenizer.from_pretrained(llm.model)
    assert llm.get_token_ids("hello world") == tokenizer("hello world", add_special_tokens=False).input_ids


def test_routing_off_runs_every_block(tiny_chat_dir, set_routers):
    llm = ChatLayerRoute(model=tiny_chat_dir, max_tokens=4)
    set_routers(-5.0)  # routers that skip every block: the answer still comes, from the embeddings alone
    answer = llm.invoke("hi")
    assert answer.response_metadata["layerroute"]["skipped_layers"] == [0, 1, 2]
    assert 0 < answer.usage_metadata["output_tokens"] <= 4
    assert llm.invoke("hi", routing="off").response_metadata["layerroute"]["skipped_layers"] == []
    off = ChatLayerRoute(model=tiny_chat_dir, max_tokens=4, routing="off")
    assert off.invoke("hi").response_metadata["layerroute"]["flops_skipped"] == 0
    with pytest.raises(ValueError, match="routing must be"):
        llm.invoke("hi", routing="sometimes")


def test_a_routed_answer_that_ends_empty_is_generated_again_at_full_depth(tiny_chat_dir, set_routers):
    llm = ChatLayerRoute(model=tiny_chat_dir, max_tokens=6)
    set_routers(-5.0)  # every block skipped
    routed = llm.invoke("hi", retry_empty=False)
    assert routed.content, "the random model should say something with every block skipped"
    stop = [routed.content.strip()[0]]  # cuts the routed answer to nothing
    empty = llm.invoke("hi", stop=stop, retry_empty=False)
    route = empty.response_metadata["layerroute"]
    assert not empty.content.strip() and not empty.tool_calls
    assert route["skipped_layers"] == [0, 1, 2] and not route["retried"] and route["flops_discarded"] == 0

    retried = llm.invoke("hi", stop=stop)
    full_depth = llm.invoke("hi", stop=stop, routing="off")
    route = retried.response_metadata["layerroute"]
    assert retried.content == full_depth.content
    assert route["retried"] and route["skipped_layers"] == [] and route["flops_skipped"] == 0
    assert route["flops_total"] == full_depth.response_metadata["layerroute"]["flops_total"]
    # what the discarded attempt ran: the embeddings and LM head of every token, no block
    assert 0 < route["flops_discarded"] == empty.response_metadata["layerroute"]["flops_total"] - \
        empty.response_metadata["layerroute"]["flops_skipped"]
    assert not full_depth.response_metadata["layerroute"]["retried"]  # nothing skipped: nothing to retry


def test_a_conversation_ending_with_a_role_the_routers_do_not_decide_after_runs_every_block(tiny_chat_dir,
                                                                                              set_routers):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    from layerroute.chat import ChatEngine

    config = ChatEngine.load(tiny_chat_dir).model.config
    llm = ChatLayerRoute(model=tiny_chat_dir, max_tokens=4)
    set_routers(-5.0)
    call = AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Oslo"}, "id": "c1"}])
    after_tool = [HumanMessage("weather in Oslo?"), call, ToolMessage("sunny", tool_call_id="c1")]
    config.routed_context_roles = ["user"]  # as if fitted on logs where every step after a tool result was a call
    try:
        assert llm.invoke(after_tool).response_metadata["layerroute"]["skipped_layers"] == []
        assert llm.invoke("hi").response_metadata["layerroute"]["skipped_layers"] == [0, 1, 2]
    finally:
        config.routed_context_roles = None
    assert llm.invoke(after_tool).response_metadata["layerroute"]["skipped_layers"] == [0, 1, 2]


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


def test_named_tool_choice_forces_a_call_of_that_tool(tiny_chat_dir):
    llm = ChatLayerRoute(model=tiny_chat_dir, max_tokens=24)  # the grammar's forced tokens count as generated
    message = llm.bind_tools([get_weather, add], tool_choice="get_weather").invoke("Weather in Oslo?")
    calls = message.tool_calls + message.invalid_tool_calls
    assert calls and calls[0]["name"] == "get_weather"  # a random model may mangle the arguments, never the name
    assert message.response_metadata["layerroute"]["step_type"] == "tool_call"


@tool
def set_mode(mode: Literal["on", "off"], loud: bool) -> str:
    """Switch the device on or off."""
    return mode


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    sure: bool


def test_bound_tool_calls_follow_the_tool_schema_even_from_a_random_model(tiny_chat_dir):
    # a random model writes garbage; the grammar leaves it only a bound name and schema-valid arguments to write
    # (enums and booleans, so that the few tokens it may choose from close the call within max_tokens)
    llm = ChatLayerRoute(model=tiny_chat_dir, max_tokens=60)
    for choice in ("set_mode", "any"):
        message = llm.bind_tools([set_mode, get_weather], tool_choice=choice).invoke("Lights off")
        assert not message.invalid_tool_calls
        if choice == "set_mode":
            assert [c["name"] for c in message.tool_calls] == ["set_mode"]
        for call in message.tool_calls:
            assert call["name"] in ("set_mode", "get_weather")
            if call["name"] == "set_mode":
                assert call["args"]["mode"] in ("on", "off") and isinstance(call["args"]["loud"], bool)
        assert message.response_metadata["layerroute"]["step_type"] == "tool_call"


def test_parallel_tool_calls_reaches_the_grammar(tiny_chat_dir, parallel_tool_calls_asked):
    # what the grammar then allows is tested in test_grammar.py; a random model never writes a second call anyway
    llm = ChatLayerRoute(model=tiny_chat_dir, max_tokens=40)
    llm.bind_tools([set_mode], tool_choice="any", parallel_tool_calls=False).invoke("Lights off")
    llm.bind_tools([set_mode], tool_choice="any").invoke("Lights off")
    assert parallel_tool_calls_asked == [False, True]


def test_tool_choice_none_never_calls(tiny_chat_dir):
    llm = ChatLayerRoute(model=tiny_chat_dir, max_tokens=40, temperature=1.0, seed=3)
    for _ in range(3):
        message = llm.bind_tools([set_mode], tool_choice="none").invoke("Lights off")
        assert "<tool_call>" not in message.content and not message.tool_calls and not message.invalid_tool_calls


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_is_schema_valid_from_a_random_model(tiny_chat_dir, method):
    llm = ChatLayerRoute(model=tiny_chat_dir, max_tokens=60)
    verdict = llm.with_structured_output(Verdict, method=method).invoke("Is water wet?")
    assert isinstance(verdict, Verdict)
    raw = llm.with_structured_output(Verdict.model_json_schema(), method=method, include_raw=True).invoke("Is it?")
    assert raw["parsing_error"] is None and set(raw["parsed"]) == {"answer", "sure"}
    assert raw["raw"].response_metadata["layerroute"]["num_layers"] == 3


def test_structured_output_rejects_unknown_methods_and_tools_beside_a_response_format(llm):
    with pytest.raises(ValueError, match="unknown method"):
        llm.with_structured_output(Verdict, method="xml")
    with pytest.raises(ValueError, match="cannot be combined"):
        llm.bind_tools([set_mode]).bind(response_format={"type": "json_object"}).invoke("hi")


def test_tool_choice_none_hides_tools(llm):
    bound = llm.bind_tools([get_weather], tool_choice="none")
    message = bound.invoke("Weather in Oslo?")
    assert message.response_metadata["layerroute"]["step_type"] in ("planning", "tool_call")


def test_tool_choice_values():
    assert normalize_tool_choice(None, ["a"]) is None
    assert normalize_tool_choice("auto", ["a"]) is None
    assert normalize_tool_choice("none", ["a"]) == ("none",)
    assert normalize_tool_choice("any", ["a", "b"]) == ("required",)
    assert normalize_tool_choice("required", ["a"]) == ("name", "a")
    assert normalize_tool_choice({"type": "function", "function": {"name": "b"}}, ["a", "b"]) == ("name", "b")
    with pytest.raises(ValueError, match="neither one of"):
        normalize_tool_choice("sometimes", ["a"])
    with pytest.raises(ValueError, match="needs at least one bound tool"):
        normalize_tool_choice("any", [])
    with pytest.raises(ValueError, match="unsupported tool_choice"):
        normalize_tool_choice(3, ["a"])
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


def test_concurrent_invokes_each_carry_their_own_route(tiny_chat_dir, set_routers):
    llm = ChatLayerRoute(model=tiny_chat_dir, max_tokens=6)
    set_routers(0.0, weight_std=200.0, pooling="mean")  # routing that depends on the whole prompt
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
