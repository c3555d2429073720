"""The whole platform across machines that share no folder (issue 15, point 7), on loopback: the servers of
``mapex cluster up``; the team's repository on a bare git "server"; a gpu worker and a cpu worker, each
started from its own clone; ``mapex deploy`` from a third clone; a run of ``retrain/scheduled-retrain``.
Each flow run starts from a fresh clone of the deployed commit in a temporary folder of its worker and
gets its inputs from the DVC remote (S3) and the stage cache records (S3). Then a fresh clone of the
results branch pulls everything and DVC finds the pipeline up to date, and a second retrain finds every
stage cached and registers nothing new. Then the faults: the cpu worker's machine killed (SIGKILL) in the
middle of a stage, its runs marked CRASHED, and a new retrain that re-runs only the unfinished stages while
PostgreSQL restarts under it. Slow (``make test-cluster``, ``.ci/run``); ``tests/test_cluster_faults.py``
has each fault on its own, the object store down included."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_support import (
    Cluster,
    clone,
    git,
    http_json,
    mapex,
    stop,
    team_repository,
    worker_in,
)
from tests.pipeline_project import TINY_PARAMS, set_params

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def wait_online(api: str, workers: dict[str, str], timeout: float = 120) -> None:
    """Wait until each pool's named worker is ONLINE."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(any(w["name"] == name and w["status"] == "ONLINE"
                   for w in http_json(f"{api}/work_pools/{pool}/workers/filter", method="POST", body={}))
               for pool, name in workers.items()):
            return
        time.sleep(1)
    raise AssertionError(f"workers {workers} not online within {timeout} s")


def trigger_retrain(api: str, timeout: float = 1200) -> dict[str, Any]:
    """Run retrain/scheduled-retrain now; its flow run once final."""
    return wait_final(api, start_retrain(api)["id"], timeout)


def run_tree(api: str, root_id: str) -> list[dict[str, Any]]:
    """The flow run ``root_id`` and every flow run below it (subflows, runs of deployments it waited for)."""
    runs = http_json(f"{api}/flow_runs/filter", method="POST", body={})
    tasks = {t["id"]: t for t in http_json(f"{api}/task_runs/filter", method="POST", body={})}
    parent = {r["id"]: tasks[r["parent_task_run_id"]]["flow_run_id"] for r in runs
              if r.get("parent_task_run_id") in tasks}
    tree = []
    for r in runs:
        node = r["id"]
        while node and node != root_id:
            node = parent.get(node)
        if node == root_id:
            tree.append(r)
    return tree


def stage_states(api: str, flow_runs: list[dict[str, Any]]) -> dict[str, str]:
    """Stage task name -> state name over ``flow_runs``."""
    ids = [r["id"] for r in flow_runs]
    tasks = http_json(f"{api}/task_runs/filter", method="POST",
                      body={"flow_runs": {"id": {"any_": ids}}, "task_runs": {"name": {"like_": "@"}}})
    tasks += http_json(f"{api}/task_runs/filter", method="POST",
                       body={"flow_runs": {"id": {"any_": ids}}, "task_runs": {"name": {"any_": ["pretrain"]}}})
    return {t["name"]: t["state"]["name"] for t in tasks if t["task_key"].startswith("stage")}


def wait_for_page(url: str, apps: tuple[str, ...], timeout: float = 90) -> str:
    """The dashboard page at ``url`` once it shows a card for every one of ``apps`` (the service polls the
    tracking server for newly published pages)."""
    import urllib.request

    deadline, page = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/", timeout=10) as resp:  # noqa: S310 - loopback
            page = resp.read().decode()
        if all(f'data-app="{a}"' in page for a in apps):
            return page
        time.sleep(2)
    raise AssertionError(f"{url}: no card for every one of {apps} within {timeout} s:\n{page[:2000]}")


def start_retrain(api: str) -> dict[str, Any]:
    """A run of retrain/scheduled-retrain, created now (not waited for)."""
    dep = http_json(f"{api}/deployments/name/retrain/scheduled-retrain")
    return http_json(f"{api}/deployments/{dep['id']}/create_flow_run", method="POST", body={})


def wait_final(api: str, run_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = http_json(f"{api}/flow_runs/{run_id}")
        if run["state"]["type"] in FINAL:
            return run
        time.sleep(3)
    raise AssertionError(f"flow run {run_id} not final within {timeout} s: {run['state']}")


def wait_stage_running(api: str, root_id: str, stage: str, timeout: float = 900) -> None:
    """Wait until task run ``stage`` of the run ``root_id`` (or of a run below it) is RUNNING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = [r["id"] for r in run_tree(api, root_id)]
        tasks = http_json(f"{api}/task_runs/filter", method="POST",
                          body={"flow_runs": {"id": {"any_": ids}}, "task_runs": {"name": {"any_": [stage]}}})
        if any(t["state"]["type"] == "RUNNING" for t in tasks):
            return
        time.sleep(1)
    raise AssertionError(f"{stage} of flow run {root_id} not running within {timeout} s")


def kill_machine(worker: subprocess.Popen) -> None:
    """SIGKILL the worker and everything it started (Prefect puts a flow run's process in a session of its own)."""
    import os

    import psutil

    tree = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
    for group in {os.getpgid(p.pid) for p in tree if p.is_running()} - {os.getpgid(0)}:
        os.killpg(group, signal.SIGKILL)
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, alive


def team_params() -> dict[str, Any]:
    params = copy.deepcopy(TINY_PARAMS)
    params["pipeline"]["no_gpu_worker"] = "fail"  # pre-training must go to the gpu worker
    return params


@pytest.mark.slow
def test_retrain_across_workers_that_share_no_folder(cluster: Cluster, ben_root: Path) -> None:
    from mlflow import MlflowClient

    origin, dev = team_repository(cluster, ben_root, team_params())
    api = cluster.client["PREFECT_API_URL"]
    res = mapex(["deploy"], dev, cluster.env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{origin}@" in res.stdout and "working_dir" not in res.stdout
    machines = {pool: clone(origin, cluster.root / f"{pool}-machine" / "mapex") for pool in ("gpu", "cpu")}
    workers = {pool: worker_in(cluster, folder, pool, f"{pool}-1") for pool, folder in machines.items()}
    try:
        wait_online(api, {pool: f"{pool}-1" for pool in workers})
        t0 = time.monotonic()
        first = trigger_retrain(api)
        first_s = time.monotonic() - t0
        logs = {pool: log.read_text() for pool, (_, log) in workers.items()}
        assert first["state"]["type"] == "COMPLETED", (first["state"], logs["cpu"][-4000:], logs["gpu"][-4000:])
        print(f"first retrain through the cluster: {first_s:.1f} s")

        # where each flow run ran: pre-training on the gpu worker, each application on the cpu worker
        tree = run_tree(api, first["id"])
        pretrain = [r for r in tree if r["deployment_id"] and r["name"] and r["work_pool_name"] == "gpu"]
        assert len(pretrain) == 1 and pretrain[0]["state"]["type"] == "COMPLETED"
        assert f"submitting flow run '{pretrain[0]['id']}'" in logs["gpu"]
        apps = [r for r in tree if r["parameters"].get("app")]
        assert sorted(r["parameters"]["app"] for r in apps) == ["landcover-s1", "landcover-s2"]
        for r in apps:
            assert r["work_pool_name"] == "cpu" and r["state"]["type"] == "COMPLETED"
            assert f"submitting flow run '{r['id']}'" in logs["cpu"] and r["id"] not in logs["gpu"]
        # no flow run used a folder of the deploying machine: each cloned the deployed commit
        assert str(dev) not in logs["cpu"] + logs["gpu"]
        # every stage ran once, somewhere
        states = stage_states(api, tree)
        assert set(states) >= {"ingest@bigearthnet", "validate@bigearthnet", "pretrain", "prune@landcover-s1",
                               "finetune@landcover-s2", "evaluate@landcover-s2"}, states
        assert set(states.values()) == {"Completed"}, states

        client = MlflowClient(tracking_uri=cluster.client["MLFLOW_TRACKING_URI"])
        pre = client.get_model_version_by_alias("mapex-pretrained", "current")
        versions = {}
        for app in ("landcover-s1", "landcover-s2"):
            champion = client.get_model_version_by_alias(f"mapex-{app}", "champion")
            tags = client.get_run(champion.run_id).data.tags
            assert tags["mapex.pretrain_run_id"] == pre.run_id and tags["mapex.app"] == app
            assert champion.tags["model_sha256"] and champion.tags["git_sha"]
            versions[app] = len(client.search_model_versions(f"name = 'mapex-{app}'"))

        # the team dashboard: published from the tracking server, served by the cluster, linked over http
        dash = cluster.client["MAPEX_DASHBOARD_URL"]
        assert dash.startswith("http://127.0.0.1:")
        page = wait_for_page(dash, ("landcover-s1", "landcover-s2"))
        assert "from the tracking server" in page
        (link,) = http_json(f"{api}/artifacts/filter", method="POST",
                            body={"artifacts": {"key": {"any_": ["mapex-dashboard"]}}})
        assert link["data"] == f"[MAPEX dashboard: per-task models]({dash})", link

        # a third machine: the results branch, dvc pull, and DVC finds every stage up to date
        third = clone(origin, cluster.root / "third-machine" / "mapex", branch="mapex-results")
        from flows.cluster import configure_dvc_remote

        configure_dvc_remote(third, cluster.env)
        dvc = str(Path(sys.executable).parent / "dvc")
        pulled = subprocess.run([dvc, "pull", "-q"], cwd=third, env=cluster.env, capture_output=True, text=True)
        assert pulled.returncode == 0, pulled.stderr[-3000:]
        status = subprocess.run([dvc, "status"], cwd=third, env=cluster.env, capture_output=True, text=True)
        assert status.returncode == 0 and "Data and pipelines are up to date" in status.stdout, status.stdout
        assert (third / "outputs" / "apps" / "landcover-s2" / "finetuned").is_dir()

        # again: every stage cached (records and outputs from the servers), no new version
        second = trigger_retrain(api)
        assert second["state"]["type"] == "COMPLETED", second["state"]
        again = stage_states(api, run_tree(api, second["id"]))
        assert set(again) == set(states) and set(again.values()) == {"Cached"}, again
        for app, n in versions.items():
            assert len(client.search_model_versions(f"name = 'mapex-{app}'")) == n

        # faults (point 6). A new setting for landcover-s1 (its stages run again), deployed; the cpu worker's
        # machine dies (SIGKILL to everything it started) in the middle of finetune@landcover-s1
        set_params(dev, "applications.landcover-s1.finetune.steps", 9)
        git(["commit", "-q", "-am", "landcover-s1: 9 fine-tuning steps"], dev)
        git(["push", "-q", "origin", "main"], dev)
        assert mapex(["deploy"], dev, cluster.env).returncode == 0
        doomed = start_retrain(api)
        wait_stage_running(api, doomed["id"], "finetune@landcover-s1")
        kill_machine(workers["cpu"][0])
        crashed = wait_final(api, doomed["id"], 300)
        assert crashed["state"]["type"] == "CRASHED" and "no heartbeat" in crashed["state"]["message"], crashed
        # the retrain again on a new cpu worker; PostgreSQL restarts while its fine-tuning runs
        workers["cpu"] = worker_in(cluster, machines["cpu"], "cpu", "cpu-2")
        wait_online(api, {"cpu": "cpu-2"})
        recovery = start_retrain(api)
        wait_stage_running(api, recovery["id"], "finetune@landcover-s1")
        from flows import cluster as servers

        assert servers._stop(servers.Paths(cluster.dir), "postgres", signal.SIGINT, timeout=60)
        time.sleep(3)
        cluster.cli("up")  # starts what is not running: PostgreSQL
        recovery = wait_final(api, recovery["id"], 1200)
        assert recovery["state"]["type"] == "COMPLETED", (recovery["state"], workers["cpu"][1].read_text()[-4000:])
        third = stage_states(api, run_tree(api, recovery["id"]))
        # only what the crash left unfinished ran again
        assert third["prune@landcover-s1"] == "Cached"  # finished before the crash: its record was on S3
        assert third["finetune@landcover-s1"] == third["evaluate@landcover-s1"] == "Completed", third
        assert {v for k, v in third.items() if not k.endswith("@landcover-s1")} == {"Cached"}, third
        assert len(client.search_model_versions("name = 'mapex-landcover-s1'")) == versions["landcover-s1"] + 1
        assert len(client.search_model_versions("name = 'mapex-landcover-s2'")) == versions["landcover-s2"]
    finally:
        for proc, _ in workers.values():
            stop(proc)
