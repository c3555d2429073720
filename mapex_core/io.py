"""Writing files so that a reader never sees half of one, and hashing them.

Every file the platform writes (weights, configs, reports, metrics) goes through
:func:`atomic_write_bytes`: the bytes land in a temporary sibling that is renamed over the target,
so a crash leaves the previous version or the new one, never a mix. The temporary name carries the
process id, so two processes writing the same file do not trample each other's temporary.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let ``write(tmp)`` create a temporary sibling of ``path``, then rename it over ``path``.

    Args:
        path: the file to (re)place; its folder is created.
        write: writes the whole content to the path it is given (e.g. ``safetensors.save_file``).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2, newline: bool = False) -> Path:
    """Replace ``path`` with ``data`` as JSON atomically (``default=str`` for paths and the like)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str) + ("\n" if newline else ""))


def replace_folder(staging: str | Path, target: str | Path) -> Path:
    """Move the finished folder ``staging`` to ``target`` (a sibling), replacing what was there.

    The previous ``target`` is renamed aside first and deleted after, so at every moment ``target``
    is the old folder, the new one, or (between the two renames) absent: never a mix of both.
    """
    staging, target = Path(staging), Path(target)
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return target


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (the weights' identity in the registry and exports)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
