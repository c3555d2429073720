"""Shared by the cluster tests: a cluster of ``mapex cluster up`` in a temporary folder (the ``cluster`` fixture
lives in ``conftest.py``), the ``mapex`` CLI run against it, its HTTP APIs, and workers started in folders of their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

CLIENT_VARS = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MAPEX_LOCK_URL", "AWS_ACCESS_KEY_ID",
               "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL", "MAPEX_DVC_REMOTE", "MAPEX_DVC_ENDPOINT")


def mapex(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def base_env(tmp: Path) -> dict[str, str]:
    """This environment without any cluster client setting, Prefect and DVC state kept in ``tmp``."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS}
    return env | {"PREFECT_HOME": str(tmp / "prefect-home"), "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site"),
                  "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


class Cluster:
    """A cluster in ``root/.cluster``: its state (ports, credentials) and the environment a worker gets."""

    def __init__(self, root: Path) -> None:
        self.root, self.dir = root, root / ".cluster"
        self.base = base_env(root)

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.dir / "cluster.json").read_text())

    @property
    def client(self) -> dict[str, str]:
        from flows.cluster import read_env_file

        return read_env_file(self.dir / "env")

    @property
    def env(self) -> dict[str, str]:
        return self.base | self.client

    def cli(self, *args: str) -> dict[str, Any]:
        res = mapex(["cluster", *args, "--dir", str(self.dir)], self.root, self.base)
        assert res.returncode == 0, f"mapex cluster {' '.join(args)}: {res.stderr[-3000:]}"
        return json.loads(res.stdout)

    def pg(self, database: str = "postgres") -> Any:
        import psycopg2

        from flows.cluster import db_url

        return psycopg2.connect(db_url(self.state, database), connect_timeout=5)

    def s3_keys(self, prefix: str) -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.client["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=self.client["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=self.client["AWS_SECRET_ACCESS_KEY"])
        return [o["Key"] for o in s3.list_objects_v2(Bucket="mapex", Prefix=prefix).get("Contents", [])]


def http_json(url: str, method: str = "GET", body: Any = None) -> Any:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    return json.loads(text) if text else None


def start_worker(cluster: Cluster, pool: str, name: str) -> tuple[subprocess.Popen, Path]:
    """`mapex worker --pool POOL` in a folder of its own, reading the cluster's env file; its log file."""
    folder = cluster.root / f"{name}-machine"
    folder.mkdir(exist_ok=True)
    log = folder / "worker.log"
    # INFO: the worker's "submitting flow run" lines are what the test reads (`make` sets WARNING)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "worker", "--pool", pool, "--name", name,
                             "--env-file", str(cluster.dir / "env")], cwd=folder,
                            env={**cluster.base, "PREFECT_LOGGING_LEVEL": "INFO"},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    return proc, log


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def git(args: list[str], cwd: Path) -> str:
    res = subprocess.run(["git", "-c", "user.email=t@example.org", "-c", "user.name=t", *args], cwd=cwd,
                         capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, f"git {' '.join(args)} in {cwd}: {res.stderr}"
    return res.stdout.strip()


def team_repository(cluster: Cluster, ben_root: Path, params: dict[str, Any]) -> tuple[Path, Path]:
    """The team's repository: this checkout's files as they are on disk (tracked and new, not ignored) with a
    tiny ``params.yaml`` and the real sample pairs as the ``samples`` stage's output, pushed to the cluster's
    DVC remote; committed and pushed to a bare repository ``origin.git`` (the team's git server).

    Returns:
        The bare repository and the developer's clone it was pushed from.
    """
    import shutil

    import yaml

    from flows.cluster import configure_dvc_remote

    checkout = Path(__file__).resolve().parents[1]
    dev, origin = cluster.root / "developer", cluster.root / "origin.git"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=checkout, capture_output=True,
                           text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (checkout / name).is_file():
            (dev / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(checkout / name, dev / name)
    (dev / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dev / "dvc.lock").unlink(missing_ok=True)
    shutil.copytree(ben_root, dev / "data" / "raw" / "bigearthnet")
    git(["init", "-q", "-b", "main"], dev)
    env = cluster.env
    dvc = [str(Path(sys.executable).parent / "dvc")]
    for cmd in (["commit", "-q", "-f", "samples"], ["push", "-q"]):
        if cmd[0] == "push":
            configure_dvc_remote(dev, env)
        res = subprocess.run(dvc + cmd, cwd=dev, env=env, capture_output=True, text=True, check=False)
        assert res.returncode == 0, f"dvc {cmd}: {res.stderr[-2000:]}"
    git(["add", "-A"], dev)
    git(["commit", "-q", "-m", "the team's project"], dev)
    git(["init", "-q", "--bare", "-b", "main", str(origin)], cluster.root)
    git(["remote", "add", "origin", str(origin)], dev)
    git(["push", "-q", "origin", "main"], dev)
    return origin, dev


def clone(origin: Path, dest: Path, branch: str = "main") -> Path:
    """A fresh clone of ``origin``'s ``branch`` in ``dest``."""
    git(["clone", "-q", "-b", branch, str(origin), str(dest)], origin.parent)
    return dest


def worker_in(cluster: Cluster, folder: Path, pool: str, name: str) -> tuple[subprocess.Popen, Path]:
    """`mapex worker --pool POOL` run from the clone ``folder`` (its own code: no PYTHONPATH to this checkout),
    in a process group of its own (a fault test can kill the worker with everything it started); its log."""
    log = folder.parent / f"{name}.log"
    env = {k: v for k, v in cluster.base.items() if k != "PYTHONPATH"} | {"PREFECT_LOGGING_LEVEL": "INFO"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "worker", "--pool", pool, "--name", name,
                             "--env-file", str(cluster.dir / "env")], cwd=folder, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log
