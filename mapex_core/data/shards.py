"""Sharded chip arrays (Zarr v3 ``sharding_indexed``): written chip by chip, read chip by chip.

The image arrays of a chip store (one per modality, and a ``mask`` label array) keep one Zarr
inner chunk per chip, grouped into shards of :data:`SHARD_CHIPS` chips: one file per shard, so an
array of 500,000 chips is 123 files (with 8-chip chunks it was 62,500).

Writing: :func:`encode_chip` compresses one chip with the codec the array declares (zstd of its
little-endian bytes; ``None`` for a chip entirely at the fill value, which Zarr does not store
either). It runs where the chip is cut (a Dask worker). :class:`ShardWriter` appends the encoded
chips in order to the open shard file and writes the shard's index when it is full: no shard is
held in memory or rewritten, and resuming a store (``mapex ingest --append``) copies the chunks of
its last, partial shard unchanged. The files are byte for byte what zarr writes for the same array
(``tests/test_scale_store.py``); the arrays' ``zarr.json`` are written by xarray
(:func:`placeholder`).

Reading: :class:`ShardReader` reads a chip with one ``pread`` once its shard's index is known
(zarr-python reads and checks the index again for every chip: about 3x slower per chip, see
``bench/scale.py`` in BENCHMARKS.md). An array in another layout (a store of format version 1) is read
through xarray instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

SHARD_CHIPS = 4096  # chips per shard file: 500,000 chips -> 123 files per array
ZSTD_LEVEL = 0  # zarr's default zstd level (the library's default, 3)
_EMPTY = np.uint64(2**64 - 1)  # index entry of a chunk that is not stored


def _codec() -> Any:
    import numcodecs

    return numcodecs.Zstd(level=ZSTD_LEVEL, checksum=False)


def fill_value(dtype: np.dtype | type) -> float | int:
    """The fill value of a chip array: NaN (nodata) for floats, 0 for integer masks."""
    return float("nan") if np.dtype(dtype).kind == "f" else 0


def encode_chip(a: np.ndarray, codec: Any = None) -> bytes | None:
    """One chip ``(...)`` as its stored inner chunk (zstd of its little-endian C-order bytes), or
    ``None`` when every value is the fill value (NaN; 0 for integers): such a chunk is not stored."""
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    if (np.isnan(a).all() if a.dtype.kind == "f" else not a.any()):
        return None
    return (codec or _codec()).encode(a.tobytes())


def shard_path(array_dir: Path, k: int, ndim: int) -> Path:
    """The file of shard ``k`` of an array with ``ndim`` dimensions (zarr's default chunk key encoding)."""
    return Path(array_dir, "c", str(k), *["0"] * (ndim - 1))


def _index_bytes(index: np.ndarray) -> bytes:
    import google_crc32c

    raw = index.astype("<u8").tobytes()
    return raw + np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()


def read_index(path: Path, shard_chips: int) -> np.ndarray:
    """The ``(shard_chips, 2)`` offsets and lengths at the end of a shard file (CRC32C checked).

    Raises:
        ValueError: the index does not match its checksum (names the file).
    """
    import google_crc32c

    size = shard_chips * 16 + 4
    with open(path, "rb") as f:
        f.seek(-size, os.SEEK_END)
        raw = f.read(size)
    if len(raw) != size or google_crc32c.value(raw[:-4]) != int(np.frombuffer(raw[-4:], "<u4")[0]):
        raise ValueError(f"{path}: corrupt shard index (checksum mismatch); the chip store is damaged")
    return np.frombuffer(raw[:-4], "<u8").reshape(shard_chips, 2)  # (chip in shard, [offset, nbytes])


class ShardWriter:
    """Append encoded chips to an array's shard files, in chip order.

    Args:
        array_dir: the array's folder in the store being written.
        ndim: number of dimensions of the array (chip first).
        shard_chips: chips per shard.
        start: chips already in the array (appending); those of full shards are the caller's to
            link in, those of the last partial shard are copied from ``resume_from``.
        resume_from: the array's folder in the store being continued.
    """

    def __init__(self, array_dir: Path, ndim: int, shard_chips: int = SHARD_CHIPS, start: int = 0,
                 resume_from: Path | None = None) -> None:
        self.dir, self.ndim, self.shard_chips = Path(array_dir), ndim, shard_chips
        self.n = start - start % shard_chips
        self._file: Any = None
        self._index = np.full((shard_chips, 2), _EMPTY, np.uint64)
        self._offset = 0
        if start % shard_chips:
            if resume_from is None:
                raise ValueError(f"{array_dir}: resuming at chip {start} needs the store it continues")
            old = shard_path(Path(resume_from), start // shard_chips, ndim)
            if not old.exists():  # fill values only: no file
                for _ in range(start % shard_chips):
                    self.append(None)
                return
            index = read_index(old, shard_chips)
            with open(old, "rb") as f:
                for off, length in index[: start % shard_chips]:
                    if off == _EMPTY:
                        self.append(None)
                    else:
                        f.seek(int(off))
                        self.append(f.read(int(length)))

    def append(self, blob: bytes | None) -> None:
        """Add the next chip's encoded chunk (``None``: not stored, it reads as the fill value)."""
        i = self.n % self.shard_chips
        if blob is not None:
            if self._file is None:
                path = shard_path(self.dir, self.n // self.shard_chips, self.ndim)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(path, "xb")  # noqa: SIM115 - kept open across appends; never an existing file
            self._file.write(blob)
            self._index[i] = (self._offset, len(blob))
            self._offset += len(blob)
        self.n += 1
        if self.n % self.shard_chips == 0:
            self._finish()

    def _finish(self) -> None:
        if self._file is not None:  # a shard of fill values only has no file (as zarr writes it)
            self._file.write(_index_bytes(self._index))
            self._file.close()
        self._file, self._offset = None, 0
        self._index.fill(_EMPTY)

    def close(self) -> None:
        """Write the index of the last, partial shard."""
        self._finish()

    def abort(self) -> None:
        """Close the open shard file without finishing it (the store is being discarded)."""
        if self._file is not None:
            self._file.close()
            self._file = None


class ShardReader:
    """The chips of a sharded array, read one at a time or all at once (shard indexes cached).

    Pickles without its caches (DataLoader workers); every read opens the file (fork-safe).
    """

    def __init__(self, array_dir: Path, shape: tuple[int, ...], dtype: np.dtype | str,
                 shard_chips: int = SHARD_CHIPS) -> None:
        self.dir, self.shape, self.dtype = Path(array_dir), tuple(shape), np.dtype(dtype).newbyteorder("<")
        self.shard_chips = shard_chips
        self.fill = fill_value(self.dtype)
        self._indexes: dict[int, np.ndarray | None] = {}
        self._codec: Any = None

    @classmethod
    def open(cls, array_dir: str | Path) -> ShardReader | None:
        """A reader for an array written by :class:`ShardWriter` (its ``zarr.json`` says so), else ``None``."""
        try:
            meta = json.loads((Path(array_dir) / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        codecs = meta.get("codecs") or [{}]
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            return None
        conf = codecs[0]["configuration"]
        inner = [c["name"] for c in conf["codecs"]]
        shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
        if (inner != ["bytes", "zstd"] or conf["codecs"][0].get("configuration", {}).get("endian", "little") != "little"
                or [c["name"] for c in conf["index_codecs"]] != ["bytes", "crc32c"]
                or conf.get("index_location", "end") != "end" or conf["chunk_shape"][0] != 1
                or list(conf["chunk_shape"][1:]) != list(meta["shape"][1:]) or list(shard[1:]) != list(meta["shape"][1:])):
            return None
        return cls(Path(array_dir), tuple(meta["shape"]), meta["data_type"], shard[0])

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_indexes": {}, "_codec": None}

    def _index(self, k: int) -> np.ndarray | None:
        if k not in self._indexes:
            path = shard_path(self.dir, k, len(self.shape))
            self._indexes[k] = read_index(path, self.shard_chips) if path.exists() else None
        return self._indexes[k]

    def _decode(self, blob: bytes) -> np.ndarray:
        if self._codec is None:
            self._codec = _codec()
        out = np.empty(self.shape[1:], self.dtype)
        self._codec.decode(blob, out=out)
        return out

    def raw(self, j: int) -> bytes | None:
        """Chip ``j``'s stored chunk as it is on disk (``None``: not stored)."""
        k, i = divmod(j, self.shard_chips)
        index = self._index(k)
        if index is None or index[i, 0] == _EMPTY:
            return None
        fd = os.open(shard_path(self.dir, k, len(self.shape)), os.O_RDONLY)
        try:
            return os.pread(fd, int(index[i, 1]), int(index[i, 0]))
        finally:
            os.close(fd)

    def __getitem__(self, j: int) -> np.ndarray:
        if not 0 <= j < self.shape[0]:
            raise IndexError(f"{self.dir}: chip {j} out of range ({self.shape[0]} chips)")
        blob = self.raw(j)
        return np.full(self.shape[1:], self.fill, self.dtype) if blob is None else self._decode(blob)

    def read_all(self) -> np.ndarray:
        """Every chip, ``shape`` (one read per shard file)."""
        out = np.full(self.shape, self.fill, self.dtype)
        for k in range(0, -(-self.shape[0] // self.shard_chips)):
            index = self._index(k)
            if index is None:
                continue
            data = shard_path(self.dir, k, len(self.shape)).read_bytes()
            codec = self._codec = self._codec or _codec()
            for i in range(min(self.shard_chips, self.shape[0] - k * self.shard_chips)):
                off, length = index[i]
                if off != _EMPTY:
                    codec.decode(data[int(off): int(off + length)], out=out[k * self.shard_chips + i])
        return out


def placeholder(shape: tuple[int, ...], dtype: np.dtype | str, shard_chips: int = SHARD_CHIPS) -> Any:
    """A lazy array that makes xarray write only the ``zarr.json`` of a sharded array (``to_zarr(...,
    compute=False)``): its chunks are the shards, already written by :class:`ShardWriter`."""
    import dask.array as da

    return da.zeros(shape, dtype=dtype, chunks=(shard_chips, *shape[1:]))


def encoding(shape: tuple[int, ...], shard_chips: int = SHARD_CHIPS) -> dict[str, Any]:
    """xarray's encoding of a sharded chip array: one inner chunk per chip, ``shard_chips`` chips a shard."""
    import zarr

    return {"chunks": (1, *shape[1:]), "shards": (shard_chips, *shape[1:]),
            "compressors": [zarr.codecs.ZstdCodec(level=ZSTD_LEVEL)]}
