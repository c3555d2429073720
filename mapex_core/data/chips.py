"""Compatibility names: the chip store used to live in this one module.

It is now split by concept: :mod:`~mapex_core.data.store` (the format, and writing a store),
:mod:`~mapex_core.data.dataset` (reading it as a torch dataset), :mod:`~mapex_core.data.sampling`
(splits and batches) and :mod:`~mapex_core.data.statistics` (normalisation statistics). Import from
those; the names below keep older code and notebooks working.
"""

from mapex_core.data.dataset import ChipStore, ConcatStores, collate
from mapex_core.data.raster import window_offsets as chip_offsets
from mapex_core.data.sampling import SPLITS, PresenceBatchSampler, assign_split, assign_splits
from mapex_core.data.statistics import pooled_normalization
from mapex_core.data.store import FORMAT, FORMAT_VERSION, META_COLUMNS, ChipWriter

__all__ = ["FORMAT", "FORMAT_VERSION", "META_COLUMNS", "SPLITS", "ChipStore", "ChipWriter", "ConcatStores",
           "PresenceBatchSampler", "assign_split", "assign_splits", "chip_offsets", "collate", "pooled_normalization"]
