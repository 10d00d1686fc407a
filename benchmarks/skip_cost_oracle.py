"""Which skip cost tells tool calls from planning steps? The KL divergence against the reference tokens' loss.

Measures, for sampled training steps and every block, what skipping that block alone costs each step, both ways
``layerroute.skip_costs.skip_costs`` can (``--skip-cost kl`` and ``loss`` in ``training/finetune.py``), with every
other block running. Then takes the decisions a perfect router would take from each measurement at a FLOP budget, as the
training budget prices them: skip a block for a step where its cost per token of the step is below a price, the
price set so that the skipped blocks hold the budget's share of the steps' block FLOPs. Step types are used only to
report the decisions.

    python benchmarks/skip_cost_oracle.py                       # frozen embedded model, 32 steps: 25 min here
    python benchmarks/skip_cost_oracle.py --adapter runs/default    # the same, with a trained adapter's LoRA
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layerroute import LayerRouteModel, load_base_model  # noqa: E402
from layerroute.skip_costs import SKIP_COST_MEASURES, recording_probes, skip_costs  # noqa: E402
from layerroute.traces import read_sources  # noqa: E402
from layerroute.training import build_examples, collate  # noqa: E402

TRAIN = ROOT / "training" / "data" / "corpus" / "train.jsonl.gz"


def oracle_skips(costs: torch.Tensor, tokens: torch.Tensor, budget: float) -> torch.Tensor:
    """Skip decisions ``(steps, num_layers)`` holding ``budget`` of the token-weighted block FLOPs: the cheapest
    skips per token, until the budget is spent.

    Args: ``costs`` ``(steps, num_layers)`` cost of skipping each block alone; ``tokens`` ``(steps,)`` tokens per step.
    """
    per_token = costs / tokens[:, None]
    order = per_token.flatten().argsort()
    weights = tokens[:, None].expand_as(costs).flatten()[order]
    within = torch.cumsum(weights, 0) <= budget * tokens.sum() * costs.shape[1]
    skips = torch.zeros(costs.numel(), dtype=torch.bool)
    skips[order[within]] = True
    return skips.view_as(costs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, default=None, help="adapter whose LoRA to measure (default: none)")
    parser.add_argument("--data", nargs="+", default=[str(TRAIN)])
    parser.add_argument("--steps", type=int, default=32, help="sampled steps")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.08, 0.10, 0.12])
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base, tokenizer = load_base_model(None)
    model = (LayerRouteModel.from_pretrained(args.adapter, base_model=base) if args.adapter
             else LayerRouteModel.from_base(base)).eval()
    examples = build_examples(read_sources(args.data).traces, tokenizer, args.max_length, 160).examples
    sample = random.Random(args.seed).sample(examples, min(args.steps, len(examples)))
    sample.sort(key=lambda e: len(e.context_ids) + len(e.target_ids))  # batches of similar length pad little

    costs = {measure: [] for measure in SKIP_COST_MEASURES}
    blocks = list(range(model.num_layers))
    for start in tqdm(range(0, len(sample), 4), desc="measuring"):
        batch = collate(sample[start : start + 4], tokenizer.pad_token_id)
        with torch.no_grad(), recording_probes(model) as probes:
            out = model(**batch, forced_skip=())
        for measure in SKIP_COST_MEASURES:
            costs[measure].append(skip_costs(model, batch["input_ids"], batch["attention_mask"], batch["labels"], out,
                                             probes, blocks, measure=measure))
    tokens = torch.tensor([float(len(e.context_ids) + len(e.target_ids)) for e in sample])
    tool = torch.tensor([e.step_type == "tool_call" for e in sample])
    print(f"{len(sample)} steps ({int(tool.sum())} tool calls, {int((~tool).sum())} planning), "
          f"{model.num_layers} blocks, {'adapter ' + str(args.adapter) if args.adapter else 'frozen base'}\n")
    print("| skip cost | FLOP budget | blocks skipped: tool calls | planning | differential (points) |")
    print("|---|---|---|---|---|")
    per_block = {}
    for measure in SKIP_COST_MEASURES:
        measured = torch.cat(costs[measure])
        for budget in args.budgets:
            skips = oracle_skips(measured, tokens, budget)
            tool_frac, planning_frac = skips[tool].float().mean().item(), skips[~tool].float().mean().item()
            print(f"| {measure} | {budget:.0%} | {tool_frac:.1%} | {planning_frac:.1%} | "
                  f"{100 * (tool_frac - planning_frac):.1f} |")
        per_block[measure] = skips
    print(f"\nPer block at a {args.budgets[-1]:.0%} budget, share of steps skipping it (tool calls / planning):")
    for measure, skips in per_block.items():
        tool_rates, planning_rates = skips[tool].float().mean(0).tolist(), skips[~tool].float().mean(0).tolist()
        print(f"  {measure:4s} " + " ".join(f"{t:.0%}/{p:.0%}" for t, p in zip(tool_rates, planning_rates)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
