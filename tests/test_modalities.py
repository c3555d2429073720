import math

import pytest

from mapex_core.modalities import MODALITIES, get_modality


def test_s2_l2a_has_12_bands_in_order_without_b10():
    s2 = get_modality("s2")
    assert s2.band_names == ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
    assert [b.resolution_m for b in s2.bands][:4] == [60.0, 10.0, 10.0, 10.0]
    assert s2.bands[3].wavelength_um == pytest.approx(0.665)


def test_s2_l1c_variant_has_b10():
    l1c = get_modality("s2l1c")
    assert l1c.num_bands == 13 and "B10" in l1c.band_names
    assert l1c.band_names.index("B10") == 10


def test_s1_is_vv_vh_in_db_with_nan_nodata():
    s1 = get_modality("s1")
    assert s1.band_names == ["VV", "VH"] and s1.units == "dB"
    assert math.isnan(s1.nodata) and s1.is_nodata(float("nan")) and not s1.is_nodata(-12.0)


def test_rgb_and_dem_exist_with_units_and_ranges():
    assert get_modality("rgb").num_bands == 3
    dem = get_modality("dem")
    assert dem.units == "m" and dem.valid_range[0] < 0 < dem.valid_range[1]
    assert dem.is_nodata(-32768.0)


def test_every_spec_is_consistent():
    for name, spec in MODALITIES.items():
        assert spec.name == name
        assert spec.valid_range[0] < spec.valid_range[1]
        assert len(set(spec.band_names)) == spec.num_bands


def test_unknown_modality_lists_known():
    with pytest.raises(KeyError, match="known modalities: dem, rgb, s1, s2, s2l1c"):
        get_modality("landsat")
