"""Several objects per slice, their commits, and undo/redo (no Qt).

* :func:`group_prompts`: the prompts drawn on one slice -> one prompt set per object (each box
  is an object with the points inside it; points outside every box form one object per tag);
* :func:`decode_objects`: one mask per object from one embedding, the box-only objects decoded
  in one batched decoder call;
* :func:`commit` / :func:`undo_commit` / :func:`redo_commit`: a label map of objects written as
  new labels into committed objects, only on background, and taken back or written again
  without ever overwriting another label; :func:`restore_current`: the current object as it was
  before a commit;
* :class:`History`: an undo/redo stack of such steps (commits, prompt edits...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Commit", "History", "commit", "decode_objects", "group_prompts", "redo_commit",
           "restore_current", "undo_commit"]  # fmt: skip


# ---------------------------------------------------------------------------- prompts


def group_prompts(xy, labels, boxes, tags=None) -> list[dict]:
    """Prompt dicts (``box``, ``point_coords``, ``point_labels``; image pixels), one per object.

    ``xy`` (N, 2) points with ``labels`` (N,) 1/0; ``boxes`` (K, 4) x0, y0, x1, y1 in drawing
    order; ``tags`` (N,) an object tag per point (None: all one tag). Each box is an object and
    takes the points inside it (a point inside several boxes goes to the newest); the other
    points form one object per tag, in order of first appearance.
    """
    xy = np.asarray(xy, float).reshape(-1, 2)
    labels = np.asarray(labels, int).reshape(-1)
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    tags = np.zeros(len(xy), int) if tags is None else np.asarray(tags).reshape(-1)
    owner = np.full(len(xy), -1)
    for k, (x0, y0, x1, y1) in enumerate(boxes):  # later boxes win
        inside = (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
        owner[inside] = k
    out = []
    for k, box in enumerate(boxes):
        out.append(_prompt(box, xy[owner == k], labels[owner == k]))
    free = owner < 0
    _, first = np.unique(tags[free], return_index=True)
    for tag in tags[free][np.sort(first)]:
        sel = free & (tags == tag)
        out.append(_prompt(None, xy[sel], labels[sel]))
    return out


def _prompt(box, xy, labels) -> dict:
    out = {} if box is None else {"box": np.asarray(box, float)}
    if len(xy):
        out.update(point_coords=np.asarray(xy, float), point_labels=np.asarray(labels, int))
    return out


def decode_objects(predictor, embedding, objects: Sequence[Mapping]):
    """(masks (K, H, W) bool, scores (K,)) of K prompt sets from one ``embedding`` with a
    ``structsam.Predictor``: the objects with a box and no points in one batched call, the
    others one call each (the decoder takes points with at most one box)."""
    k = len(objects)
    masks: list = [None] * k
    scores = np.zeros(k, np.float32)
    boxed = [i for i, o in enumerate(objects) if "box" in o and "point_coords" not in o]
    if boxed:
        boxes = np.stack([np.asarray(objects[i]["box"], float) for i in boxed])
        m, s, _ = predictor.predict(box=boxes, embedding=embedding)
        for j, i in enumerate(boxed):  # (K, 1, H, W) when batched
            masks[i], scores[i] = np.asarray(m[j]).reshape(m.shape[-2:]), float(np.ravel(s[j])[0])
    for i, o in enumerate(objects):
        if masks[i] is None:
            m, s, _ = predictor.predict(
                point_coords=o.get("point_coords"), point_labels=o.get("point_labels"),
                box=o.get("box"), embedding=embedding,
            )  # fmt: skip
            masks[i], scores[i] = np.asarray(m[0]), float(s[0])
    if not k:
        return np.zeros((0, 0, 0), bool), scores
    return np.stack(masks).astype(bool), scores


def label_map(masks: np.ndarray) -> np.ndarray:
    """(K, H, W) masks -> (H, W) uint8 labels 1..K; where masks overlap, the earlier object."""
    masks = np.asarray(masks, bool)
    if not len(masks):
        raise ValueError("no masks")
    if len(masks) > 255:
        raise ValueError(f"at most 255 objects per slice, got {len(masks)}")
    first = np.argmax(masks, axis=0)
    return np.where(masks.any(axis=0), first + 1, 0).astype(np.uint8)


# ---------------------------------------------------------------------------- commits


@dataclass
class Commit:
    """Pixels ``index`` (flat, into the objects array) written with ``labels`` (per pixel)."""

    index: np.ndarray
    values: np.ndarray
    mask_index: np.ndarray  # the current object before the commit: its pixels (flat) ...
    mask_values: np.ndarray  # ... and their values
    context: object = None  # the caller's, kept with the step (the widget: the prompts)

    @property
    def labels(self) -> list[int]:
        return sorted(int(v) for v in np.unique(self.values))

    @property
    def label(self) -> int:
        """The first new label."""
        return self.labels[0]


def commit(objects: np.ndarray, mask: np.ndarray) -> Commit | None:
    """Each object of the label map ``mask`` (1, 2...; 0 none) becomes a new label of
    ``objects`` (after its largest), written only where ``objects`` is 0; ``mask`` is cleared.
    Both arrays are changed in place (C-contiguous, same shape). None when nothing was new."""
    flat_obj, flat_mask = _flat(objects), _flat(mask)
    mask_index = np.flatnonzero(flat_mask)
    index = mask_index[flat_obj[mask_index] == 0]
    if not len(index):
        mask[...] = 0
        return None
    old = flat_mask[index]
    present, inverse = np.unique(old, return_inverse=True)
    first = int(objects.max()) + 1
    values = (first + np.arange(len(present)))[inverse].astype(objects.dtype)
    flat_obj[index] = values
    mask_values = flat_mask[mask_index].copy()
    mask[...] = 0
    return Commit(index, values, mask_index, mask_values)


def undo_commit(objects: np.ndarray, done: Commit) -> int:
    """Take ``done`` back: its pixels that still hold its labels become 0 (pixels since painted
    with another label stay; the current object is :func:`restore_current`'s). Returns the
    number of pixels cleared."""
    flat = _flat(objects)
    still = flat[done.index] == done.values
    flat[done.index[still]] = 0
    return int(still.sum())


def redo_commit(objects: np.ndarray, done: Commit) -> int:
    """Write ``done`` again where ``objects`` is still 0 (never over another label). Returns
    the number of pixels written."""
    flat = _flat(objects)
    free = flat[done.index] == 0
    flat[done.index[free]] = done.values[free]
    return int(free.sum())


def restore_current(mask: np.ndarray, done: Commit) -> None:
    """``mask`` becomes the current object as it was just before ``done`` was committed."""
    flat = _flat(mask)
    flat[...] = 0
    flat[done.mask_index] = done.mask_values


def _flat(arr: np.ndarray) -> np.ndarray:
    flat = arr.reshape(-1)
    if not np.shares_memory(flat, arr):
        raise ValueError("objects and masks must be contiguous arrays (flat views)")
    return flat


# ---------------------------------------------------------------------------- history


@dataclass
class History:
    """Undo and redo stacks of steps (any objects); a new step clears what could be redone."""

    limit: int = 200
    done: list = field(default_factory=list)
    undone: list = field(default_factory=list)

    def push(self, step) -> None:
        self.done.append(step)
        del self.done[: -self.limit]
        self.undone.clear()

    def undo(self):
        """The step to take back (moved to the redo stack), or None."""
        return self._move(self.done, self.undone)

    def redo(self):
        """The step to do again (moved back to the undo stack), or None."""
        return self._move(self.undone, self.done)

    @staticmethod
    def _move(source: list, target: list):
        if not source:
            return None
        target.append(source.pop())
        return target[-1]

    def clear(self) -> None:
        self.done.clear()
        self.undone.clear()
