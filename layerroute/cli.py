"""The ``layerroute`` command."""

from __future__ import annotations

import argparse
import json
import sys

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layerroute", description="LayerRoute command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    steps = commands.add_parser("steps", help="read agent logs and count their steps by type")
    steps.add_argument("files", nargs="+", help="JSON / JSONL agent logs (optionally .gz), or dataset names")
    steps.add_argument("--format", choices=FORMATS, default=None, help="force a log format (default: detect)")
    steps.add_argument("--on-bad-record", choices=("raise", "skip"), default="raise")
    steps.set_defaults(run=steps_command)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (BadRecordError, FileNotFoundError, OSError, ValueError) as error:
        print(f"layerroute {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
