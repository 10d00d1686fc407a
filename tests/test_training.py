"""The training loop on a tiny model: the loss falls, routers learn through the estimator, step types never reach
the loss, an interrupted run resumes to the same result, and two CPU processes train under accelerate."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_qwen2
from safetensors.torch import load_file

from layerroute import LayerRouteConfig, LayerRouteModel
from layerroute.recipe import (
    TrainingConfig,
    divergence_from_base,
    joint_step,
    lora_step,
    refit_routers,
    warmup_step,
)
from layerroute.skip_costs import recording_probes, skip_costs
from layerroute.steps import TokenizedStep
from layerroute.training import (
    Price,
    RouterAnchor,
    SkipCostMemory,
    batches,
    collate,
    fix_routes,
    probe_dtype,
    probe_weights,
    probed_blocks,
    read_router_features,
    refit_routers_holding_the_budget,
    router_loss,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
FAULTS = Path(__file__).parent / "finetune_faults.py"
DATA = [str(FIXTURES / name) for name in ("openai.jsonl", "glaive.jsonl", "gsm8k.jsonl", "hermes.json")]


def examples(seed: int = 0, count: int = 8) -> list[TokenizedStep]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for index in range(count):
        context = torch.randint(2, 128, (int(torch.randint(5, 12, (1,), generator=generator)),), generator=generator)
        target = [10 + index % 2, 11, 12, 13]  # learnable: a fixed answer per parity
        out.append(TokenizedStep(context.tolist(), target, ("tool_call", "planning")[index % 2], f"t{index}"))
    return out


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator()


def train_steps(accelerator, model: LayerRouteModel, data: list[TokenizedStep], steps: int) -> list[float]:
    """Steps of the joint recipe (``layerroute.recipe.joint_step``, as ``finetune.py --router-warmup 0`` takes them);
    returns the task loss of every step."""
    lora = [p for n, p in model.named_parameters() if p.requires_grad and ".router." not in n]
    routers = [p for n, p in model.named_parameters() if p.requires_grad and ".router." in n]
    lora_optimizer, router_optimizer = torch.optim.AdamW(lora, lr=1e-2), torch.optim.AdamW(routers, lr=1e-2)
    price, memory = Price(0.1, 1.0), SkipCostMemory(model.num_layers, "loss")
    losses = []
    order = batches(len(data), 4, seed=0)
    for step in range(steps):
        batch = collate([data[i] for i in next(order)], pad_token_id=0)
        outcome = joint_step(accelerator, model, batch, price, memory, lora_optimizer, router_optimizer,
                             probed_blocks(model.num_layers, 2, seed=0, step=step), fit_steps=1)
        losses.append(outcome.output.loss.item())
    return losses


def test_tiny_model_loss_falls(accelerator):
    torch.manual_seed(0)
    # A wider initialisation than the default 0.02 lets the tiny model's LM head express confident predictions.
    model = LayerRouteModel.from_base(tiny_qwen2(initializer_range=0.3)).train()
    losses = train_steps(accelerator, model, examples(), 30)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_routers_receive_gradients_through_the_estimator(accelerator):
    model = LayerRouteModel.from_base(tiny_qwen2(), LayerRouteConfig(router_pooling="last")).train()
    lora = [p for n, p in model.named_parameters() if p.requires_grad and ".router." not in n]
    batch = collate(examples()[:4], pad_token_id=0)
    lora_step(accelerator, model, batch, torch.optim.AdamW(lora))  # the task loss alone, through the hard gates
    assert all(router.proj.weight.grad is not None and router.proj.weight.grad.abs().sum() > 0
               for router in model.routers)


def test_the_pull_toward_the_base_is_zero_at_the_base_and_holds_lora_closer_to_it(accelerator):
    batch = collate(examples()[:4], pad_token_id=0)

    def divergence(model: LayerRouteModel) -> float:
        with torch.no_grad():
            return divergence_from_base(model, batch, model(**batch).target_logits).item()

    divergences = {}
    for weight in (0.0, 10.0):
        torch.manual_seed(0)
        model = LayerRouteModel.from_base(tiny_qwen2(initializer_range=0.3)).train()
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        optimizer = torch.optim.AdamW(lora, lr=3e-2)
        first = lora_step(accelerator, model, batch, optimizer, base_kl_weight=weight)
        # fresh LoRA (B = 0) and routers that keep every block: the adapter is the base, so nothing pulls
        assert first.loss.item() == pytest.approx(first.output.loss.item(), abs=1e-6)
        for _ in range(20):
            last = lora_step(accelerator, model, batch, optimizer, base_kl_weight=weight)
        if weight:
            assert last.loss.item() > last.output.loss.item()
        divergences[weight] = divergence(model)
    assert 0.0 < divergences[10.0] < 0.5 * divergences[0.0]


def probed_forward(model: LayerRouteModel, batch: dict, **kwargs):
    """A training forward of ``batch`` and the probes it recorded."""
    with recording_probes(model) as probes:
        out = model(**batch, record_router_features=True, **kwargs)
    return out, probes


def test_warmup_steps_fit_the_routers_alone_and_the_refit_rereads_what_they_remembered(accelerator):
    model = LayerRouteModel.from_base(tiny_qwen2(), LayerRouteConfig(router_init_bias=0.0)).train()
    data = examples(count=8)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    routers = [p for n, p in model.named_parameters() if ".router." in n]
    routers_before = [p.detach().clone() for p in routers]
    router_optimizer = torch.optim.AdamW(routers, lr=1e-2)
    price, memory = Price(0.5, 1.0), SkipCostMemory(model.num_layers, "loss")
    anchor = RouterAnchor(model.num_layers, model.shape.block.hidden_size)
    order = batches(len(data), 4, seed=0)
    for step in range(3):
        rows = next(order)
        batch = collate([data[i] for i in rows], pad_token_id=0)
        outcome = warmup_step(accelerator, model, batch, price, memory, anchor, router_optimizer,
                              probed_blocks(model.num_layers, 2, seed=0, step=step), fit_steps=2,
                              example_ids=torch.tensor(rows))
        assert outcome.loss.grad_fn is None  # measured, not trained through
    assert all(torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_" in n)
    assert any(not torch.equal(before, after) for before, after in zip(routers_before, routers, strict=True))
    assert anchor.reference_rows == 12 and price.multiplier != 0.0

    remembered = memory.remembered_examples()
    assert 0 < len(remembered) <= len(data)
    count, share = refit_routers(model, price, memory, router_optimizer, data, pad_token_id=0, batch_size=4,
                                 rounds=2, fit_steps=2)
    assert count == len(remembered) and 0.0 <= share <= 1.0
    assert not any(p.requires_grad for p in routers)  # frozen again for the LoRA phase


def test_kl_skip_costs_equal_rerunning_the_batch_with_the_block_removed():
    torch.manual_seed(0)
    model = LayerRouteModel.from_base(tiny_qwen2(initializer_range=0.3)).train()
    batch = collate(examples(count=3), pad_token_id=0)
    predicting = batch["labels"][:, 1:] != -100

    def target_log_probs(skip):
        logits = model(batch["input_ids"], batch["attention_mask"], forced_skip=skip).logits.detach()
        return [torch.log_softmax(logits[row, :-1][predicting[row]], dim=-1) for row in range(3)]

    def row_kl(with_block, without_block):  # summed over the row's target positions
        p, q = target_log_probs(with_block), target_log_probs(without_block)
        return torch.stack([(a.exp() * (a - b)).sum() for a, b in zip(p, q)])

    out, probes = probed_forward(model, batch, forced_skip={1})  # block 1 off for every row
    costs = skip_costs(model, batch["input_ids"], batch["attention_mask"], batch["labels"], out, probes, [0, 1, 3],
                       measure="kl")
    expected = torch.stack([row_kl({1}, {0, 1}), row_kl((), {1}), row_kl({1}, {1, 3})], dim=1)
    torch.testing.assert_close(costs, expected, atol=1e-5, rtol=1e-4)
    assert costs.min() > 0  # a real divergence for every row and block, not a no-op


def test_loss_skip_costs_equal_the_loss_increase_of_rerunning_without_the_block():
    torch.manual_seed(0)
    model = LayerRouteModel.from_base(tiny_qwen2(initializer_range=0.3)).train()
    batch = collate(examples(count=3), pad_token_id=0)

    def row_loss(skip):
        return model(**batch, forced_skip=skip).token_nll.sum(dim=1).detach()

    out, probes = probed_forward(model, batch, forced_skip={1})
    costs = skip_costs(model, batch["input_ids"], batch["attention_mask"], batch["labels"], out, probes, [0, 1, 3],
                       measure="loss")
    expected = torch.stack([row_loss({0, 1}) - row_loss({1}), row_loss({1}) - row_loss(()),
                            row_loss({1, 3}) - row_loss({1})], dim=1)
    torch.testing.assert_close(costs, expected, atol=1e-5, rtol=1e-4)
    assert costs.abs().min() > 0
    with pytest.raises(ValueError, match="one of"):
        skip_costs(model, batch["input_ids"], batch["attention_mask"], batch["labels"], out, probes, [0], measure="nll")


def test_router_targets_keep_what_costs_more_than_its_compute():
    price = Price(0.1, 1.0)
    price.multiplier = 8.0
    loss_increase = torch.tensor([0.01, 0.6, 0.01, 0.6])
    price_weight = torch.tensor([0.0625, 0.0625, 0.1875, 0.1875])  # 100 and 300 tokens of a 400-token batch, 4 blocks
    # price: 0.5 for the short row, 1.5 for the long one
    margins = price.keep_margins(loss_increase, price_weight)
    torch.testing.assert_close(margins, torch.tensor([-0.49, 0.1, -1.49, -0.9]))
    price.multiplier = -1.0  # over budget: keeping everything is rewarded
    assert (price.keep_margins(loss_increase, price_weight) > 0).all()


def test_router_fit_weighs_rows_by_what_a_wrong_decision_costs():
    """Four near-ties say skip, one row that skipping ruins says keep: a fit that counts rows equally skips, the
    margin-weighted fit keeps."""
    model = LayerRouteModel.from_base(tiny_qwen2())
    price, memory = Price(0.1, 1.0), SkipCostMemory(model.num_layers, "loss")
    price.multiplier = 1.0
    hidden = model.routers[0].proj.in_features
    memory.blocks[0] = {"features": torch.zeros(5, hidden), "price_weight": torch.full((5,), 0.1),
                        "loss_increase": torch.tensor([0.099, 0.099, 0.099, 0.099, 0.6])}
    router = model.routers[0].proj
    with torch.no_grad():
        router.bias.zero_()
    optimizer = torch.optim.SGD(router.parameters(), lr=1.0)
    for _ in range(200):
        router_loss(model, memory, price).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert router.bias.item() > 0  # keep: the one costly row outweighs four near-free ones


def test_routers_learn_from_remembered_skip_costs():
    torch.manual_seed(0)
    model = LayerRouteModel.from_base(tiny_qwen2(initializer_range=0.3)).train()
    price, memory = Price(0.1, 1.0), SkipCostMemory(model.num_layers, "loss", size=6)
    batch = collate(examples(count=4), pad_token_id=0)
    memory.measure(model, batch, *probed_forward(model, batch), [1, 3])
    assert [m is not None for m in memory.blocks] == [False, True, False, True]
    assert memory.blocks[1]["features"].shape == (4, 64)
    router_loss(model, memory, price).backward()
    assert model.routers[1].proj.weight.grad.abs().sum() > 0 and model.routers[0].proj.weight.grad is None
    for _ in range(2):
        memory.measure(model, batch, *probed_forward(model, batch), [1])
    assert memory.blocks[1]["features"].shape == (6, 64)  # the newest rows only


def test_refit_reads_remembered_steps_through_the_current_lora_and_holds_the_budget_on_them():
    torch.manual_seed(0)
    model = LayerRouteModel.from_base(tiny_qwen2(initializer_range=0.3)).train()
    data = examples(count=8)
    price, memory = Price(0.1, 1.0), SkipCostMemory(model.num_layers, "loss")
    for step, rows in enumerate(([5, 2, 7, 0], [2, 6, 1, 3])):
        batch = collate([data[i] for i in rows], pad_token_id=0)
        memory.measure(model, batch, *probed_forward(model, batch), [step, 2], example_ids=torch.tensor(rows))
    remembered = memory.remembered_examples()
    assert remembered == [0, 1, 2, 3, 5, 6, 7]
    with torch.no_grad():  # LoRA moves what the routers read
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    features = read_router_features(model, [data[i] for i in remembered], pad_token_id=0)
    assert features.shape == (7, model.num_layers, 64)
    memory.reread(remembered, features)
    rows_of_block_2 = [remembered.index(i) for i in (5, 2, 7, 0, 2, 6, 1, 3)]  # block 2 was measured at both steps
    torch.testing.assert_close(memory.blocks[2]["features"], features[rows_of_block_2, 2])
    with torch.no_grad():  # the same features as a forward over the whole step (targets included) reads
        batch = collate([data[i] for i in remembered], pad_token_id=0)
        torch.testing.assert_close(model.eval()(**batch, record_router_features=True).router_features, features)

    tokens = torch.tensor([len(data[i].context_ids) + len(data[i].target_ids) for i in remembered])
    optimizer = torch.optim.AdamW([p for r in model.routers for p in r.parameters()], lr=1e-1)
    share = refit_routers_holding_the_budget(model, memory, price, optimizer, features, tokens, rounds=60, steps=5)
    assert price.multiplier != 0.0  # the price moved with the gap
    assert abs(share - price.target) < 0.1


def test_rows_measured_without_example_ids_cannot_be_reread():
    model = LayerRouteModel.from_base(tiny_qwen2()).train()
    memory = SkipCostMemory(model.num_layers, "loss")
    batch = collate(examples(count=2), pad_token_id=0)
    memory.measure(model, batch, *probed_forward(model, batch), [0])
    with pytest.raises(ValueError, match="example_ids"):
        memory.remembered_examples()


def test_bf16_probes_measure_what_fp32_probes_measure():
    torch.manual_seed(0)
    model = LayerRouteModel.from_base(tiny_qwen2(initializer_range=0.3)).train()
    batch = collate(examples(count=4), pad_token_id=0)
    out, probes = probed_forward(model, batch)
    measured = {}
    for dtype in (None, torch.bfloat16):
        memory = SkipCostMemory(model.num_layers, "loss", probe_dtype=dtype)
        memory.measure(model, batch, out, probes, [0, 2])
        measured[dtype] = torch.stack([memory.blocks[b]["loss_increase"] for b in (0, 2)])
    reference = measured[None]
    assert reference.abs().mean() > 0.05  # the blocks matter, so agreement is not 0 == 0
    assert not torch.equal(measured[torch.bfloat16], reference)  # measured in bf16 indeed
    assert torch.allclose(measured[torch.bfloat16], reference, atol=0.05 * float(reference.abs().max()))
    assert probe_dtype("fp32", torch.device("cpu")) is None and probe_dtype("bf16", model.device) is torch.bfloat16
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        probe_dtype("fp16", model.device)


def test_step_types_never_reach_the_loss(accelerator):
    data = examples()
    relabelled = [TokenizedStep(e.context_ids, e.target_ids, "planning", e.trace_id) for e in data]
    first, second = collate(data, 0), collate(relabelled, 0)
    assert set(first) == {"input_ids", "attention_mask", "context_mask", "labels"}
    assert all(torch.equal(first[k], second[k]) for k in first)
    losses = []
    for batch_data in (data, relabelled):
        torch.manual_seed(0)
        model = LayerRouteModel.from_base(tiny_qwen2()).train()
        losses.append(train_steps(accelerator, model, batch_data, 3))
    assert losses[0] == losses[1]


def test_anchor_cancels_a_shift_common_to_every_step():
    model = LayerRouteModel.from_base(tiny_qwen2())
    for router in model.routers:
        torch.nn.init.normal_(router.proj.weight)
    hidden = model.shape.block.hidden_size
    features = torch.randn(16, model.num_layers, hidden)
    shift = torch.randn(model.num_layers, hidden)

    def logits(rows):
        with torch.no_grad():
            return torch.stack([r(rows[:, i]) for i, r in enumerate(model.routers)], dim=1)

    before = logits(features)
    anchor = RouterAnchor(model.num_layers, hidden, decay=0.0)
    anchor.observe(features)
    anchor.follow(model, features + shift)  # LoRA moved every step's features alike
    torch.testing.assert_close(logits(features + shift), before, atol=1e-4, rtol=0)
    restored = RouterAnchor(model.num_layers, hidden, decay=0.0)
    restored.load_state_dict(anchor.state_dict())
    restored.follow(model, features)
    torch.testing.assert_close(logits(features), before, atol=1e-4, rtol=0)


def test_probes_are_recorded_only_inside_recording_probes():
    torch.manual_seed(0)
    model = LayerRouteModel.from_base(tiny_qwen2(initializer_range=0.3)).train()
    batch = collate(examples(count=4), pad_token_id=0)
    probed, probes = probed_forward(model, batch)
    width = batch["input_ids"].shape[1]
    assert sorted(probes.block_inputs) == list(range(model.num_layers))
    assert probes.block_inputs[0].shape == (4, width, model.shape.block.hidden_size)
    assert not probes.block_inputs[0].requires_grad
    recorded = probes.block_inputs[0]
    plain = model(**batch, record_router_features=True)
    assert probes.block_inputs[0] is recorded  # outside the block nothing is recorded
    torch.testing.assert_close(plain.router_features, probed.router_features, atol=0, rtol=0)
    assert plain.router_features.shape == (4, model.num_layers, model.shape.block.hidden_size)
    assert model(**batch).router_features is None


def test_collate_masks_context_and_target():
    batch = collate([TokenizedStep([5, 6, 7], [8, 9], "tool_call", "a"), TokenizedStep([5], [8], "planning", "b")], 0)
    assert batch["context_mask"].tolist() == [[True, True, True, False, False], [True, False, False, False, False]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_price_tracks_the_gap_both_ways():
    price = Price(target_skip_rate=0.2, multiplier_step_size=10.0)
    price.update(0.0)
    assert price.multiplier == pytest.approx(2.0)
    price.update(0.5)
    assert price.multiplier == pytest.approx(-1.0)  # over budget: keeping blocks is rewarded


def test_uncertain_probe_selection_measures_blocks_whose_rows_split_most_often():
    price, memory = Price(0.1, 1.0), SkipCostMemory(3, "kl")
    price.multiplier = 1.0
    price_weight = torch.full((20,), 0.1)  # price 0.1 per row
    memory.blocks[0] = {"features": torch.zeros(20, 4), "price_weight": price_weight,
                        "loss_increase": torch.full((20,), 5.0)}  # never worth skipping
    memory.blocks[1] = {"features": torch.zeros(20, 4), "price_weight": price_weight,
                        "loss_increase": torch.tensor([0.01, 5.0] * 10)}  # half the rows worth skipping
    weights = probe_weights(memory, price)
    assert weights[1] > 4 * weights[0]
    assert weights[2] == weights.max()  # never measured
    draws = [probed_blocks(3, 1, seed=0, step=step, weights=weights)[0] for step in range(600)]
    assert draws.count(1) > 3 * draws.count(0)
    assert probed_blocks(3, 2, seed=5, step=9, weights=weights) == probed_blocks(3, 2, seed=5, step=9, weights=weights)
    price.multiplier = 100.0  # now every row of block 0 is worth skipping: nothing left to learn there either
    assert probe_weights(memory, price)[0] == pytest.approx(weights[0])


def test_batches_resume_mid_epoch():
    full = [b for _, b in zip(range(7), batches(10, 3, seed=4))]
    resumed = [b for _, b in zip(range(4), batches(10, 3, seed=4, start_step=3))]
    assert full[3:] == resumed


def test_length_grouped_batches_pad_less_and_still_cover_the_epoch():
    lengths = [random.Random(i).randint(10, 500) for i in range(64)]

    def padding(order):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in order)

    grouped = [b for _, b in zip(range(16), batches(64, 4, seed=1, lengths=lengths))]
    plain = [b for _, b in zip(range(16), batches(64, 4, seed=1))]
    assert sorted(i for b in grouped for i in b) == list(range(64))
    assert padding(grouped) < 0.5 * padding(plain)
    resumed = [b for _, b in zip(range(6), batches(64, 4, seed=1, start_step=10, lengths=lengths))]
    assert resumed == grouped[10:]


def run_finetune(args: list[str], script: Path = ROOT / "training" / "finetune.py") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600)


def common_args(model_dir: str, output: Path, steps: int) -> list[str]:
    return ["--model", model_dir, "--data", *DATA, "--validation-data", DATA[0], "--steps", str(steps),
            "--batch-size", "2", "--max-length", "512", "--output", str(output), "--checkpoint-every", "1",
            "--report-steps", "4"]


def test_settings_come_from_the_preset_then_the_command_line():
    spec = importlib.util.spec_from_file_location("finetune_settings", ROOT / "training" / "finetune.py")
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    config, run = finetune.parse_args([])
    assert config == TrainingConfig()  # the cpu preset is the dataclass's defaults
    seed = runpy.run_path(str(ROOT / "training" / "presets" / "seed.py"))["config"]
    config, run = finetune.parse_args(["--preset", "seed", "--router-lr", "0.02", "--data", "a.jsonl", "b.jsonl",
                                       "--output", "elsewhere"])
    assert config == dataclasses.replace(seed, router_lr=0.02, data=["a.jsonl", "b.jsonl"])
    assert run.output == Path("elsewhere") and not set(vars(run)) & set(config.to_dict())  # not part of the run
    assert finetune.parse_args(["--no-routing"])[0].router_warmup == 0  # a baseline has no routers to warm up
    with pytest.raises(SystemExit):
        finetune.parse_args(["--skip-cost", "nll"])


def test_finetune_writes_adapter_metrics_and_report(tiny_chat_dir, tmp_path):
    result = run_finetune([*common_args(tiny_chat_dir, tmp_path / "run", 2), "--router-warmup", "1"])
    assert result.returncode == 0, result.stderr[-2000:]
    produced = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"adapter_model.safetensors", "layerroute_config.json", "metrics.jsonl", "report.json", "report.md",
            "report.png"} <= produced
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]  # router warm-up, then LoRA
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["held_out"]["by_step_type"]) == {"tool_call", "planning"}
    again = run_finetune([*common_args(tiny_chat_dir, tmp_path / "run", 2), "--router-warmup", "1"])
    assert again.returncode != 0 and "already holds a run" in again.stderr


@pytest.mark.parametrize(("recipe", "interrupted_at"), [(["--router-warmup", "0"], 3), (["--router-warmup", "2"], 1)],
                         ids=["joint", "router-warmup"])
def test_interrupted_run_resumes_to_the_same_adapter(tiny_chat_dir, tmp_path, recipe, interrupted_at):
    straight = run_finetune([*common_args(tiny_chat_dir, tmp_path / "straight", 6), *recipe])
    assert straight.returncode == 0, straight.stderr[-2000:]

    interrupted_dir = tmp_path / "interrupted"
    arguments = [*common_args(tiny_chat_dir, interrupted_dir, 6), *recipe]
    # Ctrl-C as step `interrupted_at` starts (tests/finetune_faults.py): the run finishes that step, saves, stops
    interrupted = run_finetune(["sigint", str(interrupted_at), *arguments], script=FAULTS)
    assert interrupted.returncode == 130, interrupted.stderr[-2000:]
    assert f"interrupted at step {interrupted_at}" in interrupted.stderr  # logged, with how to resume
    assert "--resume" in interrupted.stderr
    state = torch.load(interrupted_dir / "checkpoint" / "training_state.pt", weights_only=True)
    assert state["step"] == interrupted_at

    changed = run_finetune([*arguments, "--resume", "--lr", "0.5"])
    assert changed.returncode != 0 and "holds a different run (--lr was 0.001, now 0.5)" in changed.stderr
    changed = run_finetune([*arguments, "--resume", "--max-target-length", "100"])
    assert changed.returncode != 0 and "(--max-target-length was 160, now 100)" in changed.stderr
    resumed = run_finetune([*arguments, "--resume", "--report-steps", "2"])  # where it reports may change
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = [json.loads(line)["step"] for line in (interrupted_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, int(recipe[1]) + 6 + 1))  # warm-up and LoRA steps, each logged once
    expected = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    actual = load_file(interrupted_dir / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)


def test_router_warmup_fits_routers_on_the_frozen_base_then_lora_under_frozen_router_weights(tiny_chat_dir, tmp_path):
    warm = run_finetune([*common_args(tiny_chat_dir, tmp_path / "warm", 0), "--router-warmup", "3"])
    assert warm.returncode == 0, warm.stderr[-2000:]
    full_run = run_finetune([*common_args(tiny_chat_dir, tmp_path / "full", 2), "--router-warmup", "3"])
    assert full_run.returncode == 0, full_run.stderr[-2000:]
    warm, full = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("warm", "full"))
    before_refit = load_file(tmp_path / "full" / "checkpoint" / "adapter_model.safetensors")  # after the last step
    lora_b = [name for name in warm if "lora_B" in name]  # LoRA's B starts at zero
    assert all(not warm[name].any() for name in lora_b)  # the warm-up leaves LoRA alone
    assert any(full[name].any() for name in lora_b)
    weights = [name for name in warm if name.endswith("router.proj.weight")]  # routers' weights start at zero
    assert any(warm[name].any() for name in weights)  # the routers learnt in the warm-up
    assert all(torch.equal(warm[name], before_refit[name]) for name in weights)  # and kept those weights with LoRA
    assert any(not torch.equal(full[name], before_refit[name]) for name in weights)  # then were refitted through it
    assert "routers refitted on" in full_run.stderr
    metrics = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    clash = run_finetune([*common_args(tiny_chat_dir, tmp_path / "clash", 1), "--router-warmup", "1", "--no-routing"])
    assert clash.returncode != 0 and "--router-warmup" in clash.stderr
    baseline = run_finetune([*common_args(tiny_chat_dir, tmp_path / "lora-only", 1), "--no-routing"])
    assert baseline.returncode == 0, baseline.stderr[-2000:]  # the default warm-up does not apply to a baseline
    metrics = [json.loads(line) for line in (tmp_path / "lora-only" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]


def test_bad_data_is_reported(tiny_chat_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run_finetune(["--model", tiny_chat_dir, "--data", str(empty), "--steps", "1",
                           "--output", str(tmp_path / "o")])
    assert result.returncode != 0 and "no traces" in result.stderr
    no_steps = tmp_path / "no_steps.jsonl"
    no_steps.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = run_finetune(["--model", tiny_chat_dir, "--data", str(no_steps), "--steps", "1",
                           "--output", str(tmp_path / "o2")])
    assert result.returncode != 0 and "no_steps.jsonl:1" in result.stderr and "no assistant message" in result.stderr


@pytest.mark.parametrize(("recipe", "total_steps"), [(["--router-warmup", "0"], 2), (["--router-warmup", "1"], 3)],
                         ids=["joint", "router-warmup"])
def test_two_cpu_processes_under_accelerate_launch(tiny_chat_dir, tmp_path, recipe, total_steps):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
         str(ROOT / "training" / "finetune.py"), *common_args(tiny_chat_dir, tmp_path / "ddp", 2), *recipe],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, total_steps + 1))
    assert (tmp_path / "ddp" / "adapter_model.safetensors").exists()


def test_fixed_routes_skip_the_same_blocks_for_every_step_and_survive_saving(tmp_path):
    model = LayerRouteModel.from_base(tiny_qwen2()).eval()
    fix_routes(model, [0, 2])
    batch = collate(examples(count=4), pad_token_id=0)
    assert model(batch["input_ids"], batch["attention_mask"]).keep.tolist() == [[False, True, False, True]] * 4
    model.save_pretrained(tmp_path)
    reloaded = LayerRouteModel.from_pretrained(tmp_path, base_model=tiny_qwen2()).eval()
    assert reloaded(batch["input_ids"]).keep[0].tolist() == [False, True, False, True]
