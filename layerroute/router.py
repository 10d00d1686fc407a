"""The per-block router and the block wrapper that really skips a block."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import LayerRouteConfig

if TYPE_CHECKING:
    from .grammar import RowGrammars


@dataclass
class RoutingState:
    """Routing decisions of one forward pass (training) or one ``generate`` call (inference).

    Lives in a context variable, so threads and asyncio tasks that share one model never see each other's state.

    Attributes:
        context_mask: ``(batch, seq_len)`` bool, the positions routers pool over in the first forward of the state
            (the step's context; never its target tokens). ``None`` pools over every position.
        straight_through: training mode: every block whose router learns runs, and its output is mixed in with the
            straight-through gate.
        forced_skip: when not ``None``, the routers are bypassed: every block runs except these.
        skip_threshold: when not ``None``, replaces every block's configured threshold for this state: a block runs
            when its keep probability is above it. Lower is more cautious; see ``LayerRouteConfig.router_threshold``.
        keep: block index -> ``(batch,)`` bool decisions, taken at the first forward and held for the rest of the state.
        rows_keeping: block index -> ``"all"``, ``"none"`` or ``"some"``: ``keep`` summarised once, so later forwards
            need no device sync to know whether the block runs.
        keep_probs: block index -> ``(batch,)`` keep probabilities (differentiable during training).
        unfamiliar: ``(batch,)`` bool, rows whose features have left their routers' familiar radius at this or an
            earlier block; from there on every block runs for them (do-no-harm routing, :mod:`layerroute.familiarity`).
        lm_head_logits: logits each forward of the state computed per row (positions x vocabulary rows computed).
        grammar: when not ``None``, the :class:`layerroute.grammar.RowGrammars` that constrains this ``generate``:
            each forward advances it, and the LM head computes only the logits of the tokens it allows
            (:class:`layerroute.lm_head.RoutedLMHead`).
        start_block: blocks before this one are not run (their input passes through unchanged) and this block starts
            from ``start_hidden``: a forward resumed midway, from hidden states an earlier forward recorded.
        start_hidden: ``(batch, seq_len, hidden)`` input of ``start_block``; ``None`` starts from the embeddings.
        router_features: when not ``None``, every router that decides records here, detached and by block index,
            what it read ``(batch, hidden)``.
        last_outputs: when not ``None``, every block that runs records here its output at the last position
            ``(batch, 1, hidden)``, by block index (a prefill keeps them for :class:`Replay`).
        replay: when not ``None``, the blocks it holds do not run in this state's next forward: they append its KV
            entries to its cache and return its outputs instead (:class:`Replay`).
    """

    context_mask: torch.Tensor | None = None
    straight_through: bool = False
    forced_skip: frozenset[int] | None = None
    skip_threshold: float | None = None
    keep: dict[int, torch.Tensor] = field(default_factory=dict)
    rows_keeping: dict[int, str] = field(default_factory=dict)
    keep_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    unfamiliar: torch.Tensor | None = None
    lm_head_logits: list[int] = field(default_factory=list)
    grammar: RowGrammars | None = None
    start_block: int = 0
    start_hidden: torch.Tensor | None = None
    router_features: dict[int, torch.Tensor] | None = None
    last_outputs: dict[int, torch.Tensor] | None = None
    replay: Replay | None = None

    def hold(self, keep: torch.Tensor) -> None:
        """Take ``keep`` ``(batch, num_layers)`` as the decisions instead of asking the routers."""
        for index in range(keep.shape[1]):
            self.keep[index] = keep[:, index]
            self.rows_keeping[index] = _rows_keeping(keep[:, index])


@dataclass
class Replay:
    """A position that an earlier forward already ran, handed to the next forward instead of being run again.

    A server routes and prefills each step alone (batch of one, the whole prompt), then decodes the steps that skip
    the same blocks as one batch. HF ``generate`` begins by feeding the prompt's last token, for its logits; with a
    replay, the blocks that ran that position in the prefill append its KV entries from there and return their
    output at it, so the first forward computes only the LM head, as a plain ``generate``'s prefill does. The prompt
    runs once, and logits processors, streamers and stopping criteria see the generation they would see otherwise.

    Attributes:
        cache: the cache the forward continues (the replayed entries are appended to it).
        positions: block index -> ``(keys, values, output)``: the position's KV entries ``(batch, kv_heads, 1,
            head_dim)`` and the block's output at it ``(batch, 1, hidden)``; taken out as the blocks replay them.
    """

    cache: object
    positions: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _rows_keeping(keep: torch.Tensor) -> str:
    return "all" if bool(keep.all()) else "some" if bool(keep.any()) else "none"


# what a router keeps of the steps it was fitted on (adapters saved before they existed load without them)
FAMILIARITY_BUFFERS = ("feature_mean", "feature_scale", "familiar_radius")

ROUTING_STATE: ContextVar[RoutingState | None] = ContextVar("layerroute_routing_state", default=None)


class Router(nn.Module):
    """Decides from a step's context whether one block runs: ``Linear(hidden_size, 1)`` on pooled hidden states.

    It also knows what the steps it was fitted on looked like (:mod:`layerroute.familiarity`): the per-channel mean
    and spread of its features on them, and the radius within which a step counts as familiar. Until fitted the
    radius is infinite and every step is familiar.
    """

    def __init__(self, hidden_size: int, config: LayerRouteConfig):
        super().__init__()
        self.pooling = config.router_pooling
        self.normalize = config.router_norm == "rms"
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, config.router_init_bias)
        self.register_buffer("feature_mean", torch.zeros(hidden_size))
        self.register_buffer("feature_scale", torch.ones(hidden_size))
        self.register_buffer("familiar_radius", torch.tensor(float("inf")))

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """How far ``features`` ``(batch, hidden)`` lie from the fitted steps': ``(batch,)``, the root mean square of
        the channels' standardised deviations."""
        standardised = (features.float() - self.feature_mean) / self.feature_scale
        return standardised.pow(2).mean(-1).sqrt()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Keep logits ``(batch,)`` from what the router read, ``features`` ``(batch, hidden)`` (:meth:`features`)."""
        return self.proj(features).squeeze(-1)

    def decide(self, features: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch,)`` keep probabilities and ``(batch,)`` bool decisions from ``features`` ``(batch, hidden)``: a
        block runs when its keep probability is above ``threshold``."""
        keep_prob = torch.sigmoid(self(features))
        return keep_prob, keep_prob > threshold

    def features(self, hidden_states: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """What the router reads: ``(batch, hidden)``, the (normalised) hidden states pooled over the context."""
        hidden = hidden_states.float()
        if self.normalize:
            hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
        if context_mask is None:
            context_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        mask = context_mask.to(device=hidden.device, dtype=torch.bool)
        if self.pooling == "last":
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = torch.where(mask, positions, -1).amax(dim=1).clamp(min=0)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return pooled.to(self.proj.weight.dtype)


class RoutedBlock(nn.Module):
    """A decoder block behind its router.

    Outside a routing state (the wrapped HF model called directly) the block always runs. Inside one:
    training with a router that learns mixes ``h + g * (block(h) - h)`` with a hard 0/1 gate ``g`` that carries the
    sigmoid's gradient (straight-through estimator); otherwise (inference, or training with a frozen router) the
    block is not executed at all when every row of the batch skips it, and ``h`` is kept for the rows that skip it
    when rows disagree.
    """

    def __init__(self, block: nn.Module, router: Router, layer_idx: int, threshold: float):
        super().__init__()
        self.block = block
        self.router = router
        self.layer_idx = layer_idx
        self.threshold = threshold

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        state = ROUTING_STATE.get()
        if state is None:
            return self.block(hidden_states, *args, **kwargs)
        if self.layer_idx < state.start_block:
            return hidden_states
        if self.layer_idx == state.start_block and state.start_hidden is not None:
            hidden_states = state.start_hidden
        keep = state.keep.get(self.layer_idx)
        gate = None
        # a router that does not learn needs no straight-through gradient, so its block is skipped for real
        straight_through = state.straight_through and self.router.proj.weight.requires_grad
        if keep is None:
            keep_prob, keep = self._decide(hidden_states, state, straight_through)
            state.keep[self.layer_idx] = keep
            state.rows_keeping[self.layer_idx] = _rows_keeping(keep)
            state.keep_probs[self.layer_idx] = keep_prob
            if straight_through:
                gate = keep.to(keep_prob.dtype) + keep_prob - keep_prob.detach()
        if straight_through:
            if gate is None:
                gate = keep.to(hidden_states.dtype)
            output = self.block(hidden_states, *args, **kwargs)
            return hidden_states + gate.to(hidden_states.dtype)[:, None, None] * (output - hidden_states)
        rows_keeping = state.rows_keeping[self.layer_idx]
        if rows_keeping == "none":
            return hidden_states
        if state.replay is not None and (replayed := state.replay.positions.pop(self.layer_idx, None)) is not None:
            keys, values, output = replayed
            state.replay.cache.update(keys, values, self.layer_idx)
            return output
        output = self.block(hidden_states, *args, **kwargs)
        if rows_keeping != "all":
            output = torch.where(keep.to(output.device)[:, None, None], output, hidden_states)
        if state.last_outputs is not None:
            state.last_outputs[self.layer_idx] = output[:, -1:].clone()
        return output

    def _decide(self, hidden_states: torch.Tensor, state: RoutingState,
                straight_through: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch,)`` keep probabilities and ``(batch,)`` bool decisions for this block."""
        batch = hidden_states.shape[0]
        if state.forced_skip is not None:
            keep = 0.0 if self.layer_idx in state.forced_skip else 1.0
            keep_prob = torch.full((batch,), keep, device=hidden_states.device)
            return keep_prob, keep_prob > 0.5
        features = self.router.features(hidden_states, state.context_mask)
        if state.router_features is not None:
            state.router_features[self.layer_idx] = features.detach()
        keep_prob, keep = self.router.decide(features, self.threshold if state.skip_threshold is None
                                             else state.skip_threshold)
        if straight_through:  # a router that learns acts on its own decisions
            return keep_prob, keep
        # do no harm: once a row reads unlike the steps the routers were fitted on, the routers' decisions are
        # extrapolations, so this block and every later one run for it
        unfamiliar = self.router.distance(features) > self.router.familiar_radius
        if state.unfamiliar is not None:
            unfamiliar = unfamiliar | state.unfamiliar
        state.unfamiliar = unfamiliar
        return keep_prob, keep | unfamiliar
