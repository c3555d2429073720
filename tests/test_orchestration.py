"""The retrain flow end to end on a tiny config: real Prefect (test harness), real MLflow (sqlite in a
temp project), real DVC (a temp git repo), real BigEarthNet sample chips.

One project is built once for the module. The states the tests need are module-scoped fixtures, each
made once, on demand, on top of the one before: ``first_run`` (the first retrain), ``s1_changed``
(landcover-s1's params changed, retrained: its gate fails) and ``promoted`` (that version promoted by
hand). A fixture returns what was observed right after its step, so the tests check each step on that
record; what they read from the project itself holds in every later state too. Every test passes
alone, and the tests do not depend on each other's order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Elements, sha
from tests.pipeline_project import inside, make_project, run, set_params

pytestmark = pytest.mark.usefixtures("prefect_harness")
APPS = ["landcover-s2", "landcover-s1"]


@pytest.fixture(scope="module")
def project(ben_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """The temp project, as the current directory, with MLflow on its own sqlite store."""
    with inside(make_project(tmp_path_factory.mktemp("project") / "proj", ben_root)) as root:
        yield root


def latest_task_states(names: list[str]) -> dict[str, str]:
    """State name of the newest task run of each name (Prefect API of the harness)."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=names)),
                                     sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=200)
    out: dict[str, str] = {}
    for r in runs:
        out.setdefault(r.name, r.state.name)
    return out


def dvc_status(root: Path) -> dict:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.status()


def latest_artifact(key: str) -> Any:
    """The newest Prefect artifact of ``key`` (API of the harness)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as pc:
        return pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                 sort=ArtifactSort.CREATED_DESC, limit=1)[0]


def retrain_project() -> list[dict[str, Any]]:
    from flows.pipeline import retrain

    return retrain(params="params.yaml", fetch_samples=False)


STAGES = ["ingest@bigearthnet", "validate@bigearthnet", "pretrain"] + [
    f"{k}@{a}" for a in APPS for k in ("prune", "finetune", "compare", "evaluate")]
S1_STAGES = {"prune@landcover-s1", "finetune@landcover-s1", "compare@landcover-s1", "evaluate@landcover-s1"}


# ----- the project's states (each made once per module, on top of the one before) -----------------
@pytest.fixture(scope="module")
def first_run(project: Path) -> dict[str, Any]:
    """The first retrain of the project: its rows, and what it left, read right after it."""
    from mlflow import MlflowClient

    rows = retrain_project()
    client = MlflowClient()
    champions = {}
    for app in APPS:
        v = client.get_model_version_by_alias(f"mapex-{app}", "champion")
        champions[app] = {"version": str(v.version), "aliases": sorted(v.aliases)}
    return {"rows": rows, "champions": champions,
            "finetuned_sha": {app: sha(Path(f"outputs/apps/{app}/finetuned/model.safetensors")) for app in APPS},
            "dashboard": json.loads(Path("reports/dashboard/dashboard.json").read_text()),
            "summary": latest_artifact("retrain-summary").data}


@pytest.fixture(scope="module")
def s1_changed(project: Path, first_run: dict[str, Any]) -> dict[str, Any]:
    """After the first run: landcover-s1's fine-tuning steps changed and a size bound set that its
    model fails; retrained. What DVC saw before, the rows, the task states and the aliases after."""
    from mlflow import MlflowClient

    set_params(project, "applications.landcover-s1.finetune.steps", 5)
    set_params(project, "applications.landcover-s1.gate", {"max_params": 1000})
    status_before = dvc_status(project)
    rows = {r["app"]: r for r in retrain_project()}
    client = MlflowClient()
    return {"status_before": status_before, "rows": rows, "states": latest_task_states(STAGES),
            "status_after": dvc_status(project),
            "champion": str(client.get_model_version_by_alias("mapex-landcover-s1", "champion").version),
            "challenger": str(client.get_model_version_by_alias("mapex-landcover-s1", "challenger").version)}


@pytest.fixture(scope="module")
def promoted(project: Path, s1_changed: dict[str, Any]) -> dict[str, Any]:
    """landcover-s1's version 2 (failed gate) promoted by hand: the command's JSON output."""
    out = run(["mapex", "promote", "--app", "landcover-s1", "--version", "2", "--reason", "reviewed maps"], project)
    return json.loads(out.stdout)


def test_first_run_registers_with_lineage(project: Path, first_run: dict[str, Any]) -> None:
    import mlflow
    from mlflow import MlflowClient

    from mapex_core import lineage, tracking

    rows = first_run["rows"]
    assert [r["app"] for r in rows] == APPS
    for r in rows:
        assert r["version"] == "1" and r["decision"] == "passed" and r["champion"] == "1"
        assert r["reasons"] == ["no champion yet"]
        assert r["params_pruned"] < r["params_full"]
    # every stage recorded in dvc.lock: DVC finds the pipeline up to date
    assert dvc_status(project) == {}
    assert "up to date" in run(["dvc", "repro"], project).stdout

    client = MlflowClient()
    assert mlflow.get_tracking_uri() == f"sqlite:///{project.resolve()}/mlflow/mlflow.db"
    pre = client.get_model_version_by_alias("mapex-pretrained", "current")
    chips_hash = lineage.output_hash("data/chips/bigearthnet.zarr")
    assert chips_hash and chips_hash.endswith(".dir")
    for app in APPS:
        champion = first_run["champions"][app]  # the champion alias right after the first run
        assert champion["version"] == "1" and "challenger" in champion["aliases"]
        v = client.get_model_version(f"mapex-{app}", champion["version"])
        run_ = client.get_run(v.run_id)
        tags = run_.data.tags
        assert tags["mapex.app"] == app
        assert tags["mapex.modalities"] == app.removeprefix("landcover-")
        assert tags["mapex.dvc_hash"] == chips_hash
        assert tags["mapex.git_sha"] == lineage.git_sha(project) and len(tags["mapex.git_sha"]) >= 40
        assert tags["mapex.pretrain_run_id"] == pre.run_id == tags["mlflow.parentRunId"]
        assert int(tags["mapex.params_pruned"]) < int(tags["mapex.params_full"])
        digests = [d.dataset.digest for d in run_.inputs.dataset_inputs]
        assert digests == [chips_hash.removesuffix(".dir")]
        assert {"pruned.map_macro", "unpruned.map_macro", "scratch.map_macro", "prune.reduction"} <= set(
            run_.data.metrics)
        assert len(client.get_metric_history(v.run_id, "finetune.train_loss")) == 2  # eval_every 3, 6 steps
        # (the fine-tuned weights the first run left: a later params change replaces landcover-s1's)
        assert v.tags["gate.decision"] == "passed" and v.tags["model_sha256"] == first_run["finetuned_sha"][app]
        arts = {a.path for a in client.list_artifacts(v.run_id, "reports")}
        assert {"reports/evaluation.json", "reports/prune_report.json", "reports/config.json"} <= arts
    pre_run = client.get_run(pre.run_id)
    assert len(client.get_metric_history(pre.run_id, "loss")) == 3  # log_every 2, 6 steps
    assert "specialisation.s1" in pre_run.data.metrics and pre_run.data.params["model.dim"] == "32"
    # models from code + safetensors: nothing pickled anywhere in the artifact store
    assert not list(Path("mlflow/artifacts").rglob("*.pkl"))
    # the registered champion serves the same predictions as the fine-tuned model in process
    _check_pyfunc_matches("landcover-s2")
    assert tracking.registry_state("landcover-s2")["champion"] == "1"
    # `mapex predict` takes the champion's task model from the registry
    from safetensors.torch import load_file

    # the flow regenerated the dashboard and linked it from a Prefect artifact
    dash = first_run["dashboard"]  # the page's data as the first run wrote it
    assert [a["name"] for a in dash["apps"]] == APPS and all(a["champion"] == "1" for a in dash["apps"])
    assert Path("reports/dashboard/index.html").is_file()
    from prefect import get_client

    with get_client(sync_client=True) as pc:
        link = pc.read_latest_artifacts()
    assert any(a.key == "mapex-dashboard" and "reports/dashboard/index.html" in a.data for a in link)
    fetched = tracking.download_task_model("landcover-s2", "champion", dst=project / "fetched")
    want = load_file("outputs/apps/landcover-s2/finetuned/model.safetensors")
    assert set(load_file(fetched / "model.safetensors")) == set(want)
    assert sha(fetched / "model.safetensors") == sha(Path("outputs/apps/landcover-s2/finetuned/model.safetensors"))
    # the flow run's markdown artifact (the first run's): one row per application
    for app in APPS:
        row = next(line for line in first_run["summary"].splitlines() if line.startswith(f"| {app} |"))
        assert "v1 (challenger, champion)" in row and "map_macro" in row and "fewer)" in row


def _check_pyfunc_matches(app: str) -> None:
    import mlflow
    import numpy as np
    import torch

    from mapex_core.data.chips import ChipStore, collate
    from mapex_core.model.heads import load_task_model

    model = load_task_model(f"outputs/apps/{app}/finetuned").eval()
    raw = ChipStore.open("data/chips/bigearthnet.zarr", modalities=["s2"], split="test", normalize=False)
    norm = ChipStore.open("data/chips/bigearthnet.zarr", modalities=["s2"], split="test",
                          normalization=model.encoder.config.normalization)
    idx = list(range(min(4, len(raw))))
    with torch.no_grad():
        want = torch.sigmoid(model({"s2": collate([norm[i] for i in idx])["s2"]})).numpy()
    served = mlflow.pyfunc.load_model(f"models:/mapex-{app}@champion")
    got = served.predict({"s2": collate([raw[i] for i in idx])["s2"].numpy()})
    np.testing.assert_allclose(got["probabilities"], want, atol=1e-5)
    assert got["classes"] == model.class_names and len(got["classes"]) == 19
    meta = served.metadata.metadata["mapex_contract"]
    assert meta["modalities"] == ["s2"] and meta["bands"]["s2"][:3] == ["B01", "B02", "B03"]
    assert meta["chip_size"] == 64 and meta["normalization"]["s2"] == model.encoder.config.normalization["s2"]


def test_serve_champion_over_rest(project: Path, first_run: dict[str, Any]) -> None:
    """`mapex serve`: a real server process; real chips; the contract's 4xx errors; it stays up."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    import numpy as np
    import torch

    from mapex_core.data.chips import ChipStore, collate
    from mapex_core.model.heads import load_task_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--app", "landcover-s2", "--port", str(port)],
                            cwd=project, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    base = f"http://127.0.0.1:{port}"

    def post(body: bytes) -> tuple[int, dict]:
        req = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.5)
        raw = ChipStore.open("data/chips/bigearthnet.zarr", modalities=["s2"], split="test", normalize=False)
        chips = collate([raw[i] for i in range(4)])["s2"].numpy()
        model = load_task_model("outputs/apps/landcover-s2/finetuned").eval()
        norm = ChipStore.open("data/chips/bigearthnet.zarr", modalities=["s2"], split="test",
                              normalization=model.encoder.config.normalization)
        with torch.no_grad():
            want = torch.sigmoid(model({"s2": collate([norm[i] for i in range(4)])["s2"]})).numpy()
        good = json.dumps({"inputs": {"s2": chips.tolist()}}).encode()
        status, body = post(good)
        assert status == 200
        np.testing.assert_allclose(np.asarray(body["predictions"]["probabilities"]), want, atol=1e-4)
        assert body["predictions"]["classes"] == model.class_names
        import base64

        packed = {"b64": base64.b64encode(chips.astype("<f4").tobytes()).decode(), "shape": list(chips.shape)}
        status, body = post(json.dumps({"inputs": {"s2": packed}}).encode())  # the compact form
        assert status == 200
        np.testing.assert_allclose(np.asarray(body["predictions"]["probabilities"]), want, atol=1e-4)
        nan = chips.copy()
        nan[0, 0, 0, 0] = np.nan
        bad = {
            "wrong modality": ({"inputs": {"s1": chips[:, :2].tolist()}}, "takes modalities ['s2']; unknown: ['s1']"),
            "band count": ({"inputs": {"s2": chips[:, :10].tolist()}}, "expected shape (B, 12, 64, 64)"),
            "chip shape": ({"inputs": {"s2": chips[:, :, :32, :32].tolist()}}, "got (4, 12, 32, 32)"),
            "NaN": ({"inputs": {"s2": nan.tolist()}}, "NaN or infinite"),  # json writes a NaN literal
            "oversized": ({"inputs": {"s2": np.repeat(chips[:1], 65, 0).tolist()}}, "exceeds the limit of 64"),
        }
        for what, (payload, msg) in bad.items():
            status, body = post(json.dumps(payload).encode())
            assert 400 <= status < 500 and msg in body.get("message", ""), (what, status, body)
        status, _ = post(b'{"inputs": {"s2": [[[')
        assert 400 <= status < 500
        assert post(good)[0] == 200  # still up and answering
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_rerun_is_cached_and_registers_nothing(project: Path, first_run: dict[str, Any]) -> None:
    from mapex_core import tracking

    tracking.configure()  # the project's store, whatever ran before
    outs = sorted(Path("outputs").rglob("*.safetensors")) + [Path("reports/landcover-s2/evaluation.json")]
    before = {p: p.stat().st_mtime_ns for p in outs}
    versions = {app: [v["version"] for v in tracking.registry_state(app)["versions"]] for app in APPS}
    rows = retrain_project()
    states = latest_task_states(STAGES)
    assert states == dict.fromkeys(STAGES, "Cached"), states
    assert {p: p.stat().st_mtime_ns for p in outs} == before
    # each row reports the version already registered for the current weights (the newest one) ...
    assert [r["version"] for r in rows] == [max(versions[app], key=int) for app in APPS]
    for app in APPS:  # ... and no version was added
        assert [v["version"] for v in tracking.registry_state(app)["versions"]] == versions[app]


def test_one_app_changed_reruns_only_its_stages_and_failed_gate_keeps_champion(
        project: Path, s1_changed: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    changed = s1_changed  # observed right after the change and its retrain
    assert set(changed["status_before"]) == S1_STAGES
    states = changed["states"]
    assert {s for s, st in states.items() if st != "Cached"} == S1_STAGES, states
    assert changed["status_after"] == {}
    rows = changed["rows"]
    s1 = rows["landcover-s1"]
    assert (s1["version"], s1["decision"], s1["champion"]) == ("2", "failed", "1")
    assert any("parameters" in r and "> max 1000" in r for r in s1["reasons"])
    assert changed["champion"] == "1"
    v2 = MlflowClient().get_model_version("mapex-landcover-s1", changed["challenger"])
    assert str(v2.version) == "2" and v2.tags["gate.decision"] == "failed" and v2.tags["gate.compared_to"] == "1"
    assert rows["landcover-s2"]["version"] == "1"


def test_dvc_stage_command_reproduces_the_flow_output(project: Path, first_run: dict[str, Any]) -> None:
    """The flow and `dvc repro` run the same command: forcing the DVC stage rewrites identical weights."""
    model = Path("outputs/apps/landcover-s2/pruned/model.safetensors")
    before = sha(model)
    run(["dvc", "repro", "-f", "-s", "prune@landcover-s2"], project)
    assert sha(model) == before
    assert "prune@landcover-s2" not in dvc_status(project)


def test_dvc_push_and_pull_with_the_default_local_remote(project: Path, first_run: dict[str, Any]) -> None:
    import shutil

    run(["dvc", "push", "-q"], project)
    assert (project / ".dvc_remote" / "files" / "md5").is_dir()
    model = Path("outputs/apps/landcover-s2/pruned/model.safetensors")
    want = sha(model)
    shutil.rmtree(".dvc/cache")
    shutil.rmtree(model.parent)
    run(["dvc", "pull", "-q"], project)
    assert sha(model) == want
    assert dvc_status(project) == {}


def test_promote_by_hand_is_recorded(project: Path, promoted: dict[str, Any]) -> None:
    assert promoted["champion"] == "2"  # the output of `mapex promote --app landcover-s1 --version 2`
    reg = json.loads(run(["mapex", "registry", "--app", "landcover-s1"], project).stdout)
    v2 = next(v for v in reg["versions"] if v["version"] == "2")
    assert reg["champion"] == "2" and v2["promotion"] == "manual" and v2["gate.decision"] == "failed"
    bad = run(["mapex", "promote", "--app", "landcover-s1", "--version", "9"], project, check=False)
    assert bad.returncode == 1 and "has no version '9'; versions: [1, 2]" in bad.stderr


def test_dashboard_shows_history_failed_gate_and_manual_promotion(project: Path, promoted: dict[str, Any]) -> None:
    """After a failed gate and a manual promotion: the page says who is champion and why."""
    out = json.loads(run(["mapex", "dashboard", "--out", "site"], project).stdout)
    assert out["apps"] == APPS and out["versions"] == 3 and out["layers"] >= 1
    data = json.loads(Path("site/dashboard.json").read_text())
    s1 = next(a for a in data["apps"] if a["name"] == "landcover-s1")
    assert (s1["champion"], s1["challenger"]) == ("2", "2")
    v2, v1 = s1["versions"]
    assert v2["aliases"] == ["challenger", "champion"] and v1["aliases"] == []
    assert v2["gate"]["decision"] == "failed" and any("> max 1000" in r for r in v2["gate"]["reasons"])
    assert v2["promotion"]["kind"] == "manual" and v2["promotion"]["reason"] == "reviewed maps"
    assert v2["params"] < v2["params_full"] and v2["dvc_hash"] == v1["dvc_hash"]
    assert s1["prune"]["kept_experts"] and s1["evaluation"]["pruned"]["value"] == v2["metric_value"]
    page = Elements(Path("site/index.html").read_text())
    text = " ".join(page.text)
    assert "promoted by hand" in text and "reviewed maps" in text
    assert len(page.find("svg", class_="heatmap")) == out["layers"]
    assert {g["data-app"] for g in page.find("g", class_="kept")} == set(APPS)
    docs = [a["href"] for a in page.find("a") if a["href"].endswith("data_docs/index.html")]
    assert docs and (Path("site") / docs[0]).resolve().is_file()  # relative link: works from a file URL


def test_faults_fail_clearly_and_a_damaged_output_is_remade(project: Path, first_run: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mapex_core import tracking

    bad = run(["mapex", "retrain", "--no-samples", "--app", "no-such-app"], project, check=False)
    assert bad.returncode == 1 and "unknown application(s) ['no-such-app']" in bad.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    unreachable = run(["mapex", "retrain", "--no-samples"], project, check=False)
    assert unreachable.returncode == 1 and "http://127.0.0.1:9 is unreachable" in unreachable.stderr
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # an application whose modality the pre-trained model lacks
    Path("sar_optical_l1c.yaml").write_text("name: l1c\nmodalities: [s2l1c]\ntask: multilabel\nmetric: map_macro\n"
                                            "chips: data/chips/bigearthnet.zarr\n")
    lacking = run(["mapex", "prune", "--app", "sar_optical_l1c.yaml"], project, check=False)
    assert lacking.returncode == 1
    assert "needs modalities ['s2l1c'] that the pre-trained model lacks; the model takes ['s1', 's2']" in lacking.stderr
    # a corrupted pre-trained checkpoint: pruning fails naming the file
    weights = Path("outputs/pretrain/model.safetensors")
    good = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file")
    broken = run(["mapex", "prune", "--app", "landcover-s2"], project, check=False)
    assert broken.returncode == 1
    assert "outputs/pretrain/model.safetensors is not a readable safetensors file" in broken.stderr
    # the flow sees the output differs from dvc.lock, re-runs pre-training (same weights), and the
    # downstream stages stay cached: nothing new is registered
    versions = {a: len(tracking.registry_state(a)["versions"]) for a in APPS}
    retrain_project()
    assert weights.read_bytes() == good
    states = latest_task_states(STAGES)
    assert states["pretrain"] == "Completed" and states["prune@landcover-s2"] == "Cached", states
    tracking.configure()
    assert {a: len(tracking.registry_state(a)["versions"]) for a in APPS} == versions
