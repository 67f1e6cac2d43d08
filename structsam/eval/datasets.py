"""Segmentation benchmarks from folders, so that merging can be evaluated on a user's own data.

The protocol is one box prompt per ground-truth object, so every loader yields one
:class:`~structsam.samples.Case` per object (a label value or instance id of a mask), its tight
box and interior point derived by :func:`~structsam.samples.case_from_mask`.  ``Case.kind`` and
``meta["dataset"]`` are the format name; ``meta`` also records ``source`` (the image file),
``mask`` (the mask file), ``label`` (the object's value in the mask), ``slice`` (index along
axis 0 of a volume, ``None`` for 2D data) and, where the file says, ``spacing`` (row and
column pixel size in mm).

Formats (:func:`detect_format` picks one from the path):

``hq-sam``
    HQ-SAM's evaluation sets: ``*.jpg`` images with ``*.png`` masks of the same stem, in one
    folder or in HQ-SAM's sibling folders (``DIS5K/DIS-VD/im`` + ``gt``, ``ThinObject5K/
    images_test`` + ``masks_test``, ``COIFT/images`` + ``masks``, ``HRSOD/images`` +
    ``masks_max255``).  A pixel is foreground where the mask is above 128, and the object is the
    whole foreground (one box per mask), as in HQ-SAM's evaluation.
``npz``
    MedSAM's preprocessed ``.npz`` files: image ``imgs`` (also ``img`` / ``image``), labels
    ``gts`` (also ``gt``); 2D ``(H, W)`` / ``(H, W, 3)`` or 3D ``(D, H, W)``.  A file without
    labels (the CVPR 2024 challenge's ``imgs/`` folder) takes them from the file of the same
    name in a sibling ``gts/`` folder.
``image-mask``
    Any image folder with a mask folder (``images`` + ``masks`` / ``labels`` / ``gt``), or both
    in one folder, masks matched by stem with an optional suffix (``_mask``, ``_gt``, ...).
    Masks are 8/16-bit PNG / TIFF / ``.npy`` integer labels (palette PNGs by palette index,
    colour-coded RGB masks by colour), or 0/255 binary masks (see :func:`load_image_mask`).
``nifti``
    NIfTI image and label volumes: nnU-Net / MSD ``imagesTr`` + ``labelsTr`` (image
    ``case_0000.nii.gz`` with label ``case.nii.gz``; other channels ``_0001``... are skipped) or
    ``images`` + ``labels``.  Slices are taken along axis 0 of :func:`structsam.io.read_volume`'s
    ``(Z, Y, X)`` array (axial).

Files are read lazily in sorted order; problems with the data (an empty folder, an image
without mask, an unreadable file, shapes that differ) raise :class:`~structsam.errors.ImageError`
naming the file.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError, StructSAMError
from ..io import PathLike, file_format, read_image, read_volume
from .synthetic import Case, case_from_mask

__all__ = [
    "FORMATS",
    "detect_format",
    "iter_dataset",
    "load_dataset",
    "load_hq_sam",
    "load_image_mask",
    "load_nifti",
    "load_npz",
]

FORMATS: tuple[str, ...] = ("hq-sam", "npz", "image-mask", "nifti")

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".dcm")
_MASK_EXTS = (".png", ".tif", ".tiff", ".npy")
_NIFTI_EXTS = (".nii", ".nii.gz")
_MASK_SUFFIXES = ("_mask", "_masks", "_gt", "_label", "_labels", "_seg", "-mask", "-gt", "-label")
# (image folder, mask folder) names, tried in this order: HQ-SAM's first (the test split of
# ThinObject5K before its training split), then nnU-Net / MSD, then common names.
_HQ_DIRS = (
    ("im", "gt"),
    ("images_test", "masks_test"),
    ("images", "masks_max255"),
    ("images", "masks"),
    ("images_train", "masks_train"),
)
_DIR_PAIRS = _HQ_DIRS + (
    ("imagesTr", "labelsTr"),
    ("imagesTs", "labelsTs"),
    ("images", "labels"),
    ("images", "gt"),
    ("images", "gts"),
    ("imgs", "gts"),
    ("img", "gt"),
    ("image", "mask"),
    ("image", "label"),
)
_NPZ_IMAGE_KEYS = ("imgs", "img", "image")
_NPZ_LABEL_KEYS = ("gts", "gt")
_CHANNEL = re.compile(r"(.+)_(\d{4})")  # nnU-Net's per-channel image suffix


# --------------------------------------------------------------------------------------------
# files and pairs


def _stem(path: Path) -> str:
    return path.name[: len(path.name) - len(file_format(path))]


def _files(folder: Path, exts: Iterable[str]) -> list[Path]:
    """Files of ``folder`` with one of ``exts``, sorted; hidden files (macOS ``._`` copies in
    the MSD archives) are skipped."""
    exts = tuple(exts)
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and file_format(p) in exts
    )


def _find_dirs(root: Path) -> tuple[Path, Path] | None:
    """The (image, mask) folders of a dataset root, or of an image folder given itself."""
    for images, masks in _DIR_PAIRS:
        if (root / images).is_dir() and (root / masks).is_dir():
            return root / images, root / masks
    for images, masks in _DIR_PAIRS:
        if root.name == images and (root.parent / masks).is_dir():
            return root, root.parent / masks
    return None


def _mask_key(stem: str) -> str:
    for suffix in _MASK_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _split_one_folder(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Images and masks sharing a folder: a mask carries a mask suffix, or is the ``.png``
    beside a ``.jpg`` of the same stem (HQ-SAM's layout)."""
    jpg_stems = {_stem(f) for f in files if file_format(f) in (".jpg", ".jpeg")}
    is_mask = [
        _mask_key(_stem(f)) != _stem(f) or (file_format(f) == ".png" and _stem(f) in jpg_stems)
        for f in files
    ]
    images = [f for f, m in zip(files, is_mask, strict=True) if not m]
    masks = [f for f, m in zip(files, is_mask, strict=True) if m]
    return images, masks


def _pairs(
    root: Path, image_exts: tuple[str, ...], mask_exts: tuple[str, ...]
) -> list[tuple[Path, Path]]:
    """Sorted (image, mask) file pairs under ``root``; every image needs a mask and every mask
    an image, so that a half-copied dataset is noticed rather than silently evaluated."""
    if not root.is_dir():
        raise ImageError(f"{root}: no such folder")
    dirs = _find_dirs(root)
    if dirs is None:
        images, masks = _split_one_folder(_files(root, set(image_exts + mask_exts)))
        image_dir = mask_dir = root
    else:
        image_dir, mask_dir = dirs
        images, masks = _files(image_dir, image_exts), _files(mask_dir, mask_exts)
    if not images and not masks:
        raise ImageError(f"{image_dir}: no image files found (looked for {', '.join(image_exts)})")
    by_key: dict[str, Path] = {}
    for mask in masks:
        key = _mask_key(_stem(mask))
        if key in by_key:
            raise ImageError(f"{mask}: a second mask for {key!r} (the first is {by_key[key]})")
        by_key[key] = mask
    pairs, used = [], set()
    for image in images:
        stem = _stem(image)
        channel = _CHANNEL.fullmatch(stem)
        if stem in by_key:
            key = stem
        elif channel and channel[1] in by_key:
            if channel[2] != "0000":
                continue  # a further channel of an nnU-Net case: the first one is used
            key = channel[1]
        else:
            raise ImageError(
                f"{image}: no mask found for this image in {mask_dir} (looked for {stem} with "
                f"{', '.join(mask_exts)}, optionally suffixed {', '.join(_MASK_SUFFIXES[:3])}, ...)"
            )
        pairs.append((image, by_key[key]))
        used.add(key)
    orphans = sorted(set(by_key) - used)
    if orphans:
        raise ImageError(
            f"{by_key[orphans[0]]}: no image found for this mask in {image_dir} "
            f"({len(orphans)} mask(s) without image)"
        )
    return pairs


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn any library error while reading ``path`` into an ImageError naming it."""
    try:
        yield
    except StructSAMError:
        raise
    except Exception as exc:  # readers raise many unrelated types for a damaged file
        detail = str(exc).strip() or type(exc).__name__
        raise ImageError(f"{path}: cannot read the file ({detail})") from exc


# --------------------------------------------------------------------------------------------
# labels and objects


def _as_labels(arr: np.ndarray, path: Path) -> np.ndarray:
    """Non-negative integer labels (NIfTI labels arrive as float32)."""
    a = np.asarray(arr)
    if a.dtype == bool:
        return a.astype(np.uint8)
    if a.dtype.kind == "f":
        rounded = np.rint(a)
        if not np.array_equal(rounded, a):
            raise ImageError(f"{path}: the mask holds non-integer values; expected labels")
        a = rounded.astype(np.int64)
    elif a.dtype.kind not in "iu":
        raise ImageError(f"{path}: mask dtype {a.dtype} is not an integer label type")
    if a.size and a.min() < 0:
        raise ImageError(f"{path}: the mask holds negative values; expected labels >= 0")
    return a


def _label_areas(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Object values (0 = background excluded) of a ``(D, H, W)`` label array and their
    per-slice areas ``(D, n_values)``, one bincount per slice."""
    if labels.size == 0 or labels.max() == 0:
        return np.zeros(0, np.int64), np.zeros((labels.shape[0], 0), np.int64)
    values = None
    if labels.max() >= 2**16:  # sparse large instance ids: count compact indices instead
        values = np.unique(labels)
        labels = np.searchsorted(values, labels)
    n = int(labels.max()) + 1
    areas = np.stack([np.bincount(s.ravel(), minlength=n) for s in labels])
    present = np.flatnonzero(areas.sum(axis=0))
    values = present if values is None else values[present]
    keep = values != 0
    return values[keep].astype(np.int64), areas[:, present[keep]]


def _pick_slices(areas: np.ndarray, max_slices: int | None, min_area: int) -> np.ndarray:
    """Slices of one object: the largest, then pairs at +-``extent / (2 (pairs + 1))`` from it
    (+-quarter extent for 3 slices), each moved to the nearest slice where the object has at
    least ``min_area`` pixels.  Neighbouring slices are nearly the same prompt, so spreading
    them samples the object's shape instead of repeating it."""
    ok = np.flatnonzero(areas >= min_area)
    if max_slices is None or ok.size <= max_slices:
        return ok
    present = np.flatnonzero(areas)
    extent = present[-1] - present[0] + 1
    pairs = max_slices // 2
    step = extent / (2 * (pairs + 1))
    offsets = [0.0] + [s * j * step for j in range(1, pairs + 1) for s in (1, -1)]
    targets = np.rint(int(np.argmax(areas)) + np.asarray(offsets[:max_slices]))
    return np.unique(ok[np.abs(ok[None, :] - targets[:, None]).argmin(axis=1)])


def _case(name: str, image: np.ndarray, mask: np.ndarray, fmt: str, meta: dict[str, Any]) -> Case:
    return case_from_mask(name, image, mask, fmt, meta=meta)


def _check_shapes(image: np.ndarray, mask: np.ndarray, image_path: Path, mask_path: Path):
    if image.shape[: mask.ndim] != mask.shape:
        raise ImageError(
            f"{image_path}: image shape {image.shape} does not match its mask {mask_path} "
            f"of shape {mask.shape}"
        )


def _volume_cases(
    name: str,
    image: np.ndarray,
    labels: np.ndarray,
    meta: dict[str, Any],
    min_area: int,
    max_slices: int | None,
    volume: bool = True,
) -> Iterator[Case]:
    """Cases of a ``(D, H, W)`` label array over a ``(D, H, W[, 3])`` image: per label value
    (sorted), its chosen slices.  2D data comes as D = 1 with ``volume=False``."""
    values, areas = _label_areas(labels)
    for j, value in enumerate(values):
        for z in _pick_slices(areas[:, j], max_slices, min_area):
            where = {"label": int(value), "slice": int(z) if volume else None}
            yield _case(
                f"{name}-label{value}" + (f"-z{z:03d}" if volume else ""),
                image[z].copy(),  # not a view that would keep the whole volume alive
                labels[z] == value,
                meta["dataset"],
                {**meta, **where},
            )


# --------------------------------------------------------------------------------------------
# formats


def _iter_hq_sam(path: Path, min_area: int) -> Iterator[Case]:
    for image_path, mask_path in _pairs(path, _IMAGE_EXTS, (".png",)):
        image, _ = read_image(image_path)
        grey, _ = read_image(mask_path)
        mask = (grey if grey.ndim == 2 else grey[..., 0]) > 128
        _check_shapes(image, mask, image_path, mask_path)
        if mask.sum() < min_area:
            continue
        meta = {"dataset": "hq-sam", "source": str(image_path), "mask": str(mask_path)}
        yield _case(_stem(image_path), image, mask, "hq-sam", {**meta, "label": 1, "slice": None})


def _read_label_mask(path: Path) -> np.ndarray:
    """A 2D label mask: palette PNGs by palette index, grey as stored, colour by colour."""
    if file_format(path) == ".png":
        from PIL import Image

        with _reading(path), Image.open(path) as im:
            if im.mode == "P":
                return np.array(im)
    arr, _ = read_image(path)
    if arr.ndim == 3:
        if (arr == arr[..., :1]).all():
            return arr[..., 0]
        rgb = arr.astype(np.int64)
        packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        colours, index = np.unique(packed, return_inverse=True)
        return index.reshape(packed.shape) + int(colours[0] != 0)  # black is background
    return arr


def _binary_or_labels(mask: np.ndarray, path: Path) -> np.ndarray:
    """An 8-bit mask whose foreground is mostly 255 is a binary (perhaps anti-aliased) mask,
    thresholded like HQ-SAM's; anything else is integer labels."""
    if mask.dtype == np.uint8:
        foreground = np.count_nonzero(mask)
        if foreground and 2 * np.count_nonzero(mask == 255) > foreground:
            return (mask > 128).astype(np.uint8)
    return _as_labels(mask, path)


def _iter_image_mask(path: Path, min_area: int, components: bool) -> Iterator[Case]:
    from skimage.measure import label as connected

    for image_path, mask_path in _pairs(path, _IMAGE_EXTS, _MASK_EXTS):
        image, _ = read_image(image_path)
        labels = _binary_or_labels(_read_label_mask(mask_path), mask_path)
        _check_shapes(image, labels, image_path, mask_path)
        objects = connected(labels, background=0, connectivity=2) if components else labels
        values, areas = _label_areas(objects[None])
        meta = {"dataset": "image-mask", "source": str(image_path), "mask": str(mask_path)}
        for value in values[areas[0] >= min_area]:
            mask = objects == value
            label = int(labels.flat[np.argmax(mask)])
            name = f"{_stem(image_path)}-label{label}" + (f"-c{value}" if components else "")
            yield _case(name, image, mask, "image-mask", {**meta, "label": label, "slice": None})


def _npz_load(path: Path, keys: tuple[str, ...]) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The first of ``keys`` in an ``.npz`` file (or None), and its other small entries."""
    with _reading(path), np.load(path, allow_pickle=False) as data:
        found = [k for k in keys if k in data.files]
        arr = np.asarray(data[found[0]]) if found else None
        info: dict[str, Any] = {"keys": list(data.files)}
        spacing = np.asarray(data["spacing"]).ravel() if "spacing" in data.files else []
        if len(spacing) == 3:  # MedSAM saves SimpleITK's (x, y, z) order: keep (row, column)
            info["spacing"] = (float(spacing[1]), float(spacing[0]))
    return arr, info


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    image, info = _npz_load(path, _NPZ_IMAGE_KEYS)
    keys = info.pop("keys")
    if image is None:
        raise ImageError(f"{path}: no image array (keys {keys}; expected one of {_NPZ_IMAGE_KEYS})")
    labels, _ = _npz_load(path, _NPZ_LABEL_KEYS)
    gts_file = path.parent.parent / "gts" / path.name
    if labels is None and gts_file.is_file() and path.parent.name != "gts":
        labels, _ = _npz_load(gts_file, _NPZ_LABEL_KEYS)
    if labels is None:
        raise ImageError(
            f"{path}: no label array (keys {keys}; expected one of {_NPZ_LABEL_KEYS}, or the "
            "same file name in a sibling gts/ folder)"
        )
    return image, labels, info


def _npz_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ImageError(f"{path}: no such file or folder")
    files = _files(path, (".npz",))
    if not files and (path / "imgs").is_dir():
        files = _files(path / "imgs", (".npz",))  # the CVPR 2024 challenge's imgs/ + gts/
    if not files:
        raise ImageError(f"{path}: no .npz files found")
    return files


def _iter_npz(path: Path, min_area: int, max_slices: int | None) -> Iterator[Case]:
    for file in _npz_files(path):
        image, labels, extra = _npz_arrays(file)
        labels = _as_labels(labels, file)
        if labels.ndim not in (2, 3):
            raise ImageError(f"{file}: labels must be (H, W) or (D, H, W), got {labels.shape}")
        _check_shapes(image, labels, file, file)
        volume = labels.ndim == 3
        meta = {"dataset": "npz", "source": str(file), "mask": str(file), **extra}
        if not volume:
            image, labels = image[None], labels[None]
        yield from _volume_cases(_stem(file), image, labels, meta, min_area, max_slices, volume)


def _iter_nifti(path: Path, min_area: int, max_slices: int | None) -> Iterator[Case]:
    for image_path, label_path in _pairs(path, _NIFTI_EXTS, _NIFTI_EXTS):
        image, spacing, _ = read_volume(image_path)
        raw, _, _ = read_volume(label_path)
        labels = _as_labels(raw, label_path)
        _check_shapes(image, labels, image_path, label_path)
        meta = {
            "dataset": "nifti",
            "source": str(image_path),
            "mask": str(label_path),
            "spacing": spacing[1:],
        }
        name = _mask_key(_stem(label_path))
        yield from _volume_cases(name, image, labels, meta, min_area, max_slices)


# --------------------------------------------------------------------------------------------
# public API


def detect_format(path: PathLike) -> str:
    """The format of a dataset path (one of :data:`FORMATS`).

    An ``.npz`` file, or a folder with ``.npz`` files (or an ``imgs/`` folder of them), is
    ``npz``; otherwise the image folder is found (a known image/mask folder pair under ``path``,
    ``path`` itself when it is the image folder of such a pair, or ``path`` holding both):
    NIfTI images make it ``nifti``; ``.jpg`` images each with a ``.png`` of the same stem, in
    one folder or one of HQ-SAM's folder pairs, make it ``hq-sam``; anything else with images is
    ``image-mask``.
    """
    p = Path(path)
    if p.is_file():
        if file_format(p) == ".npz":
            return "npz"
        raise ImageError(
            f"{p}: a dataset is a folder or a MedSAM .npz file; give the folder holding the "
            "images and masks"
        )
    if not p.is_dir():
        raise ImageError(f"{p}: no such file or folder")
    if _files(p, (".npz",)) or ((p / "imgs").is_dir() and _files(p / "imgs", (".npz",))):
        return "npz"
    dirs = _find_dirs(p)
    image_dir, mask_dir = dirs if dirs else (p, p)
    images = _files(image_dir, _IMAGE_EXTS + _NIFTI_EXTS)
    if any(file_format(f) in _NIFTI_EXTS for f in images):
        return "nifti"
    jpgs = {_stem(f) for f in images if file_format(f) in (".jpg", ".jpeg")}
    pngs = {_stem(f) for f in _files(mask_dir, (".png",))}
    hq_layout = dirs is None or (dirs[0].name, dirs[1].name) in _HQ_DIRS
    if hq_layout and jpgs and jpgs <= pngs:
        return "hq-sam"
    if not images:
        raise ImageError(
            f"{image_dir}: no images, masks, .npz or NIfTI files found "
            f"(supported: {', '.join(_IMAGE_EXTS + _NIFTI_EXTS)}, .npz)"
        )
    return "image-mask"


def iter_dataset(
    path: PathLike,
    *,
    format: str | None = None,
    min_area: int = 16,
    max_slices_per_object: int | None = 3,
    components: bool = False,
) -> Iterator[Case]:
    """Cases of a dataset one at a time, files read as they are needed (see
    :func:`load_dataset`)."""
    if max_slices_per_object is not None and max_slices_per_object < 1:
        raise ValueError(f"max_slices_per_object must be >= 1 or None, got {max_slices_per_object}")
    p = Path(path)
    fmt = detect_format(p) if format is None else format
    if fmt == "hq-sam":
        cases = _iter_hq_sam(p, min_area)
    elif fmt == "npz":
        cases = _iter_npz(p, min_area, max_slices_per_object)
    elif fmt == "image-mask":
        cases = _iter_image_mask(p, min_area, components)
    elif fmt == "nifti":
        cases = _iter_nifti(p, min_area, max_slices_per_object)
    else:
        raise ImageError(f"unknown dataset format {fmt!r}; known: {', '.join(FORMATS)}")
    empty = True
    for case in cases:
        empty = False
        yield case
    if empty:
        raise ImageError(f"{p}: no ground-truth object of at least {min_area} pixels found")


def load_dataset(
    path: PathLike,
    *,
    format: str | None = None,
    limit: int | None = None,
    min_area: int = 16,
    max_slices_per_object: int | None = 3,
    components: bool = False,
) -> list[Case]:
    """Load a segmentation benchmark as one :class:`Case` per ground-truth object.

    ``format`` is detected from ``path`` by :func:`detect_format` unless given.  Objects
    smaller than ``min_area`` pixels are dropped; at most ``limit`` cases are read.
    ``max_slices_per_object`` (``npz`` and ``nifti`` volumes; ``None`` for all) and
    ``components`` (``image-mask``) are explained in the format's loader.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    cases = iter_dataset(
        path,
        format=format,
        min_area=min_area,
        max_slices_per_object=max_slices_per_object,
        components=components,
    )
    return list(itertools.islice(cases, limit))


def load_hq_sam(path: PathLike, *, limit: int | None = None, min_area: int = 16) -> list[Case]:
    """HQ-SAM's binary-mask sets (DIS5K DIS-VD, ThinObject5K test, COIFT, HRSOD): one case
    per image, the whole foreground (mask > 128) being the object, as HQ-SAM evaluates one
    box per mask.  ``path`` is the dataset folder (e.g. ``DIS5K/DIS-VD``), its image folder,
    or a folder holding both the ``.jpg`` images and ``.png`` masks."""
    return load_dataset(path, format="hq-sam", limit=limit, min_area=min_area)


def load_npz(
    path: PathLike,
    *,
    limit: int | None = None,
    min_area: int = 16,
    max_slices_per_object: int | None = 3,
) -> list[Case]:
    """MedSAM ``.npz`` files (one file or a folder): one case per label value of a 2D file;
    for a 3D file, per label value, up to ``max_slices_per_object`` slices where it is present
    (the largest and, for 3, its neighbours at +-quarter of its extent)."""
    return load_dataset(
        path,
        format="npz",
        limit=limit,
        min_area=min_area,
        max_slices_per_object=max_slices_per_object,
    )


def load_image_mask(
    path: PathLike, *, limit: int | None = None, min_area: int = 16, components: bool = False
) -> list[Case]:
    """Image and mask files matched by stem: one case per label value of each mask.

    An 8-bit mask whose non-zero pixels are mostly 255 is binary (foreground > 128, so
    anti-aliased edges count by halves, as in HQ-SAM); otherwise every non-zero value is an
    object.  ``components=True`` splits each label into its 8-connected parts, for binary masks
    of many separate objects (nuclei, cells)."""
    return load_dataset(
        path, format="image-mask", limit=limit, min_area=min_area, components=components
    )


def load_nifti(
    path: PathLike,
    *,
    limit: int | None = None,
    min_area: int = 16,
    max_slices_per_object: int | None = 3,
) -> list[Case]:
    """NIfTI image and label volumes (nnU-Net / MSD ``imagesTr`` + ``labelsTr``, or
    ``images`` + ``labels``): per label value, up to ``max_slices_per_object`` axial slices
    (axis 0 of the ``(Z, Y, X)`` volume) where it is present, chosen as for :func:`load_npz`.
    The image is the first channel (``_0000``) of a multi-channel nnU-Net case."""
    return load_dataset(
        path,
        format="nifti",
        limit=limit,
        min_area=min_area,
        max_slices_per_object=max_slices_per_object,
    )
