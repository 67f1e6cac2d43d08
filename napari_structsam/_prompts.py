"""Prompts of one object on one slice, in the plane's pixels (no Qt)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Prompts:
    """Prompts on one slice, in image pixels: points ``(x, y)`` with labels 1/0, one box."""

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None

    def __bool__(self) -> bool:
        return self.box is not None or (self.points is not None and len(self.points) > 0)

    def as_dict(self) -> dict | None:
        """The ``prompts`` dict of ``Predictor.encode``/``patch`` (None when empty)."""
        out = {}
        if self.box is not None:
            out["box"] = np.asarray(self.box, float)
        if self.points is not None and len(self.points):
            out["point_coords"] = np.asarray(self.points, float)
            out["point_labels"] = np.asarray(self.labels, int)
        return out or None

    def key(self) -> tuple:
        """A hashable value that is equal exactly for equal prompts (jobs are keyed by it)."""
        parts = (self.points, self.labels, self.box)
        return tuple(None if p is None else tuple(np.asarray(p, float).ravel()) for p in parts)

    @classmethod
    def union(cls, objects: list[Prompts]) -> Prompts:
        """All objects' prompts as one set (what prompt-aware merging protects): every point
        and the box around every box."""
        objects = [o for o in objects if o]
        pts = [o.points for o in objects if o.points is not None and len(o.points)]
        labs = [o.labels for o in objects if o.points is not None and len(o.points)]
        boxes = np.array([o.box for o in objects if o.box is not None], float).reshape(-1, 4)
        box = np.r_[boxes[:, :2].min(0), boxes[:, 2:].max(0)] if len(boxes) else None
        return cls(np.concatenate(pts) if pts else None, np.concatenate(labs) if labs else None,
                   box)  # fmt: skip


def box_of(mask: np.ndarray, pad: int = 2) -> np.ndarray:
    """Tight (x0, y0, x1, y1) box of a 2D mask, grown by ``pad`` pixels and kept inside it."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.array(
        [max(xs.min() - pad, 0), max(ys.min() - pad, 0), min(xs.max() + pad, w - 1),
         min(ys.max() + pad, h - 1)],
        dtype=float,
    )  # fmt: skip
