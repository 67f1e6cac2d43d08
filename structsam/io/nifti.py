"""NIfTI: canonical (RAS+) volumes as (Z, Y, X), labels back in the source's own voxel order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError
from ._base import _NIFTI, PathLike, _check_read_format, _check_shape, _wrap_errors


def _canonical(data_xyz: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient an (x, y, z) array and its affine to the closest canonical RAS+ orientation."""
    from nibabel import orientations as ornt_mod

    orientation = ornt_mod.io_orientation(affine)
    data = ornt_mod.apply_orientation(data_xyz, orientation)
    affine = affine @ ornt_mod.inv_ornt_aff(orientation, data_xyz.shape)
    return np.ascontiguousarray(data), affine


def _extra_volumes(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dimensions after the third of a NIfTI shape, with singleton ones dropped."""
    return tuple(int(s) for s in shape[3:] if s != 1)


def _load_nifti(
    path: Path, volume_index: int | None = None, scaled: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Data (float32 with scaling applied, or the raw stored values when ``scaled=False``) and
    affine of a NIfTI file, reoriented to canonical RAS+, as an (x, y, z) array.

    4D/5D files need ``volume_index``: the volumes are numbered over the dimensions after the
    third (singleton ones dropped) in C order, the last one fastest.
    """
    import nibabel as nib

    img = nib.load(path)
    shape = tuple(int(s) for s in img.shape)
    extra = _extra_volumes(shape)
    n_volumes = int(np.prod(extra)) if extra else 1
    if len(shape) > 5:
        raise ImageError(f"{path}: a NIfTI with shape {shape} has too many dimensions")
    if n_volumes > 1 and volume_index is None:
        kind = f"{len(shape)}D"
        raise ImageError(
            f"{path} is a {kind} NIfTI with {n_volumes} volumes (shape {shape}); structsam reads "
            f"one 3D volume: pick a volume with volume_index=0..{n_volumes - 1} (structsam "
            "embed --volume K), or extract one, e.g. nilearn.image.index_img(path, k)"
        )
    if volume_index is not None and not 0 <= int(volume_index) < n_volumes:
        raise ImageError(
            f"{path}: volume {volume_index} is out of range; the file holds {n_volumes} "
            f"volume(s) (0..{n_volumes - 1})"
        )
    # Index the trailing dimensions on the proxy, so only the chosen volume is read.
    index = [0] * (len(shape) - 3)
    if extra:
        picked = iter(np.unravel_index(int(volume_index or 0), extra))
        index = [int(next(picked)) if s != 1 else 0 for s in shape[3:]]
    slicer = (slice(None),) * min(len(shape), 3) + tuple(index)
    if scaled:
        data = np.asarray(img.dataobj[slicer], dtype=np.float32)
    else:
        data = np.asanyarray(img.dataobj.get_unscaled()[slicer])
    data = data.reshape(shape[:3] + (1,) * (3 - len(shape[:3])))
    data, affine = _canonical(data, np.asarray(img.affine, dtype=np.float64))
    return (data.astype(np.float32, copy=False) if scaled else data), affine


def _spacing_zyx(affine: np.ndarray) -> tuple[float, float, float]:
    voxel = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # (x, y, z) voxel sizes
    return float(voxel[2]), float(voxel[1]), float(voxel[0])


def _nifti_zyx(
    path: Path, volume_index: int | None = None
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    data_xyz, affine = _load_nifti(path, volume_index)
    vol = np.ascontiguousarray(data_xyz.transpose(2, 1, 0))
    return vol, _spacing_zyx(affine), affine


def _nifti_header(path: Path) -> tuple[int, bytes]:
    """(number of volumes, raw header) of a NIfTI file, reading the header only."""
    import nibabel as nib

    img = nib.load(path)
    extra = _extra_volumes(tuple(int(s) for s in img.shape))
    return (int(np.prod(extra)) if extra else 1), bytes(img.header.binaryblock)


def read_labels(path: PathLike) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read a label volume written by :func:`write_labels` (or any integer NIfTI) as
    ``(labels_zyx, spacing_zyx, affine)`` with the stored integer dtype, laid out like
    :func:`read_volume`."""
    p = Path(path)
    _check_read_format(p, _NIFTI)

    def load() -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
        import nibabel as nib

        img = nib.load(p)
        slope, inter = img.header.get_slope_inter()
        if img.get_data_dtype().kind not in "biu":
            raise ImageError(f"{p}: stored as {img.get_data_dtype()}, not integer labels")
        if slope not in (None, 1.0) or inter not in (None, 0.0):
            raise ImageError(f"{p}: scaled data (slope {slope}, intercept {inter}), not labels")
        data, affine = _load_nifti(p, scaled=False)
        return np.ascontiguousarray(data.transpose(2, 1, 0)), _spacing_zyx(affine), affine

    return _wrap_errors(p, load)


def _load_reference(reference: Any) -> Any:
    import nibabel as nib

    if isinstance(reference, nib.Nifti1Image | nib.Nifti2Image):
        return reference
    ref_path = Path(reference)
    _check_read_format(ref_path, _NIFTI)

    def load() -> Any:
        img = nib.load(ref_path)
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise ImageError(f"{ref_path}: not a NIfTI image")
        return img

    return _wrap_errors(ref_path, load)


def _labels_like_nifti(labels: np.ndarray, ref: Any) -> Any:
    """A NIfTI image of canonical ``(Z, Y, X)`` labels in ``ref``'s own voxel order, with its
    header (so its affine, units and codes) unchanged apart from the data type and scaling.
    ``ref`` is a nibabel image or anything with its ``shape``, ``affine`` and ``header``."""
    import nibabel as nib
    from nibabel import orientations as ornt_mod

    native_shape = tuple(int(s) for s in ref.shape[:3])
    native_shape = native_shape + (1,) * (3 - len(native_shape))
    orientation = ornt_mod.io_orientation(ref.affine)
    canon_xyz = tuple(int(native_shape[int(a)]) for a in np.argsort(orientation[:, 0]))
    if labels.ndim == 2:
        labels = labels[None]
    _check_shape(labels, canon_xyz[::-1], "the reference volume")
    ras = ornt_mod.axcodes2ornt(("R", "A", "S"))
    back = ornt_mod.ornt_transform(ras, orientation)
    data = np.ascontiguousarray(ornt_mod.apply_orientation(labels.transpose(2, 1, 0), back))
    header = ref.header.copy()
    # affine None: the copied header's qform and sform are written exactly as they were
    cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = cls(data.reshape(native_shape), None, header=header)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"] = float(data.min())
    img.header["cal_max"] = float(data.max())
    return img


def _labels_with_affine(labels: np.ndarray, affine: np.ndarray) -> Any:
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ImageError(f"reference affine must be a finite 4x4 matrix, got {affine.shape}")
    if labels.ndim == 2:
        labels = labels[None]
    img = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)), affine)
    img.set_data_dtype(labels.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def _header_reference(block: bytes) -> Any:
    """A stand-in for the source image (shape, affine, header) from its raw NIfTI header."""
    import io as _bytes_io
    from types import SimpleNamespace

    import nibabel as nib

    klass = nib.Nifti2Header if len(block) == 540 else nib.Nifti1Header
    header = klass.from_fileobj(_bytes_io.BytesIO(bytes(block)))
    return SimpleNamespace(
        shape=header.get_data_shape(), affine=header.get_best_affine(), header=header
    )
