"""structsam.propagate: a 3D object from one box, along every axis, anisotropic voxels, input
checks before any encode, and correction from another slice (real LiteMedSAM)."""

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

import structsam
from structsam.errors import ImageError, PromptError, StructSAMError
from structsam.interactive.propagate import SliceRecord, StopRules, propagate
from structsam.transforms import SquarePixels

CENTRE = (18, 26, 22)


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    grids = np.indices(shape).astype(float)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing, strict=True))
    return d2 <= radius**2


def _volume(truth, seed=0):
    """Textured tissue with a brighter object: smooth background, noise, no sharp edges."""
    rng = np.random.default_rng(seed)
    background = 0.4 + 0.05 * ndimage.gaussian_filter(rng.standard_normal(truth.shape), 2)
    vol = background + 0.3 * ndimage.gaussian_filter(truth.astype(float), 0.7)
    return (vol + 0.02 * rng.standard_normal(truth.shape)).astype(np.float32)


def _box(mask2d, pad=2):
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    return np.array([cols[0] - pad, rows[0] - pad, cols[-1] + 1 + pad, rows[-1] + 1 + pad], float)


@pytest.fixture(scope="module")
def predictor(litemedsam):
    return structsam.Predictor(litemedsam)


@pytest.fixture
def encoder_calls(predictor):
    calls = []
    handle = predictor.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.slow
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_sphere_along_each_axis(predictor, axis):
    truth = _ball((36, 52, 44), CENTRE, 7)
    vol = _volume(truth)
    z = CENTRE[axis]
    box = _box(np.take(truth, z, axis=axis))
    result = structsam.propagate(predictor, vol, z, box=box, axis=axis)
    assert result.mask.shape == vol.shape and result.mask.dtype == bool
    assert np.array_equal(np.asarray(result), result.mask)
    assert _dice(result.mask, truth) > 0.8, result.summary()
    # both directions ended past the object, for a reason the report names
    lo, hi = result.extent
    assert lo <= CENTRE[axis] - 5 and hi >= CENTRE[axis] + 5
    for rep in (result.up, result.down):
        assert rep.reason in ("empty", "small", "jump", "growth", "intensity", "score")
        assert rep.stopped_at is not None and rep.slices[-1].index == rep.stopped_at
    # then the two other planes voted: one encode per slice the mask crosses along each
    walk = 1 + len(result.up.slices) + len(result.down.slices)
    assert result.encodes == walk + sum(result.vote.slices.values())
    assert sorted(result.vote.slices) == sorted({0, 1, 2} - {axis})
    assert "voted with" in result.summary()


@pytest.mark.slow
def test_anisotropic_slices_are_resampled(predictor):
    """Voxels 2.5 mm deep along axis 0: slices across axis 1 are (Z, X) with 2.5 x 1 mm pixels,
    encoded on square pixels; the seed slice's mask is the predictor's on the resampled slice,
    mapped back."""
    spacing = (2.5, 1.0, 1.0)
    truth = _ball((16, 52, 44), (8, 26, 22), 9, spacing)
    vol = _volume(truth, seed=1)
    z = 26
    box = _box(np.take(truth, z, axis=1))
    result = propagate(predictor, vol, z, box=box, axis=1, spacing=spacing)
    assert _dice(result.mask, truth) > 0.8, result.summary()

    square = SquarePixels.for_slice((16, 44), (2.5, 1.0))
    assert square.square_shape == (40, 44)
    predictor.set_image(square.to_square(vol[:, z, :]))
    masks, _, _ = predictor.predict(box=square.boxes_to_square(box))
    np.testing.assert_array_equal(result.mask[:, z, :], square.to_original(masks[0]))


def test_square_pixels_round_trip():
    rng = np.random.default_rng(3)
    for shape, spacing in [((16, 44), (2.5, 1.0)), ((33, 17), (1.0, 0.43)), ((9, 7), (1.5, 1.0))]:
        square = SquarePixels.for_slice(shape, spacing)
        dy, dx = spacing
        pixel = min(spacing)
        assert square.square_shape == (round(shape[0] * dy / pixel), round(shape[1] * dx / pixel))
        mask = rng.random(shape) > 0.5
        np.testing.assert_array_equal(square.to_original(square.mask_to_square(mask)), mask)
        # a linear ramp stays linear inside (bilinear between pixel centres)
        ramp = np.tile(np.arange(shape[1], dtype=float), (shape[0], 1))
        out = square.to_square(ramp)
        assert out.shape == square.square_shape
        assert np.allclose(out, out[0]) and out[0, 0] <= 0.5 and out[0, -1] >= shape[1] - 1.5
    same = SquarePixels.for_slice((5, 6), (0.7, 0.7))
    assert same.identity and same.to_square(np.ones((5, 6))).shape == (5, 6)
    with pytest.raises(StructSAMError, match="spacing"):
        SquarePixels.for_slice((5, 6), (0.0, 1.0))


def test_bad_inputs_raise_before_any_encode(predictor, encoder_calls):
    vol = np.zeros((10, 20, 30), np.float32)
    cases = [
        (dict(volume=np.zeros((20, 30))), ImageError, "3D volume"),
        (dict(axis=3), StructSAMError, "axis must be 0, 1 or 2"),
        (dict(z=10), StructSAMError, r"z=10 is out of range: axis 0 .* 0\.\.9"),
        (dict(z=25, axis=1), StructSAMError, r"0\.\.19"),
        (dict(z=1.5), StructSAMError, "z must be an integer"),
        (dict(box=None), PromptError, "give a prompt"),
        (dict(box=[40, 40, 50, 50]), PromptError, "entirely outside the 30x20"),
        (dict(box=[5, 5, 2, 8]), PromptError, "empty or inverted"),
        (dict(box=[[1, 1, 5, 5], [2, 2, 6, 6]]), PromptError, "one box"),
        (dict(spacing=(1, 1)), StructSAMError, "three positive numbers"),
        (dict(spacing=(1, -1, 1)), StructSAMError, "three positive numbers"),
        (dict(initial=np.zeros((10, 20, 31), bool)), StructSAMError, "initial mask has shape"),
        (dict(point_labels=[1]), PromptError, "without point_coords"),
    ]
    for change, error, message in cases:
        kwargs = dict(volume=vol, z=5, box=[2, 2, 10, 10], axis=0) | change
        with pytest.raises(error, match=message):
            propagate(predictor, **kwargs)
    # along axis 2 the slice is (Z, Y) = 10 rows x 20 columns
    with pytest.raises(PromptError, match="20x10"):
        propagate(predictor, vol, 5, box=[25, 1, 28, 4], axis=2)
    with pytest.raises(StructSAMError, match="Predictor"):
        propagate(object(), vol, 5, box=[2, 2, 10, 10])
    assert encoder_calls == []


def test_stop_rules_name_the_first_rule_that_fires():
    rules = StopRules(min_score=0.5, max_growth=1.5, min_inside=0.6, max_intensity_shift=0.5)
    ok = SliceRecord(3, 100, 0.9, 0.9, 100, inside=0.95, growth=0.9, shift=0.1)
    assert rules.check(ok, seed_area=200) is None
    assert rules.check(SliceRecord(3, 0, 0.9, 0.9, 0), 200)[0] == "empty"
    assert rules.check(SliceRecord(3, 2, 0.9, 0.9, 2), 200)[0] == "small"
    assert rules.check(SliceRecord(3, 80, 0.9, 0.9, 80, inside=0.3), 200)[0] == "jump"
    assert rules.check(SliceRecord(3, 80, 0.9, 0.9, 80, growth=2.0), 200)[0] == "growth"
    assert rules.check(SliceRecord(3, 80, 0.3, 0.9, 80), 200)[0] == "score"
    assert rules.check(SliceRecord(3, 80, 0.9, 0.9, 80, shift=0.8), 200)[0] == "intensity"
    # without stops only a vanished mask ends the walk
    loose = rules.without_stops()
    assert (
        loose.check(SliceRecord(3, 80, 0.1, 0.1, 1, inside=0.0, growth=9.0, shift=3.0), 200) is None
    )
    assert loose.margin == rules.margin


@pytest.mark.slow
def test_correction_from_another_slice(predictor):
    """A result cut short above slice 21 is corrected by a box on slice 21: the missing slices
    come back and the walk down joins the initial mask instead of redoing it."""
    truth = _ball((36, 52, 44), CENTRE, 7)
    vol = _volume(truth)
    first = propagate(predictor, vol, CENTRE[0], box=_box(truth[CENTRE[0]]))
    cut = first.mask.copy()
    cut[21:] = False
    fixed = propagate(predictor, vol, 21, box=_box(truth[21]), initial=cut)
    assert fixed.down.reason == "joined" and fixed.down.last is None
    np.testing.assert_array_equal(fixed.mask[:20], cut[:20])  # below the join: untouched
    assert fixed.mask[22:].sum() > 0.8 * truth[22:].sum()
    assert _dice(fixed.mask, truth) > 0.8, fixed.summary()
    # points alone on a slice of the initial mask use its box
    again = propagate(predictor, vol, 21, point_coords=[[22, 26]], point_labels=[1], initial=fixed)
    assert again.seed.area > 0


@pytest.mark.slow
def test_stop_rules_truncate_a_walk_without_stops(predictor):
    """Tuning scores rule sets by cutting one walk without stops: exact, since without retries
    the prompts of the walk do not depend on the stops."""
    from structsam.eval.propagation import _counts, truncated_dice

    truth = _ball((36, 52, 44), CENTRE, 7)
    vol = _volume(truth, seed=2)
    box = _box(truth[CENTRE[0]])
    rules = replace(StopRules(), retry_margins=())
    loose = propagate(
        predictor, vol, CENTRE[0], box=box, rules=rules.without_stops(), max_slices=12,
        orthogonal=False,
    )  # fmt: skip
    real = propagate(predictor, vol, CENTRE[0], box=box, rules=rules, orthogonal=False)
    counts = _counts(loose, truth, 0)
    assert truncated_dice(loose, counts, int(truth.sum()), rules) == pytest.approx(
        _dice(real.mask, truth)
    )


def test_lesion_cases_are_deterministic_and_well_placed():
    from structsam.eval.propagation import lesion_cases

    cases = lesion_cases("all", hosts=("ct",))
    again = lesion_cases("test", hosts=("ct",))
    assert [c.split for c in cases] == ["tuning", "test", "test", "tuning", "test", "test"]
    assert [c.name for c in again] == [c.name for c in cases if c.split == "test"]
    for case in cases:
        twin = next((c for c in again if c.name == case.name), None)
        if twin is not None:
            np.testing.assert_array_equal(twin.volume, case.volume)
        assert case.truth.any() and case.volume.shape == case.truth.shape
        other = tuple(a for a in range(3) if a != case.axis)
        assert case.z == int(np.argmax(case.truth.sum(axis=other)))
        m = np.take(case.truth, case.z, axis=case.axis)
        x0, y0, x1, y1 = case.box.astype(int)
        assert m[y0:y1, x0:x1].sum() == m.sum()  # the box holds the whole slice's lesion
        inside, ring = case.truth, ndimage.binary_dilation(case.truth, iterations=2) & ~case.truth
        contrast = case.volume[inside].mean() - case.volume[ring].mean()
        assert (contrast > 0) == (case.polarity == "bright")
    with pytest.raises(ValueError, match="split"):
        lesion_cases("train")


class _ShrinkingPredictor:
    """A stand-in decoder: the object is rows/cols 10-29 of every slice, but a box narrower
    than 24 px gets only its 4 x 4 centre (the first answer shrinks); wider boxes get it all."""

    def __init__(self):
        self.boxes = []

    def set_image(self, *args, **kwargs):
        raise AssertionError("propagate should use encode")

    def encode(self, image, window=None, prompts=None):
        return object()

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=False,
                embedding=None):  # fmt: skip
        boxes = np.atleast_2d(box)
        self.boxes.append(boxes)
        masks = np.zeros((len(boxes), 1, 40, 40), bool)
        for k, (x0, _, x1, _) in enumerate(boxes):
            if x1 - x0 >= 24:
                masks[k, 0, 10:30, 10:30] = True
            else:
                masks[k, 0, 18:22, 18:22] = True
        scores, logits = np.ones((len(boxes), 1)), np.where(masks, 5.0, -5.0)
        return (masks, scores, logits) if np.ndim(box) == 2 else (masks[0], scores[0], logits[0])


def test_a_shrunk_slice_is_retried_from_wider_boxes():
    vol = np.zeros((5, 40, 40), np.float32)
    box = np.array([7, 7, 33, 33], float)  # wide enough for the whole object on the seed
    fake = _ShrinkingPredictor()
    rules = replace(StopRules(), retry_margins=())
    plain = propagate(fake, vol, 2, box=box, rules=rules, orthogonal=False)
    assert plain.mask[2].sum() == 400 and plain.mask[3].sum() == 16  # tight box: 22 px
    fake = _ShrinkingPredictor()
    rules = StopRules(max_intensity_shift=None)
    result = propagate(fake, vol, 2, box=box, rules=rules, orthogonal=False)
    assert all(result.mask[i].sum() == 400 for i in range(5))
    assert any(len(b) == len(StopRules().retry_margins) for b in fake.boxes)  # one batched call


class _ThresholdPredictor:
    """A stand-in model: the mask is the bright pixels inside the box. On the walk's plane
    ((Y, X) slices of ``walk_shape``) it also claims the row just below the object: an error
    that the two orthogonal planes do not make."""

    def __init__(self, walk_shape, below_row):
        self.walk_shape, self.below_row = walk_shape, below_row

    def set_image(self, *args, **kwargs):
        raise AssertionError("propagate should use encode")

    def encode(self, image, window=None, prompts=None):
        return np.asarray(image)

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=False,
                embedding=None):  # fmt: skip
        boxes = np.atleast_2d(box)
        masks = np.zeros((len(boxes), 1, *embedding.shape), bool)
        for k, (x0, y0, x1, y1) in enumerate(np.round(boxes).astype(int)):
            inside = np.zeros(embedding.shape, bool)
            inside[y0:y1, x0:x1] = True
            masks[k, 0] = inside & (embedding > 0.5)
            if embedding.shape == self.walk_shape and masks[k, 0].any():
                cols = np.flatnonzero(masks[k, 0].any(axis=0))
                masks[k, 0, self.below_row, cols] = True
        scores, logits = np.ones((len(boxes), 1)), np.where(masks, 5.0, -5.0)
        return (masks, scores, logits) if np.ndim(box) == 2 else (masks[0], scores[0], logits[0])


def test_the_orthogonal_vote_keeps_what_two_of_three_views_hold():
    """The walk's plane adds a row below a cube on every slice; the two other planes, prompted
    from the walk's cross-sections, do not: the vote removes the row on every slice but the
    prompted one (which keeps the prompts' own mask); not after a walk cut by ``max_slices``."""
    truth = np.zeros((20, 30, 40), bool)
    truth[5:15, 8:18, 10:25] = True
    vol = truth.astype(np.float32)
    fake = _ThresholdPredictor(walk_shape=(30, 40), below_row=18)
    rules = StopRules(max_intensity_shift=None, retry_margins=())
    box = np.array([9, 7, 26, 19], float)
    walk = propagate(fake, vol, 10, box=box, rules=rules, orthogonal=False)
    row = np.zeros_like(truth)
    row[5:15, 18, 10:25] = True
    np.testing.assert_array_equal(walk.mask, truth | row)
    assert walk.vote is None

    voted = propagate(fake, vol, 10, box=box, rules=rules)
    expected = truth.copy()
    expected[10] |= row[10]  # the prompted slice is the prompts' own answer
    np.testing.assert_array_equal(voted.mask, expected)
    assert voted.vote.slices == {1: 11, 2: 15}  # rows 8-18 and columns 10-24 of the walk
    assert (voted.vote.added, voted.vote.removed) == (0, int(row.sum()) - 15)
    assert voted.encodes == 1 + len(voted.up.slices) + len(voted.down.slices) + 11 + 15

    near = propagate(fake, vol, 10, box=box, rules=rules, max_slices=2)
    assert near.vote is None  # a walk cut by max_slices has cut cross-sections: no vote
    assert not near.mask[:8].any() and not near.mask[13:].any()
    inside = propagate(fake, vol, 10, box=box, rules=rules, max_slices=6)  # ends before 6
    np.testing.assert_array_equal(inside.mask, voted.mask)

    progress = []
    dropped = propagate(fake, vol, 10, box=box, rules=rules, on_vote=lambda *a: progress.append(a))
    assert progress[-1] == (26, 26)  # (done, total) after each orthogonal slice
    stopped = propagate(fake, vol, 10, box=box, rules=rules, on_vote=lambda done, total: True)
    assert stopped.vote is None and dropped.vote is not None
    np.testing.assert_array_equal(stopped.mask, walk.mask)  # a dropped vote leaves the walk's
