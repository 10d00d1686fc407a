"""From traces to model steps: every assistant message is a step whose context is everything before it.

A step's type (``tool_call`` when the message carries tool calls, else ``planning``) is kept for evaluation and
reports only; training never sees it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from .traces import Trace

STEP_TYPES = ("tool_call", "planning")


@dataclass
class Step:
    """One assistant message of a trace, with its context.

    Attributes:
        trace_id: the trace it comes from.
        index: position of the assistant message among the trace's assistant messages.
        context: every message before it, canonical form.
        tools: the tool schemas available to the agent.
        target: the assistant message to produce.
        step_type: ``"tool_call"`` or ``"planning"``.
        source: the data set of the trace (:attr:`Trace.source`), for per-source reports.
    """

    trace_id: str
    index: int
    context: list[dict]
    tools: list[dict]
    target: dict
    step_type: str
    source: str = "unknown"


def step_type(message: dict) -> str:
    return "tool_call" if message.get("tool_calls") else "planning"


def trace_steps(trace: Trace) -> list[Step]:
    steps = []
    for position, message in enumerate(trace.messages):
        if message["role"] == "assistant":
            steps.append(
                Step(trace.id, len(steps), trace.messages[:position], trace.tools, message, step_type(message),
                     trace.source)
            )
    return steps


def count_steps(traces: list[Trace]) -> dict[str, int]:
    counts = Counter(step.step_type for trace in traces for step in trace_steps(trace))
    return {kind: counts.get(kind, 0) for kind in STEP_TYPES}


# ---------------------------------------------------------------------------------------------- rendering
HERMES_TOOLS_PROMPT = (
    "You may call one or more functions to assist with the user query. Available functions:\n<tools>\n{tools}\n"
    "</tools>\nTo call a function, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}"
    "\n</tool_call>"
)


def _type_of(schema) -> str:
    """A parameter's type as a signature shows it. Schemas come from logs as written, so anything that is not a
    recognisable type or enum reads as ``any`` rather than failing a step."""
    if not isinstance(schema, dict):
        return "any"
    if isinstance(schema.get("enum"), list):
        return "|".join(json.dumps(value) for value in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array" and isinstance(schema.get("items"), dict):
        return f"list[{_type_of(schema['items'])}]"
    if isinstance(kind, list) and kind and all(isinstance(k, str) for k in kind):
        return "|".join(kind)
    return kind if isinstance(kind, str) else "any"


def tool_signature(tool: dict) -> str:
    """One line per tool: ``name(required: type, optional?: type) - description``.

    The fallback rendering for templates without tool support uses signatures instead of full JSON schemas: the
    same names, types, enums and required fields in about a third of the tokens, which is what makes training on a
    CPU affordable. Parameter descriptions are left out.
    """
    function = tool["function"]
    parameters = function.get("parameters") or {}
    required = set(parameters.get("required") or [])
    arguments = ", ".join(
        f"{name}{'' if name in required else '?'}: {_type_of(schema)}"
        for name, schema in (parameters.get("properties") or {}).items()
    )
    description = (function.get("description") or "").strip()
    return f"{function['name']}({arguments})" + (f" - {description}" if description else "")


def supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tool schemas and tool calls itself (Qwen2.5 does)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in template and "tool_calls" in template


def render_tool_call(call: dict) -> str:
    function = call["function"]
    payload = {"name": function["name"], "arguments": json.loads(function["arguments"])}
    return f"<tool_call>\n{json.dumps(payload, ensure_ascii=False)}\n</tool_call>"


def hermes_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The documented fallback for chat templates without tool support (SmolLM2's): Hermes conventions in plain
    text. Tools join the system prompt inside ``<tools>`` as one-line signatures (:func:`tool_signature`), tool
    calls become ``<tool_call>`` JSON blocks in the assistant's content, and tool results become user turns wrapped
    in ``<tool_response>``, as Qwen2.5's own template renders them."""
    rendered = []
    if tools:
        block = HERMES_TOOLS_PROMPT.format(tools="\n".join(tool_signature(t) for t in tools))
        if messages and messages[0]["role"] == "system":
            rendered.append({"role": "system", "content": f"{messages[0]['content']}\n\n# Tools\n\n{block}".strip()})
            messages = messages[1:]
        else:
            rendered.append({"role": "system", "content": f"# Tools\n\n{block}"})
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = "\n".join(render_tool_call(call) for call in message["tool_calls"])
            content = f"{message['content']}\n{calls}" if message.get("content") else calls
            rendered.append({"role": "assistant", "content": content})
        elif message["role"] == "tool":
            rendered.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            rendered.append({"role": message["role"], "content": message.get("content") or ""})
    return rendered


def render_chat(tokenizer, messages: list[dict], tools: list[dict], add_generation_prompt: bool) -> str:
    if supports_tools(tokenizer):
        chat = [
            {**m, "tool_calls": [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]} if m.get("tool_calls") else m
            for m in messages
        ]
        return tokenizer.apply_chat_template(
            chat, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return tokenizer.apply_chat_template(
        hermes_messages(messages, tools), tokenize=False, add_generation_prompt=add_generation_prompt
    )


@dataclass
class TokenizedStep:
    """A step as token ids: ``input_ids = context_ids + target_ids``.

    Attributes:
        context_ids: the rendered context ending with the assistant prompt, left-truncated to the budget.
        target_ids: the assistant message as the model must produce it (end-of-turn token included).
        step_type: kept for evaluation and reports only.
        source: the data set of the trace, kept for per-source reports only.
        context_role: the role of the context's last message (``"user"``, ``"tool"``, ...; ``None``: not known).
            Do-no-harm routing runs every block after a role the routers were not fitted to decide after
            (:meth:`layerroute.LayerRouteConfig.routes_after`).
    """

    context_ids: list[int]
    target_ids: list[int]
    step_type: str
    trace_id: str
    source: str = "unknown"
    context_role: str | None = None


def tokenize_step(step: Step, tokenizer, max_context_tokens: int = 1024, max_target_tokens: int = 256) -> TokenizedStep:
    """Render and tokenize a step.

    Contexts longer than ``max_context_tokens`` are cut from the left, keeping the system prompt and tool schemas
    (the rendered system turn) whole; targets longer than ``max_target_tokens`` are cut at the right.
    """
    prompt = render_chat(tokenizer, step.context, step.tools, add_generation_prompt=True)
    full = render_chat(tokenizer, step.context + [step.target], step.tools, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError(f"the chat template renders step {step.trace_id}/{step.index} inconsistently")
    target = full[len(prompt):].rstrip("\n")
    context_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    target_ids = tokenizer(target, add_special_tokens=False).input_ids[:max_target_tokens]
    if len(context_ids) > max_context_tokens:
        system = [m for m in step.context[:1] if m["role"] == "system"]
        head = render_chat(tokenizer, system, step.tools, add_generation_prompt=False) if system or step.tools else ""
        head_ids = tokenizer(head, add_special_tokens=False).input_ids if head else []
        keep = max_context_tokens - len(head_ids)
        if keep <= 0:
            raise ValueError(
                f"step {step.trace_id}/{step.index}: the system prompt and tool schemas alone take {len(head_ids)} "
                f"tokens, more than the context budget of {max_context_tokens}"
            )
        context_ids = head_ids + context_ids[-keep:]
    return TokenizedStep(context_ids, target_ids, step.step_type, step.trace_id, step.source,
                         step.context[-1]["role"] if step.context else None)
