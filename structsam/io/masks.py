"""Writing masks (PNG, TIFF, NumPy, NIfTI) and label volumes in the source's geometry."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError
from ._base import (
    _NIFTI,
    _TIFF,
    WRITE_FORMATS,
    PathLike,
    SourceGeometry,
    _atomic_write,
    _check_shape,
    file_format,
)
from .dicom import read_dicom_series
from .nifti import _header_reference, _labels_like_nifti, _labels_with_affine, _load_reference


def _binary_mask(mask: np.ndarray) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype != bool and not np.issubdtype(arr.dtype, np.number):
        raise ImageError(f"mask must be a boolean or numeric array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ImageError(f"mask is empty (shape {arr.shape})")
    return arr != 0


def _nifti_mask_image(
    path: Path, mask: np.ndarray, reference: Any, slice_index: int | None, axis: int
) -> Any:
    import nibabel as nib
    from nibabel import orientations as ornt_mod

    if mask.ndim not in (2, 3):
        raise ImageError(f"a NIfTI mask must be 2D or 3D (Z, Y, X), got shape {mask.shape}")
    ref = _load_reference(reference) if reference is not None else None
    if ref is None:
        data_xyz = mask.T[:, :, None] if mask.ndim == 2 else mask.transpose(2, 1, 0)
        img = nib.Nifti1Image(data_xyz.astype(np.uint8), np.eye(4))
        img.set_data_dtype(np.uint8)
        return img

    native_shape = tuple(int(s) for s in ref.shape)
    while len(native_shape) > 3 and native_shape[-1] == 1:
        native_shape = native_shape[:-1]
    if len(native_shape) > 3:
        raise ImageError(f"reference has shape {ref.shape}; a mask needs a 2D or 3D reference")
    native_shape = native_shape + (1,) * (3 - len(native_shape))
    orientation = ornt_mod.io_orientation(ref.affine)
    canon_xyz = tuple(int(native_shape[int(a)]) for a in np.argsort(orientation[:, 0]))
    canon_zyx = canon_xyz[::-1]

    if mask.ndim == 2 and slice_index is not None:
        if axis not in (0, 1, 2):
            raise ImageError(f"axis must be 0, 1 or 2, got {axis}")
        n = canon_zyx[axis]
        if not 0 <= int(slice_index) < n:
            raise ImageError(
                f"slice {slice_index} is out of range; the reference has {n} slices along "
                f"axis {axis}"
            )
        plane = tuple(s for i, s in enumerate(canon_zyx) if i != axis)
        if mask.shape != plane:
            raise ImageError(
                f"mask shape {mask.shape} does not match the reference's slices {plane} "
                f"along axis {axis}"
            )
        vol = np.zeros(canon_zyx, dtype=bool)
        index: list[Any] = [slice(None)] * 3
        index[axis] = int(slice_index)
        vol[tuple(index)] = mask
        mask = vol
    elif mask.ndim == 2:
        if canon_zyx[0] != 1:
            raise ImageError(
                f"the reference is a 3D volume {canon_zyx} (Z, Y, X); pass slice_index (and "
                "axis) to place a 2D mask in it, or give a 3D mask"
            )
        mask = mask[None]
    if mask.shape != canon_zyx:
        raise ImageError(
            f"mask shape {mask.shape} does not match the reference volume {canon_zyx} (Z, Y, X)"
        )
    data_canon = mask.transpose(2, 1, 0).astype(np.uint8)
    ras = ornt_mod.axcodes2ornt(("R", "A", "S"))
    back = ornt_mod.ornt_transform(ras, orientation)
    data_native = np.ascontiguousarray(ornt_mod.apply_orientation(data_canon, back))
    data_native = data_native.reshape(native_shape)
    header = ref.header.copy()
    cls = nib.Nifti2Image if isinstance(ref, nib.Nifti2Image) else nib.Nifti1Image
    img = cls(data_native, ref.affine, header=header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 1
    img.header["descrip"] = b"structsam mask"
    return img


def write_mask(
    path: PathLike,
    mask: np.ndarray,
    reference: Any = None,
    *,
    slice_index: int | None = None,
    axis: int = 0,
) -> Path:
    """Write a binary mask (non-zero = foreground) atomically; returns the path written.

    * ``.png`` / ``.tif`` / ``.tiff``: uint8 with values 0 and 255 (PNG 2D only; TIFF 2D or a
      3D stack).
    * ``.npy``: uint8 with values 0 and 1, any shape.
    * ``.nii`` / ``.nii.gz``: uint8 0/1.  A 3D mask is ``(Z, Y, X)`` as returned by
      :func:`read_volume`; a 2D mask is ``(Y, X)``.  With ``reference`` (a NIfTI path or a
      nibabel image) the mask is put back into the reference's own voxel orientation and saved
      with its affine and header, so it overlays the reference in any viewer; a 2D mask of one
      slice of a 3D reference needs ``slice_index`` (and ``axis``) and the other slices are
      zero.  Without a reference the affine is the identity and a 2D mask is saved as one
      slice.

    ``reference`` and ``slice_index`` only matter for NIfTI output; other formats ignore them,
    so a caller may pass the same arguments whatever the output format.

    Raises :class:`~structsam.errors.ImageError` for an unsupported extension or a mask whose
    shape does not fit; operating-system errors (missing folder, permissions, full disk)
    propagate as :class:`OSError` after the temporary file is removed.
    """
    p = Path(path)
    ext = file_format(p)
    if ext not in WRITE_FORMATS:
        shown = ext or "no extension"
        raise ImageError(
            f"{p}: cannot write a mask as {shown}; supported: {', '.join(WRITE_FORMATS)} "
            "(JPEG is lossy and would corrupt mask edges)"
        )
    m = _binary_mask(mask)

    if ext == ".png":
        if m.ndim != 2:
            raise ImageError(f"{p}: a PNG mask must be 2D, got shape {m.shape}")
        from PIL import Image

        pixels = m.astype(np.uint8) * np.uint8(255)

        def writer(tmp: Path) -> None:
            Image.fromarray(pixels, mode="L").save(tmp, format="PNG")

    elif ext in _TIFF:
        if m.ndim not in (2, 3):
            raise ImageError(f"{p}: a TIFF mask must be 2D or 3D, got shape {m.shape}")
        import tifffile

        pixels = m.astype(np.uint8) * np.uint8(255)

        def writer(tmp: Path) -> None:
            tifffile.imwrite(tmp, pixels, photometric="minisblack")

    elif ext == ".npy":
        pixels = m.astype(np.uint8)

        def writer(tmp: Path) -> None:
            with open(tmp, "xb") as fh:
                np.save(fh, pixels, allow_pickle=False)

    else:
        import nibabel as nib

        img = _nifti_mask_image(p, m, reference, slice_index, axis)

        def writer(tmp: Path) -> None:
            nib.save(img, tmp)

    _atomic_write(p, writer)
    return p


_LABEL_DTYPES = (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32)


def _label_array(labels: Any) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind not in "iu":
        raise ImageError(
            f"labels must be an integer array, got dtype {arr.dtype}; convert with "
            "labels.astype(np.int32) if the values are whole numbers"
        )
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageError(f"labels must be a (Z, Y, X) volume or a 2D slice, got {arr.shape}")
    if arr.dtype.type in _LABEL_DTYPES:
        return arr
    low, high = int(arr.min()), int(arr.max())
    for dtype in _LABEL_DTYPES:
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return arr.astype(dtype)
    return arr  # values beyond 32 bits: kept as int64


def _refuse_source(target: Path, source: Any) -> None:
    """Labels must never replace the scan they were drawn on."""
    if source is None:
        return
    src = Path(source)
    try:
        same = os.path.samefile(target, src)  # hard and symbolic links too
    except OSError:  # one of them does not exist
        same = target.resolve() == src.resolve()
    if same:
        name = target.name[: -len(file_format(target))]
        raise ImageError(
            f"{target} is the source scan ({src}); saving labels there would overwrite it. "
            f"Choose another name, e.g. {name}_labels.nii.gz; nothing was written"
        )


def _labels_from_geometry(target: Path, labels: np.ndarray, geometry: SourceGeometry) -> Any:
    """The NIfTI image of ``labels`` in a source's geometry: the raw header if there is one
    (the source file may have moved), else the source NIfTI file, else the canonical affine
    (DICOM series)."""
    source, affine, shape, block = geometry.source, geometry.affine, geometry.shape, geometry.header
    if affine is None and source is None:
        raise ImageError("the source geometry holds neither an affine nor a source path")
    _refuse_source(target, source)
    if shape is not None:
        _check_shape(labels, shape, "the source volume")
    if block:
        return _labels_like_nifti(labels, _header_reference(block))
    if source is not None and file_format(source) in _NIFTI and Path(source).is_file():
        return _labels_like_nifti(labels, _load_reference(source))
    if affine is None or shape is None:
        # without the volume's shape the labels could be any size; re-read the source
        return _labels_from_path(target, labels, source)
    return _labels_with_affine(labels, affine)


def _labels_from_path(target: Path, labels: np.ndarray, source: Any) -> Any:
    _refuse_source(target, source)
    if Path(source).is_dir():
        vol, _, meta = read_dicom_series(source)
        _check_shape(labels, vol.shape, f"the DICOM series {source}")
        return _labels_with_affine(labels, meta["affine"])
    return _labels_like_nifti(labels, _load_reference(source))


def write_labels(
    path: PathLike, labels: np.ndarray, reference: Any = None, *, shape: Any = None
) -> Path:
    """Write an integer label volume ``(Z, Y, X)`` as NIfTI, atomically; returns the path.

    ``labels`` is laid out as :func:`read_volume` returns volumes (canonical RAS+, ``(Z, Y,
    X)``).  ``reference``:

    * a NIfTI path or nibabel image (the source volume, 4D allowed): the labels are put back
      into its own voxel order and saved with a copy of its header, so the affine (qform and
      sform with their codes), units and every other header field are kept; only the data
      type, scaling (1, 0) and ``cal_min``/``cal_max`` change;
    * a DICOM folder: saved with the series' canonical affine (qform and sform code 1, mm);
    * a :class:`SourceGeometry` (:func:`read_source_volume`): as the source NIfTI (from the
      header held there, so the file may have moved) or DICOM series;
    * a 4x4 affine (``read_volume``'s third value) with ``shape``, the ``(Z, Y, X)`` shape of
      the volume it belongs to; or ``None`` (identity; ``shape`` checked if given).

    The labels' shape is checked against every kind of reference, and the path of a source
    scan is refused, so labels never overwrite the scan.  The label values and their integer
    dtype come back unchanged from :func:`read_labels` (bool is stored as uint8, int64
    narrowed to the smallest NIfTI-1 type that holds the values).  Raises
    :class:`~structsam.errors.ImageError` for non-integer labels, a wrong shape, the source's
    own path or a non-NIfTI path; the temporary file is removed on any failure.
    """
    import nibabel as nib

    p = Path(path)
    if file_format(p) not in _NIFTI:
        raise ImageError(f"{p}: labels are written as NIfTI; use a .nii.gz or .nii name")
    arr = _label_array(labels)
    if shape is not None:
        _check_shape(arr, shape, "the given shape")
    if reference is None:
        img = _labels_with_affine(arr, np.eye(4))
    elif isinstance(reference, np.ndarray):
        if shape is None:
            raise ImageError(
                "an affine alone does not say which volume it belongs to: pass shape=(Z, Y, X) "
                "of that volume, or the source file or DICOM folder as the reference"
            )
        img = _labels_with_affine(arr, reference)
    elif isinstance(reference, SourceGeometry):
        img = _labels_from_geometry(p, arr, reference)
    elif isinstance(reference, nib.Nifti1Image | nib.Nifti2Image):
        _refuse_source(p, reference.get_filename())
        img = _labels_like_nifti(arr, reference)
    else:
        img = _labels_from_path(p, arr, reference)
    _atomic_write(p, lambda tmp: nib.save(img, tmp))
    return p
