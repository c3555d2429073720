"""Data-parallel pre-training: step layout across ranks, and real 2-process runs through torchrun."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mapex_core.data.chips import PresenceBatchSampler
from mapex_core.model import MapexConfig, MapexModel, load_model
from mapex_core.training.distributed import epoch_steps, state_hash
from mapex_core.training.pretrain import PretrainParams, pretrain

TINY = dict(modalities=["s1", "s2", "s2l1c"], img_size=64, patch_size=8, dim=32, depth=2, heads=2,
            moe_every=1, experts_per_modality=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)
STEPS, BATCH, NPROC = 6, 4, 2


class _Groups:
    """A stand-in store: only what PresenceBatchSampler reads."""

    def __init__(self, sizes):
        self.patterns, start = {}, 0
        for k, n in enumerate(sizes):
            self.patterns[(f"g{k}",)] = list(range(start, start + n))
            start += n

    def presence_patterns(self):
        return self.patterns


@pytest.mark.parametrize("world", [2, 3])
def test_each_step_gives_every_rank_a_batch_of_one_presence_group(world):
    store = _Groups([10, 3, 7, 1, 16])
    sampler = PresenceBatchSampler(store, batch_size=2, seed=5)
    group_of = {i: g for g, idx in enumerate(sampler.groups) for i in idx}
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert epoch_steps(sampler, epoch, 1) == [[b] for b in batches]  # one process: unchanged
        steps = epoch_steps(sampler, epoch, world)
        assert steps == epoch_steps(sampler, epoch, world)  # seeded: every rank computes the same
        assert all(len(s) == world for s in steps)
        for s in steps:  # all ranks of a step see the same modalities
            assert len({group_of[i] for b in s for i in b}) == 1
        used = [b for s in steps for b in s]
        assert all(b in used for b in batches)  # nothing dropped ...
        # ... and each batch used once, except the padding of a group's last step
        per_group = {g: sum(group_of[b[0]] == g for b in batches) for g in range(len(sampler.groups))}
        assert len(used) == sum(-(-n // world) * world for n in per_group.values())
        # a step takes its group's next batches in the sampler's order, then any padding
        order = {tuple(b): k for k, b in enumerate(batches)}
        done: set[tuple[int, ...]] = set()
        for s in steps:
            keys = [tuple(b) for b in s]
            fresh = list(dict.fromkeys(k for k in keys if k not in done))
            assert keys[: len(fresh)] == fresh and [order[k] for k in fresh] == sorted(order[k] for k in fresh)
            done.update(keys)


def _mapex(*args, cwd, **env):
    full = dict(os.environ, PYTHONUNBUFFERED="1", **env)
    full.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "mapex_core.cli", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=300)


def _ddp_pretrain(tmp_path, ben_store, flood_store, *extra):
    return _mapex("pretrain", "--chips", str(ben_store), "--chips", str(flood_store), "--out", "out",
                  "--steps", str(STEPS), "--params", "params.yaml", "--device", "cpu", "--quiet",
                  "--nproc", str(NPROC), *extra, cwd=tmp_path, MAPEX_DDP_DEBUG_HASH="1")


@pytest.fixture(scope="module")
def ddp_run(ben_store, shared_flood_store, tmp_path_factory):
    """One 2-process run on two stores (two presence groups) with modality dropout."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "params.yaml").write_text(
        "model:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in TINY.items())
        + f"pretrain:\n  batch_size: {BATCH}\n  log_every: 2\n  ckpt_every: 2\n  warmup_steps: 2\n"
        "  modality_dropout: 0.5\n  stats_batches: 2\n  splits: [train, val, test]\n"
    )
    res = _ddp_pretrain(root, ben_store, shared_flood_store)
    assert res.returncode == 0, res.stderr[-4000:]
    return root, res


@pytest.mark.slow
def test_two_processes_keep_identical_replicas_and_count_global_samples(ddp_run):
    root, res = ddp_run
    out = root / "out"
    hashes = [(out / f"rank{r}.sha256").read_text().strip() for r in range(NPROC)]
    assert hashes[0] == hashes[1]
    assert state_hash(load_model(out)) == hashes[0]  # the saved model is the replicas' weights
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples_seen"] == STEPS * BATCH * NPROC
    assert metrics["world_size"] == NPROC and metrics["steps"] == [2, 4, 6]
    assert set(metrics["specialisation"]) == {"s1", "s2", "s2l1c"}
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,recon_loss,aux_loss,lr" and len(rows) == 4
    assert [float(r.split(",")[1]) for r in rows[1:]] == pytest.approx(metrics["loss"])
    assert json.loads(res.stdout)["outputs"]["loss.csv"] == "out/loss.csv"  # rank 0 alone prints
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000004", "step_0000006"]
    assert not list(out.glob("*.tmp")) and not list((out / "checkpoints").glob(".tmp*"))


@pytest.mark.slow
def test_two_process_resume_reproduces_the_run_and_other_counts_are_refused(ddp_run, ben_store,
                                                                            shared_flood_store, tmp_path):
    root, _ = ddp_run
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(root / "out", tmp_path / "out")
    out = tmp_path / "out"
    full_hash = (out / "rank0.sha256").read_text()
    full_loss = json.loads((out / "metrics.json").read_text())["loss"]
    shutil.rmtree(out / "checkpoints" / "step_0000006")  # as if it had stopped after step 5
    (out / "checkpoints" / "latest").write_text("step_0000004\n")
    for name in ("rank0.sha256", "rank1.sha256", "metrics.json", "model.safetensors"):
        (out / name).unlink()

    cfg = MapexConfig(**TINY)
    p = PretrainParams(steps=STEPS, batch_size=BATCH, splits=("train", "val", "test"))
    with pytest.raises(ValueError, match="written by a run of 2 process"):
        pretrain([ben_store, shared_flood_store], out, cfg, p, device="cpu", resume=True)

    res = _ddp_pretrain(tmp_path, ben_store, shared_flood_store, "--resume")
    assert res.returncode == 0, res.stderr[-4000:]
    assert (out / "rank0.sha256").read_text() == (out / "rank1.sha256").read_text() == full_hash
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss"] == pytest.approx(full_loss, abs=1e-6)
    assert metrics["samples_seen"] == STEPS * BATCH * NPROC


def test_state_hash_tracks_the_weights():
    torch.manual_seed(0)
    a, b = MapexModel(MapexConfig(**TINY)), MapexModel(MapexConfig(**TINY))
    assert state_hash(a) != state_hash(b)
    b.load_state_dict(a.state_dict())
    assert state_hash(a) == state_hash(b)
