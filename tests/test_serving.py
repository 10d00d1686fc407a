"""``layerroute serve`` in process (FastAPI's TestClient) on a tiny random Llama with SmolLM2's tokenizer: the OpenAI
wire format, route metadata in body, headers and streams, the compute dial, bad input, metrics, and batching grouped
by routed skip set."""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest
from conftest import METADATA_KEYS, WEATHER
from fastapi.testclient import TestClient
from langchain_core.messages import HumanMessage
from langchain_layerroute import ChatLayerRoute

from layerroute.batching import BatchScheduler
from layerroute.chat import ChatEngine, canonical_messages
from layerroute.serving import create_app

VERDICT = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
           "required": ["answer", "sure"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tiny_chat_dir):
    return ChatEngine.load(tiny_chat_dir)


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, model_name="tiny", context_budget=300, default_max_tokens=8)) as client:
        yield client


@pytest.fixture
def prompt_dependent_routers(set_routers):
    """Routers whose decisions depend on the whole prompt."""
    set_routers(0.0, weight_std=200.0, pooling="mean")


def chat(client, content="Hello there", **body):
    return client.post("/v1/chat/completions",
                       json={"model": "tiny", "messages": [{"role": "user", "content": content}], **body})


def sse_chunks(response) -> list[dict]:
    lines = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_completion_is_openai_shaped_with_route_metadata_in_body_and_headers(client, tiny_chat_dir):
    response = chat(client)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    route = body["layerroute"]
    assert set(route) == METADATA_KEYS and route["num_layers"] == 3 and route["flops_total"] > 0
    assert response.headers["x-layerroute-step-type"] == route["step_type"]
    assert int(response.headers["x-layerroute-flops-total"]) == route["flops_total"]
    assert response.headers["x-layerroute-skipped-layers"] == ",".join(map(str, route["skipped_layers"]))
    assert {f"x-layerroute-{key.replace('_', '-')}" for key in METADATA_KEYS} <= set(response.headers)
    # one code path: ChatLayerRoute gives the same answer, usage and route for the same step
    message = ChatLayerRoute(model=tiny_chat_dir, max_tokens=8).invoke([HumanMessage("Hello there")])
    assert message.content == choice["message"]["content"]
    assert message.usage_metadata["input_tokens"] == usage["prompt_tokens"]
    local = message.response_metadata["layerroute"]
    assert {k: v for k, v in local.items() if k != "latency_s"} == {k: v for k, v in route.items() if k != "latency_s"}


def test_chat_layerroute_takes_the_same_dial_per_instance_and_per_call(tiny_chat_dir, set_routers):
    set_routers(4.0)  # every block kept with probability sigmoid(4) = 0.982: a threshold above that skips them all
    llm = ChatLayerRoute(model=tiny_chat_dir, max_tokens=3)
    assert llm.invoke("hi").response_metadata["layerroute"]["skipped_layers"] == []
    assert llm.invoke("hi", skip_threshold=0.99).response_metadata["layerroute"]["skipped_layers"] == [0, 1, 2]
    strict = ChatLayerRoute(model=tiny_chat_dir, max_tokens=3, skip_threshold=0.99)
    assert strict.invoke("hi").response_metadata["layerroute"]["skipped_layers"] == [0, 1, 2]
    assert strict.invoke("hi", routing="off").response_metadata["layerroute"]["skipped_layers"] == []
    with pytest.raises(ValueError, match="skip_threshold"):
        llm.invoke("hi", skip_threshold=1.5)


def test_tools_and_tool_choice_give_openai_tool_calls(client):
    body = chat(client, "Weather in Oslo?", tools=[WEATHER], tool_choice={"type": "function",
                                                                        "function": {"name": "get_weather"}},
                max_tokens=64).json()
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Oslo", "Rome")  # the grammar holds the schema
    assert body["layerroute"]["step_type"] == "tool_call"
    none = chat(client, "Weather in Oslo?", tools=[WEATHER], tool_choice="none", max_tokens=20).json()
    assert "tool_calls" not in none["choices"][0]["message"]
    assert "<tool_call>" not in none["choices"][0]["message"]["content"]


def test_parallel_tool_calls_reaches_the_grammar(client, parallel_tool_calls_asked):
    for body in ({"parallel_tool_calls": False}, {}):
        assert chat(client, "Weather in Oslo?", tools=[WEATHER], **body).status_code == 200
    assert parallel_tool_calls_asked == [False, True]


def test_tool_results_in_the_history_render(client):
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "tools": [WEATHER]})
    assert response.status_code == 200, response.text
    assert canonical_messages(messages, [WEATHER])[2]["name"] == "get_weather"


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT}},
    {"type": "json_object"},
])
def test_response_format_is_held_by_the_grammar(client, response_format):
    content = chat(client, "Is water wet?", response_format=response_format, max_tokens=60).json()[
        "choices"][0]["message"]["content"]
    if response_format["type"] == "json_schema":
        jsonschema.validate(json.loads(content), VERDICT)
    else:  # any JSON object: a random model's keys run on until max_tokens, but they are inside one
        assert content.startswith("{")


def test_stream_carries_route_metadata_on_the_final_usage_chunk(client):
    plain = chat(client, "Tell me a story", max_tokens=10).json()
    chunks = sse_chunks(chat(client, "Tell me a story", max_tokens=10, stream=True,
                             stream_options={"include_usage": True}))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    with_route = [c for c in chunks if "layerroute" in c]
    assert len(with_route) == 1 and with_route[0] is chunks[-1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert set(chunks[-1]["layerroute"]) == METADATA_KEYS
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == plain["choices"][0]["finish_reason"]
    # without a usage chunk the metadata rides on the last chunk, the one with the finish reason
    bare = sse_chunks(chat(client, "Tell me a story", max_tokens=10, stream=True))
    assert "usage" not in bare[-1] and bare[-1]["choices"][0]["finish_reason"] and "layerroute" in bare[-1]


def test_streamed_tool_calls_come_whole_and_no_markup_leaks(client):
    chunks = sse_chunks(chat(client, "Weather?", tools=[WEATHER], tool_choice="required", max_tokens=64, stream=True))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert "<tool_call>" not in text
    calls = [call for c in chunks for call in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [call["function"]["name"] for call in calls] == ["get_weather"] and calls[0]["index"] == 0
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_sampling_seed_stop_and_max_completion_tokens(client):
    def content(**body):
        return chat(client, "Count: one two three", **body).json()["choices"][0]["message"]["content"]

    sampled = dict(temperature=1.0, top_p=0.9, max_tokens=12)
    assert content(seed=7, **sampled) == content(seed=7, **sampled)
    assert len({content(seed=seed, **sampled) for seed in range(4)}) > 1
    usage = chat(client, "Count: one two three", max_completion_tokens=3, max_tokens=9).json()["usage"]
    assert usage["completion_tokens"] == 3  # the newer field wins
    free = content(max_tokens=12)
    stop = free.strip()[:2]
    assert stop and stop not in content(max_tokens=12, stop=[stop])


def test_the_compute_dial_turns_routing_off_per_request(client, set_routers):
    set_routers(-5.0)  # routers that skip every block
    assert chat(client).json()["layerroute"]["skipped_layers"] == [0, 1, 2]
    off = chat(client, layerroute={"routing": "off"}).json()["layerroute"]
    assert off["skipped_layers"] == [] and off["flops_skipped"] == 0
    # a threshold below every keep probability keeps every block
    assert chat(client, layerroute={"skip_threshold": 0.001}).json()["layerroute"]["skipped_layers"] == []
    for dial in ({"routing": "sometimes"}, {"skip_threshold": 1.5}, {"depth": 3}):
        assert chat(client, layerroute=dial).status_code == 400


@pytest.mark.parametrize(("body", "status", "needle"), [
    ("{not json", 400, "not valid JSON"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "unknown role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text only"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "launch", "arguments": "{}"}}]}],
      "tools": [WEATHER]}, 400, "not among the request's tools"),
    ({"model": "tiny", "messages": [{"role": "tool", "tool_call_id": "c9", "content": "x"}]}, 400, "no earlier"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "launch",
      "tools": [WEATHER]}, 400, "neither one of"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n:"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": [None]}, 400, "must be an object"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "tools[0] must be"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}, 400,
     "unsupported response_format"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
      "response_format": {"type": "json_object"}}, 400, "cannot be combined"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}, 400, "cannot compile"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
])
def test_bad_requests_get_openai_errors(client, body, status, needle):
    response = client.post("/v1/chat/completions", content=body if isinstance(body, str) else json.dumps(body),
                           headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"


def test_a_context_over_the_budget_gets_400_with_the_counts(client):
    response = chat(client, "word " * 400)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["context_budget"] == 300
    assert error["prompt_tokens"] > 300 and str(error["prompt_tokens"]) in error["message"]


def test_models_health_unknown_paths_and_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]
    assert client.get("/v1/nothing").status_code == 404
    route = chat(client, "count the metrics").json()["layerroute"]
    metrics = client.get("/metrics").text
    assert 'layerroute_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert 'layerroute_requests_total{endpoint="/v1/chat/completions",status="404"}' in metrics
    kind = route["step_type"]
    for name in ("prompt_tokens", "completion_tokens", "flops_executed", "flops_skipped"):
        assert f'layerroute_{name}_total{{step_type="{kind}"}}' in metrics
    assert f'layerroute_request_duration_seconds_bucket{{le="60.0",step_type="{kind}"}}' in metrics


def test_api_key_is_demanded_when_set(engine):
    with TestClient(create_app(engine, model_name="tiny", api_key="s3cret", default_max_tokens=2)) as client:
        request = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        assert client.post("/v1/chat/completions", json=request).status_code == 401
        wrong = client.post("/v1/chat/completions", json=request, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert client.post("/v1/chat/completions", json=request,
                           headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200  # probes need no key


# ---------------------------------------------------------------------------------------------- batching
PROMPTS = [f"{i} " + word * 4 for i, word in enumerate(
    ["zebra", "42 + 17", "Bonjour", "<tool>", "SELECT *", "def f():", "!!!", "weather", "Oslo", "plan it"])]


def steps(engine, max_tokens=6):
    return [engine.prepare([{"role": "user", "content": p}], max_tokens=max_tokens) for p in PROMPTS]


def test_grouped_batches_keep_every_rows_answer_and_savings(engine, prompt_dependent_routers):
    alone = [engine.generate([step])[0] for step in steps(engine)]
    assert len({tuple(a.route["skipped_layers"]) for a in alone}) > 1, "routes should differ between prompts"
    for grouping in (True, False):
        scheduler = BatchScheduler(engine, max_batch_size=16, window_s=0.5, grouping=grouping)
        try:
            jobs = [scheduler.submit(step) for step in steps(engine)]
            served = [job.future.result(timeout=60) for job in jobs]
        finally:
            scheduler.close()
        assert max(s.batch_rows for s in served) > 1
        for one, batched in zip(alone, served):
            assert batched.answer.content == one.content
            assert batched.answer.route["skipped_layers"] == one.route["skipped_layers"]
            assert batched.answer.route["flops_total"] == one.route["flops_total"]
            saved = one.route["flops_total"] - batched.flops_executed
            if grouping:  # a group runs none of the blocks its rows skip (and no prompt position twice)
                assert saved == one.route["flops_skipped"]
                assert batched.answer.route["flops_skipped"] == one.route["flops_skipped"]
            else:  # a mixed batch runs a block when any row keeps it
                assert saved <= one.route["flops_skipped"]
        if not grouping:
            assert any(one.route["flops_total"] - b.flops_executed < one.route["flops_skipped"]
                       for one, b in zip(alone, served))


def test_a_routed_answer_that_ends_empty_is_retried_unless_the_request_says_not(client, set_routers):
    set_routers(-5.0)  # every block skipped
    stop = chat(client, "hi").json()["choices"][0]["message"]["content"].strip()[0]  # cuts the routed answer
    kept = chat(client, "hi", stop=[stop], layerroute={"retry_empty": False}).json()["layerroute"]
    assert not kept["retried"] and kept["skipped_layers"] == [0, 1, 2]
    response = chat(client, "hi", stop=[stop])
    assert response.json()["layerroute"]["retried"] and response.headers["x-layerroute-retried"] == "true"
    kind = response.json()["layerroute"]["step_type"]
    assert f'layerroute_retried_total{{step_type="{kind}"}} 1.0' in client.get("/metrics").text


def test_a_row_retried_at_full_depth_counts_its_discarded_attempt(engine, set_routers):
    set_routers(-5.0)  # every block skipped
    [routed] = engine.generate(steps(engine)[:1])
    stop = routed.text.strip()[0]  # cuts the routed answers to nothing
    batch = [engine.prepare([{"role": "user", "content": p}], max_tokens=6, stop=stop) for p in PROMPTS[:2]]
    scheduler = BatchScheduler(engine, max_batch_size=16, window_s=0.5)
    try:
        served = [job.future.result(timeout=60) for job in [scheduler.submit(step) for step in batch]]
    finally:
        scheduler.close()
    retried = [s for s in served if s.answer.route["retried"]]
    assert retried, "the first prompt's routed answer ends empty"
    for one in retried:
        route = one.answer.route
        assert route["skipped_layers"] == [] and route["flops_discarded"] > 0
        assert one.flops_executed == route["flops_total"] + route["flops_discarded"]


def test_a_cancelled_row_stops_while_its_batch_goes_on(engine):
    batch = steps(engine, max_tokens=12)[:2]
    free = engine.generate(batch, cancelled=lambda row: False)
    cut = engine.generate(batch, cancelled=lambda row: row == 0)
    assert cut[0].completion_tokens < free[0].completion_tokens
    assert cut[1].content == free[1].content


def test_a_cancelled_waiting_job_is_never_generated(engine):
    scheduler = BatchScheduler(engine, max_batch_size=16, window_s=0.3)
    try:
        first, second = scheduler.submit(steps(engine)[0]), scheduler.submit(steps(engine)[1])
        second.cancel()
        served = first.future.result(timeout=60)
        assert served.batch_rows == 1 and second.future.cancelled()
    finally:
        scheduler.close()


def test_concurrent_http_requests_each_get_their_own_answer(engine, prompt_dependent_routers):
    expected = {}
    for prompt in PROMPTS:
        [answer] = engine.generate([engine.prepare([{"role": "user", "content": prompt}], max_tokens=6)])
        expected[prompt] = (answer.content, answer.route["skipped_layers"])
    results, barrier = {}, threading.Barrier(len(PROMPTS))
    with TestClient(create_app(engine, model_name="tiny", default_max_tokens=6, batch_window_ms=200)) as client:
        def call(prompt):
            barrier.wait()
            body = chat(client, prompt).json()
            results[prompt] = (body["choices"][0]["message"]["content"], body["layerroute"]["skipped_layers"])

        threads = [threading.Thread(target=call, args=(p,)) for p in PROMPTS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == expected
        batched = client.get("/metrics").text
    assert 'layerroute_batch_rows_bucket{le="1.0"} 10.0' not in batched  # some rows shared a batch


def test_serve_command_refuses_replicas_without_ray_and_a_missing_model(capsys):
    from layerroute.cli import main

    assert main(["serve", "--replicas", "2"]) == 2
    assert "--replicas needs --ray" in capsys.readouterr().err
    assert main(["serve", "--model", "/no/such/model"]) == 2
    assert "error:" in capsys.readouterr().err


def test_rows_of_one_prefilled_batch_stream_their_own_text(engine, set_routers):
    set_routers(4.0)  # every row keeps every block: one group, decoded as one batch from the prefilled caches
    scheduler = BatchScheduler(engine, max_batch_size=16, window_s=0.5)
    try:
        pieces = {prompt: [] for prompt in PROMPTS[:4]}
        jobs = {prompt: scheduler.submit(engine.prepare([{"role": "user", "content": prompt}], max_tokens=8),
                                         on_text=pieces[prompt].append) for prompt in pieces}
        served = {prompt: job.future.result(timeout=60) for prompt, job in jobs.items()}
    finally:
        scheduler.close()
    for prompt, result in served.items():
        assert result.batch_rows == 4
        streamed = "".join(pieces[prompt]).strip()
        assert streamed + jobs[prompt].deltas.tail(result.answer.content) == result.answer.content
    assert len({result.answer.content for result in served.values()}) > 1
