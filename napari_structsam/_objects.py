"""Undo and redo of commits and prompt edits (Ctrl-Z / Ctrl-Shift-Z), GUI thread only.

The session's ``History`` holds both kinds of step: a ``Commit`` (the session takes it back or
writes it again, never over another label) and a :class:`PromptEdit` (the points and boxes
before and after one edit, restored here). Every undo or redo of a commit is autosaved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _layers as L
from ._display import _guarded
from ._session import Commit


@dataclass
class PromptSnapshot:
    points: np.ndarray
    labels: tuple
    tags: tuple
    boxes: list
    kinds: list

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, PromptSnapshot)
            and np.array_equal(self.points, other.points)
            and self.labels == other.labels
            and self.tags == other.tags
            and self.kinds == other.kinds
            and len(self.boxes) == len(other.boxes)
            and all(np.array_equal(a, b) for a, b in zip(self.boxes, other.boxes, strict=True))
        )


@dataclass
class PromptEdit:
    before: PromptSnapshot
    after: PromptSnapshot


class ObjectsMixin:
    """Undo/redo over the session's history (commits and prompt edits)."""

    _prompt_state: PromptSnapshot | None = None

    def _snapshot(self) -> PromptSnapshot:
        points, boxes = self.layers[L.POINTS], self.layers[L.BOXES]
        labels = tuple(points.features["label"]) if len(points.data) else ()
        tags = tuple(points.features.get("object", [0] * len(points.data)))
        return PromptSnapshot(
            np.array(points.data, float, copy=True), labels, tags,
            [np.array(d, float, copy=True) for d in boxes.data], list(boxes.shape_type),
        )  # fmt: skip

    def _record_prompt_edit(self) -> None:
        """After a finished edit of the points or boxes: one undoable step."""
        if not self.layers:
            return
        now = self._snapshot()
        before = self._prompt_state if self._prompt_state is not None else _empty(now)
        if now != before:
            self.session.history.push(PromptEdit(before, now))
        self._prompt_state = now

    def _reset_prompt_state(self) -> None:
        """After the prompt layers were set anew: the next edit is compared with them; the
        points layer gets its object tags (0 until [N])."""
        if not self.layers:
            self._prompt_state = None
            return
        points = self.layers[L.POINTS]
        if "object" not in points.features:
            points.features = points.features.assign(object=0)
        points.feature_defaults["object"] = 0
        self._prompt_state = self._snapshot()

    @_guarded
    def new_object(self) -> None:
        """[N] The next points form a new object (points inside a box stay the box's)."""
        if not self.layers:
            return
        points = self.layers[L.POINTS]
        used = np.nan_to_num(np.asarray(points.features["object"], float))
        tag = int(max(used.max(initial=0), points.feature_defaults["object"].iloc[0])) + 1
        points.feature_defaults["object"] = tag
        self._event(f"next points: object {tag + 1} of this slice (points outside boxes)")

    def _restore_prompts(self, snap: PromptSnapshot) -> None:
        points, boxes = self.layers[L.POINTS], self.layers[L.BOXES]
        for layer in (points, boxes):
            layer.events.data.disconnect(self._prompts_changed)
        try:
            points.data = snap.points.reshape(-1, points.ndim)
            if len(snap.points):
                points.features = {
                    "label": np.array(snap.labels, dtype=object),
                    "object": np.array(snap.tags, dtype=int),
                }
                points.face_color = "label"
            boxes.data = []
            if snap.boxes:
                boxes.add(snap.boxes, shape_type=snap.kinds)
        finally:
            for layer in (points, boxes):
                layer.events.data.connect(self._prompts_changed)
        self._prompt_state = snap
        self._prompt_timer.start()  # segment what the prompts now say

    @_guarded
    def undo(self) -> None:
        """[Ctrl-Z] Take back the last commit or prompt edit; other objects stay as they are."""
        self._step(self.session.undo, "undo")

    @_guarded
    def redo(self) -> None:
        """[Ctrl-Shift-Z] Do the last undone commit or prompt edit again (a commit only where
        no other object has been put since)."""
        self._step(self.session.redo, "redo")

    def _step(self, action, what: str) -> None:
        if self.image_layer is None:
            return
        if self._propagating:
            self._event(f"wait for the propagation to finish (or cancel it) before {what}")
            return
        step = action()
        if step is None:
            self._event(f"nothing to {what}")
        elif isinstance(step, Commit):
            note = self._save_after(what)
            self.layers[L.OBJECTS].refresh()
            self._commit_prompts(step, what)
            gone = "removed" if what == "undo" else "restored"
            labels = ", ".join(str(v) for v in step.labels)
            if note is not None:
                self._event(f"{what}: {gone} object(s) {labels}, {note}")
        elif isinstance(step, PromptEdit):
            self._restore_prompts(step.before if what == "undo" else step.after)
            self._event(f"{what}: prompt edit")

    def _commit_prompts(self, step: Commit, what: str) -> None:
        """Undo of a commit brings back the prompts that made it (only where the prompt layers
        are empty: nothing drawn since is replaced); redo takes them away again, as the commit
        did."""
        snap = step.context
        if not isinstance(snap, PromptSnapshot):
            return
        now = self._snapshot()
        if what == "undo" and now == _empty(now):
            self.session.restore_object(step)
            self.layers[L.MASK].refresh()
            self._restore_prompts(snap)
        elif what == "redo" and now == snap:
            self._restore_prompts(_empty(snap))  # the re-segment then clears the current object


def _empty(like: PromptSnapshot) -> PromptSnapshot:
    return PromptSnapshot(np.zeros((0,) + like.points.shape[1:]), (), (), [], [])
