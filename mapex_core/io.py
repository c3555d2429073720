"""Writing files and folders so that a reader never sees half of one, and hashing them.

Files: every file the platform writes (weights, configs, reports, metrics) goes through
:func:`atomic_write`: the bytes land in a temporary sibling that is renamed over the target, so a
crash leaves the previous version or the new one, never a mix.

Folders: a command builds its output folder aside (:func:`staged_folder`) and
:func:`replace_folder` swaps it into place in one step (``renameat2(RENAME_EXCHANGE)`` on Linux;
elsewhere two renames, and the old folder is put back if the second fails), so a kill at any moment
leaves the previous folder or the new one. Where a folder cannot be swapped whole (pre-training's
folder also holds its checkpoints; ``--force`` into a folder holding other files),
:func:`merge_folder` moves the files in with a *marker* file removed first and moved in last: the
folder is complete when its marker is there; without it, readers say the marker file is missing.

What may be replaced: :func:`check_output` refuses a path holding something MAPEX did not write
(the caller's test says what it recognises: :func:`folder_problem`), unless ``force``. Temporary
entries are hidden siblings named ``.NAME.tmp-PID-RANDOM`` (``.old-`` for a folder being swapped
out): removed on success and on failure, and those of a killed process are removed
(:func:`sweep_strays`) the next time that output is written.

Crash tests: with ``MAPEX_TEST_KILL_AT=N`` in its environment, a process kills itself with SIGKILL at
its N-th step of writing outputs (a file written but not renamed, a folder about to be swapped, ...),
so tests can stop a command at every such moment.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager, suppress
from functools import cache
from pathlib import Path
from typing import Any

from mapex_core.errors import MapexError

KILL_ENV = "MAPEX_TEST_KILL_AT"
_STRAY = re.compile(r"(?:tmp|old)-(\d+)-[0-9a-f]+")
_steps = 0
_steps_lock = threading.Lock()


class OutputConflict(MapexError, ValueError):
    """An output path holds something MAPEX did not write (and ``--force`` was not given)."""


def _kill_point() -> None:
    """One step of writing outputs: the process kills itself here when ``MAPEX_TEST_KILL_AT`` says so."""
    at = os.environ.get(KILL_ENV)
    if not at:
        return
    global _steps
    with _steps_lock:
        _steps += 1
        if _steps == int(at):
            os.kill(os.getpid(), signal.SIGKILL)


def temporary_sibling(path: str | Path, tag: str = "tmp") -> Path:
    """A new hidden name next to ``path`` for its temporary (``.NAME.tmp-PID-RANDOM``) or old (``old``) version."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree (what is left of it when that fails)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


def sweep_strays(target: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``target`` (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*``) whose
    process is gone (killed while writing); those of running processes are left alone.

    Returns:
        The entries removed.
    """
    target = Path(target)
    prefix = f".{target.name}."
    try:
        entries = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for p in entries:
        m = _STRAY.fullmatch(p.name[len(prefix):])
        if m and not _alive(int(m.group(1))):
            _remove(p)
            removed.append(p)
    return removed


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
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        _kill_point()
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


# ----- folders ------------------------------------------------------------------------------------
@cache
def _renameat2() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not Linux/glibc
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the entries ``a`` and ``b`` in one step; ``False`` where the system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOENT):  # unsupported here, or b vanished
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(staging: str | Path, target: str | Path) -> Path:
    """Move the finished folder ``staging`` to ``target`` (a sibling), replacing what was there.

    Where the system can swap two entries in one step (Linux), ``target`` is at every moment the
    old entry or the new folder. Elsewhere the old entry is renamed aside first (``target`` is
    absent between the two renames, never a mix) and put back if the second rename fails. The old
    entry (a folder, or a file replaced with ``--force``) is deleted after.
    """
    staging, target = Path(staging), Path(target)
    _kill_point()
    if not (target.exists() or target.is_symlink()):
        os.replace(staging, target)
        return target
    if _exchange(staging, target):
        _kill_point()
        _remove(staging)  # now the previous target
        return target
    old = temporary_sibling(target, "old")
    os.replace(target, old)
    _kill_point()
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove(old)
    return target


def merge_folder(staging: str | Path, target: str | Path, marker: str, stale: Iterable[str] = ()) -> Path:
    """Move the files of ``staging`` into the folder ``target``, keeping its other entries.

    ``target/marker`` is removed first and moved in last, so a folder with its marker holds one
    complete set of files; ``stale`` names (files of an earlier output that this one does not
    replace) are removed while the marker is absent.
    """
    staging, target = Path(staging), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    (target / marker).unlink(missing_ok=True)
    _kill_point()
    for name in stale:
        (target / name).unlink(missing_ok=True)
    for f in sorted(staging.iterdir()):
        if f.name != marker:
            os.replace(f, target / f.name)
            _kill_point()
    if (staging / marker).exists():
        os.replace(staging / marker, target / marker)
    staging.rmdir()
    return target


@contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """A new empty folder next to ``target`` to build its content in (``.NAME.tmp-PID-RANDOM``).

    Temporaries of killed earlier writers of ``target`` are swept first. The block moves the folder
    into place (:func:`replace_folder`, :func:`merge_folder`); whatever is left of it when the block
    ends, on success or error, is deleted.
    """
    target = Path(target)
    sweep_strays(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_sibling(target)
    staging.mkdir()
    try:
        yield staging
    finally:
        if staging.exists() or staging.is_symlink():
            _remove(staging)


# ----- what an output path may hold ---------------------------------------------------------------
def check_output(path: str | Path, problem: Callable[[Path], str | None], force: bool = False,
                 hint: str = "pass --force to replace it") -> str | None:
    """Whether a command may write ``path``: absent, or holding only what MAPEX wrote there.

    Args:
        path: the output (a file or folder).
        problem: says what at an existing ``path`` MAPEX did not write, or ``None`` when it
            recognises it as its own (e.g. :func:`folder_problem`).
        force: accept anything at ``path``.
        hint: the end of the error message (what ``--force`` does for this command).

    Returns:
        The problem (with ``force``), or ``None``.

    Raises:
        OutputConflict: ``path`` holds something else and ``force`` is not given (names ``path``).
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return None
    found = problem(path)
    if found and not force:
        raise OutputConflict(f"{path}: {found}; {hint}")
    return found


def folder_problem(path: str | Path, what: str, names: Collection[str],
                   check: Callable[[Path], str | None] | None = None) -> str | None:
    """What makes ``path`` something other than a folder MAPEX wrote (``None``: nothing).

    Args:
        what: the kind of folder, for the message (``"a model folder"``).
        names: the entries MAPEX writes in such a folder; hidden temporaries of them are ignored.
        check: further test of a folder with only those names (e.g. its ``config.json`` is MAPEX's).
    """
    path = Path(path)
    if not path.is_dir():
        return f"is a file, not {what}"
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        return f"cannot be listed ({exc.strerror})"
    others = [n for n in entries if n not in names and not any(
        n.startswith(f".{k}.") and _STRAY.fullmatch(n[len(k) + 2:]) for k in names)]
    if others:
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        return f"is a folder that is not {what} (it holds {', '.join(others[:5])}{more})"
    return check(path) if check is not None else None


def check_output_file(path: str | Path, what: str, ours: Callable[[Path], bool], force: bool = False) -> None:
    """Whether a command may write the file ``path``: absent, or a file ``ours`` recognises (any
    file with ``force``); a folder there is always an error.

    Raises:
        OutputConflict: names ``path`` and what it holds.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputConflict(f"{path}: is a folder, not {what}; name a file")
    check_output(path, lambda p: None if ours(p) else f"exists and is not {what}", force)


def json_with_keys(path: str | Path, keys: Collection[str]) -> bool:
    """Whether ``path`` is a JSON object with (at least) ``keys``: how MAPEX recognises its own reports."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and set(keys) <= set(data)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (the weights' identity in the registry and exports)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
