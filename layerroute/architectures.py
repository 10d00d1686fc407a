"""Where the decoder blocks of a Hugging Face causal LM live, and what shape they have."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Architectures whose decoder blocks are ``model.model.layers[i]`` with ``self_attn`` (q/k/v/o projections) and
# ``mlp`` submodules, and whose blocks map hidden states to hidden states of the same shape.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class BlockShape:
    """The dimensions of one decoder block that its FLOP count depends on."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    gated_mlp: bool


@dataclass(frozen=True)
class ModelShape:
    """The identity and dimensions of a base model, as recorded in an adapter and checked on load."""

    model_type: str
    num_layers: int
    vocab_size: int
    block: BlockShape

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "vocab_size": self.vocab_size,
            **self.block.__dict__,
        }


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def find_decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """Return the ``nn.ModuleList`` that holds the decoder blocks of ``model``.

    Raises:
        ValueError: the architecture is not supported, or the model has no decoder blocks where they should be.
    """
    config = text_config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported by LayerRoute; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    decoder = getattr(model, "model", None)
    blocks = getattr(decoder, "layers", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(
            f"{type(model).__name__} has no decoder blocks at `model.layers` "
            f"(found {type(blocks).__name__ if blocks is not None else 'nothing'}); "
            "LayerRoute needs a decoder-only causal LM such as AutoModelForCausalLM returns"
        )
    for index, block in enumerate(blocks):
        if not (hasattr(block, "self_attn") and hasattr(block, "mlp")):
            raise ValueError(
                f"block {index} of {type(model).__name__} is a {type(block).__name__} without `self_attn` and `mlp`; "
                "LayerRoute routes standard attention + MLP decoder blocks only"
            )
    return blocks


def model_shape(model: nn.Module) -> ModelShape:
    """Read the dimensions FLOP accounting and adapter checks rely on from the model's config."""
    config = text_config(model)
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    blocks = find_decoder_blocks(model)
    return ModelShape(
        model_type=config.model_type,
        num_layers=len(blocks),
        vocab_size=config.vocab_size,
        block=BlockShape(
            hidden_size=config.hidden_size,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            gated_mlp=hasattr(blocks[0].mlp, "gate_proj"),
        ),
    )
