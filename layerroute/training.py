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


class SkipBudget:
    """Gate regulariser as a compute budget: the batch should skip ``config.target_skip_rate`` of its block FLOPs.

    The budget is shared by the whole batch (every step and block), not imposed on each step, so the routers may
    spend it where skipping costs the task loss least. Compute is priced in FLOPs: a row's blocks weigh as many
    tokens as the row runs through them (context plus target), while the task loss counts the row's target tokens
    only. Skipping a block for a step with a long context and a short answer therefore buys much compute for
    little loss; the step's type is never consulted.

    The penalty is ``multiplier * (target - skipped_share)``, with the skipped share taken from the hard gates and
    differentiated through the keep probabilities (straight-through). The multiplier is the Lagrange multiplier of
    the equality constraint ``skipped_share == target``: it moves by ``config.regularizer_weight`` times the gap
    after every step, rising while the batch skips too little and falling (below zero, which rewards keeping
    blocks) while it skips too much, so it settles at whatever price of compute holds the budget, whatever the
    scale of the task loss, and damps overshoot in both directions.
    """

    def __init__(self, config: LayerRouteConfig, multiplier: float = 0.0) -> None:
        self.target = config.target_skip_rate
        self.step_size = config.regularizer_weight
        self.multiplier = multiplier

    @staticmethod
    def skipped_share(keep_probs: torch.Tensor, keep: torch.Tensor, tokens: torch.Tensor | None = None):
        """FLOP-weighted share of blocks skipped (straight-through: hard value, soft gradient).

        Args: ``keep_probs`` and ``keep`` ``(batch, num_layers)``; ``tokens`` ``(batch,)`` tokens each row runs
        (``None``: rows weigh the same).
        """
        gates = keep.to(keep_probs.dtype) + keep_probs - keep_probs.detach()
        weights = torch.ones(gates.shape[0], device=gates.device) if tokens is None else tokens.to(gates)
        return ((1.0 - gates) * weights[:, None]).sum() / (weights.sum() * gates.shape[1])

    def penalty(self, keep_probs: torch.Tensor, keep: torch.Tensor, tokens: torch.Tensor | None = None):
        return self.multiplier * (self.target - self.skipped_share(keep_probs, keep, tokens))

    def update(self, skipped_share: float) -> None:
        self.multiplier += self.step_size * (self.target - skipped_share)

    def state_dict(self) -> dict:
        return {"multiplier": self.multiplier}

    def load_state_dict(self, state: dict) -> None:
        self.multiplier = float(state["multiplier"])


@torch.no_grad()
def block_influence(model, examples: list[TokenizedStep], pad_token_id: int, batch_size: int = 4) -> torch.Tensor:
    """How much each block changes the hidden states: mean over context tokens of ``1 - cos(h_in, h_out)``.

    Returns a ``(num_layers,)`` tensor. Measured with every block running and LoRA as it is.
    """
    model.eval()
    totals = torch.zeros(model.num_layers)
    count = 0
    captured: dict[int, torch.Tensor] = {}
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(index):
        def record(module, args, output):
            hidden_in = args[0] if args else None
            hidden_out = output[0] if isinstance(output, tuple) else output
            similarity = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            mask = mask_holder["mask"].to(similarity.device)
            captured[index] = ((1 - similarity) * mask).sum().cpu()
        return record

    handles = [block.block.register_forward_hook(hook(i)) for i, block in enumerate(model.blocks)]
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_token_id)
            mask_holder["mask"] = batch["context_mask"].float()
            model(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device), forced_skip=())
            totals += torch.stack([captured[i] for i in range(model.num_layers)])
            count += int(batch["context_mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
    return totals / max(count, 1)


def init_router_biases(model, influence: torch.Tensor, low: float, high: float) -> None:
    """Start each router's bias between ``low`` (least influential block: close to being skipped) and ``high``
    (most influential: firmly kept), linearly in the block's influence rank, so the budget is first spent on the
    blocks that matter least rather than on whichever flips first."""
    ranks = torch.empty_like(influence)
    ranks[influence.argsort()] = torch.arange(len(influence), dtype=influence.dtype)
    with torch.no_grad():
        for router, rank in zip(model.routers, ranks):
            router.proj.bias.fill_(low + (high - low) * float(rank) / max(len(influence) - 1, 1))
