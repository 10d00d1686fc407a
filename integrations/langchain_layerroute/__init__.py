"""LangChain integration for LayerRoute: ``ChatLayerRoute`` and per-step cost tracking."""

from layerroute.extras import require

require("langchain_core", "langchain", "langchain_layerroute")

from .callbacks import LayerRouteCostCallback, layerroute_cost_tracking  # noqa: E402
from .chat_models import ChatLayerRoute  # noqa: E402

__all__ = ["ChatLayerRoute", "LayerRouteCostCallback", "layerroute_cost_tracking"]
