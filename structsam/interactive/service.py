"""The encoder service of an interactive session: models, encodes, decodes and FLOPs counts.

No Qt, no napari: a GUI calls ``encode``/``flops`` from a worker thread and ``decode`` from its
own thread. One patched model per setting (:class:`ModelPool`): a setting's model is patched
once when it is made and never re-patched, so encodes of different settings never wait for
one another to switch a shared model. Cancellation: ``encode(..., cancelled=...)`` stops at
the next encoder block once ``cancelled()`` is true (:class:`EncodeCancelled`).
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import StructSAMError
from .settings import EncoderSettings

__all__ = [
    "DecoderBusy",
    "EmbeddingStore",
    "EncodeCancelled",
    "EncoderService",
    "ModelPool",
    "PropagationStep",
    "Stats",
    "StatsBook",
    "VoteProgress",
    "shared_service",
]

# Patched models kept loaded (LRU): at most this many, and beyond MAX_POOL_BYTES of weights
# only the newest (LiteMedSAM's weights are 40 MB, a SAM ViT-H's 2.5 GB).
MAX_MODELS = 3
MAX_POOL_BYTES = 6 * 2**30
# An unmerged encode is timed (for the speed-up shown) only when a merged one took less.
UNMERGED_TIMING_MAX_SECONDS = 3.0
SMALL_ENCODER_PARAMETERS = 20_000_000


class EncodeCancelled(Exception):
    """Raised inside the encoder forward when ``cancelled()`` turned true."""


class DecoderBusy(StructSAMError):
    """The decoder cannot run right now: an encoder FLOPs count holds global module hooks."""


@dataclass
class Stats:
    """FLOPs and timings of one setting, measured in a worker and kept by a :class:`StatsBook`."""

    settings: EncoderSettings
    flops: int | None = None  # merged encoder FLOPs on the slice it was measured on
    dense_flops: int | None = None
    unmerged_seconds: float | None = None

    @property
    def flops_saved(self) -> float | None:
        if self.flops is None or not self.dense_flops:
            return None
        return 1.0 - self.flops / self.dense_flops


class StatsBook:
    """FLOPs per setting, and per model the dense FLOPs and the unmerged encode time."""

    def __init__(self):
        self._stats: dict[EncoderSettings, Stats] = {}
        self._dense: dict[tuple, Stats] = {}

    def clear(self) -> None:
        self._stats.clear()

    def dense(self, settings: EncoderSettings) -> Stats | None:
        return self._dense.get(settings.model_key)

    def store(self, stats: Stats) -> None:
        self._stats[stats.settings] = stats
        if stats.dense_flops is not None:
            dense = self._dense.setdefault(stats.settings.model_key, Stats(stats.settings))
            dense.dense_flops = stats.dense_flops
            if stats.unmerged_seconds is not None:
                dense.unmerged_seconds = stats.unmerged_seconds

    def note_encode(self, settings: EncoderSettings, seconds: float) -> None:
        """An encode without merging is the unmerged time of its model."""
        if not settings.merging:
            dense = self._dense.setdefault(settings.model_key, Stats(settings))
            dense.unmerged_seconds = seconds

    def get(self, settings: EncoderSettings) -> Stats | None:
        """A setting's stats, with its model's latest unmerged time: a real unmerged encode
        replaces the one timed with the FLOPs, for every setting of the model."""
        stats = self._stats.get(settings)
        dense = self._dense.get(settings.model_key)
        if stats is None and dense is not None:
            stats = Stats(settings, None, dense.dense_flops, dense.unmerged_seconds)
        elif stats is not None and dense is not None and dense.unmerged_seconds is not None:
            stats.unmerged_seconds = dense.unmerged_seconds
        return stats

    def needs(self, settings: EncoderSettings) -> bool:
        stats = self._stats.get(settings)
        return stats is None or stats.flops is None


class EmbeddingStore:
    """Embeddings of one image's slices, keyed by (slice, settings, window); the least
    recently used go beyond ``capacity``."""

    def __init__(self, capacity: int = 48):  # 4 MiB of features each for LiteMedSAM
        self.capacity = capacity
        self._items: OrderedDict[tuple, object] = OrderedDict()

    def clear(self) -> None:
        self._items.clear()

    def put(self, z: int, settings: EncoderSettings, window, embedding) -> None:
        key = (int(z), settings, window)
        self._items[key] = embedding
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, z: int, settings: EncoderSettings, window):
        key = (int(z), settings, window)
        embedding = self._items.get(key)
        if embedding is not None:
            self._items.move_to_end(key)
        return embedding

    def slices(self, settings: EncoderSettings, window) -> set[int]:
        return {k[0] for k in self._items if k[1] == settings and k[2] == window}


class ModelPool:
    """One patched model per setting (``EncoderSettings.patch_key``), the latest
    ``capacity`` kept (fewer when their weights pass ``max_bytes``). A new setting of a
    loaded model is a copy of it, patched once."""

    def __init__(self, capacity: int = MAX_MODELS, max_bytes: int = MAX_POOL_BYTES):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._models: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.RLock()
        self._make_lock = threading.Lock()

    def get(self, settings: EncoderSettings):
        """The model of ``settings``, made on first use (seconds: call it from a worker)."""
        key = settings.patch_key
        model = self._lookup(key)
        if model is not None:
            return model
        with self._make_lock:  # loading does not hold the lookup lock: decoders keep going
            model = self._lookup(key)
            if model is None:
                model = self._make(settings, self._loaded(settings.model_key))
                with self._lock:
                    self._models[key] = model
                    self._evict()
        return model

    def _evict(self) -> None:
        def size(m):
            return sum(p.numel() * p.element_size() for p in m.parameters())

        while len(self._models) > 1 and (
            len(self._models) > self.capacity
            or sum(size(m) for m in self._models.values()) > self.max_bytes
        ):
            self._models.popitem(last=False)

    def _lookup(self, key: tuple):
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
            return model

    def _loaded(self, model_key: tuple):
        """The most recent loaded model with these weights, or None."""
        with self._lock:
            for key, model in reversed(self._models.items()):
                if key[: len(model_key)] == model_key:
                    return model
        return None

    def decoder(self, settings: EncoderSettings):
        """A loaded model with the decoder of ``settings`` (any setting of the same weights),
        without making one when one is loaded."""
        return self._loaded(settings.model_key) or self.get(settings)

    @staticmethod
    def _make(settings: EncoderSettings, base):
        import structsam
        from structsam.cache import share_weights_identity

        if base is None:
            model = structsam.load_model(
                settings.model,
                checkpoint=settings.checkpoint or None,
                device=settings.device,
                precision=settings.precision,
            )
        else:
            model = copy.deepcopy(base)
            share_weights_identity(base, model)
        if settings.merging:
            structsam.patch(model, settings.method, settings.rate)
        else:
            # unmerged = the same lean encoder at rate 0 (SAM ViT's fused attention), so the
            # speed-up shown is merging's alone
            structsam.patch(model, "structsam", 0.0)
        return model


class EncoderService:
    """Encodes, decodes and FLOPs counts for interactive sessions (see the module doc)."""

    def __init__(self, pool: ModelPool | None = None):
        self.pool = pool or ModelPool()
        # torch's FlopCounterMode installs global module hooks that break a decoder running at
        # the same time in another thread: counting holds this lock, decoding only tries it
        self.count_lock = threading.Lock()
        # one encoder forward at a time: per-call prompts live on a model's patch, and on a
        # CPU two encodes at once are slower than one after the other
        self.forward_lock = threading.RLock()
        self._caches: dict[str, object] = {}

    def model(self, settings: EncoderSettings):
        return self.pool.get(settings)

    def disk_cache(self, folder: str | None = None):
        """``(EmbeddingCache or None, note)``: the disk cache in ``folder`` (None: the default
        one), opened once; an unusable folder gives None and a note saying why."""
        from structsam.cache import EmbeddingCache, default_cache_folder

        # the default folder is read now: $STRUCTSAM_CACHE_DIR may have changed
        folder = str(folder or default_cache_folder())
        if folder not in self._caches:
            try:
                self._caches[folder] = EmbeddingCache(folder)
            except StructSAMError as exc:
                return None, f"disk cache off: {exc}"
        return self._caches[folder], None

    def encode(
        self,
        image,
        settings: EncoderSettings,
        window=None,
        prompts: Mapping | None = None,
        cancelled: Callable[[], bool] | None = None,
        cache=None,
    ):
        """The :class:`~structsam.embedding.Embedding` of ``image`` under ``settings``.
        ``prompts`` (image pixels) are protected only when ``settings.uses_prompts``."""
        import structsam

        prompts = dict(prompts) if prompts and settings.uses_prompts else None
        with self.forward_lock:
            if cancelled is not None and cancelled():
                raise EncodeCancelled
            model = self.pool.get(settings)
            with cancel_hooks(model, cancelled):
                return structsam.Predictor(model, cache=cache).encode(image, window, prompts)

    def decode(self, settings: EncoderSettings, embedding, prompts: Mapping):
        """(mask (H, W) bool, score) of one prompt set (image pixels: ``box``,
        ``point_coords``/``point_labels``) from ``embedding``: cheap, and safe next to a
        running encode (it uses the prompt encoder and mask decoder only)."""
        import structsam

        model = self.pool.decoder(settings)
        if not self.count_lock.acquire(blocking=False):
            raise DecoderBusy("counting encoder FLOPs; the mask follows in a moment")
        try:
            masks, scores, _ = structsam.Predictor(model).predict(
                point_coords=prompts.get("point_coords"),
                point_labels=prompts.get("point_labels"),
                box=prompts.get("box"),
                embedding=embedding,
            )
        finally:
            self.count_lock.release()
        return masks[0], float(scores[0])

    def flops(
        self, image, settings: EncoderSettings, book: StatsBook, prompts=None, window=None,
        time_unmerged: bool = True, cancelled: Callable[[], bool] | None = None,
    ) -> Stats:  # fmt: skip
        """Encoder FLOPs of ``settings`` on ``image`` and, unless ``book`` has them for its
        model, the dense FLOPs and (``time_unmerged``) a warm unmerged encode time. One to four
        forwards; run it in a worker. ``book`` is only read."""
        import structsam

        prompts = dict(prompts) if prompts and settings.uses_prompts else None
        stats = Stats(settings)
        with self.forward_lock, self.count_lock:
            dense = book.dense(settings)
            if dense is None or dense.dense_flops is None:
                dense = Stats(settings.unmerged())
                model = self.pool.get(dense.settings)
                with cancel_hooks(model, cancelled):
                    if time_unmerged:
                        dense.unmerged_seconds = _warm_encode_seconds(model, image, window)
                    dense.dense_flops = structsam.encoder_flops(model, image)
            stats.dense_flops = dense.dense_flops
            stats.unmerged_seconds = dense.unmerged_seconds
            if settings.merging:
                model = self.pool.get(settings)
                with cancel_hooks(model, cancelled):
                    stats.flops = structsam.encoder_flops(model, image, prompts=prompts)
            else:
                stats.flops = dense.dense_flops
        return stats

    def propagate(
        self, volume, z: int, settings: EncoderSettings, box, point, window=None,
        known: Mapping | None = None, cancelled: Callable[[], bool] | None = None, cache=None,
        max_slices: int | None = None, spacing=None,
    ):  # fmt: skip
        """Stream :func:`structsam.interactive.propagate` of the object prompted on slice
        ``z`` (``box``, one positive ``point`` or None, image pixels) through ``volume`` (Z, Y, X):
        yields a :class:`PropagationStep` per kept slice as soon as it exists, then one per
        direction that stopped before the edge; during the orthogonal vote
        :class:`VoteProgress`, then a step (``voted``) per slice that the vote changed.
        ``known``: slice -> Embedding already made under ``settings`` (not encoded again).
        ``spacing``: voxel size per axis (slices are encoded on square pixels; ``known`` holds
        embeddings of those). Runs the walk in a helper thread (the service's forward lock
        held); ``cancelled()`` stops it within one encoder block (:class:`EncodeCancelled`)."""
        import queue

        import numpy as np

        from structsam.identity import sha256_array

        from ..transforms import SquarePixels
        from .propagate import propagate

        sq = SquarePixels.for_slice(volume.shape[1:3], None if spacing is None else spacing[1:])
        known = {sha256_array(sq.to_square(volume[i])): e for i, e in (known or {}).items()}
        model = self.pool.get(settings)
        predictor = _known_predictor(model, cache, known)
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        streamed: dict[int, np.ndarray] = {}

        def on_slice(record, mask):
            streamed[record.index] = mask
            events.put(PropagationStep(record.index, mask, predictor.last))
            return stop.is_set() or (cancelled is not None and cancelled())

        def on_vote(done, total):
            events.put(VoteProgress(done, total))
            return stop.is_set() or (cancelled is not None and cancelled())

        def run():
            try:
                with self.forward_lock, cancel_hooks(model, _either(stop, cancelled)):
                    result = propagate(
                        predictor, volume, z, box=box,
                        point_coords=None if point is None else [point],
                        point_labels=None if point is None else [1],
                        window=window, prompt_aware=settings.uses_prompts, callback=on_slice,
                        max_slices=max_slices, spacing=spacing, on_vote=on_vote,
                    )  # fmt: skip
                for report in (result.up, result.down):
                    if report.stopped_at is not None and report.reason not in ("edge", "limit"):
                        text = _stop_text(report.reason, report.detail)
                        events.put(PropagationStep(report.stopped_at, None, None, text))
                empty = np.zeros(volume.shape[1:3], bool)
                for i, voted in enumerate(result.mask):  # after the stops: they clear slices
                    if i != z and not np.array_equal(voted, streamed.get(i, empty)):
                        events.put(PropagationStep(i, voted, None, voted=True))
                events.put(None)
            except BaseException as exc:  # noqa: BLE001 (handed to the consumer's thread)
                events.put(exc)

        worker = threading.Thread(target=run, name="structsam-propagate", daemon=True)
        worker.start()
        try:
            while (item := events.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # a consumer that stops early stops the walk
            worker.join()

    def worth_timing_unmerged(self, settings: EncoderSettings, embedding) -> bool:
        """An extra unmerged encode (for the speed-up shown) only where it is cheap: a small
        encoder (LiteMedSAM's has 5.7 M parameters, a SAM ViT-B's 86 M), or a quick encode."""
        if embedding.seconds < UNMERGED_TIMING_MAX_SECONDS:
            return True
        encoder = self.pool.decoder(settings).image_encoder
        return sum(p.numel() for p in encoder.parameters()) < SMALL_ENCODER_PARAMETERS


def _warm_encode_seconds(model, image, window) -> float:
    """Seconds of a warm encode: the faster of two. A model's first forward also builds its
    kernels (oneDNN primitives; AMX code in bf16): LiteMedSAM's first bf16 encode took 0.55 s
    in napari where the next ones took 0.16 s, and the status line then showed a 3.0x speed-up
    for a merged encode that was slower than unmerged (2026-12-07)."""
    import structsam

    predictor = structsam.Predictor(model)
    return min(float(predictor.encode(image, window).seconds) for _ in range(2))


@dataclass
class PropagationStep:
    """One slice of a propagation: its mask and embedding, or (``stopped``) why the walk in
    that direction ended there. ``voted``: the slice as the orthogonal vote changed it (it
    replaces what the walk gave there)."""

    z: int
    mask: object | None  # (H, W) bool; None for a stop
    embedding: object | None
    stopped: str | None = None
    voted: bool = False


@dataclass
class VoteProgress:
    """The orthogonal vote after the walk: ``done`` of ``total`` slices segmented."""

    done: int
    total: int


def _known_predictor(model, cache, known: Mapping):
    """A ``Predictor`` that answers ``encode`` from ``known`` (image hash -> Embedding) when it
    can, and remembers the last embedding it gave."""
    import structsam
    from structsam.identity import sha256_array

    class KnownPredictor(structsam.Predictor):
        last = None

        def encode(self, image, window=None, prompts=None):
            found = None if prompts else known.get(sha256_array(image))
            self.last = found or super().encode(image, window, prompts)
            return self.last

    return KnownPredictor(model, cache=cache)


def _stop_text(reason: str, detail: str) -> str:
    from .propagate import REASONS

    return f"object ended ({REASONS[reason]}{': ' + detail if detail else ''})"


def _either(event: threading.Event, cancelled: Callable[[], bool] | None):
    return lambda: event.is_set() or (cancelled is not None and cancelled())


class cancel_hooks:  # noqa: N801 (used as a context manager, like contextlib's)
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


_SHARED: EncoderService | None = None
_SHARED_LOCK = threading.Lock()


def shared_service() -> EncoderService:
    """The process's service: sessions share its loaded models (one CPU encode at a time is
    the fastest anyway, and models are large)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = EncoderService()
        return _SHARED
