"""What every format shares: the format tables, atomic writes, errors that name the file."""

from __future__ import annotations

import contextlib
import os
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError

READ_FORMATS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".npy",
    ".nii",
    ".nii.gz",
    ".dcm",
)


WRITE_FORMATS: tuple[str, ...] = (".png", ".tif", ".tiff", ".npy", ".nii", ".nii.gz")


_NIFTI = (".nii", ".nii.gz")


_PIL = (".png", ".jpg", ".jpeg")


_TIFF = (".tif", ".tiff")


PathLike = str | os.PathLike


def file_format(path: PathLike) -> str:
    """The lower-case extension that decides the format (``.nii.gz`` counts as one)."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _check_read_format(path: Path, allowed: tuple[str, ...] = READ_FORMATS) -> str:
    ext = file_format(path)
    if ext not in allowed:
        shown = ext or "no extension"
        raise ImageError(
            f"{path}: unsupported file type ({shown}); supported: {', '.join(allowed)}"
        )
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image file")
    return ext


def _take_slice(
    vol: np.ndarray, slice_index: int | None, axis: int, path: Path, kind: str
) -> tuple[np.ndarray, int]:
    """Pick one 2D slice of a 3D grey array along ``axis``."""
    if axis not in (0, 1, 2):
        raise ImageError(f"{path}: axis must be 0, 1 or 2, got {axis}")
    n = vol.shape[axis]
    if slice_index is None:
        if n == 1:
            slice_index = 0
        else:
            raise ImageError(
                f"{path} is a {kind} with {n} slices along axis {axis} (shape {vol.shape}); "
                f"pass a slice index 0..{n - 1} (--slice N) to pick one"
            )
    index = int(slice_index)
    if not 0 <= index < n:
        raise ImageError(
            f"{path}: slice {index} is out of range; the {kind} has {n} slices along axis "
            f"{axis} (0..{n - 1})"
        )
    return np.take(vol, index, axis=axis), index


def _drop_alpha(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] == 4:
        return arr[..., :3]
    return arr


def _replace_nonfinite(vol: np.ndarray, path: Path, nonfinite: str) -> np.ndarray:
    """Refuse or replace NaN/inf voxels (``nonfinite`` = ``"error"`` or ``"replace"``)."""
    if nonfinite not in ("error", "replace"):
        raise ImageError(f"nonfinite must be 'error' or 'replace', not {nonfinite!r}")
    if vol.dtype.kind != "f":
        return vol
    finite = np.isfinite(vol)
    if finite.all():
        return vol
    bad = int(finite.size - np.count_nonzero(finite))
    if not finite.any():
        raise ImageError(f"{path}: every voxel is NaN or infinite; there is no image to read")
    fill = vol[finite].min()
    if nonfinite == "error":
        raise ImageError(
            f"{path}: {bad} voxels are NaN or infinite; pass nonfinite='replace' to set them to "
            f"the smallest finite value ({fill:g})"
        )
    warnings.warn(
        f"{path}: {bad} NaN/infinite voxels were set to the smallest finite value ({fill:g})",
        stacklevel=3,
    )
    return np.where(finite, vol, fill).astype(vol.dtype, copy=False)


def _wrap_errors(path: Path, func: Callable[[], Any]) -> Any:
    """Run ``func``; turn any library error into an :class:`ImageError` naming ``path``."""
    try:
        return func()
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError(f"{path}: not enough memory to read the file") from exc
    except Exception as exc:  # the readers raise many unrelated types for a damaged file
        detail = str(exc).strip() or type(exc).__name__
        raise ImageError(
            f"{path}: cannot read the file; it may be truncated or corrupt ({detail})"
        ) from exc


def _atomic_write(path: Path, writer: Callable[[Path], None]) -> None:
    """:func:`atomic_write` with the temporary file named in ``path``'s format, for writers
    that choose the format from the file name (nibabel, PIL)."""
    atomic_write(path, writer, file_format(path))


def atomic_write(path: Path, writer: Callable[[Path], None], suffix: str = "") -> None:
    """Write through ``writer`` into a hidden temporary file beside ``path``, flush it to disk,
    then rename it over ``path``; the temporary file is removed if anything fails. The one
    atomic write of the package (labels, masks, cache entries, autosaved objects)."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp{suffix}"
    try:
        writer(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _check_shape(labels: np.ndarray, expected: Any, what: str) -> None:
    got = tuple(labels.shape) if labels.ndim == 3 else (1, *labels.shape)
    expected = tuple(int(s) for s in expected)
    if got != expected:
        raise ImageError(
            f"labels shape {tuple(labels.shape)} does not match {what} {expected} (Z, Y, X, "
            "as read_volume returns it); nothing was written"
        )


@dataclass(frozen=True, eq=False)
class SourceGeometry:
    """Where a volume came from: enough to save labels drawn on it in its geometry
    (:func:`~structsam.io.write_labels`), even after the source file moved.

    ``source``: absolute path of the NIfTI file or DICOM folder (None: no file to refer to);
    ``affine``: the canonical affine :func:`~structsam.io.read_volume` returns; ``shape``: the
    ``(Z, Y, X)`` volume shape; ``header``: the raw NIfTI header bytes; ``volume_index``: which
    volume of a 4D/5D NIfTI.
    """

    source: str | None
    affine: np.ndarray | None
    shape: tuple[int, ...] | None
    header: bytes | None = None
    volume_index: int | None = None
