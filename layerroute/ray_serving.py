"""``layerroute serve --ray``: the same OpenAI-compatible app on Ray Serve, replicas behind Ray's HTTP proxy.

Every replica loads the model and runs the app of :func:`layerroute.serving.create_app`, with its own batching; Ray's
proxy spreads requests over the replicas. Needs the ``ray`` extra (``pip install "layerroute[ray]"``)::

    from ray import serve
    from layerroute.ray_serving import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app("Qwen/Qwen2.5-0.5B-Instruct", "runs/mine", replicas=2), name="layerroute", route_prefix="/")

A replica's ``/metrics`` counts that replica's requests only (the proxy picks the replica); Ray Serve's own metrics
cover the deployment as a whole.
"""

from __future__ import annotations

import logging
import os
from typing import Any

# A Ray started by this process for one machine keeps its own services on the loopback address: Ray's single-node
# mode (the one it runs on macOS and Windows). Its cluster mode would put even a local instance on the machine's
# network address; joining a cluster (RAY_ADDRESS) needs that mode. Read when ray is first imported.
if "RAY_ADDRESS" not in os.environ:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from ray import serve  # noqa: E402
from ray.serve.deployment import Application  # noqa: E402

from .serving import DEFAULT_HOST, DEFAULT_PORT  # noqa: E402

DEPLOYMENT_NAME = "layerroute"

logger = logging.getLogger(__name__)


def build_app(model: str | None = None, adapter: str | None = None, device: str | None = None, *,
              replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0, **app_options: Any) -> Application:
    """The Ray Serve application: ``replicas`` copies of the app, each with ``num_cpus`` / ``num_gpus``.

    ``model``, ``adapter`` and ``device`` are those of :meth:`~layerroute.chat.ChatEngine.load`; ``app_options`` those
    of :func:`~layerroute.serving.create_app`. Each replica loads the model itself, when it starts.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")

    def app_on_replica():
        from .chat import ChatEngine
        from .serving import create_app

        return create_app(ChatEngine.load(model, adapter, device), **app_options)

    ingress = serve.ingress(app_on_replica)()
    deployment = serve.deployment(ingress, name=DEPLOYMENT_NAME, num_replicas=replicas,
                                  ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus})
    return deployment.bind()


def serve_on_ray(model: str | None = None, adapter: str | None = None, device: str | None = None, *,
                 replicas: int = 1, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info",
                 **app_options: Any) -> None:
    """Start Ray Serve's proxy on ``host:port`` and serve :func:`build_app` there until interrupted.

    Without ``RAY_ADDRESS`` (a cluster to join), Ray runs locally, its own services on the loopback address.
    ``log_level`` is Ray Serve's (its controller, proxy and replica logs).
    """
    logging_config = {"log_level": log_level.upper()}
    logger.info("starting Ray Serve on http://%s:%d: %d replica(s) of %s", host, port, replicas,
                model or "the embedded model")
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    serve.run(build_app(model, adapter, device, replicas=replicas, **app_options), name=DEPLOYMENT_NAME,
              route_prefix="/", blocking=True, logging_config=logging_config)
