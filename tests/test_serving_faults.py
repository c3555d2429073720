"""Serving and the registry under hostile input and concurrency, and model folders that disagree with their
config: a real `mapex serve` process on 127.0.0.1 serving a tiny real task model registered in a temporary
sqlite store (malformed requests, kept-alive connections, the body limit, valid requests); two processes
registering the same weights or configuring a fresh store at once; crafted model folders built from tiny
real models saved by ``save_task_model``."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import tiny, version_files

ROOT = Path(__file__).resolve().parents[1]
APP = {"modalities": ["s2"], "task": "multilabel", "metric": "map_macro", "gate": {"tolerance": 0.01}}
JSON = {"Content-Type": "application/json"}
MARKER = "ECHO-MARKER"  # in request bodies: must never come back in an answer


def demo_app() -> Any:
    from mapex_core.apps import get_application

    return get_application("demo", {"applications": {"demo": APP}})


def mapex(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
          ) -> subprocess.CompletedProcess:
    env = dict(env or os.environ, PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "mapex_core.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- a real server --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`mapex serve --max-body-mb 1` of a tiny real multilabel S2 model (32 px chips), registered as
    ``mapex-demo`` in a temporary store, with the default workers (one process per CPU core: several
    wherever the tests have several cores); yields ``(port, model folder, server temp folder)``."""
    import mlflow

    from mapex_core import tracking

    root = tmp_path_factory.mktemp("serving")
    files = version_files(root, 1, 0.5)
    try:
        tracking.configure(f"sqlite:///{root}/mlflow/mlflow.db", root)
        tracking.register_app(demo_app(), **files, root=root)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    port = free_port()
    tmp = root / "server-tmp"  # the server's TMPDIR: its download folder must be gone after it stops
    tmp.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp))
    env.pop("MLFLOW_TRACKING_URI", None)
    log = root / "server.log"  # a file, not a pipe: a full pipe would block the server's access log
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mapex_core.cli", "serve", "--app", "demo", "--port",
                                 str(port), "--max-body-mb", "1"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
    try:
        for _ in range(240):
            assert proc.poll() is None, log.read_text()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/ping")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        yield port, files["finetuned_dir"], tmp
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    from mapex_core.runtime import cpu_count

    text = log.read_text()
    assert proc.returncode == 0, text  # a graceful stop ...
    assert "Traceback" not in text
    assert not list(tmp.glob("mapex-serve-*"))  # ... that removed the downloaded model
    n = cpu_count()  # the default: one worker per core, each saying how it batched when it stopped
    assert f", {n} worker process{'es' if n > 1 else ''}, " in text, text[-2000:]
    stops = re.findall(r"mapex serve: \d+ requests \(\d+ chips\) in \d+ forward passes \(process (\d+)\)", text)
    assert len(set(stops)) == len(stops) == n, text[-2000:]


def chips(n: int = 2, seed: int = 0) -> np.ndarray:
    """Physical S2 values (reflectance x 1e4) in the served model's chip shape."""
    return (np.random.default_rng(seed).random((n, 12, 32, 32)) * 3000).astype(np.float32)


def post(conn: http.client.HTTPConnection, body: bytes | Any, headers: dict[str, str] | None = None,
         chunked: bool = False) -> tuple[int, bytes]:
    """POST to /invocations on ``conn``; ``(status, body)``, and the connection must stay open."""
    sock = conn.sock
    conn.request("POST", "/invocations", body=body, headers=JSON if headers is None else headers,
                 encode_chunked=chunked)
    r = conn.getresponse()
    data = r.read()
    assert not r.will_close, (r.status, data[:200])  # the server keeps the connection ...
    assert sock is None or conn.sock is sock  # ... and this is still the first socket
    return r.status, data


def want_probabilities(model_dir: Path, x: np.ndarray) -> np.ndarray:
    """What the in-process pyfunc answers for ``x``."""
    from mlflow.pyfunc import PythonModelContext

    from mapex_core.tracking import MapexPyfunc

    p = MapexPyfunc()
    p.load_context(PythonModelContext(artifacts={"task_model": str(model_dir)}, model_config={}))
    return np.asarray(p.predict(None, {"s2": x})["probabilities"])


def test_valid_requests_are_answered_as_before(server: Any) -> None:
    port, model_dir, _ = server
    x = chips()
    want = want_probabilities(model_dir, x)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    status, body = post(conn, json.dumps({"inputs": {"s2": x.tolist()}}).encode())
    assert status == 200
    np.testing.assert_allclose(np.asarray(json.loads(body)["predictions"]["probabilities"]), want, atol=1e-5)
    assert json.loads(body)["predictions"]["classes"] == ["a", "b"]
    packed = {"b64": base64.b64encode(x.astype("<f4").tobytes()).decode(), "shape": list(x.shape)}
    status, body = post(conn, json.dumps({"inputs": {"s2": packed}}).encode(),
                        {"Content-Type": "application/json; charset=utf-8"})
    assert status == 200
    np.testing.assert_allclose(np.asarray(json.loads(body)["predictions"]["probabilities"]), want, atol=1e-5)
    conn.request("GET", "/ping")
    assert conn.getresponse().status == 200


def malformed(x: np.ndarray) -> dict[str, tuple[bytes, dict[str, str] | None, int, str]]:
    """name -> (body, headers, expected status, text the short message holds)."""
    good = json.dumps({"inputs": {"s2": x.tolist()}}).encode()
    return {
        "nested 100000 deep": (b"[" * 100_000 + b"]" * 100_000, None, 400, "nested 100000 levels deep"),
        "nested in an object": (b'{"inputs": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, None, 400, "nested"),
        "no Content-Type": (good, {}, 415, "Content-Type must be application/json"),
        "text/csv": (good, {"Content-Type": "text/csv"}, 415, "Content-Type must be application/json"),
        "form": (good, {"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
        "not JSON": (b'{"inputs": ' + MARKER.encode() * 20_000, None, 400, "valid JSON"),
        "UTF-16": (b'\xff\xfe{"inputs": "' + MARKER.encode() + b'"}', None, 400, "not valid UTF-8 (byte 0)"),
        "latin-1": (('{"inputs": "é' + MARKER + '"}').encode("latin-1"), None, 400, "not valid UTF-8"),
        "empty": (b"", None, 400, "empty request body"),
        "a list": (b"[1, 2, 3]", None, 400, "Received a list"),
        # (MLflow's message names the 'inputs' key, whether or not the signature comes from type hints)
        "unknown key": (json.dumps({MARKER * 200: 1}).encode(), None, 400, "'inputs'"),
        "contract: modality": (json.dumps({"inputs": {"s1": x[:, :2].tolist(), "note": MARKER}}).encode(), None,
                               400, "this model takes modalities ['s2']"),
        "contract: bands": (json.dumps({"inputs": {"s2": x[:, :3].tolist()}}).encode(), None, 400,
                            "expected shape (B, 12, 32, 32)"),
        "contract: base64": (json.dumps({"inputs": {"s2": {"b64": MARKER * 1000, "shape": [1]}}}).encode(), None,
                             400, "'b64' is not valid base64"),
        "charset": (good, {"Content-Type": "application/json; charset=latin-1"}, 415, "only supports UTF-8"),
    }


def test_malformed_requests_get_a_short_4xx_and_the_connection_stays_usable(server: Any) -> None:
    port, _, _ = server
    x = chips()
    good = json.dumps({"inputs": {"s2": x.tolist()}}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    assert post(conn, good)[0] == 200
    for name, (body, headers, status, text) in malformed(x).items():
        got, answer = post(conn, body, headers)
        assert got == status, (name, got, answer[:300])
        err = json.loads(answer)
        assert set(err) == {"error_code", "message"} and text in err["message"], (name, err)
        assert len(answer) < 700 and MARKER.encode() not in answer, (name, answer[:300])  # no echo
        assert "\n" not in err["message"] and "Traceback" not in err["message"]
        assert post(conn, good)[0] == 200, name  # the same connection still answers


def test_bodies_over_the_limit_get_413_before_they_are_parsed(server: Any) -> None:
    port, _, _ = server
    x = chips(12)  # 12 chips as nested lists: about 3 MB, over the 1 MiB limit of this server
    big = json.dumps({"inputs": {"s2": x.tolist()}}).encode()
    assert len(big) > 2**20
    good = json.dumps({"inputs": {"s2": x[:2].tolist()}}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    status, answer = post(conn, big)  # Content-Length says so: refused before the body is read
    assert status == 413 and len(answer) < 400
    assert "exceeds the limit of 1.0 MiB (mapex serve --max-body-mb)" in json.loads(answer)["message"]
    assert post(conn, good)[0] == 200
    pieces = (big[i:i + 65536] for i in range(0, len(big), 65536))  # chunked: counted while it arrives
    status, answer = post(conn, pieces, chunked=True)
    assert status == 413 and "exceeds the limit of 1.0 MiB" in json.loads(answer)["message"]
    assert post(conn, good)[0] == 200


def test_a_mixed_load_at_concurrency_8_drops_no_connection(server: Any) -> None:
    port, model_dir, _ = server
    x = chips(1, seed=3)
    good = json.dumps({"inputs": {"s2": x.tolist()}}).encode()
    want = want_probabilities(model_dir, x)
    bad = list(malformed(x).values())

    def client(i: int) -> list[int]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        statuses = []
        for j in range(24):
            if j % 2:
                body, headers, status, _ = bad[(i + j) % len(bad)]
                got, _ = post(conn, body, headers)
                statuses.append(got - status)  # 0 when as expected
            else:
                got, answer = post(conn, good)
                assert got == 200
                np.testing.assert_allclose(json.loads(answer)["predictions"]["probabilities"], want, atol=1e-5)
                statuses.append(0)
        conn.close()
        return statuses

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client, range(8)))
    assert [s for r in results for s in r] == [0] * 8 * 24


# ----- the guard on its own -------------------------------------------------------------------------------
def test_json_depth_counts_brackets_outside_strings_only() -> None:
    from mapex_core.tracking.server import json_depth

    for text in ('{"a": "[[[[[[[["}', '{"a\\"[[[[": 1}', '{"a": "\\\\"}', '[[["x\\n]]]]"]]]', '{"k": "\\"", "j": [[1]]}',
                 '{"inputs": {"s2": [[[[1.5, 2]]]]}}', "3", '"[["'):
        want = max((0, *_depths(json.loads(text))))
        assert json_depth(text.encode()) == want, text


def _depths(value: Any, d: int = 1) -> list[int]:
    if isinstance(value, dict):
        return [d, *(x for v in value.values() for x in _depths(v, d + 1))]
    if isinstance(value, list):
        return [d, *(x for v in value for x in _depths(v, d + 1))]
    return []


def test_an_exception_inside_the_app_is_a_short_500_not_a_dropped_connection() -> None:
    """The guard around an inner app that fails (before answering, or after sending its own 500)."""
    from mapex_core.tracking.server import GuardedApp

    async def failing(scope: dict, receive: Any, send: Any) -> None:
        await receive()
        if scope["path"] == "/invocations":
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"Internal Server Error"})  # as Starlette does
        raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")

    async def call(path: str) -> list[dict]:
        sent: list[dict] = []
        messages = [{"type": "http.request", "body": b'{"inputs": 1}', "more_body": False}]

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "path": path, "method": "POST", "headers": [(b"content-type", b"application/json")]}
        await GuardedApp(failing, 2**20)(scope, receive, send)
        return sent

    for path, message in (("/invocations", "Internal Server Error"),
                          ("/other", "internal error while answering the request (see the server log)")):
        sent = asyncio.run(call(path))  # returns: uvicorn sees a complete answer and keeps the connection
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        assert sent[0]["status"] == 500
        assert json.loads(sent[1]["body"]) == {"error_code": "INTERNAL_ERROR", "message": message}


def test_short_message_drops_the_echoed_request() -> None:
    from mapex_core.tracking.server import MESSAGE_CHARS, error_body, short_message

    echoed = f"Failed to predict data '{{'s2': array([[{MARKER}]])}}'. \nError: s2: expected shape (B, 12, 32, 32)"
    assert short_message(echoed) == "s2: expected shape (B, 12, 32, 32)"
    decode = f"Ensure that input is a valid JSON formatted string. Error: 'x'\nInput: \n{MARKER * 100}\n"
    assert MARKER not in short_message(decode)
    assert len(short_message("x" * 10_000)) == MESSAGE_CHARS
    body = json.loads(error_body(400, json.dumps({"error_code": "BAD_REQUEST", "message": echoed,
                                                  "stack_trace": "Traceback ..."}).encode()))
    assert body == {"error_code": "BAD_REQUEST", "message": "s2: expected shape (B, 12, 32, 32)"}


# ----- the registry under concurrency ---------------------------------------------------------------------
def _register_same(root: str, files: dict[str, Any], barrier: Any, results: Any) -> None:
    os.chdir(root)
    from mapex_core import tracking

    tracking.configure()
    barrier.wait()  # both processes check "already registered?" at the same moment
    res = tracking.register_app(demo_app(), **files)
    results.put((res["version"], res["new"]))


def _at_once(target: Any, *args: Any) -> list[Any]:
    """Run ``target(*args, barrier, results)`` in two spawned processes that start together; their results."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        if p.is_alive():
            p.terminate()
    assert [p.exitcode for p in procs] == [0, 0]
    return [results.get(timeout=5) for _ in procs]


def test_two_processes_registering_the_same_weights_create_one_version(store: Path) -> None:
    from mapex_core import tracking

    files = version_files(store, 1, 0.5)
    assert sorted(_at_once(_register_same, str(store), files)) == [("1", False), ("1", True)]
    assert [v["version"] for v in tracking.registry_state("demo")["versions"]] == ["1"]


def _configure(root: str, barrier: Any, results: Any) -> None:
    os.chdir(root)
    from mapex_core import tracking

    barrier.wait()  # both processes meet a store that does not exist yet
    try:
        tracking.configure()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(f"{type(exc).__name__}: {exc}")


def test_two_processes_configuring_a_fresh_store_at_once_both_succeed(tmp_path: Path) -> None:
    import sqlite3

    assert _at_once(_configure, str(tmp_path)) == ["ok", "ok"]  # before the fix: "table ... already exists"
    with sqlite3.connect(tmp_path / "mlflow" / "mlflow.db") as db:
        assert db.execute("SELECT count(*) FROM experiments WHERE name = 'mapex'").fetchone() == (1,)


# ----- model folders that disagree with their config ------------------------------------------------------
@pytest.fixture(scope="module")
def task_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny real task models saved by ``save_task_model``: a segmentation (S1) and a multiclass (S1 + S2 L1C) one."""
    from mapex_core.model.heads import save_task_model

    root = tmp_path_factory.mktemp("task_models")
    return {"segmentation": save_task_model(tiny("segmentation", ("s1",)), root / "segmentation"),
            "multiclass": save_task_model(tiny("multiclass", ("s1", "s2l1c")), root / "multiclass")}


def craft(src: Path, dst: Path, file: str, **changes: Any) -> Path:
    """A copy of model folder ``src`` whose ``file`` (config.json or task.json) has ``changes``."""
    shutil.copytree(src, dst)
    data = json.loads((dst / file).read_text())
    data.update(changes)
    (dst / file).write_text(json.dumps(data))
    return dst


# (model, file, changes, the field the error must name, what else it says)
CRAFTED = [
    ("segmentation", "config.json", {"dim": 64}, "'dim' = 64", "does not match the weights"),
    ("multiclass", "config.json", {"dim": 16}, "'dim' = 16", "does not match the weights"),
    ("segmentation", "config.json", {"depth": 4}, "'depth' = 4", "encoder blocks: 2 in model.safetensors"),
    ("multiclass", "config.json", {"depth": 1_000_000}, "'depth' = 1000000", "must be an integer in [1, 256]"),
    ("multiclass", "config.json", {"experts_per_modality": 3}, "'experts_per_modality' = 3", "router"),
    ("segmentation", "config.json", {"shared_experts": 2}, "'shared_experts' = 2", "router"),
    ("multiclass", "config.json", {"patch_size": 16}, "'patch_size' = 16", "patch_embed"),
    ("segmentation", "config.json", {"patch_size": 16}, "'patch_size' = 16", "head upsampling stages"),
    ("multiclass", "config.json", {"mlp_ratio": 2.0}, "'mlp_ratio' = 2.0", "fc1"),
    ("multiclass", "config.json", {"moe_every": 1}, "'moe_every' = 1", "MoE blocks"),
    ("multiclass", "config.json", {"modalities": ["s1"]}, "'modalities' = ['s1']", "patch embedding"),
    ("multiclass", "config.json", {"img_size": 2**30}, "'img_size' = 1073741824", "[1, 8192]"),
    ("multiclass", "config.json", {"decoder_dim": 10**8}, "'decoder_dim' = 100000000", "[4, 16384]"),
    ("multiclass", "config.json", {"decoder_depth": -1}, "'decoder_depth' = -1", "[0, 256]"),
    ("multiclass", "config.json", {"heads": 0}, "'heads' = 0", "[1, 256]"),
    ("multiclass", "config.json", {"dim": "32"}, "'dim' = '32'", "must be an integer"),
    ("segmentation", "config.json", {"normalization": {"s1": {"mean": [0.0], "std": [1.0, 1.0]}}},
     "'normalization.s1.mean'", "one per band"),
    ("multiclass", "task.json", {"class_names": ["a", "b", "c", "d"]}, "'class_names' = ['a', 'b', 'c', 'd']",
     "head.fc.weight"),
    ("segmentation", "task.json", {"class_names": ["dry", "water", "cloud"]}, "'class_names'", "head.out.weight"),
    ("segmentation", "task.json", {"head_channels": 16}, "'head_channels' = 16", "head.proj.weight"),
    ("multiclass", "task.json", {"head_channels": 10**9}, "'head_channels' = 1000000000", "[1, 4096]"),
    ("segmentation", "task.json", {"task": "multiclass"}, "'task' = 'multiclass'", "head type"),
    ("segmentation", "task.json", {"input_modalities": ["s1", "s2"]}, "'input_modalities'", "modalities ['s1']"),
]


@pytest.mark.parametrize(("model", "file", "changes", "field", "detail"), CRAFTED,
                         ids=[f"{m}-{'-'.join(c)}" for m, _, c, _, _ in CRAFTED])
def test_a_model_folder_that_disagrees_with_its_config_is_a_clear_error(
        task_models: dict[str, Path], tmp_path: Path, model: str, file: str, changes: dict[str, Any], field: str,
        detail: str) -> None:
    from mapex_core.model.heads import load_task_model

    folder = craft(task_models[model], tmp_path / "crafted", file, **changes)
    with pytest.raises(ValueError) as err:
        load_task_model(folder)
    msg = str(err.value)
    assert str(folder) in msg and file in msg and field in msg and detail in msg, msg
    assert "\n" not in msg


def test_the_untouched_models_load(task_models: dict[str, Path]) -> None:
    import torch

    from mapex_core.model.heads import load_task_model

    for task, folder in task_models.items():
        model = load_task_model(folder)
        original = tiny(task, ("s1",) if task == "segmentation" else ("s1", "s2l1c"))
        for (k, a), (k2, b) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(a, b)


def test_a_pretrained_folder_is_checked_too(tmp_path: Path) -> None:
    from mapex_core.model import MapexConfig, MapexModel, load_model
    from mapex_core.model.serialization import save_model

    cfg = MapexConfig(modalities=["s1"], dim=32, depth=2, heads=2, experts_per_modality=2, top_k=1, decoder_dim=16,
                      decoder_depth=1, decoder_heads=2)
    src = save_model(MapexModel(cfg), tmp_path / "pretrained")
    assert load_model(src).config.to_dict() == cfg.to_dict()
    for changes, field in (({"decoder_dim": 32}, "'decoder_dim' = 32"), ({"decoder_depth": 3}, "'decoder_depth' = 3"),
                           ({"dim": 64}, "'dim' = 64")):
        folder = craft(src, tmp_path / "-".join(changes), "config.json", **changes)
        with pytest.raises(ValueError, match=field) as err:
            load_model(folder)
        assert str(folder) in str(err.value)


@pytest.mark.parametrize(("file", "changes", "text"), [
    ("config.json", {"depth": 1_000_000}, "field 'depth' = 1000000 must be an integer in [1, 256]"),
    ("config.json", {"dim": 64}, "config.json field 'dim' = 64 does not match the weights"),
    ("task.json", {"class_names": ["a", "b"]}, "task.json field 'class_names' = ['a', 'b'] does not match"),
], ids=["depth-1000000", "dim", "class_names"])
def test_mapex_info_on_a_crafted_folder_is_one_line_and_exit_1(task_models: dict[str, Path], tmp_path: Path,
                                                             file: str, changes: dict[str, Any], text: str) -> None:
    folder = craft(task_models["multiclass"], tmp_path / "crafted", file, **changes)
    t0 = time.monotonic()
    res = mapex("info", str(folder), cwd=tmp_path, timeout=120)
    assert res.returncode == 1, res.stderr
    assert time.monotonic() - t0 < 60  # refused before anything is built (a million blocks took minutes)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(folder) in lines[0] and text in lines[0], lines
    good = mapex("info", str(task_models["multiclass"]), cwd=tmp_path, timeout=120)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["classes"] == ["a", "b", "c"]


def test_serve_refuses_a_registered_model_whose_config_disagrees_with_its_weights(store: Path) -> None:
    from mapex_core import tracking

    tracking.register_app(demo_app(), **version_files(store, 1, 0.5))
    (config,) = [p for p in (store / "mlflow" / "artifacts").rglob("task_model/config.json")]
    data = json.loads(config.read_text())
    config.write_text(json.dumps(dict(data, dim=32)))  # the stored artifact, edited after registration
    res = mapex("serve", "--app", "demo", "--port", str(free_port()), cwd=store, timeout=180)
    assert res.returncode == 1, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "task_model: config.json field 'dim' = 32 does not match the weights" in lines[0]
    assert "Traceback" not in res.stderr


def test_the_default_workers_are_one_per_cpu_core_and_bad_counts_are_named() -> None:
    from mapex_core.runtime import cpu_count
    from mapex_core.tracking.server import serve_workers

    assert serve_workers() == serve_workers(None) == cpu_count() >= 1
    assert serve_workers(3) == 3
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="--workers must be a whole number of processes >= 1"):
            serve_workers(bad)


def test_a_worker_that_cannot_load_the_model_stops_the_server_with_one_error_line(store: Path) -> None:
    """Several workers, none can load the model: uvicorn would restart them for ever; the server stops
    instead, with one error line that names the reason, exit 1, and its download removed."""
    from mapex_core import tracking

    tracking.register_app(demo_app(), **version_files(store, 1, 0.5))
    codes = list((store / "mlflow" / "artifacts").rglob("mapex_pyfunc.py"))  # the model's code (models-from-code)
    assert codes
    for code in codes:  # the stored artifact, broken after registration (the task model folder stays valid)
        code.write_text('raise RuntimeError("BROKEN-MODEL-CODE")\n')
    tmp = store / "server-tmp"
    tmp.mkdir()
    res = mapex("serve", "--app", "demo", "--port", str(free_port()), "--workers", "2", cwd=store,
                env=dict(os.environ, TMPDIR=str(tmp)), timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "a server worker process could not load models:/mapex-demo/1" in lines[0], lines
    assert "BROKEN-MODEL-CODE" in res.stderr
    assert not list(tmp.glob("mapex-serve-*"))
