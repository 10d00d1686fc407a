"""Adapters LayerRoute cannot trust are refused with the file and the reason: weights cut short or corrupted, configs
edited by hand into what save_pretrained never writes, and pickle-based weights unless the caller opts in (and then
only as plain tensors)."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from conftest import tiny_qwen2
from safetensors.torch import load_file, save_file
from test_save_load import trained_like_adapter

from layerroute import LayerRouteModel
from layerroute.errors import InvalidAdapterError, MissingInputError, UserError

WEIGHTS, CONFIG = "adapter_model.safetensors", "layerroute_config.json"


@pytest.fixture
def adapter(tmp_path):
    """A saved adapter directory, and the model it was saved from."""
    model = trained_like_adapter(tmp_path)
    return tmp_path, model


def load(directory, **kwargs):
    return LayerRouteModel.from_pretrained(directory, base_model=tiny_qwen2(), **kwargs)


def same_outputs(loaded, model) -> None:
    input_ids = torch.randint(2, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids).logits, model.eval()(input_ids).logits)


def test_the_errors_are_user_errors_and_value_errors():
    assert issubclass(InvalidAdapterError, UserError) and issubclass(InvalidAdapterError, ValueError)


# ---------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("keep", [0, 5, 8, 60, 0.5, -1])
def test_a_truncated_weights_file_is_refused(adapter, keep):
    directory, _ = adapter
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[: keep if isinstance(keep, int) and keep >= 0 else
                                           len(data) - 1 if keep == -1 else int(len(data) * keep)])
    with pytest.raises(InvalidAdapterError, match="is not a complete safetensors file .*cut short or corrupted") as error:
        load(directory)
    assert str(directory / WEIGHTS) in str(error.value)


def test_trailing_bytes_and_random_bytes_are_refused(adapter):
    directory, _ = adapter
    data = (directory / WEIGHTS).read_bytes()
    for corrupt in (data + b"\0" * 16, os.urandom(len(data))):
        (directory / WEIGHTS).write_bytes(corrupt)
        with pytest.raises(InvalidAdapterError, match="not a complete safetensors file"):
            load(directory)


def test_corrupted_header_bytes_are_loaded_or_refused_never_crash(adapter):
    """Bytes flipped in the header (names, dtypes, shapes, offsets) give an adapter that loads or a clear refusal."""
    directory, _ = adapter
    data = bytearray((directory / WEIGHTS).read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    outcomes = set()
    for _ in range(40):
        corrupt = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            corrupt[rng.randrange(header_end)] = rng.randrange(256)
        (directory / WEIGHTS).write_bytes(bytes(corrupt))
        try:
            load(directory)
            outcomes.add("loaded")
        except InvalidAdapterError as error:
            assert str(directory / WEIGHTS) in str(error)
            outcomes.add("refused")
    assert "refused" in outcomes


def test_nan_weights_are_refused(adapter):
    directory, _ = adapter
    weights = load_file(directory / WEIGHTS)
    name = next(name for name in weights if "lora_B" in name)
    weights[name][0, 0] = float("nan")
    save_file(weights, directory / WEIGHTS)
    with pytest.raises(InvalidAdapterError, match=f"{name} holds NaN values"):
        load(directory)


# ---------------------------------------------------------------------------------------------- the config
def edit(path, change):
    metadata = json.loads(path.read_text())
    change(metadata)
    path.write_text(json.dumps(metadata))


@pytest.mark.parametrize("change, needle", [
    (lambda m: m.update(comment="mine"), r"unknown key comment \(known: base_model, config, layerroute_version\)"),
    (lambda m: m["config"].update(lora_rnak=8), "unknown key config.lora_rnak"),
    (lambda m: m["base_model"]["shape"].update(layers=4), "unknown key base_model.shape.layers"),
    (lambda m: m["config"].update(lora_rank="4"), r'config.lora_rank must be an integer, got "4"'),
    (lambda m: m["config"].update(lora_rank=True), "config.lora_rank must be an integer, got true"),
    (lambda m: m["config"].update(router_threshold="0.5"), 'config.router_threshold must be a number, got "0.5"'),
    (lambda m: m["config"].update(lora_target_modules="q_proj"), "lora_target_modules must be a list of strings"),
    (lambda m: m["config"].update(familiarity_quantile="high"), "familiarity_quantile must be a number or null"),
    (lambda m: m["config"].update(router_pooling="max"), "router_pooling must be one of"),
    (lambda m: m["config"].update(lora_target_modules=["q_proj", "qkv"]), r"LoRA target modules \['qkv'\] do not exist"),
    (lambda m: m["base_model"]["shape"].update(num_layers=4.0), "base_model.shape.num_layers must be an integer"),
    (lambda m: m["base_model"]["shape"].update(gated_mlp="yes"), "gated_mlp must be true or false"),
    (lambda m: m["base_model"]["shape"].pop("head_dim"), "base_model.shape.head_dim missing"),
    (lambda m: m["base_model"].update(fingerprint=[0.1, 0.2]), "fingerprint must hold 8 numbers, it holds 2"),
    (lambda m: m["base_model"].update(fingerprint="abc"), "fingerprint must be a list of numbers"),
    (lambda m: m.pop("base_model"), "base_model missing"),
    (lambda m: m.update(config=[1, 2]), r"config must be a JSON object, got \[1, 2\]"),
])
def test_a_hand_edited_config_is_refused_with_the_key_and_the_reason(adapter, change, needle):
    directory, _ = adapter
    edit(directory / CONFIG, change)
    with pytest.raises(InvalidAdapterError, match=needle) as error:
        load(directory)
    assert str(directory / CONFIG) in str(error.value)


def test_a_config_edited_to_another_shape_is_refused_by_the_base_check(adapter):
    directory, _ = adapter
    edit(directory / CONFIG, lambda m: m["base_model"]["shape"].update(num_layers=6))
    with pytest.raises(ValueError, match="num_layers: adapter 6 vs base 4"):
        load(directory)


def test_a_config_edited_within_its_contract_still_loads(adapter):
    """The decision threshold is a documented dial: changing it by hand is not corruption."""
    directory, _ = adapter
    edit(directory / CONFIG, lambda m: m["config"].update(router_threshold=0.3))
    assert load(directory).config.router_threshold == 0.3


@pytest.mark.parametrize("content, needle", [
    (b'{"config": {', r"is not valid JSON: .* at line 1, column 13"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", r"is not UTF-8 text \(byte 0\)"),
    (b"[]", "the file must be a JSON object, got a list"),
])
def test_a_config_that_is_not_json_is_refused(adapter, content, needle):
    directory, _ = adapter
    (directory / CONFIG).write_bytes(content)
    with pytest.raises(InvalidAdapterError, match=needle):
        load(directory)


# ---------------------------------------------------------------------------------------------- pickle
def as_pickle(directory, name="adapter_model.bin", payload=None) -> None:
    weights = load_file(directory / WEIGHTS)
    (directory / WEIGHTS).unlink()
    torch.save(weights if payload is None else payload, directory / name)


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt"])
def test_pickle_weights_are_refused_unless_allowed_then_read_as_plain_tensors(adapter, name):
    directory, model = adapter
    as_pickle(directory, name)
    with pytest.raises(InvalidAdapterError, match=rf"holds its weights only as {name}, a pickle-based format .*"
                       "allow_pickle=True"):
        load(directory)
    same_outputs(load(directory, allow_pickle=True), model)


class RunsCode:
    """What a hostile pickle holds: unpickling it calls a function of the file's choosing."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_an_allowed_pickle_never_runs_code_from_the_file(adapter, tmp_path_factory):
    directory, _ = adapter
    marker = tmp_path_factory.mktemp("pickle") / "code-ran"
    as_pickle(directory, payload={"weights": RunsCode(marker)})
    with pytest.raises(InvalidAdapterError, match="cannot be read as plain tensors .*never unpickles"):
        load(directory, allow_pickle=True)
    assert not marker.exists()


def test_an_allowed_pickle_must_hold_named_tensors(adapter):
    directory, _ = adapter
    as_pickle(directory, payload=[torch.zeros(2)])
    with pytest.raises(InvalidAdapterError, match="holds a list, not a mapping of tensor names to tensors"):
        load(directory, allow_pickle=True)


def test_safetensors_are_preferred_and_a_directory_without_weights_is_missing(adapter):
    directory, model = adapter
    torch.save({"not": torch.zeros(1)}, directory / "adapter_model.bin")
    same_outputs(load(directory), model)  # the pickle beside the safetensors file is never read
    (directory / WEIGHTS).unlink()
    (directory / "adapter_model.bin").unlink()
    with pytest.raises(MissingInputError, match="not a LayerRoute adapter directory"):
        load(directory)
