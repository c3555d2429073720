"""A registered version is a portable MLflow model: its signature (one named tensor per modality),
an input example of real chips, the ``mapex_core`` code and exact pins. A tiny real two-modality
segmentation model (``helpers.tiny``) is registered in a temporary sqlite store with the real
Sen1Floods11 chip store (``shared_flood_store``) as its fine-tuning data; the slow test serves it
with ``mlflow models serve --env-manager uv`` from an environment MLflow builds from the version's
own requirements, and compares its answer on a real chip with the in-process model's."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import tiny

ROOT = Path(__file__).resolve().parents[1]
APP = {"modalities": ["s1", "s2l1c"], "task": "segmentation", "metric": "iou_water", "gate": {"tolerance": 0.01}}
URI = "models:/mapex-flood@champion"
JSON = {"Content-Type": "application/json"}


def flood_app() -> Any:
    from mapex_core.apps import get_application

    return get_application("flood", {"applications": {"flood": APP}})


def lock_pins() -> dict[str, str]:
    """requirements.lock as ``{lower-case name: version}``."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        name, sep, ver = line.partition("==")
        if sep:
            pins[name.strip().lower()] = ver.strip()
    return pins


@pytest.fixture(scope="module")
def registered(shared_flood_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``mapex-flood`` v1 (a tiny S1 + S2 L1C segmentation model, 64 px chips) in a temporary store, with
    the flood chip store as its fine-tuning data: ``uri`` (tracking), ``model_dir``, ``local`` (the
    downloaded version), ``root``."""
    import mlflow

    from mapex_core import tracking
    from mapex_core.model.heads import save_task_model

    root = tmp_path_factory.mktemp("portable")
    model = tiny("segmentation", ("s1", "s2l1c"))
    model_dir = save_task_model(model, root / "model")
    n = model.num_parameters()
    variant = {"value": 0.5, "ci95": [0.4, 0.6], "params": n, "checkpoint_bytes": 4 * n, "latency_ms": 5.0}
    uri = f"sqlite:///{root}/mlflow/mlflow.db"
    try:
        tracking.configure(uri, root)
        res = tracking.register_app(
            flood_app(), model_dir, {"params_before": 2 * n, "params_after": n, "reduction": 0.5, "coverage": {}},
            {"pruned": variant, "unpruned": dict(variant, params=2 * n), "scratch": variant},
            {"history": {"steps": [1], "train_loss": [0.7], "val": [0.4]}},
            {"git_sha": "abc", "dvc_hash": "0123.dir", "chips": str(shared_flood_store)}, root=root)
        assert (res["version"], res["champion"]) == ("1", "1")
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=URI, dst_path=str(root / "downloaded")))
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    return {"uri": uri, "model_dir": model_dir, "local": local, "root": root, "store": shared_flood_store}


def in_process(model_dir: Path, inputs: dict[str, Any], output: str = "default") -> dict[str, Any]:
    """What the pyfunc answers in this process, loaded straight from the task model folder."""
    from mlflow.pyfunc import PythonModelContext

    from mapex_core.tracking import MapexPyfunc

    p = MapexPyfunc()
    p.load_context(PythonModelContext(artifacts={"task_model": str(model_dir)}, model_config={}))
    return p.predict(None, inputs, params={"output": output})


def test_a_registered_version_carries_its_signature_example_code_and_pins(registered: dict[str, Any]) -> None:
    import mlflow
    import xarray as xr
    from mlflow.models import Model

    local = registered["local"]
    meta = Model.load(str(local))
    sig = meta.signature
    assert [(s.name, s.type, s.shape) for s in sig.inputs.inputs] == [
        ("s1", np.dtype("float32"), (-1, 2, 64, 64)), ("s2l1c", np.dtype("float32"), (-1, 13, 64, 64))]
    assert [(s.name, s.type.name, s.shape) for s in sig.outputs.inputs] == [("mask", "int32", (-1, 64, 64)),
                                                                         ("classes", "str", (2,))]
    assert [(p.name, p.default) for p in sig.params.params] == [("output", "default")]
    assert meta.metadata["mapex_contract"]["modalities"] == ["s1", "s2l1c"]  # the contract stays in the metadata
    # the input example: one real chip of the fine-tuning store, raw physical values, no nodata
    example = meta.load_input_example(str(local))
    assert sorted(example) == ["s1", "s2l1c"]
    ds = xr.open_zarr(registered["store"], consolidated=True)
    for m, want_shape in (("s1", (1, 2, 64, 64)), ("s2l1c", (1, 13, 64, 64))):
        a = np.asarray(example[m], dtype=np.float32)
        assert a.shape == want_shape and np.isfinite(a).all()
        stored = ds[m].values  # (chips, C, H, W): physical values, NaN = nodata
        assert any(np.array_equal(a[0], chip) for chip in stored), m
    for name in ("input_example.json", "serving_input_example.json"):  # one chip: MLflow keeps it as JSON
        assert (local / name).stat().st_size < 2 * 2**20, name
    # its own code (no bytecode) and exact pins from requirements.lock
    code = local / "code" / "mapex_core"
    assert (code / "tracking" / "served.py").read_text() == (ROOT / "mapex_core/tracking/served.py").read_text()
    assert not list(code.rglob("__pycache__"))
    pins = lock_pins()
    reqs = [r for r in (local / "requirements.txt").read_text().split() if r]
    assert reqs == [f"{p}=={pins[p]}" for p in ("torch", "mlflow", "safetensors", "numpy", "pyyaml")]
    assert "torch==2.13.0" in reqs and "mlflow==3.17.2" in reqs
    # in process: MLflow passes the inputs to the contract as before (both request forms, its messages)
    model = mlflow.pyfunc.load_model(str(local))
    want = in_process(registered["model_dir"], example, "probabilities")["probabilities"]
    got = model.predict(example, params={"output": "probabilities"})["probabilities"]
    np.testing.assert_allclose(got, want, atol=1e-5)
    packed = {m: {"b64": base64.b64encode(np.asarray(a, "<f4").tobytes()).decode(), "shape": list(a.shape)}
              for m, a in example.items()}
    np.testing.assert_allclose(model.predict(packed, params={"output": "probabilities"})["probabilities"], want,
                               atol=1e-5)
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"missing: \['s2l1c'\]"):
        model.predict({"s1": example["s1"]})


def test_the_signature_of_a_pretrained_encoder(tmp_path: Path) -> None:
    from mapex_core.model import MapexConfig, MapexModel
    from mapex_core.model.serialization import save_model
    from mapex_core.tracking.served import signature

    cfg = MapexConfig(modalities=["s1", "s2"], img_size=32, patch_size=8, dim=16, depth=2, heads=2,
                      experts_per_modality=2, top_k=1, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    sig = signature(save_model(MapexModel(cfg), tmp_path / "pretrained"))
    assert [(s.name, s.shape) for s in sig.inputs.inputs] == [("s1", (-1, 2, 32, 32)), ("s2", (-1, 12, 32, 32))]
    assert [(s.name, s.shape) for s in sig.outputs.inputs] == [("embeddings", (-1, 16))]
    assert signature().inputs is None  # no folder: the params alone
    with pytest.raises(FileNotFoundError, match="config.json"):
        signature(tmp_path / "nothing")


def test_pip_requirements_are_read_from_the_lock(tmp_path: Path) -> None:
    from mapex_core.tracking import pip_requirements

    lock = tmp_path / "requirements.lock"
    lock.write_text("mlflow==3.17.2\nnumpy==2.4.6  # pinned\nPyYAML==6.0.4\nsafetensors==0.8.0\ntorch==2.13.0\n"
                    "torchvision==0.28.0\n")
    assert pip_requirements(lock) == ["torch==2.13.0", "mlflow==3.17.2", "safetensors==0.8.0", "numpy==2.4.6",
                                      "pyyaml==6.0.4"]
    lock.write_text("torch==2.13.0\ntorch==2.14.0\n")
    with pytest.raises(ValueError, match=r"requirements.lock: torch is pinned twice"):
        pip_requirements(lock)
    with pytest.raises(ValueError, match=r"nothing.lock: requirements lock not found"):
        pip_requirements(tmp_path / "nothing.lock")
    pins = lock_pins()  # the project's own lock is the default
    assert pip_requirements() == [f"{p}=={pins[p]}" for p in ("torch", "mlflow", "safetensors", "numpy", "pyyaml")]


# ----- served from a fresh environment ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_links() -> str | None:
    """pip's ``find-links`` on this machine (env or pip config): where its local CPU torch wheel lies.
    uv reads no pip configuration, so it is handed over as ``UV_FIND_LINKS``."""
    if os.environ.get("PIP_FIND_LINKS"):
        return os.environ["PIP_FIND_LINKS"]
    res = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True,
                         text=True)
    return res.stdout.strip() or None if res.returncode == 0 else None


def post(port: int, body: dict[str, Any]) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/invocations", body=json.dumps(body).encode(), headers=JSON)
    r = conn.getresponse()
    data = r.read()
    assert r.status == 200, data[:500]
    return json.loads(data)["predictions"]


@pytest.mark.slow
def test_a_version_served_from_a_fresh_uv_environment_answers_as_in_process(registered: dict[str, Any]) -> None:
    """``mlflow models serve --env-manager uv``: MLflow builds a new environment from the version's
    ``python_env.yaml`` / ``requirements.txt`` (no mapex installed, no PYTHONPATH, started outside the
    repository), loads the model with its own ``code/mapex_core`` and answers a real chip."""
    from mlflow.models import Model

    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv is not installed (make setup installs it from requirements.lock)"
    root, port = registered["root"], free_port()
    envs = root / "envs"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(MLFLOW_TRACKING_URI=registered["uri"], MLFLOW_ENV_ROOT=str(envs),
               PATH=f"{Path(uv).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if find_links() and "UV_FIND_LINKS" not in env:
        env["UV_FIND_LINKS"] = find_links()  # the CPU torch wheel on disk, not gigabytes of CUDA from PyPI
    cwd = root / "serve-cwd"  # not the repository: nothing of it is importable from the working folder
    cwd.mkdir()
    log = root / "serve.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", URI, "--env-manager", "uv",
                                 "-h", "127.0.0.1", "-p", str(port)], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() - t0 < 1500, "no answer after 25 min:\n" + log.read_text()[-3000:]
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/ping")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(2)
        ready = time.monotonic() - t0
        print(f"fresh uv environment built and model served in {ready:.0f} s")
        (python,) = envs.glob("*/bin/python")  # MLFLOW_ENV_ROOT/<env>
        fresh = subprocess.run([str(python), "-c", "import importlib.metadata as m, importlib.util as u; "
                                "print(u.find_spec('mapex_core'), m.version('torch'), m.version('mlflow'))"],
                               cwd=cwd, capture_output=True, text=True, env={"PATH": env["PATH"]})
        assert fresh.returncode == 0, fresh.stderr
        spec, torch_version, mlflow_version = fresh.stdout.split()
        assert spec == "None", fresh.stdout  # mapex is not installed there: the model loads its code/
        assert torch_version.split("+")[0] == "2.13.0" and mlflow_version == "3.17.2", fresh.stdout
        print(f"fresh environment: torch {torch_version}, mlflow {mlflow_version}")
        example = Model.load(str(registered["local"])).load_input_example(str(registered["local"]))
        want = in_process(registered["model_dir"], example, "probabilities")["probabilities"]
        got = post(port, {"inputs": {m: np.asarray(a).tolist() for m, a in example.items()},
                          "params": {"output": "probabilities"}})
        np.testing.assert_allclose(np.asarray(got["probabilities"]), want, atol=1e-5)
        mask = post(port, {"inputs": {m: {"b64": base64.b64encode(np.asarray(a, "<f4").tobytes()).decode(),
                                          "shape": list(np.shape(a))} for m, a in example.items()}})
        np.testing.assert_array_equal(np.asarray(mask["mask"]), want.argmax(1))
        assert mask["classes"] == ["dry", "water"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the serve process and the scoring server it started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
