"""Shared fixtures: tiny random models where a real one is not the point, the embedded SmolLM2 where it is."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the network (pytest-socket enforces it too)

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def tiny_qwen2(num_layers: int = 4, seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=1,
        pad_token_id=0,
        **overrides,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_llama(num_layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        eos_token_id=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (real weights) and its tokenizer, loaded once per session.

    Tests must not modify this model; wrap a deep copy instead.
    """
    from layerroute import load_base_model

    return load_base_model()


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, smollm2):
    """A 3-block random Llama with SmolLM2's real tokenizer and chat template, saved as a local model directory."""
    _, tokenizer = smollm2
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    directory = tmp_path_factory.mktemp("tiny-chat")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture
def parallel_tool_calls_asked(monkeypatch):
    """The ``parallel_tool_calls`` of every tool-call grammar requested during the test, in order (the grammars are
    still compiled as asked)."""
    from layerroute.grammar import DecodingGrammars

    asked = []
    compile_tool_calls = DecodingGrammars.tool_calls
    monkeypatch.setattr(DecodingGrammars, "tool_calls", lambda self, tools, choice, parallel=True: (
        asked.append(parallel) or compile_tool_calls(self, tools, choice, parallel)))
    return asked


@pytest.fixture
def set_routers(tiny_chat_dir):
    """``set_routers(bias, weight_std=0, pooling=None)`` gives every router of the ``tiny_chat_dir`` model's shared
    engine (``ChatLayerRoute`` and the server load it once per process) those weights, and restores them afterwards."""
    from layerroute.chat import ChatEngine

    engine = ChatEngine.load(tiny_chat_dir)
    saved = [(r.pooling, r.proj.weight.detach().clone(), r.proj.bias.detach().clone()) for r in engine.model.routers]

    def set_routers(bias: float, weight_std: float = 0.0, pooling: str | None = None) -> None:
        torch.manual_seed(1)
        for router in engine.model.routers:
            router.pooling = pooling or router.pooling
            if weight_std:
                torch.nn.init.normal_(router.proj.weight, std=weight_std)
            else:
                torch.nn.init.zeros_(router.proj.weight)
            torch.nn.init.constant_(router.proj.bias, bias)

    yield set_routers
    with torch.no_grad():
        for router, (pooling, weight, bias) in zip(engine.model.routers, saved):
            router.pooling = pooling
            router.proj.weight.copy_(weight)
            router.proj.bias.copy_(bias)


# what every answer's route metadata holds, and a bound tool, for the chat model and the server's tests
METADATA_KEYS = {"step_type", "skipped_layers", "num_layers", "layers_skipped_frac", "flops_total",
                 "flops_skipped", "flops_skipped_frac", "latency_s", "retried", "flops_discarded"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "enum": ["Oslo", "Rome"]}},
                                                "required": ["city"]}}}
