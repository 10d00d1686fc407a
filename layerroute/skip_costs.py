"""What skipping a block costs each row of a batch, measured rather than estimated from the gate's gradient.

Training-time functions that take a :class:`~layerroute.LayerRouteModel`: :func:`recording_probes` keeps what a
training forward leaves for the measurement, and :func:`skip_costs` reruns the batch from there with one block's
decision flipped. The routers learn from these costs (:class:`~layerroute.training.SkipCostMemory`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from .router import ROUTING_STATE, RoutingState

SKIP_COST_MEASURES = ("loss", "kl")  # the choices of skip_costs(measure=...)


@dataclass
class Probes:
    """What a forward left for :func:`skip_costs`.

    Attributes:
        block_inputs: block index -> the block's input hidden states ``(batch, seq_len, hidden)``, detached.
    """

    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)


@contextmanager
def recording_probes(model) -> Iterator[Probes]:
    """Inside, a forward of ``model`` (or of the module that wraps it, e.g. under DDP) records its :class:`Probes`
    into the one this yields (a later forward replaces them). Measure after leaving the block: the measurement's own
    forwards must not be recorded."""
    probes = Probes()

    def record_input(block, args, kwargs):
        probes.block_inputs[block.layer_idx] = (args[0] if args else kwargs["hidden_states"]).detach()

    handles = [block.register_forward_pre_hook(record_input, with_kwargs=True) for block in model.blocks]
    try:
        yield probes
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def skip_costs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, output,
               probes: Probes, blocks: Iterable[int], measure: str) -> torch.Tensor:
    """What skipping each of ``blocks`` costs each row.

    For every listed block, the rows are run again with that block's decision flipped and every other block as
    ``output`` decided, resuming at the block from its recorded input (the blocks before it are not rerun).

    Args:
        model: the :class:`~layerroute.LayerRouteModel` ``output`` came from.
        input_ids, attention_mask, labels: the batch ``output`` came from (``(batch, seq_len)`` each).
        output: the forward of this batch, with ``labels`` (:class:`~layerroute.model.LayerRouteOutput`).
        probes: what that forward recorded (:func:`recording_probes`).
        blocks: block indices.
        measure: ``"loss"``: the increase of the row's summed loss on its reference target tokens. ``"kl"``: the KL
            divergence of the next-token distribution without the block from the one with it, summed over the row's
            target positions, i.e. the increase of the row's loss expected under the model's own predictions.

    Returns:
        ``(batch, len(blocks))``: each row's cost of skipping each block.
    """
    if measure not in SKIP_COST_MEASURES:
        raise ValueError(f"skip cost measure must be one of {SKIP_COST_MEASURES}, not {measure!r}")
    if len(probes.block_inputs) != model.num_layers or output.target_logits is None:
        raise ValueError("skip_costs needs the probes of a forward with labels, recorded by recording_probes")
    if measure == "kl":
        predicting = labels[:, 1:] != -100
        row_of = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(predicting)[predicting]
        current = F.log_softmax(output.target_logits.detach().float(), dim=-1)
    else:
        current = output.token_nll.detach().sum(dim=1)
    costs = []
    for block in blocks:
        flipped_keep = output.keep.clone()
        flipped_keep[:, block] = ~flipped_keep[:, block]
        state = RoutingState(start_block=block, start_hidden=probes.block_inputs[block])
        state.hold(flipped_keep)
        token = ROUTING_STATE.set(state)
        try:
            hidden = model.base_model.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
        finally:
            ROUTING_STATE.reset(token)
        if measure == "kl":
            flipped = target_log_probs(model, hidden, predicting)
            runs = output.keep[row_of, block][:, None].to(current.device)
            with_block, without_block = torch.where(runs, current, flipped), torch.where(runs, flipped, current)
            divergence = next_token_divergence(with_block, without_block)
            costs.append(torch.zeros(labels.shape[0], device=divergence.device).index_add_(0, row_of, divergence))
        else:
            flipped = model._supervised_loss(hidden, labels)[1].sum(dim=1)
            costs.append(torch.where(output.keep[:, block], flipped - current, current - flipped))
    return torch.stack(costs, dim=1)


def next_token_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``(positions,)`` KL(p || q) of the next-token distributions given as log-probabilities ``(positions, vocab)``."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def target_log_probs(model, hidden: torch.Tensor, predicting: torch.Tensor) -> torch.Tensor:
    """``(positions, vocab)`` next-token log-probabilities at the ``predicting`` ``(batch, seq_len - 1)`` positions of
    ``hidden`` ``(batch, seq_len, hidden)``."""
    return F.log_softmax(model._target_logits(hidden, predicting).float(), dim=-1)
