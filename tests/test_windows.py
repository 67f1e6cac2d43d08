import numpy as np
import pytest

from structsam.errors import ImageError
from structsam.transforms import prepare_image
from structsam.windows import (
    CT_PRESETS,
    percentile_window,
    resolve_window,
    window_from_contrast,
)


def test_ct_presets_in_hounsfield_units():
    assert resolve_window("ct-soft-tissue") == (-160.0, 240.0)
    assert resolve_window("ct-lung") == (-1350.0, 150.0)
    assert resolve_window("CT_Bone") == (-500.0, 1300.0)
    assert resolve_window("ct-brain") == (0.0, 80.0)
    assert set(CT_PRESETS) == {"ct-soft-tissue", "ct-lung", "ct-bone", "ct-brain"}


def test_mr_percentiles_ignore_background_and_need_a_volume():
    rng = np.random.default_rng(0)
    vol = np.zeros((4, 50, 50), np.float32)
    vol[:, 10:40, 10:40] = rng.uniform(100, 1100, (4, 30, 30))
    vol[0, 0, 0] = np.nan
    low, high = resolve_window("mr-percentiles", vol)
    values = vol[np.isfinite(vol) & (vol != 0)]
    assert (low, high) == pytest.approx(tuple(np.percentile(values, [0.5, 99.5])), rel=1e-5)
    assert 100 <= low < 120 and 1080 < high <= 1100
    with pytest.raises(ImageError, match="needs the volume"):
        resolve_window("mr-percentiles")
    with pytest.raises(ImageError, match="no nonzero"):
        percentile_window(np.zeros((3, 3)))
    with pytest.raises(ImageError, match="constant"):
        percentile_window(np.full((3, 3), 7.0))


def test_pairs_text_contrast_and_errors():
    assert resolve_window(None) is None and resolve_window("none") is None
    assert resolve_window((-100, 300)) == (-100.0, 300.0)
    assert resolve_window("-160,240") == (-160.0, 240.0)
    assert window_from_contrast([0.1, 0.9]) == (0.1, 0.9)
    with pytest.raises(ImageError, match=r"unknown window 'ct-liver'.*ct-lung"):
        resolve_window("ct-liver")
    with pytest.raises(ImageError, match="low < high"):
        resolve_window((5, 5))
    with pytest.raises(ImageError, match="low < high"):
        window_from_contrast((1, np.inf))
    with pytest.raises(ImageError, match=r"\(low, high\)"):
        window_from_contrast(3)


def test_the_window_feeds_the_normalisation():
    # a CT slice: air, soft tissue and bone; the soft-tissue window spreads the tissue
    hu = np.full((32, 32), -1000.0)
    hu[8:24, 8:24] = 40.0
    hu[14:18, 14:18] = 1200.0
    tensor, _ = prepare_image(hu, "litemedsam", window=resolve_window("ct-soft-tissue"))
    plain, _ = prepare_image(hu, "litemedsam")
    # tissue lands at (40 + 160) / 400 = 0.5 with the window, near 0.47 without
    assert float(tensor[0, 0, 80, 80]) == pytest.approx(0.5, abs=1e-3)
    assert float(plain[0, 0, 80, 80]) == pytest.approx(1040 / 2200, abs=1e-3)
