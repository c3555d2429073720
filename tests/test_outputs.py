"""Outputs never destroy what is there and are complete or absent, on the real shared samples.

* ``--out`` of every command that writes (``ingest``, ``pretrain``, ``prune``, ``finetune``,
  ``evaluate``, ``predict``, ``export``, ``dashboard``): what MAPEX wrote itself is replaced, anything
  else is an error naming it (unless ``--force``), and no temporary entry is left beside it.
* SIGKILL while ``prune``, ``finetune`` and pre-training write their outputs: every step of writing
  (``MAPEX_TEST_KILL_AT``, see :mod:`mapex_core.io`) and at moments picked by the clock; afterwards
  the folder is the previous complete one or the new one, byte for byte (or absent when there was
  none), and the next command loads it or says it is missing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from mapex_core.io import OutputConflict, check_output, folder_problem, replace_folder, sweep_strays
from tests.helpers import ROOT, S1

TINY = dict(modalities=["s1", "s2l1c"], img_size=64, patch_size=8, dim=32, depth=2, heads=2, moe_every=1,
            experts_per_modality=2, top_k=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)
PRETRAIN = {"model": TINY, "pretrain": {"log_every": 1, "ckpt_every": 100, "stats_batches": 2, "splits": ["train"]}}
WATER = {"name": "water-s1", "modalities": ["s1"], "task": "segmentation", "metric": "iou_water",
         "finetune": {"steps": 4, "batch_size": 8, "eval_every": 2, "patience": 2, "bootstrap": 20,
                      "latency_runs": 2, "seeds": [0]}}


# ----- helpers ----------------------------------------------------------------------------------
def mapex(*args: str, cwd: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    """``mapex ARGS`` in a new process (killed by SIGKILL at its ``kill_at``-th output step)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MAPEX_TEST_KILL_AT", None)
    if kill_at is not None:
        env["MAPEX_TEST_KILL_AT"] = str(kill_at)
    return subprocess.run([sys.executable, "-m", "mapex_core.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``mapex ARGS`` in this process (``mapex_core.cli.main``: errors as one line and an exit status)."""
    from mapex_core.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(sys, "argv", ["mapex", *args])
        mp.chdir(cwd)
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file of ``folder`` (relative name -> bytes), or ``None`` when it is absent."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def finals(folder: Path) -> dict[str, bytes]:
    """The files of a pre-training folder but its checkpoints."""
    return {k: v for k, v in (snapshot(folder) or {}).items() if not k.startswith("checkpoints/")}


def hidden(folder: Path) -> list[str]:
    """Hidden entries of ``folder``: the temporaries an output may leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def refused(res: subprocess.CompletedProcess, path: Path, *words: str) -> None:
    """``res`` is one ``error:`` line naming ``path`` (and ``words``), exit 1, no traceback."""
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], res.stderr
    assert all(w in lines[0] for w in words), lines[0]


# ----- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(shared_flood_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny pre-trained model on the real Sen1Floods11 store, a second one with other weights, an
    application file and a pruned model."""
    from mapex_core.apps import get_application
    from mapex_core.model import MapexConfig, load_model, save_model
    from mapex_core.training.pretrain import PretrainParams, pretrain
    from mapex_core.training.prune import prune_app

    root = tmp_path_factory.mktemp("outputs")
    pretrain([shared_flood_store], root / "pre", MapexConfig(**TINY),
             PretrainParams(steps=4, batch_size=8, log_every=2, ckpt_every=4, splits=("train",), stats_batches=2),
             device="cpu")
    other = load_model(root / "pre")
    with torch.no_grad():
        for i, p in enumerate(other.parameters()):
            p.add_(0.05 * torch.sin(torch.arange(p.numel(), dtype=p.dtype) + i).view_as(p))
    save_model(other, root / "pre_b")
    (root / "water.yaml").write_text(yaml.safe_dump(WATER))
    prune_app(get_application(str(root / "water.yaml")), root / "pre", shared_flood_store, root / "pruned")
    return {"root": root, "pre": root / "pre", "pre_b": root / "pre_b", "app": root / "water.yaml",
            "pruned": root / "pruned", "chips": shared_flood_store}


# ----- the folder primitives ----------------------------------------------------------------------
def test_replace_folder_swaps_whole_folders_and_puts_the_old_one_back_on_failure(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    from mapex_core import io as mio

    target, staging = tmp_path / "out", tmp_path / "new"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    replace_folder(staging, target)
    assert snapshot(target) == {"new.txt": b"new"} and hidden(tmp_path) == [] and not staging.exists()
    (tmp_path / "file").write_text("a file")  # a file replaced by a folder (what --force asks)
    (tmp_path / "x").mkdir()
    replace_folder(tmp_path / "x", tmp_path / "file")
    assert (tmp_path / "file").is_dir() and hidden(tmp_path) == []
    # without an atomic exchange (not Linux): two renames; a failing second one puts the old folder back
    monkeypatch.setattr(mio, "_exchange", lambda a, b: False)
    with pytest.raises(FileNotFoundError):
        replace_folder(tmp_path / "missing", target)
    assert snapshot(target) == {"new.txt": b"new"} and hidden(tmp_path) == []
    staging.mkdir()
    (staging / "third.txt").write_text("3")
    replace_folder(staging, target)
    assert snapshot(target) == {"third.txt": b"3"} and hidden(tmp_path) == []


def test_strays_of_dead_writers_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid is now free: a writer that was killed
    dead = tmp_path / f".out.tmp-{proc.pid}-0123abcd"
    live = tmp_path / f".out.old-{os.getpid()}-0123abcd"
    other = tmp_path / ".out.notes"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    live.mkdir()
    other.write_text("not ours")
    assert sweep_strays(tmp_path / "out") == [dead]
    assert hidden(tmp_path) == [".out.notes", live.name]


def test_check_output_names_what_mapex_did_not_write(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    for name in ("index.html", ".index.html.tmp-1-00ff00ff", "photo.jpg", "notes.txt"):
        (folder / name).write_text("x")

    def problem(p: Path) -> str | None:
        return folder_problem(p, "a dashboard", ("index.html", "dashboard.json"))

    with pytest.raises(OutputConflict, match=r"site: is a folder that is not a dashboard \(it holds notes.txt, "
                                             r"photo.jpg\); pass --force to replace it$"):
        check_output(folder, problem)
    assert check_output(folder, problem, force=True).startswith("is a folder that is not a dashboard")
    assert check_output(tmp_path / "absent", problem) is None
    assert isinstance(OutputConflict("x"), ValueError)  # the CLI's exit 1 with one line


# ----- --out of every command ---------------------------------------------------------------------
def test_ingest_never_replaces_a_file_or_a_foreign_folder(ben_root: Path, tmp_path: Path) -> None:
    src = ben_root.parent / "sen1floods11_sample"
    args = ["ingest", "--source", str(src), "--chip-size", "64", "--split-block", "128", "--quiet",
            "--reports", str(tmp_path / "reports")]
    (tmp_path / "notes.zarr").write_text("my notes")
    res = run_cli(*args, "--out", "notes.zarr", cwd=tmp_path)
    refused(res, Path("notes.zarr"), "is a file, not a chip store", "--force")
    assert (tmp_path / "notes.zarr").read_text() == "my notes"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("keep me")
    res = run_cli(*args, "--out", "mine", cwd=tmp_path)
    refused(res, Path("mine"), "is a folder that is not a chip store (it holds important.txt)", "--force")
    assert snapshot(mine) == {"important.txt": b"keep me"} and hidden(tmp_path) == []

    res = run_cli(*args, "--out", "notes.zarr", "--force", cwd=tmp_path)  # the user said so
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "notes.zarr" / "zarr.json").read_text())["attributes"]["format"] == "mapex-chips"
    before = snapshot(tmp_path / "notes.zarr")
    res = run_cli(*args, "--out", "notes.zarr", cwd=tmp_path)  # its own store: replaced without --force
    assert res.returncode == 0, res.stderr
    assert snapshot(tmp_path / "notes.zarr") == before  # same input, same bytes
    assert hidden(tmp_path) == []


def test_model_folders_and_reports_are_replaced_only_when_mapex_wrote_them(work: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    base = ["--app", str(work["app"]), "--chips", str(work["chips"])]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PRETRAIN))
    (tmp_path / "file").write_text("a file")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("keep me")
    hf = tmp_path / "hf"  # another tool's model folder with the same file names
    hf.mkdir()
    (hf / "config.json").write_text('{"architectures": ["BertModel"]}')
    (hf / "model.safetensors").write_bytes(b"not ours")
    for cmd, source in (("prune", work["pre"]), ("finetune", work["pruned"])):
        refused(run_cli(cmd, *base, "--checkpoint", str(source), "--out", "file", cwd=tmp_path), Path("file"),
                "is a file, not a MAPEX model folder; pass --force to replace it")
        refused(run_cli(cmd, *base, "--checkpoint", str(source), "--out", "mine", cwd=tmp_path), Path("mine"),
                "(it holds important.txt)")
        refused(run_cli(cmd, *base, "--checkpoint", str(source), "--out", "hf", cwd=tmp_path), Path("hf"),
                "config.json is not a MAPEX model config")
    refused(run_cli("pretrain", "--chips", str(work["chips"]), "--out", "mine", "--steps", "1", cwd=tmp_path),
            Path("mine"), "not a pre-training folder (it holds important.txt); pass --force to write into it")
    refused(run_cli("pretrain", "--chips", str(work["chips"]), "--out", "file", "--force", cwd=tmp_path),
            Path("file"), "is a file, not a folder")
    eval_args = ["evaluate", *base, "--checkpoint", str(work["pruned"])]
    refused(run_cli(*eval_args, "--out", "file", cwd=tmp_path), Path("file"), "not an evaluation report")
    refused(run_cli(*eval_args, "--out", "mine", "--force", cwd=tmp_path), Path("mine"), "is a folder")
    (mine / "metrics.json").write_text('{"accuracy": 1}')  # someone else's metrics beside the report
    refused(run_cli(*eval_args, "--out", "mine/eval.json", cwd=tmp_path), Path("mine/metrics.json"),
            "not a metrics summary written by MAPEX")
    assert snapshot(mine) == {"important.txt": b"keep me", "metrics.json": b'{"accuracy": 1}'}
    assert (tmp_path / "file").read_text() == "a file" and snapshot(hf)["model.safetensors"] == b"not ours"

    res = run_cli("prune", *base, "--checkpoint", str(work["pre"]), "--out", "mine", "--force", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(snapshot(mine)) == ["config.json", "model.safetensors", "prune_report.json"]
    pruned = snapshot(mine)
    res = run_cli("prune", *base, "--checkpoint", str(work["pre"]), "--out", "mine", cwd=tmp_path)  # its own
    assert res.returncode == 0, res.stderr
    assert snapshot(mine) == pruned and hidden(tmp_path) == []

    from mapex_core.model import load_model, save_model

    keep = tmp_path / "pre_with_notes"  # --force into a pre-training folder keeps the other files
    keep.mkdir()
    (keep / "README.txt").write_text("my run")
    save_model(load_model(work["pre"]), keep)  # an earlier run's model, to be replaced
    res = run_cli("pretrain", "--chips", str(work["chips"]), "--out", str(keep), "--steps", "1", "--batch-size", "4",
                  "--force", "--device", "cpu", "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (keep / "README.txt").read_text() == "my run" and (keep / "checkpoints").is_dir()
    assert json.loads((keep / "metrics.json").read_text())["steps"] == [1]
    assert load_model(keep).config.modalities == ["s1", "s2l1c"] and hidden(tmp_path) == [] and hidden(keep) == []


def test_predict_replaces_only_its_own_maps(tmp_path: Path) -> None:
    import rasterio

    from mapex_core.predict import predict_scene
    from tests.helpers import tiny

    model = tiny("segmentation", ("s1",))
    foreign = tmp_path / "scene.tif"
    shutil.copy(S1, foreign)  # a real GeoTIFF that mapex predict did not write
    with pytest.raises(OutputConflict, match="scene.tif: exists and is not a map written by mapex predict; "
                                             "pass --force to replace it"):
        predict_scene(model, {"s1": S1}, foreign)
    assert foreign.read_bytes() == S1.read_bytes()
    (tmp_path / "maps").mkdir()
    with pytest.raises(OutputConflict, match="maps: is a folder, not a map written by mapex predict"):
        predict_scene(model, {"s1": S1}, tmp_path / "maps", force=True)
    out = tmp_path / "flood.tif"
    predict_scene(model, {"s1": S1}, out)
    first = out.read_bytes()
    predict_scene(model, {"s1": S1}, out)  # its own map: replaced, same bytes
    assert out.read_bytes() == first
    with rasterio.open(out) as src:
        assert src.tags()["MAPEX_PRODUCT"] == "mapex predict"
    predict_scene(model, {"s1": S1}, foreign, force=True)
    assert foreign.read_bytes() == first and hidden(tmp_path) == []


def test_export_and_dashboard_replace_their_own_folder_whole(tmp_path: Path, monkeypatch) -> None:
    import mlflow

    from mapex_core.dashboard import write_dashboard
    from mapex_core.export import ExportError, export_task_model
    from mapex_core.model.heads import save_task_model
    from tests.helpers import tiny
    from tests.pipeline_project import TINY_PARAMS

    model = tiny("segmentation", ("s1",))
    model.info = {"app": "flood"}
    save_task_model(model, tmp_path / "model")
    out = tmp_path / "export"
    export_task_model(tmp_path / "model", out, "torch-export")
    export_task_model(tmp_path / "model", out, "onnx")  # its own export folder: replaced whole, no --force
    assert sorted(snapshot(out)) == ["item.json", "model.onnx"] and hidden(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file, not a folder; pass --force"):
        export_task_model(tmp_path / "model", tmp_path / "file", "onnx")
    export_task_model(tmp_path / "model", tmp_path / "file", "onnx", force=True)
    assert sorted(snapshot(tmp_path / "file")) == ["item.json", "model.onnx"] and hidden(tmp_path) == []

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    site = tmp_path / "site"
    site.mkdir()
    (site / "logo.png").write_bytes(b"png")
    try:
        with pytest.raises(OutputConflict, match=r"site: is a folder that is not a dashboard \(it holds logo.png\); "
                                                 r"pass --force to write into it \(its other files are kept\)"):
            write_dashboard("site")
        write_dashboard("site", force=True)
        assert sorted(snapshot(site)) == ["dashboard.json", "index.html", "logo.png"]
        write_dashboard("page")
        write_dashboard("page")  # its own folder: replaced whole
    finally:
        mlflow.set_tracking_uri(None)
    assert sorted(snapshot(tmp_path / "page")) == ["dashboard.json", "index.html"] and hidden(tmp_path) == []


# ----- SIGKILL while writing ------------------------------------------------------------------------
def kill_at_steps(args: list[str], cwd: Path, out: Path, allowed: list[dict[str, bytes] | None],
                  check: Callable[[Path], object], steps: tuple[int, ...] | None = None) -> list[dict[str, bytes] | None]:
    """Run ``mapex ARGS`` killed at its output step 1, 2, ... until a run completes (or at each of
    ``steps``, then once to the end); after each run ``out`` must be one of ``allowed`` (byte for
    byte) and pass ``check``. Returns the states the kills left."""
    states = []
    for n in steps or range(1, 40):
        res = mapex(*args, cwd=cwd, kill_at=n)
        assert res.returncode in ((0, -signal.SIGKILL) if steps is None else (-signal.SIGKILL,)), (n, res.stderr)
        state = snapshot(out)
        assert state in allowed, (n, sorted(state or {}))
        check(out)
        if res.returncode == 0:
            return states
        states.append(state)
    if steps is None:
        raise AssertionError(f"mapex {args[0]} never completed")
    assert mapex(*args, cwd=cwd).returncode == 0
    check(out)
    return states


def test_prune_killed_at_every_step_leaves_the_previous_folder_or_the_new_one(work: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    from mapex_core.model import load_model

    def prune(checkpoint: Path, out: str) -> list[str]:
        return ["prune", "--app", str(work["app"]), "--checkpoint", str(checkpoint), "--chips", str(work["chips"]),
                "--out", out]

    assert mapex(*prune(work["pre"], "p"), cwd=tmp_path).returncode == 0
    assert mapex(*prune(work["pre_b"], "ref"), cwd=tmp_path).returncode == 0
    previous, new = snapshot(tmp_path / "p"), snapshot(tmp_path / "ref")
    assert previous != new and sorted(new) == ["config.json", "model.safetensors", "prune_report.json"]
    states = kill_at_steps(prune(work["pre_b"], "p"), tmp_path, tmp_path / "p", [previous, new], load_model)
    assert len(states) >= 5 and previous in states and new in states  # killed before and after the swap
    assert snapshot(tmp_path / "p") == new and hidden(tmp_path) == []  # the last run swept the killed ones'
    info = mapex("info", "p", cwd=tmp_path)  # the next command loads it
    assert info.returncode == 0 and json.loads(info.stdout)["parameters"] > 0, info.stderr

    # a first run killed before its folder is in place leaves nothing; the next commands say so
    assert mapex(*prune(work["pre"], "q"), cwd=tmp_path, kill_at=4).returncode == -signal.SIGKILL
    assert not (tmp_path / "q").exists()
    res = mapex("finetune", "--app", str(work["app"]), "--checkpoint", "q", "--chips", str(work["chips"]),
                "--out", "f", cwd=tmp_path)
    refused(res, Path("q/config.json"), "not found")
    assert mapex("info", "q", cwd=tmp_path).returncode == 1
    assert mapex(*prune(work["pre"], "q"), cwd=tmp_path).returncode == 0
    assert snapshot(tmp_path / "q") == previous and hidden(tmp_path) == []


# steps of `mapex finetune`: its four files written into the staging folder (1-4), the swap (5), the
# previous folder deleted (6); the default run kills at the telling ones, `make test-all` at every one
@pytest.mark.parametrize("steps", [pytest.param((1, 4, 5, 6), id="key-steps"),
                                   pytest.param(None, id="every-step", marks=pytest.mark.slow)])
def test_finetune_killed_while_writing_leaves_the_previous_folder_or_the_new_one(work: dict[str, Path], tmp_path: Path,
                                                                                steps: tuple[int, ...] | None) -> None:
    from mapex_core.model.heads import load_task_model

    def finetune(seed: int, out: str) -> list[str]:
        return ["finetune", "--app", str(work["app"]), "--checkpoint", str(work["pruned"]), "--chips",
                str(work["chips"]), "--seed", str(seed), "--out", out, "--quiet"]

    assert mapex(*finetune(0, "f"), cwd=tmp_path).returncode == 0
    assert mapex(*finetune(1, "ref"), cwd=tmp_path).returncode == 0
    previous, new = snapshot(tmp_path / "f"), snapshot(tmp_path / "ref")
    assert previous != new and sorted(new) == ["config.json", "finetune.json", "model.safetensors", "task.json"]
    states = kill_at_steps(finetune(1, "f"), tmp_path, tmp_path / "f", [previous, new], load_task_model, steps)
    assert len(states) >= 4 and previous in states and new in states
    assert snapshot(tmp_path / "f") == new and hidden(tmp_path) == []

    # killed by the clock: as soon as the new folder is being built beside the old one
    for delay in (0.0,) if steps else (0.0, 0.005, 0.02):
        proc = subprocess.Popen([sys.executable, "-m", "mapex_core.cli", *finetune(0, "f")], cwd=tmp_path,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while proc.poll() is None and not list(tmp_path.glob(".f.tmp-*")):
            time.sleep(0.001)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert snapshot(tmp_path / "f") in (new, previous)
        load_task_model(tmp_path / "f")
        sweep_strays(tmp_path / "f")  # what the killed run left beside it (the next run would sweep it too)


def test_pretrain_killed_while_writing_its_final_files_never_pairs_two_runs(work: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """The five final files are moved in with ``config.json`` removed first and moved in last: with a
    ``config.json`` they are one run's; without it readers say it is missing. Checkpoints stay."""
    from mapex_core.model import load_model

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PRETRAIN))
    run = tmp_path / "run"
    base = ["pretrain", "--chips", str(work["chips"]), "--out", "run", "--batch-size", "4", "--device", "cpu",
            "--quiet"]
    assert mapex(*base, "--steps", "1", cwd=tmp_path).returncode == 0
    first = finals(run)
    # a second run (2 steps) killed after its checkpoint, while it builds its final files aside
    assert mapex(*base, "--steps", "2", "--overwrite", cwd=tmp_path, kill_at=7).returncode == -signal.SIGKILL
    assert finals(run) == first
    # runs that resume the finished checkpoint only write the final files: five into a staging
    # folder (steps 1-5), config.json out (6), the other four moved in (7-10), config.json in
    for n, complete in ((5, True), (6, False), (9, False)):
        assert mapex(*base, "--steps", "2", cwd=tmp_path, kill_at=n).returncode == -signal.SIGKILL
        assert (run / "config.json").exists() == complete, n
        if complete:
            assert finals(run) == first
            assert load_model(run).config.modalities == ["s1", "s2l1c"]
        else:
            with pytest.raises(FileNotFoundError, match="run/config.json not found"):
                load_model(run)
    assert mapex(*base, "--steps", "2", cwd=tmp_path).returncode == 0
    final = (run / "checkpoints" / "step_0000002" / "model.safetensors").read_bytes()
    assert (run / "model.safetensors").read_bytes() == final != first["model.safetensors"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == [1, 2] and len((run / "loss.csv").read_text().splitlines()) == 3
    assert hidden(tmp_path) == [] and hidden(run) == []
