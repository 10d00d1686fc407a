"""Base model loading: the embedded default, local paths, and clear errors."""

from __future__ import annotations

import pytest

from layerroute import EMBEDDED_MODEL, load_base_model


@pytest.mark.slow
def test_embedded_default_is_smollm2_with_real_weights(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.name_or_path == EMBEDDED_MODEL
    assert tokenizer.decode(tokenizer("The capital of France").input_ids) == "The capital of France"
    import torch

    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_token = model(**inputs).logits[0, -1].argmax()
    assert "Paris" in tokenizer.decode(next_token)


def test_unreachable_hub_id_suggests_a_local_path():
    with pytest.raises(OSError, match="local model directory or a .gguf file"):
        load_base_model("layerroute-tests/no-such-model")


def test_missing_gguf_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_base_model(tmp_path / "missing.gguf")


def test_local_directory_round_trip(tmp_path):
    from conftest import tiny_qwen2
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tiny_qwen2().save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(128)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))).save_pretrained(
        tmp_path
    )
    model, tokenizer = load_base_model(tmp_path)
    assert model.config.num_hidden_layers == 4
    assert model.name_or_path == str(tmp_path)
