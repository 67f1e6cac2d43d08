"""The widget's status line, event line, progress bar and merge overlays (GUI thread only)."""

from __future__ import annotations

import functools
import logging
import traceback

from qtpy.QtCore import Qt

from . import _layers as L
from ._session import SessionError

log = logging.getLogger("napari_structsam")


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


class DisplayMixin:
    """What the widget shows about the session: status, events, overlays, busy state."""

    _merge_colormap: tuple | None = None  # (layer id, colormap id) last set

    def _set_busy(self, busy: bool, text: str = "") -> None:
        self.cancel_button.setEnabled(busy)
        if busy:
            self.progress.setRange(0, 0)
            self.progress.setFormat(text)
        else:
            self.progress.setRange(0, 1)
            self.progress.setValue(1 if self.last_encoding is not None else 0)
            self.progress.setFormat("idle")

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

    def _update_blocks(self, enc) -> None:
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

    def _clear_overlays(self) -> None:
        """Take down what the last overlay update drew (a slice of some plane)."""
        if self._overlay_z is None or not self.layers:
            self._overlay_z = None
            return
        plane, z = self._overlay_z
        for name in (L.MERGE_MAP, L.PROTECTED):
            data = self.layers[name].data
            if self.session.is_3d and data.ndim == 3:
                plane.view(data)[z] = 0
            else:
                data[...] = 0
            self.layers[name].refresh()
        self._overlay_z = None
        self.legend.setText("")

    def _update_overlays(self) -> None:
        """The merge map of the shown slice: by default one hue by group size (legend in the
        widget), or random colours per group; the protected region as an outline."""
        if not self.layers:
            return
        self._clear_overlays()
        s = self.session
        z = self.current_slice()
        enc = s.encoding(z)
        if enc is None or not enc.merge_info:
            if enc is not None:
                self.block_combo.clear()
            return
        self._update_blocks(enc)
        block = min(max(self.block_combo.currentIndex(), 0), len(enc.merge_info) - 1)
        values, outline, legend = L.merge_overlays(enc, block, self.merge_style.currentText())
        px = s.pixels  # the embedding is of the square-pixel slice: map back to the plane's
        merge, prot = self.layers[L.MERGE_MAP], self.layers[L.PROTECTED]
        if self.merge_style.currentText() == "compression":
            colormap = L.compression_colormap(legend)
        else:
            colormap = L.groups_colormap()
        if self._merge_colormap != (id(merge), id(colormap)):  # each costs a texture rebuild
            merge.colormap = colormap
            self._merge_colormap = (id(merge), id(colormap))
        for layer, value in ((merge, values), (prot, outline)):
            target = s.plane.view(layer.data)[z] if s.is_3d else layer.data
            target[...] = px.to_original(value)
            layer.refresh()
        self._overlay_z = (s.plane, z)
        self.legend.setText(L.legend_html(legend) if legend else "random colour per group")

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
            parts.append("FLOPs: counting…" if self.runner.busy else "FLOPs: not counted yet")
        if enc is not None and enc.from_cache:
            parts.append(f"embedding from the disk cache (encoded in {enc.seconds:.2f} s)")
        elif enc is not None:
            precision = enc.precision
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
        self.event_label.setToolTip(text if detail is None else f"{text}\n\n{detail}")
        self.event_label.setStyleSheet("color: #ff6b6b;" if error else "")
        self._fit_event_line()
        if error:
            from napari.utils.notifications import show_warning

            show_warning(f"StructSAM: {text}")

    def _fit_event_line(self, *_) -> None:
        """Two lines, or (with "more" pressed) as many as the message takes; "more" shows
        only when the message is longer than two lines."""
        label = self.event_label
        lines = label.fontMetrics().lineSpacing()
        width = max(label.width(), 50)
        rect = label.fontMetrics().boundingRect(
            0, 0, width, 10_000, int(Qt.TextFlag.TextWordWrap), label.text()
        )
        needed = rect.height() + 4
        self.event_more.setVisible(needed > 2 * lines + 4 or self.event_more.isChecked())
        full = self.event_more.isChecked()
        label.setFixedHeight(min(needed, 12 * lines + 4) if full else 2 * lines + 4)

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
    def _block_chosen(self, index=None) -> None:
        self._update_overlays()
