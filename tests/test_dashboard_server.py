"""The team dashboard from a tracking server: two machines that share nothing but a real ``mlflow server``
register models, one publishes the page, and ``mapex dashboard --serve`` in a third folder serves it over HTTP.

The server is a real MLflow tracking server (sqlite backend, proxied artifacts in a folder of its own) on a
free loopback port; the machines are folders of their own with the real BigEarthNet chip store of the
``ben_store`` fixture, a real (tiny) pre-training on it and real tiny task models (``helpers.version_files``).
The cluster's dashboard service (``mapex cluster up``) is checked in the cluster tests.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import Elements, version_files
from tests.pipeline_project import TINY_APP, TINY_PARAMS

MAPEX = str(Path(sys.executable).parent / "mapex")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10) -> tuple[int, dict[str, str], str]:
    """Status, headers and body of ``url`` (an HTTP error's too)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - our loopback servers
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited ({proc.returncode}) before {url} answered")
        try:
            if get(url, timeout=3)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


def client_env(uri: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                                                            "MAPEX_LOCK_URL", "MAPEX_DASHBOARD_URL")}
    return env | ({"MLFLOW_TRACKING_URI": uri} if uri else {})


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on sqlite with proxied artifacts, on a free loopback port: its URL."""
    home = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
           f"sqlite:///{home / 'mlflow.db'}", "--serve-artifacts", "--artifacts-destination", str(home / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=home, env=client_env(None), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/health", proc)
        yield url
    finally:
        stop(proc)


def machine(root: Path, apps: dict[str, dict[str, Any]], ben_store: Path) -> Path:
    """A project folder of its own: params naming the real chip store, and ``apps`` with their stage outputs
    (a real tiny task model and the reports registration reads)."""
    params = copy.deepcopy(TINY_PARAMS)
    params["datasets"] = {"ben": {"source": "data/raw/bigearthnet", "out": str(ben_store)}}
    params["pipeline"] |= {"pretrain_datasets": ["ben"], "apps": list(apps)}
    params["applications"] = {a: {**copy.deepcopy(TINY_APP), "chips": str(ben_store), **extra}
                              for a, extra in apps.items()}
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    validation = ben_store.parent / "reports" / "validation" / "ben" / "validation.json"  # the fixture's ingest
    (root / "reports/validation/ben").mkdir(parents=True)
    shutil.copy(validation, root / "reports/validation/ben/validation.json")
    for seed, app in enumerate(apps, 1):
        files = version_files(root, seed, 0.4 + 0.1 * seed)
        out = root / "outputs/apps" / app
        (out / "pruned").mkdir(parents=True)
        (out / "pruned/prune_report.json").write_text(json.dumps(files["prune_report"]))
        shutil.move(files["finetuned_dir"], out / "finetuned")
        (out / "finetuned/finetune.json").write_text(json.dumps(files["finetune_summary"]))
        (root / "reports" / app).mkdir(parents=True)
        (root / "reports" / app / "evaluation.json").write_text(json.dumps(
            files["evaluation"] | {"metric": "map_macro", "test_chips": 4}))
    return root


def register(root: Path, uri: str, apps: list[str], pretrain: bool = False) -> list[dict[str, Any]]:
    """Run (in a process of its own, in ``root``) a real tiny pre-training and its registration when asked,
    then each application's registration, against the tracking server ``uri``; an ablation report in
    ``mapex ablate``'s default folder is logged as ``mapex ablate`` logs it (its run group)."""
    code = f"""
import json
from pathlib import Path
from mapex_core import stages
from mapex_core.tracking.store import log_run_group
out = []
if {pretrain!r}:
    stages.pretrain("params.yaml", device="cpu")
    out.append(stages.register_pretrained("params.yaml"))
for app in {apps!r}:
    out.append(stages.register(app, "params.yaml"))
    report = Path("reports", app, "ablation", "ablation.json")
    if report.is_file():
        log_run_group(f"ablate {{app}}", {{"app": app}}, {{}}, [], tags={{"mapex.stage": "ablate", "mapex.app": app}},
                      artifacts=[report])
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=client_env(uri), capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same(a: Any, b: Any) -> bool:
    """Equal as JSON (NaN, which routing statistics hold for modalities with no tokens, equals NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def local_view(root: Path, uri: str) -> dict[str, Any]:
    """The dashboard's data as built from the files of ``root`` (and the registry of ``uri``)."""
    import mlflow

    from mapex_core.dashboard.collect import collect

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        try:
            return json.loads(json.dumps(collect(root, root / "params.yaml"), default=str))
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def published(tracking_server: str, ben_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Machine A pre-trains and registers landcover-s2 (with a standalone sweep), machine B registers
    landcover-s1 twice (a second version) and publishes the page."""
    base = tmp_path_factory.mktemp("machines")
    a = machine(base / "a", {"landcover-s2": {"modalities": ["s2"]}}, ben_store)
    sweep = a / "outputs/apps/landcover-s2/sweep/sweep.json"
    sweep.parent.mkdir(parents=True)
    points = [{"kept_per_layer": k, "params": p, "value": v, "ci95": [v - 0.1, v + 0.1], "latency_ms": 2.0,
               "within_tolerance": ok} for k, p, v, ok in ((2, 120_000, 0.71, True), (1, 80_000, 0.55, False))]
    sweep.write_text(json.dumps({"app": "landcover-s2", "metric": "map_macro", "strategy": "reap", "tolerance": 0.02,
                                 "reference": {"kept_per_layer": 2, "value": 0.71}, "points": points,
                                 "chosen": {"index": 0, **points[0]}}))
    ablation = a / "reports/landcover-s2/ablation/ablation.json"  # the shape `mapex ablate` writes (values stand-ins)
    ablation.parent.mkdir(parents=True)
    arm = {"description": "the pruned model", "value": 0.5, "ci95": [0.4, 0.6], "per_seed": [{"train_chips": 8}],
           "params": 1000, "active_params_per_token": 500}
    ablation.write_text(json.dumps({
        "app": "landcover-s2", "metric": "map_macro", "seeds": [0], "sizes": {"train": 8, "val": 4, "test": 4},
        "budget": {"steps": 6}, "notes": ["stand-in values"],
        "arms": {"reference": arm | {"vs_reference": None},
                 "scratch": arm | {"description": "from scratch", "value": 0.4,
                                   "vs_reference": {"difference": -0.1, "ci95": [-0.2, 0.0], "conclusive": False}}}}))
    b = machine(base / "b", {"landcover-s1": {"modalities": ["s1"], "description": "registered on machine B"}},
                ben_store)
    reg_a = register(a, tracking_server, ["landcover-s2"], pretrain=True)
    reg_b = register(b, tracking_server, ["landcover-s1"])
    publish = subprocess.run([MAPEX, "dashboard", "--publish"], cwd=b, env=client_env(tracking_server),
                             capture_output=True, text=True, timeout=300, check=False)
    assert publish.returncode == 0, publish.stderr[-3000:]
    return {"a": a, "b": b, "reg_a": reg_a, "reg_b": reg_b, "publish": json.loads(publish.stdout),
            "base": base}


def test_registration_logs_what_the_page_needs_to_the_server(tracking_server: str, published: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_server)
    pre, app_a = published["reg_a"]
    listed = {f.path for f in client.list_artifacts(pre["run_id"], "pretrain")}
    assert {"pretrain/metrics.json", "pretrain/routing_stats.json", "pretrain/datasets.json"} <= listed
    listed = {f.path for f in client.list_artifacts(app_a["run_id"], "reports")}
    assert {"reports/prune_report.json", "reports/evaluation.json", "reports/sweep.json",
            "reports/datasets.json"} <= listed
    listed = {f.path for f in client.list_artifacts(published["reg_b"][0]["run_id"], "reports")}
    assert "reports/sweep.json" not in listed and "reports/datasets.json" in listed  # machine B ran no sweep


def test_the_published_page_lists_every_application_of_both_machines(tracking_server: str,
                                                                     published: dict[str, Any]) -> None:
    pub = published["publish"]
    assert pub["apps"] == ["landcover-s1", "landcover-s2"]  # the publisher's pipeline.apps first, then the others
    assert pub["versions"] == 2
    assert pub["experiment"] == "mapex-dashboard" and pub["layers"] > 0  # machine A's routing statistics


def test_dashboard_serve_in_a_third_folder_answers_with_the_published_page(tracking_server: str,
                                                                           published: dict[str, Any]) -> None:
    third = published["base"] / "c"
    third.mkdir()
    port = free_port()
    proc = subprocess.Popen([MAPEX, "dashboard", "--serve", "--port", str(port), "--refresh", "1"], cwd=third,
                            env=client_env(tracking_server), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/health", proc, timeout=120)
        status, headers, html = get(url + "/")
        assert status == 200 and headers["X-MAPEX-Dashboard-Run"] == published["publish"]["run_id"]
        page = Elements(html)
        assert sorted(c["data-app"] for c in page.find("article", class_="card")) == ["landcover-s1", "landcover-s2"]
        text = " ".join(page.text)
        assert "from the tracking server" in text and "registered on machine B" in text
        assert [d["data-app"] for d in page.find("div", class_="sweep")] == ["landcover-s2"]  # machine A's sweep
        assert "No routing statistics yet" not in text and "Not pre-trained yet" not in text
        data = json.loads(get(url + "/dashboard.json")[2])
        assert data["source"] == "server" and data["tracking_uri"] == tracking_server
        # what machine A's own disk shows of its application and chip store, every machine now sees
        local = local_view(published["a"], tracking_server)
        served = {a["name"]: a for a in data["apps"]}["landcover-s2"]
        mine = {a["name"]: a for a in local["apps"]}["landcover-s2"]
        for key in ("evaluation", "prune", "versions", "gate", "modalities", "task", "metric"):
            assert same(served[key], mine[key]), key
        assert same(served["sweep"]["points"], mine["sweep"]["points"]) and served["sweep"]["chosen"] == 0
        assert same(data["datasets"], local["datasets"]) and data["datasets"][0]["store"]["chips"] > 0
        assert same(data["pretrain"]["routing"], local["pretrain"]["routing"])
        assert same(data["pretrain"]["metrics"], local["pretrain"]["metrics"])
        assert {a["name"]: a["in_pipeline"] for a in data["apps"]} == {"landcover-s1": True, "landcover-s2": False}
        (abl,), (mine_abl,) = data["ablations"], local["ablations"]  # machine A's `mapex ablate`, from its run
        assert abl["source"].startswith("MLflow run ") and abl["mlflow_run"] == abl["source"].removeprefix("MLflow run ")
        assert same({k: v for k, v in abl.items() if k not in ("source", "mlflow_run")},
                    {k: v for k, v in mine_abl.items() if k not in ("source", "mlflow_run")})
        assert [t["data-arm"] for t in page.find("tr") if "data-arm" in t] == ["reference", "scratch"]
        assert not list(third.iterdir())  # nothing written in the serving folder
        # a newer page published from machine A is served without a restart
        again = subprocess.run([MAPEX, "dashboard", "--publish"], cwd=published["a"], env=client_env(tracking_server),
                               capture_output=True, text=True, timeout=300, check=False)
        assert again.returncode == 0, again.stderr[-3000:]
        newer = json.loads(again.stdout)["run_id"]
        deadline = time.monotonic() + 60
        while get(url + "/")[1].get("X-MAPEX-Dashboard-Run") != newer:
            assert time.monotonic() < deadline, "the newer page was not picked up within 60 s"
            time.sleep(0.5)
        assert get(url + "/elsewhere")[0] == 404
    finally:
        stop(proc)


def test_the_cluster_service_serves_what_a_retrain_publishes_and_links(
        tracking_server: str, published: dict[str, Any], prefect_harness: None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboard service of ``mapex cluster up`` (started, checked and stopped by the cluster's own
    functions, here against the test's MLflow server) and the retrain's dashboard task with the cluster's
    ``MAPEX_DASHBOARD_URL``: the page is published to the server, the Prefect link points at the service."""
    import mlflow
    from prefect import flow

    from flows import cluster
    from flows.pipeline import dashboard_task
    from mapex_core.dashboard import fetch_published

    ports = cluster.choose_ports(dict.fromkeys(cluster.PORT_ENV.values(), "0"))
    ports["mlflow"] = int(tracking_server.rsplit(":", 1)[1])
    state = {"ports": ports, "dashboard": cluster.dashboard_settings(ports["dashboard"], {}),
             "secrets": {"db_password": "x", "lock_password": "y", "s3_access_key": "k", "s3_secret_key": "s"}}
    url = cluster.urls(state)["dashboard"]
    assert url == f"http://127.0.0.1:{ports['dashboard']}" and cluster.client_env(state)["MAPEX_DASHBOARD_URL"] == url
    paths = cluster.Paths(tmp_path / ".cluster")
    cluster.start_dashboard(paths, state)
    try:
        cluster._wait(paths, "dashboard", lambda: cluster.healthy("dashboard", state), timeout=120)
        served = get(url + "/")[1]["X-MAPEX-Dashboard-Run"]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
        try:
            assert served == fetch_published(tmp_path / "fetched")["run_id"]  # the newest published page

            @flow(name="dashboard-only")
            def dashboard_only() -> dict[str, Any]:
                return dashboard_task("params.yaml")

            monkeypatch.chdir(published["b"])
            monkeypatch.setenv("MAPEX_DASHBOARD_URL", url)
            summary = dashboard_only()
        finally:
            mlflow.set_tracking_uri(None)
        assert summary["index"] == url and summary["apps"] == ["landcover-s1", "landcover-s2"]
        assert not (published["b"] / "reports/dashboard").exists()  # published, not written to this disk
        from prefect import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
        from prefect.client.schemas.sorting import ArtifactSort

        with get_client(sync_client=True) as pc:
            link = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mapex-dashboard"])),
                                     sort=ArtifactSort.CREATED_DESC, limit=1)[0]
        assert link.data == f"[MAPEX dashboard: per-task models]({url})"  # a link artifact is markdown
        deadline = time.monotonic() + 60  # the service checks every DASHBOARD_REFRESH_S (10 s)
        while get(url + "/")[1].get("X-MAPEX-Dashboard-Run") != summary["run_id"]:
            assert time.monotonic() < deadline, "the service did not pick up the retrain's page within 60 s"
            time.sleep(0.5)
    finally:
        assert cluster._stop(paths, "dashboard", signal.SIGTERM)
    assert not cluster.healthy("dashboard", state)
