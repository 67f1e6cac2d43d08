"""The store of committed objects (structsam.annotations), without Qt."""

import os
import subprocess
import sys

import numpy as np
import pytest

from structsam.annotations import AnnotationStore, default_folder, image_key, merge_objects
from structsam.errors import StructSAMError


def labels_3d():
    objects = np.zeros((6, 40, 50), np.int32)
    objects[1:3, 5:15, 10:20] = 1
    objects[2:5, 20:30, 30:45] = 2
    return objects


def test_key_is_the_image_content():
    image = np.arange(64, dtype=np.float32).reshape(8, 8)
    assert image_key(image) == image_key(image.copy())
    assert image_key(image) == image_key(np.asfortranarray(image))  # layout does not count
    assert image_key(image) != image_key(image.astype(np.float64))  # dtype does
    assert image_key(image) != image_key(image.reshape(4, 16))  # shape does
    changed = image.copy()
    changed[3, 3] += 1
    assert image_key(image) != image_key(changed)


def test_default_folder_is_inside_the_embedding_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTSAM_CACHE_DIR", str(tmp_path / "cache"))
    assert default_folder() == tmp_path / "cache" / "annotations"
    assert AnnotationStore().folder == tmp_path / "cache" / "annotations"
    assert default_folder(tmp_path / "mine") == tmp_path / "mine" / "annotations"


@pytest.mark.parametrize("objects", [labels_3d(), labels_3d()[2]], ids=["3d", "2d"])
def test_save_and_load_round_trip(tmp_path, objects):
    store = AnnotationStore(tmp_path / "store")
    key = image_key(np.ones(objects.shape, np.uint8))
    path = store.save(key, objects, name="scan")
    assert path == store.path(key) and path.is_file()
    assert [p.name for p in store.folder.iterdir()] == [path.name]  # no temporary file left
    saved = store.load(key, shape=objects.shape)
    assert saved.objects.dtype == objects.dtype and np.array_equal(saved.objects, objects)
    assert saved.count == len(np.unique(objects)) - 1 and saved.name == "scan"
    assert store.load(key, shape=(1, 2, 3)) is None  # another shape: not this image's labels
    assert store.load(image_key(np.zeros(3))) is None
    (listed,) = store.list()
    assert listed.key == key and listed.objects is None and listed.shape == objects.shape


def test_saving_no_labels_removes_the_file_and_undo_updates_it(tmp_path):
    store = AnnotationStore(tmp_path)
    key = "a" * 64
    objects = labels_3d()
    store.save(key, objects)
    objects[objects == 2] = 0  # undo of the second commit
    store.save(key, objects)
    assert store.load(key).count == 1
    assert store.save(key, np.zeros_like(objects)) is None
    assert not store.path(key).exists() and store.load(key) is None and store.list() == []
    assert not store.delete(key)


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    store = AnnotationStore(tmp_path)
    key = "b" * 64
    first = labels_3d()
    store.save(key, first)

    def broken(fh, **fields):
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", broken)
    with pytest.raises(StructSAMError, match="No space left"):
        store.save(key, first * 2)
    assert os.listdir(tmp_path) == [store.path(key).name]
    assert np.array_equal(store.load(key).objects, first)


def test_a_killed_writer_never_leaves_a_torn_file(tmp_path):
    """A process killed while saving: the file holds the last complete save."""
    store = AnnotationStore(tmp_path)
    key = "c" * 64
    store.save(key, labels_3d())
    code = (
        "import os, numpy as np\n"
        "from structsam.annotations import AnnotationStore\n"
        "def die(fh, **fields):\n"
        "    fh.write(b'PK partial'); fh.flush(); os._exit(9)\n"
        "np.savez_compressed = die\n"
        f"AnnotationStore({str(tmp_path)!r}).save({key!r}, np.ones((6, 40, 50), np.int32))\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert np.array_equal(store.load(key).objects, labels_3d())
    (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    os.utime(tmp, (0, 0))  # an old leftover goes at the next save
    store.save(key, labels_3d())
    assert not tmp.exists()


def test_an_unreadable_file_is_reported_and_kept(tmp_path):
    store = AnnotationStore(tmp_path)
    key = "d" * 64
    store.path(key).write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="could not be read"):
        assert store.load(key) is None
    with pytest.raises(StructSAMError, match="could not be read"):
        store.load(key, strict=True)
    assert store.path(key).exists()  # perhaps the only copy: never deleted
    assert store.list() == []


def test_bad_keys_and_labels_are_refused(tmp_path):
    store = AnnotationStore(tmp_path)
    with pytest.raises(StructSAMError, match="not an image key"):
        store.path("../../etc/passwd")
    with pytest.raises(StructSAMError, match="integer"):
        store.save("e" * 64, np.ones((4, 4), np.float32))


def test_merge_fills_an_empty_layer_and_never_overwrites_labels():
    saved = labels_3d()
    fresh = np.zeros_like(saved)
    assert merge_objects(fresh, saved) == 2 and np.array_equal(fresh, saved)
    assert merge_objects(fresh, saved) == 0  # already there: nothing added twice

    mine = np.zeros_like(saved)
    mine[1, 0:10, 0:15] = 1  # the user's own object 1, overlapping saved object 1
    before = mine.copy()
    assert merge_objects(mine, saved) == 2
    assert np.array_equal(mine[before > 0], before[before > 0])  # nothing overwritten
    assert set(np.unique(mine)) == {0, 1, 2, 3}  # saved objects got new labels
    assert np.array_equal(mine == 3, saved == 2)
    assert ((mine == 2) == ((saved == 1) & (before == 0))).all()
    with pytest.raises(StructSAMError, match="shape"):
        merge_objects(mine, saved[0])
