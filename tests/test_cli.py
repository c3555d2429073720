"""The `mapex` program as a user runs it: one program under both names, pre-training on the modalities the
chips have, and the retrain's progress lines when there is no terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    full["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), full.get("PATH", "")])
    return subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True)


def commands(help_text: str) -> list[str]:
    return sorted(set(re.findall(r"^│ (\w+)\s", help_text, flags=re.M)))


def test_mapex_and_python_m_mapex_core_cli_are_the_same_program(tmp_path: Path) -> None:
    script = run(["mapex", "--help"], tmp_path)
    module = run([sys.executable, "-m", "mapex_core.cli", "--help"], tmp_path)
    assert script.returncode == module.returncode == 0, script.stderr + module.stderr
    assert commands(script.stdout) == commands(module.stdout)
    assert {"retrain", "deploy", "ingest", "pretrain", "prune", "serve"} <= set(commands(module.stdout))


def test_pretrain_on_chips_without_a_configured_modality_uses_what_they_hold(shared_flood_store: Path,
                                                                              tmp_path: Path) -> None:
    """The Sen1Floods11 chips hold s1 and s2l1c; the params ask for s1, s2 and s2l1c."""
    params = {"model": {"modalities": ["s1", "s2", "s2l1c"], "img_size": 64, "patch_size": 16, "dim": 32,
                        "depth": 2, "heads": 2, "moe_every": 2, "experts_per_modality": 2, "top_k": 1,
                        "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
              "pretrain": {"steps": 2, "batch_size": 4, "log_every": 1, "ckpt_every": 2, "stats_batches": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = run([sys.executable, "-m", "mapex_core.cli", "pretrain", "--chips", str(shared_flood_store), "--out",
               str(tmp_path / "pre"), "--device", "cpu", "--quiet"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "the chips hold no ['s2']: pre-trained without them" in res.stderr
    config = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert config["modalities"] == ["s1", "s2l1c"] and set(config["normalization"]) == {"s1", "s2l1c"}
    assert json.loads(res.stdout)["parameters"] > 0


def test_retrain_without_a_terminal_prints_one_line_per_stage_start_and_end(ben_root: Path, tmp_path: Path) -> None:
    """`mapex retrain` on a tiny project (real BigEarthNet pairs), its output captured (no terminal)."""
    from tests.pipeline_project import make_project

    root = make_project(tmp_path / "proj", ben_root)
    res = run(["mapex", "retrain", "--no-samples", "--app", "landcover-s2"], root,
              PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_LOGGING_LEVEL="WARNING")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if re.match(r"^\[\d\d:\d\d:\d\d\] \S+: ", ln)]
    stages = ["ingest@bigearthnet", "validate@bigearthnet", "pretrain", "prune@landcover-s2", "finetune@landcover-s2",
              "compare@landcover-s2", "evaluate@landcover-s2", "register@landcover-s2", "dashboard"]
    for stage in stages:
        mine = [ln.split(": ", 1)[1] for ln in lines if ln.split("] ", 1)[1].startswith(stage + ":")]
        assert mine[0] == "running" and re.fullmatch(r"done in \d+s", mine[1]), (stage, mine)
    from mapex_core.runtime import cpu_count

    order = [ln.split("] ", 1)[1] for ln in lines]
    if cpu_count() > 1:  # a lone app's stages take every core: compare waits for finetune (no room beside it)
        assert order.index("compare@landcover-s2: running") > order.index(
            next(o for o in order if o.startswith("finetune@landcover-s2: done")))
    assert "| landcover-s2 | s2 |" in res.stdout  # the summary table
    again = run(["mapex", "retrain", "--no-samples", "--app", "landcover-s2"], root,
                PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_LOGGING_LEVEL="WARNING")
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"\] pretrain: cached in \d+s", again.stderr) and re.search(
        r"\] evaluate@landcover-s2: cached in \d+s", again.stderr)
