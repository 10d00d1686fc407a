"""Does batching keep the savings of routing? ``layerroute serve`` at concurrency 1, 4 and 16, against three baselines.

Every configuration is a real server (uvicorn on 127.0.0.1, one process, one loaded model shared by all) answering
the same agent steps from the test split (their contexts and tool schemas, greedy, --max-tokens new tokens each):

- ``grouped``: the server as shipped: dynamic batching; every step of a batch is routed and prefilled alone, then the
  steps that skip the same blocks are decoded as one batch (a group runs none of the blocks its rows skip);
- ``ungrouped``: the same batching with grouping off: a block runs when any row of the batch keeps it;
- ``routing off``: the grouped server, every request with ``{"layerroute": {"routing": "off"}}`` (full depth);
- ``batch-1``: the same server with a batch size of 1 (sequential serving).

For each concurrency, --requests requests are sent by that many concurrent clients, configurations interleaved so
machine drift hits them alike. tokens/s is generated tokens over wall time. FLOPs saved, per step type (as the server
labels the step), is ``1 - executed FLOPs / full-depth FLOPs``, read from each server's Prometheus
counters: what the server really ran, not what each step's routers skipped. Last, the server's overhead at
concurrency 1 against in-process ``ChatLayerRoute`` calls on the same steps.

    python benchmarks/serve_throughput.py                              # embedded SmolLM2-135M + shipped adapter, CPU
    python benchmarks/serve_throughput.py --requests 8 --max-tokens 8  # a quick look
    python benchmarks/serve_throughput.py --model DIR --adapter none   # any base (a smoke test on a tiny model)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from langchain_core.messages import convert_to_messages
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from langchain_layerroute import ChatLayerRoute  # noqa: E402
from layerroute.chat import ChatEngine  # noqa: E402
from layerroute.serving import create_app  # noqa: E402
from layerroute.steps import trace_steps  # noqa: E402
from layerroute.traces import read_traces  # noqa: E402

CONFIGS = {  # name: (app options, request dial)
    "grouped": ({}, None),
    "ungrouped": ({"grouping": False}, None),
    "routing off": ({}, {"routing": "off"}),
    "batch-1": ({"max_batch_size": 1}, None),
}


class Server:
    """An app on a free 127.0.0.1 port, served by uvicorn in a thread of this process."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()


def flop_counters(url: str) -> dict[tuple[str, str], float]:
    """``(counter, step_type) -> value`` of the server's FLOP counters."""
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if family.name in ("layerroute_flops_executed", "layerroute_flops_skipped"):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    values[family.name, sample.labels["step_type"]] = sample.value
    return values


async def run_phase(url: str, bodies: list[dict], concurrency: int) -> tuple[float, int]:
    """Send ``bodies`` with ``concurrency`` clients; wall seconds and generated tokens."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def send(body):
            async with limit:
                response = await client.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                return response.json()["usage"]["completion_tokens"]

        began = time.perf_counter()
        tokens = await asyncio.gather(*(send(body) for body in bodies))
    return time.perf_counter() - began, sum(tokens)


def saved_by_type(before: dict, after: dict) -> dict[str, float]:
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    saved = {}
    for kind in sorted({kind for _, kind in delta}):
        executed = delta.get(("layerroute_flops_executed", kind), 0.0)
        skipped = delta.get(("layerroute_flops_skipped", kind), 0.0)
        if executed + skipped:
            saved[kind] = skipped / (executed + skipped)
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base model (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default=None, help="adapter directory (default: the shipped one; 'none')")
    parser.add_argument("--data", default=str(ROOT / "training" / "data" / "corpus" / "test.jsonl.gz"))
    parser.add_argument("--requests", type=int, default=32, help="requests per configuration and concurrency")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-prompt-tokens", type=int, default=768, help="steps with longer contexts are left out")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    args = parser.parse_args()

    engine = ChatEngine.load(args.model, args.adapter)
    name = engine.name
    steps = [step for trace in read_traces(args.data).traces for step in trace_steps(trace)]
    by_type = {kind: [s for s in steps if s.step_type == kind] for kind in ("tool_call", "planning")}
    chosen = []
    for pair in zip(*by_type.values()):  # the two step types in turn
        for step in pair:
            if engine.prepare(step.context, tools=step.tools).prompt_tokens <= args.max_prompt_tokens:
                chosen.append(step)
    chosen = chosen[: args.requests]
    bodies = [{"model": name, "messages": s.context, "tools": s.tools, "max_tokens": args.max_tokens}
              for s in chosen]
    print(f"{len(bodies)} steps ({sum(s.step_type == 'tool_call' for s in chosen)} tool calls), "
          f"{args.max_tokens} new tokens at most, model {name}")

    servers = {}
    for config, (options, _) in CONFIGS.items():
        if options or "grouped" not in servers:
            servers[config] = Server(create_app(engine, batch_window_ms=args.batch_window_ms, **options))
        else:
            servers[config] = servers["grouped"]
    try:
        # warm-up: every step's grammar compiled once (the cache is the engine's, shared by all servers)
        asyncio.run(run_phase(servers["grouped"].url, [{**b, "max_tokens": 1} for b in bodies], 1))
        rows = []
        for concurrency in args.concurrency:
            for config, (_, dial) in CONFIGS.items():
                url = servers[config].url
                phase = [{**b, "layerroute": dial} for b in bodies] if dial else bodies
                before = flop_counters(url)
                seconds, tokens = asyncio.run(run_phase(url, phase, concurrency))
                saved = saved_by_type(before, flop_counters(url))
                rows.append((concurrency, config, tokens / seconds, saved))
                print(f"  c={concurrency:<3} {config:<12} {tokens / seconds:7.1f} tok/s  "
                      + "  ".join(f"{kind} {100 * frac:5.1f}%" for kind, frac in saved.items()), flush=True)

        # server overhead at concurrency 1: the same steps in process through ChatLayerRoute, each step timed both
        # ways back to back, in alternating order, so that drift in the machine's speed hits both alike
        llm = ChatLayerRoute(model=args.model, adapter=args.adapter, max_tokens=args.max_tokens)
        local, remote = [], []
        with httpx.Client(base_url=servers["grouped"].url, timeout=600) as client:
            for index, (step, body) in enumerate(zip(chosen, bodies)):
                bound = llm.bind_tools(step.tools) if step.tools else llm
                calls = [(local, lambda: bound.invoke(convert_to_messages(step.context))),
                         (remote, lambda: client.post("/v1/chat/completions", json=body).raise_for_status())]
                for times, call in calls if index % 2 == 0 else calls[::-1]:
                    began = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - began)
    finally:
        for server in {id(s): s for s in servers.values()}.values():
            server.close()

    kinds = sorted({kind for *_, saved in rows for kind in saved})
    print("\n| concurrency | configuration | tokens/s | " + " | ".join(f"FLOPs saved, {k}" for k in kinds) + " |")
    print("|---|---|---|" + "---|" * len(kinds))
    for concurrency, config, rate, saved in rows:
        cells = " | ".join(f"{100 * saved[k]:.1f}%" if k in saved else "-" for k in kinds)
        print(f"| {concurrency} | {config} | {rate:.1f} | {cells} |")
    overhead = statistics.mean(remote) / statistics.mean(local) - 1
    print(f"\nserver overhead at concurrency 1: {1000 * statistics.mean(remote):.0f} ms per request over HTTP vs "
          f"{1000 * statistics.mean(local):.0f} ms in process (ChatLayerRoute): {100 * overhead:+.1f}%")


if __name__ == "__main__":
    main()
