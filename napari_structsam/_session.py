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
from structsam.interactive import objects as _obj
from structsam.interactive.objects import Commit, History  # noqa: F401 (the widget's)
from structsam.interactive.plane import Plane
from structsam.interactive.service import (  # no torch at import
    EmbeddingStore,
    EncodeCancelled,  # noqa: F401 (the worker's and the tests' import)
    Stats,  # noqa: F401
    StatsBook,
    VoteProgress,  # noqa: F401 (the widget's)
    shared_service,
)
from structsam.interactive.settings import EncoderSettings, Reencode, reencode_reason

from ._prompts import Prompts, box_of
from ._runtime import available_devices, preload  # noqa: F401 (the widget's imports)


class SessionError(Exception):
    """A user-facing problem (no image, no prompt...): the message is for the status line."""


class Busy(SessionError):
    """The decoder cannot run right now (an encoder FLOPs count holds global module hooks)."""


@dataclass(frozen=True)
class Encoded:
    """An encode's result as a worker yields it: which slice, under which settings. The
    embedding's own attributes (``merge_info``, ``prompts``, ``seconds``...) read through."""

    z: int
    settings: EncoderSettings
    embedding: object  # structsam.Embedding
    plane: Plane | None = None  # None: the session's plane when stored

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
    label: int = 1  # which object of the current label map


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
        self.history = History()  # commits (Commit) and the widget's prompt edits
        self.plane = Plane()
        self._stores: dict[tuple, EmbeddingStore] = {}  # per plane (Plane.key)
        self._book = StatsBook()
        # disk cache of embeddings shared with `structsam embed` (structsam.cache); None: the
        # default folder ($STRUCTSAM_CACHE_DIR or ~/.cache/structsam/embeddings)
        self.use_disk_cache = True
        self.cache_folder: str | None = None
        self.cache_note: str | None = None  # why the disk cache is off, for the status line

    # ------------------------------------------------------------------ image and state

    def set_image(self, image, rgb=False, window=None, objects=None, spacing=None) -> None:
        """Take a new image: (Y, X), (Y, X, 3|4) with ``rgb``, or (Z, Y, X). Drops embeddings,
        the current mask and the undo history; ``objects`` (same spatial shape) are kept.
        ``spacing``: the pixel or voxel size per spatial axis (slices are encoded on square
        pixels). The plane is the axial one until ``set_plane``."""
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
            self.objects = np.ascontiguousarray(objects).reshape(shape)
        else:
            self.objects = np.zeros(shape, np.int32)
        self.history.clear()
        self._stores.clear()
        self._book.clear()
        if spacing is not None:
            spacing = (1.0,) * (3 - len(spacing)) + tuple(float(v) for v in spacing)
        self.plane = Plane(spacing=spacing)

    def set_plane(self, plane: Plane) -> None:
        """Annotate on slices of ``plane`` (its spacing is the image's); embeddings of every
        plane are kept apart."""
        if not self.is_3d and plane.axis != 0:
            raise SessionError("a 2D image has only its own plane")
        self.plane = Plane(plane.axis, plane.rows, plane.cols, self.plane.spacing)

    @property
    def _embeddings(self) -> EmbeddingStore:
        return self._stores.setdefault(self.plane.key, EmbeddingStore())

    @property
    def pixels(self):
        """The current plane's ``structsam.transforms.SquarePixels``."""
        return self.plane.pixels(self.volume.shape)

    @property
    def plane_mask(self) -> np.ndarray:
        """The current object as (slice, row, column) of the plane (a view)."""
        return self.plane.view(self.mask)

    @property
    def plane_objects(self) -> np.ndarray:
        return self.plane.view(self.objects)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape as the layers see it: (Z, Y, X) or (Y, X)."""
        if self.volume is None:
            return ()
        return self.volume.shape[:3] if self.is_3d else self.volume.shape[1:3]

    @property
    def n_slices(self) -> int:
        return 0 if self.volume is None else self.volume.shape[self.plane.axis]

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
        """Slice ``z`` of the current plane on square pixels (what is encoded)."""
        z = self._check_z(z)
        return self.pixels.to_square(self.plane.view(self.volume)[z])

    def to_square(self, prompts) -> dict | None:
        """Prompts (plane pixels, a ``Prompts`` or a dict) -> a dict on square pixels."""
        if isinstance(prompts, Prompts):
            prompts = prompts.as_dict()
        if not prompts:
            return None
        px, out = self.pixels, dict(prompts)
        if "box" in out:
            out["box"] = px.boxes_to_square(out["box"])
        if "point_coords" in out:
            out["point_coords"] = px.points_to_square(out["point_coords"])
        return out

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
        plane, image = self.plane, self.slice_image(z)
        embedding = self.service.encode(
            image, settings, self.window, self.to_square(prompts), cancelled, self.disk_cache()
        )
        return Encoded(int(z), settings, embedding, plane)

    def flops_stats(
        self, z: int, settings: EncoderSettings | None = None, prompts=None, time_unmerged=True,
        cancelled: Callable[[], bool] | None = None,
    ):  # fmt: skip
        """Encoder FLOPs of ``settings`` (and, once per model, the dense FLOPs and an unmerged
        encode time) on slice ``z``. Costs one to four forwards; run it in a worker."""
        settings = settings or self.settings
        return self.service.flops(
            self.slice_image(z), settings, self._book, self.to_square(prompts), self.window,
            time_unmerged,
            cancelled,
        )  # fmt: skip

    # ------------------------------------------------------------------ embeddings (GUI side)

    def store(self, enc: Encoded) -> None:
        """Keep an embedding (least recently used ones are dropped)."""
        store = self._stores.setdefault((enc.plane or self.plane).key, EmbeddingStore())
        store.put(enc.z, enc.settings, self.window, enc.embedding)

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
        if isinstance(prompts, list):
            prompts = Prompts.union(prompts)
        as_dict = self.to_square(prompts) if prompts is not None else None
        return reencode_reason(self.encoding(z), self.settings, as_dict)

    # ------------------------------------------------------------------ decoding (GUI side)

    def predict(self, z: int, prompts) -> tuple[np.ndarray, object]:
        """(mask (rows, cols) bool, score) for ``prompts`` on slice ``z`` from its stored
        embedding; for a list of objects' prompts (label map 1..K uint8, scores (K,))."""
        enc = self.encoding(self._check_z(z))
        if enc is None:
            raise SessionError(f"slice {z} has no embedding yet")
        return self.decode(Encoded(z, self.settings, enc), prompts)

    def decode(self, enc: Encoded, prompts) -> tuple[np.ndarray, object]:
        """Decode one object's ``Prompts`` or a list of objects' (the box-only ones in one
        batched call) on the square-pixel slice; masks come back on the plane's pixels."""
        import structsam

        objects = [o for o in (prompts if isinstance(prompts, list) else [prompts]) if o]
        if not objects:
            raise SessionError("no prompt on this slice: add a box or a point")
        service = self.service
        if not service.count_lock.acquire(blocking=False):
            raise Busy("counting encoder FLOPs; the mask follows in a moment")
        try:
            predictor = structsam.Predictor(service.pool.decoder(enc.settings))
            square = [self.to_square(o) for o in objects]
            masks, scores = _obj.decode_objects(predictor, enc.embedding, square)
        finally:
            service.count_lock.release()
        masks = np.stack([self.pixels.to_original(m) for m in masks])
        if not isinstance(prompts, list):
            return masks[0], float(scores[0])
        return _obj.label_map(masks), scores

    def segment(self, z: int, prompts) -> tuple[np.ndarray, object]:
        """Predict and put the mask (or the objects' label map) into the current object at
        slice ``z`` of the plane."""
        view = self.plane_mask
        if not (any(prompts) if isinstance(prompts, list) else prompts):
            view[self._check_z(z)] = 0
            return view[z].astype(bool), 0.0
        mask, score = self.predict(z, prompts)
        view[z] = mask
        return mask, score

    # ------------------------------------------------------------------ commit / undo / redo

    def commit(self) -> Commit | None:
        """Each object of the current label map -> a new label in ``objects``, only where no
        object is yet; clears the current object. None when there was nothing new."""
        self._check_image()
        done = _obj.commit(self.objects, self.mask)
        if done is not None:
            self.history.push(done)
        return done

    def undo(self):
        """Take back the last step: a commit's pixels that still hold its labels are cleared
        (the current object is the caller's: see ``restore_object``).
        Returns the step (other kinds, e.g. the widget's prompt edits, are the caller's)."""
        step = self.history.undo()
        if isinstance(step, Commit):
            _obj.undo_commit(self.objects, step)
        return step

    def restore_object(self, step: Commit) -> None:
        """The current object as it was before ``step`` was committed (after its undo, where
        nothing has been drawn since)."""
        _obj.restore_current(self.mask, step)

    def redo(self):
        """Do the last undone step again (a commit only where ``objects`` is still 0)."""
        step = self.history.redo()
        if isinstance(step, Commit):
            _obj.redo_commit(self.objects, step)
        return step

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
        """Carry each object on slice ``z0`` of the plane through the volume in both
        directions with ``structsam.interactive.propagate``, one object after the other.

        The box of the object's mask prompts the walk, as the library's stop rules were tuned
        (box plus an interior point seeded another mask than the next slices' boxes, and the
        walk stopped at once); each next slice is prompted from the previous slice's mask.
        Yields one ``SliceResult`` per visited slice, ``VoteProgress`` while the two other
        planes vote, then a ``SliceResult`` per slice the vote changed; changes nothing: the
        caller applies them (``apply_slice``). Worker-safe given ``seed`` (a label map or a
        mask) and ``known`` (slice -> ``Embedding`` under ``settings``)."""
        z0 = self._check_z(z0)
        settings = settings or self.settings
        seed = self.plane_mask[z0] if seed is None else np.asarray(seed)
        labels = [int(v) for v in np.unique(seed) if v]
        if not labels:
            raise SessionError("segment the object on this slice first (S), then propagate")
        plane, volume = self.plane, self.plane.view(self.volume)
        spacing = None if plane.spacing is None else [plane.spacing[a] for a in plane.order]
        per = self.n_slices - 1 if max_slices is None else min(self.n_slices - 1, 2 * max_slices)
        done, total = 0, per * len(labels)
        for label in labels:
            mask = seed == label
            steps = self.service.propagate(
                volume, z0, settings, box_of(mask), None, self.window,
                known, cancelled, self.disk_cache(), max_slices, spacing,
            )  # fmt: skip
            for step in steps:
                if isinstance(step, VoteProgress):
                    yield step
                    continue
                done += 0 if step.voted else 1
                enc = None
                if step.embedding is not None:
                    enc = Encoded(step.z, settings, step.embedding, plane)
                m = step.mask if step.mask is not None else np.zeros(volume.shape[1:3], bool)
                yield SliceResult(step.z, m, enc, step.stopped, done, total, label)

    def apply_slice(self, result: SliceResult) -> None:
        """Write one propagation result into the current object (its label's pixels on that
        slice are replaced; other objects' stay)."""
        view = self.plane_mask[result.z]
        view[view == result.label] = 0
        view[np.asarray(result.mask, bool) & (view == 0)] = result.label
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
            if isinstance(res, VoteProgress):
                continue
            self.apply_slice(res)
            results.append(res)
        return results
