"""napari reader and writer: NIfTI files and DICOM series in, labels back out as NIfTI.

The work is done by ``structsam.io`` (imported when a file is opened, not at napari start-up);
the reader puts the voxel spacing in the layer's ``scale`` and the source's geometry in its
``metadata``, which the writer uses to save labels with the source's affine and header.
"""

from __future__ import annotations

import os

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
    """A reader for one NIfTI file or one folder of DICOM slices; None for anything else."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    path = str(path)
    if path.lower().endswith(_NIFTI) or _is_dicom_folder(path):
        return read_volume_layer
    return None


def read_volume_layer(path):
    from structsam.io import read_layer_data

    if isinstance(path, (list, tuple)):
        path = path[0]
    return read_layer_data(path)


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Labels -> .nii/.nii.gz, in the geometry of the file the image came from."""
    from structsam.io import write_labels_layer

    return write_labels_layer(path, data, meta)
