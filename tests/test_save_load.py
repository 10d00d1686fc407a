"""Adapters round-trip through safetensors and refuse a base model they were not trained on."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama, tiny_qwen2
from test_routed_model import randomize_routers

from layerroute import LayerRouteConfig, LayerRouteModel
from layerroute.errors import InvalidAdapterError


def trained_like_adapter(tmp_path):
    model = LayerRouteModel.from_base(tiny_qwen2(), LayerRouteConfig(lora_rank=4), base_model_name_or_path="tiny")
    randomize_routers(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    return model


def test_round_trip_restores_outputs_and_decisions(tmp_path):
    model = trained_like_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors", "layerroute_config.json"]
    loaded = LayerRouteModel.from_pretrained(tmp_path, base_model=tiny_qwen2())
    assert loaded.config == model.config
    input_ids = torch.randint(2, 128, (2, 9))
    with torch.no_grad():
        expected, actual = model.eval()(input_ids), loaded.eval()(input_ids)
    torch.testing.assert_close(actual.logits, expected.logits)
    assert torch.equal(actual.keep, expected.keep)
    recorded = json.loads((tmp_path / "layerroute_config.json").read_text())
    assert recorded["base_model"]["name_or_path"] == "tiny"
    assert recorded["base_model"]["shape"]["num_layers"] == 4


def test_loading_onto_a_different_shape_names_the_mismatch(tmp_path):
    trained_like_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"num_layers: adapter 4 vs base 6"):
        LayerRouteModel.from_pretrained(tmp_path, base_model=tiny_qwen2(num_layers=6))
    with pytest.raises(ValueError, match=r"model_type: adapter 'qwen2' vs base 'llama'"):
        LayerRouteModel.from_pretrained(tmp_path, base_model=tiny_llama())


def test_loading_onto_same_shape_other_weights_is_refused(tmp_path):
    trained_like_adapter(tmp_path)
    with pytest.raises(ValueError, match="same shape but different weights"):
        LayerRouteModel.from_pretrained(tmp_path, base_model=tiny_qwen2(seed=1))


def test_missing_adapter_directory_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a LayerRoute adapter directory"):
        LayerRouteModel.from_pretrained(tmp_path, base_model=tiny_qwen2())


def test_adapter_from_another_config_is_refused(tmp_path):
    trained_like_adapter(tmp_path)
    config = json.loads((tmp_path / "layerroute_config.json").read_text())
    config["config"]["lora_rank"] = 8  # weights were saved at rank 4
    (tmp_path / "layerroute_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidAdapterError, match=r"disagree with layerroute_config.json .*lora_A\S* is \(4, 64\) in "
                       r"the file, \(8, 64\) in the model"):
        LayerRouteModel.from_pretrained(tmp_path, base_model=tiny_qwen2())


def test_frozen_routers_are_saved_too(tmp_path):
    """A LoRA-only baseline freezes its routers; its adapter must still load."""
    model = LayerRouteModel.from_base(tiny_qwen2())
    for router in model.routers:
        router.requires_grad_(False)
    model.save_pretrained(tmp_path)
    loaded = LayerRouteModel.from_pretrained(tmp_path, base_model=tiny_qwen2())
    assert set(loaded.trainable_state_dict()) == set(model.trainable_state_dict())
