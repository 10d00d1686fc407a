"""``layerroute serve --ray``: the app as a Ray Serve deployment with 2 CPU replicas behind Ray's proxy, on a local
Ray instance on 127.0.0.1 (about half a minute: Ray starts, each replica loads the tiny model)."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

ray_serving = pytest.importorskip("layerroute.ray_serving", exc_type=ImportError)  # before ray: Ray on loopback
import ray  # noqa: E402
from ray import serve  # noqa: E402

from layerroute.chat import ChatEngine  # noqa: E402

DEPLOYMENT_NAME, build_app = ray_serving.DEPLOYMENT_NAME, ray_serving.build_app

pytestmark = [pytest.mark.enable_socket, pytest.mark.allow_hosts(["127.0.0.1"])]


@pytest.fixture(scope="module")
def proxy_url(tiny_chat_dir):
    with socket.socket() as probe:  # a free port for Ray's proxy
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(tiny_chat_dir, replicas=2, num_cpus=0.5, model_name="tiny", default_max_tokens=5),
                  name=DEPLOYMENT_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_behind_rays_proxy_answer_like_the_in_process_engine(proxy_url, tiny_chat_dir, set_routers):
    status = serve.status().applications[DEPLOYMENT_NAME].deployments[DEPLOYMENT_NAME]
    assert status.replica_states == {"RUNNING": 2}
    engine = ChatEngine.load(tiny_chat_dir)
    set_routers(engine.model.config.router_init_bias)  # fresh routers, as the replicas load them
    prompts = [f"question {i}: " + "weather plan sum"[i % 5:] for i in range(8)]
    expected = {}
    for prompt in prompts:
        [answer] = engine.generate([engine.prepare([{"role": "user", "content": prompt}], max_tokens=5)])
        expected[prompt] = (answer.content, answer.route["skipped_layers"])

    def ask(prompt):
        response = httpx.post(f"{proxy_url}/v1/chat/completions", timeout=120,
                              json={"model": "tiny", "messages": [{"role": "user", "content": prompt}]})
        assert response.status_code == 200, response.text
        body = response.json()
        assert response.headers["x-layerroute-num-layers"] == "3"
        return prompt, (body["choices"][0]["message"]["content"], body["layerroute"]["skipped_layers"])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, prompts * 3))
    assert all(answer == expected[prompt] for prompt, answer in results)
    assert httpx.get(f"{proxy_url}/health").json()["model"] == "tiny"
    assert httpx.post(f"{proxy_url}/v1/chat/completions", json={"model": "x", "messages": []}).status_code == 404
