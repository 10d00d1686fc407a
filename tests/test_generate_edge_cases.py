"""Bad input to ``LayerRouteModel.generate`` (issue 25): a route that skips every block, and ``max_new_tokens=0``."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_qwen2
from transformers.generation.streamers import BaseStreamer

from layerroute import LayerRouteModel

NUM_LAYERS = 4


def embeddings_only_greedy(base, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by a model with no blocks at all: each next token is read from the last token's embedding
    through the final norm and the LM head."""
    sequences = input_ids
    with torch.no_grad():
        for _ in range(new_tokens):
            hidden = base.model.norm(base.model.embed_tokens(sequences[:, -1:]))
            sequences = torch.cat([sequences, base.lm_head(hidden).argmax(-1)], dim=1)
    return sequences


def count_block_calls(model: LayerRouteModel) -> list[int]:
    calls = [0] * model.num_layers
    for index, block in enumerate(model.blocks):
        block.block.register_forward_hook(lambda *args, index=index: calls.__setitem__(index, calls[index] + 1))
    return calls


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_forced_route_that_skips_every_block_generates_from_the_embeddings_alone(use_cache):
    base = tiny_qwen2(NUM_LAYERS)
    model = LayerRouteModel.from_base(base).eval()
    calls = count_block_calls(model)
    input_ids = torch.randint(2, 128, (2, 7))
    sequences = model.generate(input_ids, forced_skip=range(NUM_LAYERS), max_new_tokens=6, min_new_tokens=6,
                               do_sample=False, use_cache=use_cache)
    assert torch.equal(sequences, embeddings_only_greedy(base, input_ids, 6))
    assert calls == [0] * NUM_LAYERS
    for route in model.last_routes:
        assert route.skipped_layers == list(range(NUM_LAYERS)) and route.layers_skipped_frac == 1.0
        assert 0 < route.flops_skipped < route.flops_total  # the LM head still runs, and is counted


def test_routers_that_skip_every_block_give_the_same_answer_as_the_forced_route():
    base = tiny_qwen2(NUM_LAYERS)
    model = LayerRouteModel.from_base(base).eval()
    with torch.no_grad():
        for router in model.routers:
            torch.nn.init.zeros_(router.proj.weight)
            router.proj.bias.fill_(-10.0)  # keep probability 4.5e-5 for every block and every prompt
    input_ids = torch.randint(2, 128, (1, 9))
    sequences = model.generate(input_ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert model.last_route.skipped_layers == list(range(NUM_LAYERS))
    assert torch.equal(sequences, embeddings_only_greedy(base, input_ids, 5))
    sampled = model.generate(input_ids, max_new_tokens=5, min_new_tokens=5, do_sample=True, top_k=0)
    assert sampled.shape == (1, 14) and model.last_route.skipped_layers == list(range(NUM_LAYERS))


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.put_values, self.ended = [], False

    def put(self, value):
        self.put_values.append(value)

    def end(self):
        self.ended = True


@pytest.mark.parametrize("forced_skip", [None, [1, 2]])
def test_zero_new_tokens_returns_the_prompt_runs_no_block_and_counts_no_flops(forced_skip):
    model = LayerRouteModel.from_base(tiny_qwen2(NUM_LAYERS)).eval()
    calls = count_block_calls(model)
    input_ids = torch.randint(2, 128, (2, 6))
    sequences = model.generate(input_ids, forced_skip=forced_skip, max_new_tokens=0, do_sample=False)
    assert torch.equal(sequences, input_ids) and sequences is not input_ids
    assert calls == [0] * NUM_LAYERS
    assert [route.to_dict() for route in model.last_routes] == [
        {"skipped_layers": sorted(forced_skip or []), "num_layers": NUM_LAYERS,
         "layers_skipped_frac": len(forced_skip or []) / NUM_LAYERS, "flops_total": 0, "flops_skipped": 0,
         "flops_skipped_frac": 0.0}] * 2
    # the next call generates as usual
    assert model.generate(input_ids, max_new_tokens=2, min_new_tokens=2, do_sample=False).shape == (2, 8)


def test_zero_new_tokens_keeps_the_output_form_and_ends_the_stream():
    model = LayerRouteModel.from_base(tiny_qwen2(NUM_LAYERS)).eval()
    input_ids = torch.randint(2, 128, (1, 5))
    streamer = RecordingStreamer()
    output = model.generate(input_ids, max_new_tokens=0, return_dict_in_generate=True, output_scores=True,
                            streamer=streamer)
    assert torch.equal(output.sequences, input_ids) and output.scores == ()
    assert streamer.ended and len(streamer.put_values) == 1 and torch.equal(streamer.put_values[0], input_ids)
    assert model.last_route.flops_total == 0
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(input_ids, max_new_tokens=-1)  # below zero stays HF's error
