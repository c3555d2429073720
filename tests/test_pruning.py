"""Modality-aware pruning: selection rules, physical slicing, exactness, round-trip."""

import math

import pytest
import torch

from mapex_core.model import MapexConfig, MapexModel, load_model, save_model
from mapex_core.pruning import (
    PruneParams,
    calibrate,
    max_encoder_deviation,
    prune_model,
    prune_report,
    select_by_coverage,
    select_experts,
)

# The configuration the >= 37% claim is stated for: 2 modalities (S1, S2), dim 64, depth 4,
# every block MoE, 4 experts per modality, top-2, decoder 64 x 1.
CFG = dict(modalities=["s1", "s2"], img_size=32, patch_size=8, dim=64, depth=4, heads=2, moe_every=1,
           experts_per_modality=4, top_k=2, decoder_dim=64, decoder_depth=1, decoder_heads=2)


def _model(router_std: float = 0.05, **kw):
    torch.manual_seed(0)
    m = MapexModel(MapexConfig(**{**CFG, **kw}))
    with torch.no_grad():  # routing depends on the tokens too, not only on the modality bias
        for blk in m.blocks:
            blk.ffn.router.normal_(std=router_std)
    return m.eval()


def _stored_values(model_dir) -> int:
    """Number of values in a saved ``model.safetensors`` (from the tensor shapes in the file)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - safe_open is no dict


def _batches(mods, n=3, b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    ch = {"s1": 2, "s2": 12}
    return [{m: torch.randn(b, ch[m], 32, 32, generator=g) for m in mods} for _ in range(n)]


def test_coverage_selection_rules():
    experts = [10, 11, 12, 13, 14]
    mass = torch.tensor([0.0, 5.0, 3.0, 2.0, 0.0])
    assert select_by_coverage(mass, experts, 0.5, top_k=1) == [11]
    assert select_by_coverage(mass, experts, 0.5, top_k=2) == [11, 12]  # never fewer than top_k
    assert select_by_coverage(mass, experts, 0.99, top_k=1) == [11, 12, 13]
    assert select_by_coverage(mass, experts, 1.0, top_k=1) == [11, 12, 13]  # zero mass never kept
    assert select_by_coverage(torch.tensor([0.0, 0.0, 7.0, 0.0, 0.0]), experts, 0.99, top_k=2) == [10, 12]
    for cov in (0.3, 0.6, 0.9, 0.99):
        kept = select_by_coverage(mass, experts, cov, top_k=2)
        assert len(kept) >= 2 and all(mass[experts.index(e)] > 0 for e in kept)
        assert sum(float(mass[experts.index(e)]) for e in kept) >= cov * float(mass.sum())


def test_pruning_to_one_of_two_modalities_removes_at_least_37_percent(tmp_path):
    full = _model()
    batches = _batches(["s2"])
    stats = calibrate(full, batches, ["s2"])
    kept = select_experts(full, stats, ["s2"], PruneParams(coverage=0.99))
    pruned = prune_model(full, ["s2"], kept, origin={"pruned_from": "test"})
    dev = max_encoder_deviation(full, pruned, batches, ["s2"])
    report = prune_report(full, pruned, stats, ["s2"], kept, dev, PruneParams())
    assert report["reduction"] >= 0.37, report["reduction"]
    # the counts are the values the saved weight files hold ...
    save_model(full, tmp_path / "full")
    save_model(pruned, tmp_path / "p")
    assert report["params_before"] == _stored_values(tmp_path / "full")
    assert report["params_after"] == _stored_values(tmp_path / "p")
    # ... and the difference is exactly what dropping S1 and the unkept experts must remove
    d, p, dd, h, e = CFG["dim"], CFG["patch_size"], CFG["decoder_dim"], 4 * CFG["dim"], 8  # 2 x 4 experts
    removed = d * 2 * p * p + d  # S1's patch embedding (2 bands)
    removed += d + dd  # its rows of the encoder and decoder modality embeddings
    removed += dd * p * p * 2 + p * p * 2  # its decoder pixel head
    assert len(report["kept_experts"]) == CFG["depth"]  # every block is a MoE layer
    for kept_in_layer in report["kept_experts"].values():
        dropped = e - len(kept_in_layer)
        removed += dropped * (d * h + h + h * d + d)  # the dropped experts' w1, b1, w2, b2
        removed += dropped * d + (2 * e - len(kept_in_layer))  # their router columns; bias (2, E) -> (1, kept)
    assert report["params_before"] - report["params_after"] == removed
    parts = report["params_after_by_component"]
    assert parts["patch_embed"] < report["params_before_by_component"]["patch_embed"]  # S1 embedding gone
    assert pruned.config.modalities == ["s2"] and "s1" not in pruned.patch_embed
    assert pruned.config.origin == {"pruned_from": "test"}
    assert all(len(v) >= 2 for v in report["kept_experts"].values())
    assert all(c >= 0.99 for c in report["coverage"].values())
    # standalone: saves (above) and loads from safetensors + JSON without the original
    del full
    again = load_model(tmp_path / "p")
    x = _batches(["s2"], n=1)[0]
    with torch.no_grad():
        assert torch.equal(again.eval().encode(x).tokens, pruned.encode(x).tokens)
    assert again.config.kept_experts == pruned.config.kept_experts


def test_exact_when_every_selected_expert_is_kept():
    full = _model()
    batches = _batches(["s1"])
    stats = calibrate(full, batches, ["s1"])
    kept = select_experts(full, stats, ["s1"], PruneParams(coverage=1.0))  # all experts with mass
    assert any(len(v) < full.config.num_experts for v in kept.values())  # something was pruned
    pruned = prune_model(full, ["s1"], kept)
    assert max_encoder_deviation(full, pruned, batches, ["s1"]) < 1e-5
    # and the pruned routing picks the same experts (original ids) with the same gates
    s_full = calibrate(full, batches, ["s1"])
    s_pruned = calibrate(pruned, batches, ["s1"])
    for block, lr in s_pruned.layers.items():
        full_mass = s_full.layers[block].mass[0]
        assert torch.allclose(lr.mass[0], full_mass[lr.experts], atol=1e-9)


def test_dropping_experts_that_routing_uses_changes_outputs():
    full = _model()
    batches = _batches(["s1"])
    stats = calibrate(full, batches, ["s1"])
    kept = select_experts(full, stats, ["s1"], PruneParams(coverage=0.5))
    pruned = prune_model(full, ["s1"], kept)
    assert max_encoder_deviation(full, pruned, batches, ["s1"]) > 1e-3  # the property is not vacuous


def test_group_strategy_keeps_the_modality_groups_and_shared_experts():
    full = _model(shared_experts=1)
    kept = select_experts(full, None, ["s1"], PruneParams(strategy="group"))
    assert all(v == [0, 1, 2, 3, 8] for v in kept.values())  # s1 group + the shared expert
    pruned = prune_model(full, ["s1"], kept)
    assert pruned.config.expert_groups() == [0, 0, 0, 0, -1, -1, -1, -1, -1]
    layer = pruned.blocks[0].ffn
    assert layer.modality_bias.shape == (1, 5) and layer.w1.shape[0] == 5


def test_prune_errors():
    full = _model()
    with pytest.raises(ValueError, match=r"modalities \['dem'\] are not in the model; it takes \['s1', 's2'\]"):
        prune_model(full, ["dem"], {})
    with pytest.raises(ValueError, match="unknown pruning strategy 'random'"):
        PruneParams(strategy="random")
