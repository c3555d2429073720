"""`prune_app`: calibrate a pre-trained model on an application's chips and write the pruned model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mapex_core.apps import Application, check_compatible, check_model_app
from mapex_core.data.dataset import ChipStore, collate
from mapex_core.data.sampling import PresenceBatchSampler
from mapex_core.io import atomic_write_json, check_output, replace_folder, staged_folder
from mapex_core.model import load_model, save_model
from mapex_core.model.heads import load_task_model
from mapex_core.model.serialization import model_folder_problem
from mapex_core.pruning import origin_of, prune_pretrained
from mapex_core.runtime import resolve_device


def calibration_batches(app: Application, chips: str | Path, normalization: dict[str, Any] | None,
                        model_modalities: list[str], batch_size: int, max_batches: int) -> list[dict]:
    """Batches of the app's modalities from the train and val chips of ``chips`` (labels unused)."""
    probe = ChipStore.open(chips, in_memory=False)
    check_compatible(app, model_modalities, probe.stored_modalities, where=str(chips))
    store = ChipStore.open(chips, modalities=app.modalities, split=["train", "val"], normalization=normalization)
    if len(store) == 0:
        raise ValueError(f"{chips}: no train/val chips with modalities {app.modalities} to calibrate on")
    batches = PresenceBatchSampler(store, batch_size, seed=0, drop_last=False).batches(0)[:max_batches]
    return [collate([store[i] for i in idx]) for idx in batches]


def prune_app(app: Application, checkpoint: str | Path, chips: str | Path, out: str | Path,
              device: str = "auto", force: bool = False, task_model: str | Path | None = None) -> dict[str, Any]:
    """Prune the pre-trained model in ``checkpoint`` for ``app`` under ``app.prune``.

    Writes the folder ``out`` whole (built aside, swapped into place): ``config.json``,
    ``model.safetensors`` (a standalone ``MapexModel``) and ``prune_report.json`` (with every
    expert's score under ``app.prune.strategy``); returns the report.

    Args:
        force: replace ``out`` even when it holds something that is not a MAPEX model folder.
        task_model: for ``strategy: task``, a folder with a fine-tuned task model of ``app`` whose
            class probabilities are measured instead of the pre-trained encoder's tokens.

    Raises:
        OutputConflict: ``out`` holds other files (checked before any work), unless ``force``.
        ValueError: ``task_model`` is of another application, or given with another strategy.
    """
    t0 = time.perf_counter()
    out = Path(out)
    check_output(out, model_folder_problem, force)
    p = app.prune
    if task_model is not None and p.strategy != "task":
        raise ValueError(f"a task model ({task_model}) is only used by prune.strategy 'task'; "
                         f"application {app.name!r} uses {p.strategy!r}")
    dev = resolve_device(device)
    full = load_model(checkpoint, device=dev)
    check_compatible(app, full.config.modalities)
    task = None
    if task_model is not None:
        task = load_task_model(task_model, device=dev)
        check_model_app(task.info, app.name, task_model)
    batches = calibration_batches(app, chips, full.config.normalization, full.config.modalities,
                                  p.batch_size, p.calibration_batches)
    result = prune_pretrained(full, batches, app.modalities, p, task_model=task,
                              origin={**origin_of(checkpoint, full), "app": app.name})
    pruned, report = result.model, result.report
    report.update(app=app.name, calibration_chips=sum(len(b["index"]) for b in batches),
                  task_model=None if task_model is None else str(Path(task_model).resolve()))
    check_output(out, model_folder_problem, force)  # again: something may have appeared meanwhile
    with staged_folder(out) as tmp:
        save_model(pruned, tmp)
        atomic_write_json(tmp / "prune_report.json", report)  # no timings in the file: re-running gives the same bytes
        replace_folder(tmp, out)
    return report | {"seconds": round(time.perf_counter() - t0, 2)}
