"""Chip store format details with tiny generated arrays: label types, presence, atomic writes."""

import hashlib

import numpy as np
import pytest

from mapex_core.data.chips import ChipStore, ChipWriter, PresenceBatchSampler
from mapex_core.data.raster import Grid

GRID = Grid("EPSG:32633", (10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), (16, 16))


def _s1(v=-10.0):
    return np.full((2, 16, 16), v, np.float32)


def _s2(v=1000.0):
    return np.full((12, 16, 16), v, np.float32)


def test_mask_labels_and_partial_presence(tmp_path):
    path = tmp_path / "m.zarr"
    with ChipWriter(path, ["s1", "s2"], 16, class_names=["dry", "water"], label_type="mask") as w:
        mask = np.zeros((16, 16), np.int16)
        mask[:4] = -1
        mask[8:] = 1
        w.add("a", "scene1", {"s1": _s1(), "s2": _s2()}, GRID, labels=mask)
        w.add("b", "scene1", {"s1": _s1(-12.0)}, GRID, labels=np.ones((16, 16), np.int16))
        with pytest.raises(ValueError, match=r"mask values must be in \[0, 2\) or -1"):
            w.add("c", "scene1", {"s1": _s1()}, GRID, labels=np.full((16, 16), 5, np.int16))
        with pytest.raises(ValueError, match="duplicate chip id 'a'"):
            w.add("a", "scene1", {"s1": _s1()}, GRID, labels=mask)
        with pytest.raises(ValueError, match=r"modality 's2' expected shape \(12, 16, 16\)"):
            w.add("d", "scene1", {"s2": _s2()[:3]}, GRID, labels=mask)
    store = ChipStore.open(path, normalize=False)
    assert store.label_type == "mask" and store.class_names == ["dry", "water"]
    assert store.present.tolist() == [[True, True], [True, False]]
    assert set(store[1]) == {"s1", "labels", "index"}  # absent modality is not in the item
    assert store[0]["labels"].dtype.is_floating_point is False
    assert store[0]["labels"][0, 0] == -1 and store[0]["labels"][15, 0] == 1
    assert store.metadata()["nodata_frac_s2"].tolist() == [0.0, 1.0]
    # content hash: SHA-256 of each present modality's name and float32 bytes, then the int16 mask
    want = [hashlib.sha256(b"s1" + _s1().tobytes() + b"s2" + _s2().tobytes() + mask.tobytes()).hexdigest(),
            hashlib.sha256(b"s1" + _s1(-12.0).tobytes() + np.ones((16, 16), np.int16).tobytes()).hexdigest()]
    assert store.metadata()["content_hash"].tolist() == want
    groups = store.presence_patterns()
    assert groups == {("s1", "s2"): [0], ("s1",): [1]}
    batches = PresenceBatchSampler(store, batch_size=2).batches(0)
    assert sorted(map(tuple, batches)) == [(0,), (1,)]  # never mixes presence patterns
    # s1 statistics come from both chips, s2 only from the chip that has it
    assert store.band_stats("s1")["mean"].tolist() == pytest.approx([-11.0, -11.0])
    assert store.band_stats("s2")["count"].tolist() == [256.0] * 12


def test_class_labels(tmp_path):
    path = tmp_path / "c.zarr"
    with ChipWriter(path, ["s2"], 16, class_names=["a", "b", "c"], label_type="class") as w:
        w.add("x", "s", {"s2": _s2()}, GRID, labels=np.array(2))
        with pytest.raises(ValueError, match=r"expected one class id in \[0, 3\)"):
            w.add("y", "s", {"s2": _s2()}, GRID, labels=np.array(3))
    store = ChipStore.open(path)
    assert int(store[0]["labels"]) == 2 and store.label_type == "class"


def test_failed_write_leaves_nothing_and_keeps_the_old_store(tmp_path):
    path = tmp_path / "s.zarr"
    with ChipWriter(path, ["s2"], 16) as w:
        w.add("x", "s", {"s2": _s2(5.0)}, GRID)
    with pytest.raises(RuntimeError), ChipWriter(path, ["s2"], 16, flush_every=8) as w:
        for i in range(9):  # one flush reaches the temporary store
            w.add(f"x{i}", "s", {"s2": _s2()}, GRID)
        raise RuntimeError("crash mid-ingest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    assert len(ChipStore.open(path)) == 1  # the previous store is intact
    with pytest.raises(ValueError, match="no chips were written"), ChipWriter(tmp_path / "e.zarr", ["s2"], 16):
        pass
    assert not (tmp_path / "e.zarr").exists()


def test_unknown_label_type():
    with pytest.raises(ValueError, match="unknown label_type 'boxes'"):
        ChipWriter("x.zarr", ["s2"], 16, class_names=["a"], label_type="boxes")


@pytest.mark.parametrize("label_type", ["multilabel", "class", "mask", "none"])
def test_chips_survive_flushes_of_the_reused_buffers(tmp_path, label_type):
    """20 distinct chips through buffers of 8 (three flushes, the last partial): each reads back as written."""
    rng = np.random.default_rng(0)
    classes = None if label_type == "none" else ["a", "b", "c"]
    chips, labels = [], []
    with ChipWriter(tmp_path / "f.zarr", ["s1", "s2"], 16, class_names=classes,
                    label_type=label_type if classes else "multilabel", flush_every=8) as w:
        for i in range(20):
            arrays = {"s1": rng.normal(-12, 3, (2, 16, 16)).astype(np.float32)}
            if i % 3:  # s2 absent from every third chip
                arrays["s2"] = rng.uniform(0, 5000, (12, 16, 16)).astype(np.float32)
            lab = {"multilabel": rng.integers(0, 2, 3).astype(np.uint8), "class": np.array(i % 3),
                   "mask": rng.integers(-1, 3, (16, 16)).astype(np.int16), "none": None}[label_type]
            w.add(f"c{i}", f"scene{i % 4}", arrays, GRID, labels=lab)
            chips.append(arrays)
            labels.append(lab)
    store = ChipStore.open(tmp_path / "f.zarr", normalize=False)
    assert len(store) == 20
    for i, item in enumerate(store[j] for j in range(20)):
        assert set(item) - {"labels", "index"} == set(chips[i])
        for m, a in chips[i].items():
            np.testing.assert_array_equal(item[m].numpy(), a)
        if labels[i] is not None:
            np.testing.assert_array_equal(np.asarray(item["labels"]), labels[i])
