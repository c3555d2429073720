"""A throwaway MAPEX project for orchestration tests: git + DVC repo, the repo's dvc.yaml, a tiny params.yaml
and the real BigEarthNet sample pairs (copied from ../shared/data into the temp folder, not the repo)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_APP = {
    "task": "multilabel", "metric": "map_macro", "chips": "data/chips/bigearthnet.zarr",
    "finetune": {"steps": 6, "batch_size": 4, "eval_every": 3, "bootstrap": 20, "latency_runs": 2,
                 "head_channels": 8},
    "prune": {"calibration_batches": 2, "batch_size": 4},
}
TINY_PARAMS: dict[str, Any] = {
    "data": {"chip_size": 64, "stride": 56, "seed": 0},
    "validation": {"max_nodata": 0.5, "max_failed_share": 0.1},
    "datasets": {"bigearthnet": {"source": "data/raw/bigearthnet", "out": "data/chips/bigearthnet.zarr"}},
    "pipeline": {"pretrain_datasets": ["bigearthnet"], "apps": ["landcover-s2", "landcover-s1"], "device": "cpu",
                 "nproc": 1, "schedule": "0 3 * * 1", "timezone": "UTC"},
    "model": {"modalities": ["s1", "s2"], "img_size": 64, "patch_size": 16, "dim": 32, "depth": 2, "heads": 2,
              "moe_every": 2, "experts_per_modality": 2, "top_k": 1, "decoder_dim": 32, "decoder_depth": 1,
              "decoder_heads": 2},
    "pretrain": {"steps": 6, "batch_size": 4, "log_every": 2, "ckpt_every": 3, "stats_batches": 2},
    "applications": {"landcover-s2": {**copy.deepcopy(TINY_APP), "modalities": ["s2"]},
                     "landcover-s1": {**copy.deepcopy(TINY_APP), "modalities": ["s1"]}},
}


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with the venv's bin first on PATH."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_project(root: Path, ben_root: Path, params: dict[str, Any] | None = None) -> Path:
    """Create the project in ``root``; ``data/raw`` is recorded as the ``samples`` stage's output."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ben_root, root / "data" / "raw" / "bigearthnet")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(params or TINY_PARAMS, sort_keys=False))
    (root / ".gitignore").write_text("/data/raw/\n/data/chips/\n/outputs/\n/reports/\n/mlflow/\n/.prefect/\n"
                                     "/.dvc_site_cache/\n")
    run(["git", "init", "-q"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init"], root)
    run(["dvc", "init", "-q"], root)
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")  # the shipped config: local remote
    run(["dvc", "commit", "-q", "-f", "samples"], root)
    return root


def set_params(root: Path, path: str, value: Any) -> None:
    """Set a dotted key of the project's params.yaml."""
    p = yaml.safe_load((root / "params.yaml").read_text())
    *parents, last = path.split(".")
    node = p
    for k in parents:
        node = node.setdefault(k, {})
    node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


@contextmanager
def inside(root: Path) -> Iterator[Path]:
    """``root`` as the current folder, MLflow on the project's own sqlite store (reset afterwards)."""
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield root
    mlflow.set_tracking_uri(None)
