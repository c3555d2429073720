"""`MapexConfig`: every architectural choice of a MAPEX model, with a JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from mapex_core.modalities import get_modality

ROUTING_MODES = ("modality", "standard")
# Bounds of the integer fields: wide enough for any model this code can train (a ViT-H is dim 1280,
# depth 32, heads 16), narrow enough that a hand-edited or hostile config.json is refused before a
# module is built (``depth: 1000000`` would otherwise build for minutes).
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "img_size": (1, 8192), "patch_size": (1, 512), "dim": (4, 16384), "depth": (1, 256), "heads": (1, 256),
    "moe_every": (1, 256), "experts_per_modality": (0, 1024), "shared_experts": (0, 1024), "top_k": (1, 1024),
    "decoder_dim": (4, 16384), "decoder_depth": (0, 256), "decoder_heads": (1, 256),
}
FLOAT_BOUNDS: dict[str, tuple[float, float]] = {
    "mlp_ratio": (0.0, 64.0), "router_bias_init": (-1e6, 1e6), "balance_loss_weight": (0.0, 1e6),
    "mask_ratio": (0.0, 1.0),
}
MAX_IN_CHANS = 1024  # bands of one modality
MAX_EXPERTS = 4096  # experts of one MoE layer


def check_bounds(data: dict[str, Any]) -> None:
    """Check the types and ranges of a config's numeric fields, before anything is built from them.

    Raises:
        ValueError: names the field, its value and the allowed range.
    """
    for name, (lo, hi) in INT_BOUNDS.items():
        if name in data:
            v = data[name]
            if not isinstance(v, Integral) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"field {name!r} = {v!r} must be an integer in [{lo}, {hi}]")
    for name, (flo, fhi) in FLOAT_BOUNDS.items():
        if name in data:
            v = data[name]
            if not isinstance(v, Real) or isinstance(v, bool) or not math.isfinite(v) or not flo <= v <= fhi:
                raise ValueError(f"field {name!r} = {v!r} must be a number in [{flo:g}, {fhi:g}]")
    chans = data.get("in_chans") or {}
    if not isinstance(chans, dict):
        raise ValueError(f"field 'in_chans' must be an object modality -> band count, got {chans!r}")
    for m, c in chans.items():
        if not isinstance(c, Integral) or isinstance(c, bool) or not 1 <= c <= MAX_IN_CHANS:
            raise ValueError(f"field 'in_chans.{m}' = {c!r} must be an integer in [1, {MAX_IN_CHANS}]")
    mods = data.get("modalities")
    if mods is not None and (not isinstance(mods, list | tuple) or not all(isinstance(m, str) for m in mods)):
        raise ValueError(f"field 'modalities' must be a list of modality names, got {mods!r}")


def _check_normalization(norm: Any, in_chans: dict[str, int]) -> None:
    """Per modality ``{"mean": [...], "std": [...]}``: one finite value per band, every std > 0."""
    if not isinstance(norm, dict):
        raise ValueError(f"field 'normalization' must be an object modality -> {{mean, std}}, got {type(norm).__name__}")
    for m, stats in norm.items():
        if not isinstance(stats, dict) or set(stats) != {"mean", "std"}:
            raise ValueError(f"field 'normalization.{m}' must be an object with 'mean' and 'std' lists")
        for key in ("mean", "std"):
            vals = stats[key]
            ok = isinstance(vals, list | tuple) and all(
                isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in vals)
            if not ok or (m in in_chans and len(vals) != in_chans[m]):
                raise ValueError(f"field 'normalization.{m}.{key}' must hold {in_chans.get(m, 'one per band')} "
                                 "finite numbers (one per band)")
            if key == "std" and any(v <= 0 for v in vals):
                raise ValueError(f"field 'normalization.{m}.std' must be > 0 for every band")


@dataclass
class MapexConfig:
    """Architecture of a MAPEX model.

    Args:
        modalities: modality keys (see :mod:`mapex_core.modalities`), in model order.
        in_chans: bands per modality; filled from the modality registry when omitted, and
            written to JSON so a saved model needs no registry to load.
        img_size: default chip size in pixels (any multiple of ``patch_size`` works at run time).
        patch_size: square patch size in pixels.
        dim: token width.
        depth: number of encoder blocks.
        heads: attention heads.
        mlp_ratio: FFN hidden width = ``mlp_ratio * dim`` (dense and expert FFNs alike).
        moe_every: every ``moe_every``-th block (1-based) has a mixture-of-experts FFN.
        experts_per_modality: experts in each modality's group.
        shared_experts: experts not tied to any modality (placed after the groups).
        top_k: experts per token.
        routing: ``"modality"`` (router logits plus a learned per-modality bias) or
            ``"standard"`` (no modality bias: the ablation).
        router_bias_init: initial bias towards a modality's own expert group.
        balance_loss_weight: weight of the load-balancing auxiliary loss.
        mask_ratio: share of tokens hidden from the encoder in MAE pre-training.
        decoder_dim: width of the MAE decoder.
        decoder_depth: blocks of the MAE decoder.
        decoder_heads: attention heads of the MAE decoder.
        kept_experts: per MoE layer, the original expert indices this model keeps (set by
            pruning; ``None`` means all experts).
        expert_modalities: the modalities whose groups define the original expert numbering
            (set by pruning, which keeps the numbering of the source model while
            ``modalities`` shrinks to the application's); ``None`` means ``modalities``.
        normalization: per modality ``{"mean": [...], "std": [...]}`` per band: the statistics the
            model was trained with (set by pre-training; fine-tuning and serving reuse them).
        origin: free-form lineage (set by pruning: the source model and its config).
    """

    modalities: list[str] = field(default_factory=lambda: ["s1", "s2"])
    in_chans: dict[str, int] = field(default_factory=dict)
    img_size: int = 64
    patch_size: int = 8
    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    moe_every: int = 2
    experts_per_modality: int = 2
    shared_experts: int = 0
    top_k: int = 2
    routing: str = "modality"
    router_bias_init: float = 1.0
    balance_loss_weight: float = 0.01
    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    kept_experts: list[list[int]] | None = None
    expert_modalities: list[str] | None = None
    normalization: dict[str, dict[str, list[float]]] | None = None
    origin: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_bounds(vars(self))
        self.modalities = list(self.modalities)
        if not self.modalities:
            raise ValueError("MapexConfig.modalities must name at least one modality")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"MapexConfig.modalities has duplicates: {self.modalities}")
        chans = dict(self.in_chans)
        for m in self.modalities:
            if m not in chans:
                chans[m] = get_modality(m).num_bands
        self.in_chans = {m: int(chans[m]) for m in self.modalities}
        check_bounds({"in_chans": self.in_chans})
        if self.normalization is not None:
            _check_normalization(self.normalization, self.in_chans)
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.dim % 4 or self.decoder_dim % 4:
            raise ValueError(
                f"dim ({self.dim}) and decoder_dim ({self.decoder_dim}) must be multiples of 4 "
                "(2-D sin-cos position embedding)"
            )
        if self.experts_per_modality < 0 or self.shared_experts < 0 or self.num_experts < 1:
            raise ValueError(
                f"need at least one expert: experts_per_modality={self.experts_per_modality}, "
                f"shared_experts={self.shared_experts}"
            )
        if self.num_experts > MAX_EXPERTS:
            raise ValueError(f"field 'experts_per_modality' / 'shared_experts': {self.num_experts} experts per MoE "
                             f"layer exceed {MAX_EXPERTS}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"decoder_dim ({self.decoder_dim}) must be divisible by decoder_heads "
                f"({self.decoder_heads})"
            )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.moe_every < 1:
            raise ValueError(f"moe_every must be >= 1, got {self.moe_every}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k ({self.top_k}) must be between 1 and the number of experts "
                f"({self.num_experts})"
            )
        if self.expert_modalities is not None:
            self.expert_modalities = list(self.expert_modalities)
            missing = [m for m in self.modalities if m not in self.expert_modalities]
            if missing:
                raise ValueError(f"modalities {missing} have no expert group in expert_modalities "
                                 f"{self.expert_modalities}")
        if self.kept_experts is not None:
            try:
                self.kept_experts = [sorted(int(e) for e in layer) for layer in self.kept_experts]
            except (TypeError, ValueError) as exc:
                raise ValueError(f"field 'kept_experts' must be a list (one per MoE layer) of lists of expert "
                                 f"indices: {exc}") from None
            if len(self.kept_experts) != len(self.moe_layers):
                raise ValueError(
                    f"kept_experts has {len(self.kept_experts)} layers, the model has "
                    f"{len(self.moe_layers)} MoE layers"
                )
            for i, kept in enumerate(self.kept_experts):
                if len(kept) < self.top_k or any(not 0 <= e < self.num_experts for e in kept):
                    raise ValueError(
                        f"kept_experts[{i}] = {kept} must hold >= top_k ({self.top_k}) "
                        f"indices in [0, {self.num_experts})"
                    )

    # ----- derived quantities -------------------------------------------------------------
    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def num_experts(self) -> int:
        """Experts of the unpruned layer: one group per (expert) modality plus the shared ones."""
        return self.experts_per_modality * len(self.expert_modalities or self.modalities) + self.shared_experts

    @property
    def hidden_dim(self) -> int:
        return int(self.mlp_ratio * self.dim)

    @property
    def moe_layers(self) -> list[int]:
        """Indices (0-based) of the encoder blocks whose FFN is a MoE layer."""
        return [i for i in range(self.depth) if (i + 1) % self.moe_every == 0]

    def expert_groups(self) -> list[int]:
        """Index in ``modalities`` of the modality owning each original expert.

        ``-1`` for shared experts, and for experts of a modality this model no longer takes
        (a pruned model may keep some when routing sent its modalities' tokens there).
        """
        owners = self.expert_modalities or self.modalities
        per, n_grouped = self.experts_per_modality, self.experts_per_modality * len(owners)
        out = []
        for e in range(self.num_experts):
            owner = owners[e // per] if e < n_grouped else None
            out.append(self.modalities.index(owner) if owner in self.modalities else -1)
        return out

    def layer_experts(self, moe_index: int) -> list[int]:
        """Original expert indices present in MoE layer ``moe_index`` (after pruning)."""
        if self.kept_experts is None:
            return list(range(self.num_experts))
        return list(self.kept_experts[moe_index])

    # ----- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON; also write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MapexConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown MapexConfig keys: {unknown}; known: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> MapexConfig:
        """Parse a JSON string, or read a JSON file when given a path that exists."""
        if isinstance(text_or_path, str) and text_or_path.lstrip().startswith("{"):
            return cls.from_dict(json.loads(text_or_path))
        p = Path(text_or_path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read model config {p}: {exc}") from exc
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p} is not valid JSON: {exc}") from exc
