"""Modality-aware pruning: keep only the experts an application's modalities use, then as few as asked.

Why this module is long: ARCHITECTURE.md puts every pruning criterion next to the selection and
the slicing they share (pruning knows only the model); five criteria, two selection rules and the
slicing read best in one place.

1. **Calibrate**: run chips of the application's modalities (only those modalities) through the
   pre-trained encoder and accumulate, per MoE layer, the routing mass each expert receives.
2. **Score** every expert of every MoE layer under ``PruneParams.strategy`` (the criterion):

   ============  =================================================================================
   ``coverage``  routing mass: the sum of the gates the app's tokens gave the expert
   ``group``     1 for the app modalities' expert groups and the shared experts, 0 for the rest
   ``frequency`` share of the app's token-slots (``tokens x top_k``) routed to the expert
   ``reap``      REAP (arXiv 2510.13999): over the tokens routed to the expert, the mean of its gate
                 times the L2 norm of its output; 0 when no token reached it
   ``task``      the mean L2 change, per token, of a model's outputs on the calibration chips when the
                 expert is masked out of the router (its logit set to -inf: each token goes to its
                 next-best expert, the gates renormalise, exactly what pruning that expert does)
   ============  =================================================================================

   ``task`` measures the pre-trained encoder's output tokens by default: in the pipeline pruning
   runs before fine-tuning, so no task model exists yet. Given a fine-tuned task model of the
   application (``task_model``), it masks the experts of that model's encoder and measures the
   change of its class probabilities (per chip, or per pixel for segmentation): the task-aware
   score. Outputs rather than the validation loss: the change is >= 0 and exactly 0 for an expert
   whose removal changes nothing, it needs no labels, and a loss difference on a handful of
   validation chips is dominated by noise and can be negative. An expert that no calibration
   token selected scores exactly 0 without a masked pass (masking it changes no token's top-k or
   gates). The cost is one pass over the calibration chips per routed expert.
3. **Select** per layer. Without a size target (``keep_per_layer`` unset): ``group`` keeps the
   app modalities' groups plus the shared experts; every other criterion keeps the smallest set
   of experts covering ``coverage`` of the layer's total score (never fewer than ``top_k``, never
   an expert with zero score when ``coverage < 1``; for ``coverage`` this is the routing-mass rule).
   With ``keep_per_layer = K``: the *candidates* are the app modalities' groups plus the shared
   experts (every expert when the model's routing is ``"standard"``: it has no groups), and the K
   candidates with the highest score are kept (ties: the lower expert id), ``top_k <= K <=`` the
   number of candidates. A layer left with exactly ``top_k`` experts sends every token to every
   expert (:class:`~mapex_core.model.moe.MoELayer`, "All experts").
4. **Slice**: expert weights, router columns, routing-bias rows (modalities) and columns
   (experts); drop the patch embeddings, modality embeddings and decoder heads of the
   modalities the application does not use. The result is a standalone ``MapexModel`` whose
   config records the kept experts (original numbering) and its origin.

Exactness: when every expert that routing selected on some inputs is kept, the pruned
encoder's outputs on those inputs equal the unpruned ones: the kept experts' logits are
unchanged, so the top-k and the gates are the same.

:func:`prune_pretrained` runs 1-4 on loaded calibration batches and returns the pruned model with
its report (a sweep over sizes reuses the statistics and scores of the first call).

Depends only on :mod:`mapex_core.model` (batches are dicts of tensors, labels unused).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mapex_core.model import MapexConfig, MapexModel, MoELayer, RoutingStats, collect_routing_stats
from mapex_core.model.heads import TaskModel
from mapex_core.model.routing import moe_layers

STRATEGIES = ("coverage", "group", "frequency", "reap", "task")
# what the pipeline registers: the criterion's own rule (or keep_per_layer), or the smallest point of a sweep
TARGETS = ("groups", "smallest_within_tolerance")
SCORE_DEFINITIONS = {
    "coverage": "routing mass: sum of the gates the application's tokens gave the expert",
    "group": "1 for the application modalities' expert groups and the shared experts, 0 otherwise",
    "frequency": "share of the application's token-slots (tokens x top_k) routed to the expert",
    "reap": "REAP: mean, over the tokens routed to the expert, of its gate times the L2 norm of its output",
    "task": "mean L2 change per token of the outputs (encoder tokens, or a task model's class probabilities) "
            "on the calibration chips when the expert is masked out of the router",
}


@dataclass
class PruneParams:
    """Knobs of pruning (``prune`` section of an application).

    Attributes:
        coverage: without ``keep_per_layer``, the share of each layer's total score the kept experts cover.
        strategy: the criterion that scores the experts (one of :data:`STRATEGIES`).
        calibration_batches: most calibration batches (the app's train and val chips).
        batch_size: chips per calibration batch.
        keep_per_layer: experts kept per MoE layer, chosen inside the app's groups by score, from
            the groups' size down to ``top_k``; ``None``: the criterion's own rule (coverage, groups).
        target: what the pipeline's prune stage keeps (one of :data:`TARGETS`): ``groups``, the rule
            above; ``smallest_within_tolerance``, the smallest size of an accuracy-size sweep
            (:mod:`mapex_core.training.sweep`) whose metric is within ``gate.tolerance`` of the full group's.
    """

    coverage: float = 0.99
    strategy: str = "coverage"
    calibration_batches: int = 50
    batch_size: int = 16
    keep_per_layer: int | None = None
    target: str = "groups"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown pruning strategy {self.strategy!r}; known: {STRATEGIES}")
        if not 0.0 < self.coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {self.coverage}")
        k = self.keep_per_layer
        if k is not None and (isinstance(k, bool) or not isinstance(k, Integral) or k < 1):
            raise ValueError(f"prune.keep_per_layer must be a positive integer (experts per MoE layer), got {k!r}")
        if k is not None and self.strategy == "group":
            raise ValueError("prune.keep_per_layer needs a criterion that ranks experts; strategy 'group' ranks "
                             f"none (use one of {[s for s in STRATEGIES if s != 'group']})")
        if self.target not in TARGETS:
            raise ValueError(f"prune.target must be one of {TARGETS}, got {self.target!r}")
        if self.target != "groups" and k is not None:
            raise ValueError(f"prune.target {self.target!r} chooses the experts kept per layer by a sweep; "
                             f"remove prune.keep_per_layer ({k}) or use target 'groups'")
        if self.target != "groups" and self.strategy == "group":
            raise ValueError(f"prune.target {self.target!r} sweeps sizes inside the groups, which needs a criterion "
                             f"that ranks experts; strategy 'group' ranks none (use one of "
                             f"{[s for s in STRATEGIES if s != 'group']})")


def select_by_coverage(mass: torch.Tensor, experts: list[int], coverage: float, top_k: int) -> list[int]:
    """Smallest set of experts covering ``coverage`` of ``mass`` (original ids, sorted).

    Args:
        mass: ``(E,)`` score per local expert (the application's routing mass for ``coverage``).
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


def select_top(score: Tensor, experts: list[int], candidates: list[int], keep: int, top_k: int,
               block: int) -> list[int]:
    """The ``keep`` candidates with the highest ``score`` (ties: the lower id), as sorted original ids.

    Args:
        score: ``(E,)`` score of each local expert.
        experts: original id of each local expert.
        candidates: original ids the choice is made among (the application's groups).
        keep: experts to keep.
        top_k: the layer's experts per token (the least that may be kept).
        block: encoder block index (named in errors).

    Raises:
        ValueError: ``keep`` is below ``top_k`` or above the number of candidates.
    """
    if not top_k <= keep <= len(candidates):
        raise ValueError(f"prune.keep_per_layer={keep}: block {block} has {len(candidates)} experts in the "
                         f"application's groups ({candidates}); keep between top_k={top_k} and {len(candidates)}")
    return sorted(rank_experts(score, experts, candidates)[:keep])


def rank_experts(score: Tensor, experts: list[int], among: list[int] | None = None) -> list[int]:
    """Original ids of ``among`` (default: all), most salient first (ties: the lower id first)."""
    pos = {e: j for j, e in enumerate(experts)}
    return sorted(among if among is not None else experts, key=lambda e: (-float(score[pos[e]]), e))


def candidate_experts(model: MapexModel, modalities: list[str]) -> dict[int, list[int]]:
    """Per MoE block, the experts a size target chooses among (original ids).

    The groups of ``modalities`` plus the shared experts; every expert when the model's routing is
    ``"standard"`` (its tokens are not kept inside groups).
    """
    cfg = model.config
    if cfg.routing == "standard":
        return {block: list(layer.original_experts) for block, layer in moe_layers(model).items()}
    return candidate_experts_by_group(model, [cfg.modalities.index(m) for m in modalities])


def keep_sizes(model: MapexModel, modalities: list[str]) -> list[int]:
    """The values ``keep_per_layer`` may take for ``modalities``: the groups' size down to ``top_k``."""
    most = min(len(c) for c in candidate_experts(model, modalities).values())
    return list(range(most, model.config.top_k - 1, -1))


def select_experts(model: MapexModel, stats: RoutingStats | None, modalities: list[str],
                   params: PruneParams, scores: dict[int, Tensor] | None = None) -> dict[int, list[int]]:
    """Original expert ids to keep, per MoE block index.

    Args:
        stats: routing statistics of ``modalities`` (needed unless the strategy is ``group`` or
            ``scores`` are given).
        scores: per block, the ``(E,)`` score of each local expert under ``params.strategy``
            (:func:`expert_scores`); computed from ``stats`` for ``coverage`` and ``frequency``.

    Raises:
        ValueError: ``reap`` or ``task`` without ``scores``; a size target out of range.
    """
    cfg = model.config
    layers = moe_layers(model)
    rows = [cfg.modalities.index(m) for m in modalities]
    if params.strategy == "group" and params.keep_per_layer is None:
        kept: dict[int, list[int]] = {}
        for block, keep in candidate_experts_by_group(model, rows).items():
            if len(keep) < cfg.top_k:
                raise ValueError(f"block {block}: group strategy keeps {len(keep)} experts, fewer than "
                                 f"top_k={cfg.top_k}")
            kept[block] = keep
        return kept
    if scores is None:
        if params.strategy not in ("coverage", "frequency") or stats is None:
            raise ValueError(f"strategy {params.strategy!r} needs expert scores (pruning.expert_scores)")
        scores = routing_scores(stats, modalities, params.strategy)
    cands = candidate_experts(model, modalities)
    kept = {}
    for block, layer in layers.items():
        experts = list(layer.original_experts)
        if params.keep_per_layer is None:
            kept[block] = select_by_coverage(scores[block], experts, params.coverage, cfg.top_k)
        else:
            kept[block] = select_top(scores[block], experts, cands[block], params.keep_per_layer, cfg.top_k, block)
    return kept


def candidate_experts_by_group(model: MapexModel, rows: list[int]) -> dict[int, list[int]]:
    """Per MoE block, the experts of the modality groups ``rows`` plus the shared ones (the group rule)."""
    return {block: [e for e, g in zip(layer.original_experts, layer.expert_group.tolist(), strict=True)
                    if g in rows or g == -1]
            for block, layer in moe_layers(model).items()}


# ----- scores ------------------------------------------------------------------------------------
def routing_scores(stats: RoutingStats, modalities: list[str], strategy: str) -> dict[int, Tensor]:
    """``coverage`` (routing mass) or ``frequency`` (share of token-slots) per block, from routing statistics."""
    rows = [stats.modalities.index(m) for m in modalities]
    out = {}
    for block, lr in stats.layers.items():
        if strategy == "coverage":
            out[block] = lr.mass[rows].sum(0)  # (E,)
        else:
            counts = lr.counts[rows].sum(0)  # (E,)
            out[block] = counts / counts.sum().clamp_min(1.0)
    return out


def group_scores(model: MapexModel, modalities: list[str]) -> dict[int, Tensor]:
    """1.0 for the experts of the groups of ``modalities`` and the shared experts, 0.0 for the others."""
    rows = [model.config.modalities.index(m) for m in modalities]
    groups = candidate_experts_by_group(model, rows)
    return {block: torch.tensor([float(e in groups[block]) for e in layer.original_experts], dtype=torch.float64)
            for block, layer in moe_layers(model).items()}


class _ReapAccumulator:
    """REAP of one layer: a forward pre-hook keeps the layer's input, a routing hook scores it."""

    def __init__(self, layer: MoELayer, rows: list[int]) -> None:
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.x: Tensor | None = None
        self.total = torch.zeros(layer.num_experts, dtype=torch.float64)  # sum of gate x ||output||
        self.tokens = torch.zeros(layer.num_experts, dtype=torch.float64)  # tokens routed to each expert

    def keep_input(self, layer: MoELayer, args: tuple[Any, ...]) -> None:
        self.x = args[0]  # (N, D) tokens entering the layer

    @torch.no_grad()
    def __call__(self, layer: MoELayer, top_idx: Tensor, gates: Tensor, modality_ids: Tensor) -> None:
        assert self.x is not None
        app = torch.isin(modality_ids, self.rows.to(modality_ids.device))  # (N,) tokens of the app
        for e in range(layer.num_experts):
            hit = (top_idx == e) & app.unsqueeze(1)  # (N, k) slots of app tokens that chose e
            ids = hit.any(dim=1).nonzero().squeeze(-1)  # (n_e,)
            if ids.numel():
                gate = (gates * hit).sum(dim=1)[ids]  # (n_e,)
                norm = layer.expert(e, self.x[ids]).float().norm(dim=-1)  # (n_e,) L2 norm of the output
                self.total[e] += float((gate.float() * norm).sum())
                self.tokens[e] += ids.numel()

    def score(self) -> Tensor:
        return self.total / self.tokens.clamp_min(1.0)  # (E,), 0 where no token came


@torch.no_grad()
def reap_scores(model: MapexModel, batches: list[dict[str, Tensor]], modalities: list[str]) -> dict[int, Tensor]:
    """REAP saliency per block: over the app tokens routed to each expert, the mean of gate x ||expert output||_2.

    Collected through :meth:`MoELayer.register_routing_hook` (the choice and the gates) and a
    forward pre-hook (the layer's input, on which the routed experts are run once more).
    """
    model.eval()
    dev = next(model.parameters()).device
    rows = [model.config.modalities.index(m) for m in modalities]
    layers = moe_layers(model)
    acc = {b: _ReapAccumulator(layer, rows) for b, layer in layers.items()}
    handles = [h for b, layer in layers.items() for h in (layer.register_forward_pre_hook(acc[b].keep_input),
                                                          layer.register_routing_hook(acc[b]))]
    try:
        for batch in batches:
            model.encode({m: batch[m].to(dev) for m in modalities if m in batch})
    finally:
        for h in handles:
            h.remove()
    return {b: a.score() for b, a in acc.items()}


@contextmanager
def masked_expert(layer: MoELayer, e: int) -> Iterator[None]:
    """Inside the block, local expert ``e`` of ``layer`` is out of routing (its logit is -inf).

    Each token goes to its next-best experts and the gates renormalise, as if ``e`` were pruned.
    Works through the routing bias (zero for a ``"standard"`` layer, so its logits are unchanged);
    the weights and the routing mode are restored on exit.
    """
    bias, routing = layer.modality_bias.detach().clone(), layer.routing
    with torch.no_grad():
        if routing == "standard":
            layer.modality_bias.zero_()
            layer.routing = "modality"
        layer.modality_bias[:, e] = float("-inf")
    try:
        yield
    finally:
        with torch.no_grad():
            layer.modality_bias.copy_(bias)
        layer.routing = routing


@torch.no_grad()
def task_scores(model: MapexModel, batches: list[dict[str, Tensor]], modalities: list[str],
                task_model: TaskModel | None = None) -> dict[int, Tensor]:
    """Per block, the mean L2 change of the outputs per token when each expert is masked out of the router.

    Args:
        model: the pre-trained model being pruned (its experts are scored).
        task_model: a fine-tuned task model of the application whose encoder holds (at least) the
            app's candidate experts; then its encoder is masked and the outputs are its class
            probabilities (per chip, or per pixel). ``None``: ``model``'s encoder tokens.

    Raises:
        ValueError: ``task_model``'s encoder lacks an expert of the application's groups.
    """
    net = model if task_model is None else task_model
    encoder = model if task_model is None else task_model.encoder
    net.eval()
    dev = next(net.parameters()).device

    def outputs(batch: dict[str, Tensor]) -> Tensor:
        x = {m: batch[m].to(dev) for m in modalities if m in batch}
        if task_model is None:
            return model.encode(x).tokens  # (B, T, D)
        probs = task_model.spec.probabilities(task_model(x).float())  # (B, K) or (B, K, H, W)
        return probs.movedim(1, -1)  # classes last: (B, K) or (B, H, W, K)

    with collect_routing_stats(encoder) as seen:
        ref = [outputs(b) for b in batches]
    count = sum(r[..., 0].numel() for r in ref)  # output positions (tokens, chips or pixels)
    own = moe_layers(encoder)
    full_layers = moe_layers(model)
    cands = candidate_experts(model, modalities)
    out = {}
    for block, layer in full_layers.items():
        score = torch.zeros(layer.num_experts, dtype=torch.float64)
        mine = own.get(block)
        have = list(mine.original_experts) if mine is not None else []
        missing = [e for e in cands[block] if e not in have]
        if missing:
            raise ValueError(f"task model: block {block} of its encoder lacks experts {missing} of the application's "
                             f"groups; it has {have}")
        assert mine is not None
        routed = seen.layers[block].counts.sum(0)  # (E_own,) token-slots per expert of the scored encoder
        for j, e in enumerate(layer.original_experts):
            if e not in have or mine.num_experts < 2:
                continue  # absent from the task model, or the layer's only expert: not measurable
            local = have.index(e)
            if routed[local] == 0:
                continue  # no token chose it: masking it changes nothing (score exactly 0)
            total = 0.0
            with masked_expert(mine, local):
                for batch, r in zip(batches, ref, strict=True):
                    total += float((outputs(batch) - r).float().norm(dim=-1).sum())  # L2 over the last dim
            score[j] = total / max(count, 1)
        out[block] = score
    return out


def expert_scores(model: MapexModel, batches: list[dict[str, Tensor]], modalities: list[str], strategy: str,
                  stats: RoutingStats | None = None, task_model: TaskModel | None = None) -> dict[int, Tensor]:
    """Per MoE block, the ``(E,)`` score of each local expert of ``model`` under ``strategy``.

    Args:
        batches: calibration batches (``modality -> (B, C, H, W)``); only ``modalities`` are fed.
        stats: routing statistics of these batches (``coverage``, ``frequency``; collected when absent).
        task_model: for ``task``: a fine-tuned task model to measure instead of the encoder.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pruning strategy {strategy!r}; known: {STRATEGIES}")
    if strategy in ("coverage", "frequency"):
        return routing_scores(stats if stats is not None else calibrate(model, batches, modalities), modalities,
                              strategy)
    if strategy == "group":
        return group_scores(model, modalities)
    if strategy == "reap":
        return reap_scores(model, batches, modalities)
    return task_scores(model, batches, modalities, task_model)


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
                 kept: dict[int, list[int]], deviation: float, params: PruneParams,
                 scores: dict[int, Tensor] | None = None) -> dict[str, Any]:
    """The JSON report of a pruning run.

    ``scores`` (per block, the score of each local expert of ``full``) become ``scores``
    (block -> expert id -> score) and ``ranking`` (block -> expert ids, most salient first).
    """
    before, after = full.num_parameters(), pruned.num_parameters()
    layers = moe_layers(full)
    return {
        "modalities": modalities,
        "strategy": params.strategy,
        "score_definition": SCORE_DEFINITIONS[params.strategy],
        "coverage_target": params.coverage,
        "keep_per_layer": params.keep_per_layer,
        "candidates": {str(b): v for b, v in candidate_experts(full, modalities).items()},
        "scores": None if scores is None else {
            str(b): {str(e): float(scores[b][j]) for j, e in enumerate(layer.original_experts)}
            for b, layer in layers.items()},
        "ranking": None if scores is None else {
            str(b): rank_experts(scores[b], list(layer.original_experts)) for b, layer in layers.items()},
        "params_before": before,
        "params_after": after,
        "reduction": 1.0 - after / before,
        "params_before_by_component": full.parameter_breakdown(),
        "params_after_by_component": pruned.parameter_breakdown(),
        "kept_experts": {str(b): v for b, v in kept.items()},
        "experts_before": {str(b): list(layer.original_experts) for b, layer in layers.items()},
        "coverage": coverage_of(stats, modalities, kept) if stats is not None else None,
        "specialisation": stats.specialisation() if stats is not None else None,
        "routing": stats.to_dict() if stats is not None else None,
        "max_output_deviation": deviation,
    }


@dataclass
class PruneResult:
    """What :func:`prune_pretrained` returns.

    Attributes:
        model: the pruned, standalone ``MapexModel``.
        report: the JSON report (:func:`prune_report`).
        stats: routing statistics of the calibration batches (reusable for another size).
        scores: per block, the score of each expert of the source model (reusable for another size).
    """

    model: MapexModel
    report: dict[str, Any]
    stats: RoutingStats
    scores: dict[int, Tensor]


def prune_pretrained(full: MapexModel, batches: list[dict[str, Tensor]], modalities: list[str],
                     params: PruneParams, *, stats: RoutingStats | None = None,
                     scores: dict[int, Tensor] | None = None, task_model: TaskModel | None = None,
                     origin: dict[str, Any] | None = None) -> PruneResult:
    """Calibrate, score, select and slice: ``full`` pruned for ``modalities`` under ``params``.

    A sweep over sizes calls it once per ``keep_per_layer``, passing the ``stats`` and ``scores``
    of the first result (they do not depend on the size).

    Args:
        batches: calibration batches (``modality -> (B, C, H, W)``, normalised).
        stats: routing statistics of ``batches`` (collected when absent).
        scores: expert scores under ``params.strategy`` (computed when absent).
        task_model: for ``task``: a fine-tuned task model of the application to measure.
        origin: lineage recorded in the pruned model's config.
    """
    if stats is None:
        stats = calibrate(full, batches, modalities)
    if scores is None:
        scores = expert_scores(full, batches, modalities, params.strategy, stats, task_model)
    kept = select_experts(full, stats, modalities, params, scores)
    pruned = prune_model(full, modalities, kept, origin=origin)
    deviation = max_encoder_deviation(full, pruned, batches, modalities)
    report = prune_report(full, pruned, stats, modalities, kept, deviation, params, scores)
    return PruneResult(model=pruned, report=report, stats=stats, scores=scores)


def origin_of(pretrained_dir: str | Path, model: MapexModel) -> dict[str, Any]:
    """Lineage recorded in a pruned model's config."""
    return {"pruned_from": str(Path(pretrained_dir).resolve()), "source_modalities": model.config.modalities,
            "source_parameters": model.num_parameters()}
