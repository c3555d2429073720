"""MAE pre-training on the real BigEarthNet chip store: learning, checkpoints, resume, CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mapex_core.model import MapexConfig, load_model
from mapex_core.training.checkpoint import latest_checkpoint
from mapex_core.training.pretrain import PretrainParams, pretrain

SMALL = dict(modalities=["s1", "s2"], img_size=64, patch_size=8, dim=64, depth=2, heads=2,
             moe_every=1, experts_per_modality=2, decoder_dim=64, decoder_depth=1, decoder_heads=2)


def _params(**kw):
    base = dict(steps=30, batch_size=6, lr=1e-3, warmup_steps=5, log_every=1, ckpt_every=10,
                splits=("train", "val", "test"), modality_dropout=0.0, stats_batches=4)
    return PretrainParams(**{**base, **kw})


def test_mae_loss_falls_over_30_steps(ben_store, tmp_path):
    torch.set_num_threads(2)
    m = pretrain(ben_store, tmp_path / "run", MapexConfig(**SMALL), _params(), device="cpu")
    loss = m["loss"]
    assert len(loss) == 30 and m["steps"] == list(range(1, 31))
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert m["tokens_per_s"] > 0 and m["samples_seen"] == 30 * 6
    assert set(m["specialisation"]) == {"s1", "s2"}
    assert all(0.0 <= v <= 1.0 for v in m["specialisation"].values())


@pytest.mark.parametrize("log_every", [1, 4])  # 4: a checkpoint falls inside a logging window
def test_resume_reproduces_the_uninterrupted_run(ben_store, tmp_path, log_every):
    cfg = MapexConfig(**SMALL)
    p = _params(steps=20, modality_dropout=0.5, log_every=log_every)
    full = pretrain(ben_store, tmp_path / "full", cfg, p, device="cpu")

    class Crash(Exception):
        pass

    def crash_at_13(step, total, logs):
        if step == 13:
            raise Crash

    with pytest.raises(Crash):
        pretrain(ben_store, tmp_path / "cut", cfg, p, device="cpu", on_step=crash_at_13)
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step_0000010"
    resumed = pretrain(ben_store, tmp_path / "cut", cfg, p, device="cpu", resume=True)
    assert resumed["steps"] == full["steps"]
    assert resumed["loss"] == pytest.approx(full["loss"], abs=1e-6)
    a = load_model(tmp_path / "full").state_dict()
    b = load_model(tmp_path / "cut").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_with_a_different_config_is_refused(ben_store, tmp_path):
    pretrain(ben_store, tmp_path / "r", MapexConfig(**SMALL), _params(steps=10), device="cpu")
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run .*pass --resume"):
        pretrain(ben_store, tmp_path / "r", MapexConfig(**SMALL), _params(steps=10), device="cpu")
    again = pretrain(ben_store, tmp_path / "r", MapexConfig(**SMALL), _params(steps=10), device="cpu",
                     resume=True)  # already complete: nothing to train, outputs rewritten
    assert again["steps"] == list(range(1, 11))
    other = MapexConfig(**{**SMALL, "depth": 3})
    with pytest.raises(ValueError, match="checkpoint config differs"):
        pretrain(ben_store, tmp_path / "r", other, _params(steps=20), device="cpu", resume=True)


def _mapex(*args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "mapex_core.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_pretrain_writes_the_contract_files(ben_store, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "model:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in SMALL.items())
        + "pretrain:\n  batch_size: 4\n  log_every: 2\n  ckpt_every: 4\n  splits: [train, val, test]\n"
    )
    res = _mapex("pretrain", "--chips", str(ben_store), "--out", "out", "--steps", "6",
                 "--params", str(params), "--device", "cpu", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["loss"]) == 3 and metrics["tokens_per_s"] > 0
    rows = (out / "loss.csv").read_text().splitlines()  # the dvc plot
    assert rows[0] == "step,loss,recon_loss,aux_loss,lr" and [r.split(",")[0] for r in rows[1:]] == ["2", "4", "6"]
    assert [float(r.split(",")[1]) for r in rows[1:]] == pytest.approx(metrics["loss"])
    assert set(metrics["specialisation"]) == {"s1", "s2"}
    saved = MapexConfig.from_json(out / "config.json")
    assert set(saved.normalization) == {"s1", "s2"} and len(saved.normalization["s2"]["mean"]) == 12
    saved.normalization = None
    assert saved == MapexConfig(**SMALL)
    summary = json.loads(res.stdout)
    assert summary["outputs"]["model.safetensors"].endswith("model.safetensors")


def test_cli_errors_are_clear(ben_store, tmp_path):
    res = _mapex("pretrain", "--chips", str(tmp_path / "nope.zarr"), "--out", "o", cwd=tmp_path)
    assert res.returncode != 0 and "nope.zarr: chip store not found" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  stpes: 3\n")
    res = _mapex("pretrain", "--chips", str(ben_store), "--out", "o", "--params", str(bad), cwd=tmp_path)
    assert res.returncode != 0 and "unknown key(s) ['stpes'] in section 'pretrain'" in res.stderr
    res = _mapex("pretrain", "--chips", str(ben_store), "--out", "o", "--device", "cuda", cwd=tmp_path) \
        if not torch.cuda.is_available() else None
    if res is not None:
        assert res.returncode != 0 and "no CUDA device is available" in res.stderr
    res = _mapex("pretrain", "--chips", str(ben_store), "--out", "o", "--device", "gpu", cwd=tmp_path)
    assert res.returncode != 0 and "unknown device 'gpu'; use auto, cpu, cuda or cuda:N" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_help_is_fast_and_lists_commands(tmp_path):
    res = _mapex("--help", cwd=tmp_path)
    assert res.returncode == 0
    for cmd in ("samples", "ingest", "pretrain", "info"):
        assert cmd in res.stdout
    # --help must not import the heavy stack
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from mapex_core import cli; "
         "print(sorted(m for m in ('torch', 'mlflow', 'prefect', 'great_expectations', 'xarray') if m in sys.modules))"],
        capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.strip() == "[]"


def test_cli_ingest_and_info(ben_root, tmp_path):
    res = _mapex("ingest", "--source", str(ben_root), "--out", "c.zarr", "--chip-size", "120", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["scenes"] == 6 and summary["chips"] == 6 and summary["quarantined"] == 0
    assert summary["chips_per_modality"] == {"s1": 6, "s2": 6}
    res = _mapex("info", "c.zarr", cwd=tmp_path)
    info = json.loads(res.stdout)
    assert info["chips"] == 6 and info["chip_size"] == 120 and len(info["classes"]) == 19
    res = _mapex("ingest", "--source", str(ben_root), "--out", "d.zarr", "--chip-size", "128", cwd=tmp_path)
    assert res.returncode != 0 and "chip size 128 is larger than the image (120 px)" in res.stderr
    assert not (tmp_path / "d.zarr").exists()


def test_pretraining_on_several_stores_pools_their_statistics(ben_store, shared_flood_store, tmp_path):
    from mapex_core.data.chips import ChipStore

    cfg = MapexConfig(**{**SMALL, "modalities": ["s1", "s2", "s2l1c"]})
    m = pretrain([ben_store, shared_flood_store], tmp_path / "multi", cfg, _params(steps=6, log_every=2),
                 device="cpu")
    assert set(m["specialisation"]) == {"s1", "s2", "s2l1c"}
    saved = load_model(tmp_path / "multi").config
    ben, flood = ChipStore.open(ben_store), ChipStore.open(shared_flood_store)
    n_b, n_f = ben.band_stats("s1")["count"].values, flood.band_stats("s1")["count"].values
    pooled = (n_b * ben.band_stats("s1")["mean"].values + n_f * flood.band_stats("s1")["mean"].values) / (n_b + n_f)
    assert saved.normalization["s1"]["mean"] == pytest.approx(list(pooled), rel=1e-6)
    assert saved.normalization["s2l1c"]["mean"] == pytest.approx(list(flood.band_stats("s2l1c")["mean"].values))
