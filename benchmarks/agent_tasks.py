"""Do agents still succeed under routing? Small multi-step tasks with real tools, routed against full depth.

Each task is a question for the agent of `examples/agent.py` (`langchain.agents.create_agent` with `ChatLayerRoute`,
its calculator, country table and length converter, its middleware: a retry of malformed calls, one call per step,
and an answer in text once a call repeats) with a checkable answer: a capital, or a number within 1%. Every task runs
twice, with routing on and with `routing="off"` (the same adapter at full depth, every block running), for at most
--max-model-steps model calls each. Printed: task success with its 95% interval and the tasks only one of the two
solved; model steps per task; FLOPs saved per step type (from the cost records the run writes).

    python benchmarks/agent_tasks.py                   # embedded SmolLM2-135M with the shipped adapter, CPU
    python benchmarks/agent_tasks.py --tasks 8         # the first 8 tasks only
    python benchmarks/agent_tasks.py --skip-threshold 0.05   # the routed run at a lower dial setting
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "examples"))

from agent import COUNTRIES, MIDDLEWARE, SYSTEM_PROMPT, TOOLS, UNITS_TO_METRE  # noqa: E402
from langchain.agents import create_agent  # noqa: E402
from langgraph.errors import GraphRecursionError  # noqa: E402

from langchain_layerroute import ChatLayerRoute, layerroute_cost_tracking  # noqa: E402
from layerroute.evaluation import NUMBER, paired_difference, wilson_interval  # noqa: E402


def tasks() -> list[tuple[str, str | float]]:
    """(question, expected answer): 12 lookups, 4 lookups with arithmetic, 8 calculations, 8 conversions."""
    found: list[tuple[str, str | float]] = []
    for country, facts in COUNTRIES.items():
        name = country.title()
        found += [(f"What is the capital of {name}?", facts["capital"]),
                  (f"How many people live in {name}?", float(facts["population"])),
                  (f"What is the area of {name} in km2?", float(facts["area_km2"])),
                  (f"What is the population density of {name} in people per km2?",
                   facts["population"] / facts["area_km2"])]
    for a, b, op in ((17, 24, "*"), (1234, 4321, "+"), (900, 36, "/"), (2, 10, "**"), (365, 24, "*"),
                     (10000, 1.05, "*"), (81, 9, "-"), (7.5, 4, "*")):
        found.append((f"What is {a} {op} {b}?", float(eval(f"{a} {op} {b}"))))  # noqa: S307 (literal table)
    for value, source, target in ((10, "km", "mile"), (26.2, "mile", "km"), (5280, "ft", "mile"), (100, "m", "ft"),
                                  (3, "km", "m"), (1, "mile", "ft"), (42, "km", "mile"), (1500, "m", "mile")):
        found.append((f"How many {target}s are {value} {source}?",
                      value * UNITS_TO_METRE[source] / UNITS_TO_METRE[target]))
    return found


def solved(answer: str, expected: str | float) -> bool:
    if isinstance(expected, str):
        return expected.lower() in answer.lower()
    numbers = [float(n.replace(",", "")) for n in NUMBER.findall(answer)]
    return any(abs(n - expected) <= 0.01 * abs(expected) for n in numbers)


def run(llm: ChatLayerRoute, question: str, max_model_steps: int) -> tuple[str, int]:
    """The agent's final text answer ('' when it gave none) and the model steps it took."""
    agent = create_agent(llm, tools=TOOLS, middleware=MIDDLEWARE, system_prompt=SYSTEM_PROMPT)
    messages = []
    try:
        for state in agent.stream({"messages": [("user", question)]}, {"recursion_limit": 3 * max_model_steps},
                                  stream_mode="values"):
            messages = state["messages"]
    except GraphRecursionError:
        pass
    steps = sum(1 for m in messages if m.type == "ai")
    last = messages[-1] if messages else None
    answer = last.content if last is not None and last.type == "ai" and not last.tool_calls else ""
    return (answer if isinstance(answer, str) else ""), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=None, help="LayerRoute adapter (default: the shipped one)")
    parser.add_argument("--tasks", type=int, default=None, help="run only the first N tasks")
    parser.add_argument("--max-model-steps", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--skip-threshold", type=float, default=None,
                        help="the routed run's compute dial (ChatLayerRoute's skip_threshold; default: the adapter's "
                             "own router_threshold); lower skips less")
    parser.add_argument("--retry-empty", action=argparse.BooleanOptionalAction, default=True,
                        help="a routed answer that ends empty is generated again at full depth (ChatLayerRoute's "
                             "retry_empty; its FLOPs count against the savings)")
    args = parser.parse_args()

    chosen = tasks()[: args.tasks]
    results = {}
    for routing in ("auto", "off"):
        llm = ChatLayerRoute(adapter=args.adapter, max_tokens=args.max_tokens, routing=routing,
                             skip_threshold=args.skip_threshold, retry_empty=args.retry_empty)
        outcomes = []
        with layerroute_cost_tracking() as costs:
            for number, (question, expected) in enumerate(chosen):
                answer, steps = run(llm, question, args.max_model_steps)
                outcomes.append({"ok": solved(answer, expected), "steps": steps})
                print(f"[{routing}] {number + 1}/{len(chosen)} {'ok  ' if outcomes[-1]['ok'] else 'fail'} "
                      f"{question} -> {answer[:80]!r}", flush=True)
        results[routing] = (outcomes, costs.report(), sum(r.flops_discarded > 0 for r in costs.records))

    threshold = "the adapter's" if args.skip_threshold is None else args.skip_threshold
    print()
    print(f"tasks={len(chosen)} max_model_steps={args.max_model_steps} adapter={args.adapter or 'shipped'} "
          f"retry_empty={args.retry_empty} skip_threshold={threshold}")
    print()
    print("| model | tasks solved | 95% interval | model steps per task | steps retried at full depth | "
          "FLOPs saved: tool_call | planning |")
    print("|---|---|---|---|---|---|---|")
    for routing, label in (("auto", "LayerRoute routed"), ("off", "same adapter, full depth")):
        outcomes, report, retried = results[routing]
        wins = sum(o["ok"] for o in outcomes)
        low, high = wilson_interval(wins, len(outcomes))
        saved = {kind: f"{row['flops_saved_frac']:.1%} ({row['steps']} steps)"
                 for kind, row in report.by_step_type.items()}
        print(f"| {label} | {wins}/{len(outcomes)} ({wins / len(outcomes):.0%}) | [{low:.0%}, {high:.0%}] | "
              f"{sum(o['steps'] for o in outcomes) / len(outcomes):.2f} | {retried} | {saved.get('tool_call', '-')} | "
              f"{saved.get('planning', '-')} |")
    paired = paired_difference(results["off"][0], results["auto"][0], "ok")
    print(f"\nrouted minus full depth: {paired['difference_points']:+.1f} points "
          f"(95% interval {paired['ci95_points'][0]:+.1f} to {paired['ci95_points'][1]:+.1f}); solved only at full "
          f"depth: {paired['first_only']}, only routed: {paired['second_only']}")


if __name__ == "__main__":
    main()
