"""DICOM: single files and folders of slices (one series, ordered along its normal)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError
from ._base import PathLike, _drop_alpha, _replace_nonfinite, _take_slice, _wrap_errors
from .nifti import _canonical, _spacing_zyx


def _read_dicom(path: Path, slice_index: int | None, axis: int) -> tuple[np.ndarray, dict]:
    import pydicom

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ImageError(f"{path}: the DICOM file has no pixel data")
    arr = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    meta: dict[str, Any] = {"modality": str(getattr(ds, "Modality", ""))}
    if samples == 1:
        slope = getattr(ds, "RescaleSlope", None)
        intercept = getattr(ds, "RescaleIntercept", None)
        if slope is not None or intercept is not None:
            arr = arr.astype(np.float32) * np.float32(float(slope if slope is not None else 1))
            arr += np.float32(float(intercept if intercept is not None else 0))
            meta["rescaled"] = True
        if frames > 1 or arr.ndim == 3:
            arr, index = _take_slice(arr, slice_index, axis, path, "multi-frame DICOM")
            meta["slice_index"] = index
    else:
        if arr.ndim == 4:
            arr, index = _take_slice(arr, slice_index, 0, path, "multi-frame DICOM")
            meta["slice_index"] = index
        arr = _drop_alpha(arr)
    spacing = getattr(ds, "PixelSpacing", None)
    if spacing is not None and len(spacing) == 2:
        meta["spacing"] = (float(spacing[0]), float(spacing[1]))
    return arr, meta


_GAP_TOLERANCE = 0.01


_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _dicom_files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise ImageError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder of DICOM slices")
    entries = sorted(folder.iterdir())
    files = [f for f in entries if f.is_file() and not f.name.startswith(".")]
    # DICOMDIR is an index of the files, not an image
    files = [f for f in files if f.name.upper() != "DICOMDIR"]
    if not files:
        subs = [d.name for d in entries if d.is_dir() and not d.name.startswith(".")]
        hint = f"; it has sub-folders, pick one: {', '.join(subs[:10])}" if subs else ""
        raise ImageError(f"{folder}: the folder holds no DICOM files{hint}")
    return files


def _read_dicom_headers(files: list[Path]) -> list[Any]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets, not_dicom = [], []
    for f in files:
        try:
            try:
                datasets.append(pydicom.dcmread(f))
            except InvalidDicomError:
                # older files lack the 128-byte preamble; accept them if they parse as images
                ds = pydicom.dcmread(f, force=True)
                if "PixelData" not in ds and "SOPClassUID" not in ds:
                    raise
                datasets.append(ds)
        except InvalidDicomError:
            not_dicom.append(f.name)
        except Exception as exc:  # pydicom raises many types for a damaged file
            detail = str(exc).strip() or type(exc).__name__
            raise ImageError(
                f"{f}: cannot read the DICOM file; it may be truncated or corrupt ({detail})"
            ) from exc
    if not_dicom:
        shown = ", ".join(not_dicom[:5]) + (" ..." if len(not_dicom) > 5 else "")
        raise ImageError(
            f"{files[0].parent}: {len(not_dicom)} of {len(files)} files are not DICOM "
            f"({shown}); a series folder must hold only the slices of one series"
        )
    return datasets


def _check_one_series(folder: Path, datasets: list[Any], files: list[Path]) -> None:
    uids = [str(getattr(ds, "SeriesInstanceUID", "")) for ds in datasets]
    distinct = sorted(set(uids))
    if len(distinct) > 1:
        counts = ", ".join(
            f"{uid or '(no UID)'}: {uids.count(uid)} files "
            f"{str(getattr(datasets[uids.index(uid)], 'SeriesDescription', '')).strip()!r}"
            for uid in distinct[:5]
        )
        raise ImageError(
            f"{folder}: the folder mixes {len(distinct)} DICOM series ({counts}); put each "
            "series in its own folder"
        )
    missing = [f.name for f, ds in zip(files, datasets, strict=True) if "PixelData" not in ds]
    if missing:
        raise ImageError(f"{folder}: files without pixel data: {', '.join(missing[:5])}")
    for attr in ("Rows", "Columns", "SamplesPerPixel"):
        values = {int(getattr(ds, attr, 1) or 1) for ds in datasets}
        if len(values) > 1:
            raise ImageError(
                f"{folder}: the slices differ in {attr} ({sorted(values)}); they are not one volume"
            )
    spacings = {
        tuple(np.round(v, 6))
        for v in (_floats(ds, "PixelSpacing", 2) for ds in datasets)
        if v is not None
    }
    if len(spacings) > 1:
        raise ImageError(f"{folder}: the slices differ in PixelSpacing ({sorted(spacings)})")
    if int(getattr(datasets[0], "SamplesPerPixel", 1) or 1) != 1:
        raise ImageError(f"{folder}: colour DICOM slices cannot form a grey volume")
    frames = [f.name for f, ds in zip(files, datasets, strict=True) if _n_frames(ds) > 1]
    if frames and len(datasets) > 1:
        raise ImageError(
            f"{folder}: multi-frame files ({', '.join(frames[:3])}) mixed with other files; "
            "read a multi-frame file on its own"
        )


def _n_frames(ds: Any) -> int:
    return int(getattr(ds, "NumberOfFrames", 1) or 1)


def _floats(ds: Any, attr: str, n: int) -> np.ndarray | None:
    value = getattr(ds, attr, None)
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.isfinite(arr).all() else None


def _slice_order(
    folder: Path, datasets: list[Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, str]:
    """Order of the slices, in-plane directions (LPS), slice step (LPS) and spacing."""
    orients = [_floats(ds, "ImageOrientationPatient", 6) for ds in datasets]
    positions = [_floats(ds, "ImagePositionPatient", 3) for ds in datasets]
    if all(o is not None for o in orients):
        stacked = np.stack(orients)
        if np.abs(stacked - stacked[0]).max() > 1e-4:
            raise ImageError(
                f"{folder}: the slices have different orientations (ImageOrientationPatient); "
                "they are not one volume"
            )
        row_dir, col_dir = stacked[0, :3], stacked[0, 3:]
    else:
        row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    normal = np.cross(row_dir, col_dir)
    n = len(datasets)
    thickness = getattr(datasets[0], "SpacingBetweenSlices", None) or getattr(
        datasets[0], "SliceThickness", None
    )
    if all(p is not None for p in positions) and all(o is not None for o in orients):
        pos = np.stack(positions)
        along = pos @ normal  # position along the slice normal
        order = np.argsort(along, kind="stable")
        gaps = np.diff(along[order])
        if n > 1 and gaps.min() < 1e-4:
            raise ImageError(
                f"{folder}: several files share one slice position; the folder may hold "
                "more than one acquisition (echoes, time points): split them into folders"
            )
        if n > 1:
            spacing = float(np.median(gaps))
            if np.abs(gaps - spacing).max() > _GAP_TOLERANCE * spacing:
                warnings.warn(
                    f"{folder}: slice gaps vary from {gaps.min():g} to {gaps.max():g} mm (missing "
                    f"slices?); the volume uses their median, {spacing:g} mm",
                    stacklevel=4,
                )
            step = (pos[order[-1]] - pos[order[0]]) / (n - 1)
        else:
            spacing = float(thickness) if thickness else 1.0
            step = normal * spacing
        return order, row_dir, col_dir, step, "ImagePositionPatient"
    numbers = [getattr(ds, "InstanceNumber", None) for ds in datasets]
    if any(v is None for v in numbers):
        raise ImageError(
            f"{folder}: the slices carry neither ImagePositionPatient nor InstanceNumber, so "
            "their order is unknown"
        )
    order = np.argsort(np.asarray([int(v) for v in numbers]), kind="stable")
    spacing = float(thickness) if thickness else 1.0
    warnings.warn(
        f"{folder}: no slice positions; slices ordered by InstanceNumber with {spacing:g} mm "
        "spacing",
        stacklevel=4,
    )
    return order, row_dir, col_dir, normal * spacing, "InstanceNumber"


def _rescaled(ds: Any, path: Path) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        detail = str(exc).strip() or type(exc).__name__
        raise ImageError(
            f"{path}: cannot decode the pixel data; the file may be truncated or corrupt ({detail})"
        ) from exc
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    # float64 first: int16 * a fractional slope must not round before the intercept is added
    return (pixels.astype(np.float64) * slope + intercept).astype(np.float32)


def _dicom_series(folder: Path) -> tuple[np.ndarray, tuple[float, float, float], dict]:
    files = _dicom_files(folder)
    datasets = _read_dicom_headers(files)
    _check_one_series(folder, datasets, files)
    if len(datasets) == 1 and _n_frames(datasets[0]) > 1:
        raise ImageError(
            f"{files[0]}: a single multi-frame DICOM file; read it with read_image(path, "
            "slice_index=k)"
        )
    order, row_dir, col_dir, step, sorted_by = _slice_order(folder, datasets)
    planes = [_rescaled(datasets[i], files[i]) for i in order]
    data = np.stack(planes)  # (slice, row, column)
    first = datasets[order[0]]
    spacing_rc = _floats(first, "PixelSpacing", 2)
    if spacing_rc is None:
        spacing_rc = np.ones(2)
    origin = _floats(first, "ImagePositionPatient", 3)
    origin = np.zeros(3) if origin is None else origin
    # voxel (column i, row j, slice k) -> patient position, then to RAS
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing_rc[1]
    lps[:3, 1] = col_dir * spacing_rc[0]
    lps[:3, 2] = step
    lps[:3, 3] = origin
    affine = np.eye(4)
    affine[:3] = _LPS_TO_RAS @ lps[:3]
    data_xyz, affine = _canonical(data.transpose(2, 1, 0), affine)
    vol = np.ascontiguousarray(data_xyz.transpose(2, 1, 0), dtype=np.float32)
    meta = {
        "affine": affine,
        "files": [str(files[i]) for i in order],
        "sorted_by": sorted_by,
        "modality": str(getattr(first, "Modality", "")),
        "series_uid": str(getattr(first, "SeriesInstanceUID", "")),
        "series_description": str(getattr(first, "SeriesDescription", "")),
    }
    return vol, _spacing_zyx(affine), meta


def read_dicom_series(
    folder: PathLike, nonfinite: str = "replace"
) -> tuple[np.ndarray, tuple[float, float, float], dict[str, Any]]:
    """Read a folder of single-frame DICOM slices as ``(volume_zyx float32, spacing_zyx, meta)``.

    Slices are sorted by ``ImagePositionPatient`` projected on the slice normal (the cross
    product of the ``ImageOrientationPatient`` directions), or by ``InstanceNumber`` when the
    positions are missing; each slice's ``RescaleSlope``/``RescaleIntercept`` is applied (CT
    comes back in Hounsfield units).  The volume is then reoriented to the closest canonical
    RAS+ orientation and laid out ``(Z, Y, X)`` exactly as :func:`read_volume` does for NIfTI,
    so ``meta["affine"]`` (canonical, nibabel ``(x, y, z)`` voxel order) can be handed to
    :func:`write_labels`.  ``meta`` also has ``files`` (in slice order), ``sorted_by``,
    ``modality``, ``series_uid`` and ``series_description``.

    Raises :class:`~structsam.errors.ImageError` for a missing or empty folder, files that are
    not DICOM or are damaged, mixed series, slices of different sizes or orientations, and
    duplicate slice positions.  Hidden files and ``DICOMDIR`` are ignored.
    """
    p = Path(folder)
    vol, spacing, meta = _wrap_errors(p, lambda: _dicom_series(p))
    return _replace_nonfinite(vol, p, nonfinite), spacing, meta


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path: PathLike) -> bool:
    """True for a folder that holds DICOM slices: a ``.dcm`` file, or one of its first three
    files starting with the DICOM preamble (``DICM`` at byte 128). Cheap: reads no pixels."""
    p = Path(path)
    if not p.is_dir():
        return False
    names = sorted(n for n in os.listdir(p) if not n.startswith("."))
    if any(n.lower().endswith(".dcm") for n in names):
        return True
    return any(_has_dicom_preamble(p / n) for n in names[:3])
