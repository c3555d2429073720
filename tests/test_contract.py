"""The serving input contract (tiny real task model; shapes and messages)."""

from __future__ import annotations

import numpy as np
import pytest

from mapex_core.contract import ContractError, InputContract


@pytest.fixture(scope="module")
def contract() -> InputContract:
    from mapex_core.model import MapexConfig, MapexModel
    from mapex_core.model.heads import TaskModel

    cfg = MapexConfig(modalities=["s1", "s2"], img_size=32, patch_size=16, dim=16, depth=2, heads=2, moe_every=2,
                      experts_per_modality=2, top_k=1,
                      normalization={"s1": {"mean": [-12.0, -19.0], "std": [3.0, 4.0]},
                                     "s2": {"mean": [1000.0] * 12, "std": [500.0] * 12}})
    model = TaskModel(MapexModel(cfg, with_decoder=False), "segmentation", ["dry", "water"], head_channels=4,
                      input_modalities=["s1"])
    return InputContract.of(model)


def test_contract_describes_the_model(contract: InputContract) -> None:
    assert contract.modalities == ["s1"] and contract.bands == {"s1": ["VV", "VH"]}
    assert contract.units["s1"] == "dB" and contract.chip_size == 32 and contract.classes == ["dry", "water"]
    x = np.full((2, 2, 32, 32), -12.0, np.float32)
    x[:, 1] = -19.0
    norm = contract.normalize(contract.validate({"s1": x.tolist()}))
    assert norm["s1"].dtype == np.float32 and np.abs(norm["s1"]).max() == 0.0


@pytest.mark.parametrize(("inputs", "message"), [
    ([1, 2], "inputs must be an object modality -> array"),
    ({"s2": np.zeros((1, 12, 32, 32))}, "this model takes modalities ['s1']; unknown: ['s2']; missing: ['s1']"),
    ({"s1": np.zeros((1, 3, 32, 32))}, "s1: expected shape (B, 2, 32, 32) with bands ['VV', 'VH'] (dB), got (1, 3, 32, 32)"),
    ({"s1": np.zeros((2, 32, 32))}, "got (2, 32, 32)"),
    ({"s1": [["a"]]}, "s1: values must be numbers"),
    ({"s1": np.full((1, 2, 32, 32), np.inf)}, "2048 values are NaN or infinite"),
    ({"s1": np.zeros((65, 2, 32, 32))}, "payload of 65 chips exceeds the limit of 64"),
])
def test_contract_errors_say_what_was_expected(contract: InputContract, inputs: object, message: str) -> None:
    with pytest.raises(ContractError) as err:
        contract.validate(inputs)
    assert message in str(err.value)


def test_compact_base64_arrays(contract: InputContract) -> None:
    import base64

    x = (np.arange(2 * 2 * 32 * 32, dtype=np.float32) % 7 - 20).reshape(2, 2, 32, 32)
    packed = {"b64": base64.b64encode(x.astype("<f4").tobytes()).decode(), "shape": [2, 2, 32, 32]}
    np.testing.assert_array_equal(contract.validate({"s1": packed})["s1"], x)
    wrapped = np.empty((), dtype=object)  # how MLflow's server hands a JSON object over
    wrapped[()] = dict(packed, dtype="float32")
    np.testing.assert_array_equal(contract.validate({"s1": wrapped})["s1"], x)
    as_int = {"b64": base64.b64encode(x.astype("<i2").tobytes()).decode(), "shape": [2, 2, 32, 32], "dtype": "int16"}
    np.testing.assert_array_equal(contract.validate({"s1": as_int})["s1"], x)
    for bad, msg in (({"b64": packed["b64"]}, "needs 'b64' and 'shape'"),
                     (dict(packed, shape=[1, 2, 32, 32]), "bytes do not fill shape [1, 2, 32, 32]"),
                     (dict(packed, dtype="complex64"), "dtype must be one of"),
                     (dict(packed, b64="***"), "not valid base64")):
        with pytest.raises(ContractError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            contract.validate({"s1": bad})


def test_encode_array_picks_the_smallest_exact_dtype(contract: InputContract) -> None:
    from mapex_core.contract import decode_array, encode_array

    reflectance = np.arange(2 * 2 * 32 * 32, dtype=np.float32).reshape(2, 2, 32, 32) * 3 - 500  # S2-like integers
    backscatter = reflectance / 100 - 12.345  # S1-like dB: not integral
    cases = ((reflectance, "int16"), (backscatter, "float32"), (np.abs(reflectance) % 200, "uint8"),
             (reflectance + 40000, "uint16"), (reflectance * 1000, "int32"))
    for x, dtype in cases:
        packed = encode_array(x)
        assert packed["dtype"] == dtype and packed["shape"] == [2, 2, 32, 32]
        np.testing.assert_array_equal(decode_array("s1", packed), x.astype(np.float32))
        np.testing.assert_array_equal(contract.validate({"s1": packed})["s1"], x.astype(np.float32))
    assert len(encode_array(reflectance)["b64"]) * 2 == len(encode_array(reflectance + 0.5)["b64"])  # half the bytes
    assert encode_array(np.array([[True, False]]))["dtype"] == "uint8"
    with pytest.raises(TypeError, match="real numeric array"):
        encode_array(np.ones(3, np.complex64))
