"""The widget's controls: built once, then wired to its callbacks."""

from __future__ import annotations

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
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
)

from ._session import DEFAULT_RATE

SLIDER_DEBOUNCE_MS = 300
AUTOSAVE_PAINT_MS = 500  # brush strokes in the objects layer are saved after this pause

KEYS = {
    "segment": ("S", "Segment the object on this slice from its points and box"),
    "volume": ("Shift-S", "Propagate the current object slice by slice through the volume"),
    "commit": ("C", "Commit the current object as a new label (never overwrites others)"),
    "clear": ("Shift-C", "Clear all prompts and the current object"),
    "undo": ("Control-Z", "Undo the last commit or prompt edit"),
    "redo": ("Control-Shift-Z", "Redo what was undone (never over another object)"),
    "toggle": ("T", "Next point: toggle positive / negative"),
    "new": ("N", "New object: the next points (outside boxes) form another object"),
}


def _key_label(key: str) -> str:
    return key.replace("Control-", "Ctrl-")


class PanelMixin:
    """Layout and signal wiring of the dock widget."""

    def _build(self, models, methods, devices) -> None:
        root = QVBoxLayout(self)
        root.addWidget(self._model_box(models, devices))
        root.addWidget(self._merging_box(methods))
        root.addWidget(self._overlay_box())
        root.addWidget(self._annotate_box())
        self._status_rows(root)
        self._set_busy(False)
        self._update_rate_range(DEFAULT_RATE)
        self.session.settings = self.settings()

    def _model_box(self, models, devices) -> QGroupBox:
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
        return box

    def _merging_box(self, methods) -> QGroupBox:
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
        return box

    def _overlay_box(self) -> QGroupBox:
        box = QGroupBox("Overlays")
        grid = QGridLayout(box)
        self.show_mask = QCheckBox("mask")
        self.show_merge = QCheckBox("merge map")
        self.show_protected = QCheckBox("protected cells")
        self.show_protected.setToolTip(
            "Outline of the tokens the merge left alone: the prompt region in prompt-aware "
            "mode (StructSAM protects nothing else by default)"
        )
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
        grid.addWidget(QLabel("merge map"), 3, 0)
        self.merge_style = QComboBox()
        self.merge_style.addItems(["compression", "groups"])
        self.merge_style.setToolTip(
            "compression: one hue, stronger where more tokens were merged into one (legend "
            "below); groups: a random colour per merged group"
        )
        grid.addWidget(self.merge_style, 3, 1, 1, 2)
        self.legend = QLabel("")
        self.legend.setToolTip("Tokens per group: 1 = kept as it was, 4 = a 2x2 cell merged...")
        grid.addWidget(self.legend, 4, 0, 1, 3)
        return box

    def _annotate_box(self) -> QGroupBox:
        box = QGroupBox("Annotate")
        grid = QGridLayout(box)
        self.buttons = {}
        texts = {
            "segment": "Segment",
            "volume": "Segment volume",
            "commit": "Commit",
            "clear": "Clear prompts",
            "toggle": "Positive/negative",
            "new": "New object",
            "undo": "Undo",
            "redo": "Redo",
        }
        for i, (name, text) in enumerate(texts.items()):
            key, tip = KEYS[name]
            button = QPushButton(f"{text} [{_key_label(key)}]")
            button.setToolTip(f"{tip} [{_key_label(key)}]")
            self.buttons[name] = button
            grid.addWidget(button, i // 2, i % 2)
        return box

    def _status_rows(self, root) -> None:
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
        events = QHBoxLayout()
        events.addWidget(self.event_label, 1)
        self.event_more = QPushButton("more")
        self.event_more.setCheckable(True)
        self.event_more.setToolTip("Show the whole message (errors say how to fix them)")
        self.event_more.setVisible(False)
        events.addWidget(self.event_more, 0, Qt.AlignmentFlag.AlignTop)
        root.addLayout(events)
        root.addStretch(1)

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
        self.merge_style.currentIndexChanged.connect(self._block_chosen)
        actions = {
            "segment": lambda: self.segment(explicit=True),
            "volume": self.segment_volume,
            "commit": self.commit,
            "clear": self.clear_prompts,
            "undo": self.undo,
            "redo": self.redo,
            "toggle": self.toggle_label,
            "new": self.new_object,
        }
        self._actions = actions
        for name, func in actions.items():
            self.buttons[name].clicked.connect(lambda _=False, f=func: f())
        self.cancel_button.clicked.connect(self.cancel)
        self.event_more.toggled.connect(self._fit_event_line)

        layers = self.viewer.layers
        layers.events.inserted.connect(self._refresh_images)
        layers.events.removed.connect(self._refresh_images)
        self.viewer.dims.events.current_step.connect(self._dims_moved)
        self.viewer.dims.events.order.connect(self._order_changed)
        self.viewer.dims.events.ndisplay.connect(self._order_changed)
        for name, func in actions.items():
            key = KEYS[name][0]
            # overwrite: S and T are select/path modes of napari's points and shapes layers,
            # which the prompt layers re-bind (below) as micro-sam does
            self.viewer.bind_key(key, lambda _v, f=func: f(), overwrite=True)


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
