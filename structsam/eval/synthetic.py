"""Offline evaluation data with known ground truth, built only from data bundled in installed
packages (no downloads), deterministically.

Sources
-------
* **MNI152 T1** (ICBM 2009a nonlinear symmetric, 1 mm, skull-stripped) and its brain, grey- and
  white-matter masks, bundled with nilearn.
* **Real CT and MR slices** bundled with pydicom: ``CT_small.dcm`` (a 128 x 128 thoracic CT
  slice through a vertebra), ``J2K_pixelrep_mismatch.dcm`` (a 512 x 512 head CT, JPEG 2000,
  decoded with Pillow) and ``examples_overlay.dcm`` (a 300 x 484 abdominal MR slice).
* **Shepp-Logan phantom** bundled with scikit-image, whose masks come from the phantom's
  published ellipse parameters (their weighted sum rebuilds the bundled 8-bit image to within
  its 1/255 quantisation step).
* **Coins photograph** bundled with scikit-image, whose coin masks are derived by the classic
  marker-based watershed on the Sobel gradient (markers: grey value < 30 background, > 150 coin),
  then hole filling and a small opening; only whole, compact coins away from the border are used.

Simulated lesions
-----------------
A lesion is a smooth irregular blob (a radial-harmonic "star" or a union of two or three
ellipses, "lobulated"), nominal radius 6-20 px, rendered with 4x supersampling and blurred with
a Gaussian (sigma 1-1.5 px) into an opacity ``alpha``.  It is placed wholly inside tissue (brain
mask for MNI, soft tissue / brain parenchyma / body for the DICOM slices) and blended as
``image * (1 - alpha) + alpha * (level + texture)``, where ``level`` is the mean of a ring of
tissue just outside the lesion plus or minus 25-40 % of the slice's tissue intensity range
(5th-95th percentile inside the body/brain mask), alternating bright and dark (flipped only when
the level would leave the CT display window or go negative on MR), and ``texture`` is smooth
noise matching the slice's own noise level plus a faint low-frequency heterogeneity.  The ground
truth is ``alpha > 0.5``.

CT slices are in Hounsfield units (RescaleSlope/Intercept applied) clipped to a clinical display
window (the head CT's own stored window, level 40 / width 100; a soft-tissue window level 40 /
width 400 for the body CT), so that lesions of realistic contrast are visible to a model that
normalises each image by its range.  The window is recorded in ``Case.meta["window"]``.

Orientation of MNI slices (display convention): axial slices have anterior at the top and the
subject's left on the image left (neurological convention); coronal slices have superior at the
top; sagittal slices have superior at the top and anterior on the left.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.signal import fftconvolve

from ..samples import (
    _PLANE_AXIS,
    PLANES,
    _brain_middle,
    _mni,
    _readonly,
    mni152_mask_slice,
    mni152_slice,
)

__all__ = [
    "KINDS",
    "PLANES",
    "SHEPP_LOGAN_ELLIPSES",
    "Case",
    "anatomy_cases",
    "case_from_mask",
    "coin_cases",
    "evaluation_cases",
    "lesion_cases",
    "phantom_cases",
    "shepp_logan_masks",
    "source_of",
    "split_cases",
    "split_of",
    "ventricle_cases",
]

# bundled kinds, then the formats of structsam.eval.datasets (a loaded case's kind is its format)
KINDS: tuple[str, ...] = (
    "lesion-mri",
    "lesion-ct",
    "phantom",
    "photo",
    "anatomy-mri",
    "hq-sam",
    "npz",
    "image-mask",
    "nifti",
)


@dataclass(eq=False)
class Case:
    """One evaluation image with its ground-truth mask and prompts.

    ``box`` is the tight box ``(x0, y0, x1, y1)`` of ``mask`` in pixel coordinates (x = column,
    y = row; x1/y1 are the last foreground column/row, inclusive).  ``point`` is ``(x, y)`` of
    the interior pixel farthest from the background (maximum of the distance transform).
    ``well_posed_hint`` is False where a box prompt cannot say which structure is meant (whole
    organ or tissue-class masks).  ``meta`` records how the case was made.
    """

    name: str
    image: np.ndarray
    mask: np.ndarray
    box: np.ndarray
    point: np.ndarray
    kind: str
    well_posed_hint: bool = True
    meta: dict[str, Any] = field(default_factory=dict)


def case_from_mask(
    name: str,
    image: np.ndarray,
    mask: np.ndarray,
    kind: str,
    well_posed_hint: bool = True,
    meta: dict[str, Any] | None = None,
) -> Case:
    """Build a :class:`Case`, deriving the tight box and the interior point from ``mask``."""
    m = np.ascontiguousarray(mask, dtype=bool)
    if m.ndim != 2 or not m.any():
        raise ValueError(f"case {name}: mask must be a non-empty 2D array, got shape {m.shape}")
    if image.shape[:2] != m.shape:
        raise ValueError(f"case {name}: image {image.shape} and mask {m.shape} differ")
    if kind not in KINDS:
        raise ValueError(f"case {name}: kind must be one of {KINDS}, got {kind!r}")
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    box = np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64)
    dist = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    point = np.array([x, y], dtype=np.float64)
    return Case(name, image, m, box, point, kind, well_posed_hint, dict(meta or {}))


# --------------------------------------------------------------------------------------------
# Bundled DICOM slices


@functools.lru_cache(maxsize=8)
def _dicom(name: str) -> dict[str, Any] | None:
    """Pixel data (rescaled to float32) of a DICOM test file bundled with pydicom, or None when
    the file is not there or cannot be decoded here."""
    import pydicom
    from pydicom.data import get_testdata_file

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = get_testdata_file(name)
            if path is None:
                return None
            ds = pydicom.dcmread(path)
            arr = ds.pixel_array.astype(np.float32)
            overlay = None
            if (0x6000, 0x3000) in ds:
                overlay = _readonly(np.asarray(ds.overlay_array(0x6000), dtype=bool))
    except Exception as exc:  # a missing pixel-data plugin or a damaged file: skip the source
        warnings.warn(f"bundled DICOM {name} is not usable here ({exc})", stacklevel=2)
        return None
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    arr = arr * np.float32(slope) + np.float32(intercept)
    spacing = tuple(float(s) for s in getattr(ds, "PixelSpacing", (1.0, 1.0)))
    return {
        "image": _readonly(arr),
        "spacing": spacing,
        "overlay": overlay,
        "modality": str(getattr(ds, "Modality", "")),
    }


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


# --------------------------------------------------------------------------------------------
# Lesion hosts: a real slice, where lesions may go, and how to judge contrast


@dataclass(eq=False)
class _Host:
    name: str
    image: np.ndarray  # float32, display-ready (CT clipped to its window)
    body: np.ndarray  # tissue whose intensity range sets the contrast
    tissue: np.ndarray  # where a lesion may lie, wholly
    avoid: np.ndarray | None  # at most 10 % of a lesion may cover these pixels (e.g. CSF)
    kind: str
    r_range: tuple[float, float]
    bounds: tuple[float, float]  # allowed lesion levels
    window: tuple[float, float] | None
    meta: dict[str, Any]


def _mni_host(plane: str, index: int) -> _Host:
    image = mni152_slice(plane, index)
    brain = mni152_mask_slice("brain", plane, index)
    brain = ndi.binary_fill_holes(brain)
    # Ventricles and wide CSF spaces (the template is ~0.25 there, grey matter ~0.55).
    csf = brain & (ndi.gaussian_filter(image, 1.0) < 0.4)
    return _Host(
        name=f"mni-{plane}-{'zyx'[_PLANE_AXIS[plane]]}{index:03d}",
        image=image,
        body=brain & (image > 0),
        tissue=ndi.binary_erosion(brain, iterations=2),
        avoid=csf,
        kind="lesion-mri",
        r_range=(6.0, 20.0),
        bounds=(0.02, math.inf),
        window=None,
        meta={
            "source": "MNI152 2009a T1 template (nilearn)",
            "plane": plane,
            "slice_index": index,
            "spacing": (1.0, 1.0),
        },
    )


def _ct_body_host() -> _Host:
    data = _dicom("CT_small.dcm")
    if data is None:
        raise RuntimeError("pydicom's bundled CT_small.dcm could not be read")
    hu = np.asarray(data["image"])
    window = (-160.0, 240.0)  # soft-tissue window, level 40 / width 400
    body = _largest_component(ndi.binary_fill_holes(hu > -400))
    smooth = ndi.median_filter(hu, size=5)
    soft = body & (smooth > -80) & (smooth < 150)
    soft = ndi.binary_opening(soft, iterations=2)
    return _Host(
        name="ct-body",
        image=np.clip(hu, *window).astype(np.float32),
        body=body,
        tissue=soft,
        avoid=None,
        kind="lesion-ct",
        r_range=(6.0, 12.0),
        bounds=window,
        window=window,
        meta={
            "source": "pydicom CT_small.dcm (thoracic CT, HU)",
            "spacing": data["spacing"],
        },
    )


def _ct_head_host() -> _Host | None:
    data = _dicom("J2K_pixelrep_mismatch.dcm")
    if data is None:
        return None
    hu = np.asarray(data["image"])
    window = (-10.0, 90.0)  # the file's own window: level 40 / width 100
    head = _largest_component(ndi.binary_fill_holes(hu > -300))
    smooth = ndi.median_filter(hu, size=5)
    parenchyma = head & (smooth > 10) & (smooth < 60)
    parenchyma = _largest_component(ndi.binary_opening(parenchyma, iterations=3))
    return _Host(
        name="ct-head",
        image=np.clip(hu, *window).astype(np.float32),
        body=head,
        tissue=parenchyma,
        avoid=None,
        kind="lesion-ct",
        r_range=(10.0, 20.0),
        bounds=window,
        window=window,
        meta={
            "source": "pydicom J2K_pixelrep_mismatch.dcm (head CT, HU)",
            "spacing": data["spacing"],
        },
    )


def _mr_abdomen_host() -> _Host | None:
    data = _dicom("examples_overlay.dcm")
    if data is None:
        return None
    img = np.asarray(data["image"])
    threshold = 0.12 * float(np.percentile(img, 99))
    body = _largest_component(ndi.binary_fill_holes(ndi.binary_opening(img > threshold, None, 2)))
    # Stay clear of the subcutaneous rim: lesions go into the abdomen proper.
    tissue = ndi.binary_erosion(body, iterations=14)
    if data["overlay"] is not None:
        # Keep clear of the real lesion the radiologist marked on this slice.
        marked = ndi.binary_fill_holes(ndi.binary_dilation(data["overlay"], iterations=6))
        tissue &= ~ndi.binary_dilation(marked, iterations=20)
    return _Host(
        name="mr-abdomen",
        image=img.astype(np.float32),
        body=body,
        tissue=tissue,
        avoid=None,
        kind="lesion-mri",
        r_range=(8.0, 20.0),
        bounds=(0.02 * float(np.percentile(img, 99)), math.inf),
        window=None,
        meta={
            "source": "pydicom examples_overlay.dcm (abdominal MR)",
            "spacing": data["spacing"],
        },
    )


# --------------------------------------------------------------------------------------------
# Lesion shapes and insertion


def _lesion_alpha(rng: np.random.Generator, radius: float, family: str, sigma: float) -> np.ndarray:
    """A square patch (odd side, lesion centred) of smooth opacity in [0, 1]."""
    half = int(math.ceil(1.9 * radius + 3 * sigma + 2))
    ss = 4  # supersampling factor
    side = 2 * half + 1
    fine = (np.arange(side * ss) + 0.5) / ss - 0.5 - half
    yy, xx = np.meshgrid(fine, fine, indexing="ij")
    if family == "star":
        ks = np.arange(2, 7)
        amps = rng.uniform(0.0, 1.0, size=ks.size) / ks
        amps *= rng.uniform(0.22, 0.38) / amps.sum()
        phases = rng.uniform(0, 2 * np.pi, size=ks.size)
        squash = rng.uniform(0.7, 1.0)
        rot = rng.uniform(0, np.pi)
        # An elliptical base shape, then radial harmonics on top.
        u = xx * np.cos(rot) + yy * np.sin(rot)
        v = -xx * np.sin(rot) + yy * np.cos(rot)
        rho = np.hypot(u, v / squash)
        theta = np.arctan2(v / squash, u)
        r_theta = radius * (
            1
            + (
                amps[:, None, None]
                * np.cos(ks[:, None, None] * theta[None] + phases[:, None, None])
            ).sum(axis=0)
        )
        inside = rho <= r_theta
    else:
        inside = np.zeros_like(xx, dtype=bool)
        n_lobes = int(rng.integers(2, 4))
        for lobe in range(n_lobes):
            if lobe == 0:
                cy = cx = 0.0
                a = radius * rng.uniform(0.8, 1.0)
                b = radius * rng.uniform(0.6, 0.9)
            else:
                ang = rng.uniform(0, 2 * np.pi)
                dist = radius * rng.uniform(0.5, 0.8)
                cy, cx = dist * np.sin(ang), dist * np.cos(ang)
                a = radius * rng.uniform(0.4, 0.65)
                b = a * rng.uniform(0.7, 1.0)
            rot = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)
            v = -(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)
            inside |= (u / a) ** 2 + (v / b) ** 2 <= 1.0
    coverage = inside.reshape(side, ss, side, ss).mean(axis=(1, 3))
    alpha = np.clip(ndi.gaussian_filter(coverage, sigma, mode="constant"), 0.0, 1.0)
    alpha[alpha < 1e-3] = 0.0  # leave the real slice untouched beyond the soft edge
    return alpha


def _noise_sigma(image: np.ndarray, region: np.ndarray) -> float:
    """Noise level of ``region``: the local standard deviation (Gaussian window, sigma 2 px) in
    its flattest places (10th percentile), so that edges between tissues do not count while the
    spatially correlated noise of CT does."""
    if not region.any():
        return 0.0
    mean = ndi.gaussian_filter(image, 2.0)
    var = np.maximum(ndi.gaussian_filter(image * image, 2.0) - mean * mean, 0.0)
    return float(np.sqrt(np.percentile(var[region], 10)))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field_ = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    std = float(field_.std())
    return field_ / std if std > 0 else field_


def _insert_lesion(
    host: _Host, rng: np.random.Generator, sign: int, family: str
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    image = host.image.astype(np.float64)
    h, w = image.shape
    # Distance to the nearest non-tissue pixel, with the image border counting as non-tissue.
    depth = ndi.distance_transform_edt(np.pad(host.tissue, 1))[1:-1, 1:-1]
    radius = rng.uniform(*host.r_range)
    sigma = rng.uniform(1.0, 1.5)
    for _attempt in range(12):
        alpha = _lesion_alpha(rng, radius, family, sigma)
        half = alpha.shape[0] // 2
        ys, xs = np.nonzero(alpha > 0.5)
        extent = float(np.hypot(ys - half, xs - half).max())
        cand = depth >= extent + 2.0
        if host.avoid is not None and host.avoid.any():
            footprint = (alpha > 0.5).astype(np.float64)
            covered = fftconvolve(host.avoid.astype(np.float64), footprint[::-1, ::-1], "same")
            cand &= covered <= 0.1 * footprint.sum()
        cand[:half, :] = False
        cand[h - half :, :] = False
        cand[:, :half] = False
        cand[:, w - half :] = False
        if cand.any():
            break
        radius = max(0.85 * radius, 3.0)
    else:
        raise RuntimeError(f"no room for a lesion in {host.name}")
    options = np.flatnonzero(cand.ravel())
    cy, cx = np.unravel_index(int(options[rng.integers(options.size)]), cand.shape)
    window = (slice(cy - half, cy + half + 1), slice(cx - half, cx + half + 1))
    full_alpha = np.zeros_like(image)
    full_alpha[window] = alpha
    gt = full_alpha > 0.5

    lo_t, hi_t = np.percentile(image[host.body], [5, 95])
    tissue_range = float(hi_t - lo_t)
    near = ndi.binary_dilation(gt, iterations=6) & ~ndi.binary_dilation(gt, iterations=2)
    ring = near & host.body
    ring_mean = float(image[ring].mean() if ring.any() else image[near].mean())
    inside_mean = float(image[gt].mean())
    fraction = rng.uniform(0.25, 0.40)
    lo_b, hi_b = host.bounds
    margin = 0.05 * tissue_range

    def level_for(sgn: int) -> float:
        # Brighter (darker) than both the tissue it replaces and the tissue around it.
        base = max(ring_mean, inside_mean) if sgn > 0 else min(ring_mean, inside_mean)
        return base + sgn * fraction * tissue_range

    level = level_for(sign)
    if not (lo_b + margin <= level <= hi_b - margin):
        sign = -sign
        level = float(np.clip(level_for(sign), lo_b + margin, hi_b - margin))
    # Mild texture: the slice's own noise, but no stronger than 15 % of the lesion contrast (the
    # MNI template is an average whose fine anatomy would otherwise pass for noise).
    noise = min(_noise_sigma(image, host.tissue), 0.15 * fraction * tissue_range)
    patch_shape = alpha.shape
    texture = noise * _smooth_noise(rng, patch_shape, 1.0)
    texture += 0.1 * fraction * tissue_range * _smooth_noise(rng, patch_shape, max(radius / 2, 2))
    patch = image[window]
    image[window] = patch * (1 - alpha) + alpha * (level + texture)
    if host.window is not None:
        image = np.clip(image, *host.window)
    info = {
        "center_xy": (int(cx), int(cy)),
        "radius_px": round(float(radius), 2),
        "edge_sigma_px": round(float(sigma), 2),
        "family": family,
        "contrast": round(float((level - ring_mean) / tissue_range), 3),
        "level": float(level),
        "ring_mean": ring_mean,
        "inside_mean_before": inside_mean,
        "tissue_range": tissue_range,
        "noise_sigma": noise,
    }
    return image.astype(np.float32), gt, info


# Slot pattern of lesion hosts, repeated: nine MNI slices (three planes), two CT and one MR.
_PATTERN = (
    "axial",
    "coronal",
    "sagittal",
    "ct-body",
    "axial",
    "coronal",
    "sagittal",
    "ct-head",
    "axial",
    "sagittal",
    "coronal",
    "mr-abdomen",
)
_MNI_RANGES = {"axial": (60, 115), "coronal": (70, 175)}
_MNI_SAGITTAL_OFFSETS = (15, 50)


def _mni_indices(plane: str, count: int) -> list[int]:
    if count == 0:
        return []
    if plane == "sagittal":
        mid = _brain_middle("sagittal")
        offsets = np.linspace(*_MNI_SAGITTAL_OFFSETS, num=count)
        return [int(round(mid + (o if i % 2 else -o))) for i, o in enumerate(offsets)]
    lo, hi = _MNI_RANGES[plane]
    return [int(round(v)) for v in np.linspace(lo, hi, num=count)]


def lesion_cases(n_lesions: int = 24, seed: int = 0) -> list[Case]:
    """``n_lesions`` simulated lesions in real slices: MNI152 T1 in three planes, a body CT, a
    head CT and an abdominal MR (see the module docstring).  One lesion per image.

    Hosts that cannot be decoded here (the head CT needs Pillow's JPEG 2000 support) are
    replaced by the body CT, with a warning.
    """
    if n_lesions < 0:
        raise ValueError(f"n_lesions must be >= 0, got {n_lesions}")
    slots = [_PATTERN[i % len(_PATTERN)] for i in range(n_lesions)]
    optional = {"ct-head": _ct_head_host, "mr-abdomen": _mr_abdomen_host}
    hosts: dict[str, _Host | None] = {"ct-body": _ct_body_host()}
    for key, make in optional.items():
        hosts[key] = make() if key in slots else None
        if key in slots and hosts[key] is None:
            warnings.warn(f"lesion host {key} unavailable; using the body CT", stacklevel=2)
    plane_indices = {p: iter(_mni_indices(p, slots.count(p))) for p in PLANES}
    seeds = np.random.SeedSequence(seed).spawn(max(n_lesions, 1))
    cases = []
    for i, slot in enumerate(slots):
        rng = np.random.default_rng(seeds[i])
        if slot in PLANES:
            host = _mni_host(slot, next(plane_indices[slot]))
        else:
            host = hosts.get(slot) or hosts["ct-body"]
        sign = 1 if i % 2 == 0 else -1
        family = "star" if (i // 2) % 2 == 0 else "lobulated"
        image, gt, info = _insert_lesion(host, rng, sign, family)
        meta = dict(host.meta)
        meta.update(info)
        meta["window"] = host.window
        meta["seed"] = seed
        meta["image_id"] = _image_id(host.name, meta)
        cases.append(
            case_from_mask(f"lesion-{i:02d}-{host.name}", image, gt, host.kind, True, meta)
        )
    return cases


# --------------------------------------------------------------------------------------------
# Shepp-Logan phantom

#: Modified Shepp-Logan ellipses (Toft 1996): intensity A, semi-axes a, b, centre (x0, y0) in
#: [-1, 1] coordinates with y pointing up, rotation phi in degrees.  Their weighted sum rebuilds
#: ``skimage.data.shepp_logan_phantom()`` on a 400 x 400 grid from -1 to 1, to within the 1/255
#: quantisation of that PNG: the masks are the phantom's true regions.
SHEPP_LOGAN_ELLIPSES: tuple[tuple[float, float, float, float, float, float], ...] = (
    (1.0, 0.69, 0.92, 0.0, 0.0, 0.0),
    (-0.8, 0.6624, 0.874, 0.0, -0.0184, 0.0),
    (-0.2, 0.11, 0.31, 0.22, 0.0, -18.0),
    (-0.2, 0.16, 0.41, -0.22, 0.0, 18.0),
    (0.1, 0.21, 0.25, 0.0, 0.35, 0.0),
    (0.1, 0.046, 0.046, 0.0, 0.1, 0.0),
    (0.1, 0.046, 0.046, 0.0, -0.1, 0.0),
    (0.1, 0.046, 0.023, -0.08, -0.605, 0.0),
    (0.1, 0.023, 0.023, 0.0, -0.606, 0.0),
    (0.1, 0.023, 0.046, 0.06, -0.605, 0.0),
)
# The inner structures used as cases (0-based indices into SHEPP_LOGAN_ELLIPSES); the tiniest
# (radius ~4.6 px) are left out.
_PHANTOM_CASES = (2, 3, 4, 5, 6, 7)


def shepp_logan_masks(size: int = 400) -> np.ndarray:
    """Boolean masks ``(10, size, size)`` of the modified Shepp-Logan ellipses, rows top to
    bottom, in the pixel grid of ``skimage.data.shepp_logan_phantom()`` (for size 400; the
    intensity-weighted sum of the masks equals that 8-bit image to within its 1/255 step)."""
    c = np.linspace(-1.0, 1.0, size)
    xx, yy = np.meshgrid(c, -c)
    masks = np.zeros((len(SHEPP_LOGAN_ELLIPSES), size, size), dtype=bool)
    for i, (_a, a, b, x0, y0, phi) in enumerate(SHEPP_LOGAN_ELLIPSES):
        t = np.deg2rad(phi)
        u = (xx - x0) * np.cos(t) + (yy - y0) * np.sin(t)
        v = -(xx - x0) * np.sin(t) + (yy - y0) * np.cos(t)
        masks[i] = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    return masks


def phantom_cases() -> list[Case]:
    """The Shepp-Logan phantom's inner ellipses (kind ``"phantom"``), masks from the known
    ellipse parameters."""
    from skimage import data

    image = data.shepp_logan_phantom().astype(np.float32)
    masks = shepp_logan_masks(image.shape[0])
    out = []
    for i in _PHANTOM_CASES:
        meta = {
            "source": "skimage shepp_logan_phantom",
            "ellipse": SHEPP_LOGAN_ELLIPSES[i],
            "image_id": "phantom",
        }
        out.append(
            case_from_mask(f"phantom-ellipse-{i + 1}", image, masks[i], "phantom", True, meta)
        )
    return out


# --------------------------------------------------------------------------------------------
# Coins photograph


@functools.lru_cache(maxsize=1)
def _coin_labels() -> tuple[np.ndarray, np.ndarray, list[int]]:
    from skimage import data, filters, measure, morphology, segmentation

    grey = data.coins()
    markers = np.zeros(grey.shape, dtype=np.int32)
    markers[grey < 30] = 1
    markers[grey > 150] = 2
    regions = segmentation.watershed(filters.sobel(grey.astype(np.float64)), markers)
    coins = ndi.binary_fill_holes(regions == 2)
    coins = ndi.binary_opening(coins, structure=morphology.disk(3).astype(bool))
    labels = measure.label(coins)
    h, w = grey.shape
    good = []
    for region in measure.regionprops(labels):
        r0, c0, r1, c1 = region.bbox
        away = r0 > 0 and c0 > 0 and r1 < h and c1 < w
        if away and region.area >= 500 and region.solidity >= 0.95:
            good.append((int(region.area), int(region.label)))
    ordered = [label for _, label in sorted(good)]
    return _readonly(grey.astype(np.float32)), _readonly(labels), ordered


def coin_cases(n: int | None = None) -> list[Case]:
    """``n`` coins of ``skimage.data.coins()`` (kind ``"photo"``), spread over the size range
    (all whole, compact coins away from the border by default)."""
    image, labels, ordered = _coin_labels()
    if not ordered:
        return []
    n = len(ordered) if n is None else min(n, len(ordered))
    picks = np.unique(np.round(np.linspace(0, len(ordered) - 1, n)).astype(int))
    out = []
    for k in picks:
        label = ordered[int(k)]
        meta = {"source": "skimage coins (watershed masks)", "label": label, "image_id": "coins"}
        out.append(
            case_from_mask(
                f"photo-coin-{label:02d}", image.copy(), labels == label, "photo", True, meta
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Public collections


def evaluation_cases(n_lesions: int = 160, seed: int = 0) -> list[Case]:
    """All well-posed evaluation cases: :func:`lesion_cases`, :func:`ventricle_cases`,
    :func:`phantom_cases` and :func:`coin_cases`.  Deterministic for a given seed."""
    return lesion_cases(n_lesions, seed) + ventricle_cases() + phantom_cases() + coin_cases()


def anatomy_cases() -> list[Case]:
    """MNI152's own brain, grey-matter and white-matter masks on one slice per plane (kind
    ``"anatomy-mri"``, ``well_posed_hint=False``): a box around a whole brain or tissue class
    does not say which structure is meant, so report these apart.  The sagittal slice is 28 mm
    left of the midline so that it cuts a hemisphere."""
    out = []
    for plane in PLANES:
        index = _brain_middle(plane) - (28 if plane == "sagittal" else 0)
        image = mni152_slice(plane, index)
        for which in ("brain", "gm", "wm"):
            mask = mni152_mask_slice(which, plane, index)
            meta = {
                "source": "MNI152 2009a T1 template and masks (nilearn)",
                "plane": plane,
                "slice_index": index,
                "structure": which,
            }
            out.append(
                case_from_mask(
                    f"anatomy-mni-{plane}-{which}", image.copy(), mask, "anatomy-mri", False, meta
                )
            )
    return out


# --------------------------------------------------------------------------------------------
# Lateral ventricles of MNI152


@functools.lru_cache(maxsize=1)
def _ventricles() -> np.ndarray:
    """(Z, Y, X) bool: the lateral ventricles of the MNI152 template, taken as the large 3D
    components of its dark CSF (smoothed T1 < 0.4) inside the brain mask eroded by 12 mm, which
    cuts them off from the sulci and the subarachnoid space."""
    data = _mni()
    csf = data["brain"] & (ndi.gaussian_filter(data["t1"], 1.0) < 0.4)
    labels, _ = ndi.label(csf & ndi.binary_erosion(data["brain"], iterations=12))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return _readonly(np.isin(labels, np.flatnonzero(sizes >= 2000)))


def ventricle_cases(per_plane: int = 5, min_area: int = 60) -> list[Case]:
    """The lateral ventricles of MNI152 (kind ``"anatomy-mri"``, well-posed: a box around one
    ventricle says which structure is meant) on ``per_plane`` slices per plane, spread over the
    slices where their area is at least 40 % of its largest; one case per 2D component of at
    least ``min_area`` pixels (left and right ventricles apart where they are apart)."""
    from ..samples import _plane_view

    vent = _ventricles()
    out = []
    for axis, plane in enumerate(PLANES):
        area = vent.sum(axis=tuple(i for i in range(3) if i != axis))
        big = np.flatnonzero(area >= 0.4 * area.max())
        picks = np.unique(np.round(np.linspace(big[0], big[-1], per_plane)).astype(int))
        for index in picks:
            mask2d = _plane_view(vent, plane, int(index))
            parts, n = ndi.label(mask2d)
            image = mni152_slice(plane, int(index))
            for part in range(1, n + 1):
                mask = parts == part
                if mask.sum() < min_area:
                    continue
                meta = {
                    "source": "MNI152 2009a T1 template (nilearn), dark CSF in the deep brain",
                    "plane": plane,
                    "slice_index": int(index),
                    "image_id": _image_id(f"mni-{plane}-{'zyx'[axis]}{index:03d}", {}),
                }
                name = f"ventricle-{plane}-{'zyx'[axis]}{index:03d}-{part}"
                out.append(case_from_mask(name, image.copy(), mask, "anatomy-mri", True, meta))
    return out


# --------------------------------------------------------------------------------------------
# Tuning and test split

#: MNI152 slices within one slab of this many slices share a source (neighbouring slices are
#: nearly the same image, so they must not fall on both sides of the split).
SLAB = 16
#: Sources of the bundled cases that form the tuning split besides every third MNI slab: the
#: body CT (lesions) and the phantom; the head CT, the abdominal MR and the coins are test data.
_TUNING_SOURCES = ("ct-body", "phantom")
SPLITS: tuple[str, ...] = ("tuning", "test", "all")


def _image_id(host: str, meta: dict) -> str:
    """The source of a bundled image: its host slice's slab for MNI152, else the host."""
    if host.startswith("mni-"):
        _, plane, where = host.split("-")
        return f"mni-{plane}-slab{int(where[1:]) // SLAB}"
    return host


def source_of(case: Case) -> str:
    """The source image a case comes from: ``meta["image_id"]`` for bundled cases, the image
    file (``meta["source"]``) for loaded datasets (every slice of a volume is one source), else
    the case name."""
    return str(case.meta.get("image_id") or case.meta.get("source") or case.name)


def split_of(case: Case) -> str:
    """``"tuning"`` or ``"test"``, decided by the case's source alone (deterministic).

    Bundled: every third MNI152 slab (slab index divisible by 3), the body CT and the phantom
    are tuning data; the rest is test data.  Other sources: the SHA-1 of the source's name,
    one in three to tuning.
    """
    import hashlib

    src = source_of(case)
    if src.startswith("mni-") and "-slab" in src:
        return "tuning" if int(src.rsplit("slab", 1)[1]) % 3 == 0 else "test"
    if src in _TUNING_SOURCES:
        return "tuning"
    if "image_id" in case.meta:
        return "test"
    digest = int(hashlib.sha1(src.encode()).hexdigest()[:8], 16)
    return "tuning" if digest % 3 == 0 else "test"


def split_cases(cases: list[Case], split: str) -> list[Case]:
    """The cases of ``split`` (``"tuning"``, ``"test"`` or ``"all"``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return list(cases) if split == "all" else [c for c in cases if split_of(c) == split]
