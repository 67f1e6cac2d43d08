"""The StructSAM dock widget: settings, the image, encode scheduling and shutdown.

Model work lives in ``structsam.interactive`` (the encoder service) and :mod:`._session`
(annotation state, no Qt) and runs through :mod:`._worker` (thread workers). The widget's other
parts are mixins: :mod:`._panel` (controls), :mod:`._display` (status and overlays),
:mod:`._actions` (segment, commit...), :mod:`._plane` (the displayed plane, objects' prompts),
:mod:`._objects` (undo/redo) and :mod:`._autosave`. Everything here runs on the
GUI thread.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref

import numpy as np
from qtpy.QtWidgets import QFileDialog, QWidget

from . import _layers as L
from ._actions import ActionsMixin
from ._autosave import AutosaveMixin
from ._display import DisplayMixin, _guarded, _widget_destroyed
from ._objects import ObjectsMixin
from ._panel import KEYS, PanelMixin
from ._plane import PlaneMixin
from ._session import (
    Encoded,
    EncoderSettings,
    Session,
    SessionError,
    SliceResult,
    Stats,
    VoteProgress,
    available_devices,
    preload,
)
from ._worker import JobRunner, Progress, encode_job

RATE_STEPS = 100  # slider ticks per unit rate
PREFETCH = 2  # neighbouring slices encoded on each side after the current one

log = logging.getLogger("napari_structsam")


class StructSAMWidget(
    PanelMixin, DisplayMixin, AutosaveMixin, ActionsMixin, PlaneMixin, ObjectsMixin, QWidget
):
    """Click-to-segment with a token-merging SAM encoder running in the background."""

    def __init__(self, napari_viewer):
        super().__init__()
        import structsam

        self._closed = False
        preload()
        self.viewer = napari_viewer
        self.session = Session()
        self.runner = JobRunner(self._on_yield, self._on_done, self._on_error)
        self.image_layer = None
        self.layers: dict = {}
        self.last_encoding: Encoded | None = None  # the current slice's, once encoded
        self._inflight: tuple | None = None  # (z, settings, prompts) of the running encode
        self._pending_segment = False
        self._propagating = False
        self._overlay_z: int | None = None
        self._image_key: str | None = None  # content hash: names the autosaved objects file
        self._objects_layer = None  # the layer whose brush strokes are autosaved
        self._save_pending = False
        self._last_store = None
        self._prompt_note: str | None = None  # how the prompts were fitted to the image
        self._methods = structsam.METHODS
        self._build(list(structsam.MODELS), ["none", *self._methods], available_devices())
        self._connect()
        # a partial, not a bound method: Qt drops slots of the object being destroyed
        self.destroyed.connect(functools.partial(_widget_destroyed, weakref.ref(self)))
        self._refresh_images()

    # ------------------------------------------------------------------ layout

    # ------------------------------------------------------------------ settings

    def settings(self) -> EncoderSettings:
        method = self.method_combo.currentText()
        info = self._methods.get(method)
        return EncoderSettings(
            model=self.model_combo.currentText(),
            checkpoint=self.ckpt_edit.text().strip() or None,
            device=self.device_combo.currentText(),
            precision=self.precision_combo.currentText(),
            method=method,
            rate=round(self.rate_slider.value() / RATE_STEPS, 4),
            prompt_aware=bool(self.prompt_check.isChecked() and info is not None),
        )

    def set_rate(self, rate: float) -> None:
        """Move the slider (as a user would; the change is debounced)."""
        self.rate_slider.setValue(round(rate * RATE_STEPS))

    def _update_rate_range(self, rate: float | None = None) -> None:
        info = self._methods.get(self.method_combo.currentText())
        top = 0 if info is None else int(info.max_rate * RATE_STEPS)
        old = self.rate_slider.value() if rate is None else round(rate * RATE_STEPS)
        self.rate_slider.blockSignals(True)
        self.rate_slider.setRange(0, top)
        self.rate_slider.setValue(min(old, top))
        self.rate_slider.blockSignals(False)
        self.rate_slider.setEnabled(info is not None)
        self.prompt_check.setEnabled(info is not None)
        self._rate_moved(self.rate_slider.value(), debounce=False)

    @_guarded
    def _method_changed(self, _=None) -> None:
        self._update_rate_range()
        self._settings_changed()

    @_guarded
    def _rate_moved(self, value, debounce=True) -> None:
        self.rate_label.setText(f"{value / RATE_STEPS:.2f}")
        if debounce:
            self._rate_timer.start()

    @_guarded
    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "SAM / MedSAM checkpoint", "", "*.pth *.pt")
        if path:
            self.ckpt_edit.setText(path)
            self._settings_changed()

    @_guarded
    def _cache_changed(self, *_) -> None:
        self.session.use_disk_cache = self.cache_check.isChecked()
        self.session.cache_folder = self.cache_edit.text().strip() or None
        self._update_status()
        if not self.autosave_edit.text().strip():  # the default autosave folder moved with it
            self._autosave_changed()

    @_guarded
    def _settings_changed(self, *_) -> None:
        new = self.settings()
        if new == self.session.settings:
            return
        self.session.settings = new
        self._clear_overlays()  # the old model's or rate's
        self.last_encoding = None
        self._update_status()
        if self.image_layer is not None:
            self._request_encode(segment_after=True)

    @_guarded
    def _contrast_changed(self, event=None) -> None:
        if self.window_check.isChecked():
            self._window_timer.start()

    @_guarded
    def _window_changed(self, *_) -> None:
        if self.image_layer is None:
            return
        window = tuple(self.image_layer.contrast_limits) if self.window_check.isChecked() else None
        if window != self.session.window:
            self.session.window = window
            self._request_encode(segment_after=True)

    # ------------------------------------------------------------------ image

    @_guarded
    def _refresh_images(self, *_) -> None:
        from napari.layers import Image

        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        current = self.image_combo.currentText()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        self.image_combo.blockSignals(False)
        if current in names:
            self.image_combo.setCurrentText(current)
        elif names:
            active = self.viewer.layers.selection.active
            pick = active.name if isinstance(active, Image) else names[-1]
            self.image_combo.setCurrentText(pick)
            self._image_chosen(pick)
        else:
            self.image_layer = None
            self._event("add an image layer (File > Open Sample > StructSAM)")

    @_guarded
    def _image_chosen(self, name: str) -> None:
        if not name or name not in self.viewer.layers:
            return
        layer = self.viewer.layers[name]
        if layer is self.image_layer:
            return
        self.runner.cancel()
        self._set_busy(False)
        try:
            objects = None
            if L.OBJECTS in self.viewer.layers:
                objects = self.viewer.layers[L.OBJECTS].data
            spatial = layer.ndim  # napari's ndim leaves the RGB channels out
            self.session.set_image(
                layer.data, rgb=layer.rgb, objects=objects, spacing=tuple(layer.scale[-spatial:])
            )
        except SessionError as exc:
            self.image_layer = None
            self._event(str(exc), error=True)
            return
        if self.image_layer is not None:
            self.image_layer.events.contrast_limits.disconnect(self._contrast_changed)
        self.image_layer = layer
        self.session.set_plane(self.current_plane())
        layer.events.contrast_limits.connect(self._contrast_changed)
        self.session.window = (
            tuple(layer.contrast_limits) if self.window_check.isChecked() else None
        )
        self.last_encoding = None
        self._overlay_z = None
        s = self.session
        self._image_key = None
        try:
            from structsam.annotations import image_key

            self._image_key = image_key(s.volume if s.is_3d else s.volume[0])
            restored = self._restore_objects()
        except Exception as exc:  # the image still opens; only the autosave is missing
            restored = None
            self._report("restoring saved objects", exc)
        self.layers = L.ensure_layers(self.viewer, layer, self.session.shape)
        self.layers[L.MASK].data = self.session.mask_view()
        self.layers[L.OBJECTS].data = self.session.objects_view()
        self._watch_objects(self.layers[L.OBJECTS])
        for name in (L.MERGE_MAP, L.PROTECTED):
            self.layers[name].data = np.zeros(self.session.shape, self.layers[name].dtype)
        for name in (L.POINTS, L.BOXES):
            prompt_layer = self.layers[name]
            prompt_layer.events.data.disconnect(self._prompts_changed)
            prompt_layer.data = []
            prompt_layer.events.data.connect(self._prompts_changed)
            for key_name, func in self._actions.items():
                prompt_layer.bind_key(KEYS[key_name][0], lambda _l, f=func: f(), overwrite=True)
        self._apply_visibility()
        self._reset_prompt_state()
        # annotating starts with points: select that layer in add mode, keep the image visible
        self.viewer.layers.selection.active = self.layers[L.POINTS]
        self.layers[L.POINTS].mode = "add"
        self._event(f"image {layer.name!r}: {self._describe_image()}")
        if restored:
            from napari.utils.notifications import show_info

            self._event(restored)
            show_info(f"StructSAM: {restored}")
        self._request_encode()

    # ------------------------------------------------------------------ autosave

    def _describe_image(self) -> str:
        s = self.session
        kind = f"{s.n_slices} slices" if s.is_3d else "2D"
        return f"{kind}, {s.shape[-2]} x {s.shape[-1]} px"

    # ------------------------------------------------------------------ encoding

    @_guarded
    def _slice_changed(self) -> None:
        if self.image_layer is None or not self.session.is_3d:
            return
        self._update_overlays()
        self._update_status()
        if not self._propagating:
            self._request_encode(segment_after=False)

    @_guarded
    def _request_encode(self, segment_after: bool = False) -> None:
        """Encode what the current slice needs, then prefetch its neighbours (newest wins)."""
        if self.image_layer is None:
            return
        s = self.session
        z = self.current_slice()
        settings = s.settings
        prompts = self._current_prompts(z) if settings.uses_prompts else None
        reason = s.needs_encode(z, prompts)
        if reason and prompts is not None and not prompts and reason.prompt_aware:
            reason = None  # nothing to protect yet: the plain embedding serves
        key = (z, settings, None if prompts is None else prompts.key())
        if reason and self.runner.busy and self._inflight == key:
            self._pending_segment = self._pending_segment or segment_after
            return  # that very encode is already running
        slices = [z] if reason or s.encoding(z) is None else []
        if s.is_3d and not settings.uses_prompts:
            have = s.encoded_slices()
            for d in range(1, PREFETCH + 1):
                slices += [n for n in (z + d, z - d) if 0 <= n < s.n_slices and n not in have]
        if not slices:  # everything cached: show it
            cached = s.encoding(z)
            if cached is not None:
                self.last_encoding = Encoded(z, s.settings, cached)
            self._update_overlays()
            self._update_status()
            if segment_after:
                self.segment(explicit=False)
            return
        want_stats = s.needs_stats(settings)
        self._pending_segment = self._pending_segment or (segment_after and bool(reason))
        self._inflight = key if slices[0] == z else None
        use = prompts if slices[0] == z else None
        self.runner.start("encode", encode_job, s, slices, settings, use, want_stats)
        self._set_busy(True, f"encoding slice {z}" if s.is_3d else "encoding")
        if segment_after and not reason:
            self.segment(explicit=False)

    @_guarded
    def _on_yield(self, job, value) -> None:
        s = self.session
        if isinstance(value, Progress):
            self.progress.setRange(0, max(value.total, 1))
            self.progress.setValue(value.done)
            self.progress.setFormat(f"{value.text} (%v/%m)")
        elif isinstance(value, Encoded):
            s.store(value)
            s.note_unmerged_time(value)
            same = value.plane in (None, s.plane)
            if same and value.z == self.current_slice() and value.settings == s.settings:
                self.last_encoding = value
                self._inflight = None
                self._update_overlays()
                self._update_status()
                if self._pending_segment:
                    self._pending_segment = False
                    self.segment(explicit=False)
        elif isinstance(value, Stats):
            s.store_stats(value)
            self._update_status()
            if self._pending_segment:
                self._pending_segment = False
                self.segment(explicit=False)
        elif isinstance(value, SliceResult):
            s.apply_slice(value)
            self.layers[L.MASK].refresh()
            self.progress.setRange(0, max(value.total, 1))
            self.progress.setValue(value.done)
            self.progress.setFormat(f"propagating: slice {value.z} (%v/%m)")
            if value.stopped:
                self._stops.append(f"slice {value.z}: {value.stopped}")
                self._event(self._stops[-1])
        elif isinstance(value, VoteProgress):
            self.progress.setRange(0, max(value.total, 1))
            self.progress.setValue(value.done)
            self.progress.setFormat("voting: other planes (%v/%m)")

    @_guarded
    def _on_done(self, job) -> None:
        self._inflight = None
        self._set_busy(False)
        if self._pending_segment and job.kind == "encode":
            self._pending_segment = False
            self.segment(explicit=False)
        if job.kind == "propagate":
            self._propagating = False
            n = int((self.session.plane_mask > 0).any(axis=(1, 2)).sum())
            why = f" · stopped at {'; '.join(self._stops)}" if self._stops else ""
            self._event(f"object propagated: on {n} slices; commit it with [C]{why}")
            self._request_encode()

    @_guarded
    def _on_error(self, job, exc) -> None:
        from structsam.errors import StructSAMError

        self._inflight = None
        self._pending_segment = False
        self._propagating = False
        self._set_busy(False)
        self._update_status()  # no "counting…" left from the failed job
        if isinstance(exc, StructSAMError | SessionError | ValueError):
            self._event(str(exc), error=True)
        else:
            self._event(f"{job.kind} failed: {type(exc).__name__}: {exc}", error=True)

    @_guarded
    def cancel(self) -> None:
        """Stop the running job (encode or propagation); results so far stay."""
        was = self.runner.current
        self.runner.cancel()
        self._inflight = None
        self._pending_segment = False
        self._propagating = False
        self._set_busy(False)
        if was is not None:
            self._event(f"{was.kind} cancelled")

    # ------------------------------------------------------------------ annotation

    # ------------------------------------------------------------------ overlays and status

    @_guarded
    def _dims_moved(self, event=None) -> None:
        self._slice_timer.start()

    def close_session(self) -> None:
        """Stop background work and disconnect from the viewer; the widget is inert after."""
        self._shutdown(qt_alive=True)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        self._shutdown(qt_alive=True)
        super().closeEvent(event)

    def _shutdown(self, qt_alive: bool) -> None:
        """Cancel and wait for the workers, drop napari connections and key bindings, and
        write an unsaved brush edit. With ``qt_alive`` false (from ``destroyed``) no Qt
        object of this widget may be touched."""
        if self._closed:
            return
        self._closed = True
        if qt_alive:
            for timer in (self._rate_timer, self._slice_timer, self._prompt_timer,
                          self._window_timer, self._save_timer):  # fmt: skip
                with contextlib.suppress(RuntimeError):
                    timer.stop()
        self.runner.shutdown()
        if self._save_pending:
            try:
                self._save_objects(self._last_store)
            except Exception:
                log.exception("StructSAM: saving the edited objects at close failed")
        viewer = self.viewer
        hooks = [
            (viewer.layers.events.inserted, self._refresh_images),
            (viewer.layers.events.removed, self._refresh_images),
            (viewer.dims.events.current_step, self._dims_moved),
            (viewer.dims.events.order, self._order_changed),
            (viewer.dims.events.ndisplay, self._order_changed),
        ]
        if self.image_layer is not None:
            hooks.append((self.image_layer.events.contrast_limits, self._contrast_changed))
        if self._objects_layer is not None:
            hooks.append((self._objects_layer.events.paint, self._objects_painted))
        for name in (L.POINTS, L.BOXES):
            if name in self.layers:
                hooks.append((self.layers[name].events.data, self._prompts_changed))
        for emitter, callback in hooks:
            with contextlib.suppress(Exception):
                emitter.disconnect(callback)
        for key, _ in KEYS.values():
            with contextlib.suppress(Exception):
                viewer.bind_key(key, None)
