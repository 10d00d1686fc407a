"""Optional dependencies: imported where they are used, and named with the extra that installs them when missing.

The core (``import layerroute``, the routed model, the log readers, evaluation, ``layerroute steps``) needs none of
them. The extras (``pyproject.toml``):

- ``plot``: matplotlib, for the training report's figure (:func:`layerroute.evaluation.plot`);
- ``hub``: datasets, for reading public data sets by name from the Hugging Face Hub
  (:func:`layerroute.traces.load_hub_traces`);
- ``langchain``: langchain-core (and langchain, for agents), for ``langchain_layerroute``;
- ``serve`` / ``ray``: the HTTP server (``layerroute serve``);
- ``otel``: opentelemetry-api, for one span per generated step (:mod:`layerroute.telemetry`; a no-op without it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UserError


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it.

    An ``ImportError`` (code that falls back on a missing module keeps working) and a :class:`UserError` (a command
    prints the message, not a traceback).
    """


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` saying that ``purpose`` needs ``layerroute[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = error.name or module
        raise MissingExtraError(f"{purpose} needs the {extra} extra ({missing} is not installed): "
                                f"pip install 'layerroute[{extra}]'", name=missing) from error
