"""Expert saliency criteria (coverage, frequency, REAP, task), pruning inside the groups down to
``top_k`` per layer, and the all-experts path of a layer left with ``top_k`` experts.

The unit tests run a small model on real chips of the Sen1Floods11 scene (S1 and S2 L1C); the
report test prunes for an application on the real BigEarthNet chip store.
"""

from __future__ import annotations

import json

import pytest
import torch

from mapex_core.apps import get_application
from mapex_core.model import MapexConfig, MapexModel, MoELayer, load_model, save_model
from mapex_core.model.heads import TaskModel, save_task_model, strip_decoder
from mapex_core.model.routing import collect_routing_stats, moe_layers
from mapex_core.pruning import (
    PruneParams,
    calibrate,
    candidate_experts,
    expert_scores,
    keep_sizes,
    masked_expert,
    prune_pretrained,
    rank_experts,
    select_experts,
)
from mapex_core.training.prune import prune_app
from tests.helpers import NORM, real_chips

MODS = ["s1", "s2l1c"]
APP = ["s1"]  # the application's modality: its group is experts 0-3 of every MoE layer
CFG = dict(modalities=MODS, img_size=64, patch_size=8, dim=32, depth=2, heads=2, moe_every=1,
           experts_per_modality=4, top_k=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)
NULL = 2  # the expert built to contribute nothing
SCORED = ("coverage", "frequency", "reap", "task")


def _model(**kw) -> MapexModel:
    torch.manual_seed(0)
    m = MapexModel(MapexConfig(**{**CFG, **kw}))
    with torch.no_grad():  # routing decided by the tokens too, not only by the modality bias
        for layer in moe_layers(m).values():
            layer.router.normal_(std=0.5)
    return m.eval()


def _specialised(model: MapexModel) -> MapexModel:
    """Each modality's tokens stay inside its own group, as in the trained demo model (specialisation 1.00)."""
    with torch.no_grad():
        for layer in moe_layers(model).values():
            own = layer.expert_group.unsqueeze(0) == torch.arange(layer.num_modalities).unsqueeze(1)  # (M, E)
            layer.modality_bias.masked_fill_(~own, -1e4)
    return model


def _never_routed(model: MapexModel, expert: int = NULL) -> MapexModel:
    """``expert`` can never win a top-k choice (-1e4 routing bias for every modality): it contributes nothing."""
    with torch.no_grad():
        for layer in moe_layers(_specialised(model)).values():
            layer.modality_bias[:, expert] = -1e4
    return model


def _batches(mods=tuple(APP)) -> list[dict[str, torch.Tensor]]:
    """The 5 real 64 px chips, normalised, as two batches (3 + 2 chips)."""
    chips = real_chips(list(mods))
    norm = {m: (torch.from_numpy(chips[m]) - torch.tensor(NORM[m]["mean"]).view(1, -1, 1, 1))
            / torch.tensor(NORM[m]["std"]).view(1, -1, 1, 1) for m in mods}  # (5, C, 64, 64)
    norm = {m: torch.nan_to_num(v) for m, v in norm.items()}
    return [{m: v[:3] for m, v in norm.items()}, {m: v[3:] for m, v in norm.items()}]


def _head(model: MapexModel) -> TaskModel:
    torch.manual_seed(1)
    return TaskModel(strip_decoder(model), "multilabel", ["a", "b", "c"], info={"app": "t"},
                     input_modalities=APP).eval()


# ----- a provably useless expert is ranked last ----------------------------------------------
@pytest.mark.parametrize("strategy", [*SCORED, "task-with-head"])
def test_every_criterion_ranks_an_expert_that_contributes_nothing_last(strategy):
    model = _never_routed(_model())
    batches = _batches()
    stats = calibrate(model, batches, APP)
    assert stats.specialisation() == {"s1": 1.0}
    for lr in stats.layers.values():  # the premise: no token ever chose it, every other s1 expert was chosen
        assert lr.counts[0, NULL] == 0 and (lr.counts[0, :4] > 0).sum() == 3
    with torch.no_grad():  # ... so masking it changes nothing at all
        ref = model.encode(batches[0]).tokens
        with masked_expert(moe_layers(model)[0], NULL):
            assert torch.equal(model.encode(batches[0]).tokens, ref)
    crit = "task" if strategy == "task-with-head" else strategy
    head = _head(model) if strategy == "task-with-head" else None
    scores = expert_scores(model, batches, APP, crit, stats, task_model=head)
    cands = candidate_experts(model, APP)
    for block, layer in moe_layers(model).items():
        s = scores[block]
        assert cands[block] == [0, 1, 2, 3]
        assert rank_experts(s, layer.original_experts, cands[block])[-1] == NULL
        assert s[NULL] == 0 and all(s[e] > 0 for e in (0, 1, 3)), (block, s.tolist())  # strictly last
    # a size target removes it first, and pruning it is exact (every expert routing selects is kept)
    params = PruneParams(strategy=crit, keep_per_layer=3)
    kept = select_experts(model, stats, APP, params, scores)
    assert all(v == [0, 1, 3] for v in kept.values())
    result = prune_pretrained(model, batches, APP, params, stats=stats, scores=scores)
    assert result.report["max_output_deviation"] < 1e-5
    for ranking in result.report["ranking"].values():  # the report ranks it below every other s1 expert
        assert ranking.index(NULL) > max(ranking.index(e) for e in (0, 1, 3))


def test_reap_sees_an_expert_whose_output_is_zero_where_routing_frequency_cannot():
    model = _specialised(_model())
    zero = 1  # routed like the others, but its output is exactly zero
    with torch.no_grad():
        for layer in moe_layers(model).values():
            layer.w2[zero].zero_()
            layer.b2[zero].zero_()
    batches = _batches()
    stats = calibrate(model, batches, APP)
    freq = expert_scores(model, batches, APP, "frequency", stats)
    reap = expert_scores(model, batches, APP, "reap", stats)
    for block, layer in moe_layers(model).items():
        assert freq[block][zero] > 0.1  # routing sends it a real share of the token-slots ...
        assert reap[block][zero] == 0  # ... REAP sees that they get nothing from it
        assert rank_experts(reap[block], layer.original_experts, [0, 1, 2, 3])[-1] == zero
        assert all(reap[block][e] > 0 for e in (0, 2, 3))


def test_reap_is_the_mean_gate_times_output_norm_over_routed_tokens():
    """REAP from the hooks against the definition computed by hand on the first layer's inputs."""
    model = _model(depth=1)
    batches = _batches()
    layer = moe_layers(model)[0]
    seen = []
    handle = layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        for b in batches:
            model.encode(b)
    handle.remove()
    x = torch.cat(seen)  # (N, D) every token entering the layer
    with torch.no_grad():
        _, top_idx, gates = layer.route(x, torch.zeros(len(x), dtype=torch.long))
        want = []
        for e in range(layer.num_experts):
            vals = [float(gates[i, j]) * float(layer.expert(e, x[i:i + 1]).norm())
                    for i in range(len(x)) for j in range(layer.top_k) if top_idx[i, j] == e]
            want.append(sum(vals) / len(vals) if vals else 0.0)
    got = expert_scores(model, batches, APP, "reap")[0]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert sum(w > 0 for w in want) >= 3  # several experts were routed to


# ----- size targets --------------------------------------------------------------------------
def test_keep_per_layer_prunes_inside_the_groups_down_to_top_k():
    model = _model()
    batches = _batches()
    stats = calibrate(model, batches, APP)
    scores = expert_scores(model, batches, APP, "reap", stats)
    assert keep_sizes(model, APP) == [4, 3, 2] and keep_sizes(model, MODS) == [8, 7, 6, 5, 4, 3, 2]
    sizes = []
    for k in keep_sizes(model, APP):
        result = prune_pretrained(model, batches, APP, PruneParams(strategy="reap", keep_per_layer=k),
                                  stats=stats, scores=scores)
        for block, kept in result.report["kept_experts"].items():
            ranked = result.report["ranking"][block]
            assert len(kept) == k and set(kept) <= {0, 1, 2, 3}  # inside the application's group
            assert set(kept) == set([e for e in ranked if e < 4][:k])  # the k most salient of the group
        sizes.append(result.report["params_after"])
        pruned = result.model
        layers = list(moe_layers(pruned).values())
        assert all(layer.num_experts == k for layer in layers)
        assert all(layer.uses_all_experts() == (k == 2) for layer in layers)
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3  # smaller at every step
    # at top_k every token goes to both kept experts: equal to the loop oracle's top-2 routing
    x = batches[0]
    with torch.no_grad():
        fast = pruned.encode(x).tokens
        for layer in layers:
            layer.impl = "loop"
        oracle = pruned.encode(x).tokens
    assert (fast - oracle).abs().max() < 1e-5
    # standard routing has no groups: the size target chooses among all experts
    std = _model(routing="standard")
    assert all(v == list(range(8)) for v in candidate_experts(std, APP).values())
    assert keep_sizes(std, APP)[0] == 8


def test_size_target_errors_name_the_field_and_the_range():
    model = _model()
    batches = _batches()
    stats = calibrate(model, batches, APP)
    with pytest.raises(ValueError, match=r"keep_per_layer=5: block 0 has 4 experts in the application's groups "
                                         r"\(\[0, 1, 2, 3\]\); keep between top_k=2 and 4"):
        select_experts(model, stats, APP, PruneParams(keep_per_layer=5))
    with pytest.raises(ValueError, match="keep_per_layer=1: block 0 .* keep between top_k=2 and 4"):
        select_experts(model, stats, APP, PruneParams(strategy="frequency", keep_per_layer=1))
    with pytest.raises(ValueError, match="strategy 'group' ranks none"):
        PruneParams(strategy="group", keep_per_layer=3)
    for bad in (0, True, 2.5, "3"):
        with pytest.raises(ValueError, match="keep_per_layer must be a positive integer"):
            PruneParams(keep_per_layer=bad)
    with pytest.raises(ValueError, match="strategy 'reap' needs expert scores"):
        select_experts(model, stats, APP, PruneParams(strategy="reap"))
    head = TaskModel(MapexModel(MapexConfig(**{**CFG, "kept_experts": [[0, 1, 4, 5], [0, 1, 2, 3]]}),
                                with_decoder=False), "multilabel", ["a"], input_modalities=APP).eval()
    with pytest.raises(ValueError, match=r"block 0 of its encoder lacks experts \[2, 3\] of the application's groups"):
        expert_scores(model, batches, APP, "task", stats, task_model=head)


# ----- the all-experts path ------------------------------------------------------------------
@pytest.mark.parametrize("routing", ["modality", "standard"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_layer_left_with_top_k_experts_sends_every_token_to_every_expert(routing, k):
    torch.manual_seed(0)
    layer = MoELayer(32, 64, num_experts=k, top_k=k, num_modalities=2, routing=routing)
    with torch.no_grad():
        layer.router.normal_(std=0.5)
        layer.b2.normal_()  # biases matter in the combination too
    x = torch.randn(300, 32)
    ids = torch.randint(0, 2, (300,))
    runs = {}
    for impl, all_path in (("loop", True), ("sorted", True), ("dense", True), ("sorted", False)):
        layer.impl, layer.all_experts_when_full = impl, all_path
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        y, aux = layer(xx, ids)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        runs[(impl, all_path)] = (y.detach(), aux.detach(), xx.grad, {n: p.grad for n, p in layer.named_parameters()})
    layer.all_experts_when_full = True
    for impl, uses_all in (("loop", False), ("sorted", True), ("dense", True)):
        layer.impl = impl
        assert layer.uses_all_experts() == uses_all
    y0, a0, gx0, g0 = runs[("loop", True)]  # the oracle: top-k selection (of all k) and the per-expert loop
    for key, (y, a, gx, g) in runs.items():
        assert torch.allclose(y, y0, atol=1e-5) and torch.allclose(gx, gx0, atol=1e-5), key
        assert a.item() == pytest.approx(a0.item(), rel=1e-6), key
        for n in g0:
            assert (g[n] is None) == (g0[n] is None), (key, n)
            if g0[n] is not None:
                assert torch.allclose(g[n], g0[n], rtol=1e-4, atol=1e-4), (key, n)
    # routing hooks see every expert chosen by every token, with the softmax over all logits as gates
    layer.impl = "sorted"

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Module()])
            self.blocks[0].ffn = layer

    with torch.no_grad(), collect_routing_stats(Wrap(), modalities=["a", "b"]) as stats:
        layer(x, ids)
    lr = stats.layers[0]
    n = torch.bincount(ids, minlength=2).double()
    assert torch.equal(lr.counts, n.unsqueeze(1).expand(2, k))  # every token counted once per expert
    assert torch.allclose(lr.mass.sum(1), n)  # gates sum to 1 per token


def test_all_experts_path_under_bf16_autocast_keeps_the_residual_dtype():
    torch.manual_seed(0)
    layer = MoELayer(32, 64, num_experts=2, top_k=2, num_modalities=1)
    x = torch.randn(64, 32)
    ids = torch.zeros(64, dtype=torch.long)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x, ids)
        layer.impl = "loop"
        y_loop, _ = layer(x, ids)
    assert y.dtype == torch.float32 and (y - y_loop.float()).abs().max() < 5e-2


# ----- an application's prune report ----------------------------------------------------------
def _app_params(chips, strategy, **prune):
    return {"applications": {"landcover-s2": {
        "modalities": ["s2"], "task": "multilabel", "metric": "map_macro", "chips": str(chips),
        "prune": {"strategy": strategy, "calibration_batches": 4, "batch_size": 8, **prune}}}}


@pytest.fixture(scope="module")
def ben_model(tmp_path_factory) -> MapexModel:
    """A small untrained MAPEX model for S1 + S2 (the BigEarthNet store's modalities), saved."""
    torch.manual_seed(0)
    model = MapexModel(MapexConfig(modalities=["s1", "s2"], img_size=64, patch_size=8, dim=32, depth=2, heads=2,
                                   moe_every=1, experts_per_modality=4, top_k=2, decoder_dim=32, decoder_depth=1,
                                   decoder_heads=2))
    with torch.no_grad():
        for layer in moe_layers(model).values():
            layer.router.normal_(std=0.5)
    return model


@pytest.mark.parametrize("strategy", ["frequency", "reap", "task"])
def test_prune_report_gives_every_experts_score_on_real_chips(strategy, ben_model, ben_store, tmp_path):
    save_model(ben_model, tmp_path / "pre")
    app = get_application("landcover-s2", _app_params(ben_store, strategy, keep_per_layer=3))
    report = prune_app(app, tmp_path / "pre", ben_store, tmp_path / "pruned")
    on_disk = json.loads((tmp_path / "pruned" / "prune_report.json").read_text())
    assert on_disk["strategy"] == strategy and on_disk["keep_per_layer"] == 3
    assert on_disk["score_definition"] and on_disk["calibration_chips"] > 0
    for block, experts in on_disk["experts_before"].items():
        scores = on_disk["scores"][block]
        assert set(scores) == {str(e) for e in experts}  # every expert of every layer has a score
        assert all(v >= 0 for v in scores.values())
        group = on_disk["candidates"][block]
        assert group == [4, 5, 6, 7]  # S2's group
        top3 = sorted(group, key=lambda e: (-scores[str(e)], e))[:3]
        assert on_disk["kept_experts"][block] == sorted(top3)
        assert on_disk["ranking"][block] == sorted(experts, key=lambda e: (-scores[str(e)], e))
        assert sum(scores[str(e)] > 0 for e in group) >= 3  # the S2 chips reach the S2 group
    assert report["params_after"] < report["params_before"]
    pruned = load_model(tmp_path / "pruned")
    assert pruned.config.kept_experts == [on_disk["kept_experts"][b] for b in sorted(on_disk["kept_experts"])]


def test_task_criterion_measures_a_fine_tuned_task_model_when_given(ben_model, ben_store, tmp_path):
    save_model(ben_model, tmp_path / "pre")
    app = get_application("landcover-s2", _app_params(ben_store, "task", keep_per_layer=2))
    task = TaskModel(strip_decoder(ben_model), "multilabel", ["x", "y"], info={"app": "landcover-s2"},
                     input_modalities=["s2"])
    save_task_model(task, tmp_path / "ft")
    with_head = prune_app(app, tmp_path / "pre", ben_store, tmp_path / "a", task_model=tmp_path / "ft")
    encoder_only = prune_app(app, tmp_path / "pre", ben_store, tmp_path / "b")
    assert with_head["task_model"] == str((tmp_path / "ft").resolve()) and encoder_only["task_model"] is None
    assert with_head["scores"] != encoder_only["scores"]  # class probabilities, not encoder tokens
    for block in with_head["scores"]:
        assert len(with_head["kept_experts"][block]) == 2
    other = TaskModel(strip_decoder(ben_model), "multilabel", ["x"], info={"app": "flood-s1"}, input_modalities=["s2"])
    save_task_model(other, tmp_path / "other")
    with pytest.raises(ValueError, match="is a model of application 'flood-s1', not 'landcover-s2'"):
        prune_app(app, tmp_path / "pre", ben_store, tmp_path / "c", task_model=tmp_path / "other")
    freq = get_application("landcover-s2", _app_params(ben_store, "frequency"))
    with pytest.raises(ValueError, match="only used by prune.strategy 'task'"):
        prune_app(freq, tmp_path / "pre", ben_store, tmp_path / "d", task_model=tmp_path / "ft")
