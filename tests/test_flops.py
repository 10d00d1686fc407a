"""FLOP accounting checked against counts written out by hand."""

from __future__ import annotations

import torch
from conftest import tiny_qwen2

from layerroute import LayerRouteModel
from layerroute.architectures import BlockShape
from layerroute.flops import block_flops, causal_key_reads, step_route_stats


def test_block_flops_by_hand():
    block = BlockShape(hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=16, gated_mlp=True)
    # 3 tokens with no cache: q 8->8, k 8->4, v 8->4, o 8->8 = 2*3*(64+32+32+64) = 1152
    # attention reads 1+2+3 = 6 keys: scores 2*6*8 = 96 and values 2*6*8 = 96
    # gated MLP: 3 matmuls 8x16: 2*3*3*128 = 2304
    assert causal_key_reads(0, 3) == 6
    assert block_flops(block, 3, 6) == 1152 + 192 + 2304
    assert block_flops(block, 3, 6, extra_flops_per_token=10) == 1152 + 192 + 2304 + 30


def test_step_stats_by_hand():
    block = BlockShape(hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=16, gated_mlp=True)
    # 3 context tokens, 2 decode forwards (so 3 generated tokens), 3 LM-head positions of vocab 10, 4 blocks.
    stats = step_route_stats([2, 0], 4, block, context_tokens=3, forwarded_tokens=5, lm_head_logits=3 * 10)
    prefill = 1152 + 192 + 2304
    decode = 2 * 2 * (64 + 32 + 32 + 64) + 2 * 2 * (4 + 5) * 8 + 2 * 2 * 3 * 128
    lm_head = 2 * 3 * 8 * 10
    assert stats.flops_total == 4 * (prefill + decode) + lm_head
    assert stats.flops_skipped == 2 * (prefill + decode)
    assert stats.skipped_layers == [0, 2]
    assert stats.layers_skipped_frac == 0.5
    assert abs(stats.flops_skipped_frac - stats.flops_skipped / stats.flops_total) < 1e-12
    assert set(stats.to_dict()) == {
        "skipped_layers",
        "num_layers",
        "layers_skipped_frac",
        "flops_total",
        "flops_skipped",
        "flops_skipped_frac",
    }


def test_generate_reports_flops_of_what_it_ran():
    model = LayerRouteModel.from_base(tiny_qwen2()).eval()
    input_ids = torch.randint(2, 128, (1, 7))
    model.generate(input_ids, forced_skip=[1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    route = model.last_route
    block = model.shape.block
    lora_per_token = 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))  # q, k, v, o at rank 8
    assert model.lora_flops_per_token == lora_per_token
    per_block = block_flops(block, 7, causal_key_reads(0, 7), lora_per_token) + block_flops(
        block, 3, causal_key_reads(7, 3), lora_per_token
    )
    lm_head = 2 * 4 * 64 * 128  # HF generate computes logits for one position per forward
    assert route.flops_total == 4 * per_block + lm_head
    assert route.flops_skipped == per_block
    assert route.skipped_layers == [1]
