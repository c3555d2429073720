"""What each task is: its labels, its loss, its probabilities and what its metrics are fed.

One :class:`TaskSpec` per task, used everywhere a model's logits meet labels or users:
fine-tuning (``loss``), evaluation (``metric_inputs``), whole-scene prediction, export and the
served model (``probabilities``). A new task is one entry in :data:`TASKS` (plus a head in
:mod:`mapex_core.model.heads` and its metrics in :mod:`mapex_core.metrics`).

=============  ===========  =========================  ==================  =========================
task           labels       loss                       probabilities       metric inputs
=============  ===========  =========================  ==================  =========================
multilabel     multi-hot    binary cross-entropy       sigmoid             probabilities ``(N, K)``
multiclass     a class id   cross-entropy              softmax over K      class ids ``(N,)``
segmentation   a mask       cross-entropy, ignore -1   softmax over K      confusion ``(N, K, K)``
=============  ===========  =========================  ==================  =========================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mapex_core.metrics import IGNORE_INDEX, METRICS, confusion_per_chip


@dataclass(frozen=True)
class TaskSpec:
    """One task.

    Attributes:
        name: ``multilabel``, ``multiclass`` or ``segmentation``.
        label_type: the chip store label kind it needs (``multilabel``, ``class``, ``mask``).
        per_pixel: logits ``(B, K, H, W)`` (segmentation) rather than ``(B, K)``.
    """

    name: str
    label_type: str
    per_pixel: bool

    @property
    def metrics(self) -> list[str]:
        """The metrics of :mod:`mapex_core.metrics` defined for this task."""
        return [m for m, task in METRICS.items() if task == self.name]

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The training loss of ``logits`` against the chip store's ``target`` labels."""
        if self.name == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, target.float())
        return F.cross_entropy(logits, target.long(), ignore_index=IGNORE_INDEX)

    def probabilities(self, logits: Tensor) -> Tensor:
        """Class probabilities: independent sigmoids (multi-label) or a softmax over the class dimension."""
        return torch.sigmoid(logits) if self.name == "multilabel" else torch.softmax(logits, dim=1)

    def metric_inputs(self, logits: Tensor, target: Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """``(outputs, targets)`` as :func:`mapex_core.metrics.metric_fn` expects them, one row per chip."""
        if self.name == "multilabel":
            return torch.sigmoid(logits).numpy(), target.numpy().astype(np.int64)
        if self.name == "multiclass":
            return logits.argmax(1).numpy(), target.numpy()
        conf = confusion_per_chip(logits.argmax(1).numpy(), target.numpy(), num_classes)  # (N, K, K)
        return conf, np.zeros(len(conf), np.int64)  # the targets are inside the confusion matrices


TASKS = {t.name: t for t in (TaskSpec("multilabel", "multilabel", per_pixel=False),
                             TaskSpec("multiclass", "class", per_pixel=False),
                             TaskSpec("segmentation", "mask", per_pixel=True))}


def get_task(name: str) -> TaskSpec:
    """The specification of task ``name``.

    Raises:
        ValueError: an unknown task (lists the known ones).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]
