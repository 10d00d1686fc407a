"""Does routing beat simply deleting blocks? Static pruning at equal compute, LoRA-healed with the same budget.

1. Measures the share of FLOPs the LayerRoute adapter skips on the held-out steps (routers deciding per step).
2. Picks k, the number of blocks whose deletion for every step skips the same share of FLOPs on those steps.
3. Trains the baseline: ``training/finetune.py --static-prune k`` deletes the k blocks of lowest block influence
   (1 - cos of block input and output on training steps) and heals with LoRA, same steps, batch and data.
4. Evaluates LayerRoute, LoRA-only (when given) and static pruning side by side with ``training/evaluate.py``:
   perplexity per step type, tool-call exact match, FLOPs per step type.

    python benchmarks/static_pruning.py --adapter runs/default --lora-only runs/lora-only --output runs/static
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layerroute import LayerRouteModel  # noqa: E402
from layerroute.evaluation import step_routes  # noqa: E402
from layerroute.flops import step_route_stats  # noqa: E402
from layerroute.loading import load_base_model  # noqa: E402
from layerroute.model import ADAPTER_CONFIG  # noqa: E402
from layerroute.steps import tokenize_step, trace_steps  # noqa: E402
from layerroute.traces import read_sources  # noqa: E402

TEST = ROOT / "training" / "data" / "corpus" / "test.jsonl.gz"


def matched_k(model: LayerRouteModel, examples, target_frac: float) -> int:
    """The number of blocks deleted for every step whose FLOP skip on ``examples`` is closest to ``target_frac``."""
    def static_frac(k: int) -> float:
        routes = [step_route_stats(list(range(k)), model.num_layers, model.shape.block, model.shape.vocab_size,
                                   len(e.context_ids), len(e.context_ids) + len(e.target_ids) - 1,
                                   len(e.target_ids), model.lora_flops_per_token) for e in examples]
        return sum(r.flops_skipped for r in routes) / sum(r.flops_total for r in routes)

    return min(range(model.num_layers), key=lambda k: abs(static_frac(k) - target_frac))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True, help="the LayerRoute adapter to match")
    parser.add_argument("--lora-only", type=Path, default=None, help="LoRA-only adapter (finetune.py --no-routing)")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "static")
    parser.add_argument("--data", nargs="+", default=[str(TEST)])
    parser.add_argument("--max-steps", type=int, default=80, help="held-out steps per type")
    parser.add_argument("--generation-steps", type=int, default=15)
    parser.add_argument("--finetune-args", default="", help="extra finetune.py arguments, quoted (e.g. '--steps 20')")
    args = parser.parse_args()

    recorded = json.loads((args.adapter / ADAPTER_CONFIG).read_text())["base_model"]["name_or_path"]
    base, tokenizer = load_base_model(recorded)
    model = LayerRouteModel.from_pretrained(args.adapter, base_model=base).eval()
    examples, per_type = [], {"tool_call": 0, "planning": 0}
    for trace in read_sources(args.data).traces:
        for step in trace_steps(trace):
            if per_type[step.step_type] < args.max_steps:
                try:
                    examples.append(tokenize_step(step, tokenizer, 768, 192))
                    per_type[step.step_type] += 1
                except ValueError:
                    continue
    routes = [step_routes(model, example) for example in examples]
    total = sum(r.flops_skipped for r in routes) / sum(r.flops_total for r in routes)
    k = matched_k(model, examples, total)
    print(f"LayerRoute skips {total:.1%} of the FLOPs of these steps; static pruning matches it with "
          f"k = {k} of {model.num_layers} blocks", flush=True)
    del model, base

    if not (args.output / ADAPTER_CONFIG).exists():
        subprocess.run([sys.executable, str(ROOT / "training" / "finetune.py"), "--static-prune", str(k),
                        "--output", str(args.output), *args.finetune_args.split()], check=True)
    evaluate = [sys.executable, str(ROOT / "training" / "evaluate.py"), "--adapter", str(args.adapter),
                "--static-pruning", str(args.output), "--data", *args.data, "--max-steps", str(args.max_steps),
                "--generation-steps", str(args.generation_steps)]
    if args.lora_only:
        evaluate += ["--lora-only", str(args.lora_only)]
    subprocess.run(evaluate, check=True)
    print((args.adapter / "evaluation.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
