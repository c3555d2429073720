"""The accuracy-size curve of an application: one pruned, fine-tuned, evaluated model per size.

:func:`run_sweep` calibrates the pre-trained model on the application's chips and scores its
experts once (:func:`mapex_core.pruning.prune_pretrained` reuses the statistics and scores for
every size), then for each ``keep_per_layer`` from the full groups down to ``top_k``
(:func:`mapex_core.pruning.keep_sizes`) prunes, fine-tunes and evaluates exactly as evaluation does
its ``pruned`` variant: the application's budget, seeds, train / val / test split and bootstrap
units (:func:`~mapex_core.training.finetune.train_task`, :func:`~mapex_core.training.finetune.predict`,
:func:`~mapex_core.metrics.summarize`); the fine-tuning runs share the free cores like evaluation's
(:func:`~mapex_core.training.evaluate.run_jobs`). ``latency_ms`` is the median batch-1 forward time
of each point's task model (evaluation's definition, the one the gate's ``max_latency_ms`` bounds),
measured after training with the points' calls interleaved, so the sizes are compared side by side.

``chosen`` is the smallest point (fewest parameters) whose metric is at least the full group's
minus ``gate.tolerance``: the promotion gate's rule (:mod:`mapex_core.gate`) with the full group in
the champion's place (every metric here is higher-is-better).

:func:`sweep_app` writes ``DIR/sweep.json`` (``mapex sweep``); :func:`sweep_prune_app` is the prune
stage under ``prune.target: smallest_within_tolerance``: it writes the chosen point's pruned model,
whose config (``origin.sweep``) and ``prune_report.json`` (``target``, ``sweep``) say where it came from.
"""

from __future__ import annotations

import copy
import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mapex_core.apps import Application, check_compatible, check_model_app
from mapex_core.data.dataset import ChipStore, collate
from mapex_core.io import (
    atomic_write_json,
    check_output,
    folder_problem,
    json_with_keys,
    replace_folder,
    staged_folder,
)
from mapex_core.metrics import summarize
from mapex_core.model import MapexModel, load_model, save_model
from mapex_core.model.heads import TaskModel, load_task_model
from mapex_core.model.serialization import model_folder_problem
from mapex_core.progress import available_cores
from mapex_core.pruning import (
    STRATEGIES,
    PruneParams,
    PruneResult,
    keep_sizes,
    origin_of,
    prune_pretrained,
)
from mapex_core.runtime import resolve_device
from mapex_core.training.evaluate import Job, bootstrap_groups, run_jobs
from mapex_core.training.finetune import inputs_of, open_app_store, predict, task_model, train_task
from mapex_core.training.prune import calibration_batches

SWEEP_FILE = "sweep.json"
SWEEP_KEYS = ("app", "metric", "points", "chosen")  # how an existing sweep.json is recognised
TARGET = "smallest_within_tolerance"
PointCallback = Callable[[int, int, dict[str, Any]], None]  # (points done, points, the point)
StepCallback = Callable[[int, int, dict[str, Any]], None]  # (steps done, total steps, info)


def sweep_folder_problem(path: str | Path) -> str | None:
    """What makes ``path`` something other than a sweep folder MAPEX wrote (``None``: nothing)."""
    def ours(folder: Path) -> str | None:
        f = folder / SWEEP_FILE
        return None if not f.exists() or json_with_keys(f, SWEEP_KEYS) else f"{f} is not a sweep written by MAPEX"

    return folder_problem(path, "a sweep folder", (SWEEP_FILE,), ours)


def sweep_strategy(app: Application, strategy: str | None) -> PruneParams:
    """The application's pruning knobs with the criterion ``strategy`` (default: the app's own), no size target.

    Raises:
        ValueError: an unknown criterion, or ``group`` (it ranks no expert inside the groups); names the app.
    """
    name = strategy or app.prune.strategy
    ranking = [s for s in STRATEGIES if s != "group"]
    if name not in STRATEGIES:
        raise ValueError(f"application {app.name!r}: unknown pruning strategy {name!r}; a sweep takes one of {ranking}")
    if name == "group":
        raise ValueError(f"application {app.name!r}: a sweep ranks experts inside the groups and strategy 'group' "
                         f"ranks none; pass --strategy (one of {ranking})")
    return replace(app.prune, strategy=name, keep_per_layer=None, target="groups")


def choose_point(points: list[dict[str, Any]], tolerance: float) -> int:
    """Index of the smallest point (fewest ``params``) whose ``value`` is at least ``points[0]``'s minus ``tolerance``.

    ``points[0]`` is the full group (the reference). A point with a non-finite value never
    qualifies; when the reference is not finite (or the tolerance is negative and nothing
    qualifies) the full group is kept (index 0).
    """
    ref = points[0]["value"]
    if not math.isfinite(ref):
        return 0
    ok = [i for i, p in enumerate(points) if math.isfinite(p["value"]) and p["value"] >= ref - tolerance]
    return min(ok, key=lambda i: (points[i]["params"], i)) if ok else 0


def interleaved_latency_ms(models: list[TaskModel], x: dict[str, torch.Tensor], runs: int,
                           device: torch.device) -> list[float]:
    """Median wall time of a forward pass of each model on ``x``, their calls interleaved (after 3 warm-ups each)."""
    for m in models:
        m.eval()
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            for _ in range(3):
                m(x)
        for _ in range(max(1, runs)):
            for i, m in enumerate(models):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


@dataclass
class SweepRun:
    """What :func:`run_sweep` returns: the record (``sweep.json``) and what re-pruning its chosen point needs.

    Attributes:
        record: ``points`` (largest first), ``chosen`` and the settings they were made with.
        full: the pre-trained model.
        batches: the calibration batches.
        params: the pruning knobs (criterion) of the sweep, without a size.
        first: the first point's pruning result (its statistics and scores serve every size).
        task: the task model the ``task`` criterion measured, if any.
        origin: the lineage recorded in a pruned model's config.
    """

    record: dict[str, Any]
    full: MapexModel
    batches: list[dict[str, Any]]
    params: PruneParams
    first: PruneResult
    task: TaskModel | None
    origin: dict[str, Any]

    def prune_chosen(self) -> PruneResult:
        """The chosen point's pruned model again (same statistics and scores: the same experts and weights),
        its config's ``origin.sweep`` naming the point."""
        c, rec = self.record["chosen"], self.record
        origin = self.origin | {"sweep": {
            "target": TARGET, "point": c["index"], "points": len(rec["points"]), "kept_per_layer": c["kept_per_layer"],
            "metric": rec["metric"], "value": c["value"], "full_group_value": rec["reference"]["value"],
            "tolerance": rec["tolerance"], "strategy": rec["strategy"]}}
        return prune_pretrained(self.full, self.batches, rec["modalities"],
                                replace(self.params, keep_per_layer=c["kept_per_layer"]), stats=self.first.stats,
                                scores=self.first.scores, task_model=self.task, origin=origin)


def run_sweep(app: Application, checkpoint: str | Path, chips: str | Path, *, strategy: str | None = None,
              task_model_dir: str | Path | None = None, device: str = "auto", on_step: StepCallback | None = None,
              on_point: PointCallback | None = None, concurrency: Callable[[], int] | None = None) -> SweepRun:
    """Prune ``checkpoint`` for ``app`` to every size, fine-tune and evaluate each; nothing is written.

    Args:
        strategy: the criterion that ranks the experts (default: ``app.prune.strategy``).
        task_model_dir: for ``task``: a fine-tuned task model of ``app`` to measure.
        on_step: ``(steps done, total, info)`` over all the fine-tuning runs.
        on_point: ``(points done, points, point)`` as each point's metric is known, in size order.
        concurrency: how many fine-tuning runs may train at once now (default: as evaluation).

    Raises:
        ValueError: the criterion ranks no expert; the model, store or task model does not fit ``app``;
            the store has no test chips.
    """
    p = sweep_strategy(app, strategy)
    if task_model_dir is not None and p.strategy != "task":
        raise ValueError(f"a task model ({task_model_dir}) is only used by prune.strategy 'task'; "
                         f"the sweep of application {app.name!r} uses {p.strategy!r}")
    dev = resolve_device(device)
    full = load_model(checkpoint, device=dev)
    check_compatible(app, full.config.modalities)
    task = None
    if task_model_dir is not None:
        task = load_task_model(task_model_dir, device=dev)
        check_model_app(task.info, app.name, task_model_dir)
    norm = full.config.normalization
    batches = calibration_batches(app, chips, norm, full.config.modalities, p.batch_size, p.calibration_batches)
    train, val, test = (open_app_store(app, chips, s, full.config.modalities, norm) for s in ("train", "val", "test"))
    if len(test) == 0:
        raise ValueError(f"{chips}: no test chips for application {app.name!r}")
    classes = test.class_names or []
    origin = {**origin_of(checkpoint, full), "app": app.name}
    sizes = keep_sizes(full, app.modalities)  # the groups' size down to top_k: largest first
    pruned: list[PruneResult] = []
    for k in sizes:
        prev = pruned[0] if pruned else None
        pruned.append(prune_pretrained(full, batches, app.modalities, replace(p, keep_per_layer=k),
                                       stats=prev.stats if prev else None, scores=prev.scores if prev else None,
                                       task_model=task, origin=origin))
    seeds, steps = app.finetune.seeds, app.finetune.steps
    jobs = [Job(str(k), s, lambda r=r, s=s: task_model(copy.deepcopy(r.model), app, classes, {}, s))
            for k, r in zip(sizes, pruned, strict=True) for s in seeds]
    outputs: dict[tuple[str, int], np.ndarray] = {}
    targets: list[np.ndarray] = []
    points: list[dict[str, Any] | None] = [None] * len(sizes)
    reported = 0
    step_of: dict[int, int] = {}
    lock = threading.Lock()
    groups = bootstrap_groups(test)

    def finish(i: int) -> None:  # under lock: the point's metric over its seeds, then report points in order
        nonlocal reported
        k = str(sizes[i])
        rep = summarize(app.metric, classes, [outputs[(k, s)] for s in seeds], targets[0], app.finetune.bootstrap,
                        groups=groups)
        points[i] = {"kept_per_layer": sizes[i], "value": rep["value"], "ci95": rep["ci95"],
                     "encoder_params": pruned[i].report["params_after"], "kept_experts": pruned[i].report["kept_experts"]}
        while reported < len(points) and points[reported] is not None:
            reported += 1
            if on_point is not None:
                on_point(reported, len(points), points[reported - 1])

    def fit(model: TaskModel, job: Job) -> dict[str, Any]:
        def step_cb(step: int, total: int, info: dict[str, Any]) -> None:
            with lock:
                step_of[id(job)] = step
                if on_step is not None:
                    on_step(sum(step_of.values()), len(jobs) * steps,
                            info | {"run": f"{job.variant} experts/layer seed {job.seed}"})

        history = train_task(model, train, val, app.metric, app.finetune, job.seed, dev, 0.0, on_step=step_cb)
        out, tgt = predict(model, test, app.finetune.batch_size, dev)
        with lock:
            outputs[(job.variant, job.seed)] = out
            targets.append(tgt)
            i = sizes.index(int(job.variant))
            if all((job.variant, s) in outputs for s in seeds):
                finish(i)
        return history

    if concurrency is None:
        def concurrency() -> int:
            return 1 if dev.type == "cuda" else available_cores() // torch.get_num_threads()

    fitted = run_jobs(jobs, fit, concurrency)
    shown = [fitted[i * len(seeds) + len(seeds) - 1][0] for i in range(len(sizes))]  # each size's last seed
    x = inputs_of(collate([test[0]]), shown[0].modalities, dev)
    latency = interleaved_latency_ms(shown, x, app.finetune.latency_runs, dev)
    rows = []
    for i, (point, model, ms) in enumerate(zip(points, shown, latency, strict=True)):
        assert point is not None
        runs = [(job.seed, hist) for job, (_, hist) in zip(jobs, fitted, strict=True) if job.variant == str(sizes[i])]
        rows.append({"kept_per_layer": point["kept_per_layer"], "params": model.num_parameters(),
                     "value": point["value"], "ci95": point["ci95"], "latency_ms": ms,
                     "encoder_params": point["encoder_params"], "kept_experts": point["kept_experts"],
                     "training": [{"seed": s, **{k: h[k] for k in ("stopped_at", "best_step", "best_val")}}
                                  for s, h in runs if h is not None]})
    tol = app.gate.tolerance
    chosen = choose_point(rows, tol)
    for row in rows:
        row["within_tolerance"] = bool(math.isfinite(row["value"]) and row["value"] >= rows[0]["value"] - tol)
    record = {
        "app": app.name, "metric": app.metric, "modalities": app.modalities, "strategy": p.strategy,
        "tolerance": tol, "rule": "the smallest model (fewest parameters) whose metric >= the full group's - tolerance",
        "reference": {"kept_per_layer": rows[0]["kept_per_layer"], "value": rows[0]["value"]},
        "checkpoint": str(Path(checkpoint).resolve()), "chips": str(chips),
        "chips_fingerprint": ChipStore.open(chips, in_memory=False).fingerprint(),
        "calibration_chips": sum(len(b["index"]) for b in batches), "test_chips": len(test), "seeds": seeds,
        "finetune": app.finetune.__dict__, "bootstrap_units": int(len(set(groups.tolist()))),
        "task_model": None if task_model_dir is None else str(Path(task_model_dir).resolve()),
        "latency": {"batch": 1, "runs": app.finetune.latency_runs, "statistic": "median",
                    "order": "interleaved across the points, after training", "device": str(dev)},
        "points": rows,
        "chosen": {"index": chosen, **rows[chosen]},
    }
    return SweepRun(record=record, full=full, batches=batches, params=p, first=pruned[0], task=task, origin=origin)


def sweep_app(app: Application, checkpoint: str | Path, chips: str | Path, out: str | Path, *,
              strategy: str | None = None, device: str = "auto", force: bool = False,
              on_step: StepCallback | None = None, on_point: PointCallback | None = None) -> dict[str, Any]:
    """The sweep of ``app`` (:func:`run_sweep`), written to ``out/sweep.json`` (the folder built aside, swapped in whole).

    Args:
        force: replace ``out`` even when it holds something that is not a sweep folder.

    Returns:
        The record (``points``, ``chosen``, settings) with ``seconds``.

    Raises:
        OutputConflict: ``out`` holds other files (checked before any work), unless ``force``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    check_output(out, sweep_folder_problem, force)
    run = run_sweep(app, checkpoint, chips, strategy=strategy, device=device, on_step=on_step, on_point=on_point)
    check_output(out, sweep_folder_problem, force)  # again: something may have appeared meanwhile
    with staged_folder(out) as tmp:
        atomic_write_json(tmp / SWEEP_FILE, run.record)
        replace_folder(tmp, out)
    return run.record | {"seconds": round(time.perf_counter() - t0, 2)}


def sweep_prune_app(app: Application, checkpoint: str | Path, chips: str | Path, out: str | Path, *,
                    device: str = "auto", force: bool = False, task_model_dir: str | Path | None = None,
                    on_step: StepCallback | None = None, on_point: PointCallback | None = None) -> dict[str, Any]:
    """The prune stage under ``prune.target: smallest_within_tolerance``: sweep, then write the chosen point's model.

    Writes the folder ``out`` whole, as :func:`~mapex_core.training.prune.prune_app` does
    (``config.json``, ``model.safetensors``, ``prune_report.json``); the report adds ``target`` and
    ``sweep`` (the whole record, latencies included: unlike the ``groups`` target's report, a re-run
    differs in those timings), the config's ``origin.sweep`` names the point.

    Raises:
        OutputConflict: ``out`` holds other files (checked before any work), unless ``force``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    check_output(out, model_folder_problem, force)
    run = run_sweep(app, checkpoint, chips, task_model_dir=task_model_dir, device=device, on_step=on_step,
                    on_point=on_point)
    result = run.prune_chosen()
    report = result.report | {
        "app": app.name, "calibration_chips": run.record["calibration_chips"], "task_model": run.record["task_model"],
        "target": TARGET, "sweep": run.record}
    check_output(out, model_folder_problem, force)  # again: something may have appeared meanwhile
    with staged_folder(out) as tmp:
        save_model(result.model, tmp)
        atomic_write_json(tmp / "prune_report.json", report)
        replace_folder(tmp, out)
    return report | {"seconds": round(time.perf_counter() - t0, 2)}
