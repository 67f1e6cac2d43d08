"""Sample data: the MNI152 T1 template bundled with nilearn (no download)."""

from __future__ import annotations

import numpy as np


def mni152_volume_sample():
    """The whole 1 mm MNI152 T1 volume, (Z, Y, X) with its voxel spacing as the layer scale."""
    from structsam.samples import mni152_volume

    vol, spacing = mni152_volume()
    # Flip Y so that axial slices show anterior at the top, as structsam.samples.mni152_slice.
    vol = np.ascontiguousarray(vol[:, ::-1, :])
    meta = {"name": "MNI152 T1", "scale": spacing, "colormap": "gray", "contrast_limits": (0, 1)}
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
