"""MLflow registry and promotion gate (real MLflow on a temp sqlite store, the ``store`` fixture of
``conftest.py``; tiny real task models from ``helpers.version_files``)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest

from mapex_core.apps import get_application
from tests.helpers import version_files

APP = {"modalities": ["s2"], "task": "multilabel", "metric": "map_macro", "gate": {"tolerance": 0.01}}


def app(**gate: Any):
    return get_application("demo", {"applications": {"demo": {**APP, "gate": {**APP["gate"], **gate}}}})


def test_gate_moves_champion_only_when_not_worse(store: Path) -> None:
    from mlflow import MlflowClient

    from mapex_core import tracking

    a = app()
    r1 = tracking.register_app(a, **version_files(store, 1, 0.50))
    assert (r1["version"], r1["decision"], r1["champion"], r1["reasons"]) == ("1", "passed", "1", ["no champion yet"])
    from mlflow.models import get_model_info

    info = get_model_info("models:/mapex-demo/1")  # its signature; no chip store in its lineage: no example
    assert [(i.name, i.shape) for i in info.signature.inputs.inputs] == [("s2", (-1, 12, 32, 32))]
    assert info.saved_input_example_info is None
    r2 = tracking.register_app(a, **version_files(store, 2, 0.495))  # within the 0.01 tolerance
    assert (r2["decision"], r2["champion"]) == ("passed", "2")
    r3 = tracking.register_app(a, **version_files(store, 3, 0.40))
    assert (r3["version"], r3["decision"], r3["champion"]) == ("3", "failed", "2")
    assert r3["reasons"] == ["map_macro 0.4000 < champion v2 0.4950 - tolerance 0.01"]
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("mapex-demo", "champion").version) == "2"
    v3 = client.get_model_version_by_alias("mapex-demo", "challenger")
    assert str(v3.version) == "3" and v3.tags["gate.decision"] == "failed" and v3.tags["gate.compared_to"] == "2"
    # registering the same weights again is a no-op that reports the existing version
    again = tracking.register_app(a, **version_files(store, 1, 0.50))
    assert (again["version"], again["new"]) == ("1", False)
    assert len(tracking.registry_state("demo")["versions"]) == 3
    # a person overrides the gate; recorded as such
    tracking.promote("demo", "3", reason="visual check")
    v3 = client.get_model_version("mapex-demo", "3")
    assert "champion" in v3.aliases and v3.tags["promotion"] == "manual"
    assert v3.tags["promotion.previous_champion"] == "2" and v3.tags["promotion.reason"] == "visual check"
    with pytest.raises(ValueError, match=r"mapex-demo has no version '7'; versions: \[1, 2, 3\]"):
        tracking.promote("demo", "7")
    with pytest.raises(ValueError, match="no registered model 'mapex-nothing'"):
        tracking.promote("nothing", "1")


def test_size_and_latency_bounds() -> None:
    from mapex_core.gate import gate_decision

    cand = {"version": "2", "metric": "map_macro", "value": 0.9, "params": 5000, "latency_ms": 12.0}
    ok, reasons = gate_decision(app(max_params=4000, max_latency_ms=10.0).gate, cand, None)
    assert not ok and reasons == ["no champion yet", "parameters 5000 > max 4000", "latency 12.00 ms > max 10.0 ms"]
    champ = {"version": "1", "metric": "miou", "value": 0.2, "params": 1, "latency_ms": 1.0}
    ok, reasons = gate_decision(app().gate, cand, champ)
    assert ok and "not compared" in reasons[0]
    # a NaN metric never becomes champion, and a NaN champion does not block every later version
    assert gate_decision(app().gate, dict(cand, value=float("nan")), None) == (False, ["map_macro is nan: not a finite value"])
    ok, reasons = gate_decision(app().gate, cand, dict(champ, metric="map_macro", value=float("nan")))
    assert ok and reasons == ["champion has no finite metric value: not compared"]


def test_failure_after_registration_leaves_nothing_half_registered(store: Path) -> None:
    from mlflow import MlflowClient

    from mapex_core import tracking

    files = version_files(store, 1, 0.5)
    # an invalid gate bound is only met by the gate, after the version was created
    with pytest.raises(TypeError, match="'<=' not supported"):
        tracking.register_app(app(max_latency_ms="fast"), **files)
    assert tracking.registry_state("demo")["versions"] == []
    client = MlflowClient()
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    assert [r.info.status for r in client.search_runs([exp.experiment_id])] == ["FAILED"]


def _register_in_process(root: str, seed: int, value: float, barrier: Any) -> None:
    import os

    os.chdir(root)
    from mapex_core import tracking

    tracking.configure()
    files = version_files(Path(root), seed, value)
    barrier.wait()  # both processes register at the same moment
    tracking.register_app(app(), **files)


def test_concurrent_registrations_do_not_corrupt_the_registry(store: Path) -> None:
    from mlflow import MlflowClient

    from mapex_core import tracking

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_register_in_process, args=(str(store), s, v, barrier))
             for s, v in ((1, 0.6), (2, 0.3))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.terminate()
    assert [p.exitcode for p in procs] == [0, 0]
    versions = {v["version"]: v for v in tracking.registry_state("demo")["versions"]}
    assert set(versions) == {"1", "2"}
    assert all(v["tags"]["gate.decision"] in ("passed", "failed") for v in versions.values())
    # the gates ran one after the other: exactly one saw no champion, the other compared against it
    first = next(v for v in versions.values() if v["tags"]["gate.compared_to"] == "none")
    second = next(v for v in versions.values() if v is not first)
    assert second["tags"]["gate.compared_to"] == first["version"]
    champion = MlflowClient().get_model_version_by_alias("mapex-demo", "champion")
    passed = [v for v in (first, second) if v["tags"]["gate.decision"] == "passed"]
    assert str(champion.version) == passed[-1]["version"]
    assert float(champion.tags["metric_value"]) == 0.6  # the better model ends as champion either way


def test_unreachable_tracking_server_is_a_clear_error() -> None:
    from mapex_core import tracking

    with pytest.raises(tracking.TrackingError, match=r"http://127.0.0.1:9 is unreachable"):
        tracking.configure("http://127.0.0.1:9")
