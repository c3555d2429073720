"""MoELayer: the sorted fast path against the loop oracle, routing behaviour, balance loss."""

import pytest
import torch

from mapex_core.model import MoELayer
from mapex_core.model.routing import collect_routing_stats
from tests.helpers import moe_layer, switch_balance_loss


def _run(layer, impl, x, ids):
    layer.impl = impl
    layer.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    y, aux = layer(xx, ids)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), aux.detach(), xx.grad.clone(), grads


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("routing", ["modality", "standard"])
def test_sorted_equals_loop_outputs_and_gradients(top_k, routing):
    layer = moe_layer(top_k, routing)
    x = torch.randn(300, 32)
    ids = torch.randint(0, 2, (300,))
    ys, auxs, gxs, gs = _run(layer, "sorted", x, ids)
    yl, auxl, gxl, gl = _run(layer, "loop", x, ids)
    assert (ys - yl).abs().max() < 1e-5
    assert (gxs - gxl).abs().max() < 1e-5
    # the balance loss of both against the documented Switch loss computed by hand from the routing
    want = switch_balance_loss(layer, x, ids)
    assert auxs.item() == pytest.approx(want, rel=1e-5) and auxl.item() == pytest.approx(want, rel=1e-5)
    assert set(gs) == set(gl) and {"w1", "w2", "b1", "b2", "router"} <= set(gs)
    for name in gs:
        assert (gs[name] - gl[name]).abs().max() < 1e-5, name


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("idle", [(4, 5), (0, 2)])  # idle experts at the end, or first and middle
def test_sorted_equals_loop_with_experts_that_get_no_tokens(top_k, idle):
    layer = moe_layer(top_k)
    with torch.no_grad():  # these experts can never win
        layer.modality_bias[:, list(idle)] = -1e4
    x = torch.randn(128, 32)
    ids = torch.randint(0, 2, (128,))
    _, top_idx, _ = layer.route(x, ids)
    assert not torch.isin(top_idx, torch.tensor(idle)).any()
    ys, _, gxs, gs = _run(layer, "sorted", x, ids)
    yl, _, gxl, gl = _run(layer, "loop", x, ids)
    assert (ys - yl).abs().max() < 1e-5 and (gxs - gxl).abs().max() < 1e-5
    for name in gs:
        assert (gs[name] - gl[name]).abs().max() < 1e-5, name
    assert gs["w1"][list(idle)].abs().max() == 0  # idle experts get exactly zero gradient


def test_impl_switch_keeps_weights_and_rejects_unknown():
    layer = moe_layer(2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.impl = "loop"
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    layer.impl = "fast"
    with pytest.raises(ValueError, match="impl must be one of"):
        layer(torch.randn(4, 32), torch.zeros(4, dtype=torch.long))


def test_modality_bias_changes_routing_and_standard_ignores_modality():
    x = torch.randn(200, 32)
    ids0 = torch.zeros(200, dtype=torch.long)
    ids1 = torch.ones(200, dtype=torch.long)
    mod = moe_layer(2, "modality")
    _, top0, _ = mod.route(x, ids0)
    _, top1, _ = mod.route(x, ids1)
    assert not torch.equal(top0, top1)
    # the bias favours each modality's own group (experts 0-2 for modality 0, 3-5 for 1)
    assert (top0 < 3).float().mean() > (top1 < 3).float().mean()
    std = moe_layer(2, "standard")
    with torch.no_grad():
        std.modality_bias.normal_(std=5.0)  # even a large bias must be ignored
    p0, s0, g0 = std.route(x, ids0)
    p1, s1, g1 = std.route(x, ids1)
    assert torch.equal(s0, s1) and torch.equal(g0, g1) and torch.equal(p0, p1)


def test_bias_initialised_towards_own_group():
    layer = MoELayer(16, 32, num_experts=5, top_k=2, num_modalities=2, bias_init=1.5)
    assert layer.expert_group.tolist() == [0, 0, 1, 1, -1]
    assert layer.modality_bias.tolist() == [[1.5, 1.5, 0, 0, 0], [0, 0, 1.5, 1.5, 0]]


def test_balance_loss_is_one_when_balanced_and_higher_when_collapsed():
    layer = MoELayer(8, 16, num_experts=4, top_k=1, num_modalities=1, routing="standard")
    ids = torch.zeros(4, dtype=torch.long)
    probs = torch.eye(4)  # each token to its own expert: perfectly balanced
    top = torch.arange(4).unsqueeze(1)
    assert layer.balance_loss(probs, top, ids).item() == pytest.approx(1.0)
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 1
    assert layer.balance_loss(collapsed, torch.zeros(4, 1, dtype=torch.long), ids).item() == pytest.approx(4.0)


def test_routing_stats_mass_and_counts():
    layer = moe_layer(2)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Module()])
            self.blocks[0].ffn = layer

    model = Wrap()
    x = torch.randn(50, 32)
    ids = torch.cat([torch.zeros(20), torch.ones(30)]).long()
    with collect_routing_stats(model, modalities=["a", "b"]) as stats:
        layer(x, ids)
        layer(x, ids)
    lr = stats.layers[0]
    assert lr.tokens.tolist() == [40, 60]
    assert lr.counts.sum(1).tolist() == [80, 120]  # tokens x top_k
    assert torch.allclose(lr.mass.sum(1), torch.tensor([40.0, 60.0], dtype=torch.float64))
    spec = stats.specialisation()
    assert set(spec) == {"a", "b"} and all(0 <= v <= 1 for v in spec.values())
    assert not layer._routing_hooks  # collection switched off after the block
    layer(x, ids)
    assert lr.tokens.tolist() == [40, 60]  # a pass after the block is not counted


def test_sorted_and_loop_agree_under_bf16_autocast():
    layer = moe_layer(2)
    x = torch.randn(256, 32)
    ids = torch.randint(0, 2, (256,))
    outs = {}
    for impl in ("sorted", "loop"):
        layer.impl = impl
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, aux = layer(x, ids)
        (y.float().sum() + aux).backward()
        outs[impl] = (y.float().detach(), layer.w1.grad.clone())
    assert outs["sorted"][0].dtype == torch.float32  # scatter target keeps the residual dtype
    assert (outs["sorted"][0] - outs["loop"][0]).abs().max() < 1e-2
    assert (outs["sorted"][1] - outs["loop"][1]).abs().max() < 1e-2


def test_empty_input_returns_empty_output():
    layer = moe_layer(2)
    y, aux = layer(torch.randn(0, 32), torch.zeros(0, dtype=torch.long))
    assert y.shape == (0, 32) and aux.item() == 0.0
