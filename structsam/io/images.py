"""2D images (PNG, JPEG, TIFF, NumPy, a NIfTI or DICOM slice) and volumes of any format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError
from ._base import (
    _NIFTI,
    _PIL,
    _TIFF,
    PathLike,
    SourceGeometry,
    _check_read_format,
    _drop_alpha,
    _replace_nonfinite,
    _take_slice,
    _wrap_errors,
    file_format,
)
from .dicom import _read_dicom, read_dicom_series
from .nifti import _nifti_header, _nifti_zyx


def _read_pil(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode == "1":
            im = im.convert("L")
        elif mode == "LA":
            im = im.getchannel("L")
        elif mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La", "PA"):
            im = im.convert("RGB")
        arr = np.array(im)
    if mode.startswith("I;16"):
        arr = arr.astype(np.uint16, copy=False)
    return _drop_alpha(arr), {"mode": mode}


def _read_tiff(path: Path, slice_index: int | None, axis: int) -> tuple[np.ndarray, dict[str, Any]]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ImageError(f"{path}: the TIFF file holds no image")
        series = tif.series[0]
        axes = series.axes
        arr = series.asarray()
    colour = axes.endswith("S") and arr.shape[-1] in (3, 4)
    # Drop singleton axes other than the image plane (and the colour samples).
    keep = [i for i, s in enumerate(arr.shape) if s != 1 or i >= arr.ndim - (3 if colour else 2)]
    arr = arr.reshape([arr.shape[i] for i in keep])
    meta: dict[str, Any] = {"axes": axes}
    grey_ndim = arr.ndim - (1 if colour else 0)
    if grey_ndim == 3:
        if colour:
            arr, index = _take_slice(arr, slice_index, 0, path, "TIFF stack")
        else:
            arr, index = _take_slice(arr, slice_index, axis, path, "TIFF stack")
        meta["slice_index"] = index
    elif grey_ndim > 3:
        raise ImageError(
            f"{path}: TIFF with axes {axes} and shape {series.shape} has too many dimensions; "
            "save a single 2D image or a 3D stack"
        )
    return _drop_alpha(arr), meta


def _read_npy(path: Path, slice_index: int | None, axis: int) -> tuple[np.ndarray, dict]:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise ImageError(f"{path}: holds Python objects, not a numeric array") from exc
        raise
    if not isinstance(arr, np.ndarray):
        raise ImageError(f"{path}: expected one array in a .npy file")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageError(f"{path}: array dtype {arr.dtype} is not a real numeric type")
    meta: dict[str, Any] = {}
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
        return _drop_alpha(arr), meta
    if arr.ndim == 3:
        arr, index = _take_slice(arr, slice_index, axis, path, "3D array")
        meta["slice_index"] = index
    elif arr.ndim != 2:
        raise ImageError(
            f"{path}: array of shape {arr.shape} is not a 2D image, an (H, W, 3) colour "
            "image or a 3D stack"
        )
    return arr, meta


def _npy_volume(path: Path) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    arr = np.load(path, allow_pickle=False)
    if not isinstance(arr, np.ndarray) or arr.ndim not in (2, 3):
        shape = getattr(arr, "shape", None)
        raise ImageError(f"{path}: expected a 2D or 3D (Z, Y, X) array, got shape {shape}")
    if arr.dtype.kind not in "biuf":
        raise ImageError(f"{path}: array dtype {arr.dtype} is not a real numeric type")
    vol = np.ascontiguousarray(arr.reshape((1,) * (3 - arr.ndim) + arr.shape), dtype=np.float32)
    return vol, (1.0, 1.0, 1.0), np.eye(4)


def read_volume(
    path: PathLike, volume_index: int | None = None, nonfinite: str = "replace"
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read a volume as ``(volume_zyx float32, spacing_zyx, affine)``.

    ``path`` is a NIfTI file, a folder of DICOM slices (see :func:`read_dicom_series`) or a
    ``.npy`` array taken as ``(Z, Y, X)`` with 1 mm spacing and an identity affine.  The volume
    is reoriented to the closest canonical RAS+ orientation and transposed to ``(Z, Y, X)``
    (see the package docstring); ``spacing_zyx`` is in the same order and ``affine`` is the
    canonical affine of the nibabel ``(x, y, z)`` voxel order.  NIfTI scaling
    (``scl_slope``/``scl_inter``) is applied.  A 2D NIfTI comes back with Z = 1.

    4D/5D NIfTI (time series, several echoes) need ``volume_index``, counted over the
    dimensions after the third, the last fastest; the error says how many there are.
    ``nonfinite``: ``"replace"`` (default) sets NaN/inf voxels to the smallest finite value
    and warns with the count; ``"error"`` raises instead.
    """
    p = Path(path)
    if p.is_dir():
        vol, spacing, meta = read_dicom_series(p, nonfinite=nonfinite)
        return vol, spacing, meta["affine"]
    ext = _check_read_format(p, (*_NIFTI, ".npy"))
    if ext == ".npy":
        vol, spacing, affine = _wrap_errors(p, lambda: _npy_volume(p))
    else:
        vol, spacing, affine = _wrap_errors(p, lambda: _nifti_zyx(p, volume_index))
    return _replace_nonfinite(vol, p, nonfinite), spacing, affine


def read_image(
    path: PathLike, slice_index: int | None = None, axis: int = 0
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a 2D image (grey ``(H, W)`` or colour ``(H, W, 3)``) and its metadata.

    A 3D source (NIfTI volume, TIFF stack, 3D ``.npy`` array, multi-frame DICOM) needs
    ``slice_index``, the index along ``axis``; for NIfTI the axes are those of
    :func:`read_volume` (0 = axial, 1 = coronal, 2 = sagittal).  A source with a single slice
    along ``axis`` needs none.

    ``meta`` always has ``path``, ``format`` (the extension without its dot: ``"png"``,
    ``"nii.gz"``, ...), ``shape``, ``dtype``, ``spacing`` (row and column
    pixel size in mm, or ``None`` when the file does not say), ``slice_index`` and ``axis``.
    NIfTI adds ``affine`` (canonical, see the module docstring), ``spacing_zyx`` and
    ``volume_shape``.

    Raises :class:`~structsam.errors.ImageError` for an unknown extension, a missing, truncated
    or corrupt file, a 3D source without ``slice_index``, or a 4D NIfTI.  NaN/infinite
    values of a float image are set to the smallest finite value with a warning that counts
    them (for NIfTI over the whole volume, as :func:`read_volume`).
    """
    p = Path(path)
    ext = _check_read_format(p)
    meta: dict[str, Any] = {"path": str(p), "format": ext[1:], "spacing": None, "axis": axis}

    def nifti_slice(vol, spacing, affine) -> tuple[np.ndarray, dict[str, Any]]:
        if vol.shape[0] == 1 and slice_index is None:
            arr, index, ax = vol[0], 0, 0
        else:
            arr, index = _take_slice(vol, slice_index, axis, p, "3D NIfTI volume")
            ax = axis
        pixel = tuple(s for i, s in enumerate(spacing) if i != ax)
        extra = {
            "slice_index": index,
            "axis": ax,
            "spacing": pixel,
            "spacing_zyx": spacing,
            "affine": affine,
            "volume_shape": vol.shape,
        }
        return arr, extra

    def load() -> tuple[np.ndarray, dict[str, Any]]:
        if ext in _PIL:
            return _read_pil(p)
        if ext in _TIFF:
            return _read_tiff(p, slice_index, axis)
        if ext == ".npy":
            return _read_npy(p, slice_index, axis)
        return _read_dicom(p, slice_index, axis)

    # NaN/inf are cleaned outside _wrap_errors (a warning turned error must not read as a
    # corrupt file) and, for NIfTI, over the whole volume, exactly as read_volume does
    if ext in _NIFTI:
        vol, spacing, affine = _wrap_errors(p, lambda: _nifti_zyx(p))
        vol = _replace_nonfinite(vol, p, "replace")
        arr, extra = nifti_slice(vol, spacing, affine)
    else:
        arr, extra = _wrap_errors(p, load)
        arr = _replace_nonfinite(np.asarray(arr), p, "replace")
    meta.update(extra)
    meta.setdefault("slice_index", None)
    arr = np.ascontiguousarray(arr)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3) or arr.size == 0:
        raise ImageError(f"{p}: expected a 2D grey or RGB image, got shape {arr.shape}")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    meta["shape"] = arr.shape
    meta["dtype"] = str(arr.dtype)
    return arr, meta


def read_source_volume(
    path: PathLike, volume_index: int | None = None
) -> tuple[np.ndarray, SourceGeometry, int]:
    """``(volume_zyx, geometry, n_volumes)`` of a NIfTI file, a DICOM folder or a ``.npy``
    volume: :func:`read_volume` plus the :class:`SourceGeometry` that labels drawn on it are
    saved with. ``n_volumes``: how many volumes a 4D/5D NIfTI holds (volume
    ``volume_index``, default 0, is read); 1 otherwise."""
    p = Path(path)
    nifti = not p.is_dir() and file_format(p) in _NIFTI
    header, n_volumes = None, 1
    if nifti and p.is_file():
        n_volumes, header = _wrap_errors(p, lambda: _nifti_header(p))
        if n_volumes > 1 and volume_index is None:
            volume_index = 0
    vol, _, affine = read_volume(p, volume_index=volume_index)
    source = os.path.abspath(p) if p.is_dir() or nifti else None
    shape = tuple(int(s) for s in vol.shape)
    return vol, SourceGeometry(source, affine, shape, header, volume_index), n_volumes
