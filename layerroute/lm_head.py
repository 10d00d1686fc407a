"""The LM head of a routed model: every logit, or under a grammar only those of the tokens the grammar allows.

A grammar often allows a handful of tokens (the tag and name of a tool call, its keys, JSON punctuation), and the
other logits are masked away anyway. Computing the head on those rows only makes the logits the grammar keeps the
same (up to floating-point rounding) and the others ``-inf``, as the grammar's mask would leave them. On a small model
the head is a large part of a decode token (49,152 x 576 on SmolLM2-135M: about as much as six of its blocks), and it
does not shrink with the blocks skipped.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .router import ROUTING_STATE

# The head is restricted when the grammar allows at most this share of the vocabulary: gathering the allowed rows of
# the weight and scattering their logits cost more per row than the full head's one matmul, so above a few tenths of
# the vocabulary the restricted head is slower (benchmarks/grammar_cost.py times both).
MAX_RESTRICTED_SHARE = 0.125


class RoutedLMHead(nn.Module):
    """Wraps a model's output embeddings (``(vocab, hidden)`` weight, optional bias).

    Outside a routed ``generate`` whose routing state carries a grammar, or when the grammar allows more than
    :data:`MAX_RESTRICTED_SHARE` of the vocabulary, it is the wrapped head. Either way it records in the routing state
    how many logits it computed, for the FLOP count.

    ``forward``: ``(..., hidden)`` -> ``(..., vocab)`` logits.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.vocab_size = head.weight.shape[0]

    @property
    def weight(self) -> nn.Parameter:
        return self.head.weight

    @weight.setter
    def weight(self, value: nn.Parameter) -> None:  # weight tying assigns the input embeddings' weight
        self.head.weight = value

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        state = ROUTING_STATE.get()
        allowed = None
        if state is not None and state.grammar is not None:
            allowed = state.grammar.allowed_tokens(int(MAX_RESTRICTED_SHARE * self.vocab_size))
        if allowed is None:
            logits = self.head(hidden)
        else:
            allowed = allowed.to(hidden.device)
            bias = self.head.bias.index_select(0, allowed) if self.head.bias is not None else None
            logits = hidden.new_full((*hidden.shape[:-1], self.vocab_size), float("-inf"))
            logits[..., allowed] = F.linear(hidden, self.head.weight.index_select(0, allowed), bias)
        if state is not None:
            positions = hidden.shape[-2] if hidden.dim() > 2 else 1
            state.lm_head_logits.append(positions * (self.vocab_size if allowed is None else len(allowed)))
        return logits
