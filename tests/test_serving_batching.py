"""Adaptive batching of the served model (``mapex_core.tracking.batching``): the batcher on its own (each
caller's own rows, the batch limit, grouping, failures, waiting only for requests on their way), the real
pyfunc under concurrent callers, and concurrent requests to real ``mapex serve`` processes serving tiny real
task models (a multi-label classifier and a segmenter, Sentinel-1) on real Sen1Floods11 chips, answered as
sequential in-process predictions are, bad requests failing alone."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import real_chips, tiny

ROOT = Path(__file__).resolve().parents[1]
JSON = {"Content-Type": "application/json"}
WINDOWS = tuple((r, c) for r in range(0, 449, 64) for c in range(0, 449, 64))  # 64 chips, all finite
APPS = {"batchcls": ("multilabel", "map_macro"), "batchseg": ("segmentation", "miou")}
SIZES = (1, 3, 2, 1, 4, 1, 2, 3, 1, 2, 1, 4, 2, 1, 3, 1)  # chips per request: 36 of the 64


# ----- the batcher on its own -------------------------------------------------------------------------------
def held_forward(forward: Any) -> tuple[Any, list[int], threading.Event]:
    """``forward`` wrapped to record each batch's rows and to hold the first batch until the event is set."""
    sizes: list[int] = []
    release = threading.Event()

    def run(arrays: dict[str, np.ndarray]) -> np.ndarray:
        sizes.append(next(iter(arrays.values())).shape[0])
        if len(sizes) == 1:
            assert release.wait(60)
        return forward(arrays)

    return run, sizes, release


def wait_queued(batcher: Any, n: int) -> None:
    """Until ``n`` requests wait in ``batcher``'s queue (while its first batch is held)."""
    for _ in range(6000):
        with batcher._cond:
            if len(batcher._queue) == n and not batcher._arriving:
                return
        time.sleep(0.005)
    raise AssertionError(f"{n} requests never queued")


def held_calls(batcher: Any, sizes: list[int], release: threading.Event, call: Any, n: int) -> list[Any]:
    """``call(i)`` for ``i < n``, each from a thread of its own: the first one's batch is held until every
    other request is queued. Returns what each call returned, or its exception."""

    def one(i: int) -> Any:
        try:
            return call(i)
        except Exception as exc:  # noqa: BLE001 - compared by the test
            return exc

    with ThreadPoolExecutor(n) as pool:
        first = pool.submit(one, 0)
        while not sizes and not first.done():
            time.sleep(0.002)
        rest = [pool.submit(one, i) for i in range(1, n)]
        wait_queued(batcher, n - 1)
        release.set()
        return [first.result(60)] + [f.result(60) for f in rest]


def batched(forward: Any, inputs: list[dict[str, np.ndarray]], **kw: Any) -> tuple[list[Any], list[int], Any]:
    """Every input through one :class:`Batcher` of ``forward`` at once (see :func:`held_calls`):
    ``(each caller's rows or exception, rows of each forward, the batcher)``."""
    from mapex_core.tracking.batching import Batcher

    run, sizes, release = held_forward(forward)
    batcher = Batcher(run, **kw)

    def call(i: int) -> Any:
        with batcher.request() as rows:
            return rows(inputs[i])

    return held_calls(batcher, sizes, release, call, len(inputs)), sizes, batcher


def test_each_caller_gets_exactly_its_own_rows_within_the_batch_limit() -> None:
    rng = np.random.default_rng(0)
    inputs = [{"x": np.full((b, 3), float(i), np.float32), "y": rng.random((b, 2, 2)).astype(np.float32)}
              for i, b in enumerate((2, 1, 3, 2, 1, 4, 1, 2))]
    out, sizes, batcher = batched(lambda a: a["x"][:, 0] * 10 + a["y"].sum(axis=(1, 2)), inputs, max_batch=5,
                                  max_wait_ms=0)
    for x, got in zip(inputs, out, strict=True):
        assert got.shape == (x["x"].shape[0],)
        np.testing.assert_array_equal(got, x["x"][:, 0] * 10 + x["y"].sum(axis=(1, 2)))
    assert sizes == [2, 4, 3, 5, 2]  # the held one; then in queue order, as many as fit in 5 rows
    assert batcher.batches == 5 and batcher.rows == 16


def test_requests_of_other_shapes_are_not_mixed_and_a_larger_request_runs_whole() -> None:
    seen: list[tuple[int, ...]] = []

    def forward(a: dict[str, np.ndarray]) -> np.ndarray:
        seen.append(a["x"].shape)
        return a["x"].reshape(len(a["x"]), -1).sum(1)  # (N, ...) -> (N, prod(...)) -> (N,)

    inputs = [{"x": np.ones((1, 2, 2), np.float32)}, {"x": np.ones((2, 3, 3), np.float32)},
              {"x": np.ones((1, 2, 2), np.float32) * 2}, {"x": np.ones((6, 2, 2), np.float32)},
              {"x": np.ones((1, 3, 3), np.float32) * 3}]
    out, _, _ = batched(forward, inputs, max_batch=4, max_wait_ms=0)
    for x, got in zip(inputs, out, strict=True):
        np.testing.assert_array_equal(got, x["x"].reshape(len(x["x"]), -1).sum(1))
    # the held one; the 3x3 requests together (the 2x2 one between them waits); then the 2x2 one, and the
    # 6-row request alone and whole (over the limit of 4, and 1 + 6 would be too)
    assert seen == [(1, 2, 2), (3, 3, 3), (1, 2, 2), (6, 2, 2)]


def test_a_failing_batch_is_run_again_one_request_at_a_time() -> None:
    def forward(a: dict[str, np.ndarray]) -> np.ndarray:
        if (a["x"] < 0).any():
            raise ValueError("negative row")
        return a["x"][:, 0] + 1

    inputs = [{"x": np.full((b, 2), float(i), np.float32)} for i, b in enumerate((1, 2, 1, 3))]
    inputs.insert(2, {"x": -np.ones((2, 2), np.float32)})
    out, sizes, _ = batched(forward, inputs, max_batch=64, max_wait_ms=0)
    assert isinstance(out[2], ValueError) and "negative row" in str(out[2])
    for i, (x, got) in enumerate(zip(inputs, out, strict=True)):
        if i != 2:
            np.testing.assert_array_equal(got, x["x"][:, 0] + 1)
    assert sizes == [1, 8, 2, 2, 1, 3]  # the held one, the failed batch of 8 rows, then each of its 4 alone


def test_a_lone_request_does_not_wait_and_a_withdrawn_one_stops_the_wait() -> None:
    from mapex_core.tracking.batching import Batcher, incoming

    batcher = Batcher(lambda a: a["x"] * 2, max_batch=64, max_wait_ms=1000)
    x = {"x": np.ones((1, 2), np.float32)}
    t = time.perf_counter()
    with batcher.request() as run:
        np.testing.assert_array_equal(run(x), x["x"] * 2)
    assert time.perf_counter() - t < 0.5  # nothing else on its way: no wait for the 1000 ms

    # announced (being validated), then refused: the queued request goes as soon as it is withdrawn
    announced, refused = threading.Event(), threading.Event()

    def refused_request() -> None:
        with batcher.request():
            announced.set()
            refused.wait(60)

    th = threading.Thread(target=refused_request)
    th.start()
    assert announced.wait(60)
    timer = threading.Timer(0.2, refused.set)
    timer.start()
    t = time.perf_counter()
    with batcher.request() as run:
        run(x)
    waited = time.perf_counter() - t
    th.join()
    assert 0.15 < waited < 0.9, waited  # it waited for the announced one, and not the whole second

    # received by the server (incoming) and answered without reaching the model: the same
    entered, leave = threading.Event(), threading.Event()

    def server_side() -> None:
        with incoming():
            entered.set()
            leave.wait(60)

    th = threading.Thread(target=server_side)
    th.start()
    assert entered.wait(60)
    timer = threading.Timer(0.2, leave.set)
    timer.start()
    t = time.perf_counter()
    with batcher.request() as run:
        run(x)
    waited = time.perf_counter() - t
    th.join()
    assert 0.15 < waited < 0.9, waited


def test_a_request_counted_by_the_server_is_handed_over_once() -> None:
    import mapex_core.tracking.batching as batching

    batcher = batching.Batcher(lambda a: a["x"] + 1, max_batch=8, max_wait_ms=0)
    before = batching._incoming
    with batching.incoming():
        assert batching._incoming == before + 1
        with batcher.request() as run:
            assert batching._incoming == before  # the batcher counts it from here
            run({"x": np.zeros((1, 1), np.float32)})
    assert batching._incoming == before


def test_the_forward_thread_ends_when_idle_and_a_new_request_starts_another(monkeypatch: pytest.MonkeyPatch) -> None:
    import mapex_core.tracking.batching as batching

    monkeypatch.setattr(batching, "IDLE_S", 0.05)
    threads: list[threading.Thread] = []

    def forward(a: dict[str, np.ndarray]) -> np.ndarray:
        threads.append(threading.current_thread())
        return a["x"]

    batcher = batching.Batcher(forward, max_batch=8, max_wait_ms=0)
    for _ in range(2):
        with batcher.request() as run:
            run({"x": np.zeros((1, 1), np.float32)})
        for _ in range(400):
            if batcher._thread is None:
                break
            time.sleep(0.01)
        assert batcher._thread is None and not threads[-1].is_alive()
    assert threads[0] is not threads[1]


def test_a_batch_of_several_rows_runs_on_its_own_intra_op_threads() -> None:
    """One row: ``threads``; several: ``batch_threads`` (the thread switching only when the setting changes);
    torch's default for new threads is left as it was."""
    import torch

    from mapex_core.tracking.batching import Batcher

    seen: list[tuple[int, int]] = []  # (rows, intra-op threads of the forward)

    def forward(a: dict[str, np.ndarray]) -> np.ndarray:
        seen.append((len(a["x"]), torch.get_num_threads()))
        return a["x"] * 3

    default = torch.get_num_threads()
    batcher = Batcher(forward, max_batch=8, max_wait_ms=0, threads=1, batch_threads=2)
    for rows in (1, 2, 3, 1, 1, 4):
        x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)  # (rows, 2)
        with batcher.request() as run:
            np.testing.assert_array_equal(run({"x": x}), x * 3)
    assert seen == [(1, 1), (2, 2), (3, 2), (1, 1), (1, 1), (4, 2)]
    assert batcher.switches == 4  # 1 at the start, then 2, 1, 2
    fresh: list[int] = []
    th = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    th.start()
    th.join()
    assert fresh == [default]  # a new thread still starts with torch's default
    assert Batcher(forward, threads=1).batch_threads == 1  # unset: as a lone request


def test_settings_are_checked_and_errors_name_the_variable_or_option() -> None:
    from mapex_core.tracking.batching import (
        DEFAULT_MAX_BATCH,
        DEFAULT_MAX_WAIT_MS,
        check_settings,
        settings_from_env,
    )

    assert settings_from_env({}) == (DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS)
    assert settings_from_env({"MAPEX_SERVE_MAX_BATCH": "1", "MAPEX_SERVE_MAX_WAIT_MS": "0"}) == (1, 0.0)
    for env, text in (({"MAPEX_SERVE_MAX_BATCH": "0"}, "MAPEX_SERVE_MAX_BATCH"),
                      ({"MAPEX_SERVE_MAX_BATCH": "eight"}, "MAPEX_SERVE_MAX_BATCH"),
                      ({"MAPEX_SERVE_MAX_WAIT_MS": "nan"}, "MAPEX_SERVE_MAX_WAIT_MS"),
                      ({"MAPEX_SERVE_MAX_WAIT_MS": "-1"}, "MAPEX_SERVE_MAX_WAIT_MS")):
        with pytest.raises(ValueError, match=text):
            settings_from_env(env)
    with pytest.raises(ValueError, match="--max-wait-ms.*1000"):
        check_settings(8, 5000, "--max-wait-ms")
    from mapex_core.tracking.batching import batch_threads_from_env

    assert batch_threads_from_env({}) is None and batch_threads_from_env({"MAPEX_SERVE_BATCH_THREADS": " 2"}) == 2
    for bad in ("0", "two", "-1", "auto"):
        with pytest.raises(ValueError, match="MAPEX_SERVE_BATCH_THREADS must be a whole number of threads >= 1"):
            batch_threads_from_env({"MAPEX_SERVE_BATCH_THREADS": bad})


def test_mapex_serve_refuses_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MAPEX_SERVE_MAX_WAIT_MS="soon")
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([sys.executable, "-m", "mapex_core.cli", "serve", "--app", "demo"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "MAPEX_SERVE_MAX_WAIT_MS" in r.stderr and "'soon'" in r.stderr
    assert not (tmp_path / "mlflow").exists()  # refused before the store was opened
    r = subprocess.run([sys.executable, "-m", "mapex_core.cli", "serve", "--app", "demo", "--max-batch", "0"],
                       cwd=tmp_path, env=dict(env, MAPEX_SERVE_MAX_WAIT_MS="2"), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "--max-batch" in r.stderr


# ----- the real pyfunc and real servers ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_model(root: Path, name: str) -> Path:
    """A tiny real task model for app ``name`` (seeded), saved as the registry's fine-tuned folder."""
    from mapex_core.model.heads import save_task_model

    task = APPS[name][0]
    return save_task_model(tiny(task, ("s1",)), root / name)


def pyfunc(model_dir: Path, max_batch: int) -> Any:
    """The served pyfunc of ``model_dir``, loaded as serving loads it, with ``MAPEX_SERVE_MAX_BATCH``."""
    from mlflow.pyfunc import PythonModelContext

    from mapex_core.tracking import MapexPyfunc

    old = os.environ.get("MAPEX_SERVE_MAX_BATCH")
    os.environ["MAPEX_SERVE_MAX_BATCH"] = str(max_batch)
    try:
        p = MapexPyfunc()
        p.load_context(PythonModelContext(artifacts={"task_model": str(model_dir)}, model_config={}))
    finally:
        if old is None:
            os.environ.pop("MAPEX_SERVE_MAX_BATCH")
        else:
            os.environ["MAPEX_SERVE_MAX_BATCH"] = old
    return p


def requests() -> list[tuple[np.ndarray, str]]:
    """``(chips (B, 2, 64, 64), output)`` per request: real S1 chips, batch sizes :data:`SIZES`."""
    x = real_chips(["s1"], WINDOWS)["s1"]
    out, start = [], 0
    for i, b in enumerate(SIZES):
        out.append((x[start:start + b], "probabilities" if i % 3 == 2 else "default"))
        start += b
    return out


def check_answer(name: str, got: dict[str, Any], want: dict[str, Any], output: str) -> None:
    """``got`` is the sequential in-process answer ``want`` (float32 rounding aside: a batch's matrix
    products may sum in another order; a segmentation mask may differ only where two classes tie)."""
    if "mask" in want:
        mask, ref = np.asarray(got["mask"]), np.asarray(want["mask"])
        probs = np.asarray(want["probs"])  # (B, K, H, W)
        top2 = np.sort(probs, axis=1)[:, -2:]  # (B, 2, H, W)
        tie = (top2[:, 1] - top2[:, 0]) < 1e-4
        assert mask.shape == ref.shape and (mask[~tie] == ref[~tie]).all(), name
        assert tie.mean() < 0.01
    else:
        np.testing.assert_allclose(np.asarray(got["probabilities"]), want["probabilities"], rtol=0, atol=1e-5,
                                   err_msg=f"{name} ({output})")
    assert list(got["classes"]) == list(want["classes"])


def sequential(p: Any, reqs: list[tuple[np.ndarray, str]]) -> list[dict[str, Any]]:
    out = []
    for x, output in reqs:
        want = dict(p.predict(None, {"s1": x}, {"output": output}))
        if "mask" in want:
            want["probs"] = p.predict(None, {"s1": x}, {"output": "probabilities"})["probabilities"]
        out.append(want)
    return out


@pytest.mark.parametrize("name", sorted(APPS))
def test_the_pyfunc_batches_concurrent_callers_and_answers_as_one_by_one(tmp_path: Path, name: str) -> None:
    model_dir = save_model(tmp_path, name)
    reqs = requests()
    want = sequential(pyfunc(model_dir, 1), reqs)
    p = pyfunc(model_dir, 64)
    p.batcher.forward, sizes, release = held_forward(p.batcher.forward)  # the real forward, held once
    got = held_calls(p.batcher, sizes, release, lambda i: p.predict(None, {"s1": reqs[i][0]}, {"output": reqs[i][1]}),
                     len(reqs))
    assert sizes == [SIZES[0], sum(SIZES) - SIZES[0]]  # every queued request in one forward
    for i, ((x, output), g, w) in enumerate(zip(reqs, got, want, strict=True)):
        assert len(next(v for k, v in g.items() if k != "classes")) == len(x)
        check_answer(f"{name} request {i}", g, w, output)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``mapex serve --workers 1`` of each app in :data:`APPS` (one process: its stop line counts all the
    forwards), registered in a temporary store; yields ``{name: (port, model folder)}``."""
    import mlflow

    from mapex_core import tracking
    from mapex_core.apps import get_application

    root = tmp_path_factory.mktemp("batching")
    dirs = {name: save_model(root / "models", name) for name in APPS}
    try:
        tracking.configure(f"sqlite:///{root}/mlflow/mlflow.db", root)
        for name, (task, metric) in APPS.items():
            app = get_application(name, {"applications": {name: {"modalities": ["s1"], "task": task,
                                                                    "metric": metric, "gate": {"tolerance": 0.01}}}})
            variant = {"value": 0.5, "ci95": [0.4, 0.6], "params": 1, "checkpoint_bytes": 4, "latency_ms": 5.0}
            tracking.register_app(app, dirs[name], root=root, prune_report={
                "params_before": 2, "params_after": 1, "reduction": 0.5, "coverage": {"1": 1.0}},
                evaluation={"pruned": variant, "unpruned": variant, "scratch": variant},
                finetune_summary={"history": {"steps": [3], "train_loss": [0.7], "val": [0.4]}},
                lineage={"git_sha": "abc", "dvc_hash": "0123.dir"})
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    procs, ports, logs = {}, {}, {}
    for name in APPS:
        ports[name], logs[name] = free_port(), root / f"{name}.log"
        with open(logs[name], "w") as err:
            procs[name] = subprocess.Popen([sys.executable, "-m", "mapex_core.cli", "serve", "--app", name, "--port",
                                            str(ports[name]), "--max-wait-ms", "5", "--workers", "1"], cwd=root, env=env,
                                           stdout=subprocess.DEVNULL, stderr=err)
    try:
        for name in APPS:
            for _ in range(480):
                assert procs[name].poll() is None, logs[name].read_text()
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", ports[name], timeout=5)
                    conn.request("GET", "/ping")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    time.sleep(0.5)
        yield {name: (ports[name], dirs[name]) for name in APPS}
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.wait(60)
    for name in APPS:
        assert procs[name].returncode == 0, logs[name].read_text()
        text = logs[name].read_text()
        assert "Traceback" not in text and "batches of up to 64 chips, wait 5 ms" in text
        shared = re.search(r"mapex serve: (\d+) requests \(\d+ chips\) in (\d+) forward passes", text)
        assert shared and int(shared[2]) < int(shared[1]), text[-500:]  # concurrent requests shared forwards


def body(x: np.ndarray, output: str) -> bytes:
    data = {"b64": base64.b64encode(x.astype("<f4").tobytes()).decode(), "shape": list(x.shape)}
    return json.dumps({"inputs": {"s1": data}, "params": {"output": output}}).encode()


BAD = {  # name -> (body, text of the message)
    "bands": (lambda x: json.dumps({"inputs": {"s1": x[:, :1].tolist()}}).encode(), "expected shape (B, 2, 64, 64)"),
    "NaN": (lambda x: body(np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x), "default"),
            "NaN or infinite"),
    "output": (lambda x: body(x, "logits"), "params.output must be 'default' or 'probabilities'"),
    "base64": (lambda x: json.dumps({"inputs": {"s1": {"b64": "!!", "shape": [1, 2, 64, 64]}}}).encode(),
               "not valid base64"),
}


@pytest.mark.parametrize("name", sorted(APPS))
def test_concurrent_requests_to_the_server_get_the_sequential_answers_and_bad_ones_fail_alone(
        servers: Any, name: str) -> None:
    port, model_dir = servers[name]
    reqs = requests()
    want = sequential(pyfunc(model_dir, 1), reqs)
    jobs = [("good", i) for i in range(len(reqs))] * 3
    for k, bad in enumerate(BAD):  # bad requests among the good ones
        jobs.insert(5 * k + 2, ("bad", bad))
    local = threading.local()

    def send(job: tuple[str, Any]) -> tuple[int, bytes]:
        conn = local.__dict__.setdefault("conn", http.client.HTTPConnection("127.0.0.1", port, timeout=120))
        kind, key = job
        data = body(*reqs[key]) if kind == "good" else BAD[key][0](reqs[0][0])
        conn.request("POST", "/invocations", body=data, headers=JSON)
        r = conn.getresponse()
        return r.status, r.read()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, jobs))
    for (kind, key), (status, answer) in zip(jobs, answers, strict=True):
        if kind == "bad":
            assert status == 400, (key, answer[:300])
            assert BAD[key][1] in json.loads(answer)["message"], (key, answer[:300])
        else:
            assert status == 200, (key, answer[:300])
            check_answer(f"{name} request {key}", json.loads(answer)["predictions"], want[key], reqs[key][1])


def test_requests_at_concurrency_32_all_get_answers(servers: Any) -> None:
    port, _ = servers["batchcls"]
    reqs = requests()
    bodies = [body(x, "default") for x, _ in reqs]
    local = threading.local()

    def send(i: int) -> int:
        conn = local.__dict__.setdefault("conn", http.client.HTTPConnection("127.0.0.1", port, timeout=120))
        try:
            conn.request("POST", "/invocations", body=bodies[i % len(bodies)], headers=JSON)
            r = conn.getresponse()
            r.read()
            return r.status
        except OSError:
            local.__dict__.pop("conn").close()
            return 0

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(send, range(320)))
    assert codes == [200] * 320  # no 5xx, no connection error (bench/serve.py sends 1000)
