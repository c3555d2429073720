"""Prefect deployments (test harness API), Dask ingestion, retry classification."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline_project import TINY_PARAMS, make_project


def test_deployments_have_schedule_pools_and_parameters(prefect_harness, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from prefect import get_client

    from flows.deployments import deploy

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    monkeypatch.chdir(tmp_path)
    out = deploy("params.yaml")
    assert [d["deployment"] for d in out] == ["retrain/scheduled-retrain", "pretrain/pretrain-gpu",
                                              "application/app-cpu"]
    with get_client(sync_client=True) as client:
        retrain = client.read_deployment_by_name("retrain/scheduled-retrain")
        pretrain = client.read_deployment_by_name("pretrain/pretrain-gpu")
        application = client.read_deployment_by_name("application/app-cpu")
        pools = {p.name: p.type for p in client.read_work_pools()}
    assert retrain.work_pool_name == "cpu" and pretrain.work_pool_name == "gpu"
    assert application.work_pool_name == "cpu" and application.entrypoint == "flows.handoff.application_flow"
    assert {"cpu": "process", "gpu": "process"}.items() <= pools.items()
    assert [(s.schedule.cron, s.schedule.timezone) for s in retrain.schedules] == [("0 3 * * 1", "UTC")]
    assert retrain.parameters == {"params": "params.yaml", "fetch_samples": False}
    assert retrain.entrypoint == "flows.pipeline.retrain" and pretrain.entrypoint == "flows.pipeline.pretrain_flow"
    assert retrain.job_variables == {"working_dir": str(tmp_path.resolve())}
    assert pretrain.schedules == []
    # a configured schedule replaces the default on re-deploy
    deploy("params.yaml", cron="30 1 * * 0", timezone="Europe/Berlin")
    with get_client(sync_client=True) as client:
        retrain = client.read_deployment_by_name("retrain/scheduled-retrain")
    assert [(s.schedule.cron, s.schedule.timezone) for s in retrain.schedules] == [("30 1 * * 0", "Europe/Berlin")]
    with pytest.raises(ValueError, match="invalid schedule: cron '61 \\* \\* \\* \\*'"):
        deploy("params.yaml", cron="61 * * * *")


def test_deploy_serve_runs_the_schedules_from_one_process(prefect_harness, tmp_path: Path) -> None:
    """`mapex deploy --serve` against a real Prefect API: both deployments become ready, served by it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "deploy", "--serve", "--cron", "15 2 * * 3"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, status = time.monotonic() + 90, {}
        while time.monotonic() < deadline and proc.poll() is None:
            with get_client(sync_client=True) as client:
                try:
                    served = [client.read_deployment_by_name(n) for n in ("retrain/scheduled-retrain",
                                                                           "pretrain/pretrain-gpu")]
                except Exception:  # noqa: BLE001 - not registered yet
                    served = []
            status = {d.name: d.status.value if d.status else None for d in served}
            if served and all(v == "READY" for v in status.values()) and served[0].schedules and \
                    served[0].schedules[0].schedule.cron == "15 2 * * 3":
                break
            time.sleep(1)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert status == {"scheduled-retrain": "READY", "pretrain-gpu": "READY"}, status
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_ingest_flow_on_a_local_dask_cluster(prefect_harness, ben_root: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from dvc.repo import Repo

    from flows.pipeline import ingest_with_dask
    from mapex_core.data.chips import ChipStore

    root = make_project(tmp_path / "proj", ben_root)
    monkeypatch.chdir(root)
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")
    before = {k: os.environ.get(k) for k in keys}
    out = ingest_with_dask(["bigearthnet"], n_workers=1)
    # the cluster's settings do not leak into this process (later stages would take them as the user's)
    assert {k: os.environ.get(k) for k in keys} == before
    ing = out["bigearthnet"]["ingest"]
    assert ing["success"] and ing["quarantined"] == 0 and ing["chips"] == out["bigearthnet"]["validate"]["chips"]
    assert len(ChipStore.open("data/chips/bigearthnet.zarr")) == ing["chips"] == 24  # 6 pairs x 2 x 2 chips
    with Repo(str(root)) as repo:  # both stages recorded in dvc.lock from the Dask workers' outputs
        assert not {"ingest@bigearthnet", "validate@bigearthnet"} & set(repo.status())


def test_transient_failures_are_retried_bugs_are_not() -> None:
    import sqlite3

    from dvc.lock import LockError

    from flows.pipeline import is_transient
    from mapex_core.lineage import StageFailed

    assert is_transient(StageFailed("prune@a", "mapex prune --app a", 75, ""))
    assert not is_transient(StageFailed("prune@a", "mapex prune --app a", 1, "error: bad input"))
    assert is_transient(LockError("busy")) and is_transient(TimeoutError()) and is_transient(OSError(5, "EIO"))
    assert is_transient(sqlite3.OperationalError("database is locked"))
    for exc in (ValueError("x"), KeyError("k"), TypeError("t"), FileNotFoundError("f"), PermissionError("p")):
        assert not is_transient(exc)


def test_retry_condition_reads_the_failed_state() -> None:
    from prefect.states import Failed

    from flows.pipeline import _retry_if_transient
    from mapex_core.lineage import StageFailed

    assert _retry_if_transient(None, None, Failed(data=StageFailed("pretrain", "mapex pretrain", 75, "")))
    assert not _retry_if_transient(None, None, Failed(data=ValueError("bad params")))


def test_plan_has_compare_beside_finetune_in_each_app(tmp_path: Path) -> None:
    import yaml

    from flows.pipeline import plan

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    apps = ["landcover-s2", "landcover-s1"]
    assert plan(apps, str(tmp_path / "params.yaml"), fetch_samples=False) == [
        "ingest@bigearthnet", "validate@bigearthnet", "pretrain"] + [
        f"{k}@{a}" for a in apps for k in ("prune", "finetune", "compare", "evaluate", "register")] + ["dashboard"]


def test_a_stage_beside_another_starts_when_the_running_stages_leave_it_the_cores() -> None:
    """compare@APP beside finetune@APP: a 1-thread stage at once; one that needs every core after the block;
    not at all when the block fails before it started; its own error after the block."""
    import threading
    import time

    from flows.sharing import beside, has_room
    from mapex_core.progress import StageBoard, use_board
    from mapex_core.runtime import cpu_count

    n = cpu_count()
    assert has_room(1, also=["finetune@a"]) and has_room(n) and not has_room(n, also=["finetune@a"])
    started = threading.Event()
    with beside(started.set, threads=1, block="finetune@a"):
        assert started.wait(30)  # it ran while the block was still running
    if n == 1:
        return  # every stage has 1 thread: always room
    events: list[str] = []
    with use_board(StageBoard(["finetune@a", "compare@a"])) as board:
        board.start("other@b")
        assert has_room(n // 2) and not has_room(n // 2 + 1) and not has_room(None)  # beside one: half the cores
        board.finish("other@b", "done")
        with beside(lambda: events.append("compare"), threads=n, block="finetune@a", poll_s=0.05):
            board.start("finetune@a")
            time.sleep(0.3)
            events.append("finetune done")
            board.finish("finetune@a", "done")
    assert events == ["finetune done", "compare"]
    ran: list[str] = []
    with pytest.raises(RuntimeError, match="finetune failed"), beside(lambda: ran.append("compare"), threads=n,
                                                                       block="finetune@a", poll_s=0.05):
        raise RuntimeError("finetune failed")
    assert ran == []

    def broken() -> None:
        raise ValueError("compare failed")

    with pytest.raises(ValueError, match="compare failed"), beside(broken, threads=1, block="finetune@a"):
        pass
