"""3D propagation measured: simulated lesions in real volumes, one box, 3D Dice.

Hosts
-----
* **MNI152 T1** (nilearn, 1 mm isotropic, (Z, Y, X) = 189 x 233 x 197, as
  :func:`structsam.samples.mni152_volume`): lesions lie wholly inside the brain mask eroded by
  3 voxels, at most 10 % of them on CSF (smoothed T1 < 0.4), and are propagated along axis 0
  (axial slices), 1 (coronal) and 2 (sagittal).
* **CT slab**: pydicom's head CT slice ``J2K_pixelrep_mismatch.dcm`` (512 x 512, 0.431 mm, HU,
  its own window level 40 / width 100; ``CT_small.dcm`` where JPEG 2000 cannot be decoded)
  repeated over 40 slices 1.25 mm apart, each with its own noise at the slice's measured noise
  level. The anatomy does not change along the slab (no 3D CT is bundled offline), so the CT
  cases test contrast, texture and *anisotropic voxels*: axis 0 gives the native 0.43 mm slices,
  axis 1 gives (Z, X) slices with 1.25 x 0.43 mm pixels, resampled to square pixels.

Lesions
-------
A lesion is an ellipsoid (semi-axes r, a r, b r with a, b in 0.7-1.0, randomly rotated; radius
r in millimetres) -- "smooth" -- or the same ellipsoid whose surface is pushed in and out by a
smooth random field (+-30 % of the radius, correlation length r / 2) -- "irregular". Its
opacity falls from 1 to 0 over 1 mm around the surface (partial volume); the ground truth is
opacity > 0.5 (largest component). It is blended as ``v (1 - alpha) + alpha (level + texture)``
with ``level`` the mean of a 2-voxel shell around it plus or minus 25-40 % of the host's tissue
range (5th-95th percentile), alternating brighter and darker, and ``texture`` noise at the
host's noise level plus a faint smooth heterogeneity.

Protocol
--------
One box: the tight box of the ground truth on the slice of its largest area along the
propagation axis; :func:`structsam.propagate` from there; 3D Dice against the inserted mask.
Cases alternate into a *tuning* split (one in three), on which the stop rules are chosen
(:func:`tune`), and a *test* split, which is reported. ``unmerged`` runs the plain LiteMedSAM
encoder, ``merged`` the ``structsam`` method at :data:`structsam.DEFAULT_RATE`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ..interactive.propagate import Propagation, StopRules, propagate

__all__ = ["LesionCase", "format_table", "lesion_cases", "run", "tune"]

CT_SLICES = 40
CT_SLICE_MM = 1.25
EDGE_MM = 1.0  # partial-volume width of a lesion's surface
SETTINGS = ("unmerged", "merged")


@dataclass(eq=False)
class LesionCase:
    name: str
    host: str  # "mni" or "ct"
    axis: int
    family: str  # "smooth" or "irregular"
    polarity: str  # "bright" or "dark"
    split: str  # "tuning" or "test"
    volume: np.ndarray
    truth: np.ndarray
    spacing: tuple[float, float, float]
    z: int  # the prompted slice (largest ground-truth area along axis)
    box: np.ndarray  # tight box there, x0 y0 x1 y1 in that slice's pixels
    window: tuple[float, float] | None
    meta: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ hosts


@dataclass(eq=False)
class _Host:
    name: str
    volume: np.ndarray  # float32 (Z, Y, X)
    tissue: np.ndarray  # where a lesion may lie wholly
    avoid: np.ndarray | None  # at most 10 % of a lesion on these voxels
    spacing: tuple[float, float, float]
    tissue_range: float
    noise: float
    bounds: tuple[float, float]  # allowed lesion levels
    window: tuple[float, float] | None
    radius_mm: tuple[float, float]


def _zyx(img, dtype) -> np.ndarray:
    import nibabel as nib

    canon = nib.as_closest_canonical(img)
    return np.asarray(canon.get_fdata(), dtype=dtype).transpose(2, 1, 0)


def _noise_level(volume: np.ndarray, region: np.ndarray) -> float:
    """Local standard deviation (Gaussian window, 2 voxels) in the flattest tenth of ``region``:
    noise without the edges between tissues."""
    mean = ndi.gaussian_filter(volume, 2.0)
    var = np.maximum(ndi.gaussian_filter(volume * volume, 2.0) - mean * mean, 0.0)
    return float(np.sqrt(np.percentile(var[region], 10)))


@functools.lru_cache(maxsize=1)
def _mni_host() -> _Host:
    from nilearn import datasets

    from ..samples import mni152_volume

    volume, spacing = mni152_volume()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        brain = _zyx(datasets.load_mni152_brain_mask(resolution=1), np.float32) > 0.5
    brain = ndi.binary_fill_holes(brain)
    low, high = np.percentile(volume[brain], [5, 95])
    return _Host(
        name="mni",
        volume=volume,
        tissue=ndi.binary_erosion(brain, iterations=3),
        avoid=brain & (ndi.gaussian_filter(volume, 1.0) < 0.4),
        spacing=tuple(float(s) for s in spacing),
        tissue_range=float(high - low),
        noise=_noise_level(volume, brain),
        bounds=(0.02, math.inf),
        window=None,
        radius_mm=(5.0, 9.0),
    )


def _read_ct() -> tuple[np.ndarray, float, tuple[float, float]]:
    """(HU slice, pixel spacing, window) of the bundled head CT, or of the thoracic CT."""
    import pydicom
    from pydicom.data import get_testdata_file

    for name, window in (("J2K_pixelrep_mismatch.dcm", (-10.0, 90.0)), ("CT_small.dcm", None)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(get_testdata_file(name))
                hu = ds.pixel_array.astype(np.float32)
        except Exception:  # a missing JPEG 2000 decoder: the next file
            continue
        hu = hu * float(getattr(ds, "RescaleSlope", 1) or 1)
        hu = hu + float(getattr(ds, "RescaleIntercept", 0) or 0)
        return hu, float(ds.PixelSpacing[0]), window or (-160.0, 240.0)
    raise RuntimeError("none of pydicom's bundled CT slices could be read")


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


@functools.lru_cache(maxsize=1)
def _ct_host() -> _Host:
    hu, pixel, window = _read_ct()
    head = _largest(ndi.binary_fill_holes(hu > -300))
    smooth = ndi.median_filter(hu, size=5)
    parenchyma = _largest(ndi.binary_opening(head & (smooth > 10) & (smooth < 60), iterations=3))
    image = np.clip(hu, *window)
    noise = _noise_level(image, parenchyma)
    rng = np.random.default_rng(1234)
    slab = image[None] + noise * rng.standard_normal((CT_SLICES, *image.shape))
    tissue = np.repeat(parenchyma[None], CT_SLICES, axis=0)
    tissue[:2] = tissue[-2:] = False
    low, high = np.percentile(image[parenchyma], [5, 95])
    return _Host(
        name="ct",
        volume=np.clip(slab, *window).astype(np.float32),
        tissue=tissue,
        avoid=None,
        spacing=(CT_SLICE_MM, pixel, pixel),
        tissue_range=float(max(high - low, 0.25 * (window[1] - window[0]))),
        noise=noise,
        bounds=window,
        window=window,
        radius_mm=(6.0, 10.0),
    )


# ------------------------------------------------------------------------------------ lesions


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _lesion(rng, radius: float, family: str, spacing) -> np.ndarray:
    """Opacity of a lesion of ``radius`` mm on a patch of voxels of ``spacing`` around it."""
    spacing = np.asarray(spacing, float)
    half = np.ceil((1.45 * radius + 2 * EDGE_MM) / spacing).astype(int)
    axes = [np.arange(-h, h + 1) * s for h, s in zip(half, spacing, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # mm
    radii = radius * np.array([1.0, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)])
    local = grid @ _rotation(rng)
    dist = np.sqrt(((local / radii) ** 2).sum(-1))  # 1 on the ellipsoid's surface
    if family == "irregular":
        sigma = np.maximum(0.5 * radius / spacing, 1.0)
        bumps = ndi.gaussian_filter(rng.standard_normal(dist.shape), sigma)
        bumps /= np.abs(bumps).max() or 1.0
        dist = dist / (1.0 + 0.3 * bumps)
    return np.clip(0.5 - (dist - 1.0) * radius / EDGE_MM, 0.0, 1.0)


def _place(rng, host: _Host, alpha: np.ndarray) -> tuple[slice, ...] | None:
    """A location where the lesion lies wholly in tissue, at most 10 % on ``avoid``."""
    shape = np.array(alpha.shape)
    core = alpha > 0.5
    candidates = np.argwhere(host.tissue)
    for _ in range(200):
        centre = candidates[rng.integers(len(candidates))]
        start = centre - shape // 2
        if (start < 0).any() or (start + shape > host.volume.shape).any():
            continue
        where = tuple(slice(s, s + n) for s, n in zip(start, shape, strict=True))
        if not host.tissue[where][alpha > 0].all():
            continue
        if host.avoid is not None and host.avoid[where][core].mean() > 0.1:
            continue
        return where
    return None


def _insert(rng, host: _Host, family: str, polarity: str):
    """(volume, truth, meta) with one lesion inserted into a copy of the host."""
    for _ in range(20):
        radius = rng.uniform(*host.radius_mm)
        alpha = _lesion(rng, radius, family, host.spacing)
        where = _place(rng, host, alpha)
        if where is not None:
            break
    else:
        raise RuntimeError(f"no place for a lesion in {host.name}")
    patch = host.volume[where]
    core = alpha > 0.5
    shell = ndi.binary_dilation(alpha > 0, iterations=2) & ~(alpha > 0)
    ring = float(patch[shell].mean())
    fraction = rng.uniform(0.25, 0.40)
    sign = 1.0 if polarity == "bright" else -1.0
    level = ring + sign * fraction * host.tissue_range
    if not host.bounds[0] <= level <= host.bounds[1]:
        sign, polarity = -sign, "dark" if polarity == "bright" else "bright"
        level = ring + sign * fraction * host.tissue_range
    texture = host.noise * rng.standard_normal(alpha.shape)
    smooth = ndi.gaussian_filter(rng.standard_normal(alpha.shape), 2.0)
    texture += 0.1 * fraction * host.tissue_range * smooth / (smooth.std() or 1.0)
    volume = host.volume.copy()
    volume[where] = patch * (1 - alpha) + alpha * (level + texture)
    if host.window is not None:
        volume[where] = np.clip(volume[where], *host.window)
    truth = np.zeros(host.volume.shape, bool)
    truth[where] = _largest(core)
    meta = {"radius_mm": round(radius, 2), "contrast": round(sign * fraction, 3)}
    return volume.astype(np.float32), truth, polarity, meta


def _prompt(truth: np.ndarray, axis: int) -> tuple[int, np.ndarray]:
    other = tuple(a for a in range(3) if a != axis)
    z = int(np.argmax(truth.sum(axis=other)))
    m = np.take(truth, z, axis=axis)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    return z, np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], float)


# Host, propagation axis, shape family and polarity of each case, in order.
_KINDS = (("smooth", "bright"), ("irregular", "dark"), ("smooth", "dark"), ("irregular", "bright"))
LAYOUT = [("mni", axis, family, polarity) for axis in (0, 1, 2) for family, polarity in _KINDS]
LAYOUT += [("ct", 0, family, polarity) for family, polarity in _KINDS]
LAYOUT += [("ct", 1, "smooth", "dark"), ("ct", 1, "irregular", "bright")]


def lesion_cases(split: str = "all", seed: int = 0, hosts: Iterable[str] = ("mni", "ct")):
    """The 18 cases of LAYOUT (every third one, from the first, is a tuning case), made
    deterministically from ``seed``; ``split``: "tuning", "test" or "all"."""
    if split not in ("tuning", "test", "all"):
        raise ValueError(f"split must be 'tuning', 'test' or 'all', got {split!r}")
    out = []
    for i, (host_name, axis, family, polarity) in enumerate(LAYOUT):
        case_split = "tuning" if i % 3 == 0 else "test"
        if host_name not in hosts or split not in ("all", case_split):
            continue
        host = _mni_host() if host_name == "mni" else _ct_host()
        rng = np.random.default_rng([seed, i])
        volume, truth, polarity, meta = _insert(rng, host, family, polarity)
        z, box = _prompt(truth, axis)
        name = f"{host_name}-axis{axis}-{family}-{polarity}-{i:02d}"
        out.append(LesionCase(name, host_name, axis, family, polarity, case_split, volume, truth,
                              host.spacing, z, box, host.window, meta))  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ running


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def make_predictor(setting: str, model_name: str = "litemedsam"):
    import structsam

    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    model = structsam.load_model(model_name)
    if setting == "merged":
        structsam.patch(model, "structsam", structsam.DEFAULT_RATE)
    return structsam.Predictor(model)


def run_case(predictor, case: LesionCase, rules: StopRules | None = None, **kwargs):
    result = propagate(predictor, case.volume, case.z, box=case.box, axis=case.axis,
                       spacing=case.spacing, window=case.window, rules=rules, **kwargs)  # fmt: skip
    return result


def _row(case: LesionCase, setting: str, result: Propagation) -> dict:
    other = tuple(a for a in range(3) if a != case.axis)
    present = np.flatnonzero(case.truth.any(axis=other))
    return {
        "case": case.name,
        "split": case.split,
        "setting": setting,
        "dice": round(dice(result.mask, case.truth), 4),
        "truth_slices": f"{present[0]}-{present[-1]}",
        "mask_slices": "-".join(map(str, result.extent)) if result.extent else "none",
        "z": case.z,
        "down": _stop_text(result.down),
        "up": _stop_text(result.up),
        "encodes": result.encodes,
        "vote": "" if result.vote is None else result.vote.describe(),
        "seconds": round(result.seconds, 1),
        **case.meta,
    }


def _stop_text(report) -> str:
    where = "edge" if report.stopped_at is None else str(report.stopped_at)
    return f"{report.reason}@{where}"


# What bench-3d compares, as keyword arguments of propagate (docs/propagation/README.md):
# ``default`` is the shipped walk (StopRules(): tight box + 1 px) with the orthogonal vote;
# ``walk only`` the same walk without the vote (no extra encodes: the walk's are shared);
# ``margin`` the stop rules' runner-up on the tuning cases (its lead came from one case).
VARIANTS = {
    "default": {},
    "walk only": {"orthogonal": False},
    "margin": {"rules": StopRules(margin=0.1, margin_px=2.0, max_growth=math.inf)},
}
DEFAULT_VARIANTS = ("default", "walk only")


def run(split="test", settings=SETTINGS, variants=None,
        progress: Callable[[str], None] | None = None,
        limit: int | None = None, seed: int = 0) -> list[dict]:  # fmt: skip
    """One row per (case, setting, variant): 3D Dice, the slices kept, each direction's stop.
    ``variants``: {name: keyword arguments of propagate} (default: those of DEFAULT_VARIANTS);
    they share each slice's encode."""
    variants = variants or {name: VARIANTS[name] for name in DEFAULT_VARIANTS}
    cases = lesion_cases(split, seed)[:limit]
    rows = []
    for setting in settings:
        predictor = make_predictor(setting)
        for case in cases:
            memo = _MemoPredictor(predictor)
            for name, kwargs in variants.items():
                result = run_case(memo, case, **kwargs)
                rows.append(_row(case, setting, result) | {"variant": name})
                if progress is not None:
                    r = rows[-1]
                    progress(f"{setting} {name} {case.name}: Dice {r['dice']:.3f}, "
                             f"down {r['down']}, up {r['up']}, {r['encodes']} encodes, "
                             f"{r['seconds']} s")  # fmt: skip
    return rows


def format_table(rows: list[dict], variant: str | None = None) -> str:
    """Markdown: one line per case with Dice per setting and stop reasons, then the means
    (rows of ``variant`` only, when given)."""
    if variant is not None:
        rows = [r for r in rows if r.get("variant", variant) == variant]
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["setting"]] = r
    head = ["case", "truth slices"]
    for s in settings:
        head += [f"Dice {s}", f"kept ({s})", f"stops down / up ({s})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per in by_case.items():
        first = next(iter(per.values()))
        cells = [name, first["truth_slices"]]
        for s in settings:
            r = per.get(s)
            cells += ["" if r is None else f"{r['dice']:.3f}",
                      "" if r is None else r["mask_slices"],
                      "" if r is None else f"{r['down']} / {r['up']}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    means = ["**mean**", f"{len(by_case)} cases"]
    for s in settings:
        values = [r["dice"] for r in rows if r["setting"] == s]
        means += [f"**{np.mean(values):.3f}**", "", ""]
    lines.append("| " + " | ".join(means) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ tuning


class _MemoPredictor:
    """Encodes each distinct slice once (tuning re-decodes the same slices many times)."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.memo: dict[str, Any] = {}

    def encode(self, image, window=None, prompts=None):
        key = hashlib.sha1(
            np.ascontiguousarray(image).tobytes() + repr(window).encode()
        ).hexdigest()
        if key not in self.memo:
            self.memo[key] = self.predictor.encode(image, window, prompts)
        return self.memo[key]

    @property
    def spec(self):
        return self.predictor.spec

    def set_image(self, *args, **kwargs):  # propagate only needs encode + predict here
        raise NotImplementedError

    def predict(self, **kwargs):
        return self.predictor.predict(**kwargs)


def _counts(result: Propagation, truth: np.ndarray, axis: int) -> dict[int, tuple[int, int]]:
    """Per slice of the walk: (mask pixels, mask pixels on the ground truth)."""
    other = tuple(a for a in range(3) if a != axis)
    area = result.mask.sum(axis=other)
    inter = (result.mask & truth).sum(axis=other)
    return {i: (int(area[i]), int(inter[i])) for i in np.flatnonzero(area)}


def truncated_dice(result: Propagation, counts, truth_total: int, rules: StopRules) -> float:
    """The Dice ``rules`` would have given: a walk without stops, cut where a rule first fires
    (the walk's prompts do not depend on the stops, so this is exact)."""
    area, inter = counts.get(result.z, (0, 0))
    for report in (result.up, result.down):
        for rec in report.slices:
            if rules.check(rec, result.seed.square_area) is not None:
                break
            a, i = counts.get(rec.index, (0, 0))
            area, inter = area + a, inter + i
    return 2.0 * inter / (area + truth_total) if area + truth_total else 1.0


GRID = {
    "min_inside": (0.0, 0.5, 0.7, 0.8),
    "max_growth": (1.3, 1.6, 2.0, math.inf),
    "max_intensity_shift": (0.3, 0.4, 0.5, 0.6, 0.8, None),
    "min_score": (-math.inf, 0.5, 0.7, 0.8),
    "min_stability": (-math.inf, 0.7, 0.85),
    "min_seed_fraction": (0.0, 0.02, 0.05),
}
PROMPTING = {
    "tight+1px": dict(margin=0.0, margin_px=1.0, track_point=False),
    "tight": dict(margin=0.0, margin_px=0.0, track_point=False),
    "tight+1px+point": dict(margin=0.0, margin_px=1.0, track_point=True),
    "10%+2px": dict(margin=0.1, margin_px=2.0, track_point=False),
}


def tune(progress: Callable[[str], None] | None = None, seed: int = 0, extra: int = 6,
         promptings=None, save=None):  # fmt: skip
    """Walk each tuning case without stops (``extra`` slices past the lesion at most) for each
    prompting of PROMPTING (or the names in ``promptings``), unmerged, then score every rule set
    of GRID by truncation. ``save``: a pickle file for the walks (masks left out), so that
    :func:`score_walks` can rescore them. Returns (best rules, its mean tuning Dice, all
    (mean Dice, prompting, rules) best first)."""
    cases = lesion_cases("tuning", seed)
    names = list(promptings or PROMPTING)
    walks = {name: [] for name in names}
    base = make_predictor("unmerged")
    for case in cases:
        memo = _MemoPredictor(base)
        other = tuple(a for a in range(3) if a != case.axis)
        present = np.flatnonzero(case.truth.any(axis=other))
        reach = max(case.z - present[0], present[-1] - case.z) + extra
        for name in names:
            loose = StopRules(**PROMPTING[name]).without_stops()
            start = time.perf_counter()
            result = run_case(memo, case, loose, max_slices=int(reach), orthogonal=False)
            counts = _counts(result, case.truth, case.axis)
            if progress is not None:
                seconds = time.perf_counter() - start
                d = dice(result.mask, case.truth)
                progress(
                    f"tuning walk {case.name} {name}: Dice without stops {d:.3f}, {seconds:.0f} s"
                )
            result.mask = None  # 10-40 MB each: the counts are enough to score
            walks[name].append((case.name, result, counts, int(case.truth.sum())))
    if save is not None:
        import pickle

        with open(save, "wb") as f:
            pickle.dump(walks, f)
    scored = score_walks(walks)
    return scored[0][2], scored[0][0], scored


def score_walks(walks: dict, grid: dict | None = None) -> list:
    """(mean Dice, prompting, rules) for every rule set of ``grid``, best first."""
    grid = grid or GRID
    keys = list(grid)
    scored = []
    for name, pairs in walks.items():
        for values in itertools.product(*(grid[k] for k in keys)):
            rules = replace(StopRules(**PROMPTING[name]), **dict(zip(keys, values, strict=True)))
            d = [truncated_dice(r, counts, total, rules) for _, r, counts, total in pairs]
            scored.append((float(np.mean(d)), name, rules))
    scored.sort(key=lambda t: -t[0])
    return scored
