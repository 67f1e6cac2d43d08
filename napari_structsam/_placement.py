"""Where a layer's voxels are in napari's world, and where napari draws them on a slice."""

from __future__ import annotations

import numpy as np


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


def in_slice_matrix(image) -> np.ndarray:
    """The image layer's data-to-world matrix as napari shows it in the (Y, X) view: the
    in-plane block as drawn, the slice axes as napari picks slices (from the inverse), and no
    coupling between them. Equal to the full matrix unless the image is oblique."""
    m = world_matrix(image)
    n = m.shape[0] - 1
    k = n - 2  # leading, not displayed axes
    if k <= 0:
        return m
    inv = np.linalg.inv(m)
    a = np.linalg.inv(inv[:k, :k])
    p = np.eye(n + 1)
    p[k:n, k:n], p[k:n, n] = m[k:n, k:n], m[k:n, n]
    p[:k, :k], p[:k, n] = a, -a @ inv[:k, n]
    return p


def displayed_position(image, world_point) -> np.ndarray:
    """Data coordinates of ``world_point`` (e.g. ``viewer.dims.point``) in ``image`` as napari
    draws it: for an oblique scan, unlike ``image.world_to_data``, the slice index is the one
    shown."""
    n = image.ndim
    point = np.asarray(world_point, dtype=float)[-n:]
    return (np.linalg.inv(in_slice_matrix(image)) @ np.append(point, 1.0))[:n]
