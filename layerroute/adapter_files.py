"""Reading a saved adapter's files, checked before any tensor reaches a model.

:meth:`LayerRouteModel.from_pretrained <layerroute.LayerRouteModel.from_pretrained>` reads adapters through these
functions, so that what it cannot trust is refused with an :class:`~layerroute.errors.InvalidAdapterError` naming the
file and the reason: a weights file cut short or corrupted (an interrupted copy), a ``layerroute_config.json`` edited
into something ``save_pretrained`` never writes (an unknown key, a value of the wrong type, a LoRA rank its weights do
not have), or weights only in a pickle-based format (``.bin``, ``.pt``), which can run arbitrary code when loaded and
are read, with ``torch.load(weights_only=True)``, only when the caller passes ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import pickle
import typing
from pathlib import Path
from types import NoneType, UnionType

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .architectures import BlockShape, ModelShape
from .config import RETIRED_FIELDS, LayerRouteConfig
from .errors import InvalidAdapterError, MissingInputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
METADATA_TYPES = {"layerroute_version": str, "config": dict, "base_model": dict}
BASE_MODEL_TYPES = {"name_or_path": str | None, "shape": dict, "fingerprint": list[float]}
# the flat dict ModelShape.to_dict writes: the model's fields, its block's in place of `block`
SHAPE_TYPES = {name: hint for name, hint in {**typing.get_type_hints(ModelShape),
                                             **typing.get_type_hints(BlockShape)}.items() if name != "block"}
CONFIG_TYPES = {**typing.get_type_hints(LayerRouteConfig), **RETIRED_FIELDS}  # older adapters' keys too


def read_adapter_config(path: Path, fingerprint_rows: int) -> tuple[LayerRouteConfig, dict]:
    """The adapter config and the recorded base model (``name_or_path``, ``shape``, ``fingerprint``) of the
    ``layerroute_config.json`` at ``path``, checked against what ``save_pretrained`` writes.

    Every key must be known and every value of its type; the config's values must be valid
    (:class:`~layerroute.LayerRouteConfig`). Config fields may be missing (adapters saved before a field existed get
    its default); the recorded base model must be complete, with ``fingerprint_rows`` fingerprint values.

    Raises:
        MissingInputError: there is no such file.
        InvalidAdapterError: the file is not UTF-8 JSON, or holds what ``save_pretrained`` never writes.
    """
    if not path.is_file():
        raise MissingInputError(f"{path} not found: {path.parent} is not a LayerRoute adapter directory")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise InvalidAdapterError(f"{path} is not UTF-8 text (byte {error.start}); it is corrupt, or not an adapter "
                                  "config") from None
    except json.JSONDecodeError as error:
        raise InvalidAdapterError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column "
                                  f"{error.colno}") from None
    _check_keys(path, "", metadata, METADATA_TYPES, required=True)
    _check_keys(path, "config.", metadata["config"], CONFIG_TYPES, required=False)
    _check_keys(path, "base_model.", metadata["base_model"], BASE_MODEL_TYPES, required=True)
    recorded = metadata["base_model"]
    _check_keys(path, "base_model.shape.", recorded["shape"], SHAPE_TYPES, required=True)
    if len(recorded["fingerprint"]) != fingerprint_rows:
        raise InvalidAdapterError(f"{path}: base_model.fingerprint must hold {fingerprint_rows} numbers, it holds "
                                  f"{len(recorded['fingerprint'])}")
    try:
        config = LayerRouteConfig.from_dict(metadata["config"])
    except ValueError as error:
        raise InvalidAdapterError(f"{path}: {error}") from None
    return config, recorded


def read_adapter_weights(directory: Path, filename: str, allow_pickle: bool = False) -> tuple[dict, Path]:
    """The adapter's tensors by name, and the file they came from: ``directory / filename`` (safetensors).

    Without that file, a pickle-based ``{stem}.bin`` / ``.pt`` / ``.pth`` beside it is read only with ``allow_pickle``,
    and then only as plain tensors (``torch.load(weights_only=True)``, which executes no code from the file).

    Raises:
        MissingInputError: no weights file.
        InvalidAdapterError: the file is truncated or corrupt; only pickle weights and no ``allow_pickle``; a pickle
            that is not a flat mapping of names to tensors.
    """
    path = directory / filename
    if path.is_file():
        try:
            return load_file(path), path
        except SafetensorError as error:
            raise InvalidAdapterError(f"{path} is not a complete safetensors file ({error}): it was cut short or "
                                      "corrupted, e.g. by an interrupted copy; copy or save the adapter again") from None
    stem = Path(filename).stem
    pickles = [directory / f"{stem}{suffix}" for suffix in PICKLE_SUFFIXES if (directory / f"{stem}{suffix}").is_file()]
    if not pickles:
        raise MissingInputError(f"{path} not found: {directory} is not a LayerRoute adapter directory")
    names = ", ".join(p.name for p in pickles)
    if not allow_pickle:
        raise InvalidAdapterError(
            f"{directory} holds its weights only as {names}, a pickle-based format whose loading can run code; "
            f"LayerRoute loads adapters from {filename} (safetensors). Convert a file you trust with "
            f"safetensors.torch.save_file(torch.load(path, weights_only=True), '{path}'), or pass allow_pickle=True "
            "to read it as plain tensors (torch.load with weights_only=True)")
    if len(pickles) > 1:
        raise InvalidAdapterError(f"{directory} holds several pickle weight files ({names}); keep the adapter's one")
    try:
        weights = torch.load(pickles[0], map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        # torch's own message suggests weights_only=False, which is exactly what must not be done with such a file
        reason = next((line.strip() for line in str(error).splitlines() if "WeightsUnpickler error" in line),
                      type(error).__name__)
        raise InvalidAdapterError(f"{pickles[0]} cannot be read as plain tensors ({reason}): it is corrupt, or holds "
                                  "objects other than tensors, which LayerRoute never unpickles") from None
    if not isinstance(weights, dict) or not all(isinstance(name, str) and isinstance(tensor, torch.Tensor)
                                                for name, tensor in weights.items()):
        raise InvalidAdapterError(f"{pickles[0]} holds a {type(weights).__name__}, not a mapping of tensor names to "
                                  "tensors")
    return weights, pickles[0]


def check_adapter_weights(weights: dict, expected: dict, weights_path: Path, config_path: Path) -> None:
    """Refuse ``weights`` unless they hold exactly the ``expected`` tensors (name -> the model's tensor), each of the
    model's shape, floating point and free of NaN: the model built from ``config_path`` must be the one they were
    saved from.

    Raises:
        InvalidAdapterError: names, shapes or values that do not fit (the message lists the first few).
    """
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise InvalidAdapterError(
            f"adapter weights in {weights_path} do not fit this model: missing {_few(missing)}, unexpected "
            f"{_few(unexpected)}")
    misshapen = [f"{name} is {tuple(weights[name].shape)} in the file, {tuple(tensor.shape)} in the model"
                 for name, tensor in expected.items() if weights[name].shape != tensor.shape]
    if misshapen:
        raise InvalidAdapterError(
            f"adapter weights in {weights_path} disagree with {config_path.name} ({len(misshapen)} tensors): "
            f"{'; '.join(misshapen[:3])}{'; ...' if len(misshapen) > 3 else ''}. The config was edited, or belongs to "
            "other weights (lora_rank and lora_target_modules decide these shapes)")
    for name, tensor in weights.items():
        if not tensor.is_floating_point():
            raise InvalidAdapterError(f"{weights_path}: {name} holds {tensor.dtype} values, not floating point")
        if bool(tensor.isnan().any()):
            raise InvalidAdapterError(f"{weights_path}: {name} holds NaN values; the file is corrupt, or training "
                                      "diverged")


def _check_keys(path: Path, where: str, values: typing.Any, types: dict, required: bool) -> None:
    """``values`` must be a JSON object whose keys are among ``types`` (all of them when ``required``), each value of
    its type."""
    if not isinstance(values, dict):
        raise InvalidAdapterError(f"{path}: {where.rstrip('.') or 'the file'} must be a JSON object, got "
                                  f"{_json_type(values)}")
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise InvalidAdapterError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} "
                                  f"{', '.join(where + key for key in unknown)} (known: {', '.join(sorted(types))}); "
                                  "the file was edited, or written by another program")
    missing = sorted(set(types) - set(values)) if required else []
    if missing:
        raise InvalidAdapterError(f"{path}: {', '.join(where + key for key in missing)} missing")
    for key, value in values.items():
        if not _is_of(value, types[key]):
            raise InvalidAdapterError(f"{path}: {where}{key} must be {_describe(types[key])}, got {json.dumps(value)}")


def _is_of(value: typing.Any, hint: typing.Any) -> bool:
    """Whether the JSON ``value`` is of the type ``hint`` (``int``, ``float``, ``str``, ``bool``, ``dict``,
    ``list[X]``, unions)."""
    if isinstance(hint, UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_is_of(value, option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_is_of(element, item) for element in value)
    if hint is NoneType:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # JSON true/false is no number
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _describe(hint: typing.Any) -> str:
    if isinstance(hint, UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a JSON object",
            NoneType: "null"}[hint]


def _json_type(value: typing.Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true or false", type(None): "null"}.get(
        type(value), "a number")


def _few(names: list[str]) -> str:
    return f"{names[:5]}{'...' if len(names) > 5 else ''}"


__all__ = ["check_adapter_weights", "read_adapter_config", "read_adapter_weights"]
