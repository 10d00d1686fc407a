"""Real clients against a real ``layerroute serve`` (uvicorn on a free 127.0.0.1 port, started by the tests): the
``openai`` SDK (plain, tools, streaming, JSON schema, the compute dial, errors), ``langchain_openai.ChatOpenAI``
inside ``create_agent``, and a bounded loopback load test. Sockets are allowed to 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Literal

import httpx
import openai
import pytest
import uvicorn
from conftest import METADATA_KEYS, WEATHER
from langchain.agents import create_agent
from langchain.agents.middleware import wrap_model_call
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from layerroute.chat import ChatEngine
from layerroute.serving import create_app

pytestmark = [pytest.mark.enable_socket, pytest.mark.allow_hosts(["127.0.0.1"])]



@pytest.fixture(scope="module")
def engine(tiny_chat_dir):
    return ChatEngine.load(tiny_chat_dir)


@pytest.fixture(scope="module")
def base_url(engine):
    app = create_app(engine, model_name="tiny", default_max_tokens=8, context_budget=400, batch_window_ms=20)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
        yield client


def test_openai_client_plain_with_route_metadata_in_body_and_headers(client):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=6)
    completion = raw.parse()
    assert completion.choices[0].message.role == "assistant"
    assert 0 < completion.usage.completion_tokens <= 6
    route = completion.layerroute  # the response's extra top-level field
    assert set(route) == METADATA_KEYS and route["num_layers"] == 3
    assert raw.headers["x-layerroute-step-type"] == route["step_type"]
    assert float(raw.headers["x-layerroute-flops-skipped-frac"]) == route["flops_skipped_frac"]


def test_openai_client_tools(client):
    completion = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=64)
    [call] = completion.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Oslo", "Rome")
    assert completion.choices[0].finish_reason == "tool_calls" and completion.layerroute["step_type"] == "tool_call"


def test_openai_client_streaming_with_usage(client):
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A story"}],
                                           max_tokens=10)
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A story"}],
                                                 max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    last = chunks[-1]
    assert last.choices == [] and last.usage.total_tokens == whole.usage.total_tokens
    assert set(last.layerroute) == METADATA_KEYS
    assert all(not (c.model_extra or {}).get("layerroute") for c in chunks[:-1])


def test_openai_client_json_schema(client):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    completion = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Is water wet?"}], max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}})
    answer = json.loads(completion.choices[0].message.content)
    assert answer["answer"] in ("yes", "no") and isinstance(answer["sure"], bool)


def test_openai_client_compute_dial_and_errors(client):
    off = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                         extra_body={"layerroute": {"routing": "off"}})
    assert off.layerroute["skipped_layers"] == [] and off.layerroute["flops_skipped"] == 0
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context budget") as error:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 500}])
    assert error.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="not among the request's tools"):
        client.chat.completions.create(model="tiny", tools=[WEATHER], messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                  "function": {"name": "launch", "arguments": "{}"}}]}])


@tool
def get_weather(city: Literal["Oslo", "Rome"]) -> str:
    """Get the current weather for a city."""  # an enum: a random model's free string would run to max_tokens
    return f"sunny in {city}"


@wrap_model_call
def call_then_answer(request, handler):
    """A random model would call tools forever: the agent's first step must call one, the next must answer."""
    answered = any(isinstance(message, ToolMessage) for message in request.messages)
    return handler(request.override(tool_choice="none" if answered else "required"))


def test_chat_openai_inside_create_agent(base_url):
    llm = ChatOpenAI(model="tiny", base_url=base_url, api_key="unused", max_tokens=64, max_retries=0,
                     include_response_headers=True)
    agent = create_agent(llm, tools=[get_weather], middleware=[call_then_answer])
    messages = agent.invoke({"messages": [{"role": "user", "content": "Weather in Oslo?"}]})["messages"]
    steps = [m for m in messages if isinstance(m, AIMessage)]
    assert [bool(m.tool_calls) for m in steps] == [True, False]
    assert messages[2].content.startswith("sunny in")  # the tool ran on the call the server parsed
    kinds = [m.response_metadata["headers"]["x-layerroute-step-type"] for m in steps]
    assert kinds == ["tool_call", "planning"]
    assert all(int(m.response_metadata["headers"]["x-layerroute-num-layers"]) == 3 for m in steps)


def test_bounded_load_every_request_gets_its_own_answer(base_url, set_routers):
    """24 concurrent clients, 192 requests over 24 prompts whose routes differ: each answer is the one its prompt
    gets alone, with its own route; none is lost or duplicated."""
    set_routers(0.0, weight_std=200.0, pooling="mean")  # routes that depend on the prompt
    prompts = [f"request {i}: " + "tool plan weather sum"[i % 7:] * (1 + i % 3) for i in range(24)]

    async def run():
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
            async def ask(prompt):
                completion = await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=6)
                return completion.id, completion.choices[0].message.content, completion.layerroute["skipped_layers"]

            expected = {p: (await ask(p))[1:] for p in prompts}  # one at a time
            limit = asyncio.Semaphore(24)

            async def bounded(prompt):
                async with limit:
                    return prompt, await ask(prompt)

            return expected, await asyncio.wait_for(asyncio.gather(*(bounded(p) for p in prompts * 8)), 240)

    expected, results = asyncio.run(run())
    assert len({tuple(route) for _, route in expected.values()}) > 1, "routes should differ between prompts"
    assert len(results) == 192 and len({completion_id for _, (completion_id, *_) in results}) == 192
    mismatched = [prompt for prompt, (_, content, route) in results if (content, route) != expected[prompt]]
    assert not mismatched


def counter(base_url: str, name: str) -> float:
    metrics = httpx.get(base_url.removesuffix("/v1") + "/metrics").text
    return float(re.search(rf"^{name}_total (\S+)$", metrics, re.M).group(1))


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_cancels_its_request(base_url, stream):
    cancelled, abandoned = (counter(base_url, f"layerroute_{name}") for name in ("requests_cancelled",
                                                                               "abandoned_tokens"))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me everything"}], "max_tokens": 2000,
            "stream": stream}
    with httpx.Client(timeout=httpx.Timeout(30, read=None if stream else 0.3)) as client:
        if stream:
            with client.stream("POST", f"{base_url}/chat/completions", json=body) as response:
                for line in response.iter_lines():  # the first generated piece arrives, then the client goes away
                    if line.startswith("data: ") and '"role"' not in line:
                        break
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post(f"{base_url}/chat/completions", json=body)
    deadline = time.monotonic() + 20
    while counter(base_url, "layerroute_abandoned_tokens") == abandoned:  # counted once the row has stopped
        assert time.monotonic() < deadline, "the abandoned request's row did not stop"
        time.sleep(0.02)
    assert counter(base_url, "layerroute_requests_cancelled") == cancelled + 1
    assert 0 < counter(base_url, "layerroute_abandoned_tokens") - abandoned < 2000  # it stopped early
