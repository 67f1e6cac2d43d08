"""Planes, objects, commits and undo/redo of structsam.interactive without Qt."""

import numpy as np
import pytest

from structsam.errors import StructSAMError
from structsam.interactive.objects import (
    History,
    commit,
    group_prompts,
    label_map,
    redo_commit,
    restore_current,
    undo_commit,
)
from structsam.interactive.plane import Plane


def test_plane_from_the_displayed_axes():
    assert Plane.shown((1, 2)).order == (0, 1, 2) and Plane.shown((1, 2)).name == "axial"
    sag = Plane.shown((0, 1), spacing=(2.0, 1.0, 0.5))
    assert sag.order == (2, 0, 1) and sag.name == "sagittal"
    assert Plane.shown((0, 2)).name == "coronal"
    assert Plane.shown((1, 0)).name == "sagittal (transposed)"
    assert Plane.shown((3, 4), ndim=5).order == (0, 1, 2)  # the last three of five axes
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    view = sag.view(vol)
    assert view.shape == (6, 4, 5) and np.array_equal(view[3], vol[:, :, 3])
    view[3, 0, 0] = -1  # a view: writes reach the volume
    assert vol[0, 0, 3] == -1
    # z spacing 2, y 1 -> rows doubled; square pixels keep the finer (0.5) only in-plane
    assert sag.pixels(vol.shape).square_shape == (8, 5)
    coords = np.array([[1.0, 2.0, 3.0]])
    assert sag.slice_index(coords).tolist() == [3] and sag.to_xy(coords).tolist() == [[2, 1]]
    assert Plane().key != sag.key  # embeddings of different planes never mix
    with pytest.raises(StructSAMError, match="three different"):
        Plane(0, 0, 2)
    with pytest.raises(StructSAMError, match="positive"):
        Plane(spacing=(1, 0, 1))


def test_prompts_grouped_per_object():
    boxes = [[0, 0, 10, 10], [20, 20, 30, 30]]
    xy = [[5, 5], [25, 25], [50, 50], [60, 60]]
    groups = group_prompts(xy, [1, 0, 1, 1], boxes)
    assert len(groups) == 3  # two boxes with their points, the free points as one object
    assert groups[0]["point_coords"].tolist() == [[5, 5]]
    assert groups[1]["point_labels"].tolist() == [0]
    assert "box" not in groups[2] and len(groups[2]["point_coords"]) == 2
    tagged = group_prompts(xy[2:], [1, 1], [], tags=[7, 3])
    assert [g["point_coords"].tolist() for g in tagged] == [[[50, 50]], [[60, 60]]]
    assert group_prompts([], [], []) == []


def test_commit_separate_labels_undo_redo_never_overwrite():
    objects = np.zeros((3, 8, 8), np.int32)
    objects[0, 0, 0] = 5  # an earlier object
    mask = np.zeros_like(objects, np.uint8)
    mask[1, :2, :2] = 1
    mask[1, 5:, 5:] = 2
    mask[0, 0, :2] = 1  # one pixel is object 5's: it stays 5's
    before = mask.copy()
    done = commit(objects, mask)
    assert done.labels == [6, 7] and not mask.any()
    restore_current(mask, done)  # the whole current object, the pixel left to 5 included
    assert np.array_equal(mask, before)
    mask[...] = 0
    assert objects[0, 0, 0] == 5 and (objects == 6).sum() == 5 and (objects == 7).sum() == 9
    after = objects.copy()
    assert undo_commit(objects, done) == 14
    objects[1, 0, 0] = 9  # painted meanwhile
    assert redo_commit(objects, done) == 13 and objects[1, 0, 0] == 9
    objects[1, 0, 0] = 0
    undo_commit(objects, done)
    redo_commit(objects, done)
    assert np.array_equal(objects, after)
    assert commit(objects, np.zeros_like(mask)) is None
    lm = label_map(np.array([[[1, 1]], [[0, 1]]], bool))
    assert lm.tolist() == [[1, 1]]  # overlap goes to the earlier object


def test_history_undo_redo_and_new_steps_clear_redo():
    h = History(limit=3)
    for step in "abcd":
        h.push(step)
    assert h.done == ["b", "c", "d"]
    assert h.undo() == "d" and h.undo() == "c" and h.redo() == "c"
    h.push("e")
    assert h.redo() is None and h.done == ["b", "c", "e"]


def test_session_propagates_in_the_sagittal_plane_like_the_library():
    """The plugin's session on the sagittal plane of the MNI152 volume with 2 mm slices: each
    propagated slice equals structsam.propagate on the same square-pixel slices."""
    import structsam
    from napari_structsam._prompts import Prompts, box_of
    from napari_structsam._sample_data import mni152_volume_sample
    from napari_structsam._session import Session

    data = mni152_volume_sample()[0][0]
    s = Session()
    s.set_image(data, spacing=(2.0, 1.0, 1.0))
    s.set_plane(Plane.shown((0, 1)))
    x = 88
    s.ensure_encoded(x)
    mask, _ = s.segment(x, Prompts(box=np.array([70.0, 72.0, 135.0, 100.0])))
    seed = mask > 0
    results = s.run_propagation(x, max_slices=2)
    visited = sorted({r.z for r in results})
    assert visited == [x - 2, x - 1, x + 1, x + 2]
    assert s.mask[:, :, x - 1].any() and not s.mask[:, :, x + 3].any()  # volume order kept

    predictor = structsam.Predictor(s.service.model(s.settings))
    ref = structsam.propagate(
        predictor, s.plane.view(data), x, box=box_of(seed), spacing=(1.0, 2.0, 1.0),
        max_slices=2,
    )  # fmt: skip
    for z in visited:
        assert np.array_equal(s.plane_mask[z] > 0, ref.mask[z]), z
