"""Whole-scene inference: sliding windows over co-registered scenes, blended seams, a GeoTIFF (COG) out.

Scenes are read with rioxarray, lazily: the scene of the finest modality is the output grid; other
modalities are opened through a ``WarpedVRT`` onto it (bilinear), so each read warps one strip.
Windows of the model's chip size step by ``chip - overlap``; each window's prediction is weighted
by a ramp that falls linearly over the ``overlap`` pixels at its edges, and overlapping
predictions are averaged with those weights, so seams do not show.
Outside the overlaps a pixel sees exactly one window: there the output equals the chip-wise
prediction. One row of windows is held at a time and written as soon as no later window touches
it, so memory grows with the scene's width, not its height (and not its size overall).

The map is nodata wherever an input was: a pixel where any band of any modality is nodata (the
sensor's nodata value, NaN, or outside a warped input's footprint) gets :data:`LABEL_NODATA` in a
label map and NaN in every band of a probability map (the model still sees such pixels as the band
mean, as before: masking them changes no other pixel's prediction). Label maps carry a colour table (nodata
transparent) and the class names in the band metadata (``CLASS_<id>=<name>``); probability maps
name each band's class (description, ``CLASS_ID``/``CLASS_NAME``). Overviews are built with
``mode`` resampling for labels (the most frequent class id of the pixels below; never a value that
is not a class id or nodata) and ``average`` for probabilities, both skipping nodata.

Radiometry is harmonised as at ingestion (:mod:`mapex_core.data.radiometry`), decided once per
input from its metadata and name (Sentinel-2 processing baseline: the +1000 offset removed) or, for
Sentinel-1 without a unit, from the values of an evenly decimated read (at most
:data:`SAMPLE_PIXELS` pixels; linear power converted to dB); each strip is converted after nodata
is masked. A modality warped onto another grid is converted after the warp (bilinear), so linear
power is averaged before it becomes dB there; on the output grid the values equal ingestion's.
The decisions are in the summary (``radiometry``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import rioxarray
import torch
import xarray as xr
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from mapex_core.contract import InputContract
from mapex_core.data import radiometry
from mapex_core.data.radiometry import Decision, FileMeta, RadiometryOptions
from mapex_core.data.raster import GDAL_CACHE_MB, Grid, check_header, window_offsets
from mapex_core.io import atomic_write, check_output_file, staged_folder
from mapex_core.modalities import MODALITIES

TAG = {"MAPEX_PRODUCT": "mapex predict"}  # a GeoTIFF tag that marks the maps this module writes
LABEL_NODATA = 255  # nodata of a label map (uint8): class ids are 0 .. 254
OVERVIEW_RESAMPLING = {"labels": "MODE", "probabilities": "AVERAGE"}  # GDAL's COG RESAMPLING option
SAMPLE_PIXELS = 1024 * 1024  # pixels of the decimated read that decides Sentinel-1's scale, at most
# colours of class ids 0..19 (matplotlib's tab20, strong shades first); further ids: golden-angle hues
_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
            (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
            (219, 219, 141), (158, 218, 229))


def class_colors(n: int) -> dict[int, tuple[int, int, int, int]]:
    """The colour table of a label map with ``n`` classes: RGBA per class id, nodata transparent."""
    import colorsys

    table = {}
    for i in range(n):
        if i < len(_PALETTE):
            rgb = _PALETTE[i]
        else:
            r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.9)
            rgb = (round(r * 255), round(g * 255), round(b * 255))
        table[i] = (*rgb, 255)
    table[LABEL_NODATA] = (0, 0, 0, 0)
    return table


def is_prediction(path: str | Path) -> bool:
    """Whether ``path`` is a GeoTIFF written by :func:`predict_scene` (it carries :data:`TAG`)."""
    try:
        with rasterio.open(path) as src:
            return all(src.tags().get(k) == v for k, v in TAG.items())
    except (rasterio.errors.RasterioError, OSError):
        return False


def check_out_file(out: str | Path, force: bool = False) -> None:
    """Whether a map may be written to ``out``: absent, or a map written by ``mapex predict`` (any
    file with ``force``).

    Raises:
        OutputConflict: ``out`` is a folder, or another file without ``force`` (names it).
    """
    check_output_file(out, "a map written by mapex predict", is_prediction, force)


def blend_weights(chip: int, overlap: int) -> np.ndarray:
    """``(chip, chip)`` weights: 1 inside, a linear ramp over ``overlap`` px at the edges (never 0)."""
    ramp = np.ones(chip, np.float32)
    if overlap > 0:
        edge = (np.arange(overlap, dtype=np.float32) + 1) / (overlap + 1)
        ramp[:overlap] = edge
        ramp[chip - overlap:] = edge[::-1]
    return np.outer(ramp, ramp)


def _open_inputs(inputs: dict[str, str | Path], contract: InputContract) -> tuple[dict[str, Any], Any]:
    missing = [m for m in contract.modalities if m not in inputs]
    extra = sorted(set(inputs) - set(contract.modalities))
    if missing or extra:
        raise ValueError(f"this model takes modalities {contract.modalities} (--input MODALITY=PATH for each); "
                         + (f"missing: {missing}" if missing else "") + ("; " if missing and extra else "")
                         + (f"not used by it: {extra}" if extra else ""))
    srcs: dict[str, Any] = {}
    try:
        for m in contract.modalities:
            path = Path(inputs[m])
            if not path.is_file():
                raise FileNotFoundError(f"{path}: file not found ({m} input)")
            try:
                srcs[m] = src = rasterio.open(path)
            except rasterio.errors.RasterioIOError as exc:
                raise ValueError(f"{path}: cannot read raster: {exc}") from exc
            if src.crs is None:
                raise ValueError(f"{path}: raster has no CRS")
            if src.count != len(contract.bands[m]):
                raise ValueError(f"{path}: {m} needs {len(contract.bands[m])} bands {contract.bands[m]}, "
                                 f"found {src.count}")
            check_header(src, path, None, m, contract.bands[m], None)  # data types (no complex); any size
    except BaseException:
        for s in srcs.values():
            s.close()
        raise
    ref = min(srcs.values(), key=lambda s: round(_grid(s).pixel_size_m(), 6))  # metres, whatever the CRS units
    return srcs, ref


def predict_scene(model: Any, inputs: dict[str, str | Path], out: str | Path, batch_size: int = 16,
                  overlap: int = 16, output: str = "labels",
                  progress: Callable[[int, int], None] | None = None, force: bool = False,
                  s2_offset: str = "auto", s1_scale: str = "auto") -> dict[str, Any]:
    """Map whole scenes with a task model; write a georeferenced COG.

    Args:
        model: a :class:`~mapex_core.model.heads.TaskModel` (eval mode is set here).
        inputs: modality -> scene file (any CRS; each is warped onto the finest one's grid).
        out: output GeoTIFF (Cloud Optimized, tagged ``MAPEX_PRODUCT=mapex predict``); written
            atomically. An existing file there is replaced only when it is such a map.
        overlap: pixels shared by neighbouring windows (blended).
        output: ``labels`` (one band of class ids, uint8; argmax of the blended probabilities;
            nodata :data:`LABEL_NODATA`) or ``probabilities`` (one float32 band per class; nodata
            NaN). Nodata wherever an input pixel is nodata.
        progress: callback ``(windows done, windows total)``.
        force: replace any file at ``out``.
        s2_offset: ``auto`` (detect the processing baseline), ``none`` or DN to remove (``--s2-offset``).
        s1_scale: ``auto`` (detect linear power), ``db`` or ``linear`` (``--s1-scale``).

    Returns:
        Summary: size, windows, classes, output path, ``nodata`` (the value), ``nodata_pixels`` and
        ``radiometry`` (per modality: action, source, detail).

    Raises:
        OutputConflict: ``out`` is a folder, or a file of another kind without ``force`` (checked
            before any reading).
        ValueError: a bad ``output`` or ``overlap``, more than 255 classes for a label map, or
            unusable inputs (named).
    """
    if output not in ("labels", "probabilities"):
        raise ValueError(f"output must be 'labels' or 'probabilities', got {output!r}")
    options = RadiometryOptions(s2_offset, s1_scale)
    check_out_file(out, force)
    # GDAL's block cache would otherwise grow with the scene up to 5% of the machine's RAM
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        return _predict_scene(model, inputs, Path(out), batch_size, overlap, output, progress, force, options)


def _predict_scene(model: Any, inputs: dict[str, str | Path], out: Path, batch_size: int, overlap: int,
                   output: str, progress: Callable[[int, int], None] | None, force: bool,
                   options: RadiometryOptions) -> dict[str, Any]:
    contract = InputContract.of(model)
    chip = contract.chip_size
    if not 0 <= overlap < chip // 2:
        raise ValueError(f"overlap must be in [0, {chip // 2}) for {chip} px chips, got {overlap}")
    if output == "labels" and len(contract.classes) > LABEL_NODATA:
        raise ValueError(f"a label map holds class ids 0 .. {LABEL_NODATA - 1} ({LABEL_NODATA} is nodata); this model "
                         f"has {len(contract.classes)} classes: use --output probabilities")
    srcs, ref = _open_inputs(inputs, contract)
    readers: dict[str, Any] = {}
    try:
        decisions = {m: _decide(m, s, Path(inputs[m]), options) for m, s in srcs.items()}
        readers = _lazy_readers(srcs, ref, inputs)
        summary = _map_scene(model, contract, readers, ref, out, batch_size, overlap, output, progress, force,
                             decisions)
        return {**summary, "radiometry": {m: d.to_dict() for m, d in decisions.items()}}
    finally:
        for da in readers.values():
            da.close()
        for s in srcs.values():
            s.close()


def _grid(src: Any) -> Grid:
    return Grid(src.crs.to_wkt(), tuple(src.transform)[:6], (src.height, src.width))


def _decide(modality: str, src: Any, path: Path, options: RadiometryOptions) -> Decision:
    """The radiometric decision for one input: its metadata and name, and (Sentinel-1 without a unit)
    the values of a nearest-neighbour read decimated to at most :data:`SAMPLE_PIXELS` pixels."""
    values = None
    if radiometry.needs_values(modality, options):
        step = max(1, int(np.ceil(np.sqrt(src.height * src.width / SAMPLE_PIXELS))))
        shape = (src.count, max(1, src.height // step), max(1, src.width // step))
        values = src.read(out_shape=shape, resampling=Resampling.nearest, masked=True)  # (C, h', w')
        values = values.astype(np.float32).filled(np.nan)
    return radiometry.decide(modality, [path], [FileMeta.of_dataset(src)], values=values, options=options)


def _lazy_readers(srcs: dict[str, Any], ref: Any, inputs: dict[str, str | Path]) -> dict[str, Any]:
    """Lazy rioxarray arrays of every modality on the output grid (through a ``WarpedVRT`` where a
    modality is on another grid): indexing one row strip reads and warps only that strip."""
    grid = _grid(ref)
    readers = {}
    for m, s in srcs.items():
        if s.crs == ref.crs and grid.matches(Grid(grid.crs, tuple(s.transform)[:6], (s.height, s.width))):
            da = rioxarray.open_rasterio(s, masked=True, cache=False, parse_coordinates=False)
        else:  # rioxarray reopens the file and builds its own VRT from this one's parameters
            with WarpedVRT(s, crs=ref.crs, transform=ref.transform, width=ref.width, height=ref.height,
                           resampling=Resampling.bilinear, src_nodata=s.nodata, nodata=np.nan,
                           dtype="float32") as vrt:
                da = rioxarray.open_rasterio(vrt, masked=True, cache=False, parse_coordinates=False)
        if not isinstance(da, xr.DataArray):
            raise ValueError(f"{inputs[m]}: holds several sub-datasets; expected one raster ({m} input)")
        readers[m] = da
    return readers


def _temporary_geotiff(path: Path, profile: dict[str, Any]) -> Any:
    """Open the temporary tiled GeoTIFF for writing: fast ZSTD, or DEFLATE level 1 where GDAL lacks ZSTD
    (the COG copy compresses the result properly either way)."""
    try:
        return rasterio.open(path, "w", **profile, compress="zstd", zstd_level=1)
    except rasterio.errors.RasterioIOError:
        return rasterio.open(path, "w", **profile, compress="deflate", zlevel=1)


def _map_scene(model: Any, contract: InputContract, readers: dict[str, Any], ref: Any, out: Path, batch_size: int,
               overlap: int, output: str, progress: Callable[[int, int], None] | None,
               force: bool, decisions: dict[str, Decision]) -> dict[str, Any]:
    chip = contract.chip_size
    height, width = ref.height, ref.width
    stride = chip - overlap
    rows, cols = window_offsets(height, chip, stride), window_offsets(width, chip, stride)
    n_classes = len(contract.classes)
    weights = blend_weights(chip, overlap)
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = output == "labels"
    profile = {"driver": "GTiff", "height": height, "width": width, "crs": ref.crs, "transform": ref.transform,
               "count": 1 if labels else n_classes, "dtype": "uint8" if labels else "float32",
               "nodata": LABEL_NODATA if labels else np.nan,
               "tiled": True, "blockxsize": 256, "blockysize": 256, "BIGTIFF": "IF_SAFER"}
    total, done, nodata_pixels = len(rows) * len(cols), 0, 0
    with staged_folder(out) as tmp:  # a hidden sibling, deleted on success and on error
        tmp_tif = tmp / "scene.tif"
        with _temporary_geotiff(tmp_tif, profile) as dst:
            dst.update_tags(**TAG)
            _describe_bands(dst, contract.classes, labels)
            # the rows [acc_top, acc_top + chip) of the output, still receiving window predictions
            acc = np.zeros((n_classes, chip, width), np.float32)
            wsum = np.zeros((chip, width), np.float32)
            valid = np.ones((chip, width), bool)  # the same rows: no input is nodata there
            acc_top = 0
            for r in rows:
                shift = r - acc_top  # rows above r see no later window: final, write them and slide
                if shift > 0:
                    nodata_pixels += _write_rows(dst, acc[:, :shift], wsum[:shift], valid[:shift], acc_top, output)
                    acc[:, :chip - shift] = acc[:, shift:].copy()  # slide in place, no new buffers
                    acc[:, chip - shift:] = 0.0
                    wsum[:chip - shift] = wsum[shift:].copy()
                    wsum[chip - shift:] = 0.0
                    acc_top = r
                # modality -> (C, chip, W), normalised; where no input is nodata: (chip, W)
                strip, strip_valid = _read_strip(contract, readers, r, chip, width, decisions)
                valid[:] = strip_valid  # the strip's rows [r, r + chip) are the buffer's (acc_top == r)
                for start in range(0, len(cols), batch_size):
                    batch_cols = cols[start:start + batch_size]
                    probs = _predict_windows(model, contract, strip, batch_cols, chip)  # (n, K, chip, chip)
                    if probs.flags.writeable:
                        probs *= weights  # in place: no new buffer per window
                    else:  # classification: a read-only broadcast view
                        probs = probs * weights
                    for c, p in zip(batch_cols, probs, strict=True):
                        acc[:, :, c:c + chip] += p
                        wsum[:, c:c + chip] += weights
                    done += len(batch_cols)
                    if progress is not None:
                        progress(done, total)
            rest = height - acc_top
            nodata_pixels += _write_rows(dst, acc[:, :rest], wsum[:rest], valid[:rest], acc_top, output)
        check_out_file(out, force)  # again: something may have appeared meanwhile
        atomic_write(out, lambda cog: rasterio.shutil.copy(tmp_tif, cog, driver="COG", compress="DEFLATE",
                                                           resampling=OVERVIEW_RESAMPLING[output]))
    return {"out": str(out), "height": height, "width": width, "crs": str(ref.crs), "windows": total,
            "overlap": overlap, "output": output, "classes": contract.classes,
            "nodata": LABEL_NODATA if labels else "nan", "nodata_pixels": nodata_pixels}


def _describe_bands(dst: Any, classes: list[str], labels: bool) -> None:
    """Class names in the band metadata; a label map's colour table."""
    if labels:
        dst.set_band_description(1, "class id")
        dst.update_tags(1, **{f"CLASS_{i}": c for i, c in enumerate(classes)})
        dst.write_colormap(1, class_colors(len(classes)))
    else:
        for i, c in enumerate(classes):
            dst.set_band_description(i + 1, c)
            dst.update_tags(i + 1, CLASS_ID=str(i), CLASS_NAME=c)


def _write_rows(dst: Any, acc: np.ndarray, wsum: np.ndarray, valid: np.ndarray, top: int, output: str) -> int:
    """Write the final rows ``[top, top + n)`` (``acc``: ``(K, n, W)``); returns their nodata pixel count."""
    if acc.shape[1] == 0:
        return 0
    probs = acc / np.maximum(wsum, 1e-12)[None]  # (K, n, W)
    window = Window(0, top, acc.shape[2], acc.shape[1])
    if output == "labels":
        ids = probs.argmax(0).astype(np.uint8)  # (n, W)
        ids[~valid] = LABEL_NODATA
        dst.write(ids[None], window=window)
    else:
        probs[:, ~valid] = np.nan
        dst.write(probs.astype(np.float32, copy=False), window=window)
    return int(valid.size - np.count_nonzero(valid))


def _read_strip(contract: InputContract, readers: dict[str, Any], row: int, chip: int,
                width: int, decisions: dict[str, Decision]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The rows ``[row, row + chip)`` of every modality on the output grid, harmonised (``decisions``),
    normalised, NaN -> 0 (one read each), and where no band of any modality is nodata there:
    ``(chip, W)`` bool."""
    arrays = {}
    valid = np.ones((chip, width), bool)  # windows never pass the scene's last row: row + chip <= height
    for m, da in readers.items():
        a = np.asarray(da[:, row:row + chip, :width].values, dtype=np.float32)  # (C, chip, W), nodata as NaN
        nodata = MODALITIES[m].nodata
        if nodata is not None and not np.isnan(nodata):
            a[a == nodata] = np.nan
        radiometry.apply(decisions[m], a, contract.bands[m])  # offset removed / dB; non-positive power: NaN
        valid &= ~np.isnan(a).any(0)  # (chip, W)
        arrays[m] = a
    return {m: np.nan_to_num(a, nan=0.0) for m, a in contract.normalize(arrays).items()}, valid


def _predict_windows(model: Any, contract: InputContract, strip: dict[str, np.ndarray], cols: list[int],
                     chip: int) -> np.ndarray:
    """Class probabilities ``(n, K, chip, chip)`` of the windows at ``cols`` of a row strip."""
    batch = {m: torch.from_numpy(np.stack([a[:, :, c:c + chip] for c in cols])) for m, a in strip.items()}
    with torch.inference_mode():
        logits = model(batch).float()
    probs = model.spec.probabilities(logits).numpy()
    if probs.ndim == 2:  # classification: the window's class probabilities cover the whole window
        probs = np.broadcast_to(probs[:, :, None, None], (*probs.shape, chip, chip))
    return probs
