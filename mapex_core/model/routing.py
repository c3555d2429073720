"""Routing statistics: where each modality's tokens go, per MoE layer and expert.

Pruning keeps the experts that carry an application's routing mass; dashboards show the same
numbers as heatmaps. Collect them over any number of forward passes::

    with collect_routing_stats(model) as stats:
        for batch in loader:
            model.encode(batch)
    stats.specialisation()  # {"s1": 0.93, "s2": 0.88}
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mapex_core.model.moe import MoELayer


@dataclass
class LayerRouting:
    """Routing statistics of one MoE layer.

    Attributes:
        experts: original expert index of each local expert (column).
        groups: owner modality index of each local expert (-1 = shared).
        mass: ``(M, E)`` summed gate weight per modality and expert.
        counts: ``(M, E)`` token-slots routed per modality and expert.
        tokens: ``(M,)`` tokens seen per modality.
    """

    experts: list[int]
    groups: list[int]
    mass: Tensor
    counts: Tensor
    tokens: Tensor

    def mass_share(self) -> Tensor:
        """``(M, E)`` share of each modality's routing mass per expert (rows sum to 1)."""
        return self.mass / self.mass.sum(1, keepdim=True).clamp_min(1e-12)

    def specialisation(self) -> Tensor:
        """``(M,)`` share of each modality's mass on its own expert group (nan if unseen)."""
        groups = torch.tensor(self.groups)
        own = groups.unsqueeze(0) == torch.arange(self.mass.shape[0]).unsqueeze(1)  # (M, E)
        total = self.mass.sum(1)
        spec = (self.mass * own).sum(1) / total.clamp_min(1e-12)
        return torch.where(total > 0, spec, torch.full_like(spec, float("nan")))


@dataclass
class RoutingStats:
    """Routing statistics of a whole model, keyed by encoder block index."""

    modalities: list[str]
    layers: dict[int, LayerRouting] = field(default_factory=dict)

    def specialisation(self) -> dict[str, float]:
        """Per modality: share of its routing mass (all MoE layers) on its own expert group.

        Modalities that sent no tokens are left out.
        """
        out: dict[str, float] = {}
        for i, m in enumerate(self.modalities):
            own = total = 0.0
            for lr in self.layers.values():
                mass = lr.mass[i]
                total += float(mass.sum())
                own += float(sum(mass[j] for j, g in enumerate(lr.groups) if g == i))
            if total > 0:
                out[m] = own / total
        return out

    def specialisation_per_layer(self) -> dict[str, dict[str, float]]:
        """``{block_index: {modality: score}}`` for the modalities seen."""
        out: dict[str, dict[str, float]] = {}
        for b, lr in self.layers.items():
            spec = lr.specialisation()
            out[str(b)] = {
                m: float(spec[i]) for i, m in enumerate(self.modalities) if not spec[i].isnan()
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: per layer, mass / counts per modality and expert."""
        return {
            "modalities": list(self.modalities),
            "specialisation": self.specialisation(),
            "layers": {
                str(b): {
                    "experts": lr.experts,
                    "groups": lr.groups,
                    "tokens": {m: float(lr.tokens[i]) for i, m in enumerate(self.modalities)},
                    "mass": {m: lr.mass[i].tolist() for i, m in enumerate(self.modalities)},
                    "counts": {m: lr.counts[i].tolist() for i, m in enumerate(self.modalities)},
                }
                for b, lr in self.layers.items()
            },
        }


def moe_layers(model: nn.Module) -> dict[int, MoELayer]:
    """The MoE layers of a model keyed by encoder block index (``block.index``)."""
    out: dict[int, MoELayer] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, MoELayer):
            # names look like "blocks.3.ffn"; the block index is the number after "blocks."
            parts = name.split(".")
            out[int(parts[parts.index("blocks") + 1]) if "blocks" in parts else len(out)] = mod
    return out


class _LayerAccumulator:
    """A routing hook (:meth:`MoELayer.register_routing_hook`) summing one layer's routing."""

    def __init__(self, layer: MoELayer) -> None:
        m, e = layer.num_modalities, layer.num_experts
        self.mass = torch.zeros(m, e, dtype=torch.float64)
        self.counts = torch.zeros(m, e, dtype=torch.float64)
        self.tokens = torch.zeros(m, dtype=torch.float64)

    @torch.no_grad()
    def __call__(self, layer: MoELayer, top_idx: Tensor, gates: Tensor, modality_ids: Tensor) -> None:
        n, m, e = top_idx.shape[0], layer.num_modalities, layer.num_experts
        mass = gates.new_zeros(n, e).scatter_add_(1, top_idx, gates)  # (N, E) gate mass of each token
        self.mass += mass.new_zeros(m, e).index_add_(0, modality_ids, mass).cpu().double()
        key = (modality_ids.unsqueeze(1) * e + top_idx).reshape(-1)  # (N*k,) modality-expert pair of each slot
        self.counts += torch.bincount(key, minlength=m * e).view(m, e).cpu().double()
        self.tokens += torch.bincount(modality_ids, minlength=m).cpu().double()


@contextmanager
def collect_routing_stats(model: nn.Module, modalities: list[str] | None = None) -> Iterator[RoutingStats]:
    """Accumulate routing statistics over every forward pass inside the ``with`` block.

    Args:
        model: a module containing :class:`MoELayer` s (e.g. ``MapexModel``).
        modalities: names of the modality indices; defaults to ``model.config.modalities``.
    """
    names = modalities or list(model.config.modalities)  # type: ignore[attr-defined]
    stats = RoutingStats(modalities=names)
    layers = moe_layers(model)
    accumulators = {b: _LayerAccumulator(layer) for b, layer in layers.items()}
    handles = [layer.register_routing_hook(accumulators[b]) for b, layer in layers.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
        for b, layer in layers.items():
            acc = accumulators[b]
            stats.layers[b] = LayerRouting(experts=list(layer.original_experts), groups=layer.expert_group.tolist(),
                                           mass=acc.mass, counts=acc.counts, tokens=acc.tokens)
