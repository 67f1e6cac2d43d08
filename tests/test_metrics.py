import numpy as np
import pytest

from structsam.errors import ImageError
from structsam.eval.metrics import boundary_iou, dice, iou, mask_boundary, mask_stability


def square(shape, r0, r1, c0, c1):
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def reference_boundary(mask, width):
    """The reference Boundary IoU band, written out literally: pad with one ring of zeros,
    erode ``width`` times with a 3x3 square, crop, subtract."""
    h, w = mask.shape
    cur = np.pad(mask.astype(bool), 1)
    for _ in range(width):
        nxt = np.zeros_like(cur)
        for r in range(1, h + 1):
            for c in range(1, w + 1):
                nxt[r, c] = cur[r - 1 : r + 2, c - 1 : c + 2].all()
        cur = nxt
    return mask.astype(bool) & ~cur[1:-1, 1:-1]


def test_dice_and_iou_exact():
    a = square((10, 10), 2, 6, 2, 6)  # 16 px
    b = square((10, 10), 3, 7, 3, 7)  # 16 px, overlap 3x3 = 9
    assert iou(a, b) == pytest.approx(9 / 23)
    assert dice(a, b) == pytest.approx(18 / 32)
    assert iou(a, a) == 1.0
    assert dice(a, a) == 1.0


def test_disjoint_and_empty():
    a = square((8, 8), 0, 2, 0, 2)
    b = square((8, 8), 5, 8, 5, 8)
    empty = np.zeros((8, 8), dtype=bool)
    assert iou(a, b) == 0.0
    assert dice(a, b) == 0.0
    assert iou(empty, empty) == 1.0
    assert dice(empty, empty) == 1.0
    assert boundary_iou(empty, empty) == 1.0
    assert iou(a, empty) == 0.0
    assert dice(empty, a) == 0.0
    assert boundary_iou(a, empty) == 0.0


def test_numeric_masks_count_nonzero():
    a = np.array([[0, 2], [3, 0]])
    b = np.array([[0.0, 1.0], [0.0, 0.0]])
    assert iou(a, b) == pytest.approx(0.5)
    assert dice(a, b) == pytest.approx(2 / 3)


def test_shape_mismatch_raises():
    with pytest.raises(ImageError, match="same shape"):
        iou(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ImageError):
        boundary_iou(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)))


def test_boundary_iou_hand_computed():
    # 10x10 image: diagonal 14.1, 0.02 * 14.1 rounds to 0, so the band is 1 px wide.
    a = square((10, 10), 2, 6, 2, 6)  # 4x4: band = 16 - 4 = 12
    b = square((10, 10), 2, 7, 2, 7)  # 5x5: band = 25 - 9 = 16
    assert mask_boundary(a, 1).sum() == 12
    assert mask_boundary(b, 1).sum() == 16
    # Shared band pixels: row 2, columns 2..5 (4) and column 2, rows 3..5 (3) = 7.
    assert boundary_iou(a, b) == pytest.approx(7 / (12 + 16 - 7))
    assert iou(a, b) == pytest.approx(16 / 25)


def test_boundary_band_width_and_image_border():
    # The image border is a contour: a full mask's band is its outer ring.
    full = np.ones((10, 10), dtype=bool)
    assert mask_boundary(full, 1).sum() == 36
    assert mask_boundary(full, 2).sum() == 100 - 36
    # 100x100: diagonal 141.4, 0.05 * 141.4 = 7.07 -> 7 px band.
    big = square((100, 100), 20, 80, 20, 80)  # 60x60
    inner = 60 - 2 * 7
    expected_band = 60 * 60 - inner * inner
    assert mask_boundary(big, 7).sum() == expected_band
    shifted = square((100, 100), 21, 81, 20, 80)
    score = boundary_iou(big, shifted, dilation_ratio=0.05)
    assert 0.0 < score < iou(big, shifted) < 1.0


def test_boundary_matches_reference_erosion():
    rng = np.random.default_rng(3)
    for width in (1, 2, 3):
        mask = rng.random((17, 13)) > 0.3
        np.testing.assert_array_equal(mask_boundary(mask, width), reference_boundary(mask, width))


def test_boundary_iou_min_width_one():
    a = square((5, 5), 1, 4, 1, 4)
    assert boundary_iou(a, a, dilation_ratio=0.0) == 1.0


def test_mask_stability():
    a = square((10, 10), 2, 6, 2, 6)
    b = square((10, 10), 3, 7, 3, 7)
    x = 9 / 23
    assert mask_stability([a]) == 1.0
    assert mask_stability([a, a]) == 1.0
    assert mask_stability([a, b]) == pytest.approx(x)
    assert mask_stability([a, a, b]) == pytest.approx((1 + 2 * x) / 3)
    assert mask_stability(np.stack([a, a, b])) == pytest.approx((1 + 2 * x) / 3)
    empty = np.zeros((10, 10), dtype=bool)
    assert mask_stability([empty, empty, a]) == pytest.approx(1 / 3)


def test_mask_stability_errors():
    with pytest.raises(ImageError):
        mask_stability([])
    with pytest.raises(ImageError, match="same shape"):
        mask_stability([np.zeros((3, 3)), np.zeros((4, 4))])
