"""MapexModel: any modality subset, input validation, config and weight round-trips."""

import itertools

import pytest
import torch

from mapex_core.model import MapexConfig, MapexModel, load_model, save_model

TINY = dict(img_size=32, patch_size=8, dim=32, depth=2, heads=2, moe_every=1,
            experts_per_modality=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def _inputs(cfg, mods, b=2, size=32):
    return {m: torch.randn(b, cfg.in_chans[m], size, size) for m in mods}


@pytest.fixture(scope="module")
def model4():
    torch.manual_seed(0)
    return MapexModel(MapexConfig(modalities=["s1", "s2", "rgb", "dem"], **TINY))


def test_any_subset_of_modalities_runs(model4):
    cfg = model4.config
    for r in range(1, 5):
        for mods in itertools.combinations(cfg.modalities, r):
            x = _inputs(cfg, mods)
            out = model4(x)
            assert out.loss.isfinite() and set(out.per_modality) == set(mods)
            enc = model4.encode(x)
            assert enc.tokens.shape == (2, 16 * len(mods), cfg.dim)  # (32/8)^2 = 16 tokens each
            assert enc.modality_ids.tolist() == sum(([cfg.modalities.index(m)] * 16 for m in mods), [])


def test_backward_reaches_experts_and_routers(model4):
    model4.zero_grad()
    model4(_inputs(model4.config, ["s1", "s2"])).loss.backward()
    ffn = model4.blocks[0].ffn
    assert ffn.w1.grad.abs().sum() > 0 and ffn.router.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "inputs, message",
    [
        (lambda: {"s3": torch.randn(1, 2, 32, 32)},
         r"unknown modality 's3' \(input shape \(1, 2, 32, 32\)\); this model takes s1 \(B, 2, H, W\), s2 \(B, 12, H, W\), rgb \(B, 3, H, W\), dem \(B, 1, H, W\)"),
        (lambda: {"s2": torch.randn(1, 10, 32, 32)}, r"modality 's2': expected 12 bands, shape \(B, 12, H, W\), got \(1, 10, 32, 32\)"),
        (lambda: {"s1": torch.randn(1, 2, 32, 32), "s2": torch.randn(1, 12, 16, 16)},
         r"modality 's2': expected shape \(1, 12, 32, 32\) to match 's1', got \(1, 12, 16, 16\)"),
        (lambda: {"s1": torch.randn(2, 2, 32, 32), "dem": torch.randn(1, 1, 32, 32)},
         r"modality 'dem': expected shape \(2, 1, 32, 32\) to match 's1', got \(1, 1, 32, 32\)"),
        (lambda: {"s1": torch.randn(2, 32, 32)}, r"modality 's1': expected a tensor of shape \(B, 2, H, W\), got \(2, 32, 32\)"),
        (lambda: {"s1": torch.randn(1, 2, 30, 30)}, r"modality 's1': H and W must be multiples of patch_size 8"),
        (lambda: {}, r"non-empty dict"),
    ],
)
def test_invalid_inputs_raise_value_error_naming_the_problem(model4, inputs, message):
    with pytest.raises(ValueError, match=message):
        model4(inputs())
    with pytest.raises(ValueError, match=message):
        model4.encode(inputs())


def test_config_json_round_trip(tmp_path):
    cfg = MapexConfig(modalities=["s2", "s1"], shared_experts=1, top_k=1, routing="standard", **TINY)
    again = MapexConfig.from_json(cfg.to_json())
    assert again == cfg
    cfg.to_json(tmp_path / "c.json")
    assert MapexConfig.from_json(tmp_path / "c.json") == cfg
    assert cfg.in_chans == {"s2": 12, "s1": 2}
    assert cfg.num_experts == 5 and cfg.expert_groups() == [0, 0, 1, 1, -1]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(routing="learned"), "routing must be one of"),
        (dict(modalities=["s1", "s1"]), "duplicates"),
        (dict(modalities=["landsat"]), "unknown modality 'landsat'"),
        (dict(top_k=9), r"top_k \(9\) must be between 1 and the number of experts \(4\)"),
        (dict(dim=31), "divisible by heads"),
        (dict(dim=30, heads=3), r"dim \(30\) and decoder_dim \(32\) must be multiples of 4"),
        (dict(experts_per_modality=0, top_k=1), "need at least one expert"),
    ],
)
def test_config_rejects_bad_values(kw, message):
    with pytest.raises((ValueError, KeyError), match=message):
        MapexConfig(**{**TINY, "modalities": ["s1", "s2"], **kw})


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match=r"unknown MapexConfig keys: \['depht'\]"):
        MapexConfig.from_dict({"depht": 3})


def test_save_load_round_trip_gives_identical_outputs(tmp_path, model4):
    save_model(model4, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "m")
    x = _inputs(model4.config, ["s1", "dem"])
    model4.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model4.encode(x).tokens, loaded.encode(x).tokens)


def test_load_rejects_corrupt_weights(tmp_path, model4):
    save_model(model4, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_model(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_model(tmp_path / "nothing")


def test_parameter_breakdown_matches_counts_derived_from_the_config(model4):
    """Each component's count from the architecture alone (the layer shapes the config implies)."""
    c = TINY
    mods = ["s1", "s2", "rgb", "dem"]
    chans = [2, 12, 3, 1]  # bands of each modality
    m, d, p, depth = len(mods), c["dim"], c["patch_size"], c["depth"]
    h = 4 * d  # mlp_ratio 4
    n_moe = depth // c["moe_every"]  # every moe_every-th block
    e = c["experts_per_modality"] * m  # no shared experts
    dd, hd = c["decoder_dim"], 4 * c["decoder_dim"]

    def mlp(width, hidden):  # Linear(width, hidden) + Linear(hidden, width)
        return width * hidden + hidden + hidden * width + width

    def block(width):  # 2 LayerNorms, qkv and output projection (the FFN counted apart)
        return 2 * width + (width * 3 * width + 3 * width) + (width * width + width) + 2 * width

    want = {
        "patch_embed": sum(d * ch * p * p + d for ch in chans) + m * d,  # conv per modality + modality embedding
        "experts": n_moe * e * mlp(d, h),
        "routers": n_moe * (d * e + m * e),  # router (D, E) + modality bias (M, E)
        "encoder_dense": depth * block(d) + (depth - n_moe) * mlp(d, h) + 2 * d,  # + final norm
        "decoder": (d * dd + dd) + dd + m * dd  # embedding, mask token, modality embedding
        + c["decoder_depth"] * (block(dd) + mlp(dd, hd)) + 2 * dd  # blocks + norm
        + sum(dd * p * p * ch + p * p * ch for ch in chans),  # pixel heads
    }
    assert model4.config.modalities == mods and list(model4.config.in_chans.values()) == chans
    parts = model4.parameter_breakdown()
    assert parts == want
    assert model4.num_parameters() == sum(want.values())
    assert parts["experts"] > 0 and parts["routers"] > 0


def test_shared_experts_only_config_runs():
    cfg = MapexConfig(**{**TINY, "modalities": ["s1", "s2"], "experts_per_modality": 0, "shared_experts": 3})
    assert cfg.expert_groups() == [-1, -1, -1]
    model = MapexModel(cfg)
    out = model(_inputs(cfg, ["s1", "s2"]))
    assert out.loss.isfinite()


def test_forward_backward_under_bf16_autocast(model4):
    model4.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model4(_inputs(model4.config, ["s1", "s2"]))
    out.loss.backward()
    assert out.loss.isfinite() and model4.blocks[0].ffn.w1.grad.isfinite().all()
