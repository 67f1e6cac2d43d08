"""Planes of a volume: which two axes a viewer shows, and slices on square pixels.

A viewer may show a (Z, Y, X) volume in any orientation: axial (rows Y, columns X), coronal
(rows Z, columns X), sagittal (rows Z, columns Y), or any of them transposed. A :class:`Plane`
names the volume axis across the view (``axis``) and the axes shown as rows and columns; with
the voxel size it resamples each slice to square pixels (the encoders assume them) through
:class:`structsam.transforms.SquarePixels`, and maps prompts there and masks and overlays back
exactly. Embeddings of different planes differ, so a plane's ``key`` belongs in every cache key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import StructSAMError
from ..transforms import SquarePixels

__all__ = ["Plane"]

NAMES = {0: "axial", 1: "coronal", 2: "sagittal"}  # the axis across the view of (Z, Y, X)


@dataclass(frozen=True)
class Plane:
    """Slices across volume ``axis``, shown with volume axis ``rows`` down and ``cols`` across.
    ``spacing``: the voxel size per volume axis (None: square pixels as they are)."""

    axis: int = 0
    rows: int = 1
    cols: int = 2
    spacing: tuple[float, float, float] | None = None

    def __post_init__(self):
        if sorted((self.axis, self.rows, self.cols)) != [0, 1, 2]:
            raise StructSAMError(
                f"a plane needs three different volume axes, got axis={self.axis}, "
                f"rows={self.rows}, cols={self.cols}"
            )
        if self.spacing is not None:
            values = tuple(float(s) for s in self.spacing)
            if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
                raise StructSAMError(f"spacing must be 3 positive numbers, got {self.spacing!r}")
            object.__setattr__(self, "spacing", values)

    @classmethod
    def shown(cls, displayed, ndim: int = 3, spacing=None) -> Plane:
        """The plane a viewer shows: ``displayed`` are its two displayed axes (rows, columns)
        among ``ndim`` (napari's ``dims.displayed``, ordered as ``dims.order``); the volume is
        the last three of them."""
        first = ndim - 3
        rows, cols = (int(a) - first for a in displayed)
        if not (0 <= rows < 3 and 0 <= cols < 3) or rows == cols:
            raise StructSAMError(f"displayed axes {tuple(displayed)} are not two axes of a volume")
        spacing = None if spacing is None else tuple(spacing)[-3:]
        return cls(3 - rows - cols, rows, cols, spacing)

    @property
    def name(self) -> str:
        name = NAMES[self.axis]
        return name if self.rows < self.cols else f"{name} (transposed)"

    @property
    def order(self) -> tuple[int, int, int]:
        """The volume's axes in plane order: (across, rows, columns)."""
        return (self.axis, self.rows, self.cols)

    @property
    def key(self) -> tuple:
        """What an embedding of one of its slices depends on besides the slice index."""
        return (*self.order, self.spacing)

    def view(self, volume: np.ndarray) -> np.ndarray:
        """``volume`` (Z, Y, X[, C]) as (slices, rows, columns[, C]): a view, writes go through."""
        extra = tuple(range(3, np.ndim(volume)))
        if self.order == (0, 1, 2):
            return volume
        return np.asarray(volume).transpose(*self.order, *extra)

    def pixels(self, shape) -> SquarePixels:
        """The square-pixel resampling of this plane's slices of a volume of ``shape``."""
        return _square(tuple(int(s) for s in shape[:3]), self)

    # ---------------------------------------------------------------- coordinates

    def slice_index(self, coords) -> np.ndarray:
        """Index across the plane of volume coordinates (N, 3) (rounded)."""
        return np.round(np.asarray(coords, float).reshape(-1, 3)[:, self.axis]).astype(int)

    def to_xy(self, coords) -> np.ndarray:
        """Volume coordinates (N, 3) (z, y, x) -> (N, 2) pixel (x, y) on the plane's slices."""
        coords = np.asarray(coords, float).reshape(-1, 3)
        return coords[:, [self.cols, self.rows]]


def _square(shape3: tuple[int, int, int], plane: Plane) -> SquarePixels:
    shape = (shape3[plane.rows], shape3[plane.cols])
    spacing = None
    if plane.spacing is not None:
        spacing = (plane.spacing[plane.rows], plane.spacing[plane.cols])
    return SquarePixels.for_slice(shape, spacing)
