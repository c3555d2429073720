"""Shared fixtures: the real sample data in ../shared/data, small chip stores built from it, a
throwaway Prefect API and a temporary MLflow store. Shared helpers (not fixtures) are in ``helpers.py``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mapex_core._env import apply_quiet_defaults
from tests.helpers import BEN_ROOT

apply_quiet_defaults()


@pytest.fixture(scope="session")
def ben_root() -> Path:
    """The 6 real BigEarthNet v1 S1+S2 pairs (``../shared/data``)."""
    if not BEN_ROOT.is_dir():
        pytest.fail(f"real sample data not found at {BEN_ROOT} (set MAPEX_SHARED_DATA)")
    return BEN_ROOT


@pytest.fixture(scope="session")
def ben_store(ben_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chip store of the real BigEarthNet sample: 64 px chips, stride 56 (4 chips per patch)."""
    from mapex_core.data.ingest import ingest

    root = tmp_path_factory.mktemp("chips")
    out = root / "ben.zarr"
    ingest(ben_root, out, layout="bigearthnet", reports_dir=root / "reports", chip_size=64, stride=56, seed=0)
    return out


@pytest.fixture(scope="session")
def shared_flood_store(ben_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chip store of the real Sen1Floods11 chip: 64 px chips, 128 px split blocks."""
    from mapex_core.data.ingest import ingest

    root = tmp_path_factory.mktemp("flood_chips")
    out = root / "flood.zarr"
    ingest(ben_root.parent / "sen1floods11_sample", out, reports_dir=root / "reports", chip_size=64, split_block=128)
    return out


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """A throwaway Prefect API (sqlite) and result store for the session (~15 s to start)."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect_results")
    with prefect_test_harness(server_startup_timeout=90), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        yield


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A temporary MLflow store: ``tmp_path`` as the current folder, tracking on its own sqlite file."""
    import mlflow

    from mapex_core import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.configure()
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    yield tmp_path
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """The team's servers (`mapex cluster up`) on free loopback ports in a temporary folder, for one test module."""
    from flows import cluster as servers

    try:
        servers.pg_bindir(), servers.weed()
    except servers.ClusterError as exc:
        pytest.fail(f"{exc} (the cluster test needs `make cluster-deps`)")
    from tests.cluster_support import Cluster, mapex

    c = Cluster(tmp_path_factory.mktemp("team"))
    c.base |= {k: "0" for k in servers.PORT_ENV.values()}  # any free ports: never a developer's running cluster
    t0 = time.monotonic()
    c.cli("up")
    c.first_up_s = time.monotonic() - t0
    try:
        yield c
    finally:
        down = mapex(["cluster", "down", "--clean", "--dir", str(c.dir)], c.root, c.base)
        assert down.returncode == 0, f"mapex cluster down --clean: {down.stderr[-3000:]}"
