"""Train LayerRoute routers + LoRA on your own agent logs.

    python training/finetune.py                                  # embedded SmolLM2-135M + embedded corpus, CPU-sized
    python training/finetune.py --data logs/*.jsonl --model Qwen/Qwen2.5-0.5B-Instruct --output runs/mine
    python training/finetune.py --preset seed                    # published setting (GPU): Qwen2.5-0.5B, 3,000 steps
    accelerate launch training/finetune.py ...                   # several GPUs / nodes (DDP)
    python training/finetune.py --output runs/x --resume         # continue an interrupted run

The recipe (``layerroute.recipe``, ``docs/method.md``): the routers first learn alone on the frozen base for
``router_warmup`` steps, from measured skip costs under a FLOP budget whose price is a Lagrange multiplier; then they
keep their weights while LoRA trains for ``--steps`` steps under their decisions, their biases re-centred on how LoRA
shifts what they read; then they are fitted once more to the warm-up's measured costs, read through the trained LoRA;
last, their familiar regions are fitted, and the roles of last context message after which the training steps hold
both step types are recorded (do-no-harm routing). Step types never reach the loss; they are used only for that
count and the held-out report.

Settings come from a preset (``training/presets/NAME.py``, a ``TrainingConfig``) and the command line. Every field of
``layerroute.recipe.TrainingConfig`` is also a flag (``--router-lr 0.02``, ``--router-warmup 0`` for the joint
recipe); the research ones are listed below the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import os
import random
import runpy
import signal
import sys
import textwrap
import time
import typing
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from safetensors import SafetensorError
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from layerroute import LayerRouteConfig, LayerRouteModel, load_base_model  # noqa: E402
from layerroute.checkpoints import recover_directory, replace_directory  # noqa: E402
from layerroute.errors import ENVIRONMENT_ERRNOS, MissingInputError, UserError, command, user_input  # noqa: E402
from layerroute.evaluation import routing_report, write_training_report  # noqa: E402
from layerroute.familiarity import fit_context_roles, fit_familiarity  # noqa: E402
from layerroute.logs import add_log_level_argument, configure_logging  # noqa: E402
from layerroute.model import ADAPTER_CONFIG  # noqa: E402
from layerroute.recipe import TrainingConfig, joint_step, lora_step, refit_routers, warmup_step  # noqa: E402
from layerroute.traces import read_sources  # noqa: E402
from layerroute.training import (  # noqa: E402
    Price,
    RouterAnchor,
    SkipCostMemory,
    batches,
    block_influence,
    build_examples,
    collate,
    fix_routes,
    probe_dtype,
    probe_weights,
    probed_blocks,
)

# progress and diagnostics go to stderr through logging, from the main process only; stdout keeps the JSON summary
logger = logging.getLogger("layerroute.finetune")
CORPUS = ROOT / "training" / "data" / "corpus"
PRESETS = ROOT / "training" / "presets"
# the TrainingConfig fields shown in --help (the others are flags too, for research)
USER_SETTINGS = {
    "model": "hub id, local dir or .gguf (default: the embedded SmolLM2-135M-Instruct)",
    "data": "agent logs (JSON/JSONL, any supported format) or dataset names (default: the embedded corpus)",
    "steps": "LoRA training steps, after the router warm-up",
    "batch_size": "steps per batch (per process)",
    "lr": "LoRA learning rate",
    "max_length": "context token budget per step",
    "seed": "seed of the initialisation, batch order and skip-cost probes",
    "target_skip_rate": "the compute budget: the share of block FLOPs the routers should skip",
    "familiarity_quantile": "do-no-harm routing: the share of training steps each router counts as familiar; "
                            "a step outside runs every block from there on (0: no check)",
    "min_steps_per_role": "do-no-harm routing: the routers decide only after message roles (user, tool) that "
                          "this many training steps of each type follow; after others every block runs (0: no check)",
    "no_routing": "LoRA-only baseline with the same budget",
    "static_prune": "static-pruning baseline: delete this many blocks, those of lowest influence (1 - cos of block "
                    "input and output on training steps), for every step, and heal with LoRA",
}


def parse_args(argv=None) -> tuple[TrainingConfig, argparse.Namespace]:
    """The run's :class:`TrainingConfig` (the preset's, with the fields given on the command line replaced) and the
    options of this invocation that the run does not depend on (where it writes, how often it saves and reports)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    presets = sorted(path.stem for path in PRESETS.glob("*.py"))
    parser.add_argument("--preset", choices=presets, default="cpu", help="training/presets/NAME.py")
    hints = typing.get_type_hints(TrainingConfig)
    research = []
    for field in dataclasses.fields(TrainingConfig):
        flag, hint = "--" + field.name.replace("_", "-"), hints[field.name]
        shown = USER_SETTINGS.get(field.name, argparse.SUPPRESS)
        if hint is bool:
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=shown)
            continue
        if typing.get_origin(hint) is not None:  # Optional[...] or list[...]
            options = [option for option in typing.get_args(hint) if option is not type(None)]
            hint = options[0]
        many = typing.get_origin(hint) is list
        parser.add_argument(flag, type=typing.get_args(hint)[0] if many else hint, nargs="+" if many else None,
                            default=argparse.SUPPRESS, help=shown)
        if field.name not in USER_SETTINGS:
            research.append(flag)
    parser.add_argument("--validation-data", nargs="+", default=None, help="held-out logs for the final report")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "default")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output")
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--report-steps", type=int, default=120, help="held-out steps in the final routing report")
    parser.add_argument("--on-bad-record", choices=("raise", "skip"), default="raise")
    add_log_level_argument(parser)
    parser.epilog = textwrap.fill("research settings (layerroute.recipe.TrainingConfig documents them; the presets "
                                  "set them): " + " ".join(research), width=100)
    args = parser.parse_args(argv)
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainingConfig)
             if hasattr(args, field.name)}
    preset = runpy.run_path(str(PRESETS / f"{args.preset}.py"))["config"]
    if given.get("no_routing") or given.get("static_prune"):
        if given.get("router_warmup"):
            parser.error("--router-warmup trains routers; it does not combine with --no-routing or --static-prune")
        given["router_warmup"] = 0  # the baselines train LoRA for the same --steps, with no routers to warm up
    try:
        config = dataclasses.replace(preset, **given)
    except ValueError as error:
        parser.error(str(error))
    run = argparse.Namespace(**{key: value for key, value in vars(args).items() if key not in given})
    return config, run


def save_checkpoint(directory: Path, model, optimizers, schedulers, price, memory, anchor, step: int,
                    config: TrainingConfig) -> None:
    """Adapter + optimizers + schedulers + price + skip-cost memory + anchor + step, replacing the checkpoint as a whole
    (:func:`layerroute.checkpoints.replace_directory`): killed at any point, or out of disk, the run keeps its last
    complete checkpoint."""
    state = io.BytesIO()  # serialised in memory, so that a full disk fails as an OSError of the write below
    torch.save({"optimizers": [o.state_dict() for o in optimizers], "schedulers": [s.state_dict() for s in schedulers],
                "price": price.state_dict(), "skip_costs": memory.state_dict(), "anchor": anchor.state_dict(),
                "step": step}, state)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        (staging / "training_state.pt").write_bytes(state.getvalue())
        (staging / "run.json").write_text(json.dumps(config.to_dict(), indent=2))

    try:
        replace_directory(directory, write)
    except (OSError, SafetensorError) as error:
        if isinstance(error, OSError) and error.errno not in ENVIRONMENT_ERRNOS:
            raise  # not the disk's state: a bug
        kept = f"{directory} keeps the last complete one" if directory.exists() else "no checkpoint was written before"
        raise UserError(f"cannot write the checkpoint of step {step} ({error}); {kept}") from error


def trim_metrics(path: Path, start: int) -> None:
    """Keep the metrics of steps up to ``start``, the step resumed from: a run stopped after its last checkpoint logged
    steps that the resumed run repeats, the last line perhaps half-written."""
    kept = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= start:
            kept.append(line + "\n")
    staging = path.with_name(path.name + ".tmp")
    staging.write_text("".join(kept))
    os.replace(staging, path)


def warmup_cosine(optimizer, steps: int):
    """Learning rate rising linearly over the first 5% of ``steps``, then a cosine decay to zero at ``steps``."""
    steps = max(steps, 1)
    warmup = max(steps // 20, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    )


def changed_settings(recorded: dict, now: dict) -> list[str]:
    """``--flag was X, now Y`` for every setting that differs between the run a checkpoint recorded and this one."""
    return [f"--{key.replace('_', '-')} was {recorded.get(key, 'not recorded')!r}, now {now.get(key, 'unset')!r}"
            for key in sorted(set(recorded) | set(now)) if recorded.get(key, "not recorded") != now.get(key, "unset")]


def skip_rate_by_type(keep: torch.Tensor, step_types: list[str]) -> dict[str, float]:
    skipped = (~keep).float().mean(dim=1).tolist()
    return {kind: sum(v for v, t in zip(skipped, step_types) if t == kind) / step_types.count(kind)
            for kind in sorted(set(step_types))}


@command("finetune")
def main(argv=None) -> int:
    config, run = parse_args(argv)
    configure_logging(run.log_level)
    # after a router warm-up the routers' weights are frozen mid-run, so DDP must not wait for their gradients
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no",
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=bool(config.router_warmup))])
    logger.disabled = not accelerator.is_main_process
    torch.manual_seed(config.seed)
    output, checkpoint = run.output, run.output / "checkpoint"
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; choose a directory")
    if accelerator.is_main_process:  # a run killed while saving a checkpoint leaves it to be put back in place
        recover_directory(checkpoint)
    accelerator.wait_for_everyone()
    if (checkpoint.exists() or (output / ADAPTER_CONFIG).exists()) and not run.resume:
        raise UserError(f"{output} already holds a run; pass --resume to continue it or choose another --output")
    if run.resume:
        if not checkpoint.exists():
            raise MissingInputError(f"--resume: {checkpoint} does not exist")
        with user_input(f"--resume: {checkpoint}"):
            recorded = json.loads((checkpoint / "run.json").read_text())
        changed = changed_settings(recorded, config.to_dict())
        if changed:
            raise UserError(f"--resume: {output} holds a different run ({'; '.join(changed)}); resume it with the "
                            "settings it was started with, or choose another --output")

    # ---------------------------------------------------------------- data
    # read before the model loads, so that a wrong path or a bad record costs no model load
    sources = config.data or [str(CORPUS / "train.jsonl.gz")]
    validation_sources = run.validation_data or [str(CORPUS / "validation.jsonl.gz")]
    read, validation = (read_sources(s, on_bad_record=run.on_bad_record) for s in (sources, validation_sources))
    for logs, result in ((sources, read), (validation_sources, validation)):
        if result.skipped:
            logger.warning(f"skipped {len(result.skipped)} unreadable records of {logs}: {result.skipped_summary()}")
        if not result.traces:
            raise UserError(f"no traces in {logs}")
    with user_input("--model"):
        base, tokenizer = load_base_model(config.model)
    with user_input("--data"):
        train = build_examples(read.traces, tokenizer, config.max_length, config.max_target_length)
    with user_input("--validation-data"):
        held_out = build_examples(validation.traces, tokenizer, config.max_length, config.max_target_length)
    logger.info(f"training steps by type (reporting only): {train.counts()}; dropped: {dict(train.dropped)}")

    # ---------------------------------------------------------------- model and optimisers
    if run.resume:
        model = LayerRouteModel.from_pretrained(checkpoint, base_model=base)
    else:
        adapter = LayerRouteConfig(router_pooling=config.router_pooling, router_init_bias=config.router_init_bias)
        model = LayerRouteModel.from_base(base, adapter, base_model_name_or_path=config.model)
    if config.static_prune and not run.resume:
        probe = [train.examples[i] for i in next(batches(len(train.examples), 32, config.seed + 1))]
        influence = block_influence(model, probe, tokenizer.pad_token_id)
        pruned = sorted(influence.argsort()[: config.static_prune].tolist())
        fix_routes(model, pruned)
        logger.info(f"static pruning: blocks {pruned} deleted for every step (influence "
                          + " ".join(f"{v:.3f}" for v in influence.tolist()) + ")")
    if not config.learns_routes:
        for router in model.routers:
            router.requires_grad_(False)
    routers = [p for n, p in model.named_parameters() if p.requires_grad and ".router." in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and ".router." not in n]
    optimizers = [torch.optim.AdamW(lora, lr=config.lr, weight_decay=0.0)]
    if routers:
        optimizers.append(torch.optim.AdamW(routers, lr=config.router_lr, weight_decay=0.0))
    schedulers = [warmup_cosine(optimizers[0], config.steps)]
    if routers and not config.router_warmup:  # in a warm-up the routers follow the moving price at a steady rate
        schedulers.append(warmup_cosine(optimizers[1], config.steps))
    anchor = RouterAnchor(model.num_layers, model.shape.block.hidden_size)
    price = Price(config.target_skip_rate, config.multiplier_step_size)
    memory = SkipCostMemory(model.num_layers, config.skip_cost, probe_dtype(config.probe_precision, accelerator.device))
    start = 0
    if run.resume:
        state = torch.load(checkpoint / "training_state.pt", weights_only=True)
        for optimizer, saved in zip(optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        price.load_state_dict(state["price"])
        memory.load_state_dict(state["skip_costs"])
        anchor.load_state_dict(state["anchor"])
        start = state["step"]
        logger.info(f"resuming {output} at step {start}")
    model, *optimizers = accelerator.prepare(model, *optimizers)
    unwrapped = accelerator.unwrap_model(model)
    model.train()

    # ---------------------------------------------------------------- training
    output.mkdir(parents=True, exist_ok=True)
    metrics_path = output / "metrics.jsonl"
    if accelerator.is_main_process:
        trim_metrics(metrics_path, start)
    interrupted = False

    def stop(*_):
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)  # what schedulers and preemption send: saved and resumable like Ctrl-C
    shard = accelerator.process_index
    lengths = [len(e.context_ids) + len(e.target_ids) for e in train.examples]
    order = batches(len(train.examples), config.batch_size * accelerator.num_processes, config.seed, start, lengths)
    total_steps = config.router_warmup + config.steps

    def progress(phase: str, first: int, end: int, phase_start: int):
        """The run's steps ``first`` .. ``end - 1``, shown as steps of a phase that starts at ``phase_start``."""
        return tqdm(range(first, end), desc=phase, initial=first - phase_start, total=end - phase_start,
                    disable=first >= end or not accelerator.is_main_process)

    def next_batch():
        indices = next(order)[shard :: accelerator.num_processes]
        batch = {k: v.to(accelerator.device) for k, v in collate([train.examples[i] for i in indices],
                                                                 tokenizer.pad_token_id).items()}
        return indices, batch, torch.tensor(indices, device=accelerator.device)

    def blocks_to_probe(step: int) -> list[int]:
        weights = probe_weights(memory, price) if config.probe_selection == "uncertain" else None
        return probed_blocks(unwrapped.num_layers, config.skip_cost_blocks, config.seed, step, weights)

    def log_and_checkpoint(step: int, indices: list[int], outcome, began: float, bar) -> bool:
        """Write the step's metrics, checkpoint when due or interrupted; true when the run must stop."""
        record = {"step": step + 1, "loss": outcome.loss.item(), "lm_loss": outcome.output.loss.item(),
                  "router_loss": outcome.router_loss.item(), "skip_rate": outcome.blocks_skipped,
                  "flops_skip_share": outcome.flops_skipped, "multiplier": price.multiplier,
                  "lr": schedulers[0].get_last_lr()[0], "seconds": time.perf_counter() - began,
                  # read after the step, for the report only (this process's rows)
                  "skip_rate_by_type": skip_rate_by_type(outcome.output.keep,
                                                         [train.examples[i].step_type for i in indices])}
        if accelerator.is_main_process:
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['lm_loss']:.3f}", skip=f"{outcome.blocks_skipped:.1%}")
        done = step + 1
        if accelerator.is_main_process and (done % run.checkpoint_every == 0 or done == total_steps or interrupted):
            save_checkpoint(checkpoint, unwrapped, optimizers, schedulers, price, memory, anchor, done, config)
        if interrupted:
            logger.warning(f"interrupted at step {done}; resume with: python training/finetune.py "
                              f"--output {output} --resume")
        return interrupted

    # the routers learn alone on the frozen base
    bar = progress("router warm-up", start, config.router_warmup, 0)
    for step in bar:
        indices, batch, example_ids = next_batch()
        began = time.perf_counter()
        outcome = warmup_step(accelerator, model, batch, price, memory, anchor, optimizers[1], blocks_to_probe(step),
                              config.router_fit_steps, example_ids)
        if log_and_checkpoint(step, indices, outcome, began, bar):
            return 130

    # LoRA learns under the routers' decisions: after a warm-up the routers keep their weights, the anchor moves their
    # biases; the joint recipe trains both together
    if config.router_warmup:
        for router in unwrapped.routers:
            router.requires_grad_(False)
    bar = progress("LoRA", max(start, config.router_warmup), total_steps, config.router_warmup)
    for step in bar:
        indices, batch, example_ids = next_batch()
        began = time.perf_counter()
        if config.learns_routes and not config.router_warmup:
            outcome = joint_step(accelerator, model, batch, price, memory, optimizers[0], optimizers[1],
                                 blocks_to_probe(step), config.router_fit_steps, example_ids)
        else:
            outcome = lora_step(accelerator, model, batch, optimizers[0], anchor if config.router_warmup else None,
                                forced_skip=() if config.no_routing else None, base_kl_weight=config.base_kl_weight)
        for scheduler in schedulers:
            scheduler.step()
        if log_and_checkpoint(step, indices, outcome, began, bar):
            return 130

    # ---------------------------------------------------------------- router refit
    # the anchor undoes the shift LoRA causes in common to every step, not the rest of it: fit the routers once more
    # to the costs the warm-up measured, reading those steps through the trained LoRA
    if config.router_warmup and config.steps and config.router_refit_rounds:
        count, share = refit_routers(unwrapped, price, memory, optimizers[1], train.examples, tokenizer.pad_token_id,
                                     config.batch_size, config.router_refit_rounds, config.router_fit_steps)
        logger.info(f"routers refitted on {count} remembered steps read through the trained LoRA: "
                          f"price {price.multiplier:.3f}, {share:.1%} of their block FLOPs skipped")

    # ---------------------------------------------------------------- do-no-harm routing
    if config.learns_routes and config.familiarity_quantile:
        drawn = random.Random(config.seed).sample(range(len(train.examples)),
                                                  min(config.familiarity_steps, len(train.examples)))
        fit_familiarity(unwrapped, [train.examples[i] for i in drawn], tokenizer.pad_token_id,
                        config.familiarity_quantile, config.batch_size)
        logger.info(f"familiar regions fitted on {len(drawn)} training steps (quantile "
                          f"{config.familiarity_quantile})")
    if config.learns_routes and config.min_steps_per_role:
        counts = fit_context_roles(unwrapped, train.examples, config.min_steps_per_role)
        logger.info(f"routers decide after {unwrapped.config.routed_context_roles} (training steps by the role "
                    f"they follow: {counts}; at least {config.min_steps_per_role} of each type needed)")

    # ---------------------------------------------------------------- adapter and report
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output)
        report = routing_report(unwrapped.eval(), held_out.examples[: run.report_steps])
        write_training_report(output, report, metrics_path, config.to_dict())
        summary = {kind: {k: v for k, v in values.items() if k != "block_skip_rate"}
                   for kind, values in report["by_step_type"].items()}
        accelerator.print(json.dumps(summary, indent=2))
        logger.info(f"adapter and report written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
