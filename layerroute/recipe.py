"""The training recipe's steps, as functions: ``training/finetune.py`` runs them in order, and the training-cost
benchmark and the tests call the same ones.

The default recipe has three phases (``docs/method.md``):

1. :func:`warmup_step`: the routers learn alone on the frozen base, from measured skip costs;
2. :func:`lora_step`: LoRA trains under the routers' decisions, their weights frozen and their biases held by the
   :class:`~layerroute.training.RouterAnchor`;
3. :func:`refit_routers`: the routers are fitted once more to the warm-up's measured costs, read through the trained
   LoRA.

:func:`joint_step` is the joint recipe (routers and LoRA learn together from the first step). The LoRA-only and
static-pruning baselines take :func:`lora_step` without an anchor.

Every step runs under an ``accelerate.Accelerator``: the forward goes through ``model`` as the accelerator prepared
it (e.g. DDP-wrapped), the backward and gradient clipping through the accelerator, and measurements are gathered from
every process, so that all processes fit the same routers. Step types never reach a step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .config import ROUTER_POOLINGS
from .model import LayerRouteOutput
from .skip_costs import SKIP_COST_MEASURES, next_token_divergence, recording_probes, target_log_probs
from .steps import TokenizedStep
from .training import (
    PROBE_PRECISIONS,
    PROBE_SELECTIONS,
    Price,
    RouterAnchor,
    SkipCostMemory,
    fit_routers,
    read_router_features,
    refit_routers_holding_the_budget,
    router_loss,
    skipped_share,
)

MAX_GRAD_NORM = 1.0  # LoRA's gradients are clipped to this norm every step


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a training run is defined by; ``training/finetune.py`` takes it from a preset
    (``training/presets/``) and its command line. The defaults are the ``cpu`` preset: the embedded model and corpus,
    minutes on a 2-core CPU.

    Args:
        model: base model, a hub id, local directory or ``.gguf`` file; ``None``: the embedded SmolLM2-135M-Instruct.
        data: agent logs (any supported format) or dataset names; ``None``: the embedded corpus.
        router_warmup: steps in which the routers learn alone on the frozen base (:func:`warmup_step`); 0: the joint
            recipe (:func:`joint_step`).
        steps: LoRA steps after the warm-up (:func:`lora_step`), or joint steps.
        batch_size: steps (rows) per batch, per process.
        lr: LoRA's peak learning rate (AdamW, linear warm-up over 5% of ``steps``, then cosine decay to zero).
        router_lr: the routers' learning rate (AdamW; constant in a warm-up, the LoRA schedule in the joint recipe).
        max_length: context token budget per step.
        max_target_length: target token budget per step.
        seed: seeds the weights' initialisation, the batch order and the probed blocks.
        target_skip_rate: the skip budget, a share of the batch's block FLOPs (:class:`~layerroute.training.Price`).
        multiplier_step_size: how far the budget's Lagrange multiplier (the price of compute) moves per unit of the
            gap between the target and the skipped share, after every step.
        router_pooling: what a fresh adapter's routers read (``LayerRouteConfig.router_pooling``).
        router_init_bias: a fresh adapter's initial router bias (``LayerRouteConfig.router_init_bias``).
        base_kl_weight: the weight, in :func:`lora_step`'s loss, of the KL divergence of the frozen base's next-token
            distributions at full depth from LoRA's as routed (:func:`divergence_from_base`); 0: the task loss alone.
        skip_cost: how a measured skip costs a row: ``"kl"``, the KL divergence of its next-token distributions without
            the block from with it (the loss increase expected under the model's own predictions); ``"loss"``, the
            increase of its loss on the reference tokens.
        skip_cost_blocks: blocks per step whose skip cost is measured (each costs up to one extra forward without
            gradients).
        probe_selection: how those blocks are drawn: ``"uniform"``, or ``"uncertain"``, in proportion to how split
            their remembered rows are between keep and skip (:func:`~layerroute.training.probe_weights`).
        probe_precision: precision of the measurements (:func:`~layerroute.training.probe_dtype`).
        router_fit_steps: router optimiser passes over the remembered skip costs per step.
        router_refit_rounds: rounds of :func:`refit_routers` after a warm-up and the LoRA steps; 0: no refit.
        familiarity_quantile: do-no-harm routing (:mod:`layerroute.familiarity`): the share of training steps each
            router counts as familiar, in [0, 1]; 0: no check.
        familiarity_steps: training steps, drawn at random, whose features define the familiar regions (at least 2).
        min_steps_per_role: do-no-harm routing: the routers decide only after the roles of last context message
            (``user``, ``tool``, ...) after which the training steps hold at least this many steps of each type
            (:func:`~layerroute.familiarity.fit_context_roles`); after other roles every block runs. 0: after every
            role.
        no_routing: the LoRA-only baseline: every block runs, no routers learn.
        static_prune: the static-pruning baseline: the ``static_prune`` blocks of lowest influence
            (:func:`~layerroute.training.block_influence`) are skipped for every step and LoRA heals the rest.
    """

    model: str | None = None
    data: list[str] | None = None
    router_warmup: int = 40
    steps: int = 70
    batch_size: int = 4
    lr: float = 1e-3
    router_lr: float = 1e-2
    max_length: int = 512
    max_target_length: int = 160
    seed: int = 0
    target_skip_rate: float = 0.1
    multiplier_step_size: float = 1.0
    router_pooling: str = "last"
    router_init_bias: float = 4.0
    base_kl_weight: float = 0.0
    skip_cost: str = "kl"
    skip_cost_blocks: int = 4
    probe_selection: str = "uniform"
    probe_precision: str = "auto"
    router_fit_steps: int = 10
    router_refit_rounds: int = 30
    familiarity_quantile: float = 0.99
    familiarity_steps: int = 200
    min_steps_per_role: int = 100
    no_routing: bool = False
    static_prune: int = 0

    def __post_init__(self) -> None:
        for name, choices in (("router_pooling", ROUTER_POOLINGS), ("skip_cost", SKIP_COST_MEASURES),
                              ("probe_selection", PROBE_SELECTIONS), ("probe_precision", PROBE_PRECISIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.base_kl_weight < 0:
            raise ValueError(f"base_kl_weight must be at least 0 (0: the task loss alone), got {self.base_kl_weight}")
        if not 0.0 <= self.target_skip_rate < 1.0:
            raise ValueError(f"target_skip_rate must lie in [0, 1), got {self.target_skip_rate}")
        if not 0.0 <= self.familiarity_quantile <= 1.0:
            raise ValueError(f"familiarity_quantile must lie in [0, 1] (0: no check), got {self.familiarity_quantile}")
        if self.familiarity_steps < 2:
            raise ValueError(f"familiarity_steps must be at least 2, got {self.familiarity_steps}")
        if self.min_steps_per_role < 0:
            raise ValueError(f"min_steps_per_role must be at least 0 (0: the routers decide after every role), got "
                             f"{self.min_steps_per_role}")
        if (self.no_routing or self.static_prune) and self.router_warmup:
            raise ValueError("router_warmup trains routers; it does not combine with no_routing or static_prune")

    @property
    def learns_routes(self) -> bool:
        """Whether routers learn at all (not in the baselines)."""
        return not (self.no_routing or self.static_prune)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class StepOutcome:
    """What a training step did, for the caller's metrics.

    Attributes:
        output: the step's forward.
        loss: what the step minimised (``output.loss`` plus ``router_loss``, or in :func:`lora_step` plus the
            weighted :func:`divergence_from_base`); without a gradient in a warm-up step.
        router_loss: the routers' fit to the remembered skip costs at the step's start (zero where routers do not
            learn).
        blocks_skipped: share of (row, block) decisions that skipped, over every process's rows.
        flops_skipped: FLOP-weighted share of block compute skipped (:func:`~layerroute.training.skipped_share`),
            the mean over processes; what moves the price.
    """

    output: LayerRouteOutput
    loss: torch.Tensor
    router_loss: torch.Tensor
    blocks_skipped: float
    flops_skipped: float


def warmup_step(accelerator, model, batch: dict[str, torch.Tensor], price: Price, memory: SkipCostMemory,
                anchor: RouterAnchor, router_optimizer: torch.optim.Optimizer, probed: list[int], fit_steps: int,
                example_ids: torch.Tensor | None = None) -> StepOutcome:
    """The routers learn alone on the frozen base: one forward without gradients, the skip costs of the ``probed``
    blocks measured and remembered (:meth:`SkipCostMemory.measure`, rows named by ``example_ids`` ``(batch,)`` so that
    :func:`refit_routers` can read them again), the anchor's reference fed with what the routers read, the routers
    fitted in ``fit_steps`` passes of ``router_optimizer`` over the memory, and the price moved by the budget's gap.
    LoRA is untouched."""
    unwrapped = accelerator.unwrap_model(model)
    with accelerator.autocast(), torch.no_grad():
        with recording_probes(unwrapped) as probes:
            out = model(**batch, record_router_features=True)
        memory.measure(unwrapped, batch, out, probes, probed, gather=accelerator.gather, example_ids=example_ids)
        routing_loss = router_loss(unwrapped, memory, price)
        loss = out.loss + routing_loss
    anchor.observe(accelerator.gather(out.router_features.contiguous()))
    fit_routers(unwrapped, memory, price, router_optimizer, fit_steps)
    outcome = _outcome(accelerator, out, batch, loss, routing_loss)
    price.update(outcome.flops_skipped)
    return outcome


def lora_step(accelerator, model, batch: dict[str, torch.Tensor], lora_optimizer: torch.optim.Optimizer,
              anchor: RouterAnchor | None = None, forced_skip: Iterable[int] | None = None,
              base_kl_weight: float = 0.0) -> StepOutcome:
    """LoRA learns under the routers' decisions, the routers' weights frozen (blocks they skip do not run): one step
    of ``lora_optimizer`` on the task loss (plus ``base_kl_weight`` times :func:`divergence_from_base`), gradients
    clipped to :data:`MAX_GRAD_NORM`. With ``anchor``, every router's bias then follows the shift of what it reads
    (:meth:`RouterAnchor.follow`). ``forced_skip`` bypasses the routers as in :meth:`LayerRouteModel.forward` (``()``:
    the LoRA-only baseline runs every block)."""
    unwrapped = accelerator.unwrap_model(model)
    with accelerator.autocast():
        out = model(**batch, forced_skip=forced_skip, record_router_features=anchor is not None)
        loss = out.loss
        if base_kl_weight:
            loss = loss + base_kl_weight * divergence_from_base(unwrapped, batch, out.target_logits)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(_parameters(lora_optimizer), MAX_GRAD_NORM)
    lora_optimizer.step()
    lora_optimizer.zero_grad(set_to_none=True)
    if anchor is not None:
        anchor.follow(unwrapped, accelerator.gather(out.router_features.contiguous()))
    return _outcome(accelerator, out, batch, loss, torch.zeros((), device=out.loss.device))


def divergence_from_base(model, batch: dict[str, torch.Tensor], target_logits: torch.Tensor) -> torch.Tensor:
    """The KL divergence KL(base || adapter) of next-token distributions, averaged over the batch's supervised
    positions: the frozen base's at full depth (LoRA off, one forward without gradients) from the adapter's,
    ``target_logits`` ``(positions, vocab)`` of its forward of the same ``batch``
    (:attr:`~layerroute.model.LayerRouteOutput.target_logits`). Differentiable through ``target_logits``."""
    predicting = batch["labels"][:, 1:] != -100
    with torch.no_grad(), model.lora_disabled():
        # the wrapped HF model called directly runs every block: the base at full depth, no LM head on the way
        base_hidden = model.base_model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                             use_cache=False).last_hidden_state
    base = target_log_probs(model, base_hidden, predicting)
    return next_token_divergence(base, F.log_softmax(target_logits.float(), dim=-1)).mean()


def joint_step(accelerator, model, batch: dict[str, torch.Tensor], price: Price, memory: SkipCostMemory,
               lora_optimizer: torch.optim.Optimizer, router_optimizer: torch.optim.Optimizer, probed: list[int],
               fit_steps: int, example_ids: torch.Tensor | None = None) -> StepOutcome:
    """Routers and LoRA learn together: the skip costs of the ``probed`` blocks are measured and remembered, one
    backward of the task loss plus the routers' fit to the memory (the routers also learn from the task loss through
    the straight-through gates), a step of each optimizer (LoRA's gradients clipped), ``fit_steps - 1`` further router
    passes over the memory, and the price moved by the budget's gap."""
    unwrapped = accelerator.unwrap_model(model)
    with accelerator.autocast():
        with recording_probes(unwrapped) as probes:
            out = model(**batch, record_router_features=True)
        memory.measure(unwrapped, batch, out, probes, probed, gather=accelerator.gather, example_ids=example_ids)
        routing_loss = router_loss(unwrapped, memory, price)
        loss = out.loss + routing_loss
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(_parameters(lora_optimizer), MAX_GRAD_NORM)
    for optimizer in (lora_optimizer, router_optimizer):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    fit_routers(unwrapped, memory, price, router_optimizer, fit_steps - 1)  # the step above was the first pass
    outcome = _outcome(accelerator, out, batch, loss, routing_loss)
    price.update(outcome.flops_skipped)
    return outcome


def refit_routers(model, price: Price, memory: SkipCostMemory, router_optimizer: torch.optim.Optimizer,
                  examples: list[TokenizedStep], pad_token_id: int, batch_size: int, rounds: int,
                  fit_steps: int) -> tuple[int, float]:
    """Fit the routers once more to the skip costs ``memory`` holds, reading those rows' steps (``examples``,
    indexed by the rows' example ids) anew through LoRA as it is now (:meth:`SkipCostMemory.reread`), in ``rounds``
    rounds of ``fit_steps`` passes, the price moving each round to hold the budget on those steps
    (:func:`~layerroute.training.refit_routers_holding_the_budget`).

    The anchor undoes the shift LoRA causes in common to every step, not the rest of it; this fits the rest. Every
    process reads the same steps, so the routers stay identical across processes. The routers' weights are frozen
    again afterwards. Returns how many steps were read and the share of their block FLOPs the routers now skip.
    """
    remembered = memory.remembered_examples()
    steps = [examples[index] for index in remembered]
    features = read_router_features(model, steps, pad_token_id, batch_size, dtype=memory.probe_dtype)
    memory.reread(remembered, features)
    tokens = torch.tensor([len(step.context_ids) + len(step.target_ids) for step in steps])
    for router in model.routers:
        router.requires_grad_(True)
    share = refit_routers_holding_the_budget(model, memory, price, router_optimizer, features, tokens, rounds,
                                             fit_steps)
    for router in model.routers:
        router.requires_grad_(False)
    return len(remembered), share


def _outcome(accelerator, out: LayerRouteOutput, batch: dict[str, torch.Tensor], loss: torch.Tensor,
             router_loss: torch.Tensor) -> StepOutcome:
    blocks_skipped = 1.0 - accelerator.gather(out.keep.float().mean().reshape(1)).mean().item()
    tokens = batch["attention_mask"].sum(dim=1)
    flops_skipped = accelerator.gather(torch.tensor([skipped_share(out.keep, tokens)], device=loss.device))
    return StepOutcome(out, loss, router_loss, blocks_skipped, flops_skipped.mean().item())


def _parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [parameter for group in optimizer.param_groups for parameter in group["params"]]
