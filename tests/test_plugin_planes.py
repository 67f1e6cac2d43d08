"""The widget in the sagittal and coronal planes of the MNI152 volume, several objects per
slice, undo/redo and the slider's debouncing (pytest-qt, a real viewer)."""

import numpy as np
import pytest

from napari_structsam import _layers as L
from napari_structsam._sample_data import mni152_slice_sample, mni152_volume_sample
from napari_structsam._widget import StructSAMWidget
from structsam.eval.metrics import iou
from structsam.transforms import SquarePixels

WAIT_MS = 240_000
SCALE = (2.0, 1.0, 1.0)  # anisotropic voxels: slices across z are resampled to square pixels


def wait_idle(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.runner.busy, timeout=WAIT_MS)


def reference_mask(widget, image2d, spacing, box_xy):
    """The library alone on the same resampled slice: structsam.Predictor of a model patched
    as the widget's settings say."""
    import structsam

    st = widget.session.settings
    model = structsam.load_model(st.model, device=st.device, precision=st.precision)
    structsam.patch(model, st.method, st.rate)
    sq = SquarePixels.for_slice(image2d.shape, spacing)
    predictor = structsam.Predictor(model)
    emb = predictor.encode(sq.to_square(image2d))
    masks, _, _ = predictor.predict(
        box=sq.boxes_to_square(np.asarray(box_xy, float)), embedding=emb
    )
    return sq.to_original(masks[0])


def show_plane(viewer, qtbot, widget, order, axis, index):
    viewer.dims.order = order
    viewer.dims.set_current_step(axis, index)
    qtbot.waitUntil(lambda: widget.session.plane.axis == axis, timeout=10_000)
    qtbot.waitUntil(lambda: widget.current_slice() == index, timeout=10_000)
    qtbot.wait(200)  # the slice timer
    wait_idle(qtbot, widget)


def add_box(viewer, plane, index, x0, y0, x1, y1):
    """A rectangle on slice ``index`` of ``plane``, corners in the plane's (x, y) pixels."""
    corners = []
    for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)):
        v = [0.0, 0.0, 0.0]
        v[plane.axis], v[plane.rows], v[plane.cols] = index, y, x
        corners.append(v)
    viewer.layers[L.BOXES].add_rectangles(np.array(corners))


@pytest.fixture
def volume_widget(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    data, meta, _ = mni152_volume_sample()[0]
    viewer.add_image(data, **dict(meta, scale=SCALE))
    widget = StructSAMWidget(viewer)
    viewer.window.add_dock_widget(widget)
    wait_idle(qtbot, widget)
    yield viewer, widget, data
    widget.close_session()


def test_sagittal_and_coronal_masks_agree_with_the_library(volume_widget, qtbot):
    viewer, widget, data = volume_widget
    # sagittal: rows z (2 mm), columns y; a box around the lateral ventricle at x = 88
    show_plane(viewer, qtbot, widget, (2, 0, 1), 2, 88)
    plane = widget.session.plane
    assert plane.name == "sagittal" and widget.session.pixels.square_shape == (378, 233)
    box = (70.0, 72.0, 135.0, 100.0)  # x0 (y), y0 (z), x1, y1
    add_box(viewer, plane, 88, *box)
    qtbot.waitUntil(lambda: viewer.layers[L.MASK].data[:, :, 88].any(), timeout=WAIT_MS)
    wait_idle(qtbot, widget)
    got = viewer.layers[L.MASK].data[:, :, 88] > 0
    ref = reference_mask(widget, data[:, :, 88], (SCALE[0], SCALE[1]), box)
    assert ref.sum() > 50 and iou(got, ref) >= 0.99, (got.sum(), ref.sum(), iou(got, ref))
    assert viewer.layers[L.MERGE_MAP].data[:, :, 88].max() > 1  # the overlay is on this plane
    assert "tokens per group" in widget.legend.text()
    # [Shift-S] in this plane: slices across x, the stop reasons shown at the end
    widget.segment_volume()
    assert widget.runner.current.kind == "propagate"
    wait_idle(qtbot, widget)
    across = np.flatnonzero(viewer.layers[L.MASK].data.any(axis=(0, 1)))
    assert len(across) >= 6 and 88 in across and np.ptp(across) == len(across) - 1
    text = widget.event_label.text()
    assert "propagated" in text and "stopped at slice" in text, text

    widget.clear_prompts()
    # coronal: rows z, columns x, at y = 110
    show_plane(viewer, qtbot, widget, (1, 0, 2), 1, 110)
    plane = widget.session.plane
    assert plane.name == "coronal"
    box = (72.0, 70.0, 126.0, 100.0)
    add_box(viewer, plane, 110, *box)
    qtbot.waitUntil(lambda: viewer.layers[L.MASK].data[:, 110].any(), timeout=WAIT_MS)
    wait_idle(qtbot, widget)
    got = viewer.layers[L.MASK].data[:, 110] > 0
    ref = reference_mask(widget, data[:, 110], (SCALE[0], SCALE[2]), box)
    assert ref.sum() > 50 and iou(got, ref) >= 0.99, (got.sum(), ref.sum(), iou(got, ref))


def test_two_boxes_two_labels_then_undo_redo_restores_exactly(volume_widget, qtbot):
    viewer, widget, _ = volume_widget
    show_plane(viewer, qtbot, widget, (1, 0, 2), 1, 110)
    plane = widget.session.plane
    add_box(viewer, plane, 110, 74.0, 72.0, 97.0, 98.0)  # left and right of the midline
    add_box(viewer, plane, 110, 100.0, 72.0, 124.0, 98.0)
    qtbot.waitUntil(lambda: set(np.unique(viewer.layers[L.MASK].data)) == {0, 1, 2},
                    timeout=WAIT_MS)  # fmt: skip
    wait_idle(qtbot, widget)
    objects = viewer.layers[L.OBJECTS]
    before = objects.data.copy()
    store = widget._annotation_store()

    def autosaved():
        got = store.load(widget._image_key, shape=objects.data.shape)
        return np.zeros_like(objects.data) if got is None else got.objects

    current = viewer.layers[L.MASK].data.copy()
    widget.commit()
    assert set(np.unique(objects.data)) == {0, 1, 2}  # two committed labels
    assert not viewer.layers[L.BOXES].data and not viewer.layers[L.MASK].data.any()
    after = objects.data.copy()
    assert np.array_equal(autosaved(), after)
    widget.undo()  # [Ctrl-Z]: the labels go, the current objects and their boxes come back
    assert np.array_equal(objects.data, before) and np.array_equal(autosaved(), before)
    assert np.array_equal(viewer.layers[L.MASK].data, current)
    assert len(viewer.layers[L.BOXES].data) == 2
    qtbot.wait(500)  # the prompt timer decodes the restored boxes
    wait_idle(qtbot, widget)
    assert np.array_equal(viewer.layers[L.MASK].data, current)  # re-decoded: the same
    widget.redo()  # [Ctrl-Shift-Z]: committed again, prompts gone as after the commit
    assert np.array_equal(objects.data, after) and np.array_equal(autosaved(), after)
    assert not viewer.layers[L.BOXES].data
    qtbot.waitUntil(lambda: not viewer.layers[L.MASK].data.any(), timeout=WAIT_MS)
    # a prompt edit is undone and redone too
    add_box(viewer, plane, 110, 60.0, 60.0, 90.0, 90.0)
    qtbot.wait(100)
    assert len(viewer.layers[L.BOXES].data) == 1
    widget.undo()
    assert len(viewer.layers[L.BOXES].data) == 0
    widget.redo()
    assert len(viewer.layers[L.BOXES].data) == 1
    assert np.array_equal(objects.data, after)  # prompt steps never touch committed labels
    bound = {str(k) for k in viewer.keymap}
    assert {"Ctrl+Z", "Ctrl+Shift+Z", "N"} <= bound
    # points tagged to objects: [N] starts another object
    widget.clear_prompts()
    points = viewer.layers[L.POINTS]
    points.add(np.array([[85.0, 110.0, 85.0]]))
    widget.new_object()  # [N]
    points.add(np.array([[85.0, 110.0, 110.0]]))
    objects_now = widget._current_objects()
    assert [o.points.tolist() for o in objects_now] == [[[85.0, 85.0]], [[110.0, 85.0]]]
    widget.undo()  # the second point goes, its object with it
    assert len(widget._current_objects()) == 1


def slice_widget(make_napari_viewer, qtbot):
    """A viewer with the MNI152 sample slice and the widget docked, its first encode done."""
    viewer = make_napari_viewer()
    data, meta, _ = mni152_slice_sample()[0]
    viewer.add_image(data, **meta)
    widget = StructSAMWidget(viewer)
    viewer.window.add_dock_widget(widget)
    wait_idle(qtbot, widget)
    return viewer, widget


def test_a_burst_of_slider_moves_is_one_encode(make_napari_viewer, qtbot, monkeypatch):
    viewer, widget = slice_widget(make_napari_viewer, qtbot)
    service = widget.session.service
    calls = []
    encode = service.encode

    def counting(image, settings, *args, **kwargs):
        calls.append(settings.rate)
        return encode(image, settings, *args, **kwargs)

    monkeypatch.setattr(service, "encode", counting)
    for i in range(10):  # ten moves within one second, as a drag does
        widget.set_rate(0.30 + 0.02 * i)
        qtbot.wait(90)
    qtbot.waitUntil(lambda: widget.runner.busy, timeout=5_000)
    wait_idle(qtbot, widget)
    qtbot.wait(1_000)  # nothing more comes
    wait_idle(qtbot, widget)
    assert calls == [pytest.approx(0.48)]
    assert widget.last_encoding.settings.rate == pytest.approx(0.48)
    widget.close_session()


def test_a_model_change_clears_overlays_and_status_and_the_error_reads_whole(
    make_napari_viewer, qtbot, monkeypatch, tmp_path
):
    monkeypatch.setenv("STRUCTSAM_CACHE", str(tmp_path))  # no vit_b checkpoint there
    viewer, widget = slice_widget(make_napari_viewer, qtbot)
    assert viewer.layers[L.MERGE_MAP].data.any() and widget.legend.text()
    widget.model_combo.setCurrentText("vit_b")
    assert not viewer.layers[L.MERGE_MAP].data.any()  # the old model's overlays are gone
    assert not viewer.layers[L.PROTECTED].data.any() and not widget.legend.text()
    qtbot.waitUntil(lambda: "no checkpoint" in widget.event_label.text(), timeout=60_000)
    wait_idle(qtbot, widget)
    assert "counting" not in widget.status.text()
    text = widget.event_label.text()
    assert "download_checkpoint" in text  # the fix is part of the message...
    assert widget.event_more.isVisibleTo(widget)  # ...longer than two lines: "more" shows it
    short = widget.event_label.height()
    widget.event_more.setChecked(True)
    assert widget.event_label.height() > short
    assert "download_checkpoint" in widget.event_label.toolTip()
    widget.close_session()
