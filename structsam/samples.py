"""Bundled sample images for the runtime: the MNI152 T1 template and its masks (nilearn).

Evaluation cases with ground truth (lesions, phantom, coins, ventricles) live in
:mod:`structsam.eval.synthetic`; this module only loads images, so the runtime and the plugin
can show a sample without importing the evaluation package.

Orientation of slices (display convention): axial slices have anterior at the top and the
subject's left on the image left (neurological convention); coronal slices have superior at the
top; sagittal slices have superior at the top and anterior on the left.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np

__all__ = ["PLANES", "mni152_mask_slice", "mni152_slice", "mni152_volume"]

PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
_PLANE_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    arr.setflags(write=False)
    return arr


@functools.lru_cache(maxsize=1)
def _mni() -> dict[str, Any]:
    import nibabel as nib
    from nilearn import datasets

    def zyx(img: Any, dtype: Any) -> np.ndarray:
        canon = nib.as_closest_canonical(img)
        return _readonly(np.asarray(canon.get_fdata(), dtype=dtype).transpose(2, 1, 0))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t1 = datasets.load_mni152_template(resolution=1)
        brain = datasets.load_mni152_brain_mask(resolution=1)
        gm = datasets.load_mni152_gm_mask(resolution=1)
        wm = datasets.load_mni152_wm_mask(resolution=1)
    zooms = nib.as_closest_canonical(t1).header.get_zooms()[:3]
    return {
        "t1": zyx(t1, np.float32),
        "brain": zyx(brain, np.float32) > 0.5,
        "gm": zyx(gm, np.float32) > 0.5,
        "wm": zyx(wm, np.float32) > 0.5,
        "spacing": (float(zooms[2]), float(zooms[1]), float(zooms[0])),
    }


def mni152_volume() -> tuple[np.ndarray, tuple[float, float, float]]:
    """The MNI152 T1 template (nilearn, 1 mm) as ``(volume_zyx float32, spacing_zyx)``.

    The array is nilearn's RAS+ ``(x, y, z)`` data transposed to ``(Z, Y, X)`` (no flips):
    axis 0 inferior->superior, axis 1 posterior->anterior, axis 2 left->right.  Intensities are
    in 0..1.
    """
    data = _mni()
    return data["t1"].copy(), data["spacing"]


def _check_plane(plane: str) -> int:
    if plane not in _PLANE_AXIS:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    return _PLANE_AXIS[plane]


def _plane_view(vol: np.ndarray, plane: str, index: int) -> np.ndarray:
    axis = _check_plane(plane)
    n = vol.shape[axis]
    if not 0 <= index < n:
        raise ValueError(f"{plane} index {index} is out of range 0..{n - 1}")
    if plane == "axial":
        out = vol[index, ::-1, :]
    elif plane == "coronal":
        out = vol[::-1, index, :]
    else:
        out = vol[::-1, :, index][:, ::-1]
    return np.ascontiguousarray(out)


def _brain_middle(plane: str) -> int:
    axis = _check_plane(plane)
    brain = _mni()["brain"]
    other = tuple(i for i in range(3) if i != axis)
    present = np.flatnonzero(brain.any(axis=other))
    return int((present[0] + present[-1]) // 2)


def mni152_slice(plane: str = "axial", index: int | None = None) -> np.ndarray:
    """One 2D float32 slice of the MNI152 T1 template in display orientation (see the module
    docstring).  ``index`` is along the plane's axis of :func:`mni152_volume` (0 = axial,
    1 = coronal, 2 = sagittal); by default the middle of the brain's extent along that axis."""
    if index is None:
        index = _brain_middle(plane)
    return _plane_view(_mni()["t1"], plane, int(index)).astype(np.float32)


def mni152_mask_slice(which: str, plane: str = "axial", index: int | None = None) -> np.ndarray:
    """A slice of nilearn's MNI152 ``"brain"``, ``"gm"`` or ``"wm"`` mask, oriented like
    :func:`mni152_slice`."""
    if which not in ("brain", "gm", "wm"):
        raise ValueError(f"which must be 'brain', 'gm' or 'wm', got {which!r}")
    if index is None:
        index = _brain_middle(plane)
    return _plane_view(_mni()[which], plane, int(index)).astype(bool)
