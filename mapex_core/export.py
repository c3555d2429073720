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
1.1 item with the Machine Learning Model extension (MLM v1.4.0): ``mlm:input`` per modality (band
names, shape, ``dim_order`` ``[batch, bands, height, width]``, dtype; ``value_scaling`` is null
because the normalisation is inside the graph, and its statistics are in each input's
``mapex:normalization``), ``mlm:output`` (shape, classes), a STAC 1.1 band object for every input
band (``properties.bands``: name, description, ``gsd`` and, for optical bands, ``eo:center_wavelength``
from :mod:`mapex_core.modalities`; the model asset lists the same names), the model asset (role
``mlm:model``, ``mlm:artifact_type`` ``torch.export.save`` or ``torch.onnx.export``, size and
sha256), no accelerator constraint (``mlm:accelerator`` null: the graph runs on any device its
runtime supports), the footprint and time range of the training data (the train split of the
fine-tuning chip store, when it is readable and unchanged: bbox, geometry and
``start_datetime``/``end_datetime``; else no geometry and the creation time) and the lineage
(``mapex:lineage``: registered model, version, alias, run id, git SHA, DVC hash, weights sha256).

Every item is validated before it is written, offline: the STAC core Item schema (bundled with
pystac), the schema of every extension it lists (pinned copies in ``mapex_core/schemas``, with the
schemas they refer to) and the MLM band cross-references by name (:func:`validate_item`).

Why this module is long: the export and the STAC item that describes it are one deliverable (the
item's inputs, outputs and asset are the exported graph's, checked together before either is
written), and the item's parts (band objects, the training data's extent, the offline validation
against the pinned schemas) serve only it.

This module knows nothing of MLflow or Prefect: the caller passes the task model folder and the
lineage (see ``mapex export`` in :mod:`mapex_core.cli`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
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
# "bands": the input's dimension that follows its `bands` list (MLM v1.5 reserves this name for it
# and requires it where bands are listed; v1.4.0 accepts it)
DIM_ORDER = ["batch", "bands", "height", "width"]
MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
CLASSIFICATION_SCHEMA = "https://stac-extensions.github.io/classification/v1.1.0/schema.json"
EO_SCHEMA = "https://stac-extensions.github.io/eo/v2.0.0/schema.json"  # band fields of STAC 1.1 band objects
# schema URL -> pinned copy in mapex_core/schemas (see its README: source, tag, commit, sha256)
PINNED_SCHEMAS = {
    MLM_SCHEMA: "mlm-v1.4.0.json",
    CLASSIFICATION_SCHEMA: "classification-v1.1.0.json",
    EO_SCHEMA: "eo-v2.0.0.json",
    "https://stac-extensions.github.io/file/v2.1.0/schema.json": "file-v2.1.0.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json": "raster-v1.1.0.json",
    "https://stac-extensions.github.io/processing/v1.1.0/schema.json": "processing-v1.1.0.json",
    # the processing v1.1.0 release names itself v1.0.0 in its $id: its internal $refs resolve there
    "https://stac-extensions.github.io/processing/v1.0.0/schema.json": "processing-v1.1.0.json",
}
MAX_GEOMETRY_POINTS = 1000  # a training footprint with more vertices is replaced by its convex hull


@dataclass(frozen=True)
class ExportFormat:
    """One export format: its file, STAC media type, MLM artifact type and framework."""

    name: str
    file: str
    media_type: str
    artifact_type: str
    framework: str


FORMATS = {
    # artifact types name the call that wrote the file (the MLM best practices' convention; they list
    # "torch.export.save" for .pt2 programs)
    "onnx": ExportFormat("onnx", "model.onnx", "application/octet-stream; framework=onnx; profile=onnx",
                         "torch.onnx.export", "ONNX"),
    "torch-export": ExportFormat("torch-export", "model.pt2",
                                 "application/octet-stream; framework=pytorch; profile=torch.export",
                                 "torch.export.save", "PyTorch"),
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


def band_objects(contract: InputContract) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """STAC 1.1 band objects of every input band, and per modality the band names ``mlm:input`` uses.

    Names, wavelengths and ground sampling distances come from :mod:`mapex_core.modalities`. Optical
    bands carry ``eo:center_wavelength`` (micrometres); a SAR band's radar wavelength is in its
    description (the EO extension describes electro-optical bands). A band name that two of the
    model's modalities share (``B04`` of ``s2`` and ``s2l1c``) is qualified by its modality
    (``s2_B04``), so each name refers to one band object.
    """
    from mapex_core.modalities import MODALITIES

    shared = Counter(b for m in contract.modalities for b in contract.bands[m])
    objects, names = [], {}
    for m in contract.modalities:
        spec = MODALITIES[m]
        specs = {b.name: b for b in spec.bands}
        names[m] = []
        for b in contract.bands[m]:
            name = b if shared[b] == 1 else f"{m}_{b}"
            band = specs.get(b)
            obj: dict[str, Any] = {"name": name}
            if band is None:  # a contract band the registry does not know: named, nothing more to say
                obj["description"] = f"{m} band {b}"
            elif spec.kind == "sar" and band.wavelength_um is not None:
                obj["description"] = (f"{spec.description}: {b} polarisation, radar wavelength "
                                      f"{band.wavelength_um / 1e4:.4g} cm")
            else:
                wl = f", centre wavelength {band.wavelength_um:g} um" if band.wavelength_um is not None else ""
                obj["description"] = f"{spec.description}: band {b}{wl}"
                if band.wavelength_um is not None and spec.kind == "optical":
                    obj["eo:center_wavelength"] = band.wavelength_um
            if band is not None:
                obj["gsd"] = band.resolution_m
            objects.append(obj)
            names[m].append(name)
    return objects, names


def training_extent(chips: str | Path, modalities: list[str], fingerprint: str | None = None,
                    require_all: bool = False) -> dict[str, Any]:
    """Where and when the training chips of a chip store were taken: the model's recommended context.

    The train split's chips (with any of ``modalities``; all of them with ``require_all``, as
    segmentation fine-tuning reads them; quarantined chips left out, as training leaves them out)
    are reprojected corner by corner to WGS 84 and unioned. Chips across the antimeridian are not
    split.

    Args:
        chips: the fine-tuning chip store.
        modalities: the model's input modalities.
        fingerprint: the store's fingerprint when the model was trained; another one is an error.
        require_all: keep only chips that hold every modality.

    Returns:
        ``bbox`` (``[west, south, east, north]``), ``geometry`` (GeoJSON: the union of the chip
        footprints, or its convex hull when that has more than :data:`MAX_GEOMETRY_POINTS`
        vertices), ``start`` and ``end`` (UTC datetimes of the earliest and latest dated chip, a
        time without a zone taken as UTC; ``None`` when no chip has a time) and ``summary`` (what the
        item records about it).

    Raises:
        FileNotFoundError / ValueError: no readable chip store at ``chips``, no train chip with these
            modalities, or a store that changed since training (names the path and the reason).
    """
    import shapely
    from rasterio.warp import transform as warp_transform

    from mapex_core.data.dataset import ChipStore

    store = ChipStore.open(chips, modalities=modalities, split="train", normalize=False, in_memory=False,
                           require_all=require_all)
    now = store.fingerprint()
    if fingerprint is not None and now != fingerprint:
        raise ValueError(f"{chips}: the chip store changed since the model was trained (fingerprint "
                         f"{now[:12]}, trained on {fingerprint[:12]})")
    meta = store.metadata()
    if meta.empty:
        raise ValueError(f"{chips}: no train chip with modalities {modalities}")
    polygons = []
    for crs, rows in meta.groupby("crs", sort=True):
        t = np.asarray(rows["transform"].tolist(), np.float64)  # (n, 6) affine a, b, c, d, e, f
        h, w = rows["height"].to_numpy(np.float64), rows["width"].to_numpy(np.float64)
        cols = np.stack([np.zeros_like(w), w, w, np.zeros_like(w)], 1)  # (n, 4) corners, clockwise
        rws = np.stack([np.zeros_like(h), np.zeros_like(h), h, h], 1)  # (n, 4)
        xs = t[:, 0:1] * cols + t[:, 1:2] * rws + t[:, 2:3]  # (n, 4) in the chip's CRS
        ys = t[:, 3:4] * cols + t[:, 4:5] * rws + t[:, 5:6]
        lon, lat = warp_transform(crs, "EPSG:4326", xs.ravel().tolist(), ys.ravel().tolist())
        ring = np.stack([np.asarray(lon), np.asarray(lat)], 1).reshape(len(rows), 4, 2)  # (n, 4, lon/lat)
        polygons.extend(shapely.polygons(ring))
    # ~1 cm grid (stable bytes), without the chips' corners along straight edges
    footprint = shapely.simplify(shapely.set_precision(shapely.union_all(polygons), 1e-7), 0.0)
    how = "union of the train chips' footprints"
    if shapely.get_num_coordinates(footprint) > MAX_GEOMETRY_POINTS:
        footprint, how = footprint.convex_hull, "convex hull of the train chips' footprints"
    parsed = {}  # time string -> UTC datetime, for the chips' times that are ISO 8601
    for value in set(meta["time"]):
        try:
            t0 = datetime.fromisoformat(str(value))
        except ValueError:
            continue  # "" (unknown) or not ISO 8601
        parsed[value] = t0.replace(tzinfo=UTC) if t0.tzinfo is None else t0.astimezone(UTC)
    times = list(parsed.values())
    dated = int(meta["time"].isin(list(parsed)).sum())
    summary = {"chips": str(chips), "split": "train", "n_chips": len(meta), "dated_chips": dated,
               "geometry": how, "fingerprint": now}
    footprint = shapely.orient_polygons(footprint)  # exterior rings counter-clockwise (RFC 7946)
    geometry = json.loads(json.dumps(shapely.geometry.mapping(footprint)))  # GeoJSON with lists, not tuples
    return {"bbox": [round(v, 7) for v in footprint.bounds], "geometry": geometry,
            "start": min(times) if times else None, "end": max(times) if times else None, "summary": summary}


def _training_data(chips: str | Path | None, fingerprint: str | None, contract: InputContract
                   ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The training extent of the model's chip store, or ``None`` and the reason it is unknown."""
    if not chips:
        return None, {"chips": None, "extent": None, "reason": "the model does not name its training chip store"}
    try:
        extent = training_extent(chips, contract.modalities, fingerprint,
                                 require_all=contract.task == "segmentation")
    except (OSError, ValueError, KeyError) as exc:
        return None, {"chips": str(chips), "extent": None, "reason": str(exc)}
    return extent, extent["summary"]


def stac_item(model: nn.Module, contract: InputContract, fmt: ExportFormat, model_file: Path,
              lineage: dict[str, Any], created: datetime, training: dict[str, Any] | None = None,
              training_summary: dict[str, Any] | None = None) -> Any:
    """The STAC item (MLM extension) describing the exported ``model_file``.

    Args:
        training: the training data's extent (:func:`training_extent`): the item's bbox, geometry and
            ``start_datetime``/``end_datetime``. Without it (or without dated chips) the item has no
            geometry and ``datetime`` is ``created``.
        training_summary: recorded as ``mapex:training_data`` (where the extent came from, or why
            it is unknown).
    """
    import pystac
    from pystac.extensions.classification import Classification
    from pystac.extensions.file import FileExtension
    from pystac.extensions.mlm import (
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
    bands, band_names = band_objects(contract)
    inputs = []
    for m in contract.modalities:
        names = band_names[m]
        stats = contract.normalization.get(m)
        inp = ModelInput.create(
            name=m, bands=names, input=InputStructure.create(shape=[-1, len(names), s, s], dim_order=DIM_ORDER,
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

    dated = training is not None and training.get("start") is not None
    item = pystac.Item(id=item_id, geometry=training["geometry"] if training else None,
                       bbox=training["bbox"] if training else None, datetime=None if dated else created,
                       properties={}, start_datetime=training["start"] if dated else None,
                       end_datetime=training["end"] if dated else None)
    item.properties["title"] = f"MAPEX {app} ({contract.task}, {'+'.join(contract.modalities)})"
    item.properties["description"] = (
        f"Pruned MAPEX mixture-of-modality-experts task model for application {app!r}, exported with "
        f"{fmt.artifact_type}. Inputs: one (batch, bands, {s}, {s}) float32 array of physical values per "
        f"modality ({', '.join(contract.modalities)}); output: class probabilities. Geometry and time range: "
        f"the training data's (mapex:training_data), the context the model is meant for.")
    item.common_metadata.created = created
    cfg = model.encoder.config
    mlm = MLMExtension.ext(item, add_if_missing=True)
    mlm.apply(name=name, architecture="MAPEX mixture-of-modality-experts Vision Transformer",
              tasks=tasks, input=inputs, output=[output], framework=fmt.framework,
              framework_version=_version("onnx" if fmt.name == "onnx" else "torch"),
              total_parameters=int(sum(p.numel() for p in model.parameters())), pretrained=True,
              pretrained_source="mapex-pretrained (multi-modal masked autoencoder, pruned to the app's experts)",
              batch_size_suggestion=16, accelerator_constrained=False,
              accelerator_summary="any: the graph holds no device-specific operation (traced and checked on a "
                                  "x86-64 CPU; onnxruntime or torch pick the device)")
    item.properties["mlm:accelerator"] = None  # explicitly: may use an accelerator, needs none
    item.properties["bands"] = bands  # STAC 1.1 band objects the mlm:input band names refer to
    item.properties["mlm:hyperparameters"] = {
        "dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads, "patch_size": cfg.patch_size, "top_k": cfg.top_k,
        "moe_layers": list(cfg.moe_layers), "img_size": cfg.img_size}
    item.properties["mapex:lineage"] = {k: lineage[k] for k in sorted(lineage)}
    item.properties["mapex:training_data"] = training_summary
    item.properties["mapex:app"] = app
    item.properties["mapex:task"] = contract.task
    item.properties["mapex:contract"] = contract.to_dict()

    asset = pystac.Asset(href=f"./{model_file.name}", media_type=fmt.media_type, title=f"{name} ({fmt.name})",
                         roles=["mlm:model", "model", "data"])
    item.add_asset("model", asset)
    asset.extra_fields["mlm:artifact_type"] = fmt.artifact_type
    # STAC 1.1 allows item-level bands only when an asset has bands: the model's, by name
    asset.extra_fields["bands"] = [{"name": b["name"]} for b in bands]
    fext = FileExtension.ext(asset, add_if_missing=True)
    fext.size = model_file.stat().st_size
    fext.checksum = "1220" + file_sha256(model_file)  # multihash: sha2-256, 32 bytes
    extensions = [CLASSIFICATION_SCHEMA] + ([EO_SCHEMA] if any("eo:center_wavelength" in b for b in bands) else [])
    item.stac_extensions.extend(e for e in extensions if e not in item.stac_extensions)
    return item


def validate_item_core(item_dict: dict[str, Any]) -> None:
    """Validate against the STAC core Item schema bundled with pystac (offline)."""
    from pystac import STACObjectType
    from pystac.validation.stac_validator import JsonSchemaSTACValidator

    JsonSchemaSTACValidator().validate_core(item_dict, STACObjectType.ITEM, item_dict["stac_version"])


@cache
def pinned_schema(url: str) -> dict[str, Any]:
    """The pinned copy (``mapex_core/schemas``) of the JSON schema at ``url``.

    Raises:
        ExportError: no copy of ``url`` is pinned (validation never downloads a schema).
    """
    from importlib.resources import files

    if url not in PINNED_SCHEMAS:
        raise ExportError(f"{url}: no pinned copy of this schema in mapex_core/schemas (items are validated "
                          f"offline; pinned: {', '.join(sorted(PINNED_SCHEMAS))})")
    return json.loads((files("mapex_core") / "schemas" / PINNED_SCHEMAS[url]).read_text(encoding="utf-8"))


def _schema_registry() -> Any:
    """A ``referencing`` registry of every pinned schema, under its URL; it retrieves nothing else."""
    from referencing import Registry, Resource

    return Registry().with_resources((url, Resource.from_contents(pinned_schema(url))) for url in PINNED_SCHEMAS)


def validate_item(item_dict: dict[str, Any]) -> None:
    """Validate an exported item offline: the STAC core Item schema, the pinned schema of every
    extension in its ``stac_extensions``, and the MLM band cross-references by name.

    The MLM v1.4.0 schema checks that band objects exist when an input lists bands; this also checks
    that each name an ``mlm:input`` lists is the name of a band object in ``properties.bands``, and
    that the input's ``bands`` dimension has that many entries.

    Raises:
        ExportError: a schema that is not pinned, or the first (best) violation: the schema URL, the
            path in the item and the reason.
        pystac.errors.STACValidationError: the core schema fails.
    """
    import jsonschema
    from referencing.exceptions import Unresolvable

    validate_item_core(item_dict)
    registry = _schema_registry()
    item_id = item_dict.get("id")
    for url in item_dict.get("stac_extensions", []):
        validator = jsonschema.Draft7Validator(pinned_schema(url), registry=registry)
        try:
            error = jsonschema.exceptions.best_match(validator.iter_errors(item_dict))
        except Unresolvable as exc:
            raise ExportError(f"item {item_id!r}: {url} refers to a schema that is not pinned in "
                              f"mapex_core/schemas ({exc})") from exc
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the item"
            message = error.message if len(error.message) <= 300 else error.message[:300] + "..."
            raise ExportError(f"item {item_id!r} does not validate against {url}: at {where}: {message}")
    props = item_dict.get("properties", {})
    defined = {b.get("name") for b in props.get("bands") or [] if isinstance(b, dict)}
    for inp in props.get("mlm:input", []):
        names = [b if isinstance(b, str) else b.get("name") for b in inp.get("bands", [])]
        missing = [n for n in names if n not in defined]
        if missing:
            raise ExportError(f"item {item_id!r}: mlm:input {inp.get('name')!r} lists bands {missing} that no band "
                              "object in properties.bands defines")
        dims = inp.get("input", {}).get("dim_order", [])
        if names and "bands" in dims and inp["input"]["shape"][dims.index("bands")] != len(names):
            raise ExportError(f"item {item_id!r}: mlm:input {inp.get('name')!r} has {len(names)} bands but its "
                              f"'bands' dimension is {inp['input']['shape'][dims.index('bands')]}")


# ----- the export -----------------------------------------------------------------------------
def export_task_model(model_dir: str | Path, out: str | Path, fmt: str, lineage: dict[str, Any] | None = None,
                      force: bool = False, chips: str | Path | None = None) -> dict[str, Any]:
    """Export the task model in ``model_dir`` to ``out`` as ``fmt`` (``onnx`` or ``torch-export``).

    Args:
        model_dir: a task model folder (``config.json``, ``task.json``, ``model.safetensors``).
        out: output folder (absent, empty, or any folder with ``force``).
        lineage: where the model came from (``registered_model``, ``version``, ``alias``, ``run_id``,
            ``git_sha``, ``dvc_hash``, ``model_sha256``, ``created`` as ISO 8601); recorded in the item.
            A ``model_sha256`` that does not match ``model_dir``'s weights is an error.
        force: replace the export files of a non-empty ``out``.
        chips: the fine-tuning chip store, for the item's geometry and time range (default: the
            store the model names in its ``task.json``, ``info.chips``); either is checked against
            the fingerprint recorded there. An unreadable or changed store leaves them unknown (the
            item says why in ``mapex:training_data``).

    Returns:
        A summary: the files, the item id, ``max_abs_diff`` of the exported file against the
        torch model on a batch of ``CHECK_BATCH`` (not the traced batch size), and
        ``training_data`` (the extent's source, or why it is unknown).

    Raises:
        ExportError: unknown format, bad ``out``, weights not matching the lineage, an exported
            file whose outputs differ from torch's by more than ``TOLERANCE``, or an item that
            fails its schemas (:func:`validate_item`).
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
    training, training_summary = _training_data(chips or model.info.get("chips"), model.info.get("chips_fingerprint"),
                                                contract)
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
        item = stac_item(model, contract, spec, path, lineage, created, training, training_summary)
        item_dict = item.to_dict(include_self_link=False, transform_hrefs=False)
        validate_item(item_dict)
        atomic_write_json(staging / ITEM_FILE, item_dict, newline=True)
        files = sorted(f.name for f in staging.iterdir())
        check_out_dir(out, force)  # again: something may have appeared meanwhile
        _publish(staging, out)
    return {"out": str(out), "format": fmt, "files": files, "item": item.id, "modalities": contract.modalities,
            "task": contract.task, "classes": len(contract.classes), "max_abs_diff": diff,
            "check_batch": CHECK_BATCH, "lineage": lineage, "training_data": training_summary}
