"""Reading images and volumes, and writing masks, with errors that name the file.

One module per format family: :mod:`.images` (PNG, JPEG, TIFF, NumPy; :func:`read_image` and
:func:`read_volume` for every format), :mod:`.nifti`, :mod:`.dicom` and :mod:`.masks` (masks
and label volumes written back in the source's geometry). No GUI vocabulary: the napari
reader and writer (layer placement, layer metadata) are the plugin's (``napari_structsam``).

Formats read by :func:`read_image`: PNG, JPEG, TIFF, NumPy ``.npy``, NIfTI (``.nii``,
``.nii.gz``) and DICOM (``.dcm``).  :func:`read_volume` reads NIfTI volumes (4D/5D: one volume
picked by ``volume_index``), folders of DICOM slices (:func:`read_dicom_series`) and 3D ``.npy``
arrays; :func:`read_source_volume` adds the :class:`SourceGeometry` that labels drawn on the
volume are saved with.  :func:`write_mask` writes PNG, TIFF, ``.npy`` and NIfTI masks and
:func:`write_labels` integer label volumes as NIfTI in the source's geometry, both atomically
(:func:`atomic_write`: a temporary file in the same folder, then :func:`os.replace`), so an
interrupted save never leaves a half-written file behind.

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

import os  # noqa: F401 (tests patch os.replace through this package)

import numpy as np  # noqa: F401 (tests patch np.save through this package)

from ._base import (
    READ_FORMATS,
    WRITE_FORMATS,
    PathLike,
    SourceGeometry,
    _atomic_write,  # noqa: F401 (the format-suffixed atomic write, for writers in structsam)
    atomic_write,
    file_format,
)
from .dicom import is_dicom_folder, read_dicom_series
from .images import read_image, read_source_volume, read_volume
from .masks import write_labels, write_mask
from .nifti import read_labels

__all__ = [
    "READ_FORMATS",
    "WRITE_FORMATS",
    "PathLike",
    "SourceGeometry",
    "atomic_write",
    "file_format",
    "is_dicom_folder",
    "read_dicom_series",
    "read_image",
    "read_labels",
    "read_source_volume",
    "read_volume",
    "write_labels",
    "write_mask",
]
