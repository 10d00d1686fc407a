"""The ``layerroute`` command."""

from __future__ import annotations

import argparse
import json
import sys

from pathlib import Path

from .costs import CostReport, PriceModel, read_records
from .steps import count_steps
from .traces import FORMATS, BadRecordError, read_sources


def steps_command(args: argparse.Namespace) -> int:
    result = read_sources(args.files, format=args.format, on_bad_record=args.on_bad_record)
    summary = {
        "traces": len(result.traces),
        "steps": count_steps(result.traces),
        "skipped_records": len(result.skipped),
    }
    if result.skipped:
        summary["skipped_reasons"] = result.skipped_summary()
    print(json.dumps(summary))
    return 0


def report_command(args: argparse.Namespace) -> int:
    price = PriceModel(usd_per_gpu_hour=args.usd_per_gpu_hour, achieved_tflops=args.achieved_tflops,
                       usd_per_tflop=args.usd_per_tflop)
    report = CostReport.from_records(read_records(args.records), price, args.steps_per_day)
    print(report.to_markdown())
    if args.html:
        args.html.write_text(report.to_html())
        print(f"HTML report written to {args.html}")
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layerroute", description="LayerRoute command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    steps = commands.add_parser("steps", help="read agent logs and count their steps by type")
    steps.add_argument("files", nargs="+", help="JSON / JSONL agent logs (optionally .gz), or dataset names")
    steps.add_argument("--format", choices=FORMATS, default=None, help="force a log format (default: detect)")
    steps.add_argument("--on-bad-record", choices=("raise", "skip"), default="raise")
    steps.set_defaults(run=steps_command)
    report = commands.add_parser("report", help="render the trace cost report of recorded ChatLayerRoute steps")
    report.add_argument("records", type=Path, help="JSONL written by the LayerRoute cost callback")
    report.add_argument("--html", type=Path, default=None, help="also write a self-contained HTML report")
    report.add_argument("--json", type=Path, default=None, help="also write the aggregates as JSON")
    report.add_argument("--steps-per-day", type=int, default=1_000_000, help="for the savings projection")
    report.add_argument("--usd-per-gpu-hour", type=float, default=2.0)
    report.add_argument("--achieved-tflops", type=float, default=100.0, help="achieved TFLOP/s of that GPU")
    report.add_argument("--usd-per-tflop", type=float, default=None, help="price FLOPs directly instead")
    report.set_defaults(run=report_command)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (BadRecordError, FileNotFoundError, OSError, ValueError) as error:
        print(f"layerroute {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
