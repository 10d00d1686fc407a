"""LayerRoute: learned per-step block skipping for agent inference."""

__version__ = "0.1.0"

from .architectures import SUPPORTED_MODEL_TYPES, find_decoder_blocks  # noqa: E402
from .config import LayerRouteConfig  # noqa: E402
from .flops import RouteStats  # noqa: E402
from .loading import EMBEDDED_MODEL, load_base_model  # noqa: E402
from .model import LayerRouteModel, LayerRouteOutput  # noqa: E402

__all__ = [
    "EMBEDDED_MODEL",
    "SUPPORTED_MODEL_TYPES",
    "LayerRouteConfig",
    "LayerRouteModel",
    "LayerRouteOutput",
    "RouteStats",
    "find_decoder_blocks",
    "load_base_model",
]
