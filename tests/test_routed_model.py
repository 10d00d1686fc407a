"""The routed model: parameter counts, exactness against the base model, real skipping, KV-cache consistency."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from conftest import tiny_llama, tiny_qwen2
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from layerroute import LayerRouteConfig, LayerRouteModel
from layerroute.training import fix_routes


def delete_blocks(model: nn.Module, skip: list[int]) -> nn.Module:
    """A copy of ``model`` whose listed decoder blocks are removed outright."""
    pruned = copy.deepcopy(model)
    kept = [block for index, block in enumerate(pruned.model.layers) if index not in skip]
    pruned.model.layers = nn.ModuleList(kept)
    pruned.config.num_hidden_layers = len(kept)
    for index, block in enumerate(kept):
        block.self_attn.layer_idx = index
    return pruned


def randomize_routers(model: LayerRouteModel, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in model.routers:
            router.proj.weight.copy_(torch.randn(router.proj.weight.shape, generator=generator) * 3)
            router.proj.bias.zero_()


def test_trainable_parameters_match_seed_setting_on_qwen25_05b_shape():
    config = Qwen2Config(
        vocab_size=64,  # the vocabulary does not change the adapter; keeping it small keeps the test fast
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
    )
    with torch.device("meta"):
        base = Qwen2ForCausalLM(config)
    base.get_input_embeddings().to_empty(device="cpu")
    model = LayerRouteModel.from_base(base)
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    routers = sum(p.numel() for r in model.routers for p in r.parameters())
    assert lora == 1_081_344
    assert routers == 24 * 897
    assert model.num_trainable_parameters() == 1_102_872
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and ".router." not in n)


@pytest.mark.parametrize("make_base", [tiny_qwen2, tiny_llama])
def test_all_gates_open_reproduces_base_logits(make_base):
    base = make_base()
    input_ids = torch.randint(2, base.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = base(input_ids).logits
        model = LayerRouteModel.from_base(base).eval()
        routed = model(input_ids, forced_skip=[])
        by_routers = model(input_ids)  # initial routers keep every block
    torch.testing.assert_close(routed.logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_routers.logits, expected, atol=1e-5, rtol=0)
    assert by_routers.keep.all()


@pytest.mark.slow
def test_all_gates_open_reproduces_base_logits_on_smollm2(smollm2):
    base, tokenizer = smollm2
    inputs = tokenizer(["Call get_weather for Paris.", "Plan the next three steps."], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = base(**inputs).logits
        model = LayerRouteModel.from_base(copy.deepcopy(base)).eval()
        routed = model(inputs.input_ids, inputs.attention_mask)
    mask = inputs.attention_mask.bool()
    torch.testing.assert_close(routed.logits[mask], expected[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("skip", [[1], [0, 2], [3]])
def test_forced_skip_equals_base_with_blocks_deleted(skip):
    base = tiny_qwen2()
    input_ids = torch.randint(2, 128, (2, 10))
    with torch.no_grad():
        expected = delete_blocks(base, skip)(input_ids).logits
        routed = LayerRouteModel.from_base(base).eval()(input_ids, forced_skip=skip)
    torch.testing.assert_close(routed.logits, expected, atol=1e-5, rtol=0)
    assert routed.keep[:, skip].logical_not().all()


@pytest.mark.slow
def test_forced_skip_equals_deleted_blocks_on_smollm2(smollm2):
    base, tokenizer = smollm2
    skip = [0, 7, 29]
    inputs = tokenizer("Use the search tool to find flights to Tokyo.", return_tensors="pt")
    with torch.no_grad():
        expected = delete_blocks(base, skip)(**inputs).logits
        routed = LayerRouteModel.from_base(copy.deepcopy(base)).eval()(inputs.input_ids, forced_skip=skip)
    torch.testing.assert_close(routed.logits, expected, atol=1e-5, rtol=0)


def test_skipped_block_is_not_executed_and_writes_no_kv():
    model = LayerRouteModel.from_base(tiny_qwen2()).eval()
    calls = {index: 0 for index in range(4)}
    for index, block in enumerate(model.blocks):
        block.block.register_forward_hook(lambda *args, index=index: calls.__setitem__(index, calls[index] + 1))
    input_ids = torch.randint(2, 128, (1, 8))
    model.generate(input_ids, forced_skip=[1, 2], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert calls[1] == calls[2] == 0
    assert calls[0] == calls[3] == 5  # prefill + 4 decode forwards
    assert model.last_route.skipped_layers == [1, 2]


@pytest.mark.parametrize("skip", [[0], [1, 3], [0, 1, 2, 3]])
def test_generate_with_kv_cache_equals_generate_without(skip):
    model = LayerRouteModel.from_base(tiny_qwen2()).eval()
    input_ids = torch.randint(2, 128, (1, 9))
    kwargs = dict(forced_skip=skip, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    cached = model.generate(input_ids, **kwargs)
    uncached = model.generate(input_ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.slow
def test_generate_with_kv_cache_equals_generate_without_on_smollm2(smollm2):
    base, tokenizer = smollm2
    model = LayerRouteModel.from_base(copy.deepcopy(base)).eval()
    inputs = tokenizer("Question: what is 12 times 7? Answer:", return_tensors="pt")
    kwargs = dict(forced_skip=[0, 4, 11, 20], max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(**inputs, **kwargs), model.generate(**inputs, use_cache=False, **kwargs))


def test_router_decisions_hold_for_every_generated_token_and_follow_the_prompt():
    model = LayerRouteModel.from_base(tiny_qwen2()).eval()
    randomize_routers(model)
    input_ids = torch.randint(2, 128, (1, 9))
    with torch.no_grad():
        prefill = model(input_ids)
    sequences = model.generate(input_ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected_skips = [i for i in range(4) if not prefill.keep[0, i]]
    assert model.last_route.skipped_layers == expected_skips
    # Re-running the prompt plus generated tokens under the held decisions reproduces the generated tokens.
    with torch.no_grad():
        logits = model(sequences[:, :-1], forced_skip=expected_skips).logits
    assert torch.equal(logits[0, 8:].argmax(-1), sequences[0, 9:])


def test_skip_threshold_skips_only_blocks_whose_keep_probability_is_at_most_it():
    model = LayerRouteModel.from_base(tiny_qwen2()).eval()
    with torch.no_grad():
        for router, keep_probability in zip(model.routers, (0.9, 0.45, 0.2, 0.05)):
            router.proj.bias.fill_(math.log(keep_probability / (1 - keep_probability)))
    input_ids = torch.randint(2, 128, (1, 7))
    for skip_threshold, skipped in ((None, [1, 2, 3]), (0.3, [2, 3]), (0.1, [3]), (0.95, [0, 1, 2, 3])):
        model.generate(input_ids, max_new_tokens=2, do_sample=False, skip_threshold=skip_threshold)
        assert model.last_route.skipped_layers == skipped, skip_threshold
        with torch.no_grad():
            keep = model(input_ids, skip_threshold=skip_threshold).keep[0]
        assert [i for i in range(4) if not keep[i]] == skipped
    for bad in (0.0, 1.0, "0.3", True):
        with pytest.raises(ValueError, match="skip_threshold must be a number in"):
            model.generate(input_ids, max_new_tokens=1, skip_threshold=bad)


def test_batched_generation_with_rows_that_decide_differently_matches_single_rows():
    model = LayerRouteModel.from_base(tiny_qwen2()).eval()
    randomize_routers(model, seed=3)
    prompts = [torch.randint(2, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (6, 9, 7, 11)]
    singles, single_routes = [], []
    for prompt in prompts:
        singles.append(model.generate(prompt[None], max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, -6:])
        single_routes.append(model.last_route.skipped_layers)
    assert len({tuple(route) for route in single_routes}) > 1, "routers should disagree across these prompts"
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):  # left padding, as for generation
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1
    batched = model.generate(input_ids, attention_mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for row in range(len(prompts)):
        assert torch.equal(batched[row, -6:], singles[row])
        assert model.last_routes[row].skipped_layers == single_routes[row]


def test_training_mode_uses_hard_gates_with_straight_through_gradients():
    model = LayerRouteModel.from_base(tiny_qwen2()).train()
    randomize_routers(model, seed=1)
    input_ids = torch.randint(2, 128, (3, 10))
    labels = input_ids.clone()
    output = model(input_ids, labels=labels)
    assert set(output.keep.unique().tolist()) == {False, True}
    with torch.no_grad():
        expected = model.eval()(input_ids, labels=labels)
    torch.testing.assert_close(output.loss, expected.loss, atol=1e-5, rtol=0)  # same hard gates in both modes
    output.loss.backward()
    for router in model.routers:
        assert router.proj.weight.grad is not None and router.proj.weight.grad.abs().sum() > 0
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None for p in lora)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_labels_give_the_lm_head_on_the_supervised_positions_only():
    model = LayerRouteModel.from_base(tiny_qwen2()).eval()
    randomize_routers(model, seed=3)
    input_ids = torch.randint(2, 128, (2, 9))
    labels = input_ids.clone()
    labels[0, :5] = -100  # a prompt that is not supervised
    labels[1, -2:] = -100
    with torch.no_grad():
        supervised = model(input_ids, labels=labels)
        every_position = model(input_ids).logits
    predicting = labels[:, 1:] != -100
    assert supervised.logits is None
    torch.testing.assert_close(supervised.target_logits, every_position[:, :-1][predicting], atol=1e-5, rtol=0)
    nll = torch.nn.functional.cross_entropy(supervised.target_logits, labels[:, 1:][predicting], reduction="none")
    torch.testing.assert_close(supervised.token_nll[:, 1:][predicting], nll)
    torch.testing.assert_close(supervised.loss, nll.mean())


def test_frozen_routers_skip_blocks_for_real_in_training():
    model = LayerRouteModel.from_base(tiny_qwen2()).train()
    fix_routes(model, [1])
    for router in model.routers:
        router.requires_grad_(False)
    calls = []
    model.blocks[1].block.register_forward_hook(lambda *_: calls.append(1))
    input_ids = torch.randint(2, 128, (2, 10))
    output = model(input_ids, labels=input_ids.clone())
    assert calls == [] and not output.keep[:, 1].any()
    output.loss.backward()  # LoRA still learns around the skipped block
    lora = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert all((p.grad is None) == (".layers.1." in n) for n, p in lora.items())


def test_routers_read_context_tokens_only():
    model = LayerRouteModel.from_base(tiny_qwen2()).eval()
    randomize_routers(model, seed=2)
    input_ids = torch.randint(2, 128, (1, 12))
    context_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    context_mask[:, :7] = True
    changed = input_ids.clone()
    changed[:, 7:] = torch.randint(2, 128, (1, 5))
    with torch.no_grad():
        first = model(input_ids, context_mask=context_mask).keep_probs
        second = model(changed, context_mask=context_mask).keep_probs
        whole = model(changed).keep_probs
    torch.testing.assert_close(first, second)
    assert not torch.allclose(first, whole)


def test_concurrent_generate_calls_see_their_own_route_stats():
    model = LayerRouteModel.from_base(tiny_qwen2()).eval()
    input_ids = torch.randint(2, 128, (1, 8))
    results, errors = {}, []
    barrier = threading.Barrier(4)

    def worker(skip: list[int]) -> None:
        try:
            barrier.wait()
            for _ in range(5):
                model.generate(input_ids, forced_skip=skip, max_new_tokens=3, do_sample=False)
                assert model.last_route.skipped_layers == skip
            results[tuple(skip)] = model.last_route
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(skip,)) for skip in ([], [0], [1, 2], [3])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert {key: list(route.skipped_layers) for key, route in results.items()} == {
        (): [],
        (0,): [0],
        (1, 2): [1, 2],
        (3,): [3],
    }


def test_unsupported_architecture_is_named():
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="'gpt2'.*not supported.*llama"):
        LayerRouteModel.from_base(base)


def test_model_without_decoder_blocks_is_rejected():
    base = tiny_qwen2()
    base.model.layers = nn.ModuleList()
    with pytest.raises(ValueError, match="no decoder blocks"):
        LayerRouteModel.from_base(base)


def test_missing_lora_target_is_named():
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] do not exist.*'q_proj'"):
        LayerRouteModel.from_base(tiny_qwen2(), LayerRouteConfig(lora_target_modules=["q_proj", "qkv_proj"]))


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match="router_pooling"):
        LayerRouteConfig(router_pooling="max")
    with pytest.raises(ValueError, match="unknown LayerRouteConfig fields"):
        LayerRouteConfig.from_dict({"lora_rank": 8, "lora_rnak": 4})


def test_merged_lora_gives_the_same_outputs_and_no_lora_flops():
    model = LayerRouteModel.from_base(tiny_qwen2()).eval()
    randomize_routers(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
        input_ids = torch.randint(2, 128, (2, 9))
        unmerged = model(input_ids)
        model.merge_lora()
        merged = model(input_ids)
    torch.testing.assert_close(merged.logits, unmerged.logits, atol=1e-5, rtol=1e-5)
    assert model.lora_flops_per_token == 0
    assert not any(isinstance(module, LoraLayer) for module in model.modules())  # served as plain Linear layers
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        model.save_pretrained("unused")
    with pytest.raises(RuntimeError, match="unmerge_lora"), model.lora_disabled():
        pass
    model.unmerge_lora()
    assert model.lora_flops_per_token > 0 and not model.lora_merged
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, unmerged.logits, atol=1e-5, rtol=1e-5)
        with model.lora_disabled():
            assert not torch.allclose(model(input_ids).logits, unmerged.logits, atol=1e-3)
