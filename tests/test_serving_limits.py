"""Serving limits on tiny random models: prompts past the base model's positions or the context budget are refused
with the counts or cut from the left as documented, ``timeout`` stops a generation and says so, and concurrent calls
with different bound tools each get their own tool calls and route stats."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch
from conftest import METADATA_KEYS
from fastapi.testclient import TestClient
from langchain_layerroute import ChatLayerRoute
from transformers import LlamaConfig, LlamaForCausalLM

from layerroute.chat import ChatEngine, ContextBudgetError
from layerroute.serving import create_app

POSITIONS = 400  # the short model's max_position_embeddings


@pytest.fixture(scope="module")
def short_chat_dir(tmp_path_factory, smollm2):
    """A 2-block random Llama with SmolLM2's tokenizer and chat template that takes only POSITIONS positions."""
    _, tokenizer = smollm2
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=POSITIONS,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    directory = tmp_path_factory.mktemp("short-chat")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def short_engine(short_chat_dir):
    return ChatEngine.load(short_chat_dir)


def tool(name: str, **properties) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"the {name} tool", "parameters": {
        "type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}}}


LOOKUP = tool("lookup", key={"type": "string"})


def conversation() -> list[dict]:
    """An agent conversation whose every message carries a marker word, so that a prompt shows which it kept."""
    def call(marker: str) -> dict:
        return {"role": "assistant", "content": "", "tool_calls": [{"id": f"id-{marker}", "type": "function",
                "function": {"name": "lookup", "arguments": json.dumps({"key": marker})}}]}

    return [
        {"role": "system", "content": "sysmark: you are a careful agent."},
        {"role": "user", "content": "usermark1 " + "tell me about the weather " * 6},
        call("callmarkA"),
        {"role": "tool", "content": "resultmarkA " + "sunny and mild " * 6, "tool_call_id": "id-callmarkA",
         "name": "lookup"},
        {"role": "assistant", "content": "replymark1 " + "it is sunny there " * 6},
        {"role": "user", "content": "usermark2 and tomorrow?"},
        call("callmarkB"),
        {"role": "tool", "content": "resultmarkB " + "rain later on " * 6, "tool_call_id": "id-callmarkB",
         "name": "lookup"},
    ]


MARKERS = ["sysmark", "usermark1", "callmarkA", "resultmarkA", "replymark1", "usermark2", "callmarkB", "resultmarkB"]


# ---------------------------------------------------------------------------------------------- context limits
def test_a_prompt_must_leave_max_tokens_free_within_the_models_positions(short_engine, short_chat_dir):
    assert short_engine.max_positions == POSITIONS  # the tokenizer's model_max_length is unset (a placeholder)
    messages = [{"role": "user", "content": "count with me " * 40}]
    prompt_tokens = short_engine.prepare(messages, max_tokens=1).prompt_tokens
    room = POSITIONS - prompt_tokens
    assert 0 < room < POSITIONS
    llm = ChatLayerRoute(model=short_chat_dir, max_tokens=room)
    answer = llm.invoke(messages[0]["content"])  # exactly fits: generation runs to its end without a torch error
    assert answer.usage_metadata["input_tokens"] == prompt_tokens
    with pytest.raises(ContextBudgetError) as refused:
        llm.invoke(messages[0]["content"], max_tokens=room + 1)
    error = refused.value
    assert isinstance(error, ValueError)
    assert (error.prompt_tokens, error.max_tokens, error.max_positions, error.limit) == (
        prompt_tokens, room + 1, POSITIONS, prompt_tokens - 1)
    assert f"the prompt has {prompt_tokens} tokens and max_tokens asks for {room + 1} more" in str(error)
    assert f"maximum of {POSITIONS}" in str(error) and "lower max_tokens" in str(error)


def test_a_configured_budget_below_the_positions_is_refused_with_the_counts(short_chat_dir):
    llm = ChatLayerRoute(model=short_chat_dir, max_tokens=4, context_budget=50)
    with pytest.raises(ContextBudgetError, match=r"the prompt has \d+ tokens, over this model's context budget of 50"):
        llm.invoke("count with me " * 20)
    assert llm.invoke("hi").response_metadata["dropped_messages"] == 0


def test_truncation_keeps_system_prompt_tools_and_call_result_pairs(short_engine):
    messages = conversation()
    full = short_engine.prepare(messages, tools=[LOOKUP], max_tokens=4).prompt_tokens
    shortest = None
    previously_dropped = 0
    for budget in range(full + 1, 60, -12):
        try:
            step = short_engine.prepare(messages, tools=[LOOKUP], max_tokens=4, context_budget=budget,
                                        context_overflow="truncate")
        except ContextBudgetError as error:
            assert "even with every older message dropped" in str(error)
            assert error.prompt_tokens == shortest and error.budget == budget
            break
        text = short_engine.tokenizer.decode(step.prompt_ids)
        kept = [marker in text for marker in MARKERS]
        assert step.prompt_tokens <= budget
        assert kept[0] and "the lookup tool" in text  # the system prompt and the tool schemas stay
        first = kept.index(True, 1)
        assert all(kept[first:]), f"not a suffix of the conversation: {kept}"  # only the oldest go
        assert step.dropped_messages == first - 1
        assert kept[2] == kept[3] and kept[6] == kept[7]  # a call goes with its result
        assert step.dropped_messages >= previously_dropped  # a smaller budget never keeps more
        previously_dropped = step.dropped_messages
        shortest = step.prompt_tokens
    else:
        pytest.fail("the budget never got below the shortest cut")
    assert previously_dropped == 5  # at the end only the last call and its result were left after the system prompt


def test_truncation_drops_as_few_messages_as_fit(short_engine):
    messages = conversation()
    step = short_engine.prepare(messages, tools=[LOOKUP], max_tokens=4, context_overflow="truncate")
    assert step.dropped_messages == 0  # within the limits: nothing is cut
    without_first_exchange = [messages[0], *messages[2:]]
    budget = short_engine.prepare(without_first_exchange, tools=[LOOKUP], max_tokens=4).prompt_tokens
    cut = short_engine.prepare(messages, tools=[LOOKUP], max_tokens=4, context_budget=budget,
                               context_overflow="truncate")
    assert cut.dropped_messages == 1 and torch.equal(cut.prompt_ids, short_engine.prepare(
        without_first_exchange, tools=[LOOKUP], max_tokens=4).prompt_ids)


def test_truncation_also_makes_room_for_max_tokens(short_chat_dir):
    llm = ChatLayerRoute(model=short_chat_dir, max_tokens=120, context_overflow="truncate")
    history = [("human", f"question {i}: " + "what about this one " * 4) if i % 2 == 0 else
               ("ai", f"answer {i}: " + "that one is fine " * 4) for i in range(13)]
    message = llm.invoke(history)
    assert message.response_metadata["dropped_messages"] > 0
    assert message.usage_metadata["input_tokens"] + 120 <= POSITIONS


def test_the_server_refuses_or_truncates_past_the_positions(short_engine):
    body = {"model": "short", "max_tokens": 8, "messages": conversation()[:1] + [
        {"role": "user", "content": "old question " * 200}, {"role": "assistant", "content": "old answer"},
        {"role": "user", "content": "the last question"}]}
    with TestClient(create_app(short_engine, model_name="short", context_budget=4096)) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["max_positions"] == POSITIONS and error["max_tokens"] == 8 and error["context_budget"] == 4096
    assert error["prompt_tokens"] + 8 > POSITIONS and str(error["prompt_tokens"]) in error["message"]
    with TestClient(create_app(short_engine, model_name="short", context_overflow="truncate")) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] + 8 <= POSITIONS
    with pytest.raises(ValueError, match="context_overflow must be"):
        create_app(short_engine, context_overflow="cut")


# ---------------------------------------------------------------------------------------------- timeout
def test_a_timeout_stops_the_generation_and_says_so(tiny_chat_dir):
    prompt = "Write a long story about a lighthouse."
    free = ChatLayerRoute(model=tiny_chat_dir, max_tokens=48).invoke(prompt)
    assert free.usage_metadata["output_tokens"] > 2, "the random model must write more than a token for this test"
    assert free.response_metadata["timed_out"] is False
    generous = ChatLayerRoute(model=tiny_chat_dir, max_tokens=48, timeout=600).invoke(prompt)
    assert generous.content == free.content and generous.response_metadata["timed_out"] is False
    assert generous.response_metadata["finish_reason"] == free.response_metadata["finish_reason"]
    cut = ChatLayerRoute(model=tiny_chat_dir, max_tokens=48, timeout=1e-6).invoke(prompt)
    assert cut.usage_metadata["output_tokens"] < free.usage_metadata["output_tokens"]
    assert cut.response_metadata["finish_reason"] == "length" and cut.response_metadata["timed_out"] is True
    assert free.content.startswith(cut.content)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        ChatLayerRoute(model=tiny_chat_dir, timeout=0).invoke(prompt)


# ---------------------------------------------------------------------------------------------- concurrency
CALLS = 16


def own_tools(index: int) -> list[dict]:
    # a parameterless tool of its own and a decoy; a random model under the grammar can only close the forced call
    return [tool(f"tool_{index:02d}"), tool(f"decoy_{index:02d}")]


def outcome(message) -> tuple:
    route = {key: value for key, value in message.response_metadata["layerroute"].items() if key != "latency_s"}
    return ([call["name"] for call in message.tool_calls], [call["name"] for call in message.invalid_tool_calls],
            message.usage_metadata["input_tokens"], route)


def test_concurrent_invokes_and_ainvokes_with_their_own_tools_get_their_own_answers(tiny_chat_dir, set_routers):
    set_routers(0.0, weight_std=0.3, pooling="mean")  # routes that depend on the prompt and the threshold
    llm = ChatLayerRoute(model=tiny_chat_dir, max_tokens=80)
    words = ["zebra", "42 + 17", "Bonjour", "<tool>", "SELECT *", "def f():", "!!!", "weather"]
    # each call its own tools, prompt and compute dial, so that a mixed-up answer shows in its tool name and route
    calls = [(llm.bind_tools(own_tools(i), tool_choice=f"tool_{i:02d}", skip_threshold=0.05 + 0.9 * i / CALLS),
              f"{i} " + words[i % len(words)] * (1 + i % 5)) for i in range(CALLS)]
    results: list = [None] * CALLS
    barrier = threading.Barrier(CALLS)

    def call(index: int) -> None:
        bound, prompt = calls[index]
        barrier.wait()  # all at once, before any grammar is compiled
        results[index] = outcome(bound.invoke(prompt))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(CALLS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    async def together():
        return await asyncio.gather(*(bound.ainvoke(prompt) for bound, prompt in calls))

    gathered = [outcome(message) for message in asyncio.run(together())]
    alone = [outcome(bound.invoke(prompt)) for bound, prompt in calls]
    assert len({json.dumps(result[3]["skipped_layers"]) for result in alone}) > 2  # the routes differ between calls
    assert len({result[3]["flops_total"] for result in alone}) > 2
    for index, result in enumerate(alone):
        assert result[0] == [f"tool_{index:02d}"] and not result[1]
        assert set(result[3]) | {"latency_s"} == METADATA_KEYS
    assert results == alone
    assert gathered == alone
