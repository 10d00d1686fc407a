"""Configuration of a LayerRoute adapter."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ROUTER_POOLINGS = ("mean", "last")
ROUTER_NORMS = ("rms", "none")


def check_skip_threshold(value: float | None, name: str = "skip_threshold") -> float | None:
    """``value`` if it is ``None`` or a decision threshold in (0, 1); a ``ValueError`` naming ``name`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1) (a block runs when its keep probability is above it), "
                         f"got {value!r}")
    return float(value)


def check_familiarity_quantile(value: float | None) -> float | None:
    """``value`` if it is ``None`` or a share in (0, 1]; a ``ValueError`` otherwise."""
    if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"familiarity_quantile must lie in (0, 1] (the share of fitted steps counted as familiar), "
                         f"got {value!r}")
    return value


@dataclass
class LayerRouteConfig:
    """Everything that defines a LayerRoute adapter except its weights.

    The defaults reproduce the seed setting: rank-8 LoRA on q/k/v/o and one router per decoder block.

    Args:
        lora_rank: LoRA rank ``r``.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_rank``).
        lora_dropout: dropout on the LoRA input during training.
        lora_target_modules: names (last path component) of the linear layers inside each block that get LoRA.
        router_pooling: how a router summarises its block's input over the step's context tokens:
            ``"mean"`` (average over all context tokens) or ``"last"`` (the last context token).
        router_norm: ``"rms"`` divides each token's hidden state by its root mean square before pooling
            (parameter-free, so a few huge activation channels cannot swamp the router); ``"none"`` reads raw states.
        router_init_bias: initial bias of every router; positive starts with every block open
            (``sigmoid(bias)`` is the initial keep probability).
        router_threshold: a block runs when its keep probability is above this value.
        familiarity_quantile: the share of the steps the routers were fitted on that count as familiar, recorded when
            :func:`layerroute.familiarity.fit_familiarity` fitted the routers' familiar regions; ``None``: not fitted,
            every step is familiar. A step that leaves the region runs every block from there on.
        routed_context_roles: the roles of a context's last message after which the routers decide, recorded when
            :func:`layerroute.familiarity.fit_context_roles` found both step types after them in the training steps;
            after any other role every block runs. ``None``: not fitted, the routers decide after every role.
    """

    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    router_pooling: str = "last"
    router_norm: str = "rms"
    router_init_bias: float = 4.0
    router_threshold: float = 0.5
    familiarity_quantile: float | None = None
    routed_context_roles: list[str] | None = None

    def __post_init__(self) -> None:
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one linear layer, e.g. ['q_proj', 'v_proj']")
        if self.router_pooling not in ROUTER_POOLINGS:
            raise ValueError(f"router_pooling must be one of {ROUTER_POOLINGS}, got {self.router_pooling!r}")
        if self.router_norm not in ROUTER_NORMS:
            raise ValueError(f"router_norm must be one of {ROUTER_NORMS}, got {self.router_norm!r}")
        check_skip_threshold(self.router_threshold, "router_threshold")
        check_familiarity_quantile(self.familiarity_quantile)

    def routes_after(self, role: str | None) -> bool:
        """Whether the routers decide for a step whose context ends with a ``role`` message; ``False``: every block
        runs. An unknown role (``None``), or roles never fitted, leave the routers to decide."""
        return role is None or self.routed_context_roles is None or role in self.routed_context_roles

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "LayerRouteConfig":
        """The config :meth:`to_dict` wrote; the :data:`RETIRED_FIELDS` of older adapters are accepted and dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - set(RETIRED_FIELDS))
        if unknown:
            raise ValueError(f"unknown LayerRouteConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**{key: value for key, value in values.items() if key in known})


# training settings that adapters saved before layerroute.recipe.TrainingConfig held them carry in their config
RETIRED_FIELDS = {"regularizer_weight": float, "target_skip_rate": float}
