"""3D propagation: an object segmented on one slice, carried slice by slice through a volume.

``propagate(predictor, volume, z, box=...)`` segments slice ``z`` (an index along ``axis``) from
the given prompts, then walks outward in both directions. Each next slice is prompted with the
box of the previous slice's mask (+1 px), and the walk in that direction stops at the first
slice where a :class:`StopRules` rule fires (the mask vanishes, shrinks to a speck, jumps away
from the previous slice, more than doubles, or its intensity leaves the seed's; thresholds on
the decoder's IoU estimate and on the mask's stability exist but are off, since they lowered the
Dice on the tuning lesions: docs/propagation) or at the edge of the volume. The stopping slice
is left empty; the report says which slice stopped each direction and why. Before a slice
stops the walk (or when its mask halves), it is decoded again from wider boxes on the same
embedding, and a passing mask is kept (``StopRules.retry_margins``).

Then the two other planes vote (``orthogonal=True``): every slice along each of the two other
axes that the walk's mask crosses is segmented from the box of that cross-section widened by
``VOTE_MARGIN`` pixels of the model's input, and a voxel is kept where at least two of the
three views (the walk and the two orthogonal ones) hold it. Near a lesion's poles the walk's
boxes come from the larger previous slice and its masks there are poor; the orthogonal planes
see those voxels inside the object, with its boundary in plane. The prompted slice keeps the
prompts' own mask. Measured on the tuning lesions in docs/propagation.

Slices across an axis with anisotropic voxels (``spacing``) are resampled to square pixels
before encoding (:class:`structsam.transforms.SquarePixels`) and their masks mapped back exactly.

Correction: ``propagate(..., initial=previous)`` with new prompts on another slice re-runs from
that slice. Each visited slice is replaced; a direction that reaches a slice where the new mask
agrees with ``initial`` to within a pixel (``StopRules.join_agreement``) stops there and keeps
the rest of ``initial``; a direction that stops for another reason clears ``initial`` beyond it (the
corrected object ends there). Points alone on a slice where ``initial`` has a mask are used with
that mask's box (box-trained models such as LiteMedSAM need one).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from ..errors import ImageError, PromptError, StructSAMError
from ..transforms import Geometry, SquarePixels, validate_box, validate_points
from ..windows import resolve_window

__all__ = ["DirectionReport", "Propagation", "SliceRecord", "StopRules", "ViewVote", "propagate"]

# The orthogonal views' boxes: the walk's cross-section widened on each side by this many
# pixels of the model's input (LiteMedSAM: the slice scaled to 256 on its longest side), so
# that a view can reach past a pole where the walk stopped early. In the model's pixels, since
# how loose a box looks to the model is what counts: 5 slice pixels helped on the tuning
# lesions (MNI152 slices magnified 1.1-1.3x) and cost 0.07-0.11 Dice on a small test sphere
# magnified 4.9x, where 1 pixel helped. Chosen on the tuning lesions: docs/propagation.
VOTE_MARGIN = 4.0

# Why a direction stopped: short code -> what the report says.
REASONS = {
    "edge": "reached the edge of the volume",
    "limit": "max_slices reached",
    "empty": "the mask vanished",
    "small": "the mask shrank below the smallest area kept",
    "jump": "the mask jumped away from the previous slice",
    "growth": "the mask grew abruptly (leaked into the surroundings)",
    "score": "the decoder's predicted IoU was too low",
    "stability": "the mask was unstable (changes with the logit threshold)",
    "intensity": "the mask's intensity turned into the surroundings'",
    "joined": "the mask agrees with the initial mask from here on",
    "cancelled": "stopped by the caller",
}


@dataclass(frozen=True)
class StopRules:
    """When a direction of the walk stops. The defaults were chosen on the tuning lesions of
    :mod:`structsam.eval.propagation` (docs/propagation/)."""

    min_score: float = -math.inf  # decoder's IoU estimate (off: no gain on the tuning cases)
    min_stability: float = -math.inf  # |logits > 1| / |logits > -1| (off, likewise)
    max_growth: float = 2.0  # area / previous area
    min_inside: float = 0.8  # fraction inside the previous mask dilated by 2 original px
    min_seed_fraction: float = 0.02  # area / seed area
    min_pixels: int = 3
    # how far the mean intensity may move from the seed's, in units of the seed's contrast
    # against the ring around it
    max_intensity_shift: float | None = 0.5
    # correction: stop where the new mask and the initial one each lie within 1 px of the other
    # for this fraction of their pixels (1-px tolerance: a voted initial mask and the walk's
    # differ by about a pixel along the boundary, which on a small object is an IoU below 0.8)
    join_agreement: float = 0.9
    margin: float = 0.0  # box margin: this fraction of the box side ...
    margin_px: float = 1.0  # ... plus this many (square) pixels on each side
    track_point: bool = False  # also prompt with the previous mask's innermost pixel
    # Retry: when a rule fires or the mask shrinks below ``retry_shrink`` x the previous area,
    # the slice is decoded again from boxes widened by each of ``retry_margins`` (fractions of
    # the box side, + 1 px more than ``margin_px``), in one batched decoder call on the same
    # embedding, and the passing mask that overlaps the previous one most is kept. On 24
    # tuning lesions: mean 3D Dice 0.765 -> 0.775 (docs/propagation/README.md).
    retry_margins: tuple[float, ...] = (0.1, 0.25)
    retry_shrink: float = 0.5

    def without_stops(self) -> StopRules:
        """The same prompting with every stop and retry off but the mask vanishing (for tuning:
        without retries the walk does not depend on the stops, so any rule set without retries
        is a truncation of this walk)."""
        return replace(
            self, min_score=-math.inf, min_stability=-math.inf, max_growth=math.inf,
            min_inside=0.0, min_seed_fraction=0.0, min_pixels=1, max_intensity_shift=None,
            retry_margins=(), retry_shrink=0.0,
        )  # fmt: skip

    def check(self, rec: SliceRecord, seed_area: int) -> tuple[str, str] | None:
        """(reason, detail) when the slice ``rec`` ends the walk, else None."""
        if rec.square_area == 0:
            return "empty", ""
        if rec.square_area < max(self.min_pixels, self.min_seed_fraction * seed_area):
            return "small", f"{rec.square_area} px against {seed_area} on the seed slice"
        if rec.inside < self.min_inside:
            return "jump", f"{rec.inside:.0%} inside the previous mask, limit {self.min_inside:.0%}"
        if rec.growth > self.max_growth:
            return "growth", f"{rec.growth:.2f}x the previous area, limit {self.max_growth:g}x"
        if rec.score < self.min_score:
            return "score", f"{rec.score:.2f} < {self.min_score:g}"
        if rec.stability < self.min_stability:
            return "stability", f"{rec.stability:.2f} < {self.min_stability:g}"
        limit = self.max_intensity_shift
        if limit is not None and rec.shift is not None and rec.shift > limit:
            return "intensity", f"moved {rec.shift:.0%} of the way, limit {limit:.0%}"
        return None


@dataclass
class SliceRecord:
    """What the stop rules saw on one slice (areas on the square-pixel grid but ``area``)."""

    index: int
    area: int  # pixels on the original grid
    score: float  # the decoder's IoU estimate
    stability: float
    square_area: int = 0
    inside: float = 1.0  # fraction inside the previous mask, dilated by 2 (original) px
    growth: float = 1.0  # area / previous area
    shift: float | None = None  # |mean - seed mean| / |seed contrast against its ring|


@dataclass
class DirectionReport:
    """One direction of the walk: ``last`` is the last slice kept (None: none beyond the seed),
    ``stopped_at`` the slice that stopped it (None at the edge), ``reason`` a key of REASONS."""

    step: int
    last: int | None
    stopped_at: int | None
    reason: str
    detail: str
    slices: list[SliceRecord] = field(default_factory=list)

    def describe(self) -> str:
        name = "up" if self.step > 0 else "down"
        where = f"at slice {self.stopped_at}" if self.stopped_at is not None else "at the edge"
        kept = "no slice kept" if self.last is None else f"last slice {self.last}"
        detail = f" ({self.detail})" if self.detail else ""
        return f"{name}: {kept}; stopped {where}: {REASONS[self.reason]}{detail}"


@dataclass
class ViewVote:
    """The orthogonal-view vote after the walk: slices segmented along each other axis, and
    voxels it added to and removed from the walk's mask."""

    slices: dict[int, int]
    added: int
    removed: int

    @property
    def encodes(self) -> int:
        return sum(self.slices.values())

    def describe(self) -> str:
        seg = " and ".join(f"{n} along axis {a}" for a, n in self.slices.items())
        return f"voted with {seg}: +{self.added} / -{self.removed} voxels"


@dataclass
class Propagation:
    """The result: ``mask`` has the volume's shape and axis order; ``np.asarray(result)`` is it.
    ``vote`` is None when the orthogonal vote did not run."""

    mask: np.ndarray
    z: int
    axis: int
    seed: SliceRecord
    up: DirectionReport
    down: DirectionReport
    encodes: int
    seconds: float
    vote: ViewVote | None = None

    @property
    def report(self) -> dict[str, DirectionReport]:
        return {"up": self.up, "down": self.down}

    @property
    def extent(self) -> tuple[int, int] | None:
        """First and last slice (along ``axis``) that hold the mask."""
        other = tuple(a for a in range(3) if a != self.axis)
        present = np.flatnonzero(self.mask.any(axis=other))
        return (int(present[0]), int(present[-1])) if len(present) else None

    def summary(self) -> str:
        span = self.extent
        where = "empty" if span is None else f"slices {span[0]}-{span[1]}"
        vote = "" if self.vote is None else f"; {self.vote.describe()}"
        return (
            f"{where} along axis {self.axis} from slice {self.z} ({self.encodes} encodes, "
            f"{self.seconds:.1f} s); {self.down.describe()}; {self.up.describe()}{vote}"
        )

    def __array__(self, dtype=None, copy=None):
        return self.mask if dtype is None else self.mask.astype(dtype)


# ---------------------------------------------------------------------------- input checks


def _check_volume(volume) -> np.ndarray:
    arr = np.asarray(volume)
    if arr.ndim != 3:
        raise ImageError(f"propagate needs a 3D volume (Z, Y, X), got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ImageError(f"volume must be numeric, got dtype {arr.dtype}")
    if min(arr.shape) < 1:
        raise ImageError(f"volume has an empty axis: shape {arr.shape}")
    return arr


def _check_index(value, name: str, n: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise StructSAMError(f"{name} must be an integer, got {value!r}")
    if not 0 <= int(value) < n:
        raise StructSAMError(f"{name}={int(value)} is out of range: {what} has 0..{n - 1}")
    return int(value)


def _check_axis(axis) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer) or not -3 <= axis < 3:
        raise StructSAMError(f"axis must be 0, 1 or 2 (or -3..-1), got {axis!r}")
    return int(axis) % 3


def _check_spacing(spacing, axis: int) -> tuple[float, float] | None:
    if spacing is None:
        return None
    try:
        values = [float(s) for s in spacing]
    except (TypeError, ValueError) as exc:
        raise StructSAMError(
            f"spacing must be three numbers (per volume axis), got {spacing!r}"
        ) from exc
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise StructSAMError(f"spacing must be three positive numbers, got {spacing!r}")
    in_plane = [values[a] for a in range(3) if a != axis]
    return in_plane[0], in_plane[1]


def _check_initial(initial, shape) -> np.ndarray | None:
    if initial is None:
        return None
    arr = np.asarray(initial)
    if arr.shape != shape:
        raise StructSAMError(f"initial mask has shape {arr.shape}, the volume {shape}")
    return arr.astype(bool)


def _check_prompts(box, points, labels, size, initial_slice):
    """Validated (box, points, labels) in original slice pixels; a box from ``initial`` when
    only points are given there."""
    if points is None and labels is not None:
        raise PromptError("point_labels given without point_coords")
    if box is None and points is None:
        raise PromptError("give a prompt on slice z: box=(x0, y0, x1, y1) and/or point_coords")
    if box is not None:
        box = validate_box(box, size)
        if box.ndim != 1:
            raise PromptError(f"propagate takes one box (4,), got shape {box.shape}")
    if points is not None:
        points, labels = validate_points(points, labels, size)
    if box is None and initial_slice is not None and initial_slice.any():
        box = _box_of(initial_slice)
    return box, points, labels


# ---------------------------------------------------------------------------- one slice


def _box_of(mask: np.ndarray, margin: float = 0.0, margin_px=0.0) -> np.ndarray:
    """x0, y0, x1, y1 around the mask's pixels, widened (``margin_px``: one number, or x and
    y), clipped to the slice."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=float)
    pad = margin * np.array([box[2] - box[0], box[3] - box[1]]) + margin_px
    box += np.concatenate([-pad, pad])
    height, width = mask.shape
    return np.clip(box, 0, [width, height, width, height])


def _innermost(mask: np.ndarray) -> np.ndarray:
    """(x, y) centre of the mask pixel farthest from its border."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x + 0.5, y + 0.5])


class _Slices:
    """Slices of the volume along one axis, on square pixels, and the predictor run on them."""

    def __init__(self, predictor, volume, axis, spacing, window, prompt_aware):
        self.predictor = predictor
        self.volume = volume
        self.axis = axis
        shape = tuple(s for a, s in enumerate(volume.shape) if a != axis)
        self.square = SquarePixels.for_slice(shape, spacing)
        self.window = window
        self.prompt_aware = prompt_aware
        self.encodes = 0
        # "within 2 px of the previous mask" means 2 pixels of the original grid: an upsampled
        # axis gets a wider reach, or a 1-voxel step of the extent there reads as a jump
        self.reach = self._diamond(2.0)  # the jump rule's reach

    def _diamond(self, pixels: float) -> np.ndarray:
        """Structuring element reaching ``pixels`` original pixels along each axis of the
        square grid (at 2 on an isotropic grid: the cross, twice iterated)."""
        (h, w), (sh, sw) = self.square.shape, self.square.square_shape
        ry, rx = pixels * sh / h, pixels * sw / w
        dy, dx = np.mgrid[-int(ry) : int(ry) + 1, -int(rx) : int(rx) + 1]
        return np.abs(dy) / ry + np.abs(dx) / rx <= 1.0 + 1e-9

    def model_pixels(self) -> np.ndarray:
        """(x, y) pixels of the model's input per square pixel of these slices (1, 1 for a
        predictor without a model spec)."""
        spec = getattr(self.predictor, "spec", None)
        if spec is None:
            return np.ones(2)
        return np.array(Geometry.for_image(self.square.square_shape, spec).scale_xy)

    def image(self, i: int) -> np.ndarray:
        return self.square.to_square(np.take(self.volume, i, axis=self.axis))

    def embed(self, image, box=None, points=None, labels=None):
        """The slice's embedding (None for a predictor without Embedding values, which then
        holds the image itself); prompts are used only in prompt-aware mode."""
        prompts = {"box": box} if box is not None else {}
        if points is not None:
            prompts.update(point_coords=points, point_labels=labels)
        used = prompts if self.prompt_aware else None
        self.encodes += 1
        if hasattr(self.predictor, "encode"):
            return self.predictor.encode(image, self.window, used)
        self.predictor.set_image(image, window=self.window, prompts=used)
        return None

    def decode(self, embedding, box=None, points=None, labels=None):
        """[(mask, decoder score, stability)], one per box of ``box`` ((4,) or (K, 4)), on a
        square-pixel slice; prompts in its pixels."""
        with warnings.catch_warnings():
            # empty masks are a stop rule here, not something to warn about
            warnings.filterwarnings("ignore", message=".*empty.*")
            multi = box is None  # points alone are ambiguous: take the best of three
            kwargs = dict(point_coords=points, point_labels=labels, box=box, multimask_output=multi)
            if embedding is not None:
                kwargs["embedding"] = embedding
            masks, scores, low_res = self.predictor.predict(**kwargs)
        if box is None or np.ndim(box) == 1:
            masks, scores, low_res = masks[None], scores[None], low_res[None]
        out = []
        for m, s, logits in zip(masks, scores, low_res, strict=True):
            best = int(np.argmax(s))
            high, low = int((logits[best] > 1.0).sum()), int((logits[best] > -1.0).sum())
            out.append((np.asarray(m[best], bool), float(s[best]), high / low if low else 0.0))
        return out

    def segment(self, image, box=None, points=None, labels=None):
        """Mask, decoder score and stability on a square-pixel slice; prompts in its pixels."""
        embedding = self.embed(image, box, points, labels)
        return self.decode(embedding, box, points, labels)[0]


# ---------------------------------------------------------------------------- the walk


@dataclass
class _Seed:
    area: int
    mean: float
    contrast: float  # ring mean - seed mean (0: the intensity rule is off)


def _seed_stats(image: np.ndarray, mask: np.ndarray) -> _Seed:
    ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
    mean = float(image[mask].mean())
    contrast = float(image[ring].mean()) - mean if ring.any() else 0.0
    spread = float(np.ptp(image)) or 1.0
    if abs(contrast) < 0.02 * spread:
        contrast = 0.0  # too faint to tell object from surroundings by intensity
    return _Seed(int(mask.sum()), mean, contrast)


def _measure(i, mask, prev, near, seed: _Seed, image, score, stability) -> SliceRecord:
    """The record of a square-grid mask (``area`` on the original grid is set by
    the caller); ``near``: the previous mask ``prev`` dilated by 2 original pixels."""
    area = int(mask.sum())
    rec = SliceRecord(i, 0, score, stability, area)
    if area:
        rec.inside = float((mask & near).sum()) / area
        rec.growth = area / max(int(prev.sum()), 1)
        if seed.contrast:
            # either way: towards the surroundings, or past the seed into something else
            rec.shift = abs(float(image[mask].mean()) - seed.mean) / abs(seed.contrast)
    return rec


def _step(slices: _Slices, i: int, prev, seed: _Seed, rules: StopRules):
    """Slice ``i`` segmented from the previous mask ``prev`` -> (square-grid mask, record).
    With ``rules.retry_margins``, a first answer that fails a rule or shrinks is decoded again
    from wider boxes on the same embedding, and the passing answer overlapping ``prev`` most is
    kept (the first answer when none passes: the walk stops there)."""
    box = _box_of(prev, rules.margin, rules.margin_px)
    points = labels = None
    if rules.track_point:
        points, labels = _innermost(prev)[None], np.array([1])
    image = slices.image(i)
    embedding = slices.embed(image, box, points, labels)
    mask, score, stability = slices.decode(embedding, box, points, labels)[0]
    near = ndimage.binary_dilation(prev, structure=slices.reach)
    rec = _measure(i, mask, prev, near, seed, image, score, stability)
    shrunk = rec.square_area < rules.retry_shrink * int(prev.sum())
    if not rules.retry_margins or (rules.check(rec, seed.area) is None and not shrunk):
        return mask, rec
    boxes = np.stack([_box_of(prev, m, rules.margin_px + 1.0) for m in rules.retry_margins])
    tries = [(mask, rec)]
    for m, s, st in slices.decode(embedding, boxes):  # points go with one box only
        tries.append((m, _measure(i, m, prev, near, seed, image, s, st)))
    passing = [t for t in tries if rules.check(t[1], seed.area) is None]
    if not passing:
        return mask, rec
    return max(passing, key=lambda t: _iou(t[0], prev))


def _walk(
    slices: _Slices, out, z, step, seed_mask, seed: _Seed, rules, initial, max_slices, callback=None
):
    """Carry the seed from slice ``z`` in direction ``step``, writing kept slices into ``out``
    (square-grid masks mapped back); returns the direction's report."""
    n = out.shape[slices.axis]
    prev, last, records = seed_mask, None, []
    i, reason, detail = z, "edge", ""
    while True:
        i += step
        if not 0 <= i < n:
            i = None
            break
        if max_slices is not None and abs(i - z) > max_slices:
            reason = "limit"
            break
        mask, rec = _step(slices, i, prev, seed, rules)
        back = slices.square.to_original(mask)
        rec.area = int(back.sum())
        records.append(rec)
        stop = rules.check(rec, seed.area)
        if stop is None and callback is not None and callback(rec, back):
            stop = "cancelled", ""
        if stop is None and initial is not None:
            old = _take(initial, slices.axis, i)
            agree = _agreement(back, old) if old.any() else 0.0
            if agree >= rules.join_agreement:
                stop = "joined", f"{agree:.0%} within 1 px of the initial mask"
        if stop is not None:
            reason, detail = stop
            break
        _put(out, slices.axis, i, back)
        prev, last = mask, i
    if i is not None and reason not in ("joined", "cancelled") and initial is not None:
        _clear_beyond(out, slices.axis, i, step)
    return DirectionReport(step, last, i, reason, detail, records)


# ---------------------------------------------------------------------------- the vote


def _writable(n: int, z: int, up, down, correcting: bool, max_slices: int | None) -> np.ndarray:
    """(n,) bool: slices along the walk's axis that the vote may change. Never the prompted
    slice; when correcting, only the slices this walk wrote (the rest is the caller's)."""
    keep = np.ones(n, bool)
    if correcting:
        lo = z if down.last is None else down.last
        hi = z if up.last is None else up.last
        keep[:] = False
        keep[lo : hi + 1] = True
    if max_slices is not None:
        keep[: max(z - max_slices, 0)] = False
        keep[z + max_slices + 1 :] = False
    keep[z] = False
    return keep


def _orthogonal_vote(
    predictor, volume, out, axis, spacing, window, prompt_aware, writable, on_vote=None
):
    """Vote on the walk's mask ``out`` with segmentations along the two other axes (module
    docstring); ``out`` is changed in place on the ``writable`` slices along ``axis``. None,
    and ``out`` unchanged, when ``on_vote(done, total)`` returns True."""
    axes = [b for b in range(3) if b != axis]
    todo = {b: np.flatnonzero(out.any(axis=tuple(a for a in range(3) if a != b))) for b in axes}
    total, done = sum(len(t) for t in todo.values()), 0
    votes = out.astype(np.uint8)
    counts = {}
    for b in axes:
        slices = _Slices(predictor, volume, b, _check_spacing(spacing, b), window, prompt_aware)
        margin = VOTE_MARGIN / slices.model_pixels()
        for j in todo[b]:
            box = _box_of(slices.square.mask_to_square(_take(out, b, j)), 0.0, margin)
            mask = slices.segment(slices.image(j), box)[0]
            index = [slice(None)] * 3
            index[b] = j
            votes[tuple(index)] += slices.square.to_original(mask)
            done += 1
            if on_vote is not None and on_vote(done, total):
                return None
        counts[b] = slices.encodes
    shape = [1, 1, 1]
    shape[axis] = -1
    voted = np.where(writable.reshape(shape), votes >= 2, out)
    vote = ViewVote(counts, int((voted & ~out).sum()), int((out & ~voted).sum()))
    out[...] = voted
    return vote


def _take(volume, axis, i):
    return np.take(volume, i, axis=axis)


def _put(volume, axis, i, value):
    index = [slice(None)] * 3
    index[axis] = i
    volume[tuple(index)] = value


def _clear_beyond(volume, axis, i, step):
    index = [slice(None)] * 3
    index[axis] = slice(i, None) if step > 0 else slice(0, i + 1)
    volume[tuple(index)] = False


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The smaller of: the fraction of ``a`` within 1 px of ``b``, and of ``b`` within 1 px
    of ``a`` (1 when both are empty)."""
    if not a.any() or not b.any():
        return float(a.any() == b.any())
    near_a, near_b = ndimage.binary_dilation(a), ndimage.binary_dilation(b)
    return min(float((a & near_b).sum() / a.sum()), float((b & near_a).sum() / b.sum()))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


# ---------------------------------------------------------------------------- entry point


def propagate(
    predictor,
    volume,
    z: int,
    box=None,
    point_coords=None,
    point_labels=None,
    axis: int = 0,
    *,
    spacing=None,
    window=None,
    initial=None,
    rules: StopRules | None = None,
    max_slices: int | None = None,
    prompt_aware: bool = False,
    callback=None,
    orthogonal: bool = True,
    on_vote=None,
) -> Propagation:
    """Segment slice ``z`` along ``axis`` of ``volume`` from the prompts and carry the mask through
    the volume in both directions (see the module docstring). ``predictor``: a
    :class:`structsam.Predictor` (merged or not; each slice is encoded with ``set_image``). Prompts
    are in pixels of the slice as ``np.take(volume, z, axis)`` gives it: x along its second axis, y
    along its first. ``spacing``: voxel size per volume axis; slices are resampled to square pixels
    when it is anisotropic. ``window``: ``(low, high)`` or a name for
    :func:`structsam.windows.resolve_window`, resolved once on the whole volume. ``initial``: a
    previous result to correct from slice ``z``. ``max_slices``: how far each direction may go.
    ``prompt_aware``: protect the prompt region from merging on each slice. ``callback(record,
    mask)``: called after each slice with its :class:`SliceRecord` and its mask (original grid);
    returning True stops that direction (``"cancelled"``). ``orthogonal``: the two other planes vote
    after a walk that was neither cancelled nor cut by ``max_slices`` (module docstring).
    ``on_vote(done, total)``: called per slice of the vote; True drops it (``vote`` None).
    Returns a :class:`Propagation` (``.mask`` the bool volume, ``.up``/``.down`` the report).
    """
    if not (hasattr(predictor, "set_image") and hasattr(predictor, "predict")):
        raise StructSAMError(f"predictor must be a structsam.Predictor, got {type(predictor)}")
    volume = _check_volume(volume)
    axis = _check_axis(axis)
    z = _check_index(z, "z", volume.shape[axis], f"axis {axis} of the {volume.shape} volume")
    in_plane = _check_spacing(spacing, axis)
    initial = _check_initial(initial, volume.shape)
    size = tuple(s for a, s in enumerate(volume.shape) if a != axis)
    seed_initial = None if initial is None else _take(initial, axis, z)
    box, points, labels = _check_prompts(box, point_coords, point_labels, size, seed_initial)
    if max_slices is not None:
        max_slices = _check_index(max_slices, "max_slices", 10**9, "a slice count")
    if isinstance(window, str):
        window = resolve_window(window, volume)
    rules = rules or StopRules()

    start = time.perf_counter()
    slices = _Slices(predictor, volume, axis, in_plane, window, prompt_aware)
    sq = slices.square
    seed_box = None if box is None else sq.boxes_to_square(box)
    seed_points = None if points is None else sq.points_to_square(points)
    seed_image = slices.image(z)
    mask, score, stability = slices.segment(seed_image, seed_box, seed_points, labels)
    out = np.zeros(volume.shape, bool) if initial is None else initial.copy()
    back = sq.to_original(mask)
    _put(out, axis, z, back)
    seed_record = SliceRecord(z, int(back.sum()), score, stability, int(mask.sum()))
    if not mask.any():
        warnings.warn(
            f"the prompts on slice {z} gave an empty mask: nothing to propagate", stacklevel=2
        )
        up, down = (DirectionReport(s, None, z, "empty", "on the prompted slice") for s in (1, -1))
        return Propagation(out, z, axis, seed_record, up, down, 1, time.perf_counter() - start)
    seed = _seed_stats(seed_image, mask)
    up = _walk(slices, out, z, 1, mask, seed, rules, initial, max_slices, callback)
    down = _walk(slices, out, z, -1, mask, seed, rules, initial, max_slices, callback)
    vote = None
    if orthogonal and not {"cancelled", "limit"} & {up.reason, down.reason}:
        keep = _writable(volume.shape[axis], z, up, down, initial is not None, max_slices)
        vote = _orthogonal_vote(
            predictor, volume, out, axis, spacing, window, prompt_aware, keep, on_vote
        )
    encodes = slices.encodes + (0 if vote is None else vote.encodes)
    seconds = time.perf_counter() - start
    return Propagation(out, z, axis, seed_record, up, down, encodes, seconds, vote)
