"""Leave one source out: does routing hold on sources the routers never saw, and does it do no harm there?

    python benchmarks/generalisation.py                      # 3 folds (a finetune.py run each) + the shipped adapter
    python benchmarks/generalisation.py --no-folds --adapter runs/s0 runs/s1 runs/s2   # seeds, in distribution only
    python benchmarks/generalisation.py --fold mine=teamA,teamB --fold theirs=teamC \\
        --train logs/train.jsonl --validation logs/val.jsonl --test logs/test.jsonl    # your own sources
    python benchmarks/generalisation.py -- --model Qwen/Qwen2.5-0.5B-Instruct    # after --: finetune.py's flags

In distribution: every ``--adapter`` (trained on every source; several of them: seeds of one recipe) is evaluated on
the ``--test`` split. Leave one source out: for every ``--fold`` (a name and the sources it holds out),
``training/finetune.py`` trains a fresh adapter, with ``--preset``, ``--seed`` and the arguments after ``--``, on
the ``--train`` traces of the other sources (its report on their ``--validation`` traces), so that nothing of it
(router warm-up, LoRA, router refit, familiar regions) has seen the fold's sources; it is then evaluated on the
held-out sources' steps of every split (``--train``, ``--validation`` and ``--test``: none was trained on).
Finished fold runs in ``--work`` are reused and interrupted ones resumed; one started with other arguments is
refused.

Every step is scored in one forward over its context and target, four ways: the frozen base, the adapter at full
depth, the routers alone (familiarity check off) and do-no-harm routing as the adapter serves
(``layerroute.familiarity``). Per source and step type it reports the share of FLOPs skipped and the **skip cost**:
target perplexity routed against the *same adapter at full depth*, which isolates what skipping costs from what LoRA
does; the differential is tool calls' FLOPs skipped minus planning steps'.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layerroute import LayerRouteModel  # noqa: E402
from layerroute.adapter_files import read_adapter_config  # noqa: E402
from layerroute.errors import MissingInputError, UserError, check_output_directory, command  # noqa: E402
from layerroute.evaluation import cases_by_type, perplexity, routing_summary, scored_steps  # noqa: E402
from layerroute.familiarity import familiarity_ignored  # noqa: E402
from layerroute.loading import load_base_model  # noqa: E402
from layerroute.model import ADAPTER_CONFIG, FINGERPRINT_ROWS  # noqa: E402
from layerroute.steps import STEP_TYPES, trace_steps  # noqa: E402
from layerroute.traces import read_sources  # noqa: E402

SHIPPED = ROOT / "layerroute" / "adapters" / "smollm2-135m-instruct"
CORPUS = ROOT / "training" / "data" / "corpus"
# Source groups held out together: the archives the corpus draws on (training/data/PROVENANCE.md), each holding
# out tool calls and planning steps, so that every fold has a differential.
FOLDS = {
    "bfcl+gsm": ("bfcl_single_turn", "bfcl_multi_turn", "gsm8k", "gsm_symbolic"),
    "glaive+reason": ("glaive", "reason_tool_use"),
    "complexfuncbench+cot": ("complexfuncbench", "mmlu_cot", "acpbench_cot"),
}
SETTINGS = ("routers alone", "do no harm")
MAX_TARGET_TOKENS = 192


def parse_fold(text: str) -> tuple[str, tuple[str, ...]]:
    name, _, sources = text.partition("=")
    if not name or not sources:
        raise argparse.ArgumentTypeError(f"--fold {text!r}: write NAME=SOURCE[,SOURCE...]")
    return name, tuple(s for s in sources.split(",") if s)


@command("generalisation")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, nargs="+", default=[SHIPPED],
                        help="adapters trained on every source, evaluated in distribution (several: seeds)")
    parser.add_argument("--train", type=Path, default=CORPUS / "train.jsonl.gz")
    parser.add_argument("--validation", type=Path, default=CORPUS / "validation.jsonl.gz")
    parser.add_argument("--test", type=Path, default=CORPUS / "test.jsonl.gz")
    parser.add_argument("--fold", type=parse_fold, action="append", default=None,
                        help="NAME=SOURCE[,SOURCE...], repeatable (default: the corpus's three archive groups)")
    parser.add_argument("--no-folds", action="store_true", help="only the in-distribution evaluation")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "generalisation", help="where fold runs live")
    parser.add_argument("--preset", default="cpu", help="finetune.py's preset for the fold runs")
    parser.add_argument("--seed", type=int, default=0, help="the fold runs' seed, and the draw of steps")
    parser.add_argument("--steps-per-source", type=int, default=30, help="steps per source and step type")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON result here")
    argv = list(argv)  # @command passes sys.argv[1:] when called without arguments
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.finetune_args = argv[split + 1:]
    folds = {} if args.no_folds else dict(args.fold or FOLDS.items())

    splits = {name: read_sources([path]).traces for name, path in
              (("train", args.train), ("validation", args.validation), ("test", args.test))}
    known = {trace.source for traces in splits.values() for trace in traces}
    for name, sources in folds.items():
        missing = sorted(set(sources) - known)
        if missing:
            raise UserError(f"--fold {name}: no trace has source {', '.join(missing)} (the data's sources: "
                            f"{', '.join(sorted(known))})")
    check_output_directory("--output", args.output)  # written after the folds' training
    for adapter in args.adapter:
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise MissingInputError(f"--adapter {adapter} is not a LayerRoute adapter directory "
                                    f"(it has no {ADAPTER_CONFIG})")
    held_out = {name: [t for traces in splits.values() for t in traces if t.source in sources]
                for name, sources in folds.items()}
    fold_adapters = {name: train_fold(name, sources, splits, held_out[name], args) for name, sources in folds.items()}

    _, recorded = read_adapter_config(args.adapter[0] / ADAPTER_CONFIG, FINGERPRINT_ROWS)
    base, tokenizer = load_base_model(recorded["name_or_path"])
    result = {"steps_per_source": args.steps_per_source, "max_length": args.max_length, "in_distribution": {},
              "folds": {}}
    test_examples = examples_of(splits["test"], tokenizer, args)
    for adapter in args.adapter:
        result["in_distribution"][str(adapter)] = evaluate(adapter, base, test_examples)
    for name, adapter in fold_adapters.items():
        result["folds"][name] = {"held_out": list(folds[name]), "adapter": str(adapter),
                                 **evaluate(adapter, base, examples_of(held_out[name], tokenizer, args))}
    result["summary"] = summarise(result)
    print(markdown(result))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def train_fold(name: str, held_out: tuple[str, ...], splits: dict, held_out_traces: list, args) -> Path:
    """The fold's adapter: ``finetune.py`` on the traces of the other sources, run (or resumed) in ``--work``."""
    directory = args.work / f"{args.preset}-seed{args.seed}" / name
    data = {split: [t for t in splits[split] if t.source not in held_out] for split in ("train", "validation")}
    data["held_out"] = held_out_traces
    for split in ("train", "validation"):
        if not data[split]:
            raise UserError(f"--fold {name} holds out every source of --{split}; nothing is left to train on")
    directory.mkdir(parents=True, exist_ok=True)
    for split, traces in data.items():  # held_out.jsonl.gz: for evaluate.py and dial.py on what the fold never saw
        data[split] = directory / f"{split}.jsonl.gz"
        with gzip.open(data[split], "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in traces)
    adapter, recorded = directory / "adapter", directory / "finetune-args.json"
    settings = ["--preset", args.preset, "--seed", str(args.seed), *args.finetune_args]
    if adapter.exists():
        if not recorded.is_file() or json.loads(recorded.read_text()) != settings:
            raise UserError(f"fold {name}: {adapter} holds a run with other finetune.py arguments than {settings}; "
                            "remove it or choose another --work")
        if (adapter / "report.json").is_file():
            return adapter  # finished
    recorded.write_text(json.dumps(settings) + "\n")
    command = [sys.executable, str(ROOT / "training" / "finetune.py"), *settings, "--data", str(data["train"]),
               "--validation-data", str(data["validation"]), "--output", str(adapter)]
    if (adapter / "checkpoint").exists():
        command.append("--resume")
    print(f"fold {name}: training without {', '.join(held_out)} ({' '.join(command[1:])})", file=sys.stderr)
    if subprocess.run(command).returncode:
        raise UserError(f"fold {name}: finetune.py failed (see above); rerun to resume it")
    return adapter


def examples_of(traces: list, tokenizer, args) -> list:
    """Up to ``--steps-per-source`` steps per source and step type, drawn by ``--seed``, within ``--max-length``."""
    cases, _ = cases_by_type([s for t in traces for s in trace_steps(t)], tokenizer, args.max_length,
                             MAX_TARGET_TOKENS, args.seed, per_source=args.steps_per_source)
    return [example for kind in STEP_TYPES for _, example in cases[kind]]


def evaluate(adapter: Path, base, examples: list) -> dict:
    """Per step type, pooled and per source: steps, perplexity of the frozen base and of the adapter at full depth,
    and for each routing of :data:`SETTINGS` the FLOPs skipped, routed perplexity and skip cost; the differential."""
    model = LayerRouteModel.from_pretrained(adapter, base_model=copy.deepcopy(base)).eval()
    scored = {"base": scored_steps(model, examples, forced_skip=(), lora=False),
              "full depth": scored_steps(model, examples, forced_skip=())}
    with familiarity_ignored(model):
        scored["routers alone"] = scored_steps(model, examples)
    scored["do no harm"] = scored_steps(model, examples)
    sources = sorted({e.source for e in examples})
    return {"pooled": table(scored, model.num_layers, lambda r: True),
            "by_source": {s: table(scored, model.num_layers, lambda r, s=s: r["source"] == s) for s in sources}}


def table(scored: dict[str, list[dict]], num_layers: int, chosen) -> dict:
    rows = {name: [r for r in records if chosen(r)] for name, records in scored.items()}
    base, full = perplexity(rows["base"]), perplexity(rows["full depth"])
    skipped = {name: routing_summary(rows[name], num_layers)["by_step_type"] for name in SETTINGS}
    routed = {name: perplexity(rows[name]) for name in SETTINGS}
    entry = {}
    for kind in STEP_TYPES:
        if kind not in full:
            continue
        entry[kind] = {"steps": sum(r["step_type"] == kind for r in rows["full depth"]),
                       "perplexity_base": base[kind], "perplexity_full_depth": full[kind]}
        for name in SETTINGS:
            entry[kind][name] = {"flops_skipped_frac": skipped[name][kind]["flops_skipped_frac"],
                                 "perplexity_routed": routed[name][kind],
                                 "skip_cost": routed[name][kind] / full[kind] - 1}
    if len(entry) == 2:
        entry["differential_points"] = {name: 100 * (entry["tool_call"][name]["flops_skipped_frac"]
                                                     - entry["planning"][name]["flops_skipped_frac"])
                                        for name in SETTINGS}
    return entry


def summarise(result: dict) -> dict:
    """The targets of leave-one-source-out routing, per routing setting: the folds' mean differential against the
    in-distribution one (mean over adapters), the sign in every fold, the worst planning skip cost and whether any
    fold's routed planning perplexity is above the frozen base's; in distribution, FLOPs skipped per type (mean and
    range over adapters)."""
    summary = {}
    for name in SETTINGS:
        inside = [r["pooled"] for r in result["in_distribution"].values()]
        entry = {"in_distribution": {kind: spread([r[kind][name]["flops_skipped_frac"] for r in inside])
                                     for kind in STEP_TYPES if all(kind in r for r in inside)}}
        entry["in_distribution"]["skip_cost"] = {kind: spread([r[kind][name]["skip_cost"] for r in inside])
                                                 for kind in STEP_TYPES if all(kind in r for r in inside)}
        differentials = [r["differential_points"][name] for r in inside if "differential_points" in r]
        if differentials:
            entry["in_distribution"]["differential_points"] = spread(differentials)
        folds = [f["pooled"] for f in result["folds"].values()]
        if folds and differentials:
            fold_differentials = [f["differential_points"][name] for f in folds if "differential_points" in f]
            planning = [f["planning"] for f in folds if "planning" in f]
            entry["folds"] = {
                "differential_points": fold_differentials,
                "differential_ratio": (statistics.fmean(fold_differentials) / statistics.fmean(differentials)
                                       if statistics.fmean(differentials) else None),  # None: no differential inside
                "same_sign_every_fold": all(d * statistics.fmean(differentials) > 0 for d in fold_differentials),
                "worst_planning_skip_cost": max(p[name]["skip_cost"] for p in planning),
                "planning_above_frozen_base": [fold for fold, f in result["folds"].items() if "planning" in
                                               f["pooled"] and f["pooled"]["planning"][name]["perplexity_routed"]
                                               > f["pooled"]["planning"]["perplexity_base"]],
            }
        summary[name] = entry
    return summary


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def markdown(result: dict) -> str:
    header = ("| {what} | step type | steps | ppl base | ppl full depth | " + " | ".join(
        f"{n}: FLOPs skipped, skip cost" for n in SETTINGS) + " |")
    rule = "|---|---|---|---|---|" + "---|" * len(SETTINGS)

    def rows(label: str, entry: dict) -> list[str]:
        lines = []
        for kind in STEP_TYPES:
            if kind in entry:
                values = entry[kind]
                cells = [f"{values[n]['flops_skipped_frac']:.1%}, {values[n]['skip_cost']:+.1%}" for n in SETTINGS]
                lines.append(f"| {label} | {kind} | {values['steps']} | {values['perplexity_base']:.3f} | "
                             f"{values['perplexity_full_depth']:.3f} | " + " | ".join(cells) + " |")
        return lines

    out = []
    for adapter, evaluated in result["in_distribution"].items():
        out += [f"In distribution (test split), {adapter}:", "", header.format(what="source"), rule]
        for source, entry in evaluated["by_source"].items():
            out += rows(source, entry)
        out += rows("**pooled**", evaluated["pooled"]) + [""]
    if result["folds"]:
        out += ["Leave one source out (every split of the held-out sources):", "", header.format(what="fold: source"),
                rule]
        for fold, evaluated in result["folds"].items():
            for source, entry in evaluated["by_source"].items():
                out += rows(f"{fold}: {source}", entry)
            out += rows(f"**{fold}: pooled**", evaluated["pooled"])
        out.append("")
    out += ["| summary | " + " | ".join(SETTINGS) + " |", "|---|" + "---|" * len(SETTINGS)]
    summary = result["summary"]

    def cell(name: str, *path, fmt="{:.1%}"):
        value = summary[name]
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
            if value is None:
                return "-"
        if isinstance(value, dict):  # a spread over adapters
            text = fmt.format(value["mean"])
            return text + (f" [{fmt.format(value['min'])}, {fmt.format(value['max'])}]" if value["n"] > 1 else "")
        if isinstance(value, list):
            return ", ".join(f"{v:.1f}" if isinstance(v, float) else v for v in value) or "none"
        return str(value) if isinstance(value, bool) else fmt.format(value)

    for label, path, fmt in (
            ("in distribution: tool calls, FLOPs skipped", ("in_distribution", "tool_call"), "{:.1%}"),
            ("in distribution: planning, FLOPs skipped", ("in_distribution", "planning"), "{:.1%}"),
            ("in distribution: tool calls, skip cost", ("in_distribution", "skip_cost", "tool_call"), "{:+.1%}"),
            ("in distribution: planning, skip cost", ("in_distribution", "skip_cost", "planning"), "{:+.1%}"),
            ("in distribution: differential (points)", ("in_distribution", "differential_points"), "{:.1f}"),
            ("folds: differential per fold (points)", ("folds", "differential_points"), "{}"),
            ("folds: mean differential / in distribution", ("folds", "differential_ratio"), "{:.2f}"),
            ("folds: same sign in every fold", ("folds", "same_sign_every_fold"), "{}"),
            ("folds: worst planning skip cost", ("folds", "worst_planning_skip_cost"), "{:+.1%}"),
            ("folds: planning perplexity above the frozen base", ("folds", "planning_above_frozen_base"), "{}")):
        if label.startswith("folds") and not result["folds"]:
            continue
        out.append(f"| {label} | " + " | ".join(cell(n, *path, fmt=fmt) for n in SETTINGS) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
