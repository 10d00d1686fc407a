"""The HTML cost report opened in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

What is checked is what the browser rendered, against numbers recomputed here from the raw JSONL (not from
``CostReport``): the console stays clean, nothing is fetched, the timelines are sized by FLOPs and coloured by step
type, the tables hold the JSONL's sums, and a screenshot is taken.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from layerroute.cli import main as cli_main


def chromium_path() -> str | None:
    return os.environ.get("LAYERROUTE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


pytestmark = pytest.mark.skipif(
    chromium_path() is None,
    reason="no Chromium installed (apt-get install chromium, or set LAYERROUTE_CHROMIUM to its executable)")

USD_PER_TFLOP = 0.05
STEPS_PER_DAY = 2_000_000
NUM_LAYERS = 30
# (trace, step index, step type, input tokens, output tokens, full-depth FLOPs, skipped FLOPs, skipped blocks); the first trace's
# id needs escaping, and its steps arrive out of order
STEPS = [
    ('agent <run> & "1"', 1, "tool_call", 1210, 31, 671_000_000_000, 89_000_000_000, [3, 7, 11, 19]),
    ('agent <run> & "1"', 0, "planning", 980, 118, 593_000_000_000, 0, []),
    ('agent <run> & "1"', 2, "planning", 1530, 96, 852_000_000_000, 28_000_000_000, [11]),
    ("run-2", 0, "tool_call", 640, 22, 351_000_000_000, 70_000_000_000, [2, 3, 7, 11, 19, 25]),
    ("run-2", 1, "tool_call", 760, 27, 418_000_000_000, 41_000_000_000, [7, 19, 25]),
]


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return [{"record_type": "layerroute.step", "trace_id": trace, "run_id": f"{trace}/{index}", "step_index": index,
             "step_type": kind, "input_tokens": tokens_in, "output_tokens": tokens_out, "flops_total": total,
             "flops_skipped": skipped, "flops_executed": total - skipped, "skipped_layers": layers,
             "num_layers": NUM_LAYERS, "latency_s": 0.01 * tokens_out, "model_name": "SmolLM2-135M-Instruct",
             "node": "model"}
            for trace, index, kind, tokens_in, tokens_out, total, skipped, layers in STEPS]


@pytest.fixture(scope="module")
def rendered(records, tmp_path_factory):
    """The report rendered by ``layerroute report`` and opened in Chromium; yields the page and what it logged."""
    folder = tmp_path_factory.mktemp("report")
    jsonl, page_path = folder / "costs.jsonl", folder / "report.html"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in records))
    assert cli_main(["report", str(jsonl), "--html", str(page_path), "--steps-per-day", str(STEPS_PER_DAY),
                     "--usd-per-tflop", str(USD_PER_TFLOP)]) == 0
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path())
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        log = {"console": [], "errors": [], "requests": []}
        page.on("console", lambda message: log["console"].append((message.type, message.text)))
        page.on("pageerror", lambda error: log["errors"].append(str(error)))
        page.on("request", lambda request: log["requests"].append(request.url))
        page.goto(page_path.as_uri(), wait_until="load")
        yield page, log, page_path, folder
        browser.close()


def test_no_console_errors_and_no_requests(rendered):
    _, log, page_path, _ = rendered
    assert log["errors"] == []
    assert [entry for entry in log["console"] if entry[0] in ("error", "warning")] == []
    assert log["requests"] == [page_path.as_uri()]  # the document itself, nothing it would fetch


def test_timelines_are_sized_by_flops_and_coloured_by_type(rendered, records):
    page, *_ = rendered
    drawn = page.evaluate("""() => [...document.querySelectorAll('section.trace')].map(section => ({
        trace: section.dataset.traceId,
        heading: section.querySelector('h3').firstChild.textContent.trim(),
        steps: [...section.querySelectorAll('svg.timeline g.step')].map(g => ({
            index: +g.dataset.stepIndex, type: g.dataset.stepType,
            total: +g.dataset.flopsTotal, skipped: +g.dataset.flopsSkipped,
            layers: g.dataset.skippedLayers, num_layers: +g.dataset.numLayers,
            spent_px: g.querySelector('rect.spent').getBoundingClientRect().width,
            skipped_px: g.querySelector('rect.skipped').getBoundingClientRect().width,
            left_px: g.querySelector('rect.spent').getBoundingClientRect().left,
            fill: getComputedStyle(g.querySelector('rect.spent')).fill,
            blocks_drawn: g.querySelectorAll('rect.skipped-block').length,
            title: g.querySelector('title').textContent}))}))""")
    by_trace = defaultdict(list)
    for row in records:
        by_trace[row["trace_id"]].append(row)
    assert [t["trace"] for t in drawn] == list(by_trace)  # in the order the traces' first steps arrived
    scales = []
    for trace in drawn:
        assert trace["heading"] == trace["trace"]  # escaped in the markup, shown as recorded
        expected = sorted(by_trace[trace["trace"]], key=lambda row: row["step_index"])
        assert [s["index"] for s in trace["steps"]] == [row["step_index"] for row in expected]
        lefts = [s["left_px"] for s in trace["steps"]]
        assert lefts == sorted(lefts)  # drawn left to right in step order
        for step, row in zip(trace["steps"], expected):
            assert (step["type"], step["total"], step["skipped"]) == \
                   (row["step_type"], row["flops_total"], row["flops_skipped"])
            assert step["layers"] == ",".join(map(str, row["skipped_layers"])) and step["num_layers"] == NUM_LAYERS
            assert step["blocks_drawn"] == len(row["skipped_layers"])
            width = step["spent_px"] + step["skipped_px"]
            scales.append(width / row["flops_total"])
            assert step["skipped_px"] / width == pytest.approx(row["flops_skipped"] / row["flops_total"], abs=1e-3)
            assert f"{row['flops_skipped'] / row['flops_total']:.1%} skipped" in step["title"]
            assert f"blocks skipped: {len(row['skipped_layers'])}/{NUM_LAYERS}" in step["title"]
    assert max(scales) == pytest.approx(min(scales), rel=1e-3)  # one FLOP scale for every step of every trace
    fills = defaultdict(set)
    for step in (s for t in drawn for s in t["steps"]):
        fills[step["type"]].add(step["fill"])
    assert all(len(colours) == 1 for colours in fills.values()) and len(set.union(*fills.values())) == len(fills)
    legend = page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('.legend [data-step-type]')]
        .map(s => [s.textContent.trim(), getComputedStyle(s.querySelector('.swatch')).backgroundColor]))""")
    assert {kind: legend[kind] for kind in fills} == {kind: colours.pop() for kind, colours in fills.items()}


def table(page, selector: str) -> list[list[str]]:
    return page.evaluate(f"""() => [...document.querySelectorAll('{selector} tbody tr')]
        .map(tr => [...tr.cells].map(td => td.innerText.trim()))""")


def test_tables_hold_the_jsonl_numbers(rendered, records):
    page, *_ = rendered
    groups = defaultdict(list)
    for row in records:
        groups[row["step_type"]].append(row)
    expected, projection = [], []
    for kind, rows in [*sorted(groups.items()), ("all", records)]:
        total, skipped = sum(r["flops_total"] for r in rows), sum(r["flops_skipped"] for r in rows)
        expected.append([kind, str(len(rows)),
                         f"{sum(r['input_tokens'] for r in rows):,} / {sum(r['output_tokens'] for r in rows):,}",
                         f"{(total - skipped) / 1e9:,.1f}", f"{total / 1e9:,.1f}", f"{skipped / total:.1%}"])
        day = STEPS_PER_DAY / len(records) * USD_PER_TFLOP / 1e12  # dollars a day per FLOP of one recorded step
        projection.append([kind, f"{len(rows) / len(records):.1%}", f"{STEPS_PER_DAY * len(rows) / len(records):,.0f}",
                           f"${total * day:,.2f}", f"${(total - skipped) * day:,.2f}", f"${skipped * day:,.2f}"])
    assert [cells[:6] for cells in table(page, "#step-types")] == expected
    assert table(page, "#projection") == projection
    chart = page.evaluate("""() => [...document.querySelectorAll('#type-chart g.type-bars')].map(g => [
        g.dataset.stepType, +g.dataset.flopsTotal, +g.dataset.flopsExecuted,
        g.querySelector('rect.spent').getBoundingClientRect().width /
        g.querySelector('rect.full').getBoundingClientRect().width])""")
    for (kind, total, executed, ratio), (expected_kind, rows) in zip(chart, sorted(groups.items()), strict=True):
        assert (kind, total) == (expected_kind, sum(r["flops_total"] for r in rows))
        assert executed == sum(r["flops_total"] - r["flops_skipped"] for r in rows)
        assert ratio == pytest.approx(executed / total, abs=1e-3)
    steps = page.evaluate("""() => [...document.querySelectorAll('section.trace')].map(section =>
        [section.dataset.traceId, [...section.querySelectorAll('table.steps tbody tr')]
            .map(tr => [...tr.cells].map(td => td.textContent.trim()))])""")
    for trace, rows in steps:
        recorded = sorted((r for r in records if r["trace_id"] == trace), key=lambda r: r["step_index"])
        assert [cells[0] for cells in rows] == [str(r["step_index"]) for r in recorded]
        for cells, r in zip(rows, recorded):
            blocks = f"{len(r['skipped_layers'])}/{NUM_LAYERS}" + \
                (f" ({', '.join(map(str, r['skipped_layers']))})" if r["skipped_layers"] else "")
            assert cells[1:] == [r["step_type"], "model", f"{r['input_tokens']:,} / {r['output_tokens']:,}",
                                 f"{(r['flops_total'] - r['flops_skipped']) / 1e9:,.1f}",
                                 f"{r['flops_total'] / 1e9:,.1f}", f"{r['flops_skipped'] / r['flops_total']:.1%}",
                                 blocks, f"{r['latency_s']:.3f} s"]


def test_screenshot(rendered):
    page, _, _, folder = rendered
    shot = folder / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 1000 and height > 800  # the whole page, longer than one viewport


def test_readme_screenshot_regenerates(tmp_path):
    """The README's documented command, run on the records it documents, writes a 1000px-wide PNG."""
    root = Path(__file__).resolve().parents[1]
    png = tmp_path / "cost-report.png"
    subprocess.run([sys.executable, str(root / "examples" / "cost_report.py"),
                    str(root / "docs" / "cost-report-records.jsonl"), "--screenshot", str(png),
                    "--chromium", chromium_path()], check=True, capture_output=True, timeout=120)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(data[16:20], "big") == 1000
