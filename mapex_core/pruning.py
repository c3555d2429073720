"""Modality-aware pruning: keep only the experts an application's modalities use.

1. **Calibrate**: run chips of the application's modalities (only those modalities) through the
   pre-trained encoder and accumulate, per MoE layer, the routing mass each expert receives.
2. **Select** per layer: ``strategy="coverage"`` keeps the smallest set of experts covering
   ``coverage`` of that mass (never fewer than ``top_k``, never an expert with zero mass when
   ``coverage < 1``); ``strategy="group"`` keeps the app modalities' expert groups plus the
   shared experts.
3. **Slice**: expert weights, router columns, routing-bias rows (modalities) and columns
   (experts); drop the patch embeddings, modality embeddings and decoder heads of the
   modalities the application does not use. The result is a standalone ``MapexModel`` whose
   config records the kept experts (original numbering) and its origin.

Exactness: when every expert that routing selected on some inputs is kept, the pruned
encoder's outputs on those inputs equal the unpruned ones: the kept experts' logits are
unchanged, so the top-k and the gates are the same.

Depends only on :mod:`mapex_core.model` (and reads calibration chips through the chip store).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mapex_core.model import MapexConfig, MapexModel, RoutingStats, collect_routing_stats
from mapex_core.model.routing import moe_layers

STRATEGIES = ("coverage", "group")


@dataclass
class PruneParams:
    """Knobs of pruning (``prune`` section of an application)."""

    coverage: float = 0.99
    strategy: str = "coverage"
    calibration_batches: int = 50
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown pruning strategy {self.strategy!r}; known: {STRATEGIES}")
        if not 0.0 < self.coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {self.coverage}")


def select_by_coverage(mass: torch.Tensor, experts: list[int], coverage: float, top_k: int) -> list[int]:
    """Smallest set of experts covering ``coverage`` of ``mass`` (original ids, sorted).

    Args:
        mass: ``(E,)`` routing mass of the application's modalities per local expert.
        experts: original id of each local expert.
        coverage: share of the mass to cover.
        top_k: minimum number of experts kept.
    """
    order = sorted(range(len(experts)), key=lambda j: (-float(mass[j]), experts[j]))  # by mass
    total = float(mass.sum())
    kept: list[int] = []
    covered = 0.0
    for j in order:
        if len(kept) >= top_k:
            if float(mass[j]) == 0.0:
                break  # never keep an expert no token of these modalities reached
            if coverage < 1.0 and covered >= coverage * total:
                break
        kept.append(j)
        covered += float(mass[j])
    return sorted(experts[j] for j in kept)


def select_experts(model: MapexModel, stats: RoutingStats | None, modalities: list[str],
                   params: PruneParams) -> dict[int, list[int]]:
    """Original expert ids to keep, per MoE block index."""
    cfg = model.config
    layers = moe_layers(model)
    rows = [cfg.modalities.index(m) for m in modalities]
    kept: dict[int, list[int]] = {}
    for block, layer in layers.items():
        experts = list(layer.original_experts)
        if params.strategy == "group":
            groups = layer.expert_group.tolist()
            keep = [e for e, g in zip(experts, groups, strict=True) if g in rows or g == -1]
            if len(keep) < cfg.top_k:
                raise ValueError(f"block {block}: group strategy keeps {len(keep)} experts, fewer than "
                                 f"top_k={cfg.top_k}")
            kept[block] = keep
        else:
            assert stats is not None
            mass = stats.layers[block].mass[rows].sum(0)  # (E,)
            kept[block] = select_by_coverage(mass, experts, params.coverage, cfg.top_k)
    return kept


def prune_model(model: MapexModel, modalities: list[str], kept: dict[int, list[int]],
                origin: dict[str, Any] | None = None) -> MapexModel:
    """Physically slice ``model`` down to ``modalities`` and the ``kept`` experts.

    Raises:
        ValueError: a modality the model lacks, or a kept expert the model does not have.
    """
    cfg = model.config
    unknown = [m for m in modalities if m not in cfg.modalities]
    if unknown:
        raise ValueError(f"modalities {unknown} are not in the model; it takes {cfg.modalities}")
    mods = [m for m in cfg.modalities if m in modalities]  # model order
    rows = [cfg.modalities.index(m) for m in mods]
    layers = moe_layers(model)
    local: dict[int, list[int]] = {}
    for block, layer in layers.items():
        missing = [e for e in kept[block] if e not in layer.original_experts]
        if missing:
            raise ValueError(f"block {block}: experts {missing} are not in the model ({layer.original_experts})")
        local[block] = [layer.original_experts.index(e) for e in kept[block]]
    data = cfg.to_dict()
    data.update(
        modalities=mods,
        in_chans={m: cfg.in_chans[m] for m in mods},
        kept_experts=[kept[b] for b in sorted(layers)],
        expert_modalities=cfg.expert_modalities or cfg.modalities,
        origin=origin,
    )
    if data.get("normalization"):
        data["normalization"] = {m: v for m, v in data["normalization"].items() if m in mods}
    pruned = MapexModel(MapexConfig.from_dict(data), with_decoder=model.with_decoder)
    src = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key in pruned.state_dict():
        t = src[key]
        if key in ("modality_embed", "decoder_modality_embed"):
            t = t[rows]
        elif key.startswith("blocks.") and ".ffn." in key:
            block = int(key.split(".")[1])
            name = key.rsplit(".", 1)[1]
            if block in local:
                idx = local[block]
                if name == "router":
                    t = t[:, idx]
                elif name == "modality_bias":
                    t = t[rows][:, idx]
                elif name in ("w1", "b1", "w2", "b2"):
                    t = t[idx]
        out[key] = t.clone()
    pruned.load_state_dict(out)
    return pruned.to(next(model.parameters()).device)


@torch.no_grad()
def calibrate(model: MapexModel, batches: list[dict[str, torch.Tensor]], modalities: list[str]) -> RoutingStats:
    """Routing statistics of ``model`` on ``batches``, feeding only ``modalities``."""
    model.eval()
    dev = next(model.parameters()).device
    with collect_routing_stats(model) as stats:
        for batch in batches:
            model.encode({m: batch[m].to(dev) for m in modalities if m in batch})
    return stats


@torch.no_grad()
def max_encoder_deviation(full: MapexModel, pruned: MapexModel, batches: list[dict[str, torch.Tensor]],
                          modalities: list[str]) -> float:
    """Largest absolute difference of the encoder outputs of ``full`` and ``pruned``."""
    full.eval()
    pruned.eval()
    dev = next(full.parameters()).device
    worst = 0.0
    for batch in batches:
        x = {m: batch[m].to(dev) for m in modalities if m in batch}
        if not x:
            continue
        worst = max(worst, float((full.encode(x).tokens - pruned.encode(x).tokens).abs().max()))
    return worst


def coverage_of(stats: RoutingStats, modalities: list[str], kept: dict[int, list[int]]) -> dict[str, float]:
    """Per MoE block: share of the app modalities' routing mass that lands on kept experts."""
    rows = [stats.modalities.index(m) for m in modalities]
    out = {}
    for block, lr in stats.layers.items():
        mass = lr.mass[rows].sum(0)
        keep = torch.tensor([e in kept[block] for e in lr.experts])
        out[str(block)] = float(mass[keep].sum() / mass.sum().clamp_min(1e-12))
    return out


def prune_report(full: MapexModel, pruned: MapexModel, stats: RoutingStats | None, modalities: list[str],
                 kept: dict[int, list[int]], deviation: float, params: PruneParams) -> dict[str, Any]:
    """The JSON report of a pruning run."""
    before, after = full.num_parameters(), pruned.num_parameters()
    return {
        "modalities": modalities,
        "strategy": params.strategy,
        "coverage_target": params.coverage,
        "params_before": before,
        "params_after": after,
        "reduction": 1.0 - after / before,
        "params_before_by_component": full.parameter_breakdown(),
        "params_after_by_component": pruned.parameter_breakdown(),
        "kept_experts": {str(b): v for b, v in kept.items()},
        "experts_before": {str(b): list(layer.original_experts) for b, layer in moe_layers(full).items()},
        "coverage": coverage_of(stats, modalities, kept) if stats is not None else None,
        "specialisation": stats.specialisation() if stats is not None else None,
        "routing": stats.to_dict() if stats is not None else None,
        "max_output_deviation": deviation,
    }


def origin_of(pretrained_dir: str | Path, model: MapexModel) -> dict[str, Any]:
    """Lineage recorded in a pruned model's config."""
    return {"pruned_from": str(Path(pretrained_dir).resolve()), "source_modalities": model.config.modalities,
            "source_parameters": model.num_parameters()}
