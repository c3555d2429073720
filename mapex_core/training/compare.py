"""The comparison models of an application's evaluation, trained apart from it.

An evaluation (:mod:`mapex_core.training.evaluate`) compares the registered pruned model with models
fine-tuned alike (:data:`mapex_core.apps.VARIANTS`): the unpruned pre-trained model and the pruned
architecture from random weights for every seed, and the pruned model for the seeds other than the
fine-tuned one. None of them needs the fine-tuned model, so the pipeline trains them in their own
stage, compare@APP, at the same time as finetune@APP (:func:`compare_app`, into a folder); the
evaluation then loads those whose inputs it recognises (:func:`load_comparisons`, by
:func:`comparison_key`) and trains the others itself with the same :func:`fit_comparisons`.

A model's weights depend only on its variant, seed and inputs (and the process's intra-op threads),
never on which other models trained beside it: :func:`run_jobs` trains several at once in threads
of one process, each with its own seeds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mapex_core.apps import VARIANTS, Application, check_compatible
from mapex_core.data.dataset import ChipStore
from mapex_core.io import (
    atomic_write_json,
    check_output,
    folder_problem,
    replace_folder,
    staged_folder,
)
from mapex_core.model import MapexConfig, MapexModel, load_model
from mapex_core.model.heads import TaskModel, load_task_model, save_task_model
from mapex_core.progress import available_cores
from mapex_core.runtime import cpu_count, resolve_device
from mapex_core.training.finetune import RNG_LOCK, open_app_store, task_model, train_task

COMPARE_FILE = "compare.json"  # the record of a comparison folder: its inputs and its models
Run = tuple[str, int]  # (variant, seed)
Fitted = dict[Run, tuple[TaskModel, dict[str, Any]]]  # each run's trained model and training history


@dataclass
class Job:
    """One model of the comparison: which variant and seed, how to build it, whether to train it."""

    variant: str
    seed: int
    make: Callable[[], TaskModel]
    balance: float = 0.0
    train: bool = True


def run_jobs(jobs: list[Job], fit: Callable[[TaskModel, Job], dict[str, Any] | None],
             concurrency: Callable[[], int]) -> list[tuple[TaskModel, dict[str, Any] | None]]:
    """Build and fit every job, up to ``concurrency()`` at once (asked again as jobs finish); results in job order.

    The jobs run in threads of this process: torch releases the GIL in its kernels, and every job
    keeps the intra-op thread count of the process, so its arithmetic (and its weights) are the same
    as when the jobs run one after the other (measured: 1.85x faster for two jobs on two cores,
    identical weights).
    """
    results: dict[int, tuple[TaskModel, dict[str, Any] | None]] = {}

    def run(i: int) -> None:
        with RNG_LOCK:  # the global RNG initialises the head (and the scratch encoder): one job at a time
            model = jobs[i].make()
        results[i] = (model, fit(model, jobs[i]) if jobs[i].train else None)

    pending = list(range(len(jobs)))
    with ThreadPoolExecutor(max_workers=max(1, cpu_count())) as pool:
        running: set[Future] = set()
        while pending or running:
            while pending and len(running) < max(1, concurrency()):
                running.add(pool.submit(run, pending.pop(0)))
            done, running = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in done:
                fut.result()  # re-raise a job's error
    return [results[i] for i in range(len(jobs))]


def comparison_runs(seeds: list[int], finetuned_seed: int | None) -> list[Run]:
    """The comparison's runs in training order: pruned (all seeds but ``finetuned_seed``), unpruned, scratch."""
    return [(v, s) for v in VARIANTS for s in seeds if not (v == "pruned" and s == finetuned_seed)]


def model_hash(folder: str | Path | None) -> str | None:
    """sha256 over a model folder's ``config.json`` and ``model.safetensors`` (``None`` when either is missing)."""
    if folder is None:
        return None
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        path = Path(folder) / name
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def comparison_key(app: Application, classes: list[str], chips_fingerprint: str, pruned: str | Path | None,
                   pretrained: str | Path) -> dict[str, Any]:
    """Everything a comparison model's weights follow from, besides its variant and seed: a folder of
    comparison models serves an evaluation only when its key equals the evaluation's."""
    key = {"app": app.name, "task": app.task, "metric": app.metric, "modalities": app.modalities,
           "finetune": app.finetune.__dict__, "classes": classes, "chips_fingerprint": chips_fingerprint,
           "pruned_model": model_hash(pruned), "pretrained_model": model_hash(pretrained)}
    return json.loads(json.dumps(key))  # as it reads back from compare.json


def fit_comparisons(app: Application, runs: list[Run], *, pruned: str | Path | None, cfg: MapexConfig,
                    full: MapexModel, classes: list[str], train: ChipStore, val: ChipStore, dev: torch.device,
                    on_step: Callable[[int, int, dict[str, Any]], None] | None = None,
                    concurrency: Callable[[], int] | None = None) -> Fitted:
    """Fine-tune the comparison models ``runs`` with the app's budget (what compare@APP and an evaluation
    without its models both call).

    Args:
        pruned: the pruned model folder (for pruned runs); ``cfg``: its configuration (scratch runs).
        full: the unpruned pre-trained model (copied for each unpruned run).
        on_step: progress callback ``(step, total, info)`` over all the runs.
        concurrency: how many runs may train at once now (asked as runs finish; default: the cores
            this process may use now, :func:`mapex_core.progress.available_cores`, over its intra-op
            threads; one on CUDA). The weights do not depend on it.
    """
    def make(variant: str, s: int) -> Callable[[], TaskModel]:
        if variant == "pruned":
            return lambda: task_model(load_model(pruned, device=dev), app, classes, {}, s)
        if variant == "unpruned":
            return lambda: task_model(copy.deepcopy(full), app, classes, {}, s)

        def scratch() -> TaskModel:
            torch.manual_seed(s)
            return task_model(MapexModel(cfg, with_decoder=False).to(dev), app, classes, {}, s)
        return scratch

    jobs = [Job(v, s, make(v, s), full.config.balance_loss_weight if v == "unpruned" else 0.0) for v, s in runs]
    steps, progress_of, lock = app.finetune.steps, {}, threading.Lock()

    def fit(model: TaskModel, job: Job) -> dict[str, Any]:
        def step_cb(step: int, total: int, info: dict[str, Any]) -> None:
            with lock:
                progress_of[id(job)] = step
                if on_step is not None:
                    on_step(sum(progress_of.values()), len(jobs) * steps, info | {"run": f"{job.variant} seed {job.seed}"})

        return train_task(model, train, val, app.metric, app.finetune, job.seed, dev, job.balance, on_step=step_cb)

    if concurrency is None:
        def concurrency() -> int:
            return 1 if dev.type == "cuda" else available_cores() // torch.get_num_threads()

    fitted = run_jobs(jobs, fit, concurrency)
    return {(j.variant, j.seed): (model, hist or {}) for j, (model, hist) in zip(jobs, fitted, strict=True)}


def compare_folder_problem(path: str | Path) -> str | None:
    """What makes ``path`` something other than a folder of comparison models (``None``: nothing)."""
    def record_problem(folder: Path) -> str | None:
        try:
            data = json.loads((folder / COMPARE_FILE).read_text())
        except (OSError, ValueError):
            return f"is not a folder of comparison models ({COMPARE_FILE} missing or unreadable)"
        return None if isinstance(data, dict) and {"key", "models"} <= set(data) else (
            f"is not a folder of comparison models ({COMPARE_FILE} is not MAPEX's)")

    names = [COMPARE_FILE] + [p.name for p in Path(path).glob("*-seed*") if p.is_dir()] if Path(path).is_dir() else []
    return folder_problem(path, "a folder of comparison models", names, record_problem)


def compare_app(app: Application, pruned: str | Path, pretrained: str | Path, chips: str | Path, out: str | Path,
                device: str = "auto", finetuned_seed: int | None = None,
                on_step: Callable[[int, int, dict[str, Any]], None] | None = None,
                concurrency: Callable[[], int] | None = None, force: bool = False) -> dict[str, Any]:
    """Train the comparison models of ``app``'s evaluation and write them to the folder ``out``.

    ``out`` is written whole (built aside, swapped into place): one task model folder per run
    (``VARIANT-seedS``, :func:`~mapex_core.model.heads.save_task_model`) and ``compare.json``: the
    :func:`comparison_key` and, per model, its variant, seed, folder and training history.

    Args:
        pruned: the app's pruned model (pruned runs and the scratch architecture).
        pretrained: the unpruned pre-trained model.
        finetuned_seed: the seed of the fine-tuned model, whose pruned run is not made here
            (default: the app's first seed, the one fine-tuning uses).
        on_step, concurrency: as :func:`fit_comparisons`.
        force: replace ``out`` even when it holds what MAPEX did not write.

    Returns:
        ``app``, ``models`` (variant, seed, best validation value) and ``seconds``.

    Raises:
        OutputConflict: ``out`` holds other files (checked before any work), unless ``force``.
    """
    out = Path(out)
    check_output(out, compare_folder_problem, force)
    t0, dev = time.perf_counter(), resolve_device(device)
    encoder = load_model(pruned, device=dev)
    full = load_model(pretrained, device=dev)
    check_compatible(app, full.config.modalities)
    cfg = encoder.config
    train = open_app_store(app, chips, "train", cfg.modalities, cfg.normalization)
    val = open_app_store(app, chips, "val", cfg.modalities, cfg.normalization)
    classes = train.class_names or []
    key = comparison_key(app, classes, ChipStore.open(chips, in_memory=False).fingerprint(), pruned, pretrained)
    seed = app.finetune.seeds[0] if finetuned_seed is None else finetuned_seed
    fitted = fit_comparisons(app, comparison_runs(app.finetune.seeds, seed), pruned=pruned, cfg=cfg, full=full,
                             classes=classes, train=train, val=val, dev=dev, on_step=on_step, concurrency=concurrency)
    models = [{"variant": v, "seed": s, "dir": f"{v}-seed{s}", "history": hist} for (v, s), (_, hist) in fitted.items()]
    check_output(out, compare_folder_problem, force)  # again: something may have appeared while training
    with staged_folder(out) as tmp:
        for m, (model, _) in zip(models, fitted.values(), strict=True):
            save_task_model(model, tmp / m["dir"])
        atomic_write_json(tmp / COMPARE_FILE, {"key": key, "models": models})  # no timings: same inputs, same bytes
        replace_folder(tmp, out)
    return {"app": app.name, "models": [{"variant": m["variant"], "seed": m["seed"],
                                         "best_val": m["history"].get("best_val")} for m in models],
            "seconds": round(time.perf_counter() - t0, 2)}


def load_comparisons(folder: str | Path, key: dict[str, Any], runs: list[Run],
                     device: torch.device) -> tuple[Fitted, str | None]:
    """The models of ``runs`` that the comparison folder ``folder`` holds for ``key``.

    Returns:
        The loaded runs (with their histories), and why none could be used (``None`` when the folder
        matches, or is absent).

    Raises:
        ValueError: a model folder the record names is damaged (names the file).
    """
    record_file = Path(folder) / COMPARE_FILE
    if not record_file.is_file():
        return {}, None
    try:
        record = json.loads(record_file.read_text())
    except ValueError as exc:
        raise ValueError(f"{record_file}: not valid JSON ({exc}); run the compare stage again") from exc
    if not isinstance(record, dict) or record.get("key") != key:
        changed = sorted(k for k in key if not isinstance(record, dict) or (record.get("key") or {}).get(k) != key[k])
        return {}, f"{record_file} was made from other inputs ({', '.join(changed) or 'its record'} differ)"
    wanted, fitted = set(runs), {}
    for m in record.get("models", []):
        run = (m["variant"], int(m["seed"]))
        if run in wanted:
            fitted[run] = (load_task_model(Path(folder) / m["dir"], device=device), m["history"])
    return fitted, None
