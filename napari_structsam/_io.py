"""napari reader and writer: NIfTI files and DICOM series in, labels back out as NIfTI.

The work is done by ``structsam.io`` (imported when a file is opened, not at napari start-up).
The reader places the image so that napari's world coordinates are scanner coordinates (RAS+
millimetres in (S, A, R) order, see ``structsam.io``) and keeps the source's geometry in the
layer's ``metadata``. The writer saves labels in that geometry: from the labels layer's own
``metadata``, else from the image layer they were drawn on (same shape, same placement; napari's
*New labels* copies the placement but not the metadata), else it refuses.
"""

from __future__ import annotations

import os

import numpy as np

_NIFTI = (".nii", ".nii.gz")


def _is_dicom_folder(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    names = [n for n in os.listdir(path) if not n.startswith(".")]
    return any(n.lower().endswith(".dcm") for n in names) or any(
        _has_dicom_preamble(os.path.join(path, n)) for n in names[:3]
    )


def _has_dicom_preamble(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def get_reader(path):
    """A reader for one NIfTI file, one folder of DICOM slices or one ``.dcm`` slice (its
    folder's series is opened); None for anything else."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    path = str(path)
    one_slice = path.lower().endswith(".dcm") and os.path.isfile(path)
    if path.lower().endswith(_NIFTI) or one_slice or _is_dicom_folder(path):
        return read_volume_layer
    return None


def read_volume_layer(path):
    from structsam.io import read_layer_data

    if isinstance(path, (list, tuple)):
        path = path[0]
    if str(path).lower().endswith(".dcm") and os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))  # one slice picked: open its series
    return read_layer_data(path)


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Labels -> .nii/.nii.gz, in the geometry of the file the image came from."""
    from structsam.io import write_labels_layer

    metadata = meta.get("metadata") or {}
    if "structsam_affine" not in metadata and "structsam_source" not in metadata:
        geometry = source_geometry_for(data, meta)
        if geometry is not None:
            meta = {**meta, "metadata": {**metadata, **geometry}}
    return write_labels_layer(path, data, meta)


def world_matrix(layer_or_meta) -> np.ndarray:
    """A layer's full data-to-world 4x4 matrix, from the layer or its state dict (``meta``)."""
    from napari.utils.transforms import Affine

    get = (
        layer_or_meta.get
        if isinstance(layer_or_meta, dict)
        else (lambda key: getattr(layer_or_meta, key))
    )
    placed = Affine(
        scale=get("scale"), translate=get("translate"), rotate=get("rotate"), shear=get("shear")
    ).affine_matrix
    extra = get("affine")
    extra = getattr(extra, "affine_matrix", extra)
    return np.asarray(extra, dtype=float) @ placed


def source_geometry_for(data, meta: dict) -> dict | None:
    """The ``structsam_*`` metadata of the image layer that labels ``(data, meta)`` were drawn
    on: an image layer of the current viewer, opened by the StructSAM reader, with the same
    shape and the same world placement (its own, or the one the plugin's layers get on an
    oblique scan). None when there is no such layer."""
    import napari
    from napari.layers import Image

    from ._layers import in_slice_matrix

    viewer = napari.current_viewer()
    if viewer is None:
        return None
    shape = tuple(np.shape(data))
    target = world_matrix(meta)
    # the same placement to a thousandth of a voxel
    scale = meta.get("scale")
    tol = 1e-3 * float(np.min(np.abs(np.asarray(1.0 if scale is None else scale, float))))
    for layer in viewer.layers:
        if not isinstance(layer, Image) or layer.multiscale or layer.rgb:
            continue
        geometry = {k: v for k, v in layer.metadata.items() if k.startswith("structsam_")}
        if geometry.get("structsam_affine") is None or tuple(layer.data.shape) != shape:
            continue
        for placed in (world_matrix(layer), in_slice_matrix(layer)):
            if np.allclose(placed, target, rtol=0, atol=tol):
                return geometry
    return None
