"""Precompute the embedding of every slice of a volume into an :class:`EmbeddingCache`.

``structsam embed VOLUME... --out CACHE`` runs this (e.g. on a GPU machine); a ``Predictor``
with the same cache, model, merging settings and window then serves each slice of that volume
without running the encoder.  Slices already in the cache are skipped, so a run that was
interrupted continues where it stopped.  Several volumes run in parallel on Dask, one task per
volume: a local cluster by default, or an existing one by its scheduler address (its workers
must see the volumes and the cache folder at the same paths, e.g. on a shared file system).

The slices are ``volume[z]`` of the array that :func:`structsam.io.read_volume` returns (or
:func:`sample_volume` for ``sample:mri``); a viewer must pass the same arrays to hit the
cache.  Windows are resolved once on the whole volume.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import DEFAULT_RATE
from .errors import StructSAMError

__all__ = [
    "EmbedResult",
    "build_model",
    "embed_volume",
    "embed_volumes",
    "load_volume",
    "sample_volume",
]

SAMPLE_VOLUMES = ("sample:mri",)

ProgressArg = bool | Callable[[int, int], Any] | None


@dataclass
class EmbedResult:
    """What one ``embed_volume`` run did."""

    source: str
    n_slices: int = 0
    encoded: int = 0  # slices encoded by this run
    cached: int = 0  # slices found in the cache and skipped
    window: tuple[float, float] | None = None
    encode_seconds: list[float] = field(default_factory=list)  # per encoded slice
    entry_bytes: list[int] = field(default_factory=list)  # cache file size per encoded slice
    seconds: float = 0.0  # wall-clock of the whole run
    error: str | None = None

    @property
    def median_encode_seconds(self) -> float | None:
        # the median: a process's first encode carries one-off start-up costs
        return float(np.median(self.encode_seconds)) if self.encode_seconds else None

    @property
    def bytes_per_slice(self) -> float | None:
        return float(np.mean(self.entry_bytes)) if self.entry_bytes else None

    def summary(self) -> str:
        if self.error:
            return f"{self.source}: FAILED: {self.error}"
        parts = [f"{self.source}: {self.n_slices} slices, {self.encoded} encoded"]
        if self.encode_seconds:
            parts.append(f"median {self.median_encode_seconds:.3f} s/slice in the encoder")
        parts.append(f"{self.cached} already cached")
        if self.entry_bytes:
            parts.append(f"{self.bytes_per_slice / 2**20:.2f} MiB/slice in the cache")
        if self.window is not None:
            parts.append(f"window ({self.window[0]:g}, {self.window[1]:g})")
        return ", ".join(parts) + f" ({self.seconds:.1f} s)"


def sample_volume(name: str = "sample:mri") -> tuple[np.ndarray, tuple[float, float, float]]:
    """``(volume_zyx, spacing_zyx)`` of a bundled volume exactly as the napari plugin shows it
    (the cache matches slices byte for byte, so both must use this array).

    ``sample:mri``: the MNI152 T1 template of :func:`structsam.samples.mni152_volume` with Y
    flipped, so axial slices show anterior at the top as ``mni152_slice`` does.
    """
    if name != "sample:mri":
        raise StructSAMError(f"unknown sample volume {name!r}; use {', '.join(SAMPLE_VOLUMES)}")
    from .samples import mni152_volume

    vol, spacing = mni152_volume()
    return np.ascontiguousarray(vol[:, ::-1, :]), spacing


def load_volume(source, volume_index: int | None = None) -> tuple[np.ndarray, str]:
    """``(volume_zyx float32, name)`` of a NIfTI file, a DICOM folder, a ``.npy`` array, an
    array already in memory, or ``sample:mri`` (the bundled MNI152 T1)."""
    from . import io

    if isinstance(source, np.ndarray):
        if source.ndim != 3:
            raise StructSAMError(f"a volume must be 3D (Z, Y, X), got shape {source.shape}")
        return source, "array"
    if str(source).startswith("sample:"):
        return sample_volume(str(source))[0], str(source)
    vol, _, _ = io.read_volume(source, volume_index=volume_index)
    return vol, str(source)


def build_model(
    model: str = "litemedsam",
    checkpoint=None,
    method: str | None = "structsam",
    rate=DEFAULT_RATE,
    device: str = "cpu",
    precision: str = "auto",
    compile: bool = False,
    **options,
):
    """``load_model`` then ``patch`` (no patch for ``method`` ``None``/``"none"`` or rate 0)."""
    from .models import load_model
    from .patching import patch

    m = load_model(
        model, checkpoint=checkpoint, device=device, precision=precision, compile=compile
    )
    if method not in (None, "none") and (not isinstance(rate, int | float) or rate > 0):
        patch(m, method, rate, **options)
    return m


def _slice_range(slices, n: int) -> Sequence[int]:
    if slices is None:
        return range(n)
    if isinstance(slices, str):
        try:
            parts = [int(p) if p.strip() else None for p in slices.split(":")]
            slices = slice(*parts)
        except (TypeError, ValueError) as exc:
            raise StructSAMError(f"slices must look like START:STOP, got {slices!r}") from exc
    if isinstance(slices, slice):
        ends = [v for v in (slices.start, slices.stop) if v is not None and v >= 0]
        if any(v > n for v in ends) or (slices.start or 0) == n:
            raise StructSAMError(
                f"slices {slices.start}:{slices.stop} are outside the volume's 0..{n - 1}"
            )
        chosen = range(*slices.indices(n))
    else:
        chosen = [int(z) for z in slices]
    bad = [z for z in chosen if not 0 <= z < n]
    if bad:
        raise StructSAMError(f"slices {bad[:3]} are outside the volume's 0..{n - 1}")
    return chosen


def embed_volume(
    source,
    cache=None,
    model="litemedsam",
    *,
    checkpoint=None,
    method: str | None = "structsam",
    rate=DEFAULT_RATE,
    window=None,
    device: str = "cpu",
    precision: str = "auto",
    compile: bool = False,
    volume_index: int | None = None,
    slices=None,
    progress: ProgressArg = True,
) -> EmbedResult:
    """Encode every slice (along axis 0) of ``source`` that ``cache`` does not hold yet.

    ``source``: see :func:`load_volume`.  ``cache``: an ``EmbeddingCache`` or a folder
    (default: the default cache folder).  ``model``: a model name, built with
    :func:`build_model` from ``checkpoint``/``method``/``rate``/``device``/``precision``, or a
    model that ``structsam.load_model`` built, used as it is patched (``method``/``rate`` are then
    ignored).  ``window``: anything :func:`structsam.windows.resolve_window` takes, resolved on
    the whole volume.  ``slices``: a subset (``range``, ``slice`` or ``"START:STOP"``).
    ``progress``: ``True`` for a tqdm bar, or ``callback(done, total)`` called after each
    slice.  Prompt-aware merging is off: the prompts are not known in advance.
    """
    from .cache import EmbeddingCache
    from .predictor import Predictor
    from .windows import resolve_window

    start = time.perf_counter()
    if not isinstance(cache, EmbeddingCache):
        cache = EmbeddingCache(cache)
    volume, name = load_volume(source, volume_index)
    win = resolve_window(window, volume)
    if isinstance(model, str):
        model = build_model(model, checkpoint, method, rate, device, precision, compile)
    predictor = Predictor(model, cache=cache)
    chosen = _slice_range(slices, volume.shape[0])
    result = EmbedResult(source=name, n_slices=len(chosen), window=win)
    todo = [z for z in chosen if cache.key(model, volume[z], win) not in cache]
    result.cached = len(chosen) - len(todo)
    bar = _progress_bar(progress, len(chosen), result.cached, name)
    try:
        for z in todo:
            predictor.set_image(volume[z], window=win)
            if not predictor.from_cache:  # another process may have written it meanwhile
                result.encoded += 1
                result.encode_seconds.append(float(predictor.encode_seconds))
                result.entry_bytes.append(_entry_size(cache, predictor.cache_key))
                if result.encoded == 1:
                    _warn_if_cache_too_small(cache, result.entry_bytes[0], len(chosen), name)
            else:
                result.cached += 1
            if callable(progress):
                progress(result.cached + result.encoded, len(chosen))
            elif bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - start
    return result


def _entry_size(cache, key: str | None) -> int:
    try:
        return cache.path(key).stat().st_size if key else 0
    except OSError:
        return 0


def _warn_if_cache_too_small(cache, entry_bytes: int, n: int, name: str) -> None:
    need = entry_bytes * n
    if need > cache.max_bytes:
        warnings.warn(
            f"{name}: {n} slices need about {need / 2**30:.2f} GiB but the cache is limited to "
            f"{cache.max_bytes / 2**30:.2f} GiB, so early slices will be evicted again; raise "
            "the limit (--max-size, $STRUCTSAM_CACHE_MAX_BYTES)",
            stacklevel=3,
        )


def _progress_bar(progress: ProgressArg, total: int, initial: int, name: str):
    if progress is not True:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=Path(name).name, unit="slice")


# ----------------------------------------------------------------------------- many volumes


def _embed_task(source, folder, max_bytes, settings: dict, threads: int | None, queue_name):
    """One volume on a Dask worker; per-slice progress goes to a distributed Queue."""
    import torch

    from .cache import EmbeddingCache

    if threads:
        torch.set_num_threads(int(threads))
    callback = None
    if queue_name is not None:
        from distributed import Queue

        queue = Queue(queue_name)
        sent = {"total": False}

        def callback(done: int, total: int) -> None:
            if not sent["total"]:
                queue.put(("total", total))
                sent["total"] = True
            queue.put(("slice", 1))

    try:
        cache = EmbeddingCache(folder, max_bytes)
        result = embed_volume(source, cache, progress=callback, **settings)
        if callback is not None and result.encoded == 0:
            queue.put(("total", result.n_slices))
            queue.put(("slice", result.n_slices))
        return result
    except (StructSAMError, OSError) as exc:  # a bad volume must not stop the others
        return EmbedResult(source=str(source), error=str(exc))


def _client(scheduler, workers: int | None, processes: bool, n_tasks: int):
    """(client, cluster or None): an existing scheduler, or a new local cluster."""
    from distributed import Client, LocalCluster

    if scheduler is not None and not isinstance(scheduler, str):
        return scheduler, None  # a Client given by the caller
    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError) as exc:
            raise StructSAMError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
    n = workers or max(1, min(n_tasks, (os.cpu_count() or 1) // 2))
    cluster = LocalCluster(
        n_workers=n, threads_per_worker=1, processes=processes, dashboard_address=None
    )
    return Client(cluster), cluster


def embed_volumes(
    sources: Sequence,
    cache=None,
    *,
    max_bytes=None,
    scheduler=None,
    workers: int | None = None,
    threads: int | None = None,
    processes: bool = True,
    progress: bool = True,
    **settings,
) -> list[EmbedResult]:
    """:func:`embed_volume` for many volumes in parallel on Dask, one task per volume.

    ``cache``: an ``EmbeddingCache`` or a folder, which every worker must reach.
    ``scheduler``: ``None`` starts a local cluster of ``workers`` processes (``processes=False``:
    threads, for tests); a ``"tcp://host:8786"`` address or a ``distributed.Client`` uses an
    existing cluster.  ``threads``: torch threads per task (default: the cores split among the
    local workers).  ``settings`` go to :func:`embed_volume` (``model`` as a name, ``method``,
    ``rate``, ``window``, ...).  A volume that fails (unreadable file...) is reported in its
    result's ``error`` and the others go on.
    """
    from distributed import as_completed

    from .cache import EmbeddingCache

    if not isinstance(cache, EmbeddingCache):
        cache = EmbeddingCache(cache, max_bytes)
    if not isinstance(settings.get("model", "litemedsam"), str):
        raise StructSAMError("embed_volumes builds its models on the workers: pass a model name")
    sources = [s if isinstance(s, str) else str(s) for s in sources]
    client, cluster = _client(scheduler, workers, processes, len(sources))
    if threads is None and cluster is not None and processes:
        # torch threads are per process: split the cores among the worker processes
        threads = max(1, (os.cpu_count() or 1) // len(cluster.workers))
    queue_name = f"structsam-embed-{os.getpid()}-{time.time_ns()}" if progress else None
    try:
        futures = [
            client.submit(
                _embed_task,
                src,
                str(cache.folder),
                cache.max_bytes,
                settings,
                threads,
                queue_name,
                key=f"embed-{i}-{Path(src).name}-{time.time_ns()}",
                pure=False,
            )
            for i, src in enumerate(sources)
        ]
        results = _gather(client, futures, queue_name, as_completed)
    finally:
        if cluster is not None:
            client.close()
            cluster.close()
    order = {id(f): i for i, f in enumerate(futures)}
    return [r for _, r in sorted(results, key=lambda t: order[t[0]])]


def _gather(client, futures, queue_name, as_completed) -> list[tuple[int, EmbedResult]]:
    bar = queue = None
    if queue_name is not None:
        from distributed import Queue
        from tqdm.auto import tqdm

        queue = Queue(queue_name, client=client)
        bar = tqdm(total=0, unit="slice", desc=f"{len(futures)} volumes")

    def drain() -> None:
        while queue is not None and queue.qsize() > 0:
            for kind, n in queue.get(batch=True):
                if kind == "total":
                    bar.total += n
                    bar.refresh()
                else:
                    bar.update(n)

    results = []
    pending = as_completed(futures, with_results=True)
    try:
        while not pending.is_empty():
            ready = pending.next_batch(block=False)
            if not ready:
                drain()
                time.sleep(0.2)
                continue
            for fut, res in ready:
                results.append((id(fut), res))
            drain()
        drain()
    finally:
        if bar is not None:
            bar.close()
    return results


def run_cli(args) -> int:
    """``structsam embed``: one volume in this process, several on Dask (or any with
    ``--scheduler``)."""
    import torch

    from .cache import EmbeddingCache

    cache = EmbeddingCache(args.out, args.max_size)
    settings: dict[str, Any] = {
        "model": args.model,
        "checkpoint": args.checkpoint,
        "method": args.method,
        "rate": args.rate,
        "window": args.window,
        "device": args.device,
        "precision": args.precision,
        "compile": args.compile,
        "volume_index": args.volume,
        "slices": args.slices,
    }
    print(f"cache: {cache.folder} (limit {cache.max_bytes / 2**30:.1f} GiB)")
    if len(args.volumes) == 1 and args.scheduler is None:
        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            results = [
                embed_volume(args.volumes[0], cache, progress=not args.no_progress, **settings)
            ]
        except KeyboardInterrupt:
            print("interrupted: the finished slices are cached; run the same command to resume")
            return 130
    else:
        results = embed_volumes(
            args.volumes,
            cache,
            scheduler=args.scheduler,
            workers=args.workers,
            threads=args.threads,
            progress=not args.no_progress,
            **settings,
        )
    for r in results:
        print(r.summary())
    failed = [r for r in results if r.error]
    return 2 if failed else 0
