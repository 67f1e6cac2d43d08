"""Bad settings are refused up front, with one message naming the argument and what is accepted."""

import re

import numpy as np
import pytest

from structsam import patch, unpatch
from structsam.errors import MergeError
from structsam.patching import merge_state
from structsam.predictor import _flatness


@pytest.mark.parametrize("rate", [float("nan"), -1, 1, float("inf"), 0.9, "0.3", None, True])
def test_patch_refuses_a_bad_rate(small_vit, rate):
    # NaN and -1 used to fail the "> 0" test and run unmerged without a word
    with pytest.raises(MergeError, match=r"rate must be in \[0, 0.75\], a finite number .*got"):
        patch(small_vit, "structsam", rate)
    assert merge_state(small_vit) is None


def test_patch_refuses_bad_values_in_a_schedule(small_vit):
    with pytest.raises(MergeError, match=r"rate\[2\] must be in \[0, 0.75\]"):
        patch(small_vit, "tome", [0.3, 0.3, float("nan"), 0.3])
    with pytest.raises(MergeError, match=r"rate\[1\] must be in"):
        patch(small_vit, "structsam", {1: -0.5})


def test_patch_accepts_the_ends_of_the_range(small_vit):
    patch(small_vit, "structsam", 0)
    assert merge_state(small_vit).rates == {}  # 0: no block merges
    patch(small_vit, "structsam", np.float32(0.75))  # the maximum is reachable
    assert set(merge_state(small_vit).rates.values()) == {0.75}
    unpatch(small_vit)


@pytest.mark.parametrize(
    ("image", "window", "match"),
    [
        (np.zeros((8, 8)), None, r"constant \(all values 0\)"),
        (np.full((8, 8, 3), 200, np.uint8), None, "constant"),
        (np.full((8, 8), True), None, "constant"),
        (np.r_[np.full(63, 5.0), np.nan].reshape(8, 8), None, "all values 5"),
        (np.full((8, 8), 3000.0) + np.eye(8) * 0.01, None, "nearly constant"),
        (np.full((8, 8), -1000.0), (-160, 240), r"inside the window \(-160, 240\).*-160"),
    ],
)
def test_flat_images_are_named(image, window, match):
    reason = _flatness(image, window)
    assert reason is not None and re.search(match, reason), reason


@pytest.mark.parametrize(
    "image",
    [
        np.eye(8),  # a binary image has content
        np.dstack([np.zeros((8, 8)), np.eye(8), np.zeros((8, 8))]),  # one channel suffices
        np.arange(64, dtype=np.uint16).reshape(8, 8) + 30000,
    ],
)
def test_images_with_content_pass(image):
    assert _flatness(image, None) is None
