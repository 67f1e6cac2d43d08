"""The StructSAM dock widget: layout and signal wiring only.

Model work lives in :mod:`._session` (pure Python) and runs through :mod:`._worker` (thread
workers); this module turns user actions into session calls and worker results into layer
updates, all on the GUI thread.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import traceback
import warnings
import weakref

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from . import _layers as L
from ._session import (
    DEFAULT_RATE,
    Busy,
    EncoderSettings,
    Encoding,
    Prompts,
    Session,
    SessionError,
    SliceResult,
    Stats,
    available_devices,
    preload,
)
from ._worker import JobRunner, Progress, encode_job, propagate_job

RATE_STEPS = 100  # slider ticks per unit rate
SLIDER_DEBOUNCE_MS = 300
PREFETCH = 2  # neighbouring slices encoded on each side after the current one
AUTOSAVE_PAINT_MS = 500  # brush strokes in the objects layer are saved after this pause

log = logging.getLogger("napari_structsam")

KEYS = {
    "segment": ("S", "Segment the object on this slice from its points and box"),
    "volume": ("Shift-S", "Propagate the current object slice by slice through the volume"),
    "commit": ("C", "Commit the current object as a new label (never overwrites others)"),
    "clear": ("Shift-C", "Clear all prompts and the current object"),
    "undo": ("Control-Z", "Undo the last commit"),
    "toggle": ("T", "Next point: toggle positive / negative"),
}


def _key_label(key: str) -> str:
    return key.replace("Control-", "Ctrl-")


def _guarded(func):
    """Qt and napari callbacks must never raise: an exception escaping a slot aborts the
    application. Errors go to the status line (traceback in its tooltip) and the log; once the
    widget is closed, callbacks do nothing."""

    @functools.wraps(func)
    def wrapper(self, *args, **kwargs):
        if getattr(self, "_closed", False):
            return None
        try:
            return func(self, *args, **kwargs)
        except Exception as exc:
            self._report(func.__name__, exc)
            return None

    return wrapper


def _widget_destroyed(ref, *_) -> None:
    """The dock widget's C++ side is gone (viewer closed, dock removed): stop its workers and
    drop its napari connections, touching no Qt object of it."""
    widget = ref()
    if widget is not None:
        widget._shutdown(qt_alive=False)


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


class StructSAMWidget(QWidget):
    """Click-to-segment with a token-merging SAM encoder running in the background."""

    def __init__(self, napari_viewer):
        super().__init__()
        from structsam.merge import METHODS
        from structsam.models import MODELS

        self._closed = False
        preload()
        self.viewer = napari_viewer
        self.session = Session()
        self.runner = JobRunner(self._on_yield, self._on_done, self._on_error)
        self.image_layer = None
        self.layers: dict = {}
        self.last_encoding: Encoding | None = None
        self._inflight: tuple | None = None  # (z, settings, prompts) of the running encode
        self._pending_segment = False
        self._propagating = False
        self._overlay_z: int | None = None
        self._image_key: str | None = None  # content hash: names the autosaved objects file
        self._objects_layer = None  # the layer whose brush strokes are autosaved
        self._save_pending = False
        self._last_store = None
        self._prompt_note: str | None = None  # how the prompts were fitted to the image
        self._methods = METHODS
        self._build(list(MODELS), ["none", *METHODS], available_devices())
        self._connect()
        # a partial, not a bound method: Qt drops slots of the object being destroyed
        self.destroyed.connect(functools.partial(_widget_destroyed, weakref.ref(self)))
        self._refresh_images()

    # ------------------------------------------------------------------ layout

    def _build(self, models, methods, devices) -> None:
        root = QVBoxLayout(self)

        box = QGroupBox("Image and model")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("Image layer to annotate: 2D, RGB or a (Z, Y, X) volume")
        form.addRow("image", self.image_combo)
        self.window_check = QCheckBox("use the display contrast as intensity window")
        self.window_check.setToolTip("Clip intensities to the layer's contrast limits (CT HU)")
        form.addRow(self.window_check)
        self.model_combo = QComboBox()
        self.model_combo.addItems(models)
        self.model_combo.setToolTip(
            "LiteMedSAM ships with its weights; SAM ViT-B/L/H and MedSAM need a checkpoint file"
        )
        form.addRow("model", self.model_combo)
        ckpt = QHBoxLayout()
        self.ckpt_edit = QLineEdit()
        self.ckpt_edit.setPlaceholderText("default weights")
        self.ckpt_button = QPushButton("…")
        self.ckpt_button.setToolTip("Choose a checkpoint file (.pth)")
        ckpt.addWidget(self.ckpt_edit)
        ckpt.addWidget(self.ckpt_button)
        form.addRow("checkpoint", ckpt)
        self.device_combo = QComboBox()
        self.device_combo.addItems(devices)
        form.addRow("device", self.device_combo)
        self.precision_combo = QComboBox()
        cuda = any(d.startswith("cuda") for d in devices)
        self.precision_combo.addItems(["auto", "fp32", "bf16"] + (["fp16"] if cuda else []))
        self.precision_combo.setToolTip(
            "Number format of the image encoder; auto = bf16 where this device runs it faster "
            "(measured once), else fp32. Prompt encoder and mask decoder stay in fp32."
        )
        form.addRow("precision", self.precision_combo)
        self.cache_check, self.cache_edit = _folder_row(
            form,
            "disk cache",
            "$STRUCTSAM_CACHE_DIR or ~/.cache/structsam",
            "Embeddings are kept on disk (size-limited) and reused when the image, model, "
            "method, rate and window are the same; `structsam embed` fills this cache",
        )
        self.autosave_check, self.autosave_edit = _folder_row(
            form,
            "autosave objects",
            "<disk cache folder>/annotations",
            "Every commit and undo is written at once to <folder>/<image hash>.objects.npz; "
            "opening the same image again restores the objects (never over existing labels)",
        )
        root.addWidget(box)

        box = QGroupBox("Token merging")
        form = QFormLayout(box)
        self.method_combo = QComboBox()
        self.method_combo.addItems(methods)
        self.method_combo.setCurrentText("structsam")
        form.addRow("method", self.method_combo)
        rate = QHBoxLayout()
        self.rate_slider = QSlider(Qt.Orientation.Horizontal)
        self.rate_slider.setToolTip("Fraction of tokens merged per stage; 0 = unmerged encoder")
        self.rate_label = QLabel()
        self.rate_label.setMinimumWidth(36)
        rate.addWidget(self.rate_slider)
        rate.addWidget(self.rate_label)
        form.addRow("merge rate", rate)
        self.prompt_check = QCheckBox("prompt-aware (protect the prompt region)")
        self.prompt_check.setToolTip(
            "Protect the tokens around the prompts; re-encodes only when a new prompt falls "
            "outside the protected region"
        )
        form.addRow(self.prompt_check)
        root.addWidget(box)

        box = QGroupBox("Overlays")
        grid = QGridLayout(box)
        self.show_mask = QCheckBox("mask")
        self.show_merge = QCheckBox("merge map")
        self.show_protected = QCheckBox("protected cells")
        for i, check in enumerate((self.show_mask, self.show_merge, self.show_protected)):
            check.setChecked(True)
            grid.addWidget(check, 0, i)
        grid.addWidget(QLabel("opacity"), 1, 0)
        self.opacity_slider = QSlider(Qt.Orientation.Horizontal)
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(45)
        grid.addWidget(self.opacity_slider, 1, 1, 1, 2)
        grid.addWidget(QLabel("block"), 2, 0)
        self.block_combo = QComboBox()
        self.block_combo.setToolTip("Which merged encoder block's token groups to show")
        grid.addWidget(self.block_combo, 2, 1, 1, 2)
        root.addWidget(box)

        box = QGroupBox("Annotate")
        grid = QGridLayout(box)
        self.buttons = {}
        texts = {
            "segment": "Segment",
            "volume": "Segment volume",
            "commit": "Commit",
            "clear": "Clear prompts",
            "undo": "Undo commit",
            "toggle": "Positive/negative",
        }
        for i, (name, text) in enumerate(texts.items()):
            key, tip = KEYS[name]
            button = QPushButton(f"{text} [{_key_label(key)}]")
            button.setToolTip(f"{tip} [{_key_label(key)}]")
            self.buttons[name] = button
            grid.addWidget(button, i // 2, i % 2)
        root.addWidget(box)

        bar = QHBoxLayout()
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the running encode or propagation")
        bar.addWidget(self.progress)
        bar.addWidget(self.cancel_button)
        root.addLayout(bar)
        self.status = QLabel("choose an image layer")
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.event_label = QLabel("")
        # Fixed sizes: text that changes the widget's size hint re-lays out the main window,
        # and the canvas redraw that follows blocks the GUI thread (~100 ms on software GL).
        lines = self.fontMetrics().lineSpacing()
        self.progress.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        for label, n in ((self.status, 5), (self.event_label, 2)):
            label.setWordWrap(True)
            label.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
            label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
            label.setFixedHeight(n * lines + 4)
        root.addWidget(self.status)
        root.addWidget(self.event_label)
        root.addStretch(1)
        self._set_busy(False)
        self._update_rate_range(DEFAULT_RATE)
        self.session.settings = self.settings()

    def _connect(self) -> None:
        self._rate_timer = QTimer(self, singleShot=True, interval=SLIDER_DEBOUNCE_MS)
        self._rate_timer.timeout.connect(self._settings_changed)
        self._slice_timer = QTimer(self, singleShot=True, interval=60)
        self._slice_timer.timeout.connect(self._slice_changed)
        self._prompt_timer = QTimer(self, singleShot=True, interval=20)
        self._prompt_timer.timeout.connect(lambda: self.segment(explicit=False))
        self._window_timer = QTimer(self, singleShot=True, interval=400)
        self._window_timer.timeout.connect(self._window_changed)
        self._save_timer = QTimer(self, singleShot=True, interval=AUTOSAVE_PAINT_MS)
        self._save_timer.timeout.connect(self._save_painted)

        self.image_combo.currentTextChanged.connect(self._image_chosen)
        self.window_check.toggled.connect(self._window_changed)
        self.model_combo.currentTextChanged.connect(self._settings_changed)
        self.ckpt_edit.editingFinished.connect(self._settings_changed)
        self.cache_check.toggled.connect(self._cache_changed)
        self.cache_edit.editingFinished.connect(self._cache_changed)
        self.autosave_check.toggled.connect(self._autosave_changed)
        self.autosave_edit.editingFinished.connect(self._autosave_changed)
        self.ckpt_button.clicked.connect(self._browse_checkpoint)
        self.device_combo.currentTextChanged.connect(self._settings_changed)
        self.precision_combo.currentTextChanged.connect(self._settings_changed)
        self.method_combo.currentTextChanged.connect(self._method_changed)
        self.rate_slider.valueChanged.connect(self._rate_moved)
        self.prompt_check.toggled.connect(self._settings_changed)
        for check in (self.show_mask, self.show_merge, self.show_protected):
            check.toggled.connect(self._apply_visibility)
        self.opacity_slider.valueChanged.connect(self._apply_visibility)
        self.block_combo.currentIndexChanged.connect(self._block_chosen)
        actions = {
            "segment": lambda: self.segment(explicit=True),
            "volume": self.segment_volume,
            "commit": self.commit,
            "clear": self.clear_prompts,
            "undo": self.undo,
            "toggle": self.toggle_label,
        }
        self._actions = actions
        for name, func in actions.items():
            self.buttons[name].clicked.connect(lambda _=False, f=func: f())
        self.cancel_button.clicked.connect(self.cancel)

        layers = self.viewer.layers
        layers.events.inserted.connect(self._refresh_images)
        layers.events.removed.connect(self._refresh_images)
        self.viewer.dims.events.current_step.connect(self._dims_moved)
        for name, func in actions.items():
            key = KEYS[name][0]
            # overwrite: S and T are select/path modes of napari's points and shapes layers,
            # which the prompt layers re-bind (below) as micro-sam does
            self.viewer.bind_key(key, lambda _v, f=func: f(), overwrite=True)

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

    @_guarded
    def _settings_changed(self, *_) -> None:
        new = self.settings()
        if new == self.session.settings:
            return
        self.session.settings = new
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
            self.session.set_image(layer.data, rgb=layer.rgb, objects=objects)
        except SessionError as exc:
            self.image_layer = None
            self._event(str(exc), error=True)
            return
        if self.image_layer is not None:
            self.image_layer.events.contrast_limits.disconnect(self._contrast_changed)
        self.image_layer = layer
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

    def _describe_image(self) -> str:
        s = self.session
        kind = f"{s.n_slices} slices" if s.is_3d else "2D"
        return f"{kind}, {s.shape[-2]} x {s.shape[-1]} px"

    def current_slice(self) -> int:
        """Index of the displayed slice along the image's first axis (0 for 2D images)."""
        if not self.session.is_3d or self.image_layer is None:
            return 0
        pos = L.displayed_position(self.image_layer, self.viewer.dims.point)
        return int(np.clip(round(float(pos[0])), 0, self.session.n_slices - 1))

    def _plane_ok(self) -> bool:
        dims = self.viewer.dims
        if dims.ndisplay != 2 or tuple(dims.displayed) != (dims.ndim - 2, dims.ndim - 1):
            self._event("prompts work in the 2D (Y, X) view: press Ctrl-E/Ctrl-T back", True)
            return False
        return True

    # ------------------------------------------------------------------ encoding

    @_guarded
    def _slice_changed(self) -> None:
        if self.image_layer is None or not self.session.is_3d:
            return
        self._update_overlays()
        self._update_status()
        if not self._propagating:
            self._request_encode(segment_after=False)

    def _current_prompts(self, z: int | None = None) -> Prompts:
        if not self.layers:
            return Prompts()
        z = self.current_slice() if z is None else z
        xy, labels, box = L.slice_prompts(
            self.layers[L.POINTS], self.layers[L.BOXES], z, self.session.is_3d
        )
        xy, labels, box, self._prompt_note = _fit_prompts(xy, labels, box, self.session.shape)
        return Prompts(xy if len(xy) else None, labels if len(xy) else None, box)

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
        if reason and prompts is not None and not prompts and reason.startswith("prompt-aware"):
            reason = None  # nothing to protect yet: the plain embedding serves
        key = (z, settings, None if prompts is None else repr(prompts.as_dict()))
        if reason and self.runner.busy and self._inflight == key:
            self._pending_segment = self._pending_segment or segment_after
            return  # that very encode is already running
        slices = [z] if reason or s.encoding(z) is None else []
        if s.is_3d and not settings.uses_prompts:
            have = s.encoded_slices()
            for d in range(1, PREFETCH + 1):
                slices += [n for n in (z + d, z - d) if 0 <= n < s.n_slices and n not in have]
        if not slices:  # everything cached: show it
            self.last_encoding = s.encoding(z) or self.last_encoding
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
        elif isinstance(value, Encoding):
            s.store(value)
            s.note_unmerged_time(value)
            if value.z == self.current_slice() and value.settings == s.settings:
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
                self._event(f"slice {value.z}: {value.stopped}")

    @_guarded
    def _on_done(self, job) -> None:
        self._inflight = None
        self._set_busy(False)
        if self._pending_segment and job.kind == "encode":
            self._pending_segment = False
            self.segment(explicit=False)
        if job.kind == "propagate":
            self._propagating = False
            n = int((self.session.mask > 0).any(axis=(1, 2)).sum())
            self._event(f"object propagated: on {n} slices; commit it with [C]")
            self._request_encode()

    @_guarded
    def _on_error(self, job, exc) -> None:
        from structsam.errors import StructSAMError

        self._inflight = None
        self._pending_segment = False
        self._propagating = False
        self._set_busy(False)
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

    def _set_busy(self, busy: bool, text: str = "") -> None:
        self.cancel_button.setEnabled(busy)
        if busy:
            self.progress.setRange(0, 0)
            self.progress.setFormat(text)
        else:
            self.progress.setRange(0, 1)
            self.progress.setValue(1 if self.last_encoding is not None else 0)
            self.progress.setFormat("idle")

    # ------------------------------------------------------------------ annotation

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
        prompts = self._current_prompts(z)
        note = self._prompt_note
        if not prompts:
            s.mask[z] = 0
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
        if s.settings.uses_prompts:
            text = (
                f"prompt inside the protected region: embedding reused, decoder only "
                f"({int(mask.sum())} px, score {score:.2f})"
            )
        else:
            text = f"mask: {int(mask.sum())} px on slice {z} (score {score:.2f})"
        self._event(text + (f" · {note}" if note else ""))

    @_guarded
    def segment_volume(self) -> None:
        """[Shift-S] Propagate the current object through the volume in a worker."""
        s = self.session
        if self.image_layer is None or not s.is_3d:
            self._event("Segment volume works on 3D (Z, Y, X) images", error=True)
            return
        z = self.current_slice()
        seed = s.mask[z] > 0
        if not seed.any():
            self.segment(explicit=False)
            seed = s.mask[z] > 0
        if not seed.any():
            self._event("segment the object on this slice first [S], then [Shift-S]", True)
            return
        known = {i: s.encoding(i) for i in s.encoded_slices()}
        self._propagating = True
        self._pending_segment = False
        self._inflight = None
        self.runner.start("propagate", propagate_job, s, z, seed.copy(), s.settings, known)
        self._set_busy(True, "propagating")

    @_guarded
    def commit(self) -> None:
        """[C] Current object -> a new label in 'structsam objects'; clears the prompts."""
        if self.image_layer is None:
            return
        if self._propagating:
            self._event("wait for the propagation to finish (or cancel it) before committing")
            return
        done = self.session.commit()
        note = self._save_after("commit") if done is not None else None
        self.layers[L.OBJECTS].refresh()
        self._clear_prompt_layers()
        self.layers[L.MASK].refresh()
        if done is None:
            self._event("nothing new to commit (the mask is empty or already committed)")
        elif note is not None:  # else the save failure is on the status line
            self._event(
                f"committed object {done.label} ({len(done.index)} px), {note}; undo: Ctrl-Z"
            )

    @_guarded
    def undo(self) -> None:
        """[Ctrl-Z] Take back the last commit; other objects stay as they are."""
        if self.image_layer is None:
            return
        done = self.session.undo()
        note = self._save_after("undo") if done is not None else None
        self.layers[L.OBJECTS].refresh()
        if done is None:
            self._event("nothing to undo")
        elif note is not None:
            self._event(f"removed object {done.label}, {note}")

    def _save_after(self, what: str) -> str | None:
        """Autosave after a commit or undo; a failure is reported (the object stays in the
        layer) and gives None."""
        try:
            return self._save_objects()
        except Exception as exc:
            self._report(f"saving after the {what}", exc)
            return None

    @_guarded
    def clear_prompts(self) -> None:
        """[Shift-C] Remove all points and boxes and the current object."""
        if self.image_layer is None:
            return
        self._clear_prompt_layers()
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
        self._prompt_timer.start()

    # ------------------------------------------------------------------ overlays and status

    @_guarded
    def _apply_visibility(self, *_) -> None:
        if not self.layers:
            return
        self.layers[L.MASK].visible = self.show_mask.isChecked()
        self.layers[L.MERGE_MAP].visible = self.show_merge.isChecked()
        self.layers[L.PROTECTED].visible = self.show_protected.isChecked()
        opacity = self.opacity_slider.value() / 100
        self.layers[L.MERGE_MAP].opacity = opacity
        self.layers[L.PROTECTED].opacity = min(1.0, 2 * opacity)  # thin outlines need more

    def _update_blocks(self, enc: Encoding) -> None:
        items = [f"block {i.block} · stage {i.stage} · {i.grid_shape[0]}x{i.grid_shape[1]}"
                 for i in enc.merge_info]  # fmt: skip
        old = [self.block_combo.itemText(i) for i in range(self.block_combo.count())]
        if items != old:
            index = self.block_combo.currentIndex()
            self.block_combo.blockSignals(True)
            self.block_combo.clear()
            self.block_combo.addItems(items)
            self.block_combo.setCurrentIndex(min(max(index, 0), len(items) - 1))
            self.block_combo.blockSignals(False)

    def merge_tokens(self) -> tuple[int, int] | None:
        """(kept, total) tokens of the shown block's merge map, None without merging."""
        enc = self.session.encoding(self.current_slice())
        if enc is None or not enc.merge_info:
            return None
        info = enc.merge_info[min(max(self.block_combo.currentIndex(), 0), len(enc.merge_info) - 1)]
        return info.tokens_after, info.tokens_before

    def _update_overlays(self) -> None:
        if not self.layers:
            return
        z = self.current_slice()
        enc = self.session.encoding(z)
        merge, prot = self.layers[L.MERGE_MAP], self.layers[L.PROTECTED]
        is_3d = self.session.is_3d
        if self._overlay_z is not None:  # clear what the last update drew
            if is_3d:
                merge.data[self._overlay_z] = 0
                prot.data[self._overlay_z] = 0
            else:
                merge.data[...] = 0
                prot.data[...] = 0
            self._overlay_z = None
        if enc is not None and enc.merge_info:
            self._update_blocks(enc)
            block = min(max(self.block_combo.currentIndex(), 0), len(enc.merge_info) - 1)
            mmap, protected, _, _ = L.merge_overlays(enc, block)
            if is_3d:
                merge.data[z] = mmap
                prot.data[z] = protected
            else:
                merge.data[...] = mmap
                prot.data[...] = protected
            self._overlay_z = z
        elif enc is not None:
            self.block_combo.clear()
        merge.refresh()
        prot.refresh()

    def _update_status(self) -> None:
        s = self.session
        if self.image_layer is None:
            self.status.setText("choose an image layer")
            return
        z = self.current_slice()
        enc = s.encoding(z)
        settings = s.settings
        parts = [f"slice {z}/{s.n_slices - 1}" if s.is_3d else "2D image"]
        if enc is None:
            parts.append("not encoded yet")
        elif enc.merge_info:
            kept, total = enc.tokens()
            shown = self.merge_tokens()
            parts.append(
                f"tokens kept: {kept / total:.0%} over merged blocks"
                + (f" (shown block {shown[0]}/{shown[1]})" if shown else "")
            )
        else:
            parts.append("no merging (all tokens kept)")
        stats = s.stats(settings)
        if stats is not None and stats.flops_saved is not None:
            parts.append(
                f"encoder FLOPs saved: {stats.flops_saved:.1%} "
                f"({stats.flops / 1e9:.1f} of {stats.dense_flops / 1e9:.1f} GFLOP)"
            )
        elif settings.merging:
            parts.append("FLOPs: counting…")
        if enc is not None and enc.from_cache:
            parts.append(f"embedding from the disk cache (encoded in {enc.seconds:.2f} s)")
        elif enc is not None:
            precision = getattr(enc.model, "precision", "fp32")
            auto = " (auto)" if settings.precision == "auto" else ""
            timing = f"last encode {enc.seconds:.2f} s in {precision}{auto}"
            if stats is not None and stats.unmerged_seconds and settings.merging:
                ratio = stats.unmerged_seconds / enc.seconds
                timing += f", unmerged {stats.unmerged_seconds:.2f} s ({ratio:.2f}x)"
            parts.append(timing)
        if s.cache_note:
            parts.append(s.cache_note)
        self.status.setText(" · ".join(parts))

    def _event(self, text: str, error: bool = False, detail: str | None = None) -> None:
        """One line under the status (its tooltip has the full text, or ``detail``); errors
        also go to napari's notifications."""
        self.event_label.setText(text)
        self.event_label.setToolTip(detail or text)
        self.event_label.setStyleSheet("color: #ff6b6b;" if error else "")
        if error:
            from napari.utils.notifications import show_warning

            show_warning(f"StructSAM: {text}")

    def _report(self, where: str, exc: BaseException, prefix: str = "") -> None:
        """An error caught at a callback's edge: logged with its traceback and shown."""
        from structsam.errors import StructSAMError

        log.error("StructSAM: %s failed", where, exc_info=exc)
        if isinstance(exc, StructSAMError | SessionError):
            text = f"{prefix}{exc}"  # written for the user
        else:
            text = f"{prefix or where + ' failed: '}{type(exc).__name__}: {exc}"
        detail = "".join(traceback.format_exception(exc))
        if self._closed:
            return
        try:
            self._event(text, error=True, detail=detail)
        except RuntimeError:  # the widget's Qt side is gone
            pass

    @_guarded
    def _dims_moved(self, event=None) -> None:
        self._slice_timer.start()

    @_guarded
    def _block_chosen(self, index=None) -> None:
        self._update_overlays()

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


def _folder_row(form, label: str, placeholder: str, tip: str):
    """An "on" box beside a folder field, as one form row; returns (check box, line edit)."""
    row = QHBoxLayout()
    check = QCheckBox("on")
    check.setChecked(True)
    edit = QLineEdit()
    edit.setPlaceholderText(placeholder)
    for w in (check, edit):
        w.setToolTip(tip)
        row.addWidget(w)
    form.addRow(label, row)
    return check, edit
