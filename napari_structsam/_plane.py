"""The plane the viewer shows: which volume axes are on screen, the slice index across them,
and the prompts drawn on that slice, one prompt set per object (GUI thread only)."""

from __future__ import annotations

import numpy as np

from . import _layers as L
from ._display import _guarded
from ._prompts import Prompts


def plane_prompts(points, boxes, plane, z: int, is_3d: bool):
    """The prompts drawn on slice ``z`` of ``plane`` (every one for a 2D image), in the
    plane's pixels: (points (N, 2) x/y, labels (N,) 1/0, boxes (K, 4) in drawing order,
    object tags (N,) of the points)."""
    pts = np.asarray(points.data, float)
    labels = np.asarray(points.features["label"]) if len(pts) else np.array([])
    tags = np.zeros(len(pts), int)
    if len(pts) and "object" in points.features:
        tags = np.nan_to_num(np.asarray(points.features["object"], float)).astype(int)
    if len(pts) and is_3d:
        keep = plane.slice_index(pts) == z
        pts, labels, tags = pts[keep], labels[keep], tags[keep]
        xy = plane.to_xy(pts)
    else:
        xy = pts[:, ::-1][:, :2] if len(pts) else np.zeros((0, 2))
    found = []
    for shape, kind in zip(boxes.data, boxes.shape_type, strict=True):
        v = np.asarray(shape, float)
        if kind not in ("rectangle", "polygon", "ellipse") or len(v) < 2:
            continue
        if is_3d:
            if not np.all(plane.slice_index(v) == z):
                continue
            corners = plane.to_xy(v)
        else:
            corners = v[:, -2:][:, ::-1]
        (x0, y0), (x1, y1) = corners.min(0), corners.max(0)
        if x1 - x0 >= 1 and y1 - y0 >= 1:
            found.append([x0, y0, x1, y1])
    boxes = np.array(found, float).reshape(-1, 4)
    return xy, (labels == L.POSITIVE).astype(int), boxes, tags


class PlaneMixin:
    """Any displayed plane of a volume: axial, coronal, sagittal (or transposed)."""

    def current_plane(self):
        """The ``structsam.interactive.plane.Plane`` on screen (the session's spacing)."""
        from structsam.interactive.plane import Plane

        dims = self.viewer.dims
        if not self.session.is_3d or self.image_layer is None:
            return Plane()
        if dims.ndisplay != 2:  # a 3D view: keep annotating the plane last shown
            return self.session.plane
        first = dims.ndim - self.image_layer.ndim  # the image's axes are the viewer's last
        displayed = [a - first for a in dims.displayed]
        return Plane.shown(displayed, ndim=3 + (self.image_layer.ndim - 3))

    def current_slice(self) -> int:
        """Index of the displayed slice across the current plane (0 for 2D images)."""
        if not self.session.is_3d or self.image_layer is None:
            return 0
        if len(self.viewer.dims.point) < self.image_layer.ndim:  # layers being removed
            return 0
        pos = L.displayed_position(self.image_layer, self.viewer.dims.point)
        index = float(pos[-3:][self.session.plane.axis])
        return int(np.clip(round(index), 0, self.session.n_slices - 1))

    def _plane_ok(self) -> bool:
        if self.viewer.dims.ndisplay != 2:
            self._event("prompts work in a 2D view: press Ctrl-Y back to 2D", True)
            return False
        return True

    @_guarded
    def _order_changed(self, event=None) -> None:
        """The viewer shows another plane: encode its slices (embeddings are per plane)."""
        if self.image_layer is None or not self.session.is_3d or self.viewer.dims.ndisplay != 2:
            return
        plane = self.current_plane()
        if plane.order == self.session.plane.order:
            return
        self.runner.cancel()
        self._set_busy(False)
        self._clear_overlays()
        self._pending_segment = False
        self.session.set_plane(plane)
        self.last_encoding = None
        # slices with z as rows are shown with the head up, as radiologists read them
        horizontal = self.viewer.camera.orientation2d[1]
        self.viewer.camera.orientation2d = ("up" if plane.rows == 0 else "down", horizontal)
        self._event(f"annotating the {plane.name} plane ({self.session.n_slices} slices)")
        self._request_encode()

    def _current_objects(self, z: int | None = None) -> list[Prompts]:
        """The objects prompted on slice ``z`` of the plane: each box with the points inside
        it, and the points outside every box as one more; fitted to the slice."""
        from structsam.interactive.objects import group_prompts

        from ._actions import _fit_prompts

        if not self.layers:
            return []
        z = self.current_slice() if z is None else z
        s = self.session
        xy, labels, boxes, tags = plane_prompts(
            self.layers[L.POINTS], self.layers[L.BOXES], s.plane, z, s.is_3d
        )
        size = (s.n_slices, *s.pixels.shape)
        out, notes = [], []
        for group in group_prompts(xy, labels, boxes, tags):
            pts = group.get("point_coords", np.zeros((0, 2)))
            lab = group.get("point_labels", np.zeros(0, int))
            pts, lab, box, note = _fit_prompts(pts, lab, group.get("box"), size)
            notes += [note] if note else []
            prompts = Prompts(pts if len(pts) else None, lab if len(pts) else None, box)
            if prompts:
                out.append(prompts)
        self._prompt_note = "; ".join(notes) or None
        return out

    def _current_prompts(self, z: int | None = None) -> Prompts:
        """Every object's prompts as one set (what prompt-aware merging protects)."""
        return Prompts.union(self._current_objects(z))
