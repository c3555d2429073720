"""Ablations of an application: what modality routing, MAE pre-training, pruning and fine-tuning buy.

Why this module is long: the arms, the models they train (a standard-routing pre-training, a dense
ViT of the same active parameters), the k-shot subsets, the paired statistics and the report are
one procedure; split up, each part would only make sense next to the others.

:func:`ablate_app` (``mapex ablate --app APP``) trains every *arm* with the application's fine-tuning
budget (its ``finetune`` section; ``steps`` may be lowered for all arms alike), on the same train
split, the same val split (early stopping) and the same test split (the score), once per seed:

=================  ===================================================================================
arm                what is trained
=================  ===================================================================================
``modality``       the reference: the modality-routed pre-trained model pruned with the app's ``prune``
                   criterion and ``keep_per_layer`` (a ``prune.target`` sweep is not run here), fully
                   fine-tuned on the whole train split
``standard``       a model pre-trained with ``routing: standard`` (same config, chips and pre-training
                   budget as the reference's) pruned to the same number of experts per MoE layer (every
                   expert is a candidate: standard routing has no groups), fine-tuned alike
``dense``          a dense ViT with the reference's active parameters per token, from random weights
``scratch``        the reference's pruned architecture from random weights (no MAE pre-training)
``linear``         the reference with its encoder frozen: a linear probe (only the task head trains)
``labels-Npct``    the reference fine-tuned on N% of the train split (default 1% and 10%; 100% is the
                   reference), at least one chip, drawn by the seed
``kshot-K``        the reference fine-tuned on a K-shot subset of the train split (default K = 10)
=================  ===================================================================================

**The dense model.** A MoE layer left with exactly ``top_k`` experts sends every token to every
expert, weighted by its gates (:class:`~mapex_core.model.moe.MoELayer`, "All experts"): one dense FFN
of width ``top_k x`` the expert width. The dense model is the reference's config with such layers
(``top_k`` shared experts, no groups, standard routing) and nothing else changed, trained from scratch.

**Active parameters per token** (:func:`active_parameters`): the encoder's parameters a token's
features go through: patch and modality embeddings (of every input modality), attention, norms, dense
FFNs, and in each MoE layer ``top_k`` of its experts. The routers and modality biases only choose and
weight experts; they are counted apart (``routing_params``), and the MAE decoder is not counted. The
dense model's active parameters equal the reference's; its routers are smaller (``top_k`` columns).

**K-shot** (``kshot-K``): for each class present in the train split, rarest first, chips that
contain it are added in the seed's random order until K chosen chips contain it (or all that do). A
chip contains a class when its label says so: its class (multiclass: exactly K chips per class), one
of its labels (multi-label), or at least one labelled pixel of it (segmentation). Multi-label and
segmentation chips hold several classes, so the subset can exceed K per class and K x classes overall;
the report gives its size per seed.

**Statistics.** Per arm: ``value`` is the test metric averaged over the seeds; ``ci95`` its bootstrap
95% interval over the test split's independent units (source patches or split blocks, as evaluation),
each resample averaging the seeds (:func:`mapex_core.metrics.bootstrap_ci`); ``per_seed`` the same for
each seed alone. ``vs_reference`` is the paired difference to the reference (the same resampled units
and seeds for both arms), with ``conclusive`` and a ``verdict`` in words: an interval that includes 0,
or one from fewer than ``MIN_UNITS`` (10) independent test units, supports no conclusion. The
intervals cover the test sample, not the seeds; ``seed_std`` is the spread over the seeds.

**Outputs.** The folder ``out`` (default ``reports/APP/ablation``) is built aside and swapped in
whole: ``ablation.json``, and ``pretrain-standard/`` when the standard-routing model was pre-trained
here (its final files, no checkpoints; pass it as ``standard_checkpoint`` to reuse it). MLflow: a
``track`` callable (``mapex ablate`` passes :func:`mapex_core.tracking.store.log_run_group`) logs one
parent run with one nested run per arm and seed.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mapex_core.apps import Application, FinetuneParams, check_compatible, get_application
from mapex_core.io import (
    atomic_write_json,
    check_output,
    folder_problem,
    json_with_keys,
    replace_folder,
    staged_folder,
)
from mapex_core.metrics import bootstrap_ci, metric_fn, summarize
from mapex_core.model import MapexConfig, MapexModel, load_model
from mapex_core.model.heads import TaskModel, strip_decoder
from mapex_core.params import load_params, section
from mapex_core.progress import available_cores
from mapex_core.pruning import origin_of, prune_pretrained
from mapex_core.runtime import resolve_device
from mapex_core.training.checkpoint import latest_checkpoint
from mapex_core.training.evaluate import Job, bootstrap_groups, run_jobs
from mapex_core.training.finetune import open_app_store, predict, task_model, train_task
from mapex_core.training.pretrain import PretrainParams, open_stores, pretrain
from mapex_core.training.prune import calibration_batches

ABLATION_FILE = "ablation.json"
STANDARD_DIR = "pretrain-standard"
ABLATION_KEYS = ("app", "metric", "reference", "arms")  # how an existing ablation.json is recognised
REFERENCE = "modality"
FRACTIONS = (0.01, 0.1)
SHOTS = 10
MIN_UNITS = 10  # fewer independent test units than this: a bootstrap interval says little
Line = Callable[[str], None]
Progress = Callable[[int, int, dict[str, Any]], None]  # (steps done, total steps, info)
Tracker = Callable[..., dict[str, Any]]


def default_out(app: str) -> Path:
    """Where ``mapex ablate --app APP`` writes by default: ``reports/APP/ablation`` (next to the evaluation)."""
    return Path("reports") / app / "ablation"


def ablation_folder_problem(path: str | Path) -> str | None:
    """What makes ``path`` something other than an ablation folder MAPEX wrote (``None``: nothing)."""
    def ours(folder: Path) -> str | None:
        f = folder / ABLATION_FILE
        return None if not f.exists() or json_with_keys(f, ABLATION_KEYS) else f"{f} is not an ablation report"

    return folder_problem(path, "an ablation folder", (ABLATION_FILE, STANDARD_DIR), ours)


@dataclass(frozen=True)
class Arm:
    """One arm of the ablation.

    Attributes:
        name: the arm's name (``--only`` takes these).
        comparison: the question it answers against the reference (a key of :data:`COMPARISONS`).
        description: one line for people.
        model: ``modality`` (the pruned reference), ``standard`` (pruned standard routing) or ``dense``.
        init: ``pretrained`` or ``scratch`` (random weights).
        mode: ``full`` fine-tuning or ``linear`` probe.
        label_fraction: share of the train split used.
        shots: K of a K-shot subset (``None``: a label fraction).
    """

    name: str
    comparison: str
    description: str
    model: str = "modality"
    init: str = "pretrained"
    mode: str = "full"
    label_fraction: float = 1.0
    shots: int | None = None


COMPARISONS = {
    "routing": "modality routing vs standard routing, each pre-trained alike and pruned to the same size",
    "dense": "the pruned MoE vs a dense ViT of the same active parameters per token trained from scratch",
    "pretraining": "with vs without MAE pre-training (the same pruned architecture)",
    "probe": "full fine-tuning vs a linear probe (encoder frozen)",
    "labels": "label fractions and k-shot (100% of the train split is the reference)",
}


def fraction_name(fraction: float) -> str:
    """The arm name of a label fraction: ``labels-1pct`` for 0.01."""
    return f"labels-{fraction * 100:g}pct"


def all_arms(fractions: tuple[float, ...] = FRACTIONS, shots: int = SHOTS) -> list[Arm]:
    """Every arm, the reference first."""
    arms = [
        Arm(REFERENCE, "reference", "modality routing, MAE pre-trained, pruned, full fine-tuning, all train chips"),
        Arm("standard", "routing", "standard routing (pre-trained alike), pruned to the same size", model="standard"),
        Arm("dense", "dense", "dense ViT, same active parameters per token, from scratch", model="dense",
            init="scratch"),
        Arm("scratch", "pretraining", "the pruned architecture from random weights (no MAE pre-training)",
            init="scratch"),
        Arm("linear", "probe", "linear probe: encoder frozen, head trained", mode="linear"),
    ]
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise ValueError(f"label fraction {f} must be in (0, 1) (1.0 is the reference arm)")
        arms.append(Arm(fraction_name(f), "labels", f"{f:.0%} of the train chips", label_fraction=f))
    if shots < 1:
        raise ValueError(f"shots must be a positive number of examples per class, got {shots}")
    arms.append(Arm(f"kshot-{shots}", "labels", f"{shots}-shot subset of the train chips", shots=shots))
    return arms


def select_arms(only: list[str] | None, arms: list[Arm]) -> list[Arm]:
    """The arms named in ``only`` (all when ``None``), always with the reference, in :func:`all_arms` order.

    Raises:
        ValueError: an unknown arm name (lists the known ones).
    """
    if not only:
        return arms
    known = [a.name for a in arms]
    bad = [n for n in only if n not in known]
    if bad:
        raise ValueError(f"--only: unknown arm(s) {bad}; known: {known}")
    return [a for a in arms if a.name == REFERENCE or a.name in only]


# ----- models ------------------------------------------------------------------------------------
def active_parameters(encoder: MapexModel) -> dict[str, int]:
    """The encoder's parameters per token (see the module docstring), its routing and all its parameters.

    Returns:
        ``active_per_token``, ``routing`` (routers and modality biases) and ``encoder`` (every parameter
        but the MAE decoder's).
    """
    active = routing = total = 0
    k = encoder.config.top_k
    for name, p in encoder.named_parameters():
        if name.startswith(("decoder", "mask_token")):
            continue
        n = p.numel()
        total += n
        leaf = name.rsplit(".", 1)[-1]
        if ".ffn." in name and leaf in ("router", "modality_bias"):
            routing += n
        elif ".ffn." in name and leaf in ("w1", "b1", "w2", "b2"):
            experts = p.shape[0]  # stacked per expert: (E, ...)
            active += n // experts * min(k, experts)
        else:
            active += n
    return {"active_per_token": active, "routing": routing, "encoder": total}


def dense_config(pruned: MapexConfig) -> MapexConfig:
    """The dense counterpart of a pruned config: each MoE layer is ``top_k`` always-on experts (no groups)."""
    data = pruned.to_dict()
    data.update(experts_per_modality=0, shared_experts=pruned.top_k, routing="standard", kept_experts=None,
                expert_modalities=None, origin={"ablation": "dense", "like": pruned.origin})
    return MapexConfig.from_dict(data)


def contains_class(labels: np.ndarray, label_type: str, num_classes: int) -> np.ndarray:
    """``(N, K)`` whether each chip contains each class (see K-shot in the module docstring)."""
    n = labels.shape[0]
    if label_type == "multilabel":
        return labels.reshape(n, num_classes) > 0
    if label_type == "class":
        return labels.reshape(n, 1) == np.arange(num_classes)[None, :]
    flat = labels.reshape(n, -1)  # (N, H*W) masks, -1 = unlabelled
    return np.stack([(flat == c).any(axis=1) for c in range(num_classes)], axis=1)


def k_shot_subset(contains: np.ndarray, shots: int, seed: int) -> list[int]:
    """Positions of a K-shot subset: every class (rarest first) in at least ``shots`` chosen chips, or all it is in.

    Args:
        contains: ``(N, K)`` whether chip ``i`` contains class ``c`` (:func:`contains_class`).
        shots: K.
        seed: the random order in which chips of a class are taken.
    """
    order = np.random.default_rng(seed).permutation(contains.shape[0]).tolist()
    counts = contains.sum(axis=0)
    chosen: list[int] = []
    taken: set[int] = set()
    for c in sorted(np.flatnonzero(counts).tolist(), key=lambda c: (int(counts[c]), c)):
        need = shots - int(contains[chosen, c].sum()) if chosen else shots
        for i in order:
            if need <= 0:
                break
            if contains[i, c] and i not in taken:
                chosen.append(i)
                taken.add(i)
                need -= 1
    return sorted(chosen)


# ----- the standard-routing pre-training ---------------------------------------------------------
def recorded_pretraining(checkpoint: Path) -> tuple[PretrainParams | None, int]:
    """The pre-training params and process count recorded in ``checkpoint``'s newest checkpoint (``None``, 1: none)."""
    ckpt = latest_checkpoint(checkpoint / "checkpoints")
    trainer = ckpt / "trainer.json" if ckpt is not None else None
    if trainer is None or not trainer.is_file():
        return None, 1
    state = json.loads(trainer.read_text())
    raw = dict(state.get("params") or {})
    raw["splits"] = tuple(raw.get("splits", ("train",)))
    try:
        return PretrainParams(**raw), int(state.get("world_size", 1))
    except TypeError as exc:
        raise ValueError(f"{trainer}: pre-training params not understood ({exc})") from exc


def _metrics(folder: Path) -> dict[str, Any]:
    path = folder / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def standard_model(full: MapexModel, checkpoint: Path, standard_checkpoint: str | Path | None,
                   pretrain_chips: list[str | Path] | None, params: str | Path | dict[str, Any] | None,
                   staging: Path, device: str, line: Line) -> tuple[MapexModel, dict[str, Any]]:
    """The standard-routing pre-trained model: loaded from ``standard_checkpoint``, or pre-trained into
    ``staging/pretrain-standard`` with the reference's config (``routing: standard``), chips and budget.

    Raises:
        ValueError: no chips to pre-train on; the budget is not recorded and no params are given; the chips
            differ from the reference's; a given model is not a standard-routing one of the same config.
    """
    ref_cfg = full.config.to_dict()
    ref_metrics = _metrics(checkpoint)
    if standard_checkpoint is not None:
        std = load_model(standard_checkpoint, device=resolve_device(device))
        got = std.config.to_dict()
        if got.get("routing") != "standard" or got.get("kept_experts") is not None:
            raise ValueError(f"{standard_checkpoint}: not an unpruned standard-routing model (routing "
                             f"{got.get('routing')!r}, kept_experts {got.get('kept_experts')})")
        differ = sorted(k for k in ref_cfg if k not in ("routing", "origin") and ref_cfg[k] != got.get(k))
        if differ:
            raise ValueError(f"{standard_checkpoint}: its config differs from the reference's {checkpoint} in {differ}; "
                             "the routing ablation compares models that differ only in routing")
        std_metrics = _metrics(Path(standard_checkpoint))
        info = {"checkpoint": str(Path(standard_checkpoint).resolve()), "pretrained_here": False}
    else:
        if not pretrain_chips:
            raise ValueError("the standard arm pre-trains a standard-routing model on the reference's pre-training "
                             "chips: pass them (--pretrain-chips) or a pre-trained one (--standard-checkpoint)")
        budget, world = recorded_pretraining(checkpoint)
        source = f"{checkpoint}/checkpoints"
        if budget is None:
            if params is None:
                raise ValueError(f"{checkpoint}: no checkpoint records its pre-training budget; pass --params "
                                 "(its 'pretrain' section) or --standard-checkpoint")
            data = params if isinstance(params, dict) else load_params(params)
            budget, source = section(PretrainParams, data, "pretrain", source=str(params)), str(params)
        if world != 1:
            raise ValueError(f"{checkpoint} was pre-trained by {world} processes; pre-train the standard model the "
                             f"same way (mapex pretrain --nproc {world} with model.routing: standard) and pass it "
                             "as --standard-checkpoint")
        n_chips = sum(len(s) for s in open_stores(pretrain_chips, full.config, list(budget.splits)))
        if ref_metrics.get("num_chips") not in (None, n_chips):
            raise ValueError(f"--pretrain-chips {[str(c) for c in pretrain_chips]} hold {n_chips} chips in splits "
                             f"{list(budget.splits)}; the reference was pre-trained on {ref_metrics['num_chips']} "
                             f"({checkpoint}/metrics.json): pass the same chip stores")
        cfg = MapexConfig.from_dict({**ref_cfg, "routing": "standard"})
        out = staging / STANDARD_DIR
        line(f"ablate: pre-training the standard-routing model ({budget.steps} steps, budget from {source})")
        pretrain(pretrain_chips, out, cfg, budget, device=device, resume=False, overwrite=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the final model is all the ablation needs
        std = load_model(out, device=resolve_device(device))
        std_metrics = _metrics(out)
        info = {"checkpoint": STANDARD_DIR, "pretrained_here": True, "params": budget.__dict__ | {
            "splits": list(budget.splits)}, "chips": [str(Path(c).resolve()) for c in pretrain_chips]}
    keys = ("num_chips", "samples_seen", "final_loss", "specialisation")
    info |= {k: std_metrics.get(k) for k in keys}
    info["same_chips_and_samples"] = all(std_metrics.get(k) == ref_metrics.get(k) for k in keys[:2])
    return std, info


# ----- statistics ----------------------------------------------------------------------------------
def paired_difference(metric: str, classes: list[str], arm: list[np.ndarray], ref: list[np.ndarray],
                      targets: np.ndarray, n_boot: int, groups: np.ndarray) -> tuple[float, list[float]]:
    """Metric of ``arm`` minus that of ``ref`` (seeds paired, averaged) with a paired bootstrap 95% interval."""
    fn = metric_fn(metric, classes)

    def diff(o: np.ndarray, t: np.ndarray) -> float:
        return fn(o[:, 0], t) - fn(o[:, 1], t)

    stacked = [np.stack([a, r], axis=1) for a, r in zip(arm, ref, strict=True)]  # (N, 2, ...): same chips
    return bootstrap_ci(diff, stacked, targets, n_boot, groups=groups)


def conclusive(ci: list[float], units: int) -> bool:
    """Whether a difference's interval supports a conclusion: finite, excluding 0, from >= :data:`MIN_UNITS` units."""
    lo, hi = ci
    return math.isfinite(lo) and math.isfinite(hi) and not lo <= 0.0 <= hi and units >= MIN_UNITS


def verdict(name: str, diff: float, ci: list[float], units: int) -> str:
    """One plain sentence on an arm's difference to the reference (ends in "no conclusion" unless conclusive)."""
    lo, hi = ci
    head = f"{name} - {REFERENCE} = {diff:+.3f} [{lo:+.3f}, {hi:+.3f}]: "
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return head + "no interval (the metric is undefined on the resamples): no conclusion"
    if lo <= 0.0 <= hi:
        return head + "the interval includes 0: no conclusion"
    if units < MIN_UNITS:
        return head + (f"the interval excludes 0, but it comes from only {units} independent test units, too few "
                       "for a bootstrap interval to mean anything: no conclusion")
    return head + (f"{REFERENCE} is better" if hi < 0 else f"{name} is better")


# ----- the ablation --------------------------------------------------------------------------------
def ablate_app(app: str | Application, checkpoint: str | Path, chips: str | Path | None = None,
               out: str | Path | None = None, *, params: str | Path | dict[str, Any] | None = None,
               seeds: int = 3, only: list[str] | None = None, steps: int | None = None,
               fractions: tuple[float, ...] = FRACTIONS, shots: int = SHOTS,
               standard_checkpoint: str | Path | None = None, pretrain_chips: list[str | Path] | None = None,
               device: str = "auto", track: Tracker | None = None, on_line: Line | None = None,
               on_step: Progress | None = None, force: bool = False) -> dict[str, Any]:
    """Run the ablation arms of ``app`` and write ``out/ablation.json`` (see the module docstring).

    Args:
        app: an :class:`~mapex_core.apps.Application`, or its name in ``params`` (or an app YAML file).
        checkpoint: the unpruned modality-routed pre-trained model (the reference's source).
        chips: the labelled chip store (default: the app's ``chips``).
        out: output folder (default :func:`default_out`).
        params: params file or dict: the app's definition, and the pre-training budget when
            ``checkpoint`` records none.
        seeds: seeds per arm: the app's first seed and the next ones.
        only: arm names to run (the reference always runs).
        steps: fine-tuning steps of every arm (default: the app's ``finetune.steps``).
        fractions: label fractions below 1 (one arm each).
        shots: K of the k-shot arm.
        standard_checkpoint: a standard-routing pre-trained model (default: pre-train one here).
        pretrain_chips: the chip stores the reference was pre-trained on (for the standard model).
        device: ``auto``, ``cpu`` or ``cuda``.
        track: logs the MLflow run group (``name``, ``params``, ``metrics``, ``children``, ``tags``,
            ``artifacts``) and returns its run ids (:func:`mapex_core.tracking.store.log_run_group`).
        on_line: receives one line per arm and seed as it starts and ends.
        on_step: progress callback ``(steps done, total steps, info)`` over all the fine-tuning runs.
        force: write into an ``out`` that holds something MAPEX did not write.

    Returns:
        The report (``out`` added).

    Raises:
        OutputConflict: ``out`` holds other files (checked before any work), unless ``force``.
        ValueError: an unknown arm, a pruned or standard-routing ``checkpoint``, a store that cannot serve the app.
    """
    t0 = time.perf_counter()
    application = app if isinstance(app, Application) else get_application(
        app, params if params is not None else "params.yaml")
    if chips is None and not application.chips:
        raise ValueError(f"application {application.name!r} has no 'chips' (the chip store it is trained on); "
                         "pass --chips")
    chips = Path(chips if chips is not None else str(application.chips))
    out = Path(out) if out is not None else default_out(application.name)
    check_output(out, ablation_folder_problem, force)
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    arms = select_arms(only, all_arms(tuple(fractions), shots))
    line = on_line or (lambda _text: None)
    dev = resolve_device(device)
    checkpoint = Path(checkpoint)
    full = load_model(checkpoint, device=dev)
    if full.config.kept_experts is not None or full.config.routing != "modality":
        raise ValueError(f"{checkpoint}: the reference is the unpruned modality-routed pre-trained model; this one "
                         f"has routing {full.config.routing!r} and kept_experts {full.config.kept_experts}")
    check_compatible(application, full.config.modalities)
    seed_list = [application.finetune.seeds[0] + i for i in range(seeds)]
    budget = replace(application.finetune, steps=steps or application.finetune.steps, seeds=seed_list)
    norm = full.config.normalization
    train = open_app_store(application, chips, "train", full.config.modalities, norm)
    val = open_app_store(application, chips, "val", full.config.modalities, norm)
    test = open_app_store(application, chips, "test", full.config.modalities, norm)
    if len(test) == 0 or len(train) == 0:
        raise ValueError(f"{chips}: application {application.name!r} needs train and test chips; the store has "
                         f"{len(train)} train and {len(test)} test chips")
    classes = train.class_names or []
    pp = application.prune
    batches = calibration_batches(application, chips, norm, full.config.modalities, pp.batch_size,
                                  pp.calibration_batches)
    line(f"ablate {application.name}: pruning the reference ({pp.strategy})")
    ref = prune_pretrained(full, batches, application.modalities, pp,
                           origin={**origin_of(checkpoint, full), "app": application.name})
    kept = {b: len(v) for b, v in ref.report["kept_experts"].items()}
    encoders: dict[str, MapexModel] = {"modality": strip_decoder(ref.model)}
    with staged_folder(out) as tmp:
        report: dict[str, Any] = {"pretraining": {"reference": {
            "checkpoint": str(checkpoint.resolve()),
            **{k: _metrics(checkpoint).get(k) for k in ("num_chips", "samples_seen", "final_loss", "specialisation")}}}}
        if any(a.model == "standard" for a in arms):
            std_full, info = standard_model(full, checkpoint, standard_checkpoint, pretrain_chips, params, tmp,
                                            device, line)
            std_path = out / STANDARD_DIR if info["pretrained_here"] else Path(str(standard_checkpoint))
            size = max(kept.values())
            strategy = pp.strategy if pp.strategy != "group" else "coverage"
            std_params = replace(pp, strategy=strategy, keep_per_layer=size)
            std = prune_pretrained(std_full, calibration_batches(application, chips, std_full.config.normalization,
                                                                 std_full.config.modalities, pp.batch_size,
                                                                 pp.calibration_batches),
                                   application.modalities, std_params,
                                   origin={**origin_of(std_path, std_full), "app": application.name})
            encoders["standard"] = strip_decoder(std.model)
            report["pretraining"]["standard"] = info | {"pruned_to": size, "strategy": strategy,
                                                        "kept_experts": std.report["kept_experts"]}
        encoders["dense"] = MapexModel(dense_config(ref.model.config), with_decoder=False)
        runs = _train_arms(application, arms, seed_list, encoders, budget, train, val, test, classes, dev, line,
                           on_step)
        report = _report(application, arms, seed_list, budget, runs, encoders, ref.report, report, train, val,
                         test, classes, chips, checkpoint)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(tmp / ABLATION_FILE, report)
        error: Exception | None = None
        if track is not None:
            try:
                report["mlflow"] = track(**run_group(report), artifacts=[tmp / ABLATION_FILE])
                atomic_write_json(tmp / ABLATION_FILE, report)
            except Exception as exc:  # noqa: BLE001 - the report is kept; the error is raised after
                error = exc
        check_output(out, ablation_folder_problem, force)  # again: something may have appeared meanwhile
        replace_folder(tmp, out)
    if error is not None:
        raise error
    return report | {"out": str(out)}


def _train_arms(app: Application, arms: list[Arm], seeds: list[int], encoders: dict[str, MapexModel],
                budget: FinetuneParams, train: Any, val: Any, test: Any, classes: list[str], dev: torch.device,
                line: Line, on_step: Progress | None) -> dict[tuple[str, int], dict[str, Any]]:
    """Fine-tune every (arm, seed) and score it on the test split; per run: outputs, targets, history, sizes."""
    contains = contains_class(np.asarray(train.labels), train.label_type, len(classes))
    jobs: list[Job] = []
    arm_of: dict[int, Arm] = {}
    for arm in arms:
        for s in seeds:
            def make(arm: Arm = arm, s: int = s) -> TaskModel:
                torch.manual_seed(s)
                if arm.init == "scratch":
                    enc = MapexModel(encoders[arm.model].config, with_decoder=False)  # random weights, seeded
                else:
                    enc = copy.deepcopy(encoders[arm.model])
                return task_model(enc.to(dev), app, classes, {"ablation_arm": arm.name}, s)

            jobs.append(Job(arm.name, s, make))
            arm_of[id(jobs[-1])] = arm
    results: dict[tuple[str, int], dict[str, Any]] = {}
    progress: dict[int, int] = {}
    lock = threading.Lock()
    n_done = [0]

    def fit(model: TaskModel, job: Job) -> dict[str, Any]:
        arm = arm_of[id(job)]
        p = replace(budget, mode=arm.mode, label_fraction=arm.label_fraction)
        subset = k_shot_subset(contains, arm.shots, job.seed) if arm.shots else None
        line(f"ablate {app.name}: {arm.name} seed {job.seed}: training ({arm.description})")

        def step_cb(step: int, total: int, info: dict[str, Any]) -> None:
            with lock:
                progress[id(job)] = step
                if on_step is not None:
                    on_step(sum(progress.values()), len(jobs) * budget.steps, info | {"run": f"{arm.name} seed {job.seed}"})

        t = time.perf_counter()
        hist = train_task(model, train, val, app.metric, p, job.seed, dev, 0.0, on_step=step_cb, subset=subset)
        outputs, targets = predict(model, test, budget.batch_size, dev)
        value = metric_fn(app.metric, classes)(outputs, targets)
        seconds = round(time.perf_counter() - t, 2)
        with lock:
            results[(arm.name, job.seed)] = {"outputs": outputs, "targets": targets, "history": hist,
                                             "params": model.num_parameters(), "seconds": seconds}
            n_done[0] += 1
            line(f"ablate {app.name}: [{n_done[0]}/{len(jobs)}] {arm.name} seed {job.seed}: {app.metric} "
                 f"{value:.4f} on {len(test)} test chips ({hist['train_chips']} train chips, best step "
                 f"{hist['best_step']}, {seconds:.1f} s)")
        model.to("cpu")  # the next runs need the device's memory, not this model
        return hist

    def concurrency() -> int:
        return 1 if dev.type == "cuda" else max(1, available_cores() // torch.get_num_threads())

    run_jobs(jobs, fit, concurrency)
    return results


def _report(app: Application, arms: list[Arm], seeds: list[int], budget: FinetuneParams,
            runs: dict[tuple[str, int], dict[str, Any]], encoders: dict[str, MapexModel], prune_report: dict[str, Any],
            report: dict[str, Any], train: Any, val: Any, test: Any, classes: list[str], chips: Path,
            checkpoint: Path) -> dict[str, Any]:
    """The JSON report of the arms' runs (see the module docstring)."""
    groups = bootstrap_groups(test)
    units = int(len(np.unique(groups)))
    fn = metric_fn(app.metric, classes)
    ref_outputs = [runs[(REFERENCE, s)]["outputs"] for s in seeds]
    out_arms: dict[str, Any] = {}
    for arm in arms:
        mine = [runs[(arm.name, s)] for s in seeds]
        outputs, targets = [r["outputs"] for r in mine], mine[0]["targets"]
        rep = summarize(app.metric, classes, outputs, targets, budget.bootstrap, groups=groups)
        sizes = active_parameters(encoders[arm.model])
        per_seed = []
        for s, r in zip(seeds, mine, strict=True):
            v, ci = bootstrap_ci(fn, [r["outputs"]], targets, budget.bootstrap, groups=groups)
            h = r["history"]
            per_seed.append({"seed": s, "value": v, "ci95": ci, "train_chips": h["train_chips"],
                             "best_step": h["best_step"], "best_val": h["best_val"], "stopped_at": h["stopped_at"],
                             "seconds": r["seconds"]})
        values = [p["value"] for p in per_seed]
        entry = {"comparison": arm.comparison, "description": arm.description, "model": arm.model, "init": arm.init,
                 "mode": arm.mode, "label_fraction": arm.label_fraction, "shots": arm.shots,
                 "params": mine[0]["params"], "encoder_params": sizes["encoder"],
                 "active_params_per_token": sizes["active_per_token"], "routing_params": sizes["routing"],
                 "experts_per_moe_layer": [len(layer.original_experts) for layer in _moe(encoders[arm.model])],
                 **rep, "seed_values": values,
                 "seed_std": statistics.stdev(values) if len(values) > 1 else None, "per_seed": per_seed,
                 "vs_reference": None}
        if arm.name != REFERENCE:
            d, dci = paired_difference(app.metric, classes, outputs, ref_outputs, targets, budget.bootstrap, groups)
            entry["vs_reference"] = {"difference": d, "ci95": dci,
                                     "excludes_zero": bool(math.isfinite(dci[0]) and not dci[0] <= 0.0 <= dci[1]),
                                     "conclusive": conclusive(dci, units),
                                     "verdict": verdict(arm.name, d, dci, units)}
        out_arms[arm.name] = entry
    comparisons = {}
    for key, question in COMPARISONS.items():
        names = [a.name for a in arms if a.comparison == key]
        if names:
            comparisons[key] = {"question": question, "arms": [REFERENCE, *names],
                                "verdicts": [out_arms[n]["vs_reference"]["verdict"] for n in names]}
    sizes = {"train": len(train), "val": len(val), "test": len(test), "test_units": units}
    notes = [f"test split: {len(test)} chips in {units} independent units (source patches or split blocks); the "
             "intervals resample those units, so they say how much the test sample could move each value, not "
             "how much another seed would (seed_std)"]
    if units < MIN_UNITS:
        notes.append(f"only {units} independent test units: bootstrap intervals from so few units are unreliable "
                     "(often degenerate); no difference here is evidence either way")
    return {
        "app": app.name, "task": app.task, "metric": app.metric, "modalities": app.modalities,
        "chips": str(chips.resolve()), "checkpoint": str(checkpoint.resolve()), "reference": REFERENCE,
        "seeds": seeds, "budget": dict(budget.__dict__), "sizes": sizes, "classes": classes,
        "reference_pruning": {k: prune_report.get(k) for k in ("strategy", "keep_per_layer", "kept_experts",
                                                              "params_before", "params_after", "reduction")},
        **report, "arms": out_arms, "comparisons": comparisons, "notes": notes,
    }


def _moe(encoder: MapexModel) -> list[Any]:
    return [blk.ffn for blk in encoder.blocks if blk.is_moe]


def run_group(report: dict[str, Any]) -> dict[str, Any]:
    """The MLflow run group of a report: a parent run (settings, per-arm values) and one child per arm and seed."""
    metrics: dict[str, float] = {}
    children = []
    for name, arm in report["arms"].items():
        metrics |= {f"{name}.value": arm["value"], f"{name}.ci95_low": arm["ci95"][0],
                    f"{name}.ci95_high": arm["ci95"][1], f"{name}.active_params_per_token": arm["active_params_per_token"]}
        if arm["vs_reference"] is not None:
            metrics[f"{name}.difference"] = arm["vs_reference"]["difference"]
        for s in arm["per_seed"]:
            children.append({"name": f"{name} seed {s['seed']}",
                             "params": {"arm": name, "seed": s["seed"], "model": arm["model"], "init": arm["init"],
                                        "mode": arm["mode"], "label_fraction": arm["label_fraction"],
                                        "shots": arm["shots"], "train_chips": s["train_chips"]},
                             "metrics": {report["metric"]: s["value"], "ci95_low": s["ci95"][0],
                                         "ci95_high": s["ci95"][1], "best_val": s["best_val"],
                                         "best_step": s["best_step"], "params": arm["params"],
                                         "active_params_per_token": arm["active_params_per_token"]},
                             "tags": {"mapex.arm": name}})
    return {"name": f"ablate {report['app']}",
            "params": {"app": report["app"], "metric": report["metric"], "seeds": report["seeds"],
                       "chips": report["chips"], "checkpoint": report["checkpoint"], "budget": report["budget"],
                       "sizes": report["sizes"]},
            "metrics": metrics, "children": children,
            "tags": {"mapex.stage": "ablate", "mapex.app": report["app"]}}
