"""Faults of the team platform (issue 15, point 6), provoked for real on the servers of ``mapex cluster up``
(the module-scoped ``cluster`` fixture) with ``mapex worker`` processes:

* a worker machine killed with SIGKILL mid-stage (worker, flow-run process and stage process): the flow run is
  marked CRASHED by the server's automation (:func:`flows.faults.ensure_crash_detection`) once its heartbeats
  stop, and a new run of the deployment completes;
* PostgreSQL restarted under a flow run in flight and under clients of MLflow and Prefect: every client call
  succeeds (retried), the registry lock that failed meanwhile is retried by the flows' retry condition, the run
  completes (and is not mistaken for a crashed one);
* the object store down: ``dvc push`` / ``dvc pull`` and an MLflow artifact upload fail with an error that names
  the remote and is transient (:mod:`mapex_core.remote_errors`).

The flows below run on the workers (they import this module by its path ``tests.test_cluster_faults``). The
tests without servers check the classification and the automation's definition.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, task

from flows.pipeline import RETRY
from tests.cluster_support import Cluster, http_json, stop

MODULE = "tests.test_cluster_faults"  # how the workers' flow-run processes import the flows of this file


# ----- flows run by the workers -------------------------------------------------------------------
@task(name="stage", cache_policy=None)
def stage_process(seconds: float, pid_file: str) -> float:
    """A stage: its own process (as ``lineage.run_stage`` starts one), pids and heartbeat period written down."""
    from prefect.settings import get_current_settings

    proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    Path(pid_file).write_text(json.dumps({"flow": os.getpid(), "stage": proc.pid,
                                          "heartbeat_s": get_current_settings().flows.heartbeat_frequency}))
    if proc.wait() != 0:
        raise RuntimeError(f"stage process exited {proc.returncode}")
    return seconds


@flow(name="fault-sleeper")
def sleeper(seconds: float, pid_file: str) -> float:
    """One stage that runs ``seconds``."""
    return stage_process(seconds, pid_file)


@task(name="registry-lock-loop", cache_policy=None, **RETRY)
def lock_loop(until: float, marker: str) -> int:
    """Take and release the registry's PostgreSQL lock until ``until`` (what a registration does)."""
    from mapex_core.tracking.lock import registry_lock

    Path(marker).touch()
    n = 0
    while time.time() < until:
        with registry_lock("."):
            n += 1
        time.sleep(0.2)
    return n


@task(name="mlflow-loop", cache_policy=None, **RETRY)
def mlflow_loop(until: float, marker: str) -> dict[str, Any]:
    """Log a metric to the MLflow server every 0.3 s until ``until`` (what a training stage does)."""
    import mlflow

    mlflow.set_experiment("faults-in-flight")
    with mlflow.start_run() as run:
        Path(marker).touch()
        step = 0
        while time.time() < until:
            mlflow.log_metric("step", step, step=step)
            step += 1
            time.sleep(0.3)
    return {"run_id": run.info.run_id, "steps": step}


@flow(name="fault-through-restart")
def through_restart(seconds: float, folder: str) -> dict[str, Any]:
    """The registry lock and MLflow logging at once for ``seconds`` (their retries share one deadline)."""
    until = time.time() + seconds
    locks = lock_loop.submit(until, f"{folder}/lock-started")
    logged = mlflow_loop.submit(until, f"{folder}/mlflow-started")
    return {"locks": locks.result(), "mlflow": logged.result()}


# ----- helpers ------------------------------------------------------------------------------------
def _deploy(cluster: Cluster, fn: Any, name: str, work: Path) -> str:
    """Deployment ``<flow>/<name>`` of ``fn`` on pool cpu, tagged ``mapex`` (watched by the crash detection)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    work.mkdir(parents=True, exist_ok=True)
    dep = fn.to_deployment(name=name, work_pool_name="cpu", tags=["mapex"], entrypoint_type=EntrypointType.MODULE_PATH,
                           job_variables={"working_dir": str(work)})
    dep.entrypoint = f"{MODULE}.{fn.__name__}"  # pytest imports this file as `test_cluster_faults`
    with temporary_settings({PREFECT_API_URL: cluster.client["PREFECT_API_URL"]}):
        return str(dep.apply())


def _worker(cluster: Cluster, name: str) -> tuple[subprocess.Popen, Path]:
    """`mapex worker --pool cpu` in its own session (a machine of its own), online; its log."""
    folder = cluster.root / f"{name}-machine"
    folder.mkdir(exist_ok=True)
    log = folder / "worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "worker", "--pool", "cpu", "--name", name,
                             "--env-file", str(cluster.dir / "env")], cwd=folder,
                            env={**cluster.base, "PREFECT_LOGGING_LEVEL": "INFO"}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    api, deadline = cluster.client["PREFECT_API_URL"], time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        workers = _api(f"{api}/work_pools/cpu/workers/filter", "POST", {}) or []
        if any(w["name"] == name and w["status"] == "ONLINE" for w in workers):
            return proc, log
        time.sleep(1)
    stop(proc)
    raise AssertionError(f"worker {name} not online within 120 s: {log.read_text()[-3000:]}")


def _api(url: str, method: str = "GET", body: Any = None) -> Any:
    """``http_json``, ``None`` while the server answers 5xx or not at all (the tests poll through a restart)."""
    try:
        return http_json(url, method, body)
    except urllib.error.HTTPError as exc:
        if exc.code < 500:
            raise
    except OSError:
        pass
    return None


def _run(cluster: Cluster, deployment_id: str, parameters: dict[str, Any]) -> str:
    api = cluster.client["PREFECT_API_URL"]
    return http_json(f"{api}/deployments/{deployment_id}/create_flow_run", "POST", {"parameters": parameters})["id"]


def _wait_state(cluster: Cluster, run_id: str, types: set[str], timeout: float) -> dict[str, Any]:
    """The flow run's state once its type is one of ``types`` (or the last one seen after ``timeout``)."""
    api, deadline, state = cluster.client["PREFECT_API_URL"], time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        got = _api(f"{api}/flow_runs/{run_id}")
        state = got["state"] if got else state
        if state and state["type"] in types:
            return state
        time.sleep(2)
    return state


def _wait_file(path: Path, timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not path.exists():
        time.sleep(0.5)
    assert path.exists(), why


START_SERVICE = """
import sys
from pathlib import Path
from flows import cluster as c
paths = c.Paths(Path(sys.argv[1]))
getattr(c, f"start_{sys.argv[2]}")(paths, c.load_state(paths))
"""


def _start(cluster: Cluster, service: str) -> None:
    """Start ``service`` (``postgres`` or ``s3``) again from a process that exits at once, as ``mapex cluster up``
    does: the server is not this test's child (a child left unreaped after its stop would hang ``cluster down``)."""
    res = subprocess.run([sys.executable, "-c", START_SERVICE, str(cluster.dir), service], cwd=cluster.root,
                         env=cluster.base, capture_output=True, text=True, timeout=200, check=False)
    assert res.returncode == 0, f"start {service}: {res.stderr[-3000:]}"


def _heartbeats(cluster: Cluster, run_id: str) -> list[str]:
    """When the server received the flow run's heartbeat events (ISO times)."""
    got = _api(f"{cluster.client['PREFECT_API_URL']}/events/filter", "POST", {"filter": {
        "event": {"name": ["prefect.flow-run.heartbeat"]}, "resource": {"id": [f"prefect.flow-run.{run_id}"]}},
        "limit": 50}) or {"events": []}
    return sorted(e["occurred"] for e in got["events"])


# ----- (a) a worker machine dies mid-stage ----------------------------------------------------------
@pytest.mark.slow
def test_a_killed_worker_s_flow_run_is_marked_crashed_and_a_new_run_completes(cluster: Cluster) -> None:
    import psutil

    from flows.faults import CRASH_AUTOMATION, ensure_crash_detection

    api = cluster.client["PREFECT_API_URL"]
    first = ensure_crash_detection(api)  # `mapex cluster up` created it already
    assert (first["action"], first["within_s"]) == ("unchanged", 90)
    assert ensure_crash_detection(api)["action"] == "unchanged"  # idempotent (`mapex deploy` and `cluster up`)
    assert ensure_crash_detection(api, heartbeat_s=40)["action"] == "updated"
    assert ensure_crash_detection(api) == first | {"action": "updated"}
    autos = http_json(f"{api}/automations/filter", "POST", {})
    assert [a["name"] for a in autos].count(CRASH_AUTOMATION) == 1
    (auto,) = [a for a in autos if a["name"] == CRASH_AUTOMATION]
    assert (auto["trigger"]["posture"], auto["trigger"]["within"]) == ("Proactive", 90.0)

    work = cluster.root / "a-work"
    dep = _deploy(cluster, sleeper, "sleep", work)
    proc, log = _worker(cluster, "doomed")
    try:
        run_id = _run(cluster, dep, {"seconds": 600, "pid_file": str(work / "pids.json")})
        _wait_file(work / "pids.json", 180, f"the stage never started: {log.read_text()[-3000:]}")
        pids = json.loads((work / "pids.json").read_text())
        assert pids["heartbeat_s"] == 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY from `mapex worker`'s environment
        assert _wait_state(cluster, run_id, {"RUNNING"}, 60)["type"] == "RUNNING"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _heartbeats(cluster, run_id):
            time.sleep(2)
        beats = _heartbeats(cluster, run_id)
        assert beats, "no heartbeat event of the flow run reached the server"
        # the machine dies: worker, flow-run process (Prefect starts it in a session of its own) and stage process
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert {pids["flow"], pids["stage"]} <= {p.pid for p in tree}
        groups = {os.getpgid(p.pid) for p in tree if p.is_running()}
        assert os.getpgid(0) not in groups
        for group in groups:
            os.killpg(group, signal.SIGKILL)
        killed_at = time.monotonic()
        gone, alive = psutil.wait_procs(tree, timeout=20)
        assert not alive and {p.pid: p.returncode for p in gone}[proc.pid] == -signal.SIGKILL  # reaped by psutil
        state = _wait_state(cluster, run_id, {"CRASHED", "COMPLETED", "FAILED", "CANCELLED"}, 180)
        crashed_after = time.monotonic() - killed_at
        print(f"flow run CRASHED {crashed_after:.0f} s after SIGKILL (last heartbeat before it at {beats[-1]})")
        assert state["type"] == "CRASHED", state
        assert "no heartbeat for 90 s" in state["message"]
        assert crashed_after < 180
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # a new run of the deployment (on another machine) completes
    proc, log = _worker(cluster, "survivor")
    try:
        again = _run(cluster, dep, {"seconds": 2, "pid_file": str(work / "pids-again.json")})
        state = _wait_state(cluster, again, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, 180)
        assert state["type"] == "COMPLETED", (state, log.read_text()[-3000:])
    finally:
        stop(proc)


# ----- (b) PostgreSQL restarts under the servers ----------------------------------------------------
CLIENT_LOOP = r"""
import json, os, sys, threading, time
from flows.cluster import worker_env
os.environ.update(worker_env(sys.argv[1]))  # what `mapex worker` runs with: heartbeats, client retries
import mlflow
from prefect import get_client

seconds = float(sys.argv[2])
calls, failures = [], []

def loop(kind, call):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.time()
        try:
            call()
        except Exception as exc:
            failures.append(f"{kind}: {type(exc).__name__}: {exc}"[:500])
        calls.append((kind, t0, time.time()))
        if {k for k, _, _ in calls} == {"mlflow", "prefect"}:
            open(sys.argv[3], "a").close()  # both clients are calling
        time.sleep(0.3)

def mlflow_calls():
    mlflow.set_experiment("faults-client")
    with mlflow.start_run():
        step = iter(range(10**6))
        loop("mlflow", lambda: mlflow.log_metric("step", next(step), step=0))

def prefect_calls():
    with get_client(sync_client=True) as client:
        loop("prefect", lambda: (client.read_work_pool("cpu"), client.read_flow_runs(limit=1)))

threads = [threading.Thread(target=f) for f in (mlflow_calls, prefect_calls)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"calls": calls, "failures": failures}))
"""


@pytest.mark.slow
def test_a_postgresql_restart_is_ridden_out_by_servers_clients_and_a_flow_run_in_flight(cluster: Cluster) -> None:
    from mlflow import MlflowClient

    from flows import cluster as servers

    work = cluster.root / "b-work"
    dep = _deploy(cluster, through_restart, "through-restart", work)
    proc, log = _worker(cluster, "steady")
    paths = servers.Paths(cluster.dir)
    client = None
    try:
        run_id = _run(cluster, dep, {"seconds": 45, "folder": str(work)})
        for what in ("lock", "mlflow"):
            _wait_file(work / f"{what}-started", 180, f"task {what} never started: {log.read_text()[-3000:]}")
        client = subprocess.Popen([sys.executable, "-c", CLIENT_LOOP, str(cluster.dir / "env"), "30",
                                   str(work / "client-calling")], cwd=cluster.root, env=cluster.base,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_file(work / "client-calling", 120, "the client never called both servers")
        time.sleep(2)
        stopped_at = time.time()
        assert servers._stop(paths, "postgres", signal.SIGINT, timeout=60)
        time.sleep(3)
        _start(cluster, "postgres")
        started_at = time.time()
        print(f"PostgreSQL down for {started_at - stopped_at:.1f} s (stop, 3 s, start)")
        out, err = client.communicate(timeout=400)
        assert client.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert report["failures"] == []  # every call succeeded, in time (client retries)
        for kind in ("mlflow", "prefect"):
            spans = [(t0, t1) for k, t0, t1 in report["calls"] if k == kind]
            across = [t1 - t0 for t0, t1 in spans if t0 < started_at and t1 > stopped_at]
            assert across, f"no {kind} call met the outage"
            print(f"{kind}: {len(spans)} calls, the slowest {max(t1 - t0 for t0, t1 in spans):.1f} s "
                  f"({len(across)} met the outage)")
            assert max(t1 - t0 for t0, t1 in spans) < 120
        final = _wait_state(cluster, run_id, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, 240)
        assert final["type"] == "COMPLETED", (final, log.read_text()[-4000:])
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(10)
        if servers.running_pid(paths, "postgres") is None:
            _start(cluster, "postgres")
        stop(proc)
    tasks = {t["name"].split("-")[0]: t for t in http_json(f"{cluster.client['PREFECT_API_URL']}/task_runs/filter",
                                                            "POST", {"flow_runs": {"id": {"any_": [run_id]}}})}
    # the lock reconnects for up to 60 s (a lock held on a connection the restart cut fails as ConnectionError,
    # and the retry condition retries it): either way the task completes
    assert tasks["registry"]["state"]["type"] == "COMPLETED" and 1 <= tasks["registry"]["run_count"] <= 3
    assert tasks["mlflow"]["state"]["type"] == "COMPLETED" and tasks["mlflow"]["run_count"] == 1  # MLflow's retries
    result = http_json(f"{cluster.client['PREFECT_API_URL']}/flow_runs/{run_id}")
    assert result["state"]["type"] == "COMPLETED"
    print(f"registry-lock task ran {tasks['registry']['run_count']} times, mlflow task {tasks['mlflow']['run_count']}")
    tracking = MlflowClient(tracking_uri=cluster.client["MLFLOW_TRACKING_URI"])
    exp = tracking.get_experiment_by_name("faults-in-flight")
    (last,) = tracking.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    steps = {m.step for m in tracking.get_metric_history(last.info.run_id, "step")}
    assert steps == set(range(len(steps))) and len(steps) > 30  # every metric of the last attempt, none lost


# ----- (c) the object store is down ---------------------------------------------------------------
def _sh(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, f"{args}: {res.stdout}{res.stderr}"


ARTIFACT_UPLOAD = r"""
import json, pathlib, sys, mlflow
from mapex_core.remote_errors import remote_errors
from mapex_core.errors import exit_status
from flows.pipeline import is_transient
pathlib.Path("weights.bin").write_bytes(b"w" * 4096)
mlflow.set_experiment("faults-s3")
with mlflow.start_run() as run:
    try:
        with remote_errors("MLflow artifact store", run.info.artifact_uri, mlflow.get_tracking_uri()):
            mlflow.log_artifact("weights.bin")
        print(json.dumps({"error": None}))
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc), "transient": is_transient(exc),
                          "exit": exit_status(exc)}))
"""


@pytest.mark.slow
def test_the_object_store_down_is_named_and_transient(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from dvc.repo import Repo

    from flows import cluster as servers
    from flows.cluster import configure_dvc_remote
    from flows.pipeline import is_transient
    from mapex_core.errors import exit_status
    from mapex_core.remote_errors import RemoteUnavailable, dvc_remote_errors

    env = cluster.env | {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
                         "GIT_COMMITTER_EMAIL": "t@example.org", "DVC_NO_ANALYTICS": "1"}
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "DVC_SITE_CACHE_DIR",
              "DVC_NO_ANALYTICS"):
        monkeypatch.setenv(k, env[k])  # what DVC reads in this process
    origin, clone = cluster.root / "c-origin", cluster.root / "c-clone"
    (origin / "data").mkdir(parents=True)
    payload = os.urandom(100_000)
    (origin / "data" / "chips.bin").write_bytes(payload)
    dvc = str(Path(sys.executable).parent / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "add", "-q", "data"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "data"]):
        _sh(cmd, origin, env)
    _sh(["git", "clone", "-q", str(origin), str(clone)], cluster.root, env)
    for repo in (origin, clone):
        assert configure_dvc_remote(repo, env) == "s3://mapex/dvc"
    endpoint = cluster.client["MAPEX_DVC_ENDPOINT"]
    with dvc_remote_errors(origin), Repo(str(origin)) as r:  # the store answers: the wrapper changes nothing
        assert r.push() == 2
    (origin / "data" / "more.bin").write_bytes(os.urandom(50_000))
    _sh([dvc, "add", "-q", "data"], origin, env)

    paths, state = servers.Paths(cluster.dir), cluster.state
    assert servers._stop(paths, "s3", signal.SIGTERM)
    servers._remove_s3_sockets(state)
    try:
        for op, repo in (("push", origin), ("pull", clone)):
            t0 = time.monotonic()
            with pytest.raises(RemoteUnavailable) as got, dvc_remote_errors(repo), Repo(str(repo)) as r:
                getattr(r, op)()
            print(f"dvc {op} with the store down failed after {time.monotonic() - t0:.1f} s: {got.value}")
            assert str(got.value).startswith(f"DVC remote 'cluster' s3://mapex/dvc at {endpoint} unreachable: ")
            assert is_transient(got.value) and exit_status(got.value) == 75
            assert time.monotonic() - t0 < 120
        # an MLflow artifact upload through the (proxying) tracking server: 500s until the client gives up
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-c", ARTIFACT_UPLOAD], cwd=cluster.root, capture_output=True, text=True,
                             timeout=300, check=False, env=cluster.env | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
        upload = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
        print(f"MLflow artifact upload with the store down failed after {time.monotonic() - t0:.1f} s: {upload}")
        assert upload["error"] == "RemoteUnavailable", upload
        assert upload["message"].startswith("MLflow artifact store mlflow-artifacts:/") and \
            f" at {cluster.client['MLFLOW_TRACKING_URI']} unreachable: " in upload["message"]
        assert upload["transient"] and upload["exit"] == 75
    finally:
        if servers.running_pid(paths, "s3") is None:
            _start(cluster, "s3")
    # the store is back: the same calls, retried, succeed
    with dvc_remote_errors(origin), Repo(str(origin)) as r:
        assert r.push() == 2  # more.bin and the folder's new listing
    with dvc_remote_errors(clone), Repo(str(clone)) as r:
        r.pull()
    assert (clone / "data" / "chips.bin").read_bytes() == payload


# ----- without servers ------------------------------------------------------------------------------
def test_remote_errors_classify_what_a_retry_may_fix() -> None:
    import pickle

    from botocore.exceptions import ClientError, EndpointConnectionError

    from flows.pipeline import is_transient
    from mapex_core.errors import exit_status
    from mapex_core.remote_errors import RemoteUnavailable, remote_errors, unreachable_reason

    down = EndpointConnectionError(endpoint_url="http://127.0.0.1:9/mapex/dvc")
    with pytest.raises(RemoteUnavailable) as got, remote_errors("DVC remote 'cluster'", "s3://mapex/dvc",
                                                                "http://127.0.0.1:9"):
        raise RuntimeError("push failed") from down
    assert str(got.value) == ("DVC remote 'cluster' s3://mapex/dvc at http://127.0.0.1:9 unreachable: Could not "
                              'connect to the endpoint URL: "http://127.0.0.1:9/mapex/dvc"')
    assert got.value.errno == 111 and is_transient(got.value) and exit_status(got.value) == 75
    back = pickle.loads(pickle.dumps(got.value))  # a failed task's state carries it
    assert (type(back), str(back), back.url) == (RemoteUnavailable, str(got.value), "s3://mapex/dvc")
    slow = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
    assert unreachable_reason(slow) is not None
    # what a retry does not fix passes unchanged
    for exc in (ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Put"),
                FileNotFoundError(2, "no such file"), ValueError("bad")):
        assert unreachable_reason(exc) is None
        with pytest.raises(type(exc)), remote_errors("DVC remote 'x'", "s3://b/p"):
            raise exc
    # DVC's "N files failed" without a cause: the endpoint is asked (port 9 on loopback: nothing listens)
    from dvc.exceptions import DownloadError

    assert "127.0.0.1:9: Connection refused" in unreachable_reason(DownloadError(2), "http://127.0.0.1:9")


def test_wrapped_server_failures_are_transient_bad_requests_are_not() -> None:
    import httpx
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    from flows.pipeline import is_transient
    from mapex_core.tracking import TrackingError

    gave_up = MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-metric failed with "
                              "exception HTTPConnectionPool(...): Max retries exceeded (too many 503 error responses)")
    assert is_transient(gave_up)
    try:
        raise TrackingError(f"MLflow tracking store http://127.0.0.1:5000: {gave_up}") from gave_up
    except TrackingError as exc:
        assert is_transient(exc)  # the wrapper that names the server keeps the cause
    assert is_transient(MlflowException("db down", error_code=TEMPORARILY_UNAVAILABLE))  # the server's 503
    assert not is_transient(MlflowException("Run 'x' not found", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(TrackingError("MLflow tracking store x: experiment y was deleted"))
    request = httpx.Request("GET", "http://127.0.0.1:4200/api/work_pools/cpu")
    for code, transient in ((500, True), (503, True), (404, False), (422, False)):
        exc = httpx.HTTPStatusError("x", request=request, response=httpx.Response(code, request=request))
        assert is_transient(exc) is transient, code
    import urllib.error

    try:
        raise TrackingError("MLflow tracking server http://127.0.0.1:9 is unreachable") from urllib.error.URLError(
            ConnectionRefusedError(111, "Connection refused"))
    except TrackingError as exc:
        assert is_transient(exc)


def test_the_crash_automation_watches_heartbeats_of_tagged_runs() -> None:
    from flows.cluster import client_env
    from flows.faults import CLIENT_SETTINGS, crash_automation

    auto = crash_automation()
    trigger = auto.trigger.model_dump(mode="json")
    assert (trigger["after"], trigger["expect"], trigger["posture"], trigger["threshold"], trigger["within"]) == (
        ["prefect.flow-run.heartbeat"], ["prefect.flow-run.*"], "Proactive", 1, 90.0)
    assert trigger["match_related"] == {"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.mapex"}
    assert [(a.type, a.state.value) for a in auto.actions] == [("change-flow-run-state", "CRASHED")]
    assert crash_automation(heartbeat_s=60, missed=4).trigger.within.total_seconds() == 240
    state = {"ports": {"postgres": 1, "s3": 2, "mlflow": 3, "prefect": 4},
             "secrets": {"db_password": "d", "lock_password": "l", "s3_access_key": "A", "s3_secret_key": "S"}}
    assert client_env(state).items() >= CLIENT_SETTINGS.items()  # in .cluster/env, read by workers
    assert CLIENT_SETTINGS["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
