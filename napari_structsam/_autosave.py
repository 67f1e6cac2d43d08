"""Autosave of committed objects: every commit, undo and brush stroke written to disk, and
restored when the same image is opened again (``structsam.annotations``)."""

from __future__ import annotations

import contextlib

from . import _layers as L
from ._display import _guarded


class AutosaveMixin:
    """The widget's autosave of the objects layer (GUI thread only)."""

    @_guarded
    def _autosave_changed(self, *_) -> None:
        old = self._last_store
        store = self._annotation_store()
        if store is None:
            self._event("autosave off: committed objects are kept only in the layer")
            return
        if old is not None and old.folder == store.folder:
            return
        text = f"committed objects are saved to {store.folder}"
        if self.image_layer is not None:  # objects saved there join the layer, then all saved
            restored = self._restore_objects()
            self.layers[L.OBJECTS].refresh()
            self._save_objects()
            text = restored or text
        self._event(text)

    def _annotation_store(self):
        """Where committed objects go (None: autosave off)."""
        from structsam.annotations import AnnotationStore, default_folder

        store = None
        if self.autosave_check.isChecked():
            folder = self.autosave_edit.text().strip()
            if not folder:
                folder = default_folder(self.cache_edit.text().strip() or None)
            store = AnnotationStore(folder)
        self._last_store = store  # for a save once the Qt side is gone
        return store

    def _restore_objects(self) -> str | None:
        """Objects saved for this image go into the session's objects (on background only);
        returns what to tell the user, None when there was nothing saved."""
        from structsam.annotations import merge_objects

        store = self._annotation_store()
        if store is None or self._image_key is None:
            return None
        saved = store.load(self._image_key, shape=self.session.shape, strict=True)
        if saved is None:
            return None
        added = merge_objects(self.session.objects_view(), saved.objects)
        if added:
            return f"restored {added} objects from {saved.path}"
        return f"the {saved.count} objects saved in {saved.path} are already in {L.OBJECTS!r}"

    def _save_objects(self, store=False) -> str:
        """Write the objects layer now (atomically); returns a note for the status line."""
        self._save_pending = False
        if store is False:
            store = self._annotation_store()
        if store is None or self._image_key is None or self.session.objects is None:
            return "not saved (autosave off)"
        name = self.image_layer.name if self.image_layer is not None else ""
        path = store.save(self._image_key, self.session.objects_view(), name=name)
        return f"saved to {path}" if path is not None else f"no objects left in {store.folder}"

    def _watch_objects(self, layer) -> None:
        """Brush strokes in the objects layer are autosaved too (after a short pause)."""
        if self._objects_layer is layer:
            return
        if self._objects_layer is not None:
            with contextlib.suppress(Exception):
                self._objects_layer.events.paint.disconnect(self._objects_painted)
        self._objects_layer = layer
        layer.events.paint.connect(self._objects_painted)

    @_guarded
    def _objects_painted(self, event=None) -> None:
        self._save_pending = True
        self._save_timer.start()

    @_guarded
    def _save_painted(self) -> None:
        if self._save_pending:
            self._event(f"objects layer edited: {self._save_objects()}")

    def _save_after(self, what: str) -> str | None:
        """Autosave after a commit or undo; a failure is reported (the object stays in the
        layer) and gives None."""
        try:
            return self._save_objects()
        except Exception as exc:
            self._report(f"saving after the {what}", exc)
            return None
