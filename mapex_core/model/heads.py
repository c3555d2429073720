"""Task heads on the MAPEX encoder, and the task model (encoder + head) with its save format.

* ``multilabel`` / ``multiclass``: mean-pooled encoder tokens -> LayerNorm -> Linear.
* ``segmentation``: tokens averaged over the present modalities per patch -> a light decoder
  (1x1 conv, then ``log2(patch)`` x [upsample x2, 3x3 conv, GELU]), fused at full resolution
  with a 3x3 conv of the input pixels (a skip connection: the encoder sees 8x8 patches, while
  water edges and field boundaries are pixel-level) -> per-pixel logits.

A task model saves as ``config.json`` (the encoder's ``MapexConfig``), ``task.json`` (task,
classes, head, metric, lineage) and ``model.safetensors`` (``encoder.*`` and ``head.*``); the
MAE decoder is not part of it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from mapex_core.io import atomic_write_json
from mapex_core.model.config import MapexConfig
from mapex_core.model.mapex import MapexModel
from mapex_core.model.serialization import assign_weights, save_weights, write_config
from mapex_core.tasks import get_task


class ClassificationHead(nn.Module):
    """Mean-pooled tokens -> logits ``(B, K)``."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor, modality_ids: Tensor, grid: tuple[int, int], pixels: Tensor) -> Tensor:
        return self.fc(self.norm(tokens.mean(dim=1)))  # (B, K)


class SegmentationHead(nn.Module):
    """Token grid -> per-pixel logits ``(B, K, H, W)`` by x2 upsampling stages."""

    def __init__(self, dim: int, num_classes: int, patch_size: int, channels: int = 64,
                 pixel_channels: int = 0) -> None:
        super().__init__()
        stages = int(round(math.log2(patch_size)))
        if 2**stages != patch_size:
            raise ValueError(f"segmentation head needs a power-of-two patch size, got {patch_size}")
        self.proj = nn.Conv2d(dim, channels, kernel_size=1)
        self.up = nn.ModuleList(nn.Conv2d(channels, channels, kernel_size=3, padding=1) for _ in range(stages))
        skip = max(8, channels // 4)  # a few full-resolution features from the raw bands
        self.skip = nn.Conv2d(pixel_channels, skip, kernel_size=3, padding=1) if pixel_channels else None
        self.fuse = nn.Conv2d(channels + skip, channels, kernel_size=3, padding=1) if pixel_channels else None
        self.out = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, tokens: Tensor, modality_ids: Tensor, grid: tuple[int, int], pixels: Tensor) -> Tensor:
        b, t, d = tokens.shape
        h, w = grid
        m = t // (h * w)
        x = tokens.reshape(b, m, h * w, d).mean(dim=1)  # (B, L, D): average over modalities
        x = x.transpose(1, 2).reshape(b, d, h, w)  # (B, D, h, w)
        x = self.proj(x)  # (B, C, h, w)
        for conv in self.up:
            x = F.gelu(conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)))
        if self.skip is not None and self.fuse is not None:  # (B, C, H, W) + pixels (B, C_in, H, W)
            x = F.gelu(self.fuse(torch.cat([x, F.gelu(self.skip(pixels))], dim=1)))
        return self.out(x)  # (B, K, H, W)


def build_head(task: str, dim: int, num_classes: int, patch_size: int, channels: int = 64,
               pixel_channels: int = 0) -> nn.Module:
    """The head for ``task``: per-pixel logits for segmentation, pooled logits otherwise."""
    if get_task(task).per_pixel:
        return SegmentationHead(dim, num_classes, patch_size, channels, pixel_channels)
    return ClassificationHead(dim, num_classes)


class TaskModel(nn.Module):
    """A MAPEX encoder with a task head.

    Args:
        encoder: a ``MapexModel`` (its MAE decoder, if any, is not used).
        task: ``multilabel``, ``multiclass`` or ``segmentation``.
        class_names: the classes, in logit order.
        info: free-form task metadata saved in ``task.json`` (metric, app, lineage...).
        input_modalities: the modalities the application feeds (default: all of the
            encoder's); the segmentation head's pixel skip takes their bands, so all of them
            must be present at inference.
    """

    def __init__(self, encoder: MapexModel, task: str, class_names: list[str],
                 info: dict[str, Any] | None = None, head_channels: int = 64,
                 input_modalities: list[str] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.task = task
        self.spec = get_task(task)
        self.class_names = list(class_names)
        self.info = dict(info or {})
        self.head_channels = head_channels
        cfg = encoder.config
        self.input_modalities = [m for m in cfg.modalities if m in (input_modalities or cfg.modalities)]
        pixels = sum(cfg.in_chans[m] for m in self.input_modalities) if self.spec.per_pixel else 0
        self.head = build_head(task, cfg.dim, len(class_names), cfg.patch_size, head_channels, pixels)

    @property
    def modalities(self) -> list[str]:
        """The modalities this task model is fed."""
        return list(self.input_modalities)

    def _pixels(self, inputs: dict[str, Tensor]) -> Tensor:
        missing = [m for m in self.input_modalities if m not in inputs]
        if missing and self.spec.per_pixel:
            raise ValueError(f"this model needs modalities {self.input_modalities}; missing {missing}")
        return torch.cat([inputs[m] for m in self.input_modalities if m in inputs], dim=1)  # (B, C_in, H, W)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        """Logits: ``(B, K)`` for classification, ``(B, K, H, W)`` for segmentation."""
        return self.forward_with_aux(inputs)[0]

    def forward_with_aux(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Logits and the encoder's balance loss."""
        enc = self.encoder.encode(inputs)
        return self.head(enc.tokens, enc.modality_ids, enc.grid, self._pixels(inputs)), enc.aux_loss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def strip_decoder(model: MapexModel) -> MapexModel:
    """``model`` without its MAE decoder, sharing (not copying) the encoder weights."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    return assign_weights(MapexModel, (model.config, False), state, "strip_decoder")


def save_task_model(model: TaskModel, directory: str | Path) -> Path:
    """Write ``config.json``, ``task.json`` and ``model.safetensors`` (atomically, each).

    An existing ``config.json`` is removed first and written last: a folder with a ``config.json``
    holds one model's three files, never a mix.
    """
    out = Path(directory)
    (out / "config.json").unlink(missing_ok=True)
    save_weights(model, out / "model.safetensors")
    task = {"task": model.task, "class_names": model.class_names, "head_channels": model.head_channels,
            "input_modalities": model.input_modalities, **model.info}
    atomic_write_json(out / "task.json", task, newline=True)
    write_config(out / "config.json", model.encoder.config)
    return out


def check_task_folder(directory: str | Path) -> tuple[MapexConfig, dict[str, Any]]:
    """Check a task model folder without loading its weights: the files exist, ``config.json`` and
    ``task.json`` are within bounds, and ``model.safetensors``' header holds exactly the tensors they imply.

    Returns:
        ``(config, task)``: the parsed ``config.json`` and ``task.json``.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: corrupt or inconsistent files (names the folder, the file and the field).
    """
    from mapex_core.model.checks import check_shapes, check_task_info, read_header
    from mapex_core.model.serialization import read_config

    d = Path(directory)
    for name in ("config.json", "task.json", "model.safetensors"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} not found: a fine-tuned MAPEX model directory holds "
                                    "config.json, task.json and model.safetensors")
    config = read_config(d / "config.json")
    try:
        task = json.loads((d / "task.json").read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{d / 'task.json'}: not valid JSON: {exc}") from exc
    check_task_info(d, task)
    header = read_header(d / "model.safetensors")
    check_shapes(d, header, lambda: _build_task_model(config, task), config, task)
    check_task_info(d, task, config.modalities)  # input modalities the encoder has: after the encoder matched
    return config, task


def _build_task_model(config: MapexConfig, task: dict[str, Any]) -> TaskModel:
    info = {k: v for k, v in task.items() if k not in ("task", "class_names", "head_channels", "input_modalities")}
    return TaskModel(MapexModel(config, with_decoder=False), task["task"], task["class_names"], info,
                     task.get("head_channels", 64), task.get("input_modalities"))


def load_task_model(directory: str | Path, device: str | torch.device = "cpu") -> TaskModel:
    """Load a task model saved by :func:`save_task_model`, after :func:`check_task_folder`.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: corrupt or inconsistent files (names the folder, the file and the field).
    """
    d = Path(directory)
    config, task = check_task_folder(d)
    try:
        state = load_file(str(d / "model.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{d / 'model.safetensors'} is not a readable safetensors file: {exc}") from exc
    model = assign_weights(_build_task_model, (config, task), state,
                           f"{d / 'model.safetensors'} does not match config.json/task.json")
    return model.to(device)
