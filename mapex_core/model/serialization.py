"""Save and load a model as ``config.json`` + ``model.safetensors`` (never pickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mapex_core.io import atomic_write, atomic_write_text, folder_problem
from mapex_core.model.checks import check_shapes, read_header
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

    Each file is written to a temporary name and renamed, so a crash never leaves a torn file; an
    existing ``config.json`` is removed first and written last, so a folder with a ``config.json``
    never pairs it with other weights (commands write whole folders: :func:`mapex_core.io.replace_folder`).
    """
    out = Path(directory)
    (out / CONFIG_NAME).unlink(missing_ok=True)
    save_weights(model, out / WEIGHTS_NAME)
    write_config(out / CONFIG_NAME, model.config)
    return out


# the files MAPEX writes in a model folder (pruned, fine-tuned): what `--out` may replace without --force
MODEL_FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "task.json", "prune_report.json", "finetune.json")


def model_folder_problem(path: str | Path) -> str | None:
    """What makes ``path`` something other than a MAPEX model folder, or ``None`` (see
    :func:`mapex_core.io.check_output`): other entries, or a ``config.json`` that is not a MAPEX config."""
    def config_problem(folder: Path) -> str | None:
        cfg = folder / CONFIG_NAME
        try:
            data = json.loads(cfg.read_text()) if cfg.is_file() else {"modalities": [], "experts_per_modality": 0}
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict) or not {"modalities", "experts_per_modality"} <= set(data):
            return f"is not a MAPEX model folder ({CONFIG_NAME} is not a MAPEX model config)"
        return None

    return folder_problem(path, "a MAPEX model folder", MODEL_FOLDER_FILES, config_problem)


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
    config = read_config(cfg_path)
    # the header's tensor shapes against the config (bounds first): no weight is read before they agree
    header = read_header(w_path)
    with_decoder = any(k.startswith("decoder") for k in header)
    check_shapes(d, header, lambda: MapexModel(config, with_decoder), config)
    try:
        state = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{w_path} is not a readable safetensors file: {exc}") from exc
    return assign_weights(MapexModel, (config, with_decoder), state, f"{w_path} does not match {cfg_path}").to(device)


def read_config(path: str | Path) -> MapexConfig:
    """The :class:`MapexConfig` in ``path`` (a model folder's ``config.json``), its fields checked.

    Raises:
        ValueError: not JSON, not an object, an unknown field or one out of bounds (names the file and the field).
    """
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        return MapexConfig.from_dict(data)
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not a valid MAPEX config: {exc}") from exc


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
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [k for k, shape in shapes.items() if tuple(state[k].shape) != shape]
    if wrong:  # a ValueError that names the tensor, not torch's "size mismatch" RuntimeError
        raise ValueError(f"{what}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected {shapes[wrong[0]]}")
    model.load_state_dict(state, strict=True, assign=True)
    for mod in model.modules():
        if isinstance(mod, MapexModel):
            mod.reset_buffers()
    return model
