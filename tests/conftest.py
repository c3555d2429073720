"""Shared fixtures: the real sample data in ../shared/data and small chip stores built from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mapex_core._env import apply_quiet_defaults

apply_quiet_defaults()

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MAPEX_SHARED_DATA", ROOT.parent / "shared" / "data"))
BEN_ROOT = SHARED_DATA / "bigearthnet_mm_example"


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
