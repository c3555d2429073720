"""The input contract of a served MAPEX task model: what a client sends and what it gets back.

A client sends, per modality the model takes, an array ``(B, C, H, W)`` of physical values in the
band order of :mod:`mapex_core.modalities` (Sentinel-2 reflectance x 1e4, Sentinel-1 backscatter
in dB); normalisation happens here, with the statistics the model was trained with. Every way a
request can be wrong gets a :class:`ContractError` that says what was expected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mapex_core.modalities import MODALITIES

MAX_CHIPS = 64  # chips per request: larger payloads are refused (use `mapex predict` for scenes)
DTYPES = ("float32", "float64", "int16", "uint16", "int32", "uint8")  # of the compact form (little-endian)


class ContractError(ValueError):
    """A request that does not fit the model's input contract."""


@dataclass(frozen=True)
class InputContract:
    """Modalities, bands, chip size, normalisation, task and classes of a task model."""

    modalities: list[str]
    bands: dict[str, list[str]]
    units: dict[str, str]
    chip_size: int
    patch_size: int
    dtype: str
    normalization: dict[str, dict[str, list[float]]]
    task: str
    classes: list[str]
    max_chips: int = MAX_CHIPS

    @classmethod
    def of(cls, model: Any) -> InputContract:
        """The contract of a :class:`~mapex_core.model.heads.TaskModel`."""
        cfg = model.encoder.config
        mods = list(model.modalities)
        return cls(modalities=mods, bands={m: MODALITIES[m].band_names for m in mods},
                   units={m: MODALITIES[m].units for m in mods}, chip_size=cfg.img_size, patch_size=cfg.patch_size,
                   dtype="float32", normalization={m: (cfg.normalization or {})[m] for m in mods
                                                   if m in (cfg.normalization or {})},
                   task=model.task, classes=list(model.class_names))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, inputs: Any) -> dict[str, np.ndarray]:
        """Check a request's inputs and return them as float32 arrays ``(B, C, H, W)``.

        Raises:
            ContractError: not a mapping, a missing or unknown modality, a wrong rank, band count
                or chip size, differing batch sizes, non-numeric values, NaN/inf, or more than
                ``max_chips`` chips.
        """
        if not isinstance(inputs, dict) or not inputs:
            raise ContractError(f"inputs must be an object modality -> array (B, C, H, W); expected modalities "
                                f"{self.modalities}")
        unknown = sorted(set(inputs) - set(self.modalities))
        missing = [m for m in self.modalities if m not in inputs]
        if unknown or missing:
            raise ContractError(f"this model takes modalities {self.modalities}; "
                                + (f"unknown: {unknown}" if unknown else "") + ("; " if unknown and missing else "")
                                + (f"missing: {missing}" if missing else ""))
        out: dict[str, np.ndarray] = {}
        batch = None
        for m in self.modalities:
            value = inputs[m]
            if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
                value = value.item()  # MLflow wraps a JSON object in a 0-d array
            if isinstance(value, dict):
                a = decode_array(m, value)
                exact = value.get("dtype", "float32") not in ("float32", "float64")  # integers are always finite
            else:
                exact = False
                try:
                    a = np.asarray(value, dtype=np.float32)
                except (TypeError, ValueError) as exc:
                    raise ContractError(f"{m}: values must be numbers in a (B, C, H, W) array ({exc})") from None
            want = (len(self.bands[m]), self.chip_size, self.chip_size)
            if a.ndim != 4 or a.shape[1:] != want:
                raise ContractError(f"{m}: expected shape (B, {want[0]}, {want[1]}, {want[2]}) with bands "
                                    f"{self.bands[m]} ({self.units[m]}), got {tuple(a.shape)}")
            if batch is not None and a.shape[0] != batch:
                raise ContractError(f"{m}: batch size {a.shape[0]} differs from the other modalities' {batch}")
            batch = a.shape[0]
            if batch == 0:
                raise ContractError(f"{m}: empty batch")
            if batch > self.max_chips:
                raise ContractError(f"payload of {batch} chips exceeds the limit of {self.max_chips} per request; "
                                    "split it, or map whole scenes with `mapex predict`")
            if not exact and not np.isfinite(a).all():
                raise ContractError(f"{m}: {int((~np.isfinite(a)).sum())} values are NaN or infinite; send "
                                    "finite physical values (fill nodata before sending)")
            out[m] = a
        return out

    def normalize(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Apply the model's per-band normalisation (what the chip store applied during training)."""
        return normalize(arrays, self.normalization)


def normalize(arrays: dict[str, np.ndarray], normalization: dict[str, dict[str, list[float]]] | None
              ) -> dict[str, np.ndarray]:
    """``(x - mean) / std`` per band of each ``(..., C, H, W)`` array whose modality has statistics; float32."""
    out = {}
    for m, a in arrays.items():
        stats = (normalization or {}).get(m)
        if stats is not None:
            a = (a - np.asarray(stats["mean"], np.float32)[:, None, None]) / np.asarray(stats["std"], np.float32)[
                :, None, None]
        out[m] = np.asarray(a, dtype=np.float32)
    return out


def decode_array(name: str, value: dict[str, Any]) -> np.ndarray:
    """The compact form of an input array: ``{"b64": base64 of the raw little-endian values,
    "shape": [B, C, H, W], "dtype": "float32"}`` (10x smaller and faster to parse than nested lists).

    Raises:
        ContractError: missing keys, an unknown dtype, invalid base64, or a size that does not match the shape.
    """
    import base64
    import binascii

    if set(value) - {"b64", "shape", "dtype"} or not {"b64", "shape"} <= set(value):
        raise ContractError(f"{name}: an array object needs 'b64' and 'shape' (and optionally 'dtype'); "
                            f"got keys {sorted(value)}")
    dtype = value.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ContractError(f"{name}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    shape = value["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ContractError(f"{name}: shape must be a list of sizes, got {shape!r}")
    try:
        raw = base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise ContractError(f"{name}: 'b64' is not valid base64 ({exc})") from None
    want = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(raw) != want:
        raise ContractError(f"{name}: {len(raw)} bytes do not fill shape {shape} of {dtype} ({want} bytes)")
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).astype(np.float32)


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """The compact form of ``a`` for a request (the inverse of :func:`decode_array`).

    Integral values that fit take the smallest integer dtype that holds them (Sentinel-2
    reflectance x 1e4 fits int16: half the bytes of float32), anything else float32. Either way
    the server decodes to float32, so the result equals sending float32.

    Raises:
        TypeError: a non-numeric or complex array.

    Example:
        ``{"inputs": {"s2": encode_array(chips)}}`` serialised with :func:`json.dumps`.
    """
    import base64

    a = np.asarray(a)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise TypeError(f"encode_array needs a real numeric array, got dtype {a.dtype}")
    dtype = "float32"
    if a.size and np.isfinite(a).all() and (a == np.round(a)).all():
        lo, hi = float(a.min()), float(a.max())
        dtype = next((d for d in ("uint8", "int16", "uint16", "int32")
                      if np.iinfo(d).min <= lo and hi <= np.iinfo(d).max), "float32")
    raw = a.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    return {"b64": base64.b64encode(raw).decode("ascii"), "shape": list(a.shape), "dtype": dtype}
