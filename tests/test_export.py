"""`mapex export`: ONNX (checked on onnxruntime) and torch.export programs of real task models (tiny,
untrained: the checks are about the exported graph, the sidecar and the CLI, not accuracy), run on
real chips of the Sen1Floods11 scene and compared with the MLflow pyfunc; the MoE dense dispatch
against the loop oracle; the STAC item (MLM extension) against the input contract."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mapex_core.export import (
    FORMATS,
    PhysicalInputModel,
    dense_dispatch,
    export_task_model,
    load_exported,
)
from tests.helpers import ROOT, moe_layer, real_chips, switch_balance_loss, tiny, version_files

TOL = 1e-4


def pyfunc(model_dir: Path):
    """The MLflow pyfunc of a task model folder, loaded as MLflow loads it (``load_context``)."""
    from mlflow.pyfunc import PythonModelContext

    from mapex_core.tracking import MapexPyfunc

    p = MapexPyfunc()
    p.load_context(PythonModelContext(artifacts={"task_model": str(model_dir)}, model_config={}))
    return p


def routed_experts(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> int:
    """Largest number of distinct experts that the chips' tokens chose in one MoE layer."""
    from mapex_core.contract import InputContract
    from mapex_core.model.routing import collect_routing_stats

    norm = InputContract.of(model).normalize(arrays)
    with collect_routing_stats(model.encoder) as stats, torch.no_grad():
        model({m: torch.from_numpy(a) for m, a in norm.items()})
    return max(int((lr.counts.sum(0) > 0).sum()) for lr in stats.layers.values())


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mapex_core.cli", "export", *args], capture_output=True, text=True,
                          cwd=cwd, env=env)


# ----- dense dispatch -------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("idle", [(), (0, 3)])  # every expert used, or some that get no token
def test_dense_dispatch_equals_the_loop_oracle(top_k, idle):
    layer = moe_layer(top_k)
    if idle:
        with torch.no_grad():
            layer.modality_bias[:, list(idle)] = -1e4
    x = torch.randn(300, 32)
    ids = torch.randint(0, 2, (300,))
    outs = {}
    for impl in ("loop", "dense"):
        layer.impl = impl
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        y, aux = layer(xx, ids)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs[impl] = (y.detach(), aux.detach(), xx.grad, layer.w1.grad.clone())
    (yl, auxl, gxl, gwl), (yd, auxd, gxd, gwd) = outs["loop"], outs["dense"]
    assert (yd - yl).abs().max() < 1e-5 and (gxd - gxl).abs().max() < 1e-5 and (gwd - gwl).abs().max() < 1e-5
    want = switch_balance_loss(layer, x, ids)  # the documented Switch loss, by hand from the routing
    assert auxd.item() == pytest.approx(want, rel=1e-5) and auxl.item() == pytest.approx(want, rel=1e-5)
    _, top_idx, _ = layer.route(x, ids)
    assert len(top_idx.unique()) == 6 - len(idle)  # the routing really spreads over the experts


def test_dense_dispatch_is_scoped_and_equals_the_default_path_on_real_chips():
    model = tiny(modalities=("s1", "s2l1c"))
    chips = real_chips(["s1", "s2l1c"])
    assert routed_experts(model, chips) >= 2  # tokens of these chips go to different experts
    from mapex_core.contract import InputContract

    wrapper = PhysicalInputModel(model, InputContract.of(model)).eval()
    inputs = [torch.from_numpy(chips[m]) for m in wrapper.modalities]
    with torch.no_grad():
        sparse = wrapper(*inputs)
        with dense_dispatch(model):
            assert {blk.ffn.impl for blk in model.encoder.blocks if blk.is_moe} == {"dense"}
            dense = wrapper(*inputs)
    assert {blk.ffn.impl for blk in model.encoder.blocks if blk.is_moe} == {"sorted"}  # restored
    assert (dense - sparse).abs().max() < 1e-5


# ----- ONNX from the registry, through the CLI --------------------------------------------------
def _register_flood_model(root: Path) -> dict:
    from mapex_core import tracking
    from mapex_core.apps import get_application
    from mapex_core.model.heads import save_task_model

    files = version_files(root, 1, 0.5)
    model = tiny(modalities=("s1", "s2l1c"))
    model.info = {"app": "flood"}
    save_task_model(model, files["finetuned_dir"])  # this model instead of version_files' one
    app = get_application("flood", {"applications": {"flood": {"modalities": ["s1", "s2l1c"], "task": "segmentation",
                                                               "metric": "miou"}}})
    return tracking.register_app(app, **files)


def test_onnx_export_of_the_champion_matches_the_served_pyfunc(store: Path) -> None:
    import mlflow
    import onnxruntime as ort

    reg = _register_flood_model(store)
    res = cli("--app", "flood", "--format", "onnx", "--out", "exported", cwd=store)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    out = store / "exported"
    assert sorted(p.name for p in out.iterdir()) == ["item.json", "model.onnx"] == summary["files"]
    assert summary["max_abs_diff"] <= TOL

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["s1", "s2l1c"]
    assert [i.shape for i in session.get_inputs()] == [["batch", 2, 64, 64], ["batch", 13, 64, 64]]
    served = mlflow.pyfunc.load_model("models:/mapex-flood@champion")
    chips = real_chips(["s1", "s2l1c"])
    for batch in (5, 1):  # traced with 2
        x = {m: a[:batch] for m, a in chips.items()}
        got = session.run(None, x)[0]
        want = served.predict(x, params={"output": "probabilities"})["probabilities"]
        assert got.shape == want.shape == (batch, 2, 64, 64)
        assert np.abs(got - want).max() < TOL
        mask = served.predict(x)["mask"]
        assert (got.argmax(1) == mask).mean() > 0.999  # the mask is the argmax (ties aside)

    item = json.loads((out / "item.json").read_text())
    lineage = item["properties"]["mapex:lineage"]
    weights = store / "model1" / "model.safetensors"
    assert lineage == {"registered_model": "mapex-flood", "version": "1", "alias": "champion", "app": "flood",
                       "run_id": reg["run_id"], "git_sha": "abc", "dvc_hash": "0123.dir",
                       "model_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                       "created": lineage["created"]}
    assert item["id"] == "mapex-flood-v1" and item["properties"]["datetime"].startswith(lineage["created"][:19])
    meta = {p.key: p.value for p in __import__("onnx").load(str(out / "model.onnx")).metadata_props}
    assert json.loads(meta["mapex_lineage"])["run_id"] == reg["run_id"]
    assert json.loads(meta["mapex_contract"])["modalities"] == ["s1", "s2l1c"]

    # registry errors are clear (in this process: the store fixture's working folder holds the registry)
    bad = run_cli("--app", "nothing", "--format", "onnx", "--out", "x")
    assert bad.returncode == 1 and "no registered model 'mapex-nothing'" in bad.stderr
    bad = run_cli("--app", "flood", "--alias", "gold", "--format", "onnx", "--out", "x")
    assert bad.returncode == 1 and "mapex-flood has no alias 'gold'" in bad.stderr
    assert not (store / "x").exists()


# ----- torch.export, from a local model folder ----------------------------------------------------
@pytest.fixture(scope="module")
def landcover_s1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mapex_core.model.heads import save_task_model

    model = tiny("multilabel")
    model.info = {"app": "landcover-s1"}
    return save_task_model(model, tmp_path_factory.mktemp("model") / "landcover-s1")


def test_torch_export_program_round_trip_matches_the_pyfunc(landcover_s1: Path, tmp_path: Path) -> None:
    summary = export_task_model(landcover_s1, tmp_path / "pt2", "torch-export", {"app": "landcover-s1"})
    assert summary["files"] == ["item.json", "model.pt2"] and summary["max_abs_diff"] <= TOL
    extra = {"mapex_contract.json": "", "mapex_lineage.json": ""}
    program = torch.export.load(str(tmp_path / "pt2" / "model.pt2"), extra_files=extra)
    assert json.loads(extra["mapex_contract.json"])["classes"] == ["a", "b", "c"]
    chips = real_chips(["s1"])
    ref = pyfunc(landcover_s1)
    for batch in (5, 1):
        x = chips["s1"][:batch]
        with torch.no_grad():
            got = program.module()(torch.from_numpy(x)).numpy()
        want = ref.predict(None, {"s1": x})["probabilities"]
        assert got.shape == want.shape == (batch, 3)
        assert np.abs(got - want).max() < TOL
        np.testing.assert_allclose(load_exported(tmp_path / "pt2" / "model.pt2")(x), got, atol=1e-6)
    # the same model exports to the same bytes (deterministic)
    export_task_model(landcover_s1, tmp_path / "again", "torch-export", {"app": "landcover-s1"})
    for name in ("model.pt2", "item.json"):
        assert (tmp_path / "pt2" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_onnx_export_of_a_multiclass_model(tmp_path: Path) -> None:
    from mapex_core.model.heads import save_task_model

    model = tiny("multiclass", modalities=("s2l1c",))
    save_task_model(model, tmp_path / "model")
    export_task_model(tmp_path / "model", tmp_path / "onnx", "onnx", {"app": "landuse"})
    x = real_chips(["s2l1c"])["s2l1c"]
    got = load_exported(tmp_path / "onnx" / "model.onnx")(x)
    want = pyfunc(tmp_path / "model").predict(None, {"s2l1c": x})["probabilities"]
    assert got.shape == (5, 3) and np.abs(got - want).max() < TOL
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


# ----- the STAC item ----------------------------------------------------------------------------
SEMVER = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$"


def test_stac_item_describes_the_contract(landcover_s1: Path, tmp_path: Path) -> None:
    """Structural checks of the MLM fields against the contract; the schemas (core and the pinned
    extension schemas) are checked offline by the export and in tests/test_interop.py."""
    import pystac
    from pystac.extensions.mlm import MLMExtension

    from mapex_core.contract import InputContract
    from mapex_core.model.heads import load_task_model

    flood = tiny(modalities=("s1", "s2l1c"))
    from mapex_core.model.heads import save_task_model

    save_task_model(flood, tmp_path / "flood")
    for model_dir, fmt in ((landcover_s1, "torch-export"), (tmp_path / "flood", "onnx")):
        out = tmp_path / fmt
        export_task_model(model_dir, out, fmt, {"app": "demo", "version": "7", "git_sha": "abc"})
        contract = InputContract.of(load_task_model(model_dir))
        item = pystac.Item.from_file(str(out / "item.json"))
        d = item.to_dict(include_self_link=False)
        p = d["properties"]
        assert "https://stac-extensions.github.io/mlm/v1.4.0/schema.json" in d["stac_extensions"]
        assert item.id == "mapex-demo-v7" and p["mapex:lineage"]["git_sha"] == "abc"
        for key in ("mlm:name", "mlm:architecture", "mlm:framework", "mlm:tasks", "mlm:input", "mlm:output"):
            assert key in p, key
        assert re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_.-]+[a-zA-Z0-9]", p["mlm:name"])
        assert re.fullmatch(SEMVER, p["mlm:framework_version"])
        assert p["mlm:framework"] == FORMATS[fmt].framework
        assert p["mlm:total_parameters"] == load_task_model(model_dir).num_parameters()
        ext = MLMExtension.ext(item)
        assert [i.name for i in ext.input] == contract.modalities
        s = contract.chip_size
        for inp in p["mlm:input"]:
            m = inp["name"]
            assert inp["bands"] == contract.bands[m]
            assert inp["input"] == {"shape": [-1, len(contract.bands[m]), s, s],
                                    "dim_order": ["batch", "bands", "height", "width"], "data_type": "float32"}
            assert inp["value_scaling"] is None  # normalisation is inside the graph ...
            norm = inp["mapex:normalization"]  # ... with these statistics
            assert (norm["mean"], norm["stddev"]) == (contract.normalization[m]["mean"],
                                                      contract.normalization[m]["std"])
        (o,) = p["mlm:output"]
        k = len(contract.classes)
        seg = contract.task == "segmentation"
        assert o["result"]["shape"] == ([-1, k, s, s] if seg else [-1, k])
        assert o["tasks"] == p["mlm:tasks"] == (["segmentation", "semantic-segmentation"] if seg
                                                 else ["classification", "scene-classification"])
        assert [(c["value"], c["title"]) for c in o["classification:classes"]] == list(enumerate(contract.classes))
        assert all(re.fullmatch(r"[0-9A-Za-z_-]+", c["name"]) for c in o["classification:classes"])
        (asset,) = [a for a in item.assets.values() if "mlm:model" in (a.roles or [])]
        f = out / FORMATS[fmt].file
        assert asset.href == f"./{f.name}" and asset.media_type == FORMATS[fmt].media_type
        assert asset.extra_fields["mlm:artifact_type"] == FORMATS[fmt].artifact_type
        assert asset.extra_fields["file:size"] == f.stat().st_size
        assert asset.extra_fields["file:checksum"] == "1220" + hashlib.sha256(f.read_bytes()).hexdigest()
        assert p["mapex:contract"] == json.loads(json.dumps(contract.to_dict()))


# ----- CLI errors and the output folder ------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The ``mapex export`` command in this process: the program's entry point ``mapex_core.cli.main``
    (what the console script runs: errors as one line on standard error and an exit status), without
    an interpreter start. Returns its exit status and output as ``subprocess.run`` would."""
    import contextlib
    import io

    from mapex_core.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(sys, "argv", ["mapex", "export", *args])
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())


def test_cli_errors_and_the_output_folder(landcover_s1: Path, tmp_path: Path) -> None:
    base = ["--app", "landcover-s1", "--model", str(landcover_s1)]
    res = run_cli(*base, "--format", "tflite", "--out", str(tmp_path / "a"))
    assert res.returncode == 1 and "unknown --format 'tflite'; choose one of: onnx, torch-export" in res.stderr
    res = run_cli("--app", "landcover-s1", "--model", str(tmp_path / "nope"), "--format", "onnx", "--out",
                  str(tmp_path / "a"))
    assert res.returncode == 1 and f"{tmp_path / 'nope' / 'config.json'} not found" in res.stderr
    res = run_cli("--app", "Bad App", "--model", str(landcover_s1), "--format", "onnx", "--out", str(tmp_path / "a"))
    assert res.returncode == 1 and "invalid application name 'Bad App'" in res.stderr
    res = run_cli("--app", "flood-s1", "--model", str(landcover_s1), "--format", "onnx", "--out",
                  str(tmp_path / "a"))
    assert res.returncode == 1 and "is a model of application 'landcover-s1', not 'flood-s1'" in res.stderr
    (tmp_path / "file").write_text("x")
    res = run_cli(*base, "--format", "onnx", "--out", str(tmp_path / "file"))
    assert res.returncode == 1 and f"--out {tmp_path / 'file'} is a file, not a folder" in res.stderr
    assert not (tmp_path / "a").exists()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    res = run_cli(*base, "--format", "torch-export", "--out", str(busy))
    assert res.returncode == 1 and f"--out {busy} exists and is not empty; pass --force" in res.stderr
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    res = run_cli(*base, "--format", "torch-export", "--out", str(busy), "--force")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["files"] == ["item.json", "model.pt2"]
    assert sorted(p.name for p in busy.iterdir()) == ["item.json", "model.pt2", "notes.txt"]
    res = run_cli(*base, "--format", "onnx", "--out", str(busy), "--force")  # another format replaces the model
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in busy.iterdir()) == ["item.json", "model.onnx", "notes.txt"]
    assert (busy / "notes.txt").read_text() == "keep me"
    assert json.loads((busy / "item.json").read_text())["assets"]["model"]["href"] == "./model.onnx"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
