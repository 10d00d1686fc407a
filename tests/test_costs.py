"""Step-cost records, aggregation, pricing and the rendered reports (markdown, self-contained HTML)."""

from __future__ import annotations

import json

import pytest

from layerroute.cli import main as cli_main
from layerroute.costs import CostReport, PriceModel, StepCostRecord, read_records


def record(trace: str, index: int, kind: str, total: int, skipped: int) -> StepCostRecord:
    return StepCostRecord(trace_id=trace, run_id=f"{trace}-{index}", step_index=index, step_type=kind,
                          input_tokens=100, output_tokens=20, flops_total=total, flops_skipped=skipped,
                          skipped_layers=[1, 2] if skipped else [], num_layers=10, latency_s=0.5)


RECORDS = [record("a", 0, "tool_call", 1000, 200), record("a", 1, "planning", 3000, 0),
           record("b", 0, "tool_call", 1000, 100), record("b", 1, "tool_call", 2000, 300)]


def test_aggregates_per_step_type_and_projection():
    report = CostReport.from_records(RECORDS, PriceModel(usd_per_tflop=1000.0), steps_per_day=4000)
    tool = report.by_step_type["tool_call"]
    assert tool["steps"] == 3 and tool["flops_total"] == 4000 and tool["flops_executed"] == 3400
    assert tool["flops_saved_frac"] == pytest.approx(0.15)
    assert report.by_step_type["planning"]["flops_saved_frac"] == 0
    assert report.totals["traces"] == 2 and report.totals["flops_executed"] == 6400
    # 4000 steps a day at the observed mean of 1750 full / 1600 spent FLOPs per step, $1000 per TFLOP.
    assert report.projection["full_depth_usd_per_day"] == pytest.approx(4000 * 1750 / 1e12 * 1000)
    assert report.projection["saved_usd_per_day"] == pytest.approx(4000 * 150 / 1e12 * 1000)
    assert report.projection["observed_mix"] == {"tool_call": 0.75, "planning": 0.25}
    # per type: its share of the day at its own mean cost; the types add up to the total
    tool_day = report.projection["by_step_type"]["tool_call"]
    assert tool_day["steps_per_day"] == 3000
    assert tool_day["saved_usd_per_day"] == pytest.approx(3000 * 600 / 3 / 1e12 * 1000)
    assert sum(v["full_depth_usd_per_day"] for v in report.projection["by_step_type"].values()) == \
        pytest.approx(report.projection["full_depth_usd_per_day"])


def test_a_discarded_routed_attempt_counts_as_executed(tmp_path):
    retried = record("c", 0, "planning", 1000, 0)
    retried.flops_discarded = 400
    report = CostReport.from_records([retried], PriceModel(usd_per_tflop=1000.0))
    assert report.by_step_type["planning"]["flops_executed"] == 1400
    assert report.by_step_type["planning"]["flops_saved_frac"] == pytest.approx(-0.4)
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({**retried.to_dict(), "flops_discarded": -1}) + "\n")
    with pytest.raises(ValueError, match="flops_discarded >= 0"):
        read_records(path)


def test_gpu_hour_pricing():
    price = PriceModel(usd_per_gpu_hour=3.6, achieved_tflops=1.0)  # $0.001 per TFLOP
    assert price.usd(2e12) == pytest.approx(0.002)
    with pytest.raises(ValueError):
        PriceModel(usd_per_gpu_hour=0)


def test_markdown_and_self_contained_html():
    report = CostReport.from_records(RECORDS)
    markdown = report.to_markdown()
    assert "| tool_call | 3 |" in markdown and "Projection at 1,000,000 steps a day" in markdown
    page = report.to_html()
    assert page.startswith("<!doctype html>") and "<svg" in page
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "default-src 'none'" in page  # the browser itself refuses any fetch
    assert page.count('<section class="trace"') == 2 and page.count('<g class="step"') == 4


def test_html_escapes_recorded_strings_and_caps_the_timelines():
    hostile = record('<img src=x onerror="alert(1)">', 0, "tool_call", 9000, 0)
    page = CostReport.from_records([*RECORDS, hostile]).to_html(max_traces=2)
    assert "<img" not in page and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    # only the two most expensive traces get a timeline: the 9,000-FLOP one and "a" (4,000), not "b" (3,000)
    assert 'data-trace-id="a"' in page and 'data-trace-id="b"' not in page
    assert "Showing the 2 most expensive of 3 traces" in page


def test_cli_report(tmp_path, capsys):
    path = tmp_path / "costs.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in RECORDS))
    assert [r.step_type for r in read_records(path)] == ["tool_call", "planning", "tool_call", "tool_call"]
    html_path = tmp_path / "report.html"
    assert cli_main(["report", str(path), "--html", str(html_path), "--steps-per-day", "10"]) == 0
    assert "LayerRoute trace cost report" in capsys.readouterr().out
    assert '<table id="step-types">' in html_path.read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n')
    assert cli_main(["report", str(bad)]) == 2
    assert "bad.jsonl:1: not a LayerRoute step-cost record" in capsys.readouterr().err
