"""What does routing cost in training? LayerRoute against plain peft LoRA, same model, data and batch.

Times one step of each trainer, interleaved in one process over the same batches (median of --repeats). The
LayerRoute trainers run the recipe's own step functions (``layerroute.recipe``):

- plain LoRA: a peft LoRA model (rank 8 on q/k/v/o) with the usual HF loss (labels on the target tokens);
- LayerRoute, gates only: ``lora_step`` with routers that learn through the straight-through gates, no skip-cost
  probes (what routing itself costs);
- LayerRoute, joint step: ``joint_step``, the joint recipe (``training/finetune.py --router-warmup 0``): gates,
  --skip-cost-blocks probes measured as the loss increase, router fitting;
- LayerRoute, warm-up step: ``warmup_step``, the default recipe's first phase: a forward without gradients on the
  frozen base, --warmup-skip-cost-blocks probes measured as KL, router fitting, the anchor's reference;
- LayerRoute, LoRA under frozen routers: ``lora_step`` with an anchor, the default recipe's second phase, with the
  routers of --adapter (default: the shipped adapter), so blocks are skipped for real as a trained router skips
  them.

Peak memory is measured apart, each trainer alone in a fresh process (peak resident set size), since a process's
peak cannot be split between trainers that share it. Target: LayerRoute at most 10% slower than plain LoRA.

    python benchmarks/train_cost.py              # embedded SmolLM2-135M, embedded corpus, batch 4, CPU
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layerroute import LayerRouteConfig, LayerRouteModel, load_base_model  # noqa: E402
from layerroute.loading import default_adapter_dir  # noqa: E402
from layerroute.recipe import TrainingConfig, joint_step, lora_step, warmup_step  # noqa: E402
from layerroute.traces import read_traces  # noqa: E402
from layerroute.training import (  # noqa: E402
    PROBE_PRECISIONS,
    Price,
    RouterAnchor,
    SkipCostMemory,
    build_examples,
    collate,
    probe_dtype,
    probed_blocks,
)

RECIPE = TrainingConfig()  # finetune.py's default (cpu preset) settings
TRAINERS = ("plain LoRA", "LayerRoute, gates only", "LayerRoute, joint step", "LayerRoute, warm-up step",
            "LayerRoute, LoRA under frozen routers")


def make_trainers(base, args, reference_batch: dict, names=TRAINERS) -> dict:
    """name -> function(batch, step) running one training step, for the trainers in ``names``."""
    config = LayerRouteConfig()
    accelerator = Accelerator(cpu=True)
    makers = {
        "plain LoRA": lambda: plain_lora_step(base, config),
        "LayerRoute, gates only": lambda: gates_only_step(base, config, accelerator),
        "LayerRoute, joint step": lambda: joint_recipe_step(base, config, args, accelerator),
        "LayerRoute, warm-up step": lambda: warmup_recipe_step(base, config, args, accelerator),
        "LayerRoute, LoRA under frozen routers": lambda: frozen_routers_step(base, args.adapter, reference_batch,
                                                                             accelerator),
    }
    return {name: makers[name]() for name in names}


def plain_lora_step(base, config):
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                                           target_modules=config.lora_target_modules)).train()
    plain_optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-4)

    def plain_step(batch, step):
        out = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad()

    return plain_step


def gates_only_step(base, config, accelerator):
    """LoRA steps with routers that learn through the straight-through gates: what routing itself costs."""
    model = LayerRouteModel.from_base(copy.deepcopy(base), config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch, index):
        lora_step(accelerator, model, batch, optimizer)

    return step


def joint_recipe_step(base, config, args, accelerator):
    model = LayerRouteModel.from_base(copy.deepcopy(base), config).train()
    price, memory = Price(RECIPE.target_skip_rate, RECIPE.multiplier_step_size), SkipCostMemory(
        model.num_layers, "loss", args.probe_dtype)
    price.multiplier = 1.0
    lora = [p for n, p in model.named_parameters() if p.requires_grad and ".router." not in n]
    routers = [p for n, p in model.named_parameters() if ".router." in n]
    lora_optimizer, router_optimizer = torch.optim.AdamW(lora, lr=1e-4), torch.optim.AdamW(routers, lr=1e-2)

    def step(batch, index):
        joint_step(accelerator, model, batch, price, memory, lora_optimizer, router_optimizer,
                   probed_blocks(model.num_layers, args.skip_cost_blocks, 0, index), args.router_fit_steps)

    return step


def warmup_recipe_step(base, config, args, accelerator):
    model = LayerRouteModel.from_base(copy.deepcopy(base), config).train()
    price, memory = Price(RECIPE.target_skip_rate, RECIPE.multiplier_step_size), SkipCostMemory(
        model.num_layers, RECIPE.skip_cost, args.probe_dtype)
    price.multiplier = 1.0
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if ".router." in n], lr=1e-2)
    anchor = RouterAnchor(model.num_layers, model.shape.block.hidden_size)

    def step(batch, index):
        warmup_step(accelerator, model, batch, price, memory, anchor, optimizer,
                    probed_blocks(model.num_layers, args.warmup_skip_cost_blocks, 0, index), args.router_fit_steps)

    return step


def frozen_routers_step(base, adapter, reference_batch: dict, accelerator):
    model = LayerRouteModel.from_pretrained(adapter, base_model=copy.deepcopy(base)).train()
    for router in model.routers:
        router.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    anchor = RouterAnchor(model.num_layers, model.shape.block.hidden_size)
    with torch.no_grad():
        anchor.observe(model(**reference_batch, record_router_features=True).router_features)

    def step(batch, index):
        step.flops_skipped.append(lora_step(accelerator, model, batch, optimizer, anchor).flops_skipped)

    step.flops_skipped = []
    return step


def load_batches(tokenizer, args) -> list[dict]:
    traces = read_traces(ROOT / "training" / "data" / "corpus" / "validation.jsonl.gz").traces
    examples = build_examples(traces, tokenizer, args.max_length, RECIPE.max_target_length).examples
    return [collate(examples[i : i + args.batch_size], tokenizer.pad_token_id)
            for i in range(0, args.batch_size * (args.repeats + 1), args.batch_size)]


def peak_rss_gib() -> float:
    """This process's peak resident set size. Linux's VmHWM belongs to the process image, so a spawned child does
    not inherit its parent's peak (``ru_maxrss`` survives fork and exec on Linux and would)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_memory(name: str, args, queue) -> None:
    """Child process: one trainer alone, its peak RSS in GiB put on ``queue``."""
    torch.manual_seed(0)
    base, tokenizer = load_base_model(args.model)
    batches = load_batches(tokenizer, args)
    step = make_trainers(base, args, batches[0], names=(name,))[name]
    for index, batch in enumerate(batches[:3]):
        step(batch, index)
    queue.put((name, peak_rss_gib()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch-size", type=int, default=RECIPE.batch_size)
    parser.add_argument("--max-length", type=int, default=RECIPE.max_length)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--skip-cost-blocks", type=int, default=2, help="probes per joint step")
    parser.add_argument("--warmup-skip-cost-blocks", type=int, default=RECIPE.skip_cost_blocks,
                        help="probes per warm-up step")
    parser.add_argument("--adapter", default=str(default_adapter_dir()),
                        help="whose routers the frozen-router step uses (an adapter for --model)")
    parser.add_argument("--router-fit-steps", type=int, default=RECIPE.router_fit_steps)
    parser.add_argument("--probe-precision", choices=PROBE_PRECISIONS, default=RECIPE.probe_precision,
                        help="as in training/finetune.py")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-trainer peak-memory processes")
    args = parser.parse_args()
    args.probe_dtype = probe_dtype(args.probe_precision, torch.device("cpu"))

    torch.manual_seed(0)
    base, tokenizer = load_base_model(args.model)
    batches = load_batches(tokenizer, args)
    trainers = make_trainers(base, args, batches[0])
    for step in trainers.values():
        step(batches[0], 0)  # warm-up
    times = {name: [] for name in trainers}
    for index, batch in enumerate(batches[1:], start=1):
        for name, step in trainers.items():
            began = time.perf_counter()
            step(batch, index)
            times[name].append(time.perf_counter() - began)

    memory = {}
    if not args.no_memory:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        for name in TRAINERS:
            child = context.Process(target=peak_memory, args=(name, args, queue))
            child.start()
            child.join()
            found, gib = queue.get()
            memory[found] = gib

    tokens = statistics.median(int(b["attention_mask"].sum()) for b in batches[1:])
    print(f"model={args.model or 'embedded:SmolLM2-135M-Instruct'} batch={args.batch_size} "
          f"max_length={args.max_length} repeats={args.repeats} threads={torch.get_num_threads()} "
          f"skip_cost_blocks={args.skip_cost_blocks}/{args.warmup_skip_cost_blocks} (joint/warm-up) "
          f"probe_dtype={args.probe_dtype} median tokens/batch={tokens}")
    print("\n| trainer | median s/step | tokens/s | vs plain LoRA | peak RSS alone |\n|---|---|---|---|---|")
    reference = statistics.median(times["plain LoRA"])
    for name in TRAINERS:
        median = statistics.median(times[name])
        peak = f"{memory[name]:.2f} GiB" if name in memory else "-"
        print(f"| {name} | {median:.2f} | {tokens / median:.0f} | {median / reference - 1:+.1%} | {peak} |")
    frozen = trainers["LayerRoute, LoRA under frozen routers"].flops_skipped
    print("\n(plain LoRA computes logits on every position, as HF's loss does; LayerRoute only where the loss needs "
          f"them. The frozen routers skipped {statistics.mean(frozen):.1%} of these batches' block FLOPs.)")


if __name__ == "__main__":
    main()
