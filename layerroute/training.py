"""Training pieces the loop in ``training/finetune.py`` is built from: examples, batches and the gate regulariser.

Step types never enter a batch: :func:`collate` returns token ids and masks only, so the training loss cannot see
them. They stay on the examples for evaluation and reports.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .skip_costs import Probes, skip_costs
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


def batches(
    num_examples: int, batch_size: int, seed: int, start_step: int = 0, lengths: list[int] | None = None,
    group: int = 8,
) -> Iterator[list[int]]:
    """Endless, reproducible shuffled batches of example indices, resumable at any step.

    With ``lengths`` (tokens per example), each run of ``group`` batches is drawn at random, sorted by length and cut
    into batches, and those batches are shuffled: rows of a batch have similar lengths, so little compute goes to
    padding, while the data order stays random at the scale of a few batches.
    """
    per_epoch = max(num_examples // batch_size, 1)
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        shuffler = random.Random(seed * 1_000_003 + epoch)
        order = list(range(num_examples))
        shuffler.shuffle(order)
        if lengths is not None:
            grouped = []
            span = batch_size * group
            for start in range(0, per_epoch * batch_size, span):
                chunk = sorted(order[start : min(start + span, per_epoch * batch_size)], key=lengths.__getitem__)
                cut = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
                shuffler.shuffle(cut)
                grouped += [index for part in cut for index in part]
            order = grouped
        yield order[offset * batch_size : (offset + 1) * batch_size]
        step += 1


class Price:
    """The price of compute: the Lagrange multiplier of the skip budget, ``skipped_share == target_skip_rate``.

    The budget is a share of the batch's block FLOPs, shared by every step and block rather than imposed on each
    step: a row's blocks weigh as many tokens as the row runs through them (context plus target). After every step
    the multiplier moves by ``multiplier_step_size`` times the gap (:meth:`update`), rising while the batch skips too
    little and falling (below zero, which rewards keeping blocks) while it skips too much, so it settles at whatever
    price holds the budget, whatever the scale of the task loss.
    """

    def __init__(self, target_skip_rate: float, multiplier_step_size: float) -> None:
        self.target = target_skip_rate
        self.multiplier_step_size = multiplier_step_size
        self.multiplier = 0.0

    def update(self, skipped_share: float) -> None:
        self.multiplier += self.multiplier_step_size * (self.target - skipped_share)

    def keep_margins(self, loss_increase: torch.Tensor, price_weight: torch.Tensor) -> torch.Tensor:
        """How much more keeping the block is worth than its compute at the current price: positive where the block
        should run, negative where it should be skipped; the magnitude is what the wrong decision would cost.

        Args:
            loss_increase: how much skipping the block is expected to raise the task loss (the batch's mean
                target-token loss), per row: the row's summed expected increase over the batch's number of target
                tokens.
            price_weight: the row's share of the batch's block FLOPs for one block, ``tokens / (batch tokens *
                num_layers)``; times the multiplier, the change in the regulariser when the row skips the block.
        """
        return loss_increase - self.multiplier * price_weight

    def state_dict(self) -> dict:
        return {"multiplier": self.multiplier}

    def load_state_dict(self, state: dict) -> None:
        self.multiplier = float(state["multiplier"])


def skipped_share(keep: torch.Tensor, tokens: torch.Tensor | None = None) -> float:
    """FLOP-weighted share of blocks skipped, what the :class:`Price` holds to its target.

    Args: ``keep`` ``(batch, num_layers)`` bool; ``tokens`` ``(batch,)`` tokens each row runs (``None``: rows weigh the
    same).
    """
    weights = torch.ones(keep.shape[0], device=keep.device) if tokens is None else tokens.float()
    return float(((~keep).float() * weights[:, None]).sum() / (weights.sum() * keep.shape[1]))


class SkipCostMemory:
    """The replay memory the routers learn from: measured skip costs of the newest ``size`` rows per block, with what
    the block's router read for each row.

    Routers learn from measured costs, not from the gate's gradient alone: the straight-through gradient of a whole
    block's on/off switch is a linearisation that can promise a loss decrease where removing the block raises the
    loss a lot. So for a few blocks per step the rows are run again with the block's decision flipped
    (:func:`layerroute.skip_costs.skip_costs` with ``measure``) and what skipping cost each row is remembered
    (:meth:`measure`). ``probe_dtype`` runs the measurements under autocast to that dtype (:func:`probe_dtype`): a
    measurement needs the sign of a loss difference against a price, not the training forward's precision.

    Per block, the memory holds ``features`` ``(rows, hidden)``, ``loss_increase`` ``(rows,)`` in task-loss units,
    ``price_weight`` ``(rows,)`` (:meth:`Price.keep_margins`) and ``example_ids`` ``(rows,)``.
    """

    def __init__(self, num_layers: int, measure: str, probe_dtype: torch.dtype | None = None,
                 size: int = 256) -> None:
        self.skip_cost = measure
        self.probe_dtype = probe_dtype
        self.size = size
        self.blocks: list[dict[str, torch.Tensor] | None] = [None] * num_layers

    def measure(self, model, batch: dict[str, torch.Tensor], output, probes: Probes, blocks: list[int], gather=None,
                example_ids: torch.Tensor | None = None) -> None:
        """Measure what skipping each of ``blocks`` costs every row of ``batch`` and remember it.

        ``output`` is the training forward of ``batch`` with ``record_router_features=True``, ``probes`` what it
        recorded (:func:`~layerroute.skip_costs.recording_probes`). ``gather`` (e.g. ``accelerator.gather``)
        collects the measurements of every process, so all processes fit the same routers. ``example_ids``
        ``(batch,)`` names each row's training example, so that :meth:`reread` can later replace what the routers
        read for it (``-1``, the default: not re-readable).
        """
        precision = (torch.autocast(model.device.type, dtype=self.probe_dtype) if self.probe_dtype is not None
                     else nullcontext())
        with precision:
            costs = skip_costs(model, batch["input_ids"], batch["attention_mask"], batch["labels"], output, probes,
                               blocks, measure=self.skip_cost)
        tokens = batch["attention_mask"].sum(dim=1).float()
        supervised = (batch["labels"][:, 1:] != -100).sum().float()
        price_weight = tokens / (tokens.sum() * model.num_layers)
        features = output.router_features[:, blocks]
        loss_increase = costs / supervised
        if example_ids is None:
            example_ids = torch.full((len(tokens),), -1, dtype=torch.long)
        example_ids = example_ids.to(tokens.device)
        if gather is not None:
            features, loss_increase, price_weight, example_ids = gather(
                (features.contiguous(), loss_increase, price_weight, example_ids))
        for column, block in enumerate(blocks):
            self._remember(block, features[:, column], loss_increase[:, column], price_weight, example_ids)

    def _remember(self, block: int, features, loss_increase, price_weight, example_ids) -> None:
        new = {"features": features.detach().float().cpu(), "loss_increase": loss_increase.detach().float().cpu(),
               "price_weight": price_weight.detach().float().cpu(), "example_ids": example_ids.detach().long().cpu()}
        old = self.blocks[block]
        if old is not None:
            new = {key: torch.cat([old[key], value])[-self.size :] for key, value in new.items()}
        self.blocks[block] = new

    def remembered_examples(self) -> list[int]:
        """The training examples of every remembered row, sorted and without repeats."""
        ids = [memory["example_ids"] for memory in self.blocks if memory is not None]
        if not ids:
            return []
        ids = torch.cat(ids)
        if (ids < 0).any():
            raise ValueError("the skip-cost memory holds rows measured without example_ids; they cannot be re-read")
        return sorted(set(ids.tolist()))

    def reread(self, example_ids: list[int], features: torch.Tensor) -> None:
        """Replace what the routers read for every remembered row by ``features`` ``(len(example_ids), num_layers,
        hidden)``, read anew for ``example_ids`` (e.g. through LoRA trained since the costs were measured); the
        measured costs stay."""
        position = {example: row for row, example in enumerate(example_ids)}
        for block, memory in enumerate(self.blocks):
            if memory is not None:
                rows = torch.tensor([position[example] for example in memory["example_ids"].tolist()], dtype=torch.long)
                memory["features"] = features[rows, block].detach().float().cpu()

    def state_dict(self) -> dict:
        return {"blocks": self.blocks}

    def load_state_dict(self, state: dict) -> None:
        self.blocks = list(state["blocks"])


def router_loss(model, memory: SkipCostMemory, price: Price) -> torch.Tensor:
    """Sum over routers of each router's binary cross-entropy against the decisions that lower the Lagrangian for the
    rows it remembers: keep where the row's loss increase exceeds the price of the block's compute for that row, skip
    otherwise. Each row weighs as much as a wrong decision on it would cost, its margin (:meth:`Price.keep_margins`,
    normalised to a mean weight of one per router), so that the many near-ties do not outvote the rows where
    skipping really hurts. Targets and weights follow the current price. Step types are never consulted."""
    losses = []
    for router, rows in zip(model.routers, memory.blocks):
        if rows is not None:
            logits = router(rows["features"].to(router.proj.weight.device))
            margins = price.keep_margins(rows["loss_increase"], rows["price_weight"]).to(logits.device)
            wrong_decision_costs = margins.abs()
            weights = wrong_decision_costs / wrong_decision_costs.mean().clamp(min=torch.finfo(margins.dtype).tiny)
            losses.append(F.binary_cross_entropy_with_logits(logits, (margins > 0).float(), weight=weights))
    # routers are independent: each gets its own full gradient
    return torch.stack(losses).sum() if losses else torch.zeros((), device=model.device)


def fit_routers(model, memory: SkipCostMemory, price: Price, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """``steps`` passes of ``optimizer`` (over the routers' parameters) on :func:`router_loss`. The memory holds
    stored features, so a pass costs milliseconds, and every process holds the same memory, so under DDP the routers
    stay identical across processes."""
    for _ in range(steps):
        router_loss(model, memory, price).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def refit_routers_holding_the_budget(model, memory: SkipCostMemory, price: Price, optimizer: torch.optim.Optimizer,
                                     features: torch.Tensor, tokens: torch.Tensor, rounds: int, steps: int) -> float:
    """Fit the routers to the remembered rows while holding the budget on the remembered examples: ``rounds`` times,
    the price moves by the gap between the target and the share of those examples' block FLOPs the routers skip
    (decided from ``features`` ``(examples, num_layers, hidden)``, each example weighing its ``tokens``
    ``(examples,)``), then :func:`fit_routers` takes ``steps`` passes. Returns the share skipped at the end."""
    for _ in range(rounds):
        price.update(_share_skipped_reading(model, features, tokens))
        fit_routers(model, memory, price, optimizer, steps)
    return _share_skipped_reading(model, features, tokens)


def _share_skipped_reading(model, features: torch.Tensor, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        keep = torch.stack([block.router.decide(features[:, index].to(block.router.proj.weight),
                                                block.threshold)[1].cpu()
                            for index, block in enumerate(model.blocks)], dim=1)
    return skipped_share(keep, tokens)


def probe_weights(memory: SkipCostMemory, price: Price) -> torch.Tensor:
    """How much a new measurement of each block is worth, ``(num_layers,)``: ``p * (1 - p)``, where ``p = (s + 1) /
    (n + 2)`` estimates the share of the block's rows worth skipping at the current price from the ``s`` of its ``n``
    remembered rows that are. Where no row (or every row) is worth skipping, the router's bias alone decides and more
    rows teach it little; where rows split, the router must learn to tell them apart. Unmeasured blocks weigh most."""
    weights = []
    for rows in memory.blocks:
        skip_worthy, count = 0, 0
        if rows is not None:
            margins = price.keep_margins(rows["loss_increase"], rows["price_weight"])
            skip_worthy, count = int((margins < 0).sum()), len(margins)
        share = (skip_worthy + 1) / (count + 2)
        weights.append(share * (1 - share))
    return torch.tensor(weights)


class RouterAnchor:
    """Holds frozen routers' decisions steady while LoRA moves the hidden states they read.

    With a router warm-up (``finetune.py --router-warmup``) the routers are fitted on the frozen base and their
    weights are then frozen while LoRA trains. LoRA in the blocks below a router shifts what it reads, and the shift
    is mostly common to every step (``docs/method.md``). So the mean of every router's features is taken over the
    warm-up (:meth:`observe`), tracked afterwards as a moving average over training batches (:meth:`follow`), and
    each router's bias is moved by minus its weight times the mean's shift: a shift common to all steps no longer
    moves the decisions, while the routers' weights still tell steps apart as the warm-up fitted them.
    """

    def __init__(self, num_layers: int, hidden_size: int, decay: float = 0.9) -> None:
        self.decay = decay
        self.reference_sum = torch.zeros(num_layers, hidden_size)
        self.reference_rows = 0
        self.moving_mean: torch.Tensor | None = None
        self.reference_bias: torch.Tensor | None = None

    def observe(self, features: torch.Tensor) -> None:
        """Add a warm-up batch's router features ``(batch, num_layers, hidden)`` to the reference mean."""
        self.reference_sum += features.detach().float().sum(dim=0).cpu()
        self.reference_rows += features.shape[0]

    @torch.no_grad()
    def follow(self, model, features: torch.Tensor) -> None:
        """Move the moving mean toward a training batch's router features ``(batch, num_layers, hidden)`` and
        re-centre every router's bias on it."""
        if self.reference_rows == 0:
            raise RuntimeError("RouterAnchor.follow before any observe(): no warm-up features to anchor to")
        reference = self.reference_sum / self.reference_rows
        if self.moving_mean is None:
            self.moving_mean = reference.clone()
            self.reference_bias = torch.stack([router.proj.bias.detach().float().cpu() for router in model.routers])
        self.moving_mean.mul_(self.decay).add_(features.detach().float().mean(dim=0).cpu(), alpha=1 - self.decay)
        for block, router in enumerate(model.routers):
            shift = (self.moving_mean[block] - reference[block]).to(router.proj.weight.device)
            router.proj.bias.copy_(self.reference_bias[block].to(shift.device) - router.proj.weight[0] @ shift)

    def state_dict(self) -> dict:
        return {"reference_sum": self.reference_sum, "reference_rows": self.reference_rows,
                "moving_mean": self.moving_mean, "reference_bias": self.reference_bias}

    def load_state_dict(self, state: dict) -> None:
        self.reference_sum = state["reference_sum"]
        self.reference_rows = int(state["reference_rows"])
        self.moving_mean = state["moving_mean"]
        self.reference_bias = state["reference_bias"]


PROBE_PRECISIONS = ("auto", "bf16", "fp32")  # the choices of probe_dtype
PROBE_SELECTIONS = ("uniform", "uncertain")  # how probed_blocks draws: without or with probe_weights


def probe_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype skip costs are measured in, for ``precision`` ``"fp32"`` (``None``: the training forward's own
    precision), ``"bf16"``, or ``"auto"``: bfloat16 where the device computes it faster than float32 (CUDA GPUs
    with bf16, CPUs with AVX512-BF16 or AMX)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"probe precision must be auto, bf16 or fp32, not {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        # private probes of torch.cpu (present in the torch versions this package supports); absent means "no"
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        if any(getattr(torch.cpu, check, lambda: False)() for check in checks):
            return torch.bfloat16
    return None


def probed_blocks(num_layers: int, count: int, seed: int, step: int, weights: torch.Tensor | None = None) -> list[int]:
    """The blocks whose skip cost is measured at ``step``: ``count`` of them, drawn afresh (and reproducibly, for
    resuming) every step, uniformly or, given positive ``weights`` ``(num_layers,)`` (e.g. :func:`probe_weights`),
    without replacement in proportion to them."""
    draw = random.Random(seed * 1_000_003 + step)
    count = min(count, num_layers)
    if weights is None:
        return sorted(draw.sample(range(num_layers), count))
    # Efraimidis-Spirakis: the `count` largest keys u ** (1 / weight) are a weighted draw without replacement
    keys = [draw.random() ** (1.0 / weight) for weight in weights.tolist()]
    return sorted(sorted(range(num_layers), key=keys.__getitem__)[-count:])


@torch.no_grad()
def read_router_features(model, examples: list[TokenizedStep], pad_token_id: int, batch_size: int = 4,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """What every router reads for each of ``examples``, with LoRA and the routers as they are now (blocks the
    routers skip are not run): ``(len(examples), num_layers, hidden)``. Only the contexts run, since the routers read
    nothing else, batched by length so that little compute goes to padding; ``dtype`` runs them under autocast (see
    :func:`probe_dtype`)."""
    model.eval()
    precision = torch.autocast(model.device.type, dtype=dtype) if dtype is not None else nullcontext()
    contexts = [dataclasses.replace(example, target_ids=[]) for example in examples]
    by_length = sorted(range(len(contexts)), key=lambda index: len(contexts[index].context_ids))
    features = []
    with precision:
        for start in range(0, len(by_length), batch_size):
            batch = collate([contexts[index] for index in by_length[start : start + batch_size]], pad_token_id)
            output = model(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device),
                           record_router_features=True)
            features.append(output.router_features.float().cpu())
    return torch.cat(features)[torch.tensor(by_length).argsort()]


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


def fix_routes(model, skipped: list[int]) -> None:
    """Turn every router into a constant: the ``skipped`` blocks are skipped for every step, the others always run.

    This is static pruning expressed as an ordinary adapter (zero router weights, saturated biases), so a pruned
    model saves, loads, serves and evaluates like any other.
    """
    with torch.no_grad():
        for index, router in enumerate(model.routers):
            router.proj.weight.zero_()
            router.proj.bias.fill_(-20.0 if index in skipped else 20.0)
