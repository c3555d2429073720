"""Which chips train, validate and test, and which chips share a batch.

* Splits are assigned to whole *spatial groups* (a BigEarthNet patch, a Sentinel-2 tile, a scene,
  or a block of pixels inside a scene) by a seeded hash, never to single chips: neighbouring and
  overlapping chips are not independent, so they must not straddle train and test.
* :class:`PresenceBatchSampler` forms batches of chips that hold the same modalities (so they
  stack into one tensor per modality), in an order that depends only on ``(seed, epoch)``.

torch is imported only when batches are drawn: ingestion (and its Dask workers) uses the splits
without paying for it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

SPLITS = ("train", "val", "test")  # a chip may also be "none": overlapping two split blocks


def assign_split(group: str, seed: int = 0, fractions: tuple[float, float] = (0.8, 0.1)) -> str:
    """Seeded, order-independent split of a spatial group (sample, scene or tile) by hash."""
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"

def assign_splits(groups: list[str], seed: int = 0, fractions: tuple[float, float] = (0.8, 0.1)) -> dict[str, str]:
    """Seeded split of whole spatial groups, in proportion, with every split non-empty when possible.

    Groups are ordered by a seeded hash (so the result does not depend on the input order);
    the first ~80% go to train, then val, then test. With 3 or more groups, val and test get at
    least one group each.
    """
    uniq = sorted(set(groups), key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    n = len(uniq)
    n_val = max(1, round(fractions[1] * n)) if n >= 3 else 0
    n_test = max(1, round((1 - fractions[0] - fractions[1]) * n)) if n >= 2 else 0
    n_train = n - n_val - n_test
    return {g: "train" if i < n_train else "val" if i < n_train + n_val else "test" for i, g in enumerate(uniq)}

class PresenceBatchSampler:
    """Batches whose chips share one set of present modalities (so they stack), reshuffled per epoch.

    The order depends only on ``(seed, epoch)``, so a resumed run sees the same batches. An iterable
    of index lists: a torch ``DataLoader``'s ``batch_sampler``.
    """

    def __init__(self, store: Any, batch_size: int, seed: int = 0,
                 drop_last: bool = True) -> None:
        self.groups = [g for g in store.presence_patterns().values()]
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.epoch = 0

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` (index lists), in order."""
        import torch

        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        out: list[list[int]] = []
        for idx in self.groups:
            perm = torch.randperm(len(idx), generator=g).tolist()
            for s in range(0, len(idx), self.batch_size):
                chunk = [idx[p] for p in perm[s : s + self.batch_size]]
                # a group smaller than one batch still yields its chips once
                if len(chunk) == self.batch_size or not self.drop_last or s == 0:
                    out.append(chunk)
        order = torch.randperm(len(out), generator=g).tolist()
        return [out[o] for o in order]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)

    def __len__(self) -> int:
        return len(self.batches(self.epoch))
