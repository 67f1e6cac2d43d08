"""Preprocessing per model, coordinate maps, and input validation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from structsam.errors import ImageError, PromptError, PromptWarning, StructSAMError
from structsam.models import MODELS
from structsam.transforms import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    Geometry,
    longest_side_shape,
    prepare_image,
    validate_box,
    validate_points,
)

MEAN = torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1)


def _ramp(h: int, w: int) -> np.ndarray:
    return np.add.outer(np.arange(h), np.arange(w)).astype(np.float32)


# ----------------------------------------------------------------------------- images


def test_litemedsam_shape_range_and_padding():
    x, geom = prepare_image(_ramp(300, 200) * 7 + 100, MODELS["litemedsam"])
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    assert geom == Geometry((300, 200), (256, 171), 256)
    content = x[..., :256, :171]
    assert content.min().item() == 0.0 and content.max().item() == pytest.approx(1.0)
    assert torch.all(x[..., :, 171:] == 0)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


def test_aspect_kept_for_wide_image():
    x, geom = prepare_image(_ramp(100, 400), "litemedsam")
    assert geom.resized_size == (64, 256)
    assert torch.all(x[..., 64:, :] == 0)
    assert x[..., :64, :].max().item() == pytest.approx(1.0)
    assert longest_side_shape(100, 400, 1024) == (256, 1024)


def test_medsam_stretches_to_square():
    x, geom = prepare_image(_ramp(300, 120), "medsam")
    assert x.shape == (1, 3, 1024, 1024)
    assert geom.resized_size == (1024, 1024)
    assert x.min().item() == 0.0 and x.max().item() == pytest.approx(1.0)


def test_sam_uint8_rgb_passes_through():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(1024, 1024, 3), dtype=np.uint8)
    x, geom = prepare_image(rgb, "vit_b")
    assert geom.resized_size == (1024, 1024)
    restored = x * STD + MEAN
    expected = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    assert torch.allclose(restored, expected, atol=1e-3)


def test_sam_scaling_and_padding_after_normalisation():
    x, geom = prepare_image(_ramp(200, 100) - 50.0, "vit_l")
    assert geom.resized_size == (1024, 512)
    restored = (x * STD + MEAN)[..., :, :512]
    assert restored.min().item() == pytest.approx(0.0, abs=1e-3)
    assert restored.max().item() == pytest.approx(255.0, abs=1e-2)
    # Padding is zero in the normalised space, as SAM pads after normalising.
    assert torch.all(x[..., :, 512:] == 0)


def test_ct_hounsfield_window():
    ct = np.full((256, 256), -1000, dtype=np.int16)  # air
    ct[64:192, 64:192] = 40  # soft tissue, mid-window
    ct[100:150, 100:150] = 1000  # bone, above the window
    x, geom = prepare_image(ct, "litemedsam", window=(-160, 240))
    assert geom.resized_size == (256, 256)
    img = x[0, 0]
    assert img[0, 0].item() == 0.0
    assert img[80, 80].item() == pytest.approx(0.5)
    assert img[120, 120].item() == pytest.approx(1.0)
    # Without the window, soft tissue sits near the bottom of the full HU range.
    x_full, _ = prepare_image(ct, "litemedsam")
    assert x_full[0, 0, 80, 80].item() == pytest.approx(1040 / 2000)


def test_uint16_and_bool_inputs():
    mr = (np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16)
    x, _ = prepare_image(mr, "litemedsam")
    assert x.min().item() == 0.0 and x.max().item() == pytest.approx(1.0)
    mask = np.zeros((50, 50), dtype=bool)
    mask[10:20, 10:20] = True
    xb, _ = prepare_image(mask, "vit_b")
    assert xb.shape == (1, 3, 1024, 1024)


def test_rgb_and_rgba():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(120, 90, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((120, 90, 1), 7, np.uint8)], axis=-1)
    x_rgb, g_rgb = prepare_image(rgb, "litemedsam")
    x_rgba, g_rgba = prepare_image(rgba, "litemedsam")
    assert g_rgb == g_rgba and torch.equal(x_rgb, x_rgba)
    assert not torch.equal(x_rgb[:, 0], x_rgb[:, 1])  # colour channels stay distinct
    x_sam, _ = prepare_image(rgb, "vit_h")
    assert x_sam.shape == (1, 3, 1024, 1024)
    # (H, W, 1) is taken as grayscale.
    x_one, _ = prepare_image(rgb[..., :1], "litemedsam")
    assert torch.equal(x_one[:, 0], x_one[:, 2])


def test_constant_image_gives_zeros():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, _ = prepare_image(np.full((40, 40), 3.5), "litemedsam")
    assert torch.all(x == 0)


def test_non_finite_pixels_are_replaced_with_warning():
    img = _ramp(32, 32)
    img[3, 4] = np.nan
    img[5, 6] = np.inf
    with pytest.warns(UserWarning, match="2 NaN/inf"):
        x, _ = prepare_image(img, "litemedsam")
    assert torch.isfinite(x).all()
    with pytest.raises(ImageError, match="no finite"):
        prepare_image(np.full((8, 8), np.nan), "litemedsam")


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((10, 64, 64)), "slice"),
        (np.zeros((2, 3, 64, 64)), "2D slice"),
        (np.zeros(64), "2D"),
        (np.zeros((1, 5)), "at least 2x2"),
        (np.zeros((0, 0)), "empty"),
        (np.zeros((8, 8), dtype=complex), "complex"),
        (np.array([["a", "b"], ["c", "d"]]), "numbers"),
        (np.zeros((16, 16, 2)), "RGB"),
    ],
)
def test_bad_images_raise(image, match):
    with pytest.raises(ImageError, match=match):
        prepare_image(image, "litemedsam")


@pytest.mark.parametrize("window", [(10, 10), (5, -5), (0, np.inf), "soft", (1, 2, 3)])
def test_bad_window_raises(window):
    with pytest.raises(ImageError, match="window"):
        prepare_image(_ramp(16, 16), "litemedsam", window=window)


def test_unknown_model_and_device():
    with pytest.raises(StructSAMError, match="litemedsam"):
        prepare_image(_ramp(16, 16), "vit_x")
    if not torch.cuda.is_available():
        with pytest.raises(StructSAMError, match="CUDA"):
            prepare_image(_ramp(16, 16), "litemedsam", device="cuda")


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("name", ["litemedsam", "vit_b", "medsam"])
def test_point_and_box_round_trip(name):
    geom = Geometry.for_image((300, 200), name)
    pts = np.array([[0.0, 0.0], [199.5, 299.5], [37.25, 151.0], [200.0, 300.0]])
    model_pts = geom.points_to_model(pts)
    h, w = geom.resized_size
    assert np.allclose(model_pts[-1], [w, h])
    assert np.allclose(geom.points_to_image(model_pts), pts)
    boxes = np.array([[10.0, 20.0, 110.0, 250.0], [0.0, 0.0, 200.0, 300.0]])
    model_boxes = geom.boxes_to_model(boxes)
    assert np.allclose(model_boxes[1], [0, 0, w, h])
    assert np.allclose(geom.boxes_to_image(model_boxes), boxes)
    assert np.allclose(model_boxes[0, :2], geom.points_to_model(boxes[0, :2]))


def test_geometry_matches_prepare_image():
    for name in MODELS:
        _, geom = prepare_image(_ramp(77, 130), name)
        assert geom == Geometry.for_image((77, 130), name)


def test_grid_to_image_crops_padding():
    geom = Geometry.for_image((300, 200), "litemedsam")  # resized (256, 171)
    for g in (64, 128):
        grid = np.full((g, g), 99, dtype=np.int64)
        valid_cols = -(-171 * g // 256)
        grid[:, :valid_cols] = np.arange(valid_cols)[None, :]
        out0 = geom.grid_to_image(grid, order=0)
        assert out0.shape == (300, 200) and out0.dtype == np.int64
        assert out0.max() == valid_cols - 1 and 99 not in out0
        # Columns run monotonically from the first token to the last one touching the image.
        assert out0[0, 0] == 0 and np.all(np.diff(out0[0]) >= 0)
        out1 = geom.grid_to_image(grid.astype(np.float32), order=1)
        assert out1.shape == (300, 200) and out1.dtype == np.float32
        assert out1.max() <= valid_cols - 1 + 1e-5


def test_grid_to_image_nearest_keeps_labels_and_torch_input():
    geom = Geometry.for_image((512, 512), "vit_b")
    labels = torch.arange(64 * 64).reshape(64, 64)
    out = geom.grid_to_image(labels)
    assert out.shape == (512, 512)
    # Every 8x8 block of original pixels maps to exactly one token.
    assert np.array_equal(out[::8, ::8], labels.numpy())
    with pytest.raises(StructSAMError):
        geom.grid_to_image(np.zeros((4, 4, 4)))
    with pytest.raises(StructSAMError):
        geom.grid_to_image(np.zeros((4, 4)), order=3)


def test_logits_to_image_shapes_and_crop():
    geom = Geometry.for_image((300, 200), "litemedsam")
    logits = torch.full((2, 3, 256, 256), -50.0)
    logits[..., :, :171] = 5.0
    out = geom.logits_to_image(logits)
    assert out.shape == (2, 3, 300, 200)
    assert torch.all(out > 0)  # the padded (negative) part was cut off
    sam_geom = Geometry.for_image((300, 200), "vit_b")
    sam_logits = torch.full((1, 1, 256, 256), -50.0)
    sam_logits[..., :, : 683 // 4] = 5.0
    sam_out = sam_geom.logits_to_image(sam_logits)
    assert sam_out.shape == (1, 1, 300, 200)
    assert (sam_out > 0).float().mean().item() > 0.99
    med = Geometry.for_image((300, 200), "medsam").logits_to_image(torch.zeros(1, 1, 256, 256))
    assert med.shape == (1, 1, 300, 200)
    with pytest.raises(StructSAMError):
        geom.logits_to_image(torch.zeros(256, 256))


# ----------------------------------------------------------------------------- prompts


def test_validate_box_ok_and_clipped():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on the border or half a pixel over: no warning
        box = validate_box([10, 20, 30, 40], (100, 50))
        clipped = validate_box(np.array([-0.4, 0.0, 50.3, 100.5]), (100, 50))
        whole = validate_box([0, 0, 50, 100], (100, 50))
    assert box.dtype == np.float64 and box.tolist() == [10, 20, 30, 40]
    assert clipped.tolist() == [0, 0, 50, 100]
    assert whole.tolist() == [0, 0, 50, 100]
    many = validate_box([[0, 0, 5, 5], [1, 1, 4, 9]], (10, 10))
    assert many.shape == (2, 4)


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ([0, 0, 52, 10], [0, 0, 50, 10]),  # 2 px past the right edge
        ([-3, 0, 10, 10], [0, 0, 10, 10]),
        ([0, 0, 10, 101], [0, 0, 10, 100]),
        ([-40, -40, 400, 400], [0, 0, 50, 100]),  # dragged far past every edge
    ],
)
def test_overhanging_box_is_clipped_with_a_prompt_warning(box, expected):
    with pytest.warns(PromptWarning, match=r"overhangs the 50x100 \(W x H\) image; clipped to"):
        clipped = validate_box(box, (100, 50))
    assert clipped.tolist() == expected
    assert issubclass(PromptWarning, UserWarning)


@pytest.mark.parametrize(
    ("box", "match"),
    [
        ([10, 20, 5, 40], "inverted"),  # x0 > x1
        ([10, 20, 10, 40], "empty"),
        ([60, 0, 70, 10], "entirely outside the 50x100"),  # right of the image
        ([0, -20, 10, 0], "entirely outside"),  # above it: zero height after clipping
        ([[0, 0, 5, 5], [0, 100, 5, 120]], "entirely outside"),  # one of two boxes
        ([1, 2, 3], "shape"),
        ([[[1, 2, 3, 4]]], "shape"),
        ([np.nan, 0, 5, 5], "finite"),
        ("box", "numbers"),
        ([], "shape"),
    ],
)
def test_validate_box_rejects(box, match):
    with pytest.raises(PromptError, match=match):
        validate_box(box, (100, 50))


def test_validate_points():
    coords, labels = validate_points([[1, 2], [49.4, 100.2]], [1, 0], (100, 50))
    assert coords.tolist() == [[1, 2], [49.4, 100]]
    assert labels.dtype == np.int64 and labels.tolist() == [1, 0]
    one, lab = validate_points([3, 4], 1, (10, 10))
    assert one.shape == (1, 2) and lab.tolist() == [1]


def test_points_outside_are_moved_onto_the_edge_with_a_prompt_warning():
    with pytest.warns(PromptWarning, match=r"point \(60, 2\) is outside .* at \(50, 2\)"):
        coords, _ = validate_points([[60, 2], [1, -1], [3, 4]], [1, 0, 1], (100, 50))
    assert coords.tolist() == [[50, 2], [1, 0], [3, 4]]


@pytest.mark.parametrize(
    ("coords", "labels", "match"),
    [
        ([[1, 2]], [2], "point_labels must be 1 .* or 0"),
        ([[1, 2]], [-1], "point_labels"),
        ([[1, 2]], [0.5], "point_labels"),
        ([[1, 2]], ["a"], "point_labels"),
        ([[1, 2]], [[1]], r"point_labels must have shape \(N,\)"),
        ([[1, 2]], None, "point_labels is missing"),
        ([[1, 2], [3, 4]], [1], "2 points but 1 labels"),
        ([30, 30], [1, 1], "1 points but 2 labels"),  # (2,) is one point, not two
        ([[1, 2, 3]], [1], "shape"),
        ([30, 30, 30], [1], "shape"),
        ([[[1, 2]]], [1], r"\(N, 2\)"),
        (np.zeros((0, 2)), [], "no points"),
        ([[np.inf, 2]], [1], "finite"),
    ],
)
def test_validate_points_rejects(coords, labels, match):
    with pytest.raises(PromptError, match=match):
        validate_points(coords, labels, (100, 50))
