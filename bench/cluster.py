"""The demo's retrain through the team's servers against `mapex retrain` with no server, in one run.

    python bench/cluster.py [--params params.yaml] [--json] [--keep]

Both retrain the same applications from the same commit and sample data, in folders of their own:

- **local**: `mapex retrain --no-samples` in one clone (Prefect's temporary API, MLflow on sqlite);
- **cluster**: `mapex cluster up` on loopback (PostgreSQL, SeaweedFS S3, MLflow with proxied artifacts,
  Prefect server), the project pushed to a bare git repository and its samples to the DVC remote,
  `mapex deploy`, a gpu and a cpu worker each in its own clone, then a run of
  `retrain/scheduled-retrain`: every flow run clones the commit and exchanges outputs through S3.

Timed: the retrain alone (servers, clones and sample data are set up before the clock starts). The
ratio cluster / local is the cost of the servers, clones, DVC pushes and pulls and flow-run handoffs
(goal <= 1.3). Nothing is written to this checkout; the temporary folder goes unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLIENT_VARS = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MAPEX_LOCK_URL")


def sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 3600) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} in {cwd} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res.stdout


def api(url: str, method: str = "GET", body: Any = None) -> Any:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    return json.loads(text) if text else None


def seed(root: Path, params: Path, env: dict[str, str]) -> Path:
    """A git + DVC project from this checkout's files (tracked and new) with ``params`` and the samples."""
    dev = root / "developer"
    files = sh(["git", "ls-files", "-co", "--exclude-standard", "-z"], ROOT, env).split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dev / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dev / name)
    shutil.copy2(params, dev / "params.yaml")
    (dev / "dvc.lock").unlink(missing_ok=True)
    git = ["git", "-c", "user.email=bench@localhost", "-c", "user.name=bench"]
    sh(git + ["init", "-q", "-b", "main"], dev, env)
    sh([str(BIN / "mapex"), "samples", "--dest", "data/raw"], dev, env)
    sh([str(BIN / "dvc"), "commit", "-q", "-f", "samples"], dev, env)
    sh(git + ["add", "-A"], dev, env)
    sh(git + ["commit", "-q", "-m", "bench project"], dev, env)
    sh(git + ["init", "-q", "--bare", "-b", "main", str(root / "origin.git")], root, env)
    sh(git + ["remote", "add", "origin", str(root / "origin.git")], dev, env)
    sh(git + ["push", "-q", "origin", "main"], dev, env)
    return root / "origin.git"


def local_run(root: Path, origin: Path, env: dict[str, str]) -> float:
    """`mapex retrain --no-samples` in a fresh clone (samples pulled from the developer's cache first)."""
    here = root / "local"
    sh(["git", "clone", "-q", str(origin), str(here)], root, env)
    shutil.copytree(root / "developer" / "data" / "raw", here / "data" / "raw")
    sh([str(BIN / "dvc"), "commit", "-q", "-f", "samples"], here, env)
    t0 = time.perf_counter()
    sh([str(BIN / "mapex"), "retrain", "--no-samples"], here, env)
    return time.perf_counter() - t0


def cluster_run(root: Path, origin: Path, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """The same retrain through `mapex cluster up` with a gpu and a cpu worker in clones of their own."""
    from flows.cluster import configure_dvc_remote, read_env_file

    cdir = root / ".cluster"
    sh([str(BIN / "mapex"), "cluster", "up", "--dir", str(cdir)], root, env)
    client = env | read_env_file(cdir / "env")
    dev = root / "developer"
    configure_dvc_remote(dev, client)
    sh([str(BIN / "dvc"), "push", "-q"], dev, client)
    sh([str(BIN / "mapex"), "deploy"], dev, client)
    workers = []
    try:
        for pool in ("gpu", "cpu"):
            folder = root / f"{pool}-machine" / "mapex"
            sh(["git", "clone", "-q", str(origin), str(folder)], root, env)
            log = (folder.parent / "worker.log").open("w")
            workers.append(subprocess.Popen([sys.executable, "-m", "flows.cli", "worker", "--pool", pool, "--env-file",
                                             str(cdir / "env")], cwd=folder, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True))
        url = read_env_file(cdir / "env")["PREFECT_API_URL"]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not all(
                any(w["status"] == "ONLINE" for w in api(f"{url}/work_pools/{p}/workers/filter", "POST", {}))
                for p in ("gpu", "cpu")):
            time.sleep(1)
        dep = api(f"{url}/deployments/name/retrain/scheduled-retrain")
        t0 = time.perf_counter()
        run = api(f"{url}/deployments/{dep['id']}/create_flow_run", "POST", {})
        while (run := api(f"{url}/flow_runs/{run['id']}"))["state"]["type"] not in (
                "COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            time.sleep(2)
        seconds = time.perf_counter() - t0
        if run["state"]["type"] != "COMPLETED":
            sys.exit(f"cluster retrain ended {run['state']['type']}: {run['state'].get('message')} "
                     f"(worker logs in {root}/*-machine/worker.log; rerun with --keep)")
        return seconds, run
    finally:
        for proc in workers:
            proc.terminate()
            proc.wait(60)
        subprocess.run([str(BIN / "mapex"), "cluster", "down", "--dir", str(cdir)], cwd=root, env=env,
                       capture_output=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="params file (default: the demo's)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, clones)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mapex-bench-cluster-"))
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS and k != "PYTHONPATH"}
    env |= {"PREFECT_HOME": str(root / "prefect-home"), "DVC_SITE_CACHE_DIR": str(root / "dvc-site"),
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    for k in ("MAPEX_PG_PORT", "MAPEX_S3_PORT", "MAPEX_MLFLOW_PORT", "MAPEX_PREFECT_PORT", "MAPEX_DASHBOARD_PORT"):
        env[k] = "0"  # any free port: never a running cluster's
    try:
        origin = seed(root, args.params.resolve(), env)
        local_s = local_run(root, origin, env)
        cluster_s, _ = cluster_run(root, origin, env)
        out = {"local_s": round(local_s, 1), "cluster_s": round(cluster_s, 1),
               "cluster_vs_local": round(cluster_s / local_s, 3), "goal": "<= 1.3", "cpus": os.cpu_count(),
               "load_after": round(os.getloadavg()[0], 2)}
        if args.json:
            print(json.dumps(out))
        else:
            print(f"local retrain {local_s:.1f} s, through the cluster {cluster_s:.1f} s: "
                  f"{cluster_s / local_s:.2f}x (goal <= 1.3)")
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
