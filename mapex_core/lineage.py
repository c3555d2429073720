"""Lineage: the git commit and the DVC hashes of data and stage outputs.

DVC is the record of what produced what: ``stage_key`` hashes a ``dvc.yaml`` stage's command,
dependencies (DVC content hashes, computed by DVC with its own state cache) and params, which is
what the flows key their task cache on; ``stage_changed`` is ``dvc status`` for one stage;
``run_stage`` runs the stage's command; ``commit_stage`` records the outputs in ``dvc.lock``, so
``dvc repro`` afterwards finds the pipeline up to date. Operations wait while another process
holds DVC's repo lock.

Across machines (workers that share no folder, :mod:`flows.exchange`): ``lock_entry`` /
``merge_lock_entries`` carry a stage's ``dvc.lock`` record from the machine that ran it to another,
``producers`` names the stages whose outputs a stage reads, and ``pull_outputs`` / ``push_outputs``
move outputs through the DVC remote.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# one DVC operation at a time per process (DVC's repo lock guards against other processes)
_DVC_LOCK = threading.Lock()
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding this mapex_core (a checkout: pyproject.toml)


def git_sha(root: str | Path = ".") -> str:
    """The commit of the working tree at ``root`` (``+dirty`` when it has uncommitted changes), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


@contextmanager
def _repo(root: str | Path = "."):  # noqa: ANN202 - dvc Repo
    import logging

    from dvc.repo import Repo

    logging.getLogger("dvc").setLevel(logging.WARNING)  # no "Updating lock file" line per stage
    with _DVC_LOCK:
        repo = Repo(str(root))
        try:
            yield repo
        finally:
            repo.close()


def _stage(repo: Any, name: str) -> Any:
    from dvc.exceptions import DvcException

    try:
        stages = repo.stage.collect(name)
    except DvcException as exc:
        raise ValueError(f"dvc.yaml has no stage {name!r}: {exc}") from exc
    if len(stages) != 1:
        raise ValueError(f"dvc.yaml: {name!r} names {len(stages)} stages, expected one")
    return stages[0]


def stage_inputs(name: str, root: str | Path = ".") -> dict[str, Any]:
    """The command, dependency hashes and params values of DVC stage ``name`` as they are now."""
    with _repo(root) as repo:
        stage = _stage(repo, name)
        deps: dict[str, Any] = {}
        for dep in stage.deps:
            if hasattr(dep, "read_params"):
                deps[f"params:{dep.def_path}"] = dep.read_params()
            elif not dep.exists:
                deps[str(dep.def_path)] = None  # not made yet (its stage runs first)
            else:
                h = dep.get_hash()
                deps[str(dep.def_path)] = h.value if h else None
        return {"stage": name, "cmd": stage.cmd, "deps": deps}


def stage_key(name: str, root: str | Path = ".") -> str:
    """A hash of stage ``name``'s command, dependency content hashes and params.

    Equal keys mean DVC would consider the stage's inputs unchanged.
    """
    inputs = stage_inputs(name, root)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _retry_locked(fn: Callable[[], Any], timeout: float = 300.0) -> Any:
    """Call ``fn``, waiting while another process holds DVC's repo lock (``LockError``)."""
    from dvc.lock import LockError

    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            return fn()
        except LockError:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def stage_changed(name: str, root: str | Path = ".") -> bool:
    """Whether ``dvc status`` reports stage ``name`` (never recorded, changed dependencies or params,
    outputs missing or different from ``dvc.lock``)."""
    def status() -> dict[str, Any]:
        with _repo(root) as repo:
            stage = _stage(repo, name)
            with repo.lock:
                return stage.status()

    return bool(_retry_locked(status))


class StageFailed(RuntimeError):
    """A stage's command exited non-zero; ``transient`` when it exited 75 (EX_TEMPFAIL: retrying may help)."""

    def __init__(self, stage: str, cmd: str, returncode: int, tail: str) -> None:
        super().__init__(f"stage {stage} failed (exit {returncode}): {cmd}\n{tail}")
        self.stage, self.returncode = stage, returncode
        self.transient = returncode == 75


def run_stage(name: str, root: str | Path = ".", log: Callable[[str], None] | None = None,
              env: dict[str, str] | None = None) -> str:
    """Run DVC stage ``name``'s command (a ``mapex`` command) in ``root``, as ``dvc repro`` would.

    The command runs in its own process (its own RNG, memory and GPU context), with this
    interpreter's ``bin`` folder first on ``PATH``. It is split like a shell would split it but run
    without a shell: ``dvc.yaml`` commands here are single ``mapex`` calls (no ``&&`` or pipes).

    Args:
        env: extra environment of the command: its progress file and CPU threads
            (:meth:`mapex_core.progress.StageBoard.start`; two 2-thread torch processes on 2 cores
            run 2.5x slower than two 1-thread ones, see BENCHMARKS.md).

    Returns:
        The command's standard output.

    Raises:
        StageFailed: non-zero exit, with the end of its standard error.
    """
    with _repo(root) as repo:
        cmd = _stage(repo, name).cmd
    full_env = dict(os.environ) | (env or {})
    full_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # the stage runs the same mapex_core as this process (on a worker: the deployed commit's clone); an
    # installed package (site-packages) is found anyway and must not be put ahead of the standard library
    if (PACKAGE_ROOT / "pyproject.toml").is_file():
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)
    if log is not None:
        log(f"{name}: {cmd}")
    proc = subprocess.run(shlex.split(cmd), cwd=root, env=full_env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise StageFailed(name, cmd, proc.returncode, "\n".join(proc.stderr.strip().splitlines()[-15:]))
    return proc.stdout


def commit_stage(name: str, root: str | Path = ".") -> dict[str, str]:
    """Record stage ``name``'s current dependencies and outputs in ``dvc.lock`` (``dvc commit``).

    Returns:
        The DVC hash of each output.
    """
    def commit() -> dict[str, str]:
        with _repo(root) as repo:
            repo.commit(name, force=True)
            stage = _stage(repo, name)
            return {str(o.def_path): (o.hash_info.value if o.hash_info else "") for o in stage.outs}

    return _retry_locked(commit)


def output_hash(path: str | Path, root: str | Path = ".") -> str | None:
    """The DVC hash recorded in ``dvc.lock`` for output ``path`` (e.g. a chip store), or ``None``."""
    import yaml

    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return None
    want = Path(path).as_posix().rstrip("/")
    data = yaml.safe_load(lock.read_text()) or {}
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if Path(out.get("path", "")).as_posix().rstrip("/") == want:
                return out.get("md5")
    return None


# ----- outputs across machines -------------------------------------------------------------------


def _read_lock(root: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(root) / "dvc.lock"
    if not path.is_file():
        return {"schema": "2.0", "stages": {}}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    data.setdefault("stages", {})
    return data


def lock_entry(name: str, root: str | Path = ".") -> dict[str, Any] | None:
    """Stage ``name``'s record in ``dvc.lock`` (command, dependency and output hashes), or ``None``."""
    return _read_lock(root)["stages"].get(name)


def merge_lock_entries(entries: dict[str, dict[str, Any]], root: str | Path = ".") -> None:
    """Write the ``dvc.lock`` records ``entries`` (stage name -> record, as :func:`lock_entry` returns them,
    made on another machine) into this project's ``dvc.lock``, keeping the other stages' records."""
    import yaml

    from mapex_core.io import atomic_write_text

    def merge() -> None:
        with _repo(root) as repo, repo.lock:
            data = _read_lock(root)
            data["stages"].update(entries)
            atomic_write_text(Path(root) / "dvc.lock", yaml.safe_dump(data, sort_keys=False))

    _retry_locked(merge)


def producers(name: str, root: str | Path = ".") -> list[str]:
    """The stages whose outputs stage ``name`` depends on (a dependency on a folder counts every stage
    writing inside it), in ``dvc.yaml`` order."""
    with _repo(root) as repo:
        deps = [Path(d.fs_path) for d in _stage(repo, name).deps if not hasattr(d, "read_params")]
        found = []
        for stage in repo.index.stages:
            outs = [Path(o.fs_path) for o in stage.outs]
            if any(o == d or d in o.parents or o in d.parents for o in outs for d in deps):
                found.append(stage.addressing)
        return found


def outputs_present(name: str, root: str | Path = ".") -> bool:
    """Whether every output of stage ``name`` exists in the workspace (not whether it is up to date)."""
    with _repo(root) as repo:
        return all(Path(o.fs_path).exists() for o in _stage(repo, name).outs)


def pull_outputs(names: list[str], root: str | Path = ".") -> None:
    """``dvc pull`` the outputs of stages ``names`` as ``dvc.lock`` records them, from the default remote."""
    from mapex_core.remote_errors import dvc_remote_errors

    def pull() -> None:  # a remote that does not answer: RemoteUnavailable naming it (transient)
        with _repo(root) as repo, dvc_remote_errors(root):
            repo.pull(targets=names)

    _retry_locked(pull)


def push_outputs(name: str, root: str | Path = ".") -> None:
    """``dvc push`` stage ``name``'s outputs (as ``dvc.lock`` records them) to the default remote."""
    from mapex_core.remote_errors import dvc_remote_errors

    def push() -> None:
        with _repo(root) as repo, dvc_remote_errors(root):
            repo.push(targets=[name])

    _retry_locked(push)
