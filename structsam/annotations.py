"""Committed objects kept on disk as they are made, keyed by the image they belong to.

An annotation tool calls :meth:`AnnotationStore.save` after every change of its label array
(a commit, an undo); each save replaces the image's file atomically (temporary file, then
rename), so a crash or a killed process leaves either the previous or the new state, never a
torn file. Reopening the same image (same bytes, shape and dtype: :func:`image_key`) finds the
file again with :meth:`AnnotationStore.load`; :func:`merge_objects` adds the saved objects to a
label array without overwriting any label already in it.

A file ``<folder>/<image key>.objects.npz`` holds the labels cropped to their bounding box
(narrowest integer dtype), the full shape and dtype, and the image's name and save time. The
default folder is ``annotations`` inside the embedding cache folder
(:func:`structsam.cache.default_cache_folder`: ``$STRUCTSAM_CACHE_DIR`` or
``~/.cache/structsam/embeddings``); the cache's size limit never evicts it.

No Qt, no napari: the plugin's widget only calls this module.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import StructSAMError

__all__ = [
    "AnnotationStore",
    "SavedObjects",
    "default_folder",
    "image_key",
    "merge_objects",
]

FORMAT = 1
SUFFIX = ".objects.npz"
_KEY = re.compile(r"^[0-9a-f]{64}$")
_LABEL_DTYPES = (np.uint8, np.uint16, np.uint32, np.int64)
# Temporary files of a writer killed mid-save are removed once this old (seconds).
_STALE_TMP_SECONDS = 3600.0


def image_key(image) -> str:
    """SHA-256 (64 hex digits) of an image's bytes, shape and dtype: the embedding cache's own
    image hash, so both stores agree on what "the same image" is."""
    from .identity import sha256_array

    return sha256_array(np.asarray(image))


def default_folder(cache_folder: str | os.PathLike | None = None) -> Path:
    """``annotations`` inside ``cache_folder`` (default: the embedding cache folder)."""
    if cache_folder:
        return Path(cache_folder).expanduser() / "annotations"
    from .cache import default_cache_folder

    return default_cache_folder() / "annotations"


@dataclass
class SavedObjects:
    """One image's saved labels; ``objects`` is None in :meth:`AnnotationStore.list`."""

    key: str
    path: Path
    shape: tuple[int, ...]
    count: int  # distinct non-zero labels
    name: str  # the image's name when it was saved (informative only)
    saved_at: float  # seconds since the epoch
    objects: np.ndarray | None = None


def _narrow(arr: np.ndarray) -> np.ndarray:
    top = int(arr.max()) if arr.size else 0
    for dtype in _LABEL_DTYPES:
        if top <= np.iinfo(dtype).max:
            return arr.astype(dtype, copy=False)
    return arr


def _count_labels(arr: np.ndarray) -> int:
    """Distinct non-zero labels; bincount for narrow dtypes (np.unique sorts: slow on volumes)."""
    if arr.dtype.itemsize <= 2 and arr.dtype.kind == "u":
        return int(np.count_nonzero(np.bincount(arr.ravel())[1:]))
    return int(len(np.unique(arr[arr != 0])))


def _bbox(arr: np.ndarray) -> list[tuple[int, int]] | None:
    """Per-axis [start, stop) of the non-zero voxels, None when there are none."""
    out = []
    for axis in range(arr.ndim):
        other = tuple(a for a in range(arr.ndim) if a != axis)
        hit = np.flatnonzero(arr.any(axis=other) if other else arr)
        if not len(hit):
            return None
        out.append((int(hit[0]), int(hit[-1]) + 1))
    return out


class AnnotationStore:
    """A folder of saved label arrays, one file per image (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder).expanduser() if folder else default_folder()

    def __repr__(self) -> str:
        return f"AnnotationStore({str(self.folder)!r})"

    def path(self, key: str) -> Path:
        if not _KEY.match(str(key)):
            raise StructSAMError(f"not an image key: {key!r}")
        return self.folder / f"{key}{SUFFIX}"

    def save(self, key: str, objects, name: str = "") -> Path | None:
        """Write ``objects`` (an integer label array, 0 = background) for image ``key``
        atomically. With no label left the file is removed and None returned."""
        from .io import _atomic_write

        arr = np.asarray(objects)
        if arr.dtype.kind not in "iub":
            raise StructSAMError(f"labels must be an integer array, got dtype {arr.dtype}")
        path = self.path(key)
        box = _bbox(arr)
        if box is None:
            self.delete(key)
            return None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StructSAMError(
                f"cannot create the annotation folder {self.folder}: {exc.strerror or exc}"
            ) from exc
        crop = _narrow(arr[tuple(slice(a, b) for a, b in box)])
        fields = {
            "format": np.array(FORMAT),
            "key": np.array(key),
            "shape": np.array(arr.shape, np.int64),
            "dtype": np.array(arr.dtype.str),
            "bbox": np.array(box, np.int64).reshape(-1, 2),
            "crop": crop,
            "count": np.array(_count_labels(crop)),
            "name": np.array(str(name)),
            "saved_at": np.array(time.time()),
        }

        def writer(tmp: Path) -> None:
            with open(tmp, "xb") as fh:  # a file object: numpy appends no second suffix
                np.savez_compressed(fh, **fields)

        try:
            _atomic_write(path, writer)
        except OSError as exc:
            raise StructSAMError(f"cannot save objects to {path}: {exc.strerror or exc}") from exc
        self._remove_stale_tmp()
        return path

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        for tmp in self.folder.glob(f".*{SUFFIX}.*.tmp.npz"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                    tmp.unlink()

    def _read(self, path: Path, with_objects: bool) -> SavedObjects:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format"]) != FORMAT:
                raise ValueError(f"unknown format {int(data['format'])}")
            shape = tuple(int(v) for v in data["shape"])
            saved = SavedObjects(
                key=str(data["key"]),
                path=path,
                shape=shape,
                count=int(data["count"]),
                name=str(data["name"]),
                saved_at=float(data["saved_at"]),
            )
            if with_objects:
                full = np.zeros(shape, np.dtype(str(data["dtype"])))
                bbox = data["bbox"]
                crop = data["crop"]
                where = tuple(slice(int(a), int(b)) for a, b in bbox)
                if len(where) != len(shape) or full[where].shape != crop.shape:
                    raise ValueError("bounding box and crop do not match the shape")
                full[where] = crop
                saved.objects = full
        return saved

    def load(
        self, key: str, shape: tuple[int, ...] | None = None, strict: bool = False
    ) -> SavedObjects | None:
        """The objects saved for image ``key``, or None: none saved, another ``shape``, or an
        unreadable file, which is left in place (it may be someone's only copy) with a warning,
        or with a StructSAMError when ``strict``."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            saved = self._read(path, with_objects=True)
            if saved.key != key:
                raise ValueError("the file belongs to another image")
        except Exception as exc:  # truncated or foreign file: many exception types
            message = (
                f"saved objects {path} could not be read ({type(exc).__name__}: {exc}); "
                "they were not restored"
            )
            if strict:
                raise StructSAMError(message) from exc
            warnings.warn(message, stacklevel=2)
            return None
        if shape is not None and tuple(shape) != saved.shape:
            return None
        return saved

    def delete(self, key: str) -> bool:
        """Remove image ``key``'s file; False when there was none."""
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def list(self) -> list[SavedObjects]:
        """Every readable file in the folder (without the arrays), newest first."""
        out = []
        if not self.folder.is_dir():
            return out
        for path in self.folder.glob(f"*{SUFFIX}"):
            if not _KEY.match(path.name[: -len(SUFFIX)]):
                continue
            with contextlib.suppress(Exception):
                out.append(self._read(path, with_objects=False))
        out.sort(key=lambda s: s.saved_at, reverse=True)
        return out


def merge_objects(current: np.ndarray, saved: np.ndarray) -> int:
    """Add the objects of ``saved`` to ``current`` in place, on background pixels only, and
    return how many were added.

    A saved object whose pixels already carry one label of ``current``, and only those pixels,
    is already there and skipped (reopening an image whose objects layer is still open). The
    others get new labels above ``current``'s largest, so no existing label is overwritten or
    merged with a restored one."""
    from scipy import ndimage

    current = np.asarray(current)
    saved = np.asarray(saved)
    if current.shape != saved.shape:
        raise StructSAMError(f"saved objects have shape {saved.shape}, the layer {current.shape}")
    if not saved.any():
        return 0
    if not current.any():  # the common case: a fresh layer takes the saved labels as they are
        current[...] = saved
        return len(np.unique(saved[saved > 0]))
    added = 0
    top = int(current.max())
    labels = np.unique(saved[saved > 0])
    boxes = ndimage.find_objects(saved.astype(np.int64, copy=False), max_label=int(labels[-1]))
    for label in labels:
        where = boxes[int(label) - 1]
        mine = saved[where] == label
        cur = current[where][mine]
        if cur.all() and (cur == cur[0]).all():
            # there already if that label covers exactly these pixels and no others
            if int((current == cur[0]).sum()) == int(mine.sum()):
                continue
        free = mine & (current[where] == 0)
        if free.any():
            top += 1
            current[where][free] = top  # basic slices: a view into current
            added += 1
    return added
