"""Logging for the command-line entry points: one ``--log-level`` flag, messages on stderr through :mod:`logging`.

Library modules log to loggers under ``layerroute`` (``logging.getLogger(__name__)``) and never configure logging;
a command calls :func:`configure_logging` once with its ``--log-level``. What a command promises on stdout (JSON
summaries, a report) stays on stdout; progress and diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_log_level_argument(parser: argparse.ArgumentParser, default: str = "info") -> None:
    """Add ``--log-level {debug,info,warning,error,critical}`` to ``parser``."""
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=default, type=str.lower,
                        help=f"what is logged to stderr (default: {default})")


def configure_logging(level: str = "info") -> None:
    """Send log records to stderr as ``time LEVEL logger: message`` and show LayerRoute's at ``level`` and above.

    The root logger gets a handler only if it has none (an application, or pytest, that set up logging keeps its
    own); ``layerroute`` loggers get ``level`` either way.
    """
    if level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LOG_LEVELS)}")
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("layerroute").setLevel(level.upper())


__all__ = ["LOG_FORMAT", "LOG_LEVELS", "add_log_level_argument", "configure_logging"]
