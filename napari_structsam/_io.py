"""napari reader and writer: NIfTI files and DICOM series in, labels back out as NIfTI.

The formats are ``structsam.io``'s (imported when a file is opened, not at napari start-up);
this module speaks napari: layer tuples, placement and the ``structsam_*`` keys of a layer's
``metadata``.

napari world coordinates: the reader places a ``(Z, Y, X)`` volume so that napari's world
coordinates are the scanner's RAS+ millimetres in reversed order: world ``(w0, w1, w2) = (S,
A, R)``, i.e. the world point of voxel ``(z, y, x)`` is ``(affine @ [x, y, z, 1])[2::-1]``. The
placement is given as the layer's ``scale``, ``translate``, ``rotate`` and ``shear``
(:func:`layer_placement`), so an oblique scan keeps its rotation and origin, and the voxel
spacing stays readable as ``layer.scale``. napari draws a 2D slice of an oblique layer without
its out-of-plane tilt (and says so in a warning); world coordinates and saving are exact.

The reader keeps the source's geometry in the layer's ``metadata`` (``structsam_source``,
``structsam_affine``, ``structsam_shape``, ``structsam_volume_index``, ``structsam_header``). The
writer saves labels in that geometry: from the labels layer's own ``metadata``, else from the
image layer they were drawn on (same shape, same placement; napari's *New labels* copies the
placement but not the metadata), else it refuses.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

_NIFTI = (".nii", ".nii.gz")
# SourceGeometry field -> layer metadata key
_KEYS = {
    "source": "structsam_source",
    "affine": "structsam_affine",
    "shape": "structsam_shape",
    "volume_index": "structsam_volume_index",
    "header": "structsam_header",
}


def get_reader(path):
    """A reader for one NIfTI file, one folder of DICOM slices or one ``.dcm`` slice (its
    folder's series is opened); None for anything else."""
    from structsam.io import is_dicom_folder

    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    path = str(path)
    one_slice = path.lower().endswith(".dcm") and os.path.isfile(path)
    if path.lower().endswith(_NIFTI) or one_slice or is_dicom_folder(path):
        return read_volume_layer
    return None


def read_volume_layer(path):
    if isinstance(path, (list, tuple)):
        path = path[0]
    if str(path).lower().endswith(".dcm") and os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))  # one slice picked: open its series
    return read_layer_data(path)


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


def geometry_metadata(geometry) -> dict[str, Any]:
    """A ``structsam.io.SourceGeometry`` as layer ``metadata`` entries."""
    return {key: getattr(geometry, field) for field, key in _KEYS.items()}


def geometry_from_metadata(metadata) -> Any:
    """The ``SourceGeometry`` held in a layer's ``metadata``; None when it holds none."""
    from structsam.io import SourceGeometry

    metadata = metadata or {}
    if metadata.get("structsam_affine") is None and metadata.get("structsam_source") is None:
        return None
    values = {field: metadata.get(key) for field, key in _KEYS.items()}
    if values["shape"] is not None:
        values["shape"] = tuple(int(s) for s in values["shape"])
    return SourceGeometry(**values)


def read_layer_data(path, volume_index: int | None = None) -> list[tuple]:
    """napari layer data ``[(volume_zyx, kwargs, "image")]`` for a NIfTI file, a DICOM folder
    or a ``.npy`` volume: placed in scanner space (see the module docstring), ``scale`` the
    voxel spacing, the source geometry in ``metadata``.

    A 4D/5D NIfTI read without ``volume_index`` gives its first volume and a warning that
    says how many there are and how to open another.
    """
    from pathlib import Path

    from structsam.io import file_format, read_source_volume

    p = Path(path)
    name = p.name[: -len(file_format(p))] if file_format(p) else p.name
    vol, geometry, n_volumes = read_source_volume(p, volume_index)
    if n_volumes > 1:
        if volume_index is None:
            warnings.warn(
                f"{p} holds {n_volumes} volumes; napari shows volume 0. To open volume k "
                f"(0..{n_volumes - 1}), in napari's console: data, kw, _ = "
                f"napari_structsam._io.read_layer_data({str(p)!r}, volume_index=k)[0]; "
                "viewer.add_image(data, **kw)",
                stacklevel=2,
            )
        name = f"{name} (volume {geometry.volume_index} of {n_volumes})"
    kwargs = {
        "name": name,
        **layer_placement(geometry.affine),
        "metadata": geometry_metadata(geometry),
    }
    return [(vol, kwargs, "image")]


def write_labels_layer(path, data, meta: dict[str, Any]) -> list[str]:
    """napari writer for a labels layer: ``structsam.io.write_labels`` in the source geometry
    its ``metadata`` carries (the plugin copies it onto the labels it makes, or finds the image
    a labels layer was drawn on). Refuses labels without it: a geometry made up from the
    layer's scale would put the labels in the wrong place, silently."""
    from structsam.errors import ImageError
    from structsam.io import write_labels as write_nifti_labels

    geometry = geometry_from_metadata(meta.get("metadata"))
    if geometry is None:
        name = meta.get("name") or "labels"
        raise ImageError(
            f"{path}: the labels layer {name!r} carries no source geometry (affine), so its "
            "voxels cannot be placed in scanner space. Open the scan with the StructSAM "
            "reader (File > Open, or structsam annotate FILE), draw the labels on it (select "
            "the image, then New labels, or use the structsam objects layer) and save again; "
            "nothing was written"
        )
    return [str(write_nifti_labels(path, np.asarray(data), geometry))]


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Labels -> .nii/.nii.gz, in the geometry of the file the image came from."""
    metadata = meta.get("metadata") or {}
    if "structsam_affine" not in metadata and "structsam_source" not in metadata:
        geometry = source_geometry_for(data, meta)
        if geometry is not None:
            meta = {**meta, "metadata": {**metadata, **geometry}}
    return write_labels_layer(path, data, meta)


def source_geometry_for(data, meta: dict) -> dict | None:
    """The ``structsam_*`` metadata of the image layer that labels ``(data, meta)`` were drawn
    on: an image layer of the current viewer, opened by the StructSAM reader, with the same
    shape and the same world placement (its own, or the one the plugin's layers get on an
    oblique scan). None when there is no such layer."""
    import napari
    from napari.layers import Image

    from ._placement import in_slice_matrix, world_matrix

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
