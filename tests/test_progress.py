"""Stage progress and shared cores: the board and a stage's channel files, a real command reporting
through them, and evaluation whose results do not depend on how many of its runs train at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mapex_core.progress import (
    CHANNEL_ENV,
    StageBoard,
    StageChannel,
    available_cores,
    format_seconds,
)
from mapex_core.runtime import cpu_count

ROOT = Path(__file__).resolve().parents[1]


def test_board_shares_the_cores_among_running_stages_and_reads_their_progress(monkeypatch) -> None:
    seen = []
    board = StageBoard(["a", "b", "c"], on_change=lambda row: seen.append((row.name, row.state)))
    try:
        env_a = board.start("a", threads=1)
        assert env_a[CHANNEL_ENV].endswith("a.json")
        env_b = board.start("b")
        channel_a, channel_b = StageChannel(env_a[CHANNEL_ENV]), StageChannel(env_b[CHANNEL_ENV])
        assert channel_a.cores() == channel_b.cores() == max(1, cpu_count() // 2)
        channel_a.report(3, 10, "loss 0.5")
        rows = {r.name: r for r in board.snapshot()}
        assert (rows["a"].state, rows["a"].done, rows["a"].total, rows["a"].info) == ("running", 3, 10, "loss 0.5")
        assert rows["c"].state == "waiting" and rows["c"].elapsed is None
        board.finish("b", "cached")
        assert channel_a.cores() == cpu_count()  # the last one running gets every core
        monkeypatch.setenv(CHANNEL_ENV, env_a[CHANNEL_ENV])
        assert available_cores() == cpu_count()
        board.finish("a", "failed")
        assert seen == [("a", "running"), ("b", "running"), ("b", "cached"), ("a", "failed")]
        with pytest.raises(ValueError, match="unknown stage state 'exploded'"):
            board.finish("c", "exploded")
    finally:
        board.close()
    assert not board.folder.exists()
    assert format_seconds(65.2) == "1m05s" and format_seconds(9) == "9s" and format_seconds(None) == "-"


def test_threads_given_to_a_stage_are_its_own_and_the_users_setting_wins(monkeypatch) -> None:
    board = StageBoard()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert board.start("x", threads=1)["OMP_NUM_THREADS"] == "1"
        monkeypatch.setenv("OMP_NUM_THREADS", "7")
        assert "OMP_NUM_THREADS" not in board.start("y", threads=1)
    finally:
        board.close()


def test_a_real_command_reports_through_its_channel(ben_root: Path, tmp_path: Path) -> None:
    """`mapex ingest` started the way the retrain flow starts a stage writes its progress file."""
    channel = tmp_path / "ingest.json"
    env = dict(os.environ, **{CHANNEL_ENV: str(channel)}, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "mapex_core.cli", "ingest", "--source", str(ben_root), "--out",
                          str(tmp_path / "ben.zarr"), "--layout", "bigearthnet", "--reports", str(tmp_path / "r"),
                          "--quiet"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(channel.read_text())["done"] == json.loads(channel.read_text())["total"] == 6  # 6 scenes


@pytest.fixture(scope="module")
def tiny_app(ben_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny pre-trained, pruned and fine-tuned landcover-s2 model on the real BigEarthNet chips."""
    from mapex_core.apps import get_application
    from mapex_core.model import MapexConfig
    from mapex_core.training.finetune import finetune_app
    from mapex_core.training.pretrain import PretrainParams, pretrain
    from mapex_core.training.prune import prune_app

    root = tmp_path_factory.mktemp("tiny_app")
    app = get_application("landcover-s2", {"applications": {"landcover-s2": {
        "modalities": ["s2"], "task": "multilabel", "metric": "map_macro", "chips": str(ben_store),
        "finetune": {"steps": 6, "batch_size": 8, "eval_every": 3, "bootstrap": 20, "latency_runs": 1,
                     "seeds": [0, 1], "head_channels": 8}}}})
    pretrain([ben_store], root / "pre", MapexConfig(modalities=["s1", "s2"], img_size=64, patch_size=16, dim=32,
                                                     depth=2, heads=2, moe_every=2, experts_per_modality=2, top_k=1,
                                                     decoder_dim=32, decoder_depth=1, decoder_heads=2),
             PretrainParams(steps=4, batch_size=8, log_every=2, ckpt_every=4, stats_batches=1), device="cpu")
    prune_app(app, root / "pre", ben_store, root / "pruned")
    finetune_app(app, root / "pruned", ben_store, root / "ft")
    return app, root


def test_evaluation_gives_the_same_report_whatever_runs_at_once(tiny_app, ben_store: Path, tmp_path: Path) -> None:
    """Five fine-tuning runs (pruned seed 1, unpruned and scratch seeds 0 and 1) one at a time or
    two at a time: the same metrics, intervals and training curves, to the last bit."""
    import torch

    from mapex_core.training.evaluate import evaluate_app

    app, root = tiny_app
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    calls: list[int] = []
    try:
        reports = [evaluate_app(app, root / "ft", ben_store, tmp_path / f"eval{n}.json", device="cpu",
                                pretrained=root / "pre", concurrency=lambda n=n: calls.append(n) or n,
                                on_step=lambda *a: None)
                   for n in (1, 2)]
    finally:
        torch.set_num_threads(threads)
    assert 1 in calls and 2 in calls
    for variant in ("pruned", "unpruned", "scratch"):
        one, two = reports[0][variant], reports[1][variant]
        assert (one["value"], one["ci95"], one["params"]) == (two["value"], two["ci95"], two["params"]), variant
        assert one["training"] == two["training"], variant  # loss curves and validation scores, exactly
    assert len(reports[0]["unpruned"]["training"]) == 2 and reports[0]["pruned_checkpoint_reused"]
