"""Task metrics with bootstrap 95% intervals (numpy / scikit-learn).

=============  ==============  ================================================================
metric         task            definition
=============  ==============  ================================================================
``map_macro``  multilabel      mean over classes (with a positive) of average precision
``f1_macro``   multilabel      mean over classes of F1 at threshold 0.5
``accuracy``   multiclass      share of correct predictions
``miou``       segmentation    mean over classes (present or predicted) of IoU, ignore index -1
``iou_water``  segmentation    IoU of the class named ``water``
=============  ==============  ================================================================

Bootstrap intervals resample groups of chips (source patches or split blocks: overlapping and
neighbouring chips are not independent) with replacement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

METRICS = {
    "map_macro": "multilabel",
    "f1_macro": "multilabel",
    "accuracy": "multiclass",
    "miou": "segmentation",
    "iou_water": "segmentation",
}
IGNORE_INDEX = -1


def confusion_per_chip(pred: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """``(N, K, K)`` confusion matrices (rows: target, columns: prediction), ignore -1."""
    n = pred.shape[0]
    out = np.zeros((n, k, k), np.int64)
    for i in range(n):
        t, p = target[i].reshape(-1), pred[i].reshape(-1)
        ok = t != IGNORE_INDEX
        out[i] = np.bincount(t[ok] * k + p[ok], minlength=k * k).reshape(k, k)
    return out


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU per class from a ``(K, K)`` confusion matrix; NaN where a class is absent and unpredicted."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def _map_macro(scores: np.ndarray, targets: np.ndarray) -> float:
    from sklearn.metrics import (
        average_precision_score,  # scikit-learn loads only when a metric is computed
    )

    cols = targets.sum(0) > 0
    if not cols.any():
        return float("nan")
    return float(average_precision_score(targets[:, cols], scores[:, cols], average="macro"))


def _f1_macro(scores: np.ndarray, targets: np.ndarray) -> float:
    """Macro F1 over the classes that are present or predicted (absent-and-unpredicted classes
    would count as 0 and drag the mean, unlike ``map_macro`` which skips them too)."""
    from sklearn.metrics import f1_score

    pred = (scores >= 0.5).astype(int)
    labels = np.flatnonzero(targets.any(0) | pred.any(0))
    if labels.size == 0:
        return float("nan")
    return float(f1_score(targets, pred, labels=labels, average="macro", zero_division=0))


def metric_fn(metric: str, class_names: list[str]) -> Callable[[np.ndarray, np.ndarray], float]:
    """``f(outputs, targets) -> value`` for a metric.

    ``outputs`` are probabilities ``(N, K)`` (multilabel), class ids ``(N,)`` (multiclass) or
    per-chip confusion matrices ``(N, K, K)`` (segmentation, with ``targets`` unused).
    """
    if metric == "map_macro":
        return _map_macro
    if metric == "f1_macro":
        return _f1_macro
    if metric == "accuracy":
        return lambda pred, tgt: float((pred == tgt).mean())
    if metric == "miou":
        return lambda conf, _: float(np.nanmean(iou_per_class(conf.sum(0))))
    if metric == "iou_water":
        if "water" not in class_names:
            raise ValueError(f"metric iou_water needs a class named 'water'; classes: {class_names}")
        w = class_names.index("water")
        return lambda conf, _: float(iou_per_class(conf.sum(0))[w])
    raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")


def bootstrap_ci(fn: Callable[[np.ndarray, np.ndarray], float], outputs: list[np.ndarray],
                 targets: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 groups: np.ndarray | None = None) -> tuple[float, list[float]]:
    """Metric averaged over seeds (one ``outputs`` array per seed) and its bootstrap 95% interval.

    Each resample draws *groups* of chips with replacement (``groups``: one id per chip, e.g.
    the source patch or split block, since overlapping or neighbouring chips are not
    independent; default: every chip its own group) and averages the metric over the seeds.
    """
    value = float(np.mean([fn(o, targets) for o in outputs]))
    rng = np.random.default_rng(seed)
    ids = np.asarray(groups) if groups is not None else np.arange(len(targets))
    uniq = np.unique(ids)
    members = [np.flatnonzero(ids == g) for g in uniq]
    draws = []
    for _ in range(n_boot):
        idx = np.concatenate([members[j] for j in rng.integers(0, len(uniq), len(uniq))])
        vals = [fn(o[idx], targets[idx]) for o in outputs]
        if all(np.isfinite(vals)):
            draws.append(float(np.mean(vals)))
    if not draws:
        return value, [float("nan"), float("nan")]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return value, [float(lo), float(hi)]


def summarize(metric: str, class_names: list[str], outputs: list[np.ndarray], targets: np.ndarray,
              n_boot: int = 1000, groups: np.ndarray | None = None) -> dict[str, Any]:
    """Value, 95% interval (bootstrap over ``groups``) and (segmentation) per-class IoU."""
    fn = metric_fn(metric, class_names)
    value, ci = bootstrap_ci(fn, outputs, targets, n_boot, groups=groups)
    out: dict[str, Any] = {"value": value, "ci95": ci, "bootstrap_units": int(len(np.unique(groups)))
                           if groups is not None else len(targets)}
    if METRICS[metric] == "segmentation":
        ious = np.nanmean([iou_per_class(o.sum(0)) for o in outputs], axis=0)
        out["per_class_iou"] = {c: (None if np.isnan(v) else float(v)) for c, v in zip(class_names, ious, strict=True)}
        out["miou"] = float(np.nanmean(ious))
    if METRICS[metric] == "multilabel":
        out["map_macro"] = float(np.mean([_map_macro(o, targets) for o in outputs]))
        out["f1_macro"] = float(np.mean([_f1_macro(o, targets) for o in outputs]))
    return out
