"""Training pieces the loop in ``training/finetune.py`` is built from: examples, batches and the gate regulariser.

Step types never enter a batch: :func:`collate` returns token ids and masks only, so the training loss cannot see
them. They stay on the examples for evaluation and reports.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .config import LayerRouteConfig
from .steps import TokenizedStep, tokenize_step, trace_steps
from .traces import Trace


@dataclass
class ExampleSet:
    examples: list[TokenizedStep]
    dropped: Counter  # reason -> count; reported, never silent

    def counts(self) -> dict[str, int]:
        return dict(Counter(example.step_type for example in self.examples))


def build_examples(traces: list[Trace], tokenizer, max_context_tokens: int, max_target_tokens: int) -> ExampleSet:
    """Tokenize every assistant step of ``traces``; steps whose system prompt and tools alone exceed the context
    budget are dropped and counted."""
    examples, dropped = [], Counter()
    for trace in traces:
        for step in trace_steps(trace):
            try:
                examples.append(tokenize_step(step, tokenizer, max_context_tokens, max_target_tokens))
            except ValueError:
                dropped["system prompt and tool schemas exceed the context budget"] += 1
    if not examples:
        raise ValueError(
            "no usable assistant steps in the data"
            + (f" (dropped: {dict(dropped)}); raise --max-length" if dropped else "")
        )
    return ExampleSet(examples, dropped)


def collate(examples: list[TokenizedStep], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch.

    Returns:
        ``input_ids`` ``(batch, seq_len)``; ``attention_mask`` ``(batch, seq_len)``; ``context_mask``
        ``(batch, seq_len)``, true on the context tokens the routers may read; ``labels`` ``(batch, seq_len)``, the
        target tokens and ``-100`` elsewhere.
    """
    width = max(len(e.context_ids) + len(e.target_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    context_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        context, target = len(example.context_ids), len(example.target_ids)
        input_ids[row, : context + target] = torch.tensor(example.context_ids + example.target_ids)
        attention_mask[row, : context + target] = 1
        context_mask[row, :context] = True
        labels[row, context : context + target] = torch.tensor(example.target_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "context_mask": context_mask, "labels": labels}


def batches(num_examples: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[list[int]]:
    """Endless, reproducible shuffled batches of example indices, resumable at any step."""
    per_epoch = max(num_examples // batch_size, 1)
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = list(range(num_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        yield order[offset * batch_size : (offset + 1) * batch_size]
        step += 1


def gate_regularizer(keep_probs: torch.Tensor, keep: torch.Tensor, config: LayerRouteConfig) -> torch.Tensor:
    """Budget regulariser: the batch's skip rate should meet ``config.target_skip_rate``.

    The budget is shared by the whole batch (every step and block), not imposed on each step: the routers may spend
    it where skipping costs the task loss least. Value: the squared gap between the batch's hard skip rate and the
    target; gradient: through the keep probabilities (straight-through).

    Args:
        keep_probs: ``(batch, num_layers)`` keep probabilities.
        keep: ``(batch, num_layers)`` hard decisions.
    """
    gates = keep.to(keep_probs.dtype) + keep_probs - keep_probs.detach()
    skip_rate = 1.0 - gates.mean()
    return config.regularizer_weight * (skip_rate - config.target_skip_rate) ** 2
