"""The trace cost report as one self-contained HTML page: inline CSS and SVG, no scripts, no external resources.

The page carries a Content-Security-Policy that forbids every fetch, so a browser refuses (and logs) anything that
would leave the file; the browser test relies on that. Every chart element also carries its record's raw numbers as
``data-*`` attributes, so what is drawn can be checked against the JSONL it came from.
"""

from __future__ import annotations

from collections import defaultdict
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .costs import CostReport, StepCostRecord

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
TIMELINE_WIDTH = 880  # px for the most expensive trace shown; the others are drawn to the same FLOP scale
BAR_HEIGHT = 26
STRIP_HEIGHT = 7  # the per-step strip of skipped blocks under each bar
ALL_ROW = ' class="all"'  # the totals row under each per-type table
LABEL_MIN_WIDTH = 64  # px a step needs before its skip fraction is written on it

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5rem auto;max-width:930px;color:#1d1d1f;
padding:0 1rem}
h1{font-size:1.5rem;margin:0 0 .3rem}h2{font-size:1.15rem;margin:1.8rem 0 .6rem}
.meta{color:#555;margin:0 0 1rem}
.cards{display:flex;gap:.8rem;flex-wrap:wrap}
.card{flex:1;border:1px solid #ddd;border-radius:6px;padding:.5rem .9rem}
.card b{display:block;font-size:1.35rem}.card span{color:#555;font-size:.85rem}
table{border-collapse:collapse;font-size:.9rem;font-variant-numeric:tabular-nums}
td,th{border:1px solid #d6d6d6;padding:.25rem .55rem;text-align:right;white-space:nowrap}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3;font-weight:600;white-space:normal}
tr.all td{font-weight:600;background:#fafafa}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.35em;vertical-align:-.05em}
.legend{display:flex;gap:1.2rem;flex-wrap:wrap;font-size:.9rem;margin:.2rem 0 .8rem;color:#333}
.legend .skipped{width:1.6em;background:linear-gradient(90deg,#777 50%,#ddd 50%)}
.trace{margin:0 0 1.1rem}.trace h3{font-size:.95rem;margin:0 0 .25rem;font-weight:600}
.trace h3 small{font-weight:400;color:#555}
details summary{cursor:pointer;color:#444;font-size:.85rem;margin:.2rem 0}
details table{margin:.3rem 0 .6rem}
svg text{font-family:inherit}
.note{color:#555;font-size:.9rem}
"""


def colours(report: CostReport) -> dict[str, str]:
    return {kind: PALETTE[index % len(PALETTE)] for index, kind in enumerate(report.by_step_type)}


def gflops(flops: float) -> str:
    return f"{flops / 1e9:,.1f}"


def usd(value: float) -> str:
    # per-day projections of a small model can be fractions of a cent: keep significant digits instead of "$0.00"
    return f"${value:,.2f}" if abs(value) >= 1 or value == 0 else f"${value:.3g}"


def plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'s' * (count != 1)}"


def skipped_blocks(record: StepCostRecord) -> str:
    blocks = ", ".join(str(layer) for layer in sorted(record.skipped_layers))
    return f"{len(record.skipped_layers)}/{record.num_layers}" + (f" ({blocks})" if blocks else "")


HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>LayerRoute trace cost report</title><style>{css}</style></head>
<body><h1>LayerRoute trace cost report</h1>"""


def render(report: CostReport, max_traces: int = 50) -> str:
    skipped = report._skipped_note()
    skipped_text = f'\n<p class="note" id="skipped">{escape(skipped)}</p>' if skipped else ""
    if report.empty:
        return (f'{HEAD.format(css=CSS)}\n<p class="meta" id="no-steps">No steps: there are no step-cost records '
                f"to report on.</p>{skipped_text}\n</body></html>\n")
    palette = colours(report)
    totals, p = report.totals, report.projection
    models = sorted({r.model_name for r in report.records if r.model_name})
    model_text = f" Model: {escape(', '.join(models))}." if models else ""
    return f"""{HEAD.format(css=CSS)}
<p class="meta">{plural(totals['steps'], 'step')} in {plural(totals['traces'], 'trace')}.{model_text}
Prices: {escape(report.price.describe())}.</p>{skipped_text}
<div class="cards">
<div class="card" id="card-flops"><b>{totals['flops_saved_frac']:.1%}</b><span>of FLOPs skipped:
{gflops(totals['flops_executed'])} of {gflops(totals['flops_total'])} GFLOPs spent</span></div>
<div class="card" id="card-blocks"><b>{totals['mean_layers_skipped_frac']:.1%}</b><span>of blocks skipped per step,
on average</span></div>
<div class="card" id="card-saving"><b>{usd(p['saved_usd_per_day'])}/day</b><span>saved at {p['steps_per_day']:,}
steps a day with this mix</span></div>
</div>
<h2>Per step type</h2>
{totals_table(report, palette)}
{type_chart(report, palette)}
<h2>Savings projection</h2>
<p class="note">At {p['steps_per_day']:,} steps a day in the observed mix of step types, each step costing what the
recorded steps of its type cost on average.</p>
{projection_table(report, palette)}
<h2>Traces</h2>
{traces_section(report, palette, max_traces)}
</body></html>
"""


def type_cell(kind: str, palette: dict[str, str]) -> str:
    colour = palette.get(kind)
    swatch = f'<span class="swatch" style="background:{colour}"></span>' if colour else ""
    return f"<td>{swatch}{escape(kind)}</td>"


def totals_table(report: CostReport, palette: dict[str, str]) -> str:
    rows = []
    for kind, row in [*report.by_step_type.items(), ("all", report.totals)]:
        rows.append(
            f'<tr{ALL_ROW if kind == "all" else ""} data-step-type="{escape(kind)}">{type_cell(kind, palette)}'
            f'<td>{row["steps"]:,}</td>'
            f'<td>{row["input_tokens"]:,} / {row["output_tokens"]:,}</td><td>{gflops(row["flops_executed"])}</td>'
            f'<td>{gflops(row["flops_total"])}</td><td>{row["flops_saved_frac"]:.1%}</td>'
            f'<td>{row["mean_layers_skipped_frac"]:.1%}</td><td>{row["median_latency_s"]:.3f} s</td></tr>'
        )
    return ('<table id="step-types"><thead><tr><th>step type</th><th>steps</th><th>tokens in / out</th>'
            '<th>GFLOPs spent</th><th>GFLOPs full depth</th><th>FLOPs skipped</th><th>blocks skipped</th>'
            f'<th>median latency</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def projection_table(report: CostReport, palette: dict[str, str]) -> str:
    p = report.projection
    rows = [(kind, values) for kind, values in p["by_step_type"].items()]
    rows.append(("all", {"share": 1.0, "steps_per_day": p["steps_per_day"], **{
        key: p[key] for key in ("full_depth_usd_per_day", "layerroute_usd_per_day", "saved_usd_per_day")}}))
    cells = "".join(
        f'<tr{ALL_ROW if kind == "all" else ""} data-step-type="{escape(kind)}">{type_cell(kind, palette)}'
        f'<td>{values["share"]:.1%}</td><td>{values["steps_per_day"]:,.0f}</td>'
        f'<td>{usd(values["full_depth_usd_per_day"])}</td><td>{usd(values["layerroute_usd_per_day"])}</td>'
        f'<td>{usd(values["saved_usd_per_day"])}</td></tr>'
        for kind, values in rows
    )
    return ('<table id="projection"><thead><tr><th>step type</th><th>share of steps</th><th>steps a day</th>'
            '<th>full depth $/day</th><th>LayerRoute $/day</th><th>saved $/day</th></tr></thead>'
            f'<tbody>{cells}</tbody></table>')


def type_chart(report: CostReport, palette: dict[str, str]) -> str:
    """Full-depth FLOPs against FLOPs spent, one pair of bars per step type."""
    peak = max((row["flops_total"] for row in report.by_step_type.values()), default=0) or 1
    bar, gap, left, width = 20, 14, 110, 560
    parts = []
    for index, (kind, row) in enumerate(report.by_step_type.items()):
        y = 8 + index * (2 * bar + gap)
        full, spent = row["flops_total"] / peak * width, row["flops_executed"] / peak * width
        parts.append(
            f'<g class="type-bars" data-step-type="{escape(kind)}" data-flops-total="{row["flops_total"]}" '
            f'data-flops-executed="{row["flops_executed"]}">'
            f'<text x="0" y="{y + bar + 4}" font-size="13">{escape(kind)}</text>'
            f'<rect class="full" x="{left}" y="{y}" width="{full:.2f}" height="{bar}" fill="{palette[kind]}" '
            f'fill-opacity="0.28"/><text x="{left + full + 6:.1f}" y="{y + 15}" font-size="12">full depth '
            f'{gflops(row["flops_total"])} GFLOPs</text>'
            f'<rect class="spent" x="{left}" y="{y + bar}" width="{spent:.2f}" height="{bar}" '
            f'fill="{palette[kind]}"/><text x="{left + spent + 6:.1f}" y="{y + bar + 15}" font-size="12">'
            f'LayerRoute {gflops(row["flops_executed"])} GFLOPs ({row["flops_saved_frac"]:.1%} skipped)</text></g>'
        )
    height = 8 + len(report.by_step_type) * (2 * bar + gap)
    return (f'<svg id="type-chart" xmlns="http://www.w3.org/2000/svg" width="900" height="{height}" role="img" '
            f'aria-label="FLOPs per step type, full depth against LayerRoute">{"".join(parts)}</svg>')


def traces_section(report: CostReport, palette: dict[str, str], max_traces: int) -> str:
    traces: dict[str, list] = defaultdict(list)  # insertion order: traces in the order their first step arrived
    for record in report.records:
        traces[record.trace_id].append(record)
    shown = list(traces)
    note = ""
    if len(shown) > max_traces:
        # a page with every trace of a day's traffic would not open; the expensive ones are where savings matter
        keep = set(sorted(shown, key=lambda t: -sum(r.flops_total for r in traces[t]))[:max_traces])
        shown = [t for t in shown if t in keep]
        note = (f'<p class="note" id="traces-note">Showing the {max_traces:,} most expensive of '
                f'{len(traces):,} traces (by full-depth FLOPs).</p>')
    scale = TIMELINE_WIDTH / (max((sum(r.flops_total for r in traces[t]) for t in shown), default=0) or 1)
    legend = "".join(f'<span data-step-type="{escape(kind)}"><span class="swatch" style="background:{colour}"></span>'
                     f'{escape(kind)}</span>'
                     for kind, colour in palette.items())
    legend += ('<span><span class="swatch skipped"></span>FLOPs spent, then skipped (the pale part)</span>'
               '<span>#step and % of its FLOPs skipped on the bar; dark ticks under it: the blocks it skipped</span>')
    explain = ('<p class="note">Each trace\'s steps in order, left to right; a step\'s width is its full-depth FLOPs, '
               'on one scale for all traces.</p>')
    body = "".join(trace_figure(trace_id, sorted(traces[trace_id], key=lambda r: r.step_index), palette, scale)
                   for trace_id in shown)
    return f'{explain}<div class="legend">{legend}</div>{note}{body}'


def trace_figure(trace_id: str, steps: list[StepCostRecord], palette: dict[str, str], scale: float) -> str:
    total = sum(r.flops_total for r in steps)
    executed = sum(r.flops_executed for r in steps)
    parts, x = [], 0.0
    for record in steps:
        parts.append(step_glyph(record, palette[record.step_type], x, scale))
        x += record.flops_total * scale
    height = BAR_HEIGHT + 2 + STRIP_HEIGHT
    saved = 1 - executed / total if total else 0.0
    rows = "".join(
        f'<tr data-step-index="{r.step_index}"><td>{r.step_index}</td>{type_cell(r.step_type, palette)}'
        f'<td>{escape(r.node or "")}</td><td>{r.input_tokens:,} / {r.output_tokens:,}</td>'
        f'<td>{gflops(r.flops_executed)}</td><td>{gflops(r.flops_total)}</td>'
        f'<td>{r.flops_skipped / r.flops_total if r.flops_total else 0:.1%}</td>'
        f'<td>{escape(skipped_blocks(r))}</td><td>{r.latency_s:.3f} s</td></tr>'
        for r in steps
    )
    return (f'<section class="trace" data-trace-id="{escape(trace_id)}"><h3>{escape(trace_id)} '
            f'<small>{plural(len(steps), "step")}, {gflops(executed)} of {gflops(total)} GFLOPs spent, '
            f'{saved:.1%} skipped</small></h3>'
            f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{TIMELINE_WIDTH}" height="{height}" '
            f'role="img" aria-label="steps of trace {escape(trace_id)}">{"".join(parts)}</svg>'
            f'<details><summary>steps of this trace</summary><table class="steps"><thead><tr><th>step</th>'
            f'<th>type</th><th>node</th><th>tokens in / out</th><th>GFLOPs spent</th><th>GFLOPs full depth</th>'
            f'<th>FLOPs skipped</th><th>blocks skipped</th><th>latency</th></tr></thead><tbody>{rows}</tbody>'
            f'</table></details></section>')


def step_glyph(record: StepCostRecord, colour: str, x: float, scale: float) -> str:
    """One step on a timeline: the FLOPs it spent in solid colour, those it skipped pale, its skipped blocks below."""
    width = record.flops_total * scale
    spent = record.flops_executed * scale
    fraction = record.flops_skipped / record.flops_total if record.flops_total else 0.0
    title = (f"step {record.step_index} · {record.step_type}" + (f" · {record.node}" if record.node else "") +
             f"\n{gflops(record.flops_executed)} of {gflops(record.flops_total)} GFLOPs spent, {fraction:.1%} "
             f"skipped\nblocks skipped: {skipped_blocks(record)}\n{record.input_tokens:,} tokens in, "
             f"{record.output_tokens:,} out, {record.latency_s:.3f} s")
    layers = ",".join(str(layer) for layer in sorted(record.skipped_layers))
    parts = [
        (f'<g class="step" data-step-index="{record.step_index}" data-step-type="{escape(record.step_type)}" '
         f'data-flops-total="{record.flops_total}" data-flops-skipped="{record.flops_skipped}" '
         f'data-skipped-layers="{layers}" data-num-layers="{record.num_layers}"><title>{escape(title)}</title>'),
        f'<rect class="spent" x="{x:.3f}" y="0" width="{spent:.3f}" height="{BAR_HEIGHT}" fill="{colour}"/>',
        (f'<rect class="skipped" x="{x + spent:.3f}" y="0" width="{width - spent:.3f}" height="{BAR_HEIGHT}" '
         f'fill="{colour}" fill-opacity="0.3"/>'),
        f'<rect x="{x:.3f}" y="{BAR_HEIGHT + 2}" width="{width:.3f}" height="{STRIP_HEIGHT}" fill="#e6e6e6"/>',
    ]
    cell = width / record.num_layers
    parts += [f'<rect class="skipped-block" x="{x + layer * cell:.3f}" y="{BAR_HEIGHT + 2}" '
              f'width="{max(cell - 0.5, 0.5):.3f}" height="{STRIP_HEIGHT}" fill="#333"/>'
              for layer in sorted(record.skipped_layers)]
    # a 1px white edge on each step's right keeps neighbours of one type apart
    parts.append(f'<rect x="{x + width - 1:.3f}" y="0" width="1" height="{BAR_HEIGHT + 2 + STRIP_HEIGHT}" '
                 'fill="#fff"/>')
    if width >= LABEL_MIN_WIDTH:
        parts.append(f'<text x="{x + 4:.1f}" y="{BAR_HEIGHT - 8}" font-size="11" fill="#fff" '
                     f'style="paint-order:stroke" stroke="{colour}" stroke-width="2">'
                     f'#{record.step_index} {fraction:.0%}</text>')
    parts.append("</g>")
    return "".join(parts)
