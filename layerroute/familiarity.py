"""Do-no-harm routing: a router's decision counts only for steps like the ones it was fitted on.

A router is a linear read-out of a step's features; on a step unlike anything it was fitted on, its decision is an
extrapolation, and it is often a confident one. Keeping a block is always safe, so each router remembers where its
fitted steps' features lie (per-channel mean and spread) and how far from that centre they reach (a quantile of their
distances). At inference, once a step's features at some block fall outside that radius, that block and every later
block run for the step (``layerroute.router.RoutedBlock``): the step keeps the skips it earned while it still looked
familiar, and no more.

Features cannot flag a step that looks like the fitted ones but is of a kind they never contrasted: trained on logs
where every step after a tool result is another call, the routers read "after a tool result" as "skip", and an
answer written after a tool result looks familiar to them. So the routers also decide only after the roles of last
context message (``user``, ``tool``, ...) after which their training steps held enough steps of each type
(:func:`fit_context_roles`); after any other role every block runs.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch

from .config import check_familiarity_quantile
from .steps import STEP_TYPES, TokenizedStep
from .training import read_router_features

# channels that hardly vary on the fitted steps must not turn float noise into distance
MIN_SCALE_FRACTION = 1e-2


@torch.no_grad()
def fit_familiarity(model, examples: list[TokenizedStep], pad_token_id: int, quantile: float,
                    batch_size: int = 4) -> torch.Tensor:
    """Fit every router's familiar region to what it reads on ``examples`` and return the radii.

    Args:
        model: a :class:`~layerroute.LayerRouteModel`, with LoRA and the routers as they will serve: the features
            are read through them (:func:`layerroute.training.read_router_features`), the familiarity check off.
        examples: steps like the ones the routers were fitted on (at least 2).
        pad_token_id: the tokenizer's padding id, for batching.
        quantile: the share of ``examples`` each router counts as familiar, in (0, 1]; 1 keeps the farthest.

    Returns:
        ``(num_layers,)`` radii, also stored in the routers' ``familiar_radius``.
    """
    check_familiarity_quantile(quantile)
    if len(examples) < 2:
        raise ValueError(f"fit_familiarity needs at least 2 steps, got {len(examples)}")
    with familiarity_ignored(model):
        features = read_router_features(model, examples, pad_token_id, batch_size)
    radii = []
    for index, router in enumerate(model.routers):
        read = features[:, index].to(router.feature_mean.device)
        spread = read.std(0)
        router.feature_mean.copy_(read.mean(0))
        router.feature_scale.copy_(spread.clamp_min(MIN_SCALE_FRACTION * float(spread.mean()) + 1e-12))
        router.familiar_radius.fill_(float(torch.quantile(router.distance(read), quantile)))
        radii.append(float(router.familiar_radius))
    model.config.familiarity_quantile = quantile
    return torch.tensor(radii)


def fit_context_roles(model, examples: list[TokenizedStep], min_steps: int) -> dict:
    """Let the routers decide only after the context roles where ``examples`` (the training steps) contrast the step
    types: at least ``min_steps`` steps of each type after that role. Stored in
    ``model.config.routed_context_roles``.

    Returns ``{role: {step_type: count}}``, the counts it decided on (steps without a ``context_role`` are not
    counted).
    """
    counts: dict[str, Counter] = {}
    for example in examples:
        if example.context_role is not None:
            counts.setdefault(example.context_role, Counter())[example.step_type] += 1
    model.config.routed_context_roles = sorted(
        role for role, by_type in counts.items() if all(by_type[kind] >= min_steps for kind in STEP_TYPES))
    return {role: {kind: by_type[kind] for kind in STEP_TYPES} for role, by_type in sorted(counts.items())}


@contextmanager
def familiarity_ignored(model):
    """Inside, every step counts as familiar, after every role: the routers' decisions alone decide (for comparisons;
    not thread-safe, it changes the model for every caller)."""
    radii = [router.familiar_radius.clone() for router in model.routers]
    roles = model.config.routed_context_roles
    for router in model.routers:
        router.familiar_radius.fill_(float("inf"))
    model.config.routed_context_roles = None
    try:
        yield model
    finally:
        for router, radius in zip(model.routers, radii):
            router.familiar_radius.copy_(radius)
        model.config.routed_context_roles = roles
