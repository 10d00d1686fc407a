"""training/evaluate.py end to end on a tiny model: every section of the report, static pruning included."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from layerroute import LayerRouteModel, load_base_model
from layerroute.training import fix_routes

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_reports_every_model_and_step_type(tiny_chat_dir, tmp_path, capsys):
    for name, pruned in (("routed", None), ("lora-only", None), ("static", [1])):
        model = LayerRouteModel.from_base(load_base_model(tiny_chat_dir)[0], base_model_name_or_path=tiny_chat_dir)
        if pruned:
            fix_routes(model, pruned)
        model.save_pretrained(tmp_path / name)
    data = [str(FIXTURES / "openai.jsonl"), str(FIXTURES / "gsm8k.jsonl")]
    code = load_script("evaluate").main([
        "--adapter", str(tmp_path / "routed"), "--lora-only", str(tmp_path / "lora-only"),
        "--static-pruning", str(tmp_path / "static"), "--data", *data, "--max-steps", "3",
        "--generation-steps", "2", "--timing-steps", "1", "--timing-repeats", "1",
        "--records", str(tmp_path / "records.jsonl")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["by_step_type"]) == {"tool_call", "planning"}
    for values in result["by_step_type"].values():
        assert set(values["perplexity"]) == {"base", "layerroute", "layerroute_full_depth", "lora_only",
                                             "static_pruning"}
        assert values["flops_skipped_frac"] == 0.0  # fresh routers keep every block
        assert values["skip_cost"] == 0.0
    assert set(result["agent_quality"]) == {"base", "layerroute", "layerroute_full_depth", "lora_only",
                                            "static_pruning"}
    for summary in result["agent_quality"].values():
        assert summary["valid"]["steps"] == summary["arguments_correct"]["steps"] == result["by_step_type"][
            "tool_call"]["steps"]
    # fresh routers keep every block: routed and full depth generate the same steps
    assert all(p["first_only"] == p["second_only"] == 0 for p in result["routed_against_full_depth"].values())
    assert set(result["by_source"]) >= {"unknown"}
    for kinds in result["by_source"].values():
        for values in kinds.values():
            assert values["perplexity"]["layerroute"] == values["perplexity"]["layerroute_full_depth"]
            assert values["perplexity"]["base"] > 0 and values["skip_cost"] == 0.0
    # one of three blocks deleted for every step, on both step types
    assert all(abs(v["layers_skipped_frac"] - 1 / 3) < 1e-9 and v["flops_skipped_frac"] > 0
               for v in result["static_pruning"].values())
    clock = result["wall_clock_by_type"]
    assert set(clock) == {"tool_call", "planning"} and all(v["full_depth_s"] > 0 for v in clock.values())
    assert "| tool_call |" in (tmp_path / "routed" / "evaluation.md").read_text()
    # every generated step is written out with what was generated, so a wrong call can be read
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    for name, summary in result["agent_quality"].items():
        written = [r for r in records if r["model"] == name and r["step_type"] == "tool_call"]
        assert len(written) == summary["valid"]["steps"]
        assert all(isinstance(r["generated"], str) and "valid" in r and "error" in r for r in written)
        # the form is scored apart from the choice to call: over the steps that began a call
        assert sum(r["called_a_tool"] for r in written) == summary.get("valid_when_called", {}).get("steps", 0)


def test_across_sources_takes_each_source_in_turn_and_a_smaller_limit_takes_a_prefix():
    from types import SimpleNamespace

    from layerroute.evaluation import across_sources

    cases = [(SimpleNamespace(source=source), index) for index, source in enumerate("aaaabbc")]
    chosen = [index for _, index in across_sources(cases, 10)]
    assert chosen == [0, 4, 6, 1, 5, 2, 3]  # a, b, c, then a and b, then what a has left
    for limit in range(len(cases) + 1):  # benchmarks/dial.py generates the first of the steps it scores
        assert [index for _, index in across_sources(cases, limit)] == chosen[:limit]
