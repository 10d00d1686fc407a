"""benchmarks/generalisation.py end to end on a tiny model: a fold trains without its sources, is evaluated on them,
is reused when finished, and bad folds are refused before anything trains."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from layerroute import LayerRouteModel, load_base_model

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "training" / "data" / "corpus"
SOURCES = ("bfcl_single_turn", "gsm8k", "glaive")


def load_benchmark(name: str = "generalisation"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_split(name: str, directory: Path, per_source: int) -> Path:
    """The first ``per_source`` traces of each of :data:`SOURCES` in the corpus split ``name``."""
    with gzip.open(CORPUS / f"{name}.jsonl.gz", "rt") as handle:
        records = [json.loads(line) for line in handle]
    kept = [r for source in SOURCES for r in [r for r in records if r["source"] == source][:per_source]]
    path = directory / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return path


@pytest.fixture
def tiny_setup(tiny_chat_dir, tmp_path):
    adapter = tmp_path / "in-distribution"
    LayerRouteModel.from_base(load_base_model(tiny_chat_dir)[0], base_model_name_or_path=tiny_chat_dir) \
        .save_pretrained(adapter)
    data = ["--train", str(small_split("train", tmp_path, 4)), "--validation",
            str(small_split("validation", tmp_path, 1)), "--test", str(small_split("test", tmp_path, 2))]
    finetune = ["--", "--model", tiny_chat_dir, "--router-warmup", "1", "--steps", "1", "--batch-size", "2",
                "--max-length", "512", "--report-steps", "2", "--familiarity-steps", "4"]
    return ["--adapter", str(adapter), *data, "--work", str(tmp_path / "work"), "--steps-per-source", "2"], finetune


def test_a_fold_trains_without_its_sources_and_is_evaluated_on_them(tiny_setup, tmp_path, capsys):
    arguments, finetune = tiny_setup
    benchmark = load_benchmark()
    output = tmp_path / "result.json"
    assert benchmark.main([*arguments, "--fold", "dialogues=glaive", "--output", str(output), *finetune]) == 0
    fold = tmp_path / "work" / "cpu-seed0" / "dialogues"
    with gzip.open(fold / "train.jsonl.gz", "rt") as handle:
        trained_on = {json.loads(line)["source"] for line in handle}
    assert trained_on == {"bfcl_single_turn", "gsm8k"}  # the held-out source never reaches training
    result = json.loads(output.read_text())
    evaluated = result["folds"]["dialogues"]
    assert evaluated["held_out"] == ["glaive"] and set(evaluated["by_source"]) == {"glaive"}
    for kind in ("tool_call", "planning"):
        entry = evaluated["pooled"][kind]
        assert entry["steps"] == 2
        for setting in ("routers alone", "do no harm"):
            assert 0.0 <= entry[setting]["flops_skipped_frac"] <= 1.0
            assert entry[setting]["perplexity_routed"] > 1.0
    (inside,) = result["in_distribution"].values()
    assert set(inside["by_source"]) == set(SOURCES)
    assert inside["pooled"]["tool_call"]["do no harm"]["flops_skipped_frac"] == 0.0  # fresh routers keep every block
    summary = result["summary"]["do no harm"]["folds"]
    assert set(summary) == {"differential_points", "differential_ratio", "same_sign_every_fold",
                            "worst_planning_skip_cost", "planning_above_frozen_base"}
    assert "| summary |" in capsys.readouterr().out

    # benchmarks/novelty.py probes the same fold: scores fitted on its training steps, flags on the held-out ones
    novelty = tmp_path / "novelty.json"
    assert load_benchmark("novelty").main([
        str(fold), "--test", arguments[arguments.index("--test") + 1], "--fit-steps", "8", "--calibration-steps", "3",
        "--components", "2", "--steps-per-source", "2", "--output", str(novelty)]) == 0
    probed = json.loads(novelty.read_text())
    assert probed["held_out"] == ["glaive"] and probed["steps"] == {"in distribution": 4, "held out": 4}
    for quantile in probed["scores"]["subspace"].values():
        assert 0.0 <= quantile["auroc_held_out_vs_in_distribution"] <= 1.0
        fallback = quantile["step-level fallback"]["held out"]["planning"]
        assert fallback["flops_skipped_frac"] <= probed["routers alone"]["held out"]["planning"]["flops_skipped_frac"]
    assert "| mahalanobis q0.99 |" in capsys.readouterr().out

    # finished: reused, not trained again; asked with other finetune.py arguments: refused
    assert benchmark.main([*arguments, "--fold", "dialogues=glaive", *finetune]) == 0
    assert "training without" not in capsys.readouterr().err
    assert benchmark.main([*arguments, "--fold", "dialogues=glaive", *finetune, "--lr", "0.01"]) == 2
    assert "holds a run with other finetune.py arguments" in capsys.readouterr().err


def test_a_fold_of_unknown_sources_is_refused_before_training(tiny_setup, tmp_path, capsys):
    arguments, finetune = tiny_setup
    assert load_benchmark().main([*arguments, "--fold", "x=glaive,nope", *finetune]) == 2
    assert "--fold x: no trace has source nope (the data's sources: bfcl_single_turn, glaive, gsm8k)" in \
        capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_an_output_in_a_missing_directory_is_refused_before_training(tiny_setup, tmp_path, capsys):
    arguments, finetune = tiny_setup
    output = tmp_path / "no" / "result.json"
    assert load_benchmark().main([*arguments, "--fold", "x=glaive", "--output", str(output), *finetune]) == 2
    assert f"--output {output}: the directory {tmp_path / 'no'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
