"""Save and load a model as ``config.json`` + ``model.safetensors`` (never pickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mapex_core.io import atomic_write, atomic_write_text
from mapex_core.model.config import MapexConfig
from mapex_core.model.mapex import MapexModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_weights(module: torch.nn.Module, path: str | Path) -> Path:
    """Write ``module``'s ``state_dict`` to a safetensors file, atomically.

    The header holds one metadata key, so re-saving the same weights gives the same bytes.
    """
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def write_config(path: str | Path, config: Any) -> Path:
    """Write a config (anything with ``to_json()``) as ``path``, atomically, with a final newline."""
    return atomic_write_text(path, config.to_json() + "\n")


def save_model(model: MapexModel, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

    Each file is written to a temporary name and renamed, so a crash never leaves a torn file.
    """
    out = Path(directory)
    save_weights(model, out / WEIGHTS_NAME)
    write_config(out / CONFIG_NAME, model.config)
    return out


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> MapexModel:
    """Load a model saved by :func:`save_model`.

    Raises:
        FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
        ValueError: the files are corrupt or do not match each other.
    """
    d = Path(directory)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: a MAPEX model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = MapexConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise ValueError(f"{cfg_path} is not a valid MAPEX config: {exc}") from exc
    try:
        state = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{w_path} is not a readable safetensors file: {exc}") from exc
    with_decoder = any(k.startswith("decoder") for k in state)
    return assign_weights(MapexModel, (config, with_decoder), state, f"{w_path} does not match {cfg_path}").to(device)


def assign_weights(cls: type, args: tuple, state: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Build ``cls(*args)`` without allocating its weights (``meta`` device) and adopt ``state``.

    Loading a checkpoint this way holds one copy of the weights, not two (a random
    initialisation plus the loaded tensors), which halves the peak memory of loading.

    Raises:
        ValueError: ``state`` does not match the module (``what`` starts the message).
    """
    with torch.device("meta"):
        model = cls(*args)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    for mod in model.modules():
        if isinstance(mod, MapexModel):
            mod.reset_buffers()
    return model
