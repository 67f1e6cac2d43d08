"""Mask agreement metrics: Dice, IoU, Boundary IoU and the stability of a set of masks.

Every function takes masks of any numeric or boolean dtype; a pixel is foreground when it is
non-zero.  Two empty masks agree perfectly (score 1.0); an empty mask against a non-empty one
scores 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from ..errors import ImageError

__all__ = ["boundary_iou", "dice", "iou", "mask_boundary", "mask_stability"]


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.number)):
        raise ImageError(f"{name} must be a boolean or numeric array, got dtype {arr.dtype}")
    return arr != 0


def _pair(pred: np.ndarray, gt: np.ndarray, ndim: int | None = None) -> tuple[np.ndarray, ...]:
    p = _as_bool(pred, "pred")
    g = _as_bool(gt, "gt")
    if p.shape != g.shape:
        raise ImageError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}")
    if ndim is not None and p.ndim != ndim:
        raise ImageError(f"masks must be {ndim}D, got shape {p.shape}")
    return p, g


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient 2|P∩G| / (|P| + |G|); 1.0 when both masks are empty."""
    p, g = _pair(pred, gt)
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & g)) / total


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union |P∩G| / |P∪G|; 1.0 when both masks are empty."""
    p, g = _pair(pred, gt)
    union = int(np.count_nonzero(p | g))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(p & g)) / union


def _band_width(shape: tuple[int, ...], dilation_ratio: float) -> int:
    if dilation_ratio < 0:
        raise ValueError(f"dilation_ratio must be >= 0, got {dilation_ratio}")
    diagonal = float(np.hypot(shape[0], shape[1]))
    return max(1, int(round(dilation_ratio * diagonal)))


def mask_boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Inner boundary band of a 2D mask: the pixels of ``mask`` within ``width`` pixels of its
    contour.

    This is ``mask`` minus ``mask`` eroded ``width`` times by a 3x3 square, with everything outside
    the image counted as background (so the image border is a contour), exactly as in the
    reference Boundary IoU implementation (which erodes with OpenCV after zero padding).  ``width``
    erosions by a 3x3 square equal one erosion by a (2*width+1) square, computed here with a
    separable minimum filter.
    """
    m = _as_bool(mask, "mask")
    if m.ndim != 2:
        raise ImageError(f"mask must be 2D, got shape {m.shape}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    eroded = ndi.minimum_filter(m, size=2 * width + 1, mode="constant", cval=False)
    return m & ~eroded


def boundary_iou(pred: np.ndarray, gt: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU (Cheng et al., CVPR 2021) of two 2D masks.

    The band width is ``d = max(1, round(dilation_ratio * image_diagonal))`` pixels.  Each mask
    is reduced to its inner band of pixels within ``d`` of its contour (see
    :func:`mask_boundary`) and the score is the IoU of the two bands.  It is far more sensitive
    to edge errors on large objects than plain IoU.  Both masks empty gives 1.0; one empty mask
    gives 0.0.
    """
    p, g = _pair(pred, gt, ndim=2)
    width = _band_width(p.shape, dilation_ratio)
    pb = mask_boundary(p, width)
    gb = mask_boundary(g, width)
    union = int(np.count_nonzero(pb | gb))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pb & gb)) / union


def mask_stability(masks: Sequence[np.ndarray] | np.ndarray) -> float:
    """Mean IoU over all unordered pairs of the given masks (a list or an (N, ...) stack).

    A high value means the masks agree with each other, e.g. the outputs for jittered prompts or
    for several merge settings.  A single mask is perfectly stable (1.0); pairs of empty masks
    count as agreeing (IoU 1.0).
    """
    if isinstance(masks, np.ndarray):
        stack = _as_bool(masks, "masks")
        if stack.ndim < 2:
            raise ImageError(f"masks must be a stack (N, ...) of masks, got shape {stack.shape}")
    else:
        items = [_as_bool(m, f"masks[{i}]") for i, m in enumerate(masks)]
        if not items:
            raise ImageError("mask_stability needs at least one mask, got none")
        shapes = {m.shape for m in items}
        if len(shapes) != 1:
            raise ImageError(f"all masks must have the same shape, got {sorted(shapes)}")
        stack = np.stack(items)
    n = stack.shape[0]
    if n == 0:
        raise ImageError("mask_stability needs at least one mask, got none")
    if n == 1:
        return 1.0
    flat = stack.reshape(n, -1).astype(np.float64)
    # Pixel counts are integers far below 2**53, so these float64 products are exact.
    inter = flat @ flat.T
    area = np.diag(inter)
    union = area[:, None] + area[None, :] - inter
    rows, cols = np.triu_indices(n, k=1)
    i_pairs = inter[rows, cols]
    u_pairs = union[rows, cols]
    scores = np.divide(i_pairs, u_pairs, out=np.ones_like(i_pairs), where=u_pairs > 0)
    return float(scores.mean())
