"""Reading images and volumes, and writing masks, with errors that name the file.

Formats read by :func:`read_image`: PNG, JPEG, TIFF, NumPy ``.npy``, NIfTI (``.nii``,
``.nii.gz``) and DICOM (``.dcm``).  :func:`read_volume` reads NIfTI volumes.  :func:`write_mask`
writes PNG, TIFF, ``.npy`` and NIfTI masks atomically (a temporary file in the same folder, then
:func:`os.replace`), so an interrupted save never leaves a half-written mask behind.

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
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageError

__all__ = [
    "READ_FORMATS",
    "WRITE_FORMATS",
    "file_format",
    "read_image",
    "read_volume",
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


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Data (float32, scaling applied) and affine of a NIfTI file, reoriented to canonical RAS+,
    as an (x, y, z) array."""
    import nibabel as nib
    from nibabel import orientations as ornt_mod

    img = nib.load(path)
    shape = tuple(int(s) for s in img.shape)
    # Trailing singleton dimensions beyond the third (a 4D file with one volume) are dropped.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise ImageError(
            f"{path} is a 4D NIfTI with {shape[3]} volumes (shape {shape}); structsam reads one "
            "3D volume: pick a volume first, e.g. nilearn.image.index_img(path, k) or "
            f"fslroi {path.name} out.nii.gz k 1"
        )
    if len(shape) > 4:
        raise ImageError(f"{path}: a NIfTI with shape {shape} has too many dimensions")
    data = np.asarray(img.get_fdata(dtype=np.float32))
    data = data.reshape(shape + (1,) * (3 - len(shape)))
    affine = np.asarray(img.affine, dtype=np.float64)
    orientation = ornt_mod.io_orientation(affine)
    data = ornt_mod.apply_orientation(data, orientation)
    affine = affine @ ornt_mod.inv_ornt_aff(orientation, shape + (1,) * (3 - len(shape)))
    return np.ascontiguousarray(data, dtype=np.float32), affine


def _nifti_zyx(path: Path) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    data_xyz, affine = _load_nifti(path)
    vol = np.ascontiguousarray(data_xyz.transpose(2, 1, 0))
    voxel = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # (x, y, z) voxel sizes
    spacing = (float(voxel[2]), float(voxel[1]), float(voxel[0]))
    return vol, spacing, affine


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


def read_volume(path: PathLike) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read a NIfTI volume as ``(volume_zyx float32, spacing_zyx, affine)``.

    The volume is reoriented to the closest canonical RAS+ orientation and transposed to
    ``(Z, Y, X)`` (see the module docstring); ``spacing_zyx`` is in the same order and
    ``affine`` is the canonical affine of the nibabel ``(x, y, z)`` voxel order.  Scaling
    (``scl_slope``/``scl_inter``) is applied.  A 2D NIfTI comes back with Z = 1.
    """
    p = Path(path)
    _check_read_format(p, _NIFTI)
    return _wrap_errors(p, lambda: _nifti_zyx(p))


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
    or corrupt file, a 3D source without ``slice_index``, or a 4D NIfTI.
    """
    p = Path(path)
    ext = _check_read_format(p)
    meta: dict[str, Any] = {"path": str(p), "format": ext[1:], "spacing": None, "axis": axis}

    def load() -> tuple[np.ndarray, dict[str, Any]]:
        if ext in _NIFTI:
            vol, spacing, affine = _nifti_zyx(p)
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
        if ext in _PIL:
            return _read_pil(p)
        if ext in _TIFF:
            return _read_tiff(p, slice_index, axis)
        if ext == ".npy":
            return _read_npy(p, slice_index, axis)
        return _read_dicom(p, slice_index, axis)

    arr, extra = _wrap_errors(p, load)
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
    """Write through ``writer`` into a hidden temporary file beside ``path``, flush it to disk,
    then rename it over ``path``; the temporary file is removed if anything fails."""
    ext = file_format(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp{ext}"
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
