"""Export a task model as ONNX or a ``torch.export`` program, described by a STAC item (MLM extension).

The exported graph is :class:`PhysicalInputModel`: it takes one ``(B, C, H, W)`` float32 array of
physical values per modality (S2 reflectance x 1e4, S1 dB), in the contract's modality and band
order, applies the model's normalisation ``(x - mean) / std`` per band, replaces NaN (nodata) by
0 (the band mean), runs the task model and returns probabilities: ``(B, K)`` for classification
(sigmoid for multi-label, softmax for multi-class), ``(B, K, H, W)`` per-pixel class probabilities
for segmentation. These equal what the MLflow pyfunc returns for the same chips (with
``params={"output": "probabilities"}`` for segmentation). The batch dimension is dynamic; height and
width are the contract's chip size.

The MoE layers export with their dense dispatch (``MoELayer.impl = "dense"``, equal to the sparse
paths): the sparse ones have data-dependent shapes that exporters cannot trace.

The output folder holds the model file (``model.onnx`` or ``model.pt2``) and ``item.json``, a STAC
item with the Machine Learning Model extension: ``mlm:input`` per modality (bands, shape, dtype;
``value_scaling`` is null because the normalisation is inside the graph, and its statistics are
in each input's ``mapex:normalization``), ``mlm:output`` (shape, classes), the model asset
(role ``mlm:model``, ``mlm:artifact_type``, size and sha256) and the lineage (``mapex:lineage``:
registered model, version, alias, run id, git SHA, DVC hash, weights sha256).

This module knows nothing of MLflow or Prefect: the caller passes the task model folder and the
lineage (see ``mapex export`` in :mod:`mapex_core.cli`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mapex_core.contract import InputContract
from mapex_core.io import (
    atomic_write_json,
    file_sha256,
    folder_problem,
    merge_folder,
    replace_folder,
    staged_folder,
)
from mapex_core.model.moe import MoELayer
from mapex_core.tasks import get_task

EXPORT_BATCH = 2  # batch size of the example inputs the graph is traced with (the batch stays dynamic)
MAX_BATCH = 4096  # upper bound of the dynamic batch dimension
CHECK_BATCH = 3  # the exported file is checked on a batch size other than the traced one
TOLERANCE = 1e-4  # largest accepted |exported - torch| difference of a probability
ITEM_FILE = "item.json"
DIM_ORDER = ["batch", "channel", "height", "width"]


@dataclass(frozen=True)
class ExportFormat:
    """One export format: its file, STAC media type, MLM artifact type and framework."""

    name: str
    file: str
    media_type: str
    artifact_type: str
    framework: str


FORMATS = {
    "onnx": ExportFormat("onnx", "model.onnx", "application/octet-stream; framework=onnx; profile=onnx", "onnx",
                         "ONNX"),
    "torch-export": ExportFormat("torch-export", "model.pt2",
                                 "application/octet-stream; framework=pytorch; profile=torch.export",
                                 "torch.export", "PyTorch"),
}


class ExportError(ValueError):
    """The export cannot be made: a bad format or output folder, or an exported file that does not match."""


class PhysicalInputModel(nn.Module):
    """Physical values per modality -> class probabilities: the contract's normalisation, the task
    model and the output activation in one graph.

    ``forward(*arrays)`` takes one ``(B, C_m, H, W)`` float32 tensor per modality, in
    ``self.modalities`` order.
    """

    def __init__(self, model: nn.Module, contract: InputContract) -> None:
        super().__init__()
        self.model = model
        self.spec = get_task(contract.task)
        self.modalities = list(contract.modalities)
        self.normalized = []
        for i, m in enumerate(self.modalities):
            stats = contract.normalization.get(m)
            self.normalized.append(stats is not None)
            if stats is not None:  # (C, 1, 1) per-band statistics, broadcast over (B, C, H, W)
                self.register_buffer(f"mean{i}", torch.tensor(stats["mean"], dtype=torch.float32).view(-1, 1, 1))
                self.register_buffer(f"std{i}", torch.tensor(stats["std"], dtype=torch.float32).view(-1, 1, 1))

    def forward(self, *arrays: Tensor) -> Tensor:
        inputs = {}
        for i, (m, x) in enumerate(zip(self.modalities, arrays, strict=True)):
            if self.normalized[i]:
                x = (x - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")  # (B, C, H, W)
            inputs[m] = torch.nan_to_num(x, nan=0.0)  # nodata -> the band mean, as `mapex predict` does
        logits = self.model(inputs).float()  # (B, K) or (B, K, H, W)
        return self.spec.probabilities(logits)


@contextmanager
def dense_dispatch(model: nn.Module) -> Iterator[nn.Module]:
    """Switch every :class:`MoELayer` of ``model`` to the dense (exportable) dispatch inside the block."""
    layers = [mod for mod in model.modules() if isinstance(mod, MoELayer)]
    before = [layer.impl for layer in layers]
    for layer in layers:
        layer.impl = "dense"
    try:
        yield model
    finally:
        for layer, impl in zip(layers, before, strict=True):
            layer.impl = impl


def example_inputs(contract: InputContract, batch: int, seed: int = 0) -> tuple[Tensor, ...]:
    """Plausible physical values ``(batch, C, S, S)`` per modality (band mean + std * noise): shapes
    for tracing and the self-check, not data."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in contract.modalities:
        c, s = len(contract.bands[m]), contract.chip_size
        stats = contract.normalization.get(m, {"mean": [0.0] * c, "std": [1.0] * c})
        mean = torch.tensor(stats["mean"], dtype=torch.float32).view(1, c, 1, 1)
        std = torch.tensor(stats["std"], dtype=torch.float32).view(1, c, 1, 1)
        out.append(mean + std * torch.randn(batch, c, s, s, generator=g))
    return tuple(out)


# ----- exporters ------------------------------------------------------------------------------
def _dynamic_shapes(n: int) -> tuple[tuple[dict[int, Any], ...]]:
    """One shared dynamic batch dimension for the ``n`` inputs (``forward(*arrays)``: one varargs entry)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return (tuple({0: batch} for _ in range(n)),)


def _export_torch(wrapper: PhysicalInputModel, example: tuple[Tensor, ...], path: Path,
                  extra: dict[str, str]) -> None:
    program = torch.export.export(wrapper, example, dynamic_shapes=_dynamic_shapes(len(example)), strict=False)
    torch.export.save(program, str(path), extra_files=extra)


def _export_onnx(wrapper: PhysicalInputModel, example: tuple[Tensor, ...], path: Path,
                 extra: dict[str, str]) -> None:
    try:
        import onnxscript  # noqa: F401 - the dynamo ONNX exporter needs it
    except ImportError as exc:
        raise ExportError("--format onnx needs the onnx and onnxscript packages (pip install onnx onnxscript)") from exc
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (unused torchvision ops, axis names)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(wrapper, example, dynamo=True, verbose=False,
                                        input_names=wrapper.modalities, output_names=["probabilities"],
                                        dynamic_shapes=_dynamic_shapes(len(example)))
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
    program.model.metadata_props.update(extra)
    program.save(str(path))


def load_exported(path: str | Path) -> Any:
    """A callable ``f(*arrays) -> probabilities (numpy)`` for an exported ``model.onnx`` or ``model.pt2``.

    ONNX runs on onnxruntime (CPU), ``.pt2`` through ``torch.export.load``.
    """
    path = Path(path)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *arrays: session.run(None, {n: np.asarray(a, np.float32) for n, a in zip(names, arrays,
                                                                                               strict=True)})[0]
    program = torch.export.load(str(path)).module()

    def run(*arrays: Any) -> np.ndarray:
        with torch.no_grad():
            return program(*(torch.as_tensor(np.asarray(a, np.float32)) for a in arrays)).numpy()

    return run


# ----- output folder --------------------------------------------------------------------------
EXPORT_FILES = tuple(sorted({f.file for f in FORMATS.values()} | {ITEM_FILE}))


def check_out_dir(out: str | Path, force: bool = False) -> Path:
    """``out`` as an export folder: absent, empty or an export folder (replaced whole), or, with
    ``force``, a file (replaced) or a folder holding other files (its export files are replaced, the
    others kept).

    Raises:
        ExportError: ``out`` is a file or holds other files, without ``force``; its parent is missing.
    """
    out = Path(out)
    if out.exists() and not out.is_dir() and not force:
        raise ExportError(f"--out {out} is a file, not a folder; pass --force to replace it")
    if out.is_dir() and folder_problem(out, "an export folder", EXPORT_FILES) and not force:
        raise ExportError(f"--out {out} exists and is not empty; pass --force to replace the export files "
                          f"in it ({', '.join(EXPORT_FILES)}) and keep its other files")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise ExportError(f"--out {out}: its parent folder {parent} does not exist")
    return out


def _publish(staging: Path, out: Path) -> None:
    """Put the finished export of ``staging`` at ``out``: the whole folder swapped in, or (a folder
    that holds other files) the export files moved in with ``item.json`` removed first and moved in last."""
    if out.is_dir() and not out.is_symlink() and folder_problem(out, "an export folder", EXPORT_FILES):
        ours = {f.name for f in staging.iterdir()}
        merge_folder(staging, out, ITEM_FILE, stale=[f for f in EXPORT_FILES if f not in ours])
    else:
        replace_folder(staging, out)


# ----- STAC item ------------------------------------------------------------------------------
def _slug(name: str) -> str:
    """A classification-extension class name (letters, digits, ``-``, ``_``) for ``name``."""
    return re.sub(r"[^0-9A-Za-z_-]+", "_", name).strip("_") or "class"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package).split("+")[0]
    except PackageNotFoundError:
        return None


def stac_item(model: nn.Module, contract: InputContract, fmt: ExportFormat, model_file: Path,
              lineage: dict[str, Any], created: datetime) -> Any:
    """The STAC item (MLM extension) describing the exported ``model_file``."""
    import pystac
    from pystac.extensions.classification import Classification
    from pystac.extensions.file import FileExtension
    from pystac.extensions.mlm import (
        AcceleratorType,
        InputStructure,
        MLMExtension,
        ModelInput,
        ModelOutput,
        ResultStructure,
        TaskType,
    )
    from pystac.extensions.raster import DataType

    from mapex_core.modalities import MODALITIES

    app = lineage.get("app") or model.info.get("app") or "model"
    name = f"mapex-{app}"
    version = lineage.get("version")
    item_id = f"{name}-v{version}" if version else name
    s = contract.chip_size
    inputs = []
    for m in contract.modalities:
        bands = contract.bands[m]
        stats = contract.normalization.get(m)
        inp = ModelInput.create(
            name=m, bands=bands, input=InputStructure.create(shape=[-1, len(bands), s, s], dim_order=DIM_ORDER,
                                                               data_type=DataType.FLOAT32),
            description=(f"{MODALITIES[m].description}: physical values in {contract.units[m]}, bands in this order; "
                         + ("the z-score normalisation (x - mean) / std with mapex:normalization is applied inside "
                            "the model: send unscaled values" if stats else "no normalisation")
                         + "; NaN (nodata) pixels are replaced by the band mean inside the model"),
            value_scaling=None, resize_type=None, pre_processing_function=None)
        inp.properties["mapex:normalization"] = (
            {"type": "z-score", "applied": "inside the model", "mean": stats["mean"], "stddev": stats["std"]}
            if stats else None)
        inp.properties["mapex:units"] = contract.units[m]
        inputs.append(inp)
    seg = contract.task == "segmentation"
    tasks = [TaskType.SEGMENTATION, TaskType.SEMANTIC_SEGMENTATION] if seg else \
        [TaskType.CLASSIFICATION, TaskType.SCENE_CLASSIFICATION]
    k = len(contract.classes)
    activation = "sigmoid (multi-label: independent per class)" if contract.task == "multilabel" else \
        "softmax over the classes"
    output = ModelOutput.create(
        name="probabilities", tasks=tasks,
        result=ResultStructure.create(shape=[-1, k, s, s] if seg else [-1, k],
                                      dim_order=["batch", "class", "height", "width"] if seg else ["batch", "class"],
                                      data_type=DataType.FLOAT32),
        description=f"{contract.task} class probabilities, {activation}"
                    + ("; argmax over 'class' gives the label mask" if seg else ""),
        classes=[Classification.create(value=i, name=_slug(c), title=c, description=c)
                 for i, c in enumerate(contract.classes)],
        post_processing_function=None)

    item = pystac.Item(id=item_id, geometry=None, bbox=None, datetime=created, properties={})
    item.properties["title"] = f"MAPEX {app} ({contract.task}, {'+'.join(contract.modalities)})"
    item.properties["description"] = (
        f"Pruned MAPEX mixture-of-modality-experts task model for application {app!r}, exported as "
        f"{fmt.artifact_type}. Inputs: one (batch, channel, {s}, {s}) float32 array of physical values per "
        f"modality ({', '.join(contract.modalities)}); output: class probabilities.")
    cfg = model.encoder.config
    mlm = MLMExtension.ext(item, add_if_missing=True)
    mlm.apply(name=name, architecture="MAPEX mixture-of-modality-experts Vision Transformer",
              tasks=tasks, input=inputs, output=[output], framework=fmt.framework,
              framework_version=_version("onnx" if fmt.name == "onnx" else "torch"),
              total_parameters=int(sum(p.numel() for p in model.parameters())), pretrained=True,
              pretrained_source="mapex-pretrained (multi-modal masked autoencoder, pruned to the app's experts)",
              batch_size_suggestion=16, accelerator=AcceleratorType.AMD64, accelerator_constrained=False,
              accelerator_summary="CPU (x86-64); the graph is device-independent", accelerator_count=1)
    item.properties["mlm:hyperparameters"] = {
        "dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads, "patch_size": cfg.patch_size, "top_k": cfg.top_k,
        "moe_layers": list(cfg.moe_layers), "img_size": cfg.img_size}
    item.properties["mapex:lineage"] = {k: lineage[k] for k in sorted(lineage)}
    item.properties["mapex:app"] = app
    item.properties["mapex:task"] = contract.task
    item.properties["mapex:contract"] = contract.to_dict()

    asset = pystac.Asset(href=f"./{model_file.name}", media_type=fmt.media_type, title=f"{name} ({fmt.name})",
                         roles=["mlm:model", "model", "data"])
    item.add_asset("model", asset)
    asset.extra_fields["mlm:artifact_type"] = fmt.artifact_type
    fext = FileExtension.ext(asset, add_if_missing=True)
    fext.size = model_file.stat().st_size
    fext.checksum = "1220" + file_sha256(model_file)  # multihash: sha2-256, 32 bytes
    return item


def validate_item_core(item_dict: dict[str, Any]) -> None:
    """Validate against the STAC core Item schema bundled with pystac (offline; the extension schemas
    are fetched from the web by ``item.validate()``, so they are not checked here)."""
    from pystac import STACObjectType
    from pystac.validation.stac_validator import JsonSchemaSTACValidator

    JsonSchemaSTACValidator().validate_core(item_dict, STACObjectType.ITEM, item_dict["stac_version"])


# ----- the export -----------------------------------------------------------------------------
def export_task_model(model_dir: str | Path, out: str | Path, fmt: str, lineage: dict[str, Any] | None = None,
                      force: bool = False) -> dict[str, Any]:
    """Export the task model in ``model_dir`` to ``out`` as ``fmt`` (``onnx`` or ``torch-export``).

    Args:
        model_dir: a task model folder (``config.json``, ``task.json``, ``model.safetensors``).
        out: output folder (absent, empty, or any folder with ``force``).
        lineage: where the model came from (``registered_model``, ``version``, ``alias``, ``run_id``,
            ``git_sha``, ``dvc_hash``, ``model_sha256``, ``created`` as ISO 8601); recorded in the item.
            A ``model_sha256`` that does not match ``model_dir``'s weights is an error.
        force: replace the export files of a non-empty ``out``.

    Returns:
        A summary: the files, the item id, and ``max_abs_diff`` of the exported file against the
        torch model on a batch of ``CHECK_BATCH`` (not the traced batch size).

    Raises:
        ExportError: unknown format, bad ``out``, weights not matching the lineage, or an exported
            file whose outputs differ from torch's by more than ``TOLERANCE``.
        FileNotFoundError / ValueError: a missing or invalid task model folder.
    """
    from mapex_core.model.heads import load_task_model

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    out = check_out_dir(out, force)
    model_dir = Path(model_dir)
    model = load_task_model(model_dir).eval()
    weights_sha = file_sha256(model_dir / "model.safetensors")
    lineage = {k: v for k, v in (lineage or {}).items() if v is not None}
    if lineage.get("model_sha256") not in (None, weights_sha):
        raise ExportError(f"{model_dir / 'model.safetensors'}: sha256 {weights_sha} is not the registered "
                          f"weights' {lineage['model_sha256']} (did the alias move meanwhile? export again)")
    lineage["model_sha256"] = weights_sha
    lineage.setdefault("app", model.info.get("app"))
    lineage = {k: v for k, v in lineage.items() if v is not None}
    created = (datetime.fromisoformat(lineage["created"]) if "created" in lineage
               else datetime.fromtimestamp(int((model_dir / "model.safetensors").stat().st_mtime), UTC))

    contract = InputContract.of(model)
    wrapper = PhysicalInputModel(model, contract).eval()
    example = example_inputs(contract, EXPORT_BATCH)
    meta = {"mapex_contract": json.dumps(contract.to_dict(), sort_keys=True),
            "mapex_lineage": json.dumps(lineage, sort_keys=True, default=str)}
    with staged_folder(out) as staging:
        path = staging / spec.file
        with dense_dispatch(model), torch.no_grad():
            if fmt == "onnx":
                _export_onnx(wrapper, example, path, meta)
            else:
                _export_torch(wrapper, example, path, {k + ".json": v for k, v in meta.items()})
        check = example_inputs(contract, CHECK_BATCH, seed=1)
        with torch.no_grad():
            want = wrapper(*check).numpy()  # the default (sparse) dispatch
        got = load_exported(path)(*(x.numpy() for x in check))
        diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
        if not diff <= TOLERANCE:
            raise ExportError(f"{spec.file}: outputs differ from the torch model's by {diff:.3g} "
                              f"(shape {got.shape} vs {want.shape}; tolerance {TOLERANCE})")
        item = stac_item(model, contract, spec, path, lineage, created)
        item_dict = item.to_dict(include_self_link=False, transform_hrefs=False)
        validate_item_core(item_dict)
        atomic_write_json(staging / ITEM_FILE, item_dict, newline=True)
        files = sorted(f.name for f in staging.iterdir())
        check_out_dir(out, force)  # again: something may have appeared meanwhile
        _publish(staging, out)
    return {"out": str(out), "format": fmt, "files": files, "item": item.id, "modalities": contract.modalities,
            "task": contract.task, "classes": len(contract.classes), "max_abs_diff": diff,
            "check_batch": CHECK_BATCH, "lineage": lineage}
