"""LangChain integration for LayerRoute: ``ChatLayerRoute`` and per-step cost tracking."""

from .callbacks import LayerRouteCostCallback, layerroute_cost_tracking
from .chat_models import ChatLayerRoute

__all__ = ["ChatLayerRoute", "LayerRouteCostCallback", "layerroute_cost_tracking"]
