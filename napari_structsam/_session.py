"""The annotation state of one image, with no Qt and no napari.

A :class:`Session` holds one image (2D, RGB or a (Z, Y, X) volume), the encoder settings, the
per-slice embeddings, the current object's mask and the committed objects. Models, encodes,
decodes and FLOPs counts belong to ``structsam.interactive``'s encoder service; the session
keeps what they return. Everything heavy is split in two halves so that the widget can run the
first in a worker thread and apply the second on the GUI thread:

* ``encode`` / ``flops_stats`` / ``propagate`` compute and return (or yield) results and change
  no state of the session;
* ``store`` / ``apply_slice`` / ``segment`` / ``commit`` / ``undo`` change the annotation state
  (the caller keeps them on one thread).

Tests and scripts drive both halves in sequence (``ensure_encoded``, ``run_propagation``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from structsam import DEFAULT_RATE  # noqa: F401 (a constant the widget reads from here)
from structsam.interactive.service import (  # no torch at import
    DecoderBusy,
    EmbeddingStore,
    EncodeCancelled,  # noqa: F401 (the worker's and the tests' import)
    Stats,  # noqa: F401
    StatsBook,
    shared_service,
)
from structsam.interactive.settings import EncoderSettings, Reencode, reencode_reason

from ._runtime import available_devices, preload  # noqa: F401 (the widget's imports)


class SessionError(Exception):
    """A user-facing problem (no image, no prompt...): the message is for the status line."""


class Busy(SessionError):
    """The decoder cannot run right now (an encoder FLOPs count holds global module hooks)."""


@dataclass
class Prompts:
    """Prompts on one slice, in image pixels: points ``(x, y)`` with labels 1/0, one box."""

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None

    def __bool__(self) -> bool:
        return self.box is not None or (self.points is not None and len(self.points) > 0)

    def as_dict(self) -> dict | None:
        """The ``prompts`` dict of ``Predictor.encode``/``patch`` (None when empty)."""
        out = {}
        if self.box is not None:
            out["box"] = np.asarray(self.box, float)
        if self.points is not None and len(self.points):
            out["point_coords"] = np.asarray(self.points, float)
            out["point_labels"] = np.asarray(self.labels, int)
        return out or None

    def key(self) -> tuple:
        """A hashable value that is equal exactly for equal prompts (jobs are keyed by it)."""
        parts = (self.points, self.labels, self.box)
        return tuple(None if p is None else tuple(np.asarray(p, float).ravel()) for p in parts)


@dataclass(frozen=True)
class Encoded:
    """An encode's result as a worker yields it: which slice, under which settings. The
    embedding's own attributes (``merge_info``, ``prompts``, ``seconds``...) read through."""

    z: int
    settings: EncoderSettings
    embedding: object  # structsam.Embedding

    def __getattr__(self, name):
        if name.startswith("__") or name == "embedding":  # copy/pickle probes
            raise AttributeError(name)
        return getattr(self.embedding, name)


@dataclass
class SliceResult:
    """One slice of a propagation: its mask (empty when it stopped there) and embedding."""

    z: int
    mask: np.ndarray
    encoding: Encoded | None
    stopped: str | None = None  # why propagation stopped in this direction, if it did
    done: int = 0  # slices visited so far
    total: int = 0


@dataclass
class Commit:
    label: int
    index: np.ndarray  # flat indices written (they were background before)


def box_of(mask: np.ndarray, pad: int = 2) -> np.ndarray:
    """Tight (x0, y0, x1, y1) box of a 2D mask, grown by ``pad`` pixels and kept inside it."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.array(
        [max(xs.min() - pad, 0), max(ys.min() - pad, 0), min(xs.max() + pad, w - 1),
         min(ys.max() + pad, h - 1)],
        dtype=float,
    )  # fmt: skip


class Session:
    """One image being annotated. See the module docstring for the threading contract."""

    def __init__(self, settings: EncoderSettings | None = None, service=None):
        self.settings = settings or EncoderSettings()
        self.service = service or shared_service()
        self.volume: np.ndarray | None = None  # (Z, Y, X) or (Z, Y, X, C); 2D images get Z = 1
        self.is_3d = False
        self.window: tuple[float, float] | None = None
        self.mask: np.ndarray | None = None  # current object, uint8 (Z, Y, X)
        self.objects: np.ndarray | None = None  # committed objects, int32 (Z, Y, X)
        self.history: list[Commit] = []
        self._embeddings = EmbeddingStore()
        self._book = StatsBook()
        # disk cache of embeddings shared with `structsam embed` (structsam.cache); None: the
        # default folder ($STRUCTSAM_CACHE_DIR or ~/.cache/structsam/embeddings)
        self.use_disk_cache = True
        self.cache_folder: str | None = None
        self.cache_note: str | None = None  # why the disk cache is off, for the status line

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
        self._embeddings.clear()
        self._book.clear()

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

    # ------------------------------------------------------------------ encoding (worker side)

    def model_for(self, settings: EncoderSettings):
        """The service's model of ``settings`` (loaded on first use: call from a worker)."""
        return self.service.model(settings)

    def disk_cache(self):
        """The ``EmbeddingCache`` in use; None when off or unusable (an unwritable folder
        turns it off with a note instead of failing the encode)."""
        if not self.use_disk_cache:
            return None
        cache, self.cache_note = self.service.disk_cache(self.cache_folder or None)
        if cache is None:
            self.use_disk_cache = False
        return cache

    def encode(
        self,
        z: int,
        settings: EncoderSettings | None = None,
        prompts: Prompts | dict | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Encoded:
        """Encode slice ``z`` and return the result without storing it.

        ``prompts`` are used only when ``settings`` asks for prompt-aware merging. When
        ``cancelled()`` turns true the forward stops at the next encoder block with
        ``EncodeCancelled``.
        """
        settings = settings or self.settings
        image = self.slice_image(z)
        if isinstance(prompts, Prompts):
            prompts = prompts.as_dict()
        embedding = self.service.encode(
            image, settings, self.window, prompts, cancelled, self.disk_cache()
        )
        return Encoded(int(z), settings, embedding)

    def flops_stats(
        self, z: int, settings: EncoderSettings | None = None, prompts=None, time_unmerged=True,
        cancelled: Callable[[], bool] | None = None,
    ):  # fmt: skip
        """Encoder FLOPs of ``settings`` (and, once per model, the dense FLOPs and an unmerged
        encode time) on slice ``z``. Costs one or three forwards; run it in a worker."""
        settings = settings or self.settings
        if isinstance(prompts, Prompts):
            prompts = prompts.as_dict()
        return self.service.flops(
            self.slice_image(z), settings, self._book, prompts, self.window, time_unmerged,
            cancelled,
        )  # fmt: skip

    # ------------------------------------------------------------------ embeddings (GUI side)

    def store(self, enc: Encoded) -> None:
        """Keep an embedding (least recently used ones are dropped)."""
        self._embeddings.put(enc.z, enc.settings, self.window, enc.embedding)

    def store_stats(self, stats) -> None:
        self._book.store(stats)

    def note_unmerged_time(self, enc: Encoded) -> None:
        """An encode without merging is the unmerged time of its model."""
        self._book.note_encode(enc.settings, enc.embedding.seconds)

    def stats(self, settings: EncoderSettings | None = None):
        return self._book.get(settings or self.settings)

    def needs_stats(self, settings: EncoderSettings | None = None) -> bool:
        return self._book.needs(settings or self.settings)

    def encoding(self, z: int, settings: EncoderSettings | None = None):
        """The kept ``Embedding`` of slice ``z`` under ``settings`` (default: the session's)."""
        return self._embeddings.get(z, settings or self.settings, self.window)

    def encoded_slices(self, settings: EncoderSettings | None = None) -> set[int]:
        return self._embeddings.slices(settings or self.settings, self.window)

    def needs_encode(self, z: int, prompts: Prompts | None = None) -> Reencode | None:
        """Why slice ``z`` must be encoded before ``prompts`` can be answered, or None
        (``structsam.interactive.reencode_reason``)."""
        as_dict = prompts.as_dict() if prompts is not None else None
        return reencode_reason(self.encoding(z), self.settings, as_dict)

    # ------------------------------------------------------------------ decoding (GUI side)

    def predict(self, z: int, prompts: Prompts) -> tuple[np.ndarray, float]:
        """(mask (Y, X) bool, score) for ``prompts`` on slice ``z`` from its stored embedding."""
        enc = self.encoding(self._check_z(z))
        if enc is None:
            raise SessionError(f"slice {z} has no embedding yet")
        return self.decode(Encoded(z, self.settings, enc), prompts)

    def decode(self, enc: Encoded, prompts: Prompts) -> tuple[np.ndarray, float]:
        if not prompts:
            raise SessionError("no prompt on this slice: add a box or a point")
        try:
            return self.service.decode(enc.settings, enc.embedding, prompts.as_dict())
        except DecoderBusy as exc:
            raise Busy(str(exc)) from None

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
        known: dict | None = None,
        cancelled: Callable[[], bool] | None = None,
        max_slices: int | None = None,
    ) -> Iterator[SliceResult]:
        """Carry the object on slice ``z0`` through the volume in both directions with
        ``structsam.interactive.propagate`` (the seed's box and innermost point prompt it; each
        next slice is prompted with the previous slice's mask; a direction stops where its stop
        rules fire). Yields one ``SliceResult`` per visited slice and changes nothing: the
        caller applies them (``apply_slice``). Worker-safe given ``seed`` and ``known``
        (slice -> ``Embedding`` under ``settings``)."""
        z0 = self._check_z(z0)
        settings = settings or self.settings
        seed = (self.mask[z0] > 0) if seed is None else np.asarray(seed, bool)
        if not seed.any():
            raise SessionError("segment the object on this slice first (S), then propagate")
        total = self.n_slices - 1
        if max_slices is not None:
            total = min(total, 2 * max_slices)
        steps = self.service.propagate(
            self.volume, z0, settings, box_of(seed), _interior_point(seed), self.window,
            known, cancelled, self.disk_cache(), max_slices,
        )  # fmt: skip
        for done, step in enumerate(steps, 1):
            enc = None if step.embedding is None else Encoded(step.z, settings, step.embedding)
            mask = step.mask if step.mask is not None else np.zeros(self.volume.shape[1:3], bool)
            yield SliceResult(step.z, mask, enc, step.stopped, done, total)

    def apply_slice(self, result: SliceResult) -> None:
        """Write one propagation result into the current object."""
        self.mask[result.z] = result.mask
        if result.encoding is not None:
            self.store(result.encoding)

    # ------------------------------------------------------------------ synchronous helpers

    def ensure_encoded(self, z: int, prompts: Prompts | None = None):
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


def _interior_point(mask: np.ndarray) -> np.ndarray:
    """(x, y) of the mask pixel farthest from its border."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x, y], dtype=float)
