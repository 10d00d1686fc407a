"""A multi-step LangChain agent on ChatLayerRoute, with real tools, and the trace's cost report.

    python examples/agent.py
    python examples/agent.py --question "What is the population density of Norway?" --html report.html

The tools: a calculator (safe arithmetic), a lookup in a small country table and a length converter. The model is the
embedded SmolLM2-135M-Instruct with the shipped LayerRoute adapter, so expect a 135M model's reasoning; what the
example shows is the plumbing: every step's type, the blocks it skipped and what it cost. A step whose tool calls are
all malformed does not end the run: the errors go back to the model, which tries again. Each step makes at most one
call, and a step that repeats a call already answered (same tool, same arguments) shows the model looping instead of
answering, so the steps after it must answer in text (tool choice "none": the grammar then allows no call).
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
from pathlib import Path

from langchain.agents import create_agent
from langchain.agents.middleware import AgentState, ModelRequest, after_model, wrap_model_call
from langchain_core.tools import tool
from langgraph.errors import GraphRecursionError

from langchain_layerroute import ChatLayerRoute, layerroute_cost_tracking

COUNTRIES = {
    "norway": {"capital": "Oslo", "population": 5_550_000, "area_km2": 385_207},
    "france": {"capital": "Paris", "population": 68_400_000, "area_km2": 643_801},
    "japan": {"capital": "Tokyo", "population": 124_500_000, "area_km2": 377_975},
    "kenya": {"capital": "Nairobi", "population": 55_100_000, "area_km2": 580_367},
}
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.Pow: operator.pow, ast.USub: operator.neg}


def evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](evaluate(node.operand))
    raise ValueError("only numbers and + - * / ** are allowed")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of numbers with + - * / and **."""
    try:
        return str(evaluate(ast.parse(expression, mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError) as error:
        return f"error: {error}"


@tool
def country_facts(country: str) -> str:
    """Look up the capital, population and area (km2) of a country."""
    facts = COUNTRIES.get(country.strip().lower())
    return str(facts) if facts else f"unknown country {country!r}; known: {', '.join(COUNTRIES)}"


UNITS_TO_METRE = {"km": 1000.0, "m": 1.0, "mile": 1609.344, "ft": 0.3048}
UNITS = {"km": "km", "kilometre": "km", "kilometer": "km", "m": "m", "metre": "m", "meter": "m", "mile": "mile",
         "miles": "mile", "mi": "mile", "ft": "ft", "foot": "ft", "feet": "ft"}


@tool
def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a length between km, m, mile and ft."""
    source, target = UNITS.get(from_unit.strip().lower()), UNITS.get(to_unit.strip().lower())
    if not source or not target:
        return f"error: units must be among {', '.join(UNITS_TO_METRE)}"
    return f"{value * UNITS_TO_METRE[source] / UNITS_TO_METRE[target]:.4g} {target}"


TOOLS = [calculator, country_facts, convert_units]
# the wording of the system prompts the embedded corpus was trained with
SYSTEM_PROMPT = "You are a helpful assistant that can use tools. Think step by step and call a tool when it helps."


@after_model(can_jump_to=["model"])
def retry_malformed_calls(state: AgentState, runtime) -> dict | None:
    """When every call of a step is malformed, hand the errors back to the model instead of ending the run.

    create_agent ends a run at a step without valid tool calls; on the next model call it answers each malformed
    call with an error ToolMessage, which is what the model needs to correct itself.
    """
    last = state["messages"][-1]
    if last.type == "ai" and last.invalid_tool_calls and not last.tool_calls:
        return {"jump_to": "model"}
    return None


@wrap_model_call
def one_call_at_a_time(request: ModelRequest, handler):
    """Each step makes at most one call, and once a step has repeated a call the run already made, every later step
    answers in text.

    The example's tasks are sequential, and a small model's second call in one answer is where it runs away (digits
    until the token limit). It may also call the same tool with the same arguments again and again instead of
    answering from the result it already holds; the repeat shows that it has what it asked for.
    """
    calls = [(call["name"], json.dumps(call["args"], sort_keys=True))
             for message in request.messages if message.type == "ai" for call in message.tool_calls]
    overrides = {"model_settings": {**request.model_settings, "parallel_tool_calls": False}}
    if len(calls) != len(set(calls)):
        overrides["tool_choice"] = "none"
    return handler(request.override(**overrides))


# the agent's middleware, in order (benchmarks/agent_tasks.py runs the same agent)
MIDDLEWARE = [retry_malformed_calls, one_call_at_a_time]


def print_message(message) -> None:
    route = message.response_metadata.get("layerroute") if message.type == "ai" else None
    summary = f"  [{route['step_type']}: skipped {len(route['skipped_layers'])}/{route['num_layers']} blocks, " \
              f"{route['flops_skipped_frac']:.1%} of FLOPs{', retried at full depth' * route['retried']}]" \
        if route else ""
    calls = [f"{c['name']}({c['args']})" for c in getattr(message, "tool_calls", [])]
    calls += [f"malformed call: {c['args']!r}" for c in getattr(message, "invalid_tool_calls", [])]
    print(f"{message.type:>6}: {message.content or '; '.join(calls) or '(empty)'}{summary}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", default="How many people live in Japan?")
    parser.add_argument("--adapter", default=None, help="LayerRoute adapter (default: the shipped one)")
    parser.add_argument("--max-model-steps", type=int, default=6, help="stop the agent after this many model calls")
    parser.add_argument("--costs", type=Path, default=Path("agent_costs.jsonl"))
    parser.add_argument("--html", type=Path, default=None, help="also write the HTML cost report here")
    args = parser.parse_args()

    llm = ChatLayerRoute(adapter=args.adapter, max_tokens=160)
    agent = create_agent(llm, tools=TOOLS, middleware=MIDDLEWARE, system_prompt=SYSTEM_PROMPT)
    args.costs.unlink(missing_ok=True)
    messages = []
    # a model call, its after-model hook and its round of tool calls are three graph steps
    limit = {"recursion_limit": 3 * args.max_model_steps}
    with layerroute_cost_tracking(args.costs) as costs:
        try:
            for state in agent.stream({"messages": [("user", args.question)]}, limit, stream_mode="values"):
                for message in state["messages"][len(messages):]:
                    print_message(message)
                messages = state["messages"]
        except GraphRecursionError:
            print(f"\nstopped: no final answer within {args.max_model_steps} model steps")
    answer = messages[-1] if messages and messages[-1].type == "ai" and not messages[-1].tool_calls else None
    print(f"\nanswer: {answer.content if answer and answer.content else '(the model gave no text answer)'}")
    report = costs.report()
    print()
    print(report.to_markdown())
    if args.html:
        args.html.write_text(report.to_html())
        print(f"HTML report: {args.html}")
    print(f"step records: {args.costs} (render again with: layerroute report {args.costs} --html report.html)")


if __name__ == "__main__":
    main()
