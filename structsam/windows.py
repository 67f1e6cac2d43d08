"""Intensity windows: named presets, percentiles of a volume, and a viewer's contrast limits.

A window ``(low, high)`` clips intensities before the encoder's normalisation; that happens in
one place, :func:`structsam.transforms.prepare_image`.  This module only turns what a user
picks into that pair::

    resolve_window("ct-lung")                      # (-1350.0, 150.0) HU
    resolve_window("mr-percentiles", volume)       # 0.5-99.5 % of the nonzero voxels
    resolve_window(window_from_contrast(layer.contrast_limits))

Resolve a window once per volume, not per slice, so that every slice is normalised alike (and
the embedding cache, which keys on the window, sees the same pair for each slice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ImageError

__all__ = [
    "CT_PRESETS",
    "MR_PERCENTILES",
    "WINDOW_NAMES",
    "WindowPreset",
    "percentile_window",
    "resolve_window",
    "window_from_contrast",
]


@dataclass(frozen=True)
class WindowPreset:
    """A CT window given as radiologists do: width and level (centre), in Hounsfield units."""

    name: str
    width: float
    level: float
    description: str

    @property
    def limits(self) -> tuple[float, float]:
        return self.level - self.width / 2, self.level + self.width / 2


CT_PRESETS: dict[str, WindowPreset] = {
    p.name: p
    for p in (
        WindowPreset("ct-soft-tissue", 400, 40, "CT soft tissue (abdomen), W400/L40"),
        WindowPreset("ct-lung", 1500, -600, "CT lung parenchyma, W1500/L-600"),
        WindowPreset("ct-bone", 1800, 400, "CT bone, W1800/L400"),
        WindowPreset("ct-brain", 80, 40, "CT brain, W80/L40"),
    )
}
# MR has no absolute units: the window comes from the volume's own intensity distribution.
MR_PERCENTILES = "mr-percentiles"
MR_PERCENTILE_RANGE = (0.5, 99.5)
# "none" (or None) leaves the intensities unclipped: plain min-max of each slice.
WINDOW_NAMES: tuple[str, ...] = ("none", *CT_PRESETS, MR_PERCENTILES)


def _significant(value: float) -> float:
    # 6 significant digits: the same volume read twice (or by two programs) gives the same pair
    return float(f"{value:.6g}")


def _check_pair(low, high, what: str) -> tuple[float, float]:
    try:
        low, high = float(low), float(high)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"{what} must be two numbers (low, high), got {(low, high)!r}") from exc
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ImageError(f"{what} must be two finite numbers with low < high, got {(low, high)}")
    return low, high


def percentile_window(
    volume, percentiles: tuple[float, float] = MR_PERCENTILE_RANGE
) -> tuple[float, float]:
    """The ``percentiles`` (default 0.5 and 99.5 %) of the finite nonzero voxels of ``volume``
    (zero is the background outside the body in most MR)."""
    arr = np.asarray(volume)
    if arr.dtype.kind not in "biuf":
        raise ImageError(f"a percentile window needs a numeric volume, not dtype {arr.dtype}")
    values = arr[np.isfinite(arr) & (arr != 0)] if arr.dtype.kind == "f" else arr[arr != 0]
    if values.size == 0:
        raise ImageError("the volume has no nonzero finite voxels; no percentile window exists")
    low, high = np.percentile(values.astype(np.float64, copy=False), percentiles)
    low, high = _significant(low), _significant(high)
    if low >= high:
        raise ImageError(
            f"the {percentiles[0]:g}-{percentiles[1]:g} % percentiles of the volume are equal "
            f"({low:g}); the image is (nearly) constant, use no window"
        )
    return low, high


def window_from_contrast(contrast_limits) -> tuple[float, float]:
    """A viewer's contrast limits (napari ``layer.contrast_limits``) as a window, so the
    encoder sees what the user sees."""
    try:
        low, high = contrast_limits
    except (TypeError, ValueError) as exc:
        raise ImageError(f"contrast limits must be (low, high), got {contrast_limits!r}") from exc
    return _check_pair(low, high, "contrast limits")


def _parse_pair(text: str) -> tuple[float, float] | None:
    parts = text.replace(":", ",").split(",")
    if len(parts) != 2:
        return None
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        return None


def resolve_window(window, volume=None) -> tuple[float, float] | None:
    """Turn a window choice into ``(low, high)`` or ``None`` (no clipping).

    ``window``: ``None`` or ``"none"``; a preset name (``ct-soft-tissue``, ``ct-lung``,
    ``ct-bone``, ``ct-brain``, values in HU); ``"mr-percentiles"`` (needs ``volume``: 0.5 and
    99.5 % of its nonzero voxels); a pair ``(low, high)``; or the text ``"low,high"``.
    Raises :class:`~structsam.errors.ImageError` with the valid choices otherwise.
    """
    if window is None:
        return None
    if isinstance(window, str):
        name = window.strip().lower().replace("_", "-")
        if name in ("", "none"):
            return None
        if name in CT_PRESETS:
            return CT_PRESETS[name].limits
        if name == MR_PERCENTILES:
            if volume is None:
                raise ImageError("the mr-percentiles window needs the volume (or image) it is for")
            return percentile_window(volume)
        pair = _parse_pair(name)
        if pair is None:
            raise ImageError(
                f"unknown window {window!r}; use one of {', '.join(WINDOW_NAMES)} or "
                "'LOW,HIGH' (e.g. '-160,240')"
            )
        return _check_pair(*pair, "window")
    if isinstance(window, WindowPreset):
        return window.limits
    try:
        low, high = window
    except (TypeError, ValueError) as exc:
        raise ImageError(
            f"window must be a name ({', '.join(WINDOW_NAMES)}) or (low, high), got {window!r}"
        ) from exc
    return _check_pair(low, high, "window")
