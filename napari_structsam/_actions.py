"""The widget's annotation actions: segment, propagate, commit, undo, clear, toggle."""

from __future__ import annotations

import warnings

import numpy as np

from . import _layers as L
from ._display import _guarded
from ._session import Busy
from ._worker import propagate_job


def _fit_prompts(xy, labels, box, shape):
    """Prompts drawn past the image edge, fitted to it by the library's own validation (which
    clips them with a PromptWarning); a box wholly outside is dropped. Returns the prompts and
    a note saying what changed (None when nothing did)."""
    from structsam.errors import PromptError, PromptWarning
    from structsam.transforms import validate_box, validate_points

    size = tuple(int(v) for v in shape[-2:])  # (H, W)
    notes = []
    # record=True swaps process-wide warning state; only numpy runs inside, for microseconds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PromptWarning)
        if box is not None:
            try:
                box = validate_box(box, size)
            except PromptError as exc:
                notes.append(f"{exc}: box ignored")
                box = None
        if len(xy):
            try:
                xy, labels = validate_points(xy, labels, size)
            except PromptError as exc:
                notes.append(f"{exc}: points ignored")
                xy, labels = np.zeros((0, 2)), np.zeros(0, int)
    for w in caught:
        if issubclass(w.category, PromptWarning):
            notes.append(str(w.message))
        else:  # not ours: pass it on
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return xy, labels, box, "; ".join(notes) or None


class ActionsMixin:
    """Keyboard and button actions on the current image (GUI thread only)."""

    @_guarded
    def segment(self, explicit: bool = True) -> None:
        """[S] Decode the current slice's prompts (at once when its embedding exists)."""
        if self.image_layer is None:
            if explicit:
                self._event("choose an image layer first", error=True)
            return
        if not self._plane_ok():
            return
        s = self.session
        z = self.current_slice()
        prompts = self._current_objects(z)
        note = self._prompt_note
        if not prompts:
            s.plane_mask[z] = 0
            self.layers[L.MASK].refresh()
            if note:
                self._event(note, error=True)
            elif explicit:
                self._event("add a box (boxes layer) or a point (points layer) first")
            return
        reason = s.needs_encode(z, prompts)
        if reason:
            self._event(f"encoding first ({reason})" + (f" · {note}" if note else ""))
            self._request_encode(segment_after=True)
            return
        try:
            mask, score = s.segment(z, prompts)
        except Busy as exc:
            self._pending_segment = True
            self._event(str(exc))
            return
        except Exception as exc:  # a malformed prompt must not lose the annotation
            self._report("segment", exc, prefix="cannot segment: ")
            return
        self.layers[L.MASK].refresh()
        what = f"{len(prompts)} objects" if len(prompts) > 1 else "mask"
        scores = "/".join(f"{v:.2f}" for v in np.ravel(score))
        if s.settings.uses_prompts:
            text = (
                f"prompt inside the protected region: embedding reused, decoder only "
                f"({what}: {int((mask > 0).sum())} px, score {scores})"
            )
        else:
            text = f"{what}: {int((mask > 0).sum())} px on slice {z} (score {scores})"
        self._event(text + (f" · {note}" if note else ""))

    @_guarded
    def segment_volume(self) -> None:
        """[Shift-S] Propagate the current object through the volume in a worker."""
        s = self.session
        if self.image_layer is None or not s.is_3d:
            self._event("Segment volume works on 3D (Z, Y, X) images", error=True)
            return
        z = self.current_slice()
        if not s.plane_mask[z].any():
            self.segment(explicit=False)
        seed = s.plane_mask[z].copy()  # a label map: each object propagates
        if not seed.any():
            self._event("segment the object on this slice first [S], then [Shift-S]", True)
            return
        known = {i: s.encoding(i) for i in s.encoded_slices()}
        self._propagating = True
        self._stops = []  # why each direction ended, shown when the propagation is done
        self._pending_segment = False
        self._inflight = None
        self.runner.start("propagate", propagate_job, s, z, seed, s.settings, known)
        self._set_busy(True, "propagating")

    @_guarded
    def commit(self) -> None:
        """[C] Current object -> a new label in 'structsam objects'; clears the prompts."""
        if self.image_layer is None:
            return
        if self._propagating:
            self._event("wait for the propagation to finish (or cancel it) before committing")
            return
        prompts = self._snapshot()
        done = self.session.commit()
        if done is not None:
            done.context = prompts  # undo brings them back
        note = self._save_after("commit") if done is not None else None
        self.layers[L.OBJECTS].refresh()
        self._clear_prompt_layers()
        self._reset_prompt_state()  # the commit took the prompts with it
        self.layers[L.MASK].refresh()
        if done is None:
            self._event("nothing new to commit (the mask is empty or already committed)")
        elif note is not None:  # else the save failure is on the status line
            labels = ", ".join(str(v) for v in done.labels)
            what = "objects" if len(done.labels) > 1 else "object"
            self._event(f"committed {what} {labels} ({len(done.index)} px), {note}; undo: Ctrl-Z")

    @_guarded
    def clear_prompts(self) -> None:
        """[Shift-C] Remove all points and boxes and the current object."""
        if self.image_layer is None:
            return
        self._clear_prompt_layers()
        self._record_prompt_edit()  # undoable
        self.session.mask[:] = 0
        self.layers[L.MASK].refresh()
        self._event("prompts cleared")

    @_guarded
    def toggle_label(self) -> None:
        """[T] The next point is negative if it was positive, and vice versa."""
        if not self.layers:
            return
        points = self.layers[L.POINTS]
        now = points.feature_defaults["label"].iloc[0]
        new = L.NEGATIVE if now == L.POSITIVE else L.POSITIVE
        points.feature_defaults["label"] = new
        self._event(f"next point: {new}")

    def _clear_prompt_layers(self) -> None:
        for name in (L.POINTS, L.BOXES):
            layer = self.layers[name]
            layer.events.data.disconnect(self._prompts_changed)
            layer.data = []
            layer.events.data.connect(self._prompts_changed)

    @_guarded
    def _prompts_changed(self, event=None) -> None:
        action = str(getattr(event, "action", ""))
        if action.endswith("ing"):  # adding/changing/removing: wait for the final event
            return
        self._record_prompt_edit()
        self._prompt_timer.start()
