"""Reading images and volumes, and writing masks, with errors that name the file.

Formats read by :func:`read_image`: PNG, JPEG, TIFF, NumPy ``.npy``, NIfTI (``.nii``,
``.nii.gz``) and DICOM (``.dcm``).  :func:`read_volume` reads NIfTI volumes (4D/5D: one volume
picked by ``volume_index``), folders of DICOM slices (:func:`read_dicom_series`) and 3D ``.npy``
arrays.  :func:`write_mask` writes PNG, TIFF, ``.npy`` and NIfTI masks and :func:`write_labels`
integer label volumes as NIfTI in the source's geometry, both atomically (a temporary file in
the same folder, then :func:`os.replace`), so an interrupted save never leaves a half-written
file behind.  :func:`read_layer_data` and :func:`write_labels_layer` wrap these for a napari
reader and writer (voxel spacing as the layer scale).

Array conventions
-----------------
* 2D images are ``(H, W)`` (row, column); colour images are ``(H, W, 3)``; an alpha channel is
  dropped.  Grey images keep their stored dtype (uint8, uint16, float32, ...); NIfTI and
  rescaled DICOM data are float32.
* NIfTI volumes are reoriented to the closest canonical (RAS+) orientation, as
  :func:`nibabel.as_closest_canonical` does, and returned as ``(Z, Y, X)``: the nibabel ``(x, y,
  z)`` array transposed, so axis 0 runs inferior->superior (axial slices), axis 1
  posterior->anterior (coronal slices) and axis 2 left->right (sagittal slices).  Spacing is
  given in the same ``(z, y, x)`` order.  The returned affine is the canonical one and maps
  voxel indices in nibabel order: ``world = affine @ [x, y, z, 1]`` with ``x = index along axis
  2`` of the returned array.  No display flips are applied, so an axial slice shows anterior at
  the bottom when drawn with row 0 at the top.

napari world coordinates
------------------------
:func:`read_layer_data` places the ``(Z, Y, X)`` volume so that napari's world coordinates are
the scanner's RAS+ millimetres in reversed order: world ``(w0, w1, w2) = (S, A, R)``, i.e. the
world point of voxel ``(z, y, x)`` is ``(affine @ [x, y, z, 1])[2::-1]``.  The placement is
given as the layer's ``scale``, ``translate``, ``rotate`` and ``shear`` (see
:func:`layer_placement`), so an oblique scan keeps its rotation and origin, and the voxel
spacing stays readable as ``layer.scale``.  napari draws a 2D slice of an oblique layer without
its out-of-plane tilt (and says so in a warning); world coordinates and saving are exact.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageError

__all__ = [
    "READ_FORMATS",
    "WRITE_FORMATS",
    "file_format",
    "layer_placement",
    "read_image",
    "read_dicom_series",
    "read_labels",
    "read_layer_data",
    "read_volume",
    "write_labels",
    "write_labels_layer",
    "write_mask",
]

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


# --------------------------------------------------------------------------------------------
# reading


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


# --------------------------------------------------------------------------------------------
# DICOM series

# Relative spread of the slice gaps above which a series counts as irregularly spaced.
_GAP_TOLERANCE = 0.01
# An LPS (DICOM patient) direction -> RAS (NIfTI world) direction.
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
    (see the module docstring); ``spacing_zyx`` is in the same order (napari's layer
    ``scale``) and ``affine`` is the canonical affine of the nibabel ``(x, y, z)`` voxel
    order.  NIfTI scaling (``scl_slope``/``scl_inter``) is applied.  A 2D NIfTI comes back
    with Z = 1.

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


# napari world axes (w0, w1, w2) = (S, A, R): the RAS+ axes reversed, like (Z, Y, X) voxels
_REVERSE_XYZ = np.eye(4)[[2, 1, 0, 3]]


def _world_zyx(affine: np.ndarray) -> np.ndarray:
    """The 4x4 map from ``(z, y, x)`` voxel indices to napari world ``(S, A, R)`` mm."""
    return _REVERSE_XYZ @ np.asarray(affine, dtype=np.float64) @ _REVERSE_XYZ


def layer_placement(affine: np.ndarray) -> dict[str, Any]:
    """napari ``scale``, ``translate``, ``rotate`` and ``shear`` that place a ``(Z, Y, X)``
    volume with canonical ``affine`` (as :func:`read_volume` returns it) in scanner space.

    napari composes ``translate + rotate @ shear @ diag(scale)``; the linear part of the
    affine is split by a QR decomposition (rotation times upper triangle), so ``scale`` is the
    voxel spacing, ``rotate`` a proper rotation (a mirrored grid gets a negative last scale)
    and ``shear`` zero unless the scanner grid itself is skewed.
    """
    m = _world_zyx(affine)
    q, r = np.linalg.qr(m[:3, :3])
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    q, r = q * signs, signs[:, None] * r
    if np.linalg.det(q) < 0:  # napari wants a rotation; the mirror goes into the scale
        q[:, 2] *= -1
        r[2] *= -1
    scale = np.diag(r).copy()
    shear = r / scale[None, :]
    return {
        "scale": tuple(float(v) for v in scale),
        "translate": tuple(float(v) for v in m[:3, 3]),
        "rotate": q,
        "shear": shear[np.triu_indices(3, 1)],
    }


def _nifti_header(path: Path) -> tuple[int, bytes]:
    """(number of volumes, raw header) of a NIfTI file, reading the header only."""
    import nibabel as nib

    img = nib.load(path)
    extra = _extra_volumes(tuple(int(s) for s in img.shape))
    return (int(np.prod(extra)) if extra else 1), bytes(img.header.binaryblock)


def read_layer_data(path: PathLike, volume_index: int | None = None) -> list[tuple]:
    """napari layer data ``[(volume_zyx, kwargs, "image")]`` for a NIfTI file, a DICOM folder
    or a ``.npy`` volume.

    The placement (:func:`layer_placement`) makes napari's world coordinates the scanner's
    (S, A, R) millimetres (see the module docstring); ``scale`` is the voxel spacing.
    ``metadata`` holds the source geometry that :func:`write_labels_layer` saves labels with:
    ``structsam_source`` (absolute path, ``None`` for ``.npy``), ``structsam_affine``
    (canonical), ``structsam_shape`` (Z, Y, X), ``structsam_volume_index`` and, for NIfTI,
    ``structsam_header`` (the raw header bytes, so a moved or deleted source still saves).

    A 4D/5D NIfTI read without ``volume_index`` gives its first volume and a warning that
    says how many there are and how to open another.
    """
    p = Path(path)
    name = p.name[: -len(file_format(p))] if file_format(p) else p.name
    nifti = not p.is_dir() and file_format(p) in _NIFTI
    header = None
    if nifti and p.is_file():
        n_volumes, header = _wrap_errors(p, lambda: _nifti_header(p))
        if n_volumes > 1:
            if volume_index is None:
                volume_index = 0
                warnings.warn(
                    f"{p} holds {n_volumes} volumes; napari shows volume 0. To open volume k "
                    f"(0..{n_volumes - 1}), in napari's console: data, kw, _ = "
                    f"structsam.io.read_layer_data({str(p)!r}, volume_index=k)[0]; "
                    "viewer.add_image(data, **kw)",
                    stacklevel=2,
                )
            name = f"{name} (volume {volume_index} of {n_volumes})"
    vol, _, affine = read_volume(p, volume_index=volume_index)
    source = os.path.abspath(p) if p.is_dir() or nifti else None
    kwargs = {
        "name": name,
        **layer_placement(affine),
        "metadata": {
            "structsam_source": source,
            "structsam_affine": affine,
            "structsam_shape": tuple(int(s) for s in vol.shape),
            "structsam_volume_index": volume_index,
            "structsam_header": header,
        },
    }
    return [(vol, kwargs, "image")]


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


# --------------------------------------------------------------------------------------------
# writing


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


def _binary_mask(mask: np.ndarray) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype != bool and not np.issubdtype(arr.dtype, np.number):
        raise ImageError(f"mask must be a boolean or numeric array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ImageError(f"mask is empty (shape {arr.shape})")
    return arr != 0


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


# NIfTI-1 integer types a label array may keep as they are; others are narrowed to these.
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


def _check_shape(labels: np.ndarray, expected: Any, what: str) -> None:
    got = tuple(labels.shape) if labels.ndim == 3 else (1, *labels.shape)
    expected = tuple(int(s) for s in expected)
    if got != expected:
        raise ImageError(
            f"labels shape {tuple(labels.shape)} does not match {what} {expected} (Z, Y, X, "
            "as read_volume returns it); nothing was written"
        )


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


def _labels_from_geometry(target: Path, labels: np.ndarray, geometry: Any) -> Any:
    """The NIfTI image of ``labels`` in the geometry held in a layer's ``metadata``
    (:func:`read_layer_data`): the raw header if there is one (the source file may have moved),
    else the source NIfTI file, else the canonical affine (DICOM series)."""
    source = geometry.get("structsam_source")
    affine = geometry.get("structsam_affine")
    shape = geometry.get("structsam_shape")
    block = geometry.get("structsam_header")
    if affine is None and source is None:
        raise ImageError("the reference metadata holds no structsam_affine or structsam_source")
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
    * a napari layer's ``metadata`` from :func:`read_layer_data` (a mapping with
      ``structsam_*`` keys): as the source NIfTI (from the header held there, so the file may
      have moved) or DICOM series;
    * a 4x4 affine (``read_volume``'s third value) with ``shape``, the ``(Z, Y, X)`` shape of
      the volume it belongs to; or ``None`` (identity; ``shape`` checked if given).

    The labels' shape is checked against every kind of reference, and the path of a source
    scan is refused, so labels never overwrite the scan.  The label values and their integer
    dtype come back unchanged from :func:`read_labels` (bool is stored as uint8, int64
    narrowed to the smallest NIfTI-1 type that holds the values).  Raises
    :class:`~structsam.errors.ImageError` for non-integer labels, a wrong shape, the source's
    own path or a non-NIfTI path; the temporary file is removed on any failure.
    """
    from collections.abc import Mapping

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
    elif isinstance(reference, Mapping):
        img = _labels_from_geometry(p, arr, reference)
    elif isinstance(reference, nib.Nifti1Image | nib.Nifti2Image):
        _refuse_source(p, reference.get_filename())
        img = _labels_like_nifti(arr, reference)
    else:
        img = _labels_from_path(p, arr, reference)
    _atomic_write(p, lambda tmp: nib.save(img, tmp))
    return p


def write_labels_layer(path: PathLike, data: Any, meta: dict[str, Any]) -> list[str]:
    """napari writer for a labels layer: :func:`write_labels` with the source geometry that
    :func:`read_layer_data` put in the image layer's ``metadata`` and that the labels layer
    carries (``napari_structsam`` copies it onto the labels it makes or finds the image a
    labels layer was drawn on).  Refuses labels without it: a geometry made up from the
    layer's scale would put the labels in the wrong place, silently."""
    metadata = meta.get("metadata") or {}
    geometry = {k: v for k, v in metadata.items() if k.startswith("structsam_")}
    if geometry.get("structsam_affine") is None and geometry.get("structsam_source") is None:
        name = meta.get("name") or "labels"
        raise ImageError(
            f"{path}: the labels layer {name!r} carries no source geometry (affine), so its "
            "voxels cannot be placed in scanner space. Open the scan with the StructSAM "
            "reader (File > Open, or structsam annotate FILE), draw the labels on it (select "
            "the image, then New labels, or use the structsam objects layer) and save again; "
            "nothing was written"
        )
    return [str(write_labels(path, np.asarray(data), geometry))]
