"""Train LayerRoute routers + LoRA on your own agent logs.

    python training/finetune.py                                  # embedded SmolLM2-135M + embedded corpus, CPU-sized
    python training/finetune.py --data logs/*.jsonl --model Qwen/Qwen2.5-0.5B-Instruct --output runs/mine
    python training/finetune.py --preset seed                    # published setting (GPU): Qwen2.5-0.5B, 3,000 steps
    accelerate launch training/finetune.py ...                   # several GPUs / nodes (DDP)
    python training/finetune.py --output runs/x --resume         # continue an interrupted run
    python training/finetune.py --router-warmup 0                # routers and LoRA learn together (joint recipe)

Loss: next-token loss on each step's target tokens (the LM head runs only there), plus the gate regulariser: a
FLOP budget whose price is a Lagrange multiplier, and which teaches the routers from measured skip costs (see
``layerroute.training.SkipBudget``). Step types never reach the loss; they are used only for the held-out report.
The routers first learn alone for ``--router-warmup`` steps on the frozen base, then keep their weights while LoRA
trains for ``--steps`` steps, their biases re-centred on how LoRA shifts what they read
(``layerroute.training.RouterAnchor``); at the end they are fitted once more to the warm-up's measured skip costs,
read through the trained LoRA (``--router-refit-rounds``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import signal
import sys
import time
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
from layerroute.familiarity import fit_familiarity  # noqa: E402
from layerroute.model import ADAPTER_CONFIG, SKIP_COST_MEASURES  # noqa: E402
from layerroute.recipe import joint_step, lora_step, refit_routers, warmup_step  # noqa: E402
from layerroute.traces import read_sources  # noqa: E402
from layerroute.training import (  # noqa: E402
    PROBE_PRECISIONS,
    RouterAnchor,
    SkipBudget,
    batches,
    block_influence,
    build_examples,
    collate,
    fix_routes,
    probe_dtype,
    probed_blocks,
)

CORPUS = ROOT / "training" / "data" / "corpus"
PRESETS = {
    # What runs in minutes on a 2-core CPU (the default).
    "cpu": dict(model=None, router_warmup=40, steps=70, batch_size=4, lr=1e-3, router_lr=1e-2, max_length=512,
                skip_cost="kl", skip_cost_blocks=4, probe_selection="uniform"),
    # The published setting, for a GPU.
    "seed": dict(model="Qwen/Qwen2.5-0.5B-Instruct", router_warmup=300, steps=3000, batch_size=8, lr=2e-4,
                 router_lr=1e-2, max_length=1536, skip_cost="kl", skip_cost_blocks=4, probe_selection="uniform"),
}
# settings a resumed run may change: where it writes and reports, not what it trains
RESUMABLE_SETTINGS = ("output", "resume", "checkpoint_every", "report_steps", "validation_data", "on_bad_record")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--model", default=argparse.SUPPRESS, help="hub id, local dir or .gguf (default: embedded)")
    parser.add_argument("--data", nargs="+", default=None,
                        help="agent logs (JSON/JSONL, any supported format) or dataset names; default: embedded corpus")
    parser.add_argument("--validation-data", nargs="+", default=None, help="held-out logs for the final report")
    parser.add_argument("--steps", type=int, default=argparse.SUPPRESS, help="LoRA training steps")
    parser.add_argument("--batch-size", type=int, default=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, default=argparse.SUPPRESS, help="LoRA learning rate")
    parser.add_argument("--router-lr", type=float, default=argparse.SUPPRESS, help="router learning rate (AdamW)")
    parser.add_argument("--max-length", type=int, default=argparse.SUPPRESS, help="context token budget per step")
    parser.add_argument("--max-target-length", type=int, default=160)
    parser.add_argument("--target-skip-rate", type=float, default=LayerRouteConfig.target_skip_rate)
    parser.add_argument("--regularizer-weight", type=float, default=LayerRouteConfig.regularizer_weight)
    parser.add_argument("--router-pooling", choices=("mean", "last"), default=LayerRouteConfig.router_pooling)
    parser.add_argument("--router-init-bias", type=float, default=LayerRouteConfig.router_init_bias)
    parser.add_argument("--router-fit-steps", type=int, default=10,
                        help="router optimiser steps per training step on the remembered skip costs")
    parser.add_argument("--skip-cost-blocks", type=int, default=argparse.SUPPRESS,
                        help="blocks per step whose skip cost is measured to teach their routers (each costs up to "
                             "one extra forward pass without gradients)")
    parser.add_argument("--probe-selection", choices=("uniform", "uncertain"), default=argparse.SUPPRESS,
                        help="which blocks' skip costs are measured each step: drawn uniformly, or in proportion to "
                             "how split their remembered rows are between keep and skip at the current price")
    parser.add_argument("--skip-cost", choices=SKIP_COST_MEASURES, default=argparse.SUPPRESS,
                        help="what a measured skip costs a row: loss, the increase of its loss on the reference "
                             "tokens; kl, the KL divergence of its next-token distributions without the block from "
                             "with it (the expected loss increase, which tells step types apart far better)")
    parser.add_argument("--router-warmup", type=int, default=argparse.SUPPRESS, metavar="N",
                        help="first train the routers alone for N steps on the frozen base (skip costs measured, LoRA "
                             "untouched), then freeze their weights while LoRA trains for --steps steps, each router's "
                             "bias re-centred for how LoRA shifts what it reads; 0: routers and LoRA train together "
                             "(default: 40, or 300 with --preset seed)")
    parser.add_argument("--router-refit-rounds", type=int, default=30, metavar="N",
                        help="after a router warm-up and the LoRA steps, read the warm-up's remembered steps again "
                             "through the trained LoRA and fit the routers to their measured skip costs in N rounds "
                             "of --router-fit-steps passes, the price moving each round to hold the budget on those "
                             "steps; 0: keep the anchored routers")
    parser.add_argument("--familiarity-quantile", type=float, default=0.99, metavar="Q",
                        help="do-no-harm routing: once a step's features at some block lie farther from the training "
                             "steps' than all but the share 1 - Q of those steps' own, that block and every later one "
                             "run for it (layerroute.familiarity); 1 counts the farthest training step as familiar, "
                             "0 turns the check off")
    parser.add_argument("--familiarity-steps", type=int, default=200,
                        help="training steps, drawn at random, whose features define the familiar region")
    parser.add_argument("--probe-precision", choices=PROBE_PRECISIONS, default="auto",
                        help="precision of the skip-cost measurements; auto: bf16 where the hardware is faster at it, "
                             "fp32: the training forward's own precision")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "default")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-routing", action="store_true", help="LoRA-only baseline with the same budget")
    parser.add_argument("--static-prune", type=int, default=0, metavar="K",
                        help="static-pruning baseline: delete the K blocks of lowest influence (1 - cos of block "
                             "input and output on training steps) for every step, and heal with LoRA")
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--report-steps", type=int, default=120, help="held-out steps in the final routing report")
    parser.add_argument("--on-bad-record", choices=("raise", "skip"), default="raise")
    args = parser.parse_args(argv)
    if not 0.0 <= args.familiarity_quantile <= 1.0:
        parser.error(f"--familiarity-quantile must lie in [0, 1] (0: no check), got {args.familiarity_quantile}")
    if args.familiarity_steps < 2:
        parser.error(f"--familiarity-steps must be at least 2, got {args.familiarity_steps}")
    if args.no_routing or args.static_prune:
        if getattr(args, "router_warmup", 0):
            parser.error("--router-warmup trains routers; it does not combine with --no-routing or --static-prune")
        args.router_warmup = 0  # the baselines train LoRA for the same --steps, with no routers to warm up
    for key, value in PRESETS[args.preset].items():
        if not hasattr(args, key):
            setattr(args, key, value)
    return args


def save_checkpoint(directory: Path, model, optimizers, schedulers, budget, anchor, step: int, args) -> None:
    """Adapter + optimizers + schedulers + budget + anchor + step, replacing the checkpoint as a whole
    (:func:`layerroute.checkpoints.replace_directory`): killed at any point, or out of disk, the run keeps its last
    complete checkpoint."""
    state = io.BytesIO()  # serialised in memory, so that a full disk fails as an OSError of the write below
    torch.save({"optimizers": [o.state_dict() for o in optimizers], "schedulers": [s.state_dict() for s in schedulers],
                "budget": budget.state_dict(), "anchor": anchor.state_dict(), "step": step}, state)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        (staging / "training_state.pt").write_bytes(state.getvalue())
        (staging / "run.json").write_text(json.dumps(run_identity(args), indent=2))

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


def run_identity(args) -> dict:
    """Every setting of the run but :data:`RESUMABLE_SETTINGS`, as JSON values: what ``--resume`` must find unchanged."""
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in sorted(vars(args).items()) if key not in RESUMABLE_SETTINGS}


def changed_settings(recorded: dict, now: dict) -> list[str]:
    """``--flag was X, now Y`` for every setting that differs between two run identities."""
    return [f"--{key.replace('_', '-')} was {recorded.get(key, 'not recorded')!r}, now {now.get(key, 'unset')!r}"
            for key in sorted(set(recorded) | set(now)) if recorded.get(key, "not recorded") != now.get(key, "unset")]


def skip_rate_by_type(keep: torch.Tensor, step_types: list[str]) -> dict[str, float]:
    skipped = (~keep).float().mean(dim=1).tolist()
    return {kind: sum(v for v, t in zip(skipped, step_types) if t == kind) / step_types.count(kind)
            for kind in sorted(set(step_types))}


@command("finetune")
def main(argv=None) -> int:
    args = parse_args(argv)
    # after a router warm-up the routers' weights are frozen mid-run, so DDP must not wait for their gradients
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no",
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=bool(args.router_warmup))])
    torch.manual_seed(args.seed)
    output, checkpoint = args.output, args.output / "checkpoint"
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; choose a directory")
    if accelerator.is_main_process:  # a run killed while saving a checkpoint leaves it to be put back in place
        recover_directory(checkpoint)
    accelerator.wait_for_everyone()
    if (checkpoint.exists() or (output / ADAPTER_CONFIG).exists()) and not args.resume:
        raise UserError(f"{output} already holds a run; pass --resume to continue it or choose another --output")
    if args.resume:
        if not checkpoint.exists():
            raise MissingInputError(f"--resume: {checkpoint} does not exist")
        with user_input(f"--resume: {checkpoint}"):
            recorded = json.loads((checkpoint / "run.json").read_text())
        changed = changed_settings(recorded, run_identity(args))
        if changed:
            raise UserError(f"--resume: {output} holds a different run ({'; '.join(changed)}); resume it with the "
                            "settings it was started with, or choose another --output")

    # ---------------------------------------------------------------- data
    # read before the model loads, so that a wrong path or a bad record costs no model load
    sources = args.data or [str(CORPUS / "train.jsonl.gz")]
    validation_sources = args.validation_data or [str(CORPUS / "validation.jsonl.gz")]
    read, validation = (read_sources(s, on_bad_record=args.on_bad_record) for s in (sources, validation_sources))
    for logs, result in ((sources, read), (validation_sources, validation)):
        if result.skipped:
            accelerator.print(f"skipped {len(result.skipped)} unreadable records of {logs}: {result.skipped_summary()}")
        if not result.traces:
            raise UserError(f"no traces in {logs}")
    with user_input("--model"):
        base, tokenizer = load_base_model(args.model)
    with user_input("--data"):
        train = build_examples(read.traces, tokenizer, args.max_length, args.max_target_length)
    with user_input("--validation-data"):
        held_out = build_examples(validation.traces, tokenizer, args.max_length, args.max_target_length)
    accelerator.print(f"training steps by type (reporting only): {train.counts()}; dropped: {dict(train.dropped)}")

    # ---------------------------------------------------------------- model and optimiser
    if args.resume:
        model = LayerRouteModel.from_pretrained(checkpoint, base_model=base)
    else:
        config = LayerRouteConfig(target_skip_rate=args.target_skip_rate, regularizer_weight=args.regularizer_weight,
                                  router_pooling=args.router_pooling, router_init_bias=args.router_init_bias)
        model = LayerRouteModel.from_base(base, config, base_model_name_or_path=args.model)
    config = model.config
    if args.static_prune and not args.resume:
        probe = [train.examples[i] for i in next(batches(len(train.examples), 32, args.seed + 1))]
        influence = block_influence(model, probe, tokenizer.pad_token_id)
        pruned = sorted(influence.argsort()[: args.static_prune].tolist())
        fix_routes(model, pruned)
        accelerator.print(f"static pruning: blocks {pruned} deleted for every step (influence "
                          + " ".join(f"{v:.3f}" for v in influence.tolist()) + ")")
    learn_routes = not (args.no_routing or args.static_prune)
    if not learn_routes:
        for router in model.routers:
            router.requires_grad_(False)
    routers = [p for n, p in model.named_parameters() if p.requires_grad and ".router." in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and ".router." not in n]
    optimizers = [torch.optim.AdamW(lora, lr=args.lr, weight_decay=0.0)]
    if routers:
        optimizers.append(torch.optim.AdamW(routers, lr=args.router_lr, weight_decay=0.0))
    schedulers = [warmup_cosine(optimizers[0], args.steps)]
    if routers and not args.router_warmup:  # in a warm-up the routers follow the moving price at a steady rate
        schedulers.append(warmup_cosine(optimizers[1], args.steps))
    anchor = RouterAnchor(model.num_layers, model.shape.block.hidden_size)
    budget = SkipBudget(config, model.num_layers, probe_dtype=probe_dtype(args.probe_precision, accelerator.device),
                        skip_cost=args.skip_cost)
    start = 0
    if args.resume:
        state = torch.load(checkpoint / "training_state.pt", weights_only=True)
        for optimizer, saved in zip(optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        budget.load_state_dict(state["budget"])
        anchor.load_state_dict(state["anchor"])
        start = state["step"]
        accelerator.print(f"resuming {output} at step {start}")
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
    order = batches(len(train.examples), args.batch_size * accelerator.num_processes, args.seed, start, lengths)
    total_steps = args.router_warmup + args.steps

    def progress(phase: str, first: int, end: int, phase_start: int):
        """The steps ``first`` .. ``end - 1`` of the run, shown as the steps of a phase that starts at ``phase_start``."""
        return tqdm(range(first, end), desc=phase, initial=first - phase_start, total=end - phase_start,
                    disable=first >= end or not accelerator.is_main_process)

    def next_batch():
        indices = next(order)[shard :: accelerator.num_processes]
        batch = {k: v.to(accelerator.device) for k, v in collate([train.examples[i] for i in indices],
                                                                 tokenizer.pad_token_id).items()}
        return indices, batch, torch.tensor(indices, device=accelerator.device)

    def blocks_to_probe(step: int) -> list[int]:
        weights = budget.probe_weights() if args.probe_selection == "uncertain" else None
        return probed_blocks(unwrapped.num_layers, args.skip_cost_blocks, args.seed, step, weights)

    def log_and_checkpoint(step: int, indices: list[int], outcome, began: float, bar) -> bool:
        """Write the step's metrics, checkpoint when due or interrupted; true when the run must stop."""
        record = {"step": step + 1, "loss": outcome.loss.item(), "lm_loss": outcome.output.loss.item(),
                  "router_loss": outcome.router_loss.item(), "skip_rate": outcome.blocks_skipped,
                  "flops_skip_share": outcome.flops_skipped, "multiplier": budget.multiplier,
                  "lr": schedulers[0].get_last_lr()[0], "seconds": time.perf_counter() - began,
                  # read after the step, for the report only (this process's rows)
                  "skip_rate_by_type": skip_rate_by_type(outcome.output.keep,
                                                         [train.examples[i].step_type for i in indices])}
        if accelerator.is_main_process:
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['lm_loss']:.3f}", skip=f"{outcome.blocks_skipped:.1%}")
        done = step + 1
        if accelerator.is_main_process and (done % args.checkpoint_every == 0 or done == total_steps or interrupted):
            save_checkpoint(checkpoint, unwrapped, optimizers, schedulers, budget, anchor, done, args)
        if interrupted:
            accelerator.print(f"\ninterrupted at step {done}; resume with: python training/finetune.py "
                              f"--output {output} --resume")
        return interrupted

    # the routers learn alone on the frozen base
    bar = progress("router warm-up", start, args.router_warmup, 0)
    for step in bar:
        indices, batch, example_ids = next_batch()
        began = time.perf_counter()
        outcome = warmup_step(accelerator, model, batch, budget, anchor, optimizers[1], blocks_to_probe(step),
                              args.router_fit_steps, example_ids)
        if log_and_checkpoint(step, indices, outcome, began, bar):
            return 130

    # LoRA learns under the routers' decisions: after a warm-up the routers keep their weights, the anchor moves their
    # biases; the joint recipe trains both together
    if args.router_warmup:
        for router in unwrapped.routers:
            router.requires_grad_(False)
    bar = progress("LoRA", max(start, args.router_warmup), total_steps, args.router_warmup)
    for step in bar:
        indices, batch, example_ids = next_batch()
        began = time.perf_counter()
        if learn_routes and not args.router_warmup:
            outcome = joint_step(accelerator, model, batch, budget, optimizers[0], optimizers[1],
                                 blocks_to_probe(step), args.router_fit_steps, example_ids)
        else:
            outcome = lora_step(accelerator, model, batch, optimizers[0], anchor if args.router_warmup else None,
                                forced_skip=() if args.no_routing else None)
        for scheduler in schedulers:
            scheduler.step()
        if log_and_checkpoint(step, indices, outcome, began, bar):
            return 130

    # ---------------------------------------------------------------- router refit
    # the anchor undoes the shift LoRA causes in common to every step, not the rest of it: fit the routers once more
    # to the costs the warm-up measured, reading those steps through the trained LoRA
    if args.router_warmup and args.steps and args.router_refit_rounds:
        count, share = refit_routers(unwrapped, budget, optimizers[1], train.examples, tokenizer.pad_token_id,
                                     args.batch_size, args.router_refit_rounds, args.router_fit_steps)
        accelerator.print(f"routers refitted on {count} remembered steps read through the trained LoRA: "
                          f"price {budget.multiplier:.3f}, {share:.1%} of their block FLOPs skipped")

    # ---------------------------------------------------------------- do-no-harm routing
    if not (args.no_routing or args.static_prune) and args.familiarity_quantile:
        drawn = random.Random(args.seed).sample(range(len(train.examples)),
                                                min(args.familiarity_steps, len(train.examples)))
        fit_familiarity(unwrapped, [train.examples[i] for i in drawn], tokenizer.pad_token_id,
                        args.familiarity_quantile, args.batch_size)
        accelerator.print(f"familiar regions fitted on {len(drawn)} training steps (quantile "
                          f"{args.familiarity_quantile})")

    # ---------------------------------------------------------------- adapter and report
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output)
        report = routing_report(unwrapped.eval(), held_out.examples[: args.report_steps])
        write_training_report(output, report, metrics_path, run_identity(args))
        summary = {kind: {k: v for k, v in values.items() if k != "block_skip_rate"}
                   for kind, values in report["by_step_type"].items()}
        accelerator.print(json.dumps(summary, indent=2))
        accelerator.print(f"adapter and report written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
