"""Checks of a model folder against its own config, before any weight is loaded.

A model folder (``config.json`` [+ ``task.json``] + ``model.safetensors``) is only trusted once
its config's fields are within bounds (:func:`mapex_core.model.config.check_bounds`) and the
tensor names and shapes in the safetensors *header* (read without the data) are exactly those the
config implies (the module built on the ``meta`` device, which allocates nothing). A mismatch is a
``ValueError`` that names the folder, the file and the field of the config that disagrees with
the weights (``dim``, ``depth``, ``patch_size``, ``class_names``, ``head_channels``...), never a
torch "size mismatch" traceback.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from numbers import Integral
from pathlib import Path
from typing import Any

import torch

from mapex_core.tasks import TASKS

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_CLASSES = 10_000
HEAD_CHANNELS = (1, 4096)
TASK_FIELDS = ("task", "class_names", "head_channels", "input_modalities")

# tensor name (without the task model's "encoder." prefix) -> the config field behind each axis
_AXES: list[tuple[str, tuple[str, ...]]] = [
    (r"patch_embed\.(?P<m>[^.]+)\.weight", ("dim", "in_chans.{m}", "patch_size", "patch_size")),
    (r"patch_embed\.[^.]+\.bias", ("dim",)),
    (r"modality_embed", ("modalities", "dim")),
    (r"blocks\.\d+\.(norm1|norm2)\.(weight|bias)", ("dim",)),
    (r"blocks\.\d+\.attn\.(qkv|proj)\.(weight|bias)", ("dim", "dim")),
    (r"blocks\.\d+\.ffn\.fc1\.weight", ("mlp_ratio", "dim")),
    (r"blocks\.\d+\.ffn\.fc1\.bias", ("mlp_ratio",)),
    (r"blocks\.\d+\.ffn\.fc2\.weight", ("dim", "mlp_ratio")),
    (r"blocks\.\d+\.ffn\.fc2\.bias", ("dim",)),
    (r"blocks\.\d+\.ffn\.router", ("dim", "experts")),
    (r"blocks\.\d+\.ffn\.modality_bias", ("modalities", "experts")),
    (r"blocks\.\d+\.ffn\.w1", ("experts", "dim", "mlp_ratio")),
    (r"blocks\.\d+\.ffn\.b1", ("experts", "mlp_ratio")),
    (r"blocks\.\d+\.ffn\.w2", ("experts", "mlp_ratio", "dim")),
    (r"blocks\.\d+\.ffn\.b2", ("experts", "dim")),
    (r"norm\.(weight|bias)", ("dim",)),
    (r"decoder_embed\.weight", ("decoder_dim", "dim")),
    (r"decoder_embed\.bias", ("decoder_dim",)),
    (r"mask_token", ("decoder_dim", "decoder_dim", "decoder_dim")),
    (r"decoder_modality_embed", ("modalities", "decoder_dim")),
    (r"decoder_norm\.(weight|bias)", ("decoder_dim",)),
    (r"decoder_pred\.(?P<m>[^.]+)\.weight", ("patch_size", "decoder_dim")),
    (r"decoder_pred\.(?P<m>[^.]+)\.bias", ("patch_size",)),
    (r"head\.norm\.(weight|bias)", ("dim",)),
    (r"head\.fc\.weight", ("class_names", "dim")),
    (r"head\.fc\.bias", ("class_names",)),
    (r"head\.proj\.weight", ("head_channels", "dim")),
    (r"head\.proj\.bias", ("head_channels",)),
    (r"head\.up\.\d+\.(weight|bias)", ("head_channels", "head_channels")),
    (r"head\.skip\.weight", ("head_channels", "input_modalities")),
    (r"head\.skip\.bias", ("head_channels",)),
    (r"head\.fuse\.(weight|bias)", ("head_channels", "head_channels")),
    (r"head\.out\.weight", ("class_names", "head_channels")),
    (r"head\.out\.bias", ("class_names",)),
]


def read_header(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype) from a safetensors file's header, without reading the data.

    Raises:
        ValueError: not a readable safetensors file, or a tensor that is not floating point.
    """
    from safetensors import SafetensorError, safe_open

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                s = f.get_slice(key)
                out[key] = (tuple(int(n) for n in s.get_shape()), str(s.get_dtype()))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    bad = sorted(k for k, (_, dtype) in out.items() if dtype not in FLOAT_DTYPES)
    if bad:
        raise ValueError(f"{path}: tensor {bad[0]} has dtype {out[bad[0]][1]}; a MAPEX model's weights are "
                         f"floating point ({', '.join(FLOAT_DTYPES)})")
    return out


def check_task_info(folder: str | Path, task: Any, modalities: list[str] | None = None) -> None:
    """Check ``task.json``'s fields (task, classes, head channels, input modalities) before building a head.

    Raises:
        ValueError: names the folder, ``task.json`` and the field.
    """
    where = f"{folder}: task.json"
    if not isinstance(task, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(task).__name__}")
    if task.get("task") not in TASKS:
        raise ValueError(f"{where} field 'task' = {task.get('task')!r} must be one of {sorted(TASKS)}")
    names = task.get("class_names")
    if (not isinstance(names, list) or not 1 <= len(names) <= MAX_CLASSES
            or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names)):
        raise ValueError(f"{where} field 'class_names' must be a list of 1 to {MAX_CLASSES} distinct names")
    ch = task.get("head_channels", 64)
    lo, hi = HEAD_CHANNELS
    if not isinstance(ch, Integral) or isinstance(ch, bool) or not lo <= ch <= hi:
        raise ValueError(f"{where} field 'head_channels' = {ch!r} must be an integer in [{lo}, {hi}]")
    mods = task.get("input_modalities")
    if mods is not None and (not isinstance(mods, list) or not mods or not all(
            isinstance(m, str) and (modalities is None or m in modalities) for m in mods)):
        raise ValueError(f"{where} field 'input_modalities' = {mods!r} must be a non-empty list of the "
                         f"config's modalities {modalities or ''}".rstrip())


def check_shapes(folder: str | Path, header: dict[str, tuple[tuple[int, ...], str]],
                 build: Callable[[], torch.nn.Module], config: Any, task: dict[str, Any] | None = None) -> None:
    """Check that the weights in ``header`` are exactly the tensors the config (and task) imply.

    Args:
        folder: the model folder (named in errors).
        header: :func:`read_header` of its ``model.safetensors``.
        build: builds the module; it is called on the ``meta`` device (nothing is allocated).
        config: the folder's :class:`~mapex_core.model.config.MapexConfig`.
        task: its ``task.json`` (task models).

    Raises:
        ValueError: names the folder, the file (``config.json`` or ``task.json``) and the field.
    """
    try:
        with torch.device("meta"):
            module = build()
    except ValueError as exc:
        raise ValueError(f"{folder}: config.json/task.json describe no buildable model: {exc}") from exc
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    _check_names(folder, header, expected, config, task)
    for key, want in expected.items():
        got = header[key][0]
        if got != want:
            axis = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), 0)
            raise _mismatch(folder, _axis_field(key, axis, config), config, task,
                            f"{key} has shape {got} in model.safetensors, the config implies {want}")


def _check_names(folder: str | Path, header: dict[str, Any], expected: dict[str, Any], config: Any,
                 task: dict[str, Any] | None) -> None:
    """Missing or unexpected tensors, explained by the field that decides which tensors exist."""
    if set(header) == set(expected):
        return

    def count(keys: Any, pattern: str) -> int:
        found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
        return max(found) + 1 if found else 0

    def kinds(keys: Any, pattern: str) -> set[str]:
        return {m.group(1) for k in keys if (m := re.match(pattern, k))}

    checks = [  # (what differs, field, how to read it off the tensor names)
        ("encoder blocks", "depth", lambda ks: count(ks, r"(?:encoder\.)?blocks\.(\d+)\.")),
        ("decoder blocks", "decoder_depth", lambda ks: count(ks, r"decoder_blocks\.(\d+)\.")),
        ("modalities with a patch embedding", "modalities",
         lambda ks: sorted(kinds(ks, r"(?:encoder\.)?patch_embed\.([^.]+)\."))),
        ("MoE blocks", "moe_every", lambda ks: sorted(int(m.group(1)) for k in ks
                                                      if (m := re.match(r"(?:encoder\.)?blocks\.(\d+)\.ffn\.router$", k)))),
        ("head type", "task", lambda ks: sorted(kinds(ks, r"head\.(fc|proj)\."))),
        ("head upsampling stages", "patch_size", lambda ks: count(ks, r"head\.up\.(\d+)\.")),
        ("pixel skip of the head", "input_modalities", lambda ks: sorted(kinds(ks, r"head\.(skip)\."))),
    ]
    for what, field, read in checks:
        got, want = read(header), read(expected)
        if got != want:
            raise _mismatch(folder, field, config, task,
                            f"{what}: {got} in model.safetensors, the config implies {want}")
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    raise ValueError(f"{folder}: model.safetensors does not match config.json/task.json: missing tensors "
                     f"{missing[:3]}, unexpected {unexpected[:3]}")


def _axis_field(key: str, axis: int, config: Any) -> str:
    name = key.removeprefix("encoder.")
    decoder = name.startswith("decoder_blocks.")
    if decoder:
        name = name.removeprefix("decoder_")
    for pattern, axes in _AXES:
        m = re.fullmatch(pattern, name)
        if m:
            field = axes[min(axis, len(axes) - 1)].format(**m.groupdict())
            if decoder and field == "dim":
                return "decoder_dim"
            if field == "experts" and config.kept_experts is not None:
                return "kept_experts"
            return field
    return "weights"


def _mismatch(folder: str | Path, field: str, config: Any, task: dict[str, Any] | None, detail: str) -> ValueError:
    if field == "experts":  # experts per MoE layer: the groups per modality plus the shared ones
        return ValueError(f"{folder}: config.json fields 'experts_per_modality' = {config.experts_per_modality} and "
                          f"'shared_experts' = {config.shared_experts} do not match the weights: {detail}")
    if field in TASK_FIELDS and task is not None:
        value = task.get(field)
        source = "task.json"
    else:
        data = config.to_dict()
        head, _, sub = field.partition(".")
        value = data.get(head) if not sub else (data.get(head) or {}).get(sub)
        source = "config.json"
    shown = f"{len(value)} entries" if isinstance(value, list) and len(value) > 4 else repr(value)
    return ValueError(f"{folder}: {source} field {field!r} = {shown} does not match the weights: {detail}")
