"""Analytic forward FLOP counts and the per-step routing record.

A multiply-add counts as two FLOPs. Counted: every matmul of a block (q/k/v/o projections, the attention scores
and the weighted sum of values over the keys each query can see, the MLP, LoRA's low-rank path where attached) and
the LM head for the positions whose logits are actually computed. Not counted: norms, activations, softmax, rotary
embeddings, the embedding lookup and the routers themselves (``2 * hidden_size`` per block per step, under 0.01% of
a block).
"""

from __future__ import annotations

from dataclasses import dataclass

from .architectures import BlockShape


def block_flops(block: BlockShape, num_tokens: int, num_key_reads: int, extra_flops_per_token: int = 0) -> int:
    """FLOPs one decoder block spends on ``num_tokens`` query tokens.

    Args:
        block: the block's dimensions.
        num_tokens: query tokens the block processes.
        num_key_reads: sum over those tokens of the number of keys each attends to (causal: position ``p``
            attends to ``p + 1`` keys).
        extra_flops_per_token: per-token FLOPs of adapters inside the block (LoRA).
    """
    hidden, inner = block.hidden_size, block.intermediate_size
    q_dim = block.num_heads * block.head_dim
    kv_dim = block.num_kv_heads * block.head_dim
    projections = 2 * num_tokens * hidden * (2 * q_dim + 2 * kv_dim)
    attention = 2 * 2 * num_key_reads * q_dim
    mlp = 2 * num_tokens * hidden * inner * (3 if block.gated_mlp else 2)
    return projections + attention + mlp + num_tokens * extra_flops_per_token


def causal_key_reads(num_past: int, num_new: int) -> int:
    """Keys read by ``num_new`` causal queries that follow ``num_past`` cached positions."""
    first, last = num_past + 1, num_past + num_new
    return (first + last) * num_new // 2


@dataclass(frozen=True)
class RouteStats:
    """What the routers decided for one step (one sequence of one ``generate`` call), and what it saved.

    Attributes:
        skipped_layers: indices of the blocks that did not run for this step.
        num_layers: blocks in the model.
        flops_total: forward FLOPs the full model (every block running) would spend on this step: prefill of the
            context plus every decode forward, attention included, LM head as actually computed.
        flops_skipped: the part of ``flops_total`` that belongs to skipped blocks.
    """

    skipped_layers: list[int]
    num_layers: int
    flops_total: int
    flops_skipped: int

    @property
    def layers_skipped_frac(self) -> float:
        return len(self.skipped_layers) / self.num_layers

    @property
    def flops_skipped_frac(self) -> float:
        return self.flops_skipped / self.flops_total if self.flops_total else 0.0

    def to_dict(self) -> dict:
        return {
            "skipped_layers": list(self.skipped_layers),
            "num_layers": self.num_layers,
            "layers_skipped_frac": self.layers_skipped_frac,
            "flops_total": self.flops_total,
            "flops_skipped": self.flops_skipped,
            "flops_skipped_frac": self.flops_skipped_frac,
        }


def flops_executed(route: dict) -> int:
    """FLOPs executed for a step, from its route metadata (:attr:`RouteStats` fields, and ``flops_discarded`` where
    a routed attempt was discarded and the step generated again at full depth, :class:`~layerroute.chat.ChatAnswer`).
    """
    return int(route["flops_total"]) - int(route["flops_skipped"]) + int(route.get("flops_discarded", 0))


def step_route_stats(
    skipped_layers: list[int],
    num_layers: int,
    block: BlockShape,
    context_tokens: int,
    forwarded_tokens: int,
    lm_head_logits: int,
    extra_flops_per_token: int = 0,
) -> RouteStats:
    """Route stats of one step.

    Args:
        context_tokens: prompt tokens of the step (prefilled at once).
        forwarded_tokens: tokens fed through the model in total, prompt included (a step that generates ``n``
            tokens forwards ``context_tokens + n - 1``: the last token is never fed back).
        lm_head_logits: logits the LM head computed: positions x vocabulary size, or fewer rows where a grammar
            restricted the head (:mod:`layerroute.lm_head`).
    """
    decode_tokens = forwarded_tokens - context_tokens
    per_block = block_flops(
        block, context_tokens, causal_key_reads(0, context_tokens), extra_flops_per_token
    ) + block_flops(block, decode_tokens, causal_key_reads(context_tokens, decode_tokens), extra_flops_per_token)
    lm_head = 2 * lm_head_logits * block.hidden_size
    return RouteStats(
        skipped_layers=sorted(skipped_layers),
        num_layers=num_layers,
        flops_total=per_block * num_layers + lm_head,
        flops_skipped=per_block * len(skipped_layers),
    )
