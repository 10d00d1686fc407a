"""The ``layerroute`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from pathlib import Path

from .costs import CostReport, PriceModel, read_cost_records
from .errors import UserError, command, user_input
from .logs import add_log_level_argument, configure_logging
from .steps import count_steps
from .traces import FORMATS, read_sources

logger = logging.getLogger("layerroute.cli")


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


SKIPPED_SHOWN = 10  # `layerroute report --on-bad-record skip` names this many skipped lines on stderr, then counts


def report_command(args: argparse.Namespace) -> int:
    with user_input("--usd-per-gpu-hour / --achieved-tflops"):
        price = PriceModel(usd_per_gpu_hour=args.usd_per_gpu_hour, achieved_tflops=args.achieved_tflops,
                           usd_per_tflop=args.usd_per_tflop)
    with user_input(str(args.records)):
        read = read_cost_records(args.records, on_bad_record=args.on_bad_record)
        report = CostReport.from_records(read.records, price, args.steps_per_day, read.skipped_summary())
    for skipped in read.skipped[:SKIPPED_SHOWN]:
        print(f"layerroute: skipped {skipped.source}:{skipped.line}: {skipped.reason}", file=sys.stderr)
    if len(read.skipped) > SKIPPED_SHOWN:
        print(f"layerroute: ... and {len(read.skipped) - SKIPPED_SHOWN} more unreadable records skipped",
              file=sys.stderr)
    print(report.to_markdown())
    if args.html:
        with user_input(f"--html {args.html}"):
            args.html.write_text(report.to_html())
        print(f"HTML report written to {args.html}")
    if args.json:
        with user_input(f"--json {args.json}"):
            args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def serve_command(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        from .serving import serve
    except ImportError as error:
        raise UserError(f"`layerroute serve` needs the serve extra ({error.name} is missing): "
                        'pip install "layerroute[serve]"') from None
    from .chat import ChatEngine

    options = {"model_name": args.served_model_name, "context_budget": args.context_budget,
               "context_overflow": args.context_overflow,
               "default_max_tokens": args.max_tokens, "api_key": args.api_key, "max_batch_size": args.max_batch_size,
               "batch_window_ms": args.batch_window_ms, "grouping": not args.no_grouping}
    if args.replicas != 1 and not args.ray:
        raise UserError("--replicas needs --ray (replicas run on Ray Serve)")
    if args.ray:
        try:
            from .ray_serving import serve_on_ray
        except ImportError as error:
            raise UserError(f"`layerroute serve --ray` needs the ray extra ({error.name} is missing): "
                            'pip install "layerroute[ray]"') from None
        # each replica loads the model itself, when it starts
        serve_on_ray(args.model, args.adapter, args.device, replicas=args.replicas, host=args.host, port=args.port,
                     log_level=args.log_level, **options)
        return 0
    logger.info("loading %s (adapter: %s)", args.model or "the embedded SmolLM2-135M-Instruct",
                args.adapter or "the shipped one, where there is one")
    began = time.perf_counter()
    with user_input("--model / --adapter"):
        engine = ChatEngine.load(args.model, args.adapter, args.device)
    logger.info("loaded %s in %.1f s: %d blocks on %s", engine.name, time.perf_counter() - began,
                engine.model.num_layers, engine.model.device)
    serve(engine, host=args.host, port=args.port, log_level=args.log_level, **options)
    return 0


@command("layerroute")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layerroute", description="LayerRoute command-line tools",
                                     epilog="--debug, anywhere on the command line, shows an error's traceback")
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
    report.add_argument("--on-bad-record", choices=("raise", "skip"), default="raise", help="a line that is not a "
                        "step-cost record: stop naming file and line (raise), or leave it out and count it (skip)")
    report.set_defaults(run=report_command)
    serve = commands.add_parser("serve", help="serve a routed model over an OpenAI-compatible HTTP API")
    serve.add_argument("--model", default=None, help="base model: hub id, local directory or .gguf file "
                       "(default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--adapter", default=None, help="LayerRoute adapter directory (default: the adapter shipped "
                       "for the embedded model; 'none': fresh routers that keep every block)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: the loader's)")
    serve.add_argument("--context-budget", type=int, default=2048, help="most prompt tokens a request may bring")
    serve.add_argument("--context-overflow", choices=("error", "truncate"), default="error", help="a prompt over "
                       "the budget or the model's positions: refuse it (400, with the counts) or drop its oldest "
                       "messages (system prompt and tools kept)")
    serve.add_argument("--max-tokens", type=int, default=256, help="generated tokens when a request sets no limit")
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model, or "
                       "embedded:SmolLM2-135M-Instruct)")
    serve.add_argument("--api-key", default=os.environ.get("LAYERROUTE_API_KEY"), help="demand 'Authorization: "
                       "Bearer <key>' on /v1/* (default: $LAYERROUTE_API_KEY; none: no key asked)")
    serve.add_argument("--max-batch-size", type=int, default=16)
    serve.add_argument("--batch-window-ms", type=float, default=5.0, help="how long an idle server waits for a "
                       "first request's batch-mates")
    serve.add_argument("--no-grouping", action="store_true", help="batch rows without grouping them by routed skip "
                       "set (a baseline: a block then runs when any row keeps it)")
    serve.add_argument("--ray", action="store_true", help="serve on Ray Serve: --replicas copies behind Ray's proxy "
                       "on --host:--port (needs the ray extra)")
    serve.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, with --ray")
    add_log_level_argument(serve)
    serve.set_defaults(run=serve_command)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
