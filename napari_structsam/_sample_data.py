"""Sample data: the MNI152 T1 template bundled with nilearn (no download)."""

from __future__ import annotations

import numpy as np


def _mni152_affine() -> np.ndarray:
    """The canonical (RAS+) affine of nilearn's 1 mm MNI152 template."""
    import warnings

    import nibabel as nib
    from nilearn import datasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        template = datasets.load_mni152_template(resolution=1)
    return np.asarray(nib.as_closest_canonical(template).affine, dtype=np.float64)


def mni152_volume_sample():
    """The whole 1 mm MNI152 T1 volume, (Z, Y, X) with its voxel spacing as the layer scale.

    Y is flipped so that axial slices show anterior at the top; the layer is placed by its
    scale only, so napari's world is not MNI space here (unlike files opened by the reader),
    but ``metadata`` holds the MNI affine of the flipped array, so labels drawn on it save in
    MNI space.
    """
    from structsam.samples import mni152_volume

    vol, spacing = mni152_volume()
    # Flip Y so that axial slices show anterior at the top, as structsam.samples.mni152_slice.
    vol = np.ascontiguousarray(vol[:, ::-1, :])
    flip_y = np.eye(4)
    flip_y[1, 1], flip_y[1, 3] = -1.0, vol.shape[1] - 1  # nibabel (x, y, z) voxel order
    meta = {
        "name": "MNI152 T1",
        "scale": spacing,
        "colormap": "gray",
        "contrast_limits": (0, 1),
        "metadata": {
            "structsam_source": None,
            "structsam_affine": _mni152_affine() @ flip_y,
            "structsam_shape": vol.shape,
        },
    }
    return [(vol, meta, "image")]


def mni152_slice_sample():
    """One axial slice through the middle of the brain (2D)."""
    from structsam.samples import mni152_slice, mni152_volume

    _, spacing = mni152_volume()
    image = mni152_slice("axial")
    meta = {
        "name": "MNI152 T1 axial slice",
        "scale": spacing[1:],
        "colormap": "gray",
        "contrast_limits": (0, 1),
    }
    return [(image, meta, "image")]
