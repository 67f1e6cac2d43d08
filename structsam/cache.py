"""Image embeddings cached on disk, so an image already encoded with the same settings skips
the encoder.

An entry's key is a SHA-256 over everything the embedding depends on: the exact image array
(bytes, shape, dtype), the model name, the weights (the checkpoint file's SHA-256, or a hash of
the state dict for random or in-place modified weights), BatchNorm folding, the patch (method,
per-block rates, options, seed; the unmerged model has its own key), the prompts of a
prompt-aware encode (in model-input pixels), the intensity window, and the cache format and
structsam version.  The device is not part of it: an embedding made on a GPU serves a CPU.

An entry holds the float32 embedding exactly as the encoder returned it (so a hit gives the
same masks), the merge diagnostics overlays need (per-block merge maps, protected tokens and
token counts, as :class:`StoredMergeInfo`), the geometry and the original encode time.  Entries
are written atomically (temporary file, then :func:`os.replace`); when the folder grows past
``max_bytes`` the least recently used entries go (a hit refreshes an entry's mtime); an entry
that cannot be read is deleted with a warning and counts as a miss.

The folder is ``$STRUCTSAM_CACHE_DIR``, else ``embeddings`` under structsam's cache directory
(``$STRUCTSAM_CACHE`` or ``~/.cache/structsam``); the size limit is
``$STRUCTSAM_CACHE_MAX_BYTES`` (``"8G"``, ``"500M"`` or bytes), else 8 GiB.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .embedding import Embedding
from .errors import StructSAMError
from .identity import canonical, sha256_array
from .transforms import Geometry

__all__ = [
    "CACHE_DIR_ENV",
    "CACHE_SIZE_ENV",
    "EmbeddingCache",
    "StoredMergeInfo",
    "default_cache_folder",
    "embedding_from_dict",
    "embedding_key",
    "identities",
    "entry_dict",
    "parse_size",
    "settings_fields",
    "share_weights_identity",
    "settings_identity",
    "weights_identity",
]

CACHE_DIR_ENV = "STRUCTSAM_CACHE_DIR"
CACHE_SIZE_ENV = "STRUCTSAM_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 8 * 2**30
# Bumped whenever the entry layout or anything that changes embeddings without changing the
# settings above changes, so old entries are never served.
CACHE_FORMAT = 2
_ENTRY = re.compile(r"^[0-9a-f]{64}\.pt$")
_SUFFIX = ".pt"
# Temporary files left by a killed writer are removed once they are this old (seconds).
_STALE_TMP_SECONDS = 3600.0
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(size: int | float | str) -> int:
    """Bytes from ``8589934592``, ``"8G"``, ``"500M"``, ``"1.5GB"`` or ``"2 GiB"``."""
    if isinstance(size, int | float) and not isinstance(size, bool):
        value = int(size)
    else:
        match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(?:I?B)?\s*", str(size).upper())
        if match is None:
            raise StructSAMError(f"cannot read {size!r} as a size; use e.g. 8G, 500M or bytes")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise StructSAMError(f"cache size must be positive, got {size!r}")
    return value


def default_cache_folder() -> Path:
    """``$STRUCTSAM_CACHE_DIR``, else ``<structsam cache dir>/embeddings``."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    from .models.registry import default_cache_dir

    return default_cache_dir() / "embeddings"


# ----------------------------------------------------------------------------- key


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: str) -> str:
    """SHA-256 of a file, remembered per (path, mtime, size) for the life of the process."""
    st = os.stat(path)
    memo = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    if memo not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _FILE_HASHES[memo] = h.hexdigest()
    return _FILE_HASHES[memo]


def _tensors(model) -> list[tuple[str, torch.Tensor]]:
    return list(model.state_dict(keep_vars=True).items())


def _versions(model) -> tuple[int, ...]:
    """In-place modification counters of every parameter and buffer."""
    out = []
    for _, t in _tensors(model):
        try:
            out.append(int(t._version))
        except RuntimeError:  # inference tensors have no version counter
            out.append(-1)
    return tuple(out)


def _state_dict_sha256(model) -> str:
    h = hashlib.sha256()
    for name, t in _tensors(model):
        arr = t.detach().to("cpu").contiguous()
        h.update(f"{name}{arr.dtype}{tuple(arr.shape)}".encode())
        h.update(memoryview(arr.view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def share_weights_identity(source, twin) -> None:
    """``twin`` is a fresh copy of ``source`` (``copy.deepcopy``): give it ``source``'s weights
    identity without hashing its state dict again (a copy's tensors restart their version
    counters, which alone would read as weights changed in place)."""
    twin._structsam_weights_identity = (_versions(twin), weights_identity(source))


def weights_identity(model) -> str:
    """What identifies the weights of ``model``: ``file:<sha256>`` of its checkpoint, or
    ``state:<sha256>`` of its state dict for random weights, for models not loaded from a file,
    and once any parameter or buffer has been changed in place after the first call."""
    path = getattr(model, "checkpoint_path", None)
    versions = _versions(model)
    memo = getattr(model, "_structsam_weights_identity", None)
    if memo is not None and memo[0] == versions:
        return memo[1]
    if memo is None and path not in (None, "random") and Path(path).is_file():
        identity = f"file:{_file_sha256(path)}"
    else:
        identity = f"state:{_state_dict_sha256(model)}"
    model._structsam_weights_identity = (versions, identity)
    return identity


def _patch_identity(model) -> dict[str, Any]:
    from .patching import merge_config

    config = merge_config(model)
    return {"method": None} if config is None else config.identity()


def settings_fields(model, window=None, prompts=None) -> dict[str, Any]:
    """What an embedding depends on besides the image, JSON-able (arguments as for
    :func:`key_fields`)."""
    from . import __version__

    spec = getattr(model, "structsam_spec", None)
    if spec is None:
        raise StructSAMError("this model was not built by structsam.load_model (no spec)")
    win = None if window is None else [repr(float(v)) for v in window]
    return {
        "format": CACHE_FORMAT,
        "structsam": __version__,
        "model": spec.name,
        "weights": weights_identity(model),
        "bn_folded": bool(getattr(model, "bn_folded", False)),
        "precision": getattr(model, "precision", "fp32"),
        "patch": _patch_identity(model),
        "prompts": None if prompts is None else canonical(prompts),
        "window": win,
    }


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def settings_identity(model, window=None, prompts=None) -> str:
    """SHA-256 of :func:`settings_fields` (``Embedding.settings``)."""
    return _digest(settings_fields(model, window, prompts))


def key_fields(model, image, window=None, prompts=None) -> dict[str, Any]:
    """The settings an embedding depends on, as a JSON-able dict (see the module docstring).

    ``image`` is the array given to ``Predictor.set_image``; ``window`` the ``(low, high)``
    pair or ``None``; ``prompts`` the prompts of a prompt-aware encode in model-input pixels
    (``embedding.model_prompts``) that replaced the patch's own (``{}``: replaced by none),
    ``None`` for an encode that used the patch's prompts (usually none)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    return {**settings_fields(model, window, prompts), "image": sha256_array(np.asarray(image))}


def identities(model, image, window=None, prompts=None) -> tuple[str, str]:
    """``(settings_identity, embedding_key)`` of one encode, the settings read once."""
    fields = settings_fields(model, window, prompts)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    return _digest(fields), _digest({**fields, "image": sha256_array(np.asarray(image))})


def embedding_key(model, image, window=None, prompts=None) -> str:
    """The cache key (64 hex digits) of an encode; arguments as for :func:`key_fields`."""
    return _digest(key_fields(model, image, window, prompts))


# ----------------------------------------------------------------------------- entries


@dataclass
class StoredMergeInfo:
    """What one merged block did, as stored in the cache; the same attributes the overlays
    read from :class:`structsam.patching.BlockMergeInfo`."""

    block: int
    stage: int
    grid_shape: tuple[int, int]
    window: int | None
    tokens_before: int
    tokens_after: int
    merge_map: np.ndarray
    protected: np.ndarray


def _merge_maps(merge_info) -> tuple[list[dict], list[torch.Tensor], list[torch.Tensor]]:
    """Per-block records and the maps they point to (blocks of one stage share a plan: its
    maps are stored once)."""
    maps: list[torch.Tensor] = []
    protected: list[torch.Tensor] = []
    seen: dict[int, int] = {}
    blocks = []
    for info in merge_info:
        plan = getattr(info, "plan", info)
        if id(plan) not in seen:
            seen[id(plan)] = len(maps)
            maps.append(torch.from_numpy(np.asarray(info.merge_map, dtype=np.int32)))
            protected.append(torch.from_numpy(np.asarray(info.protected, dtype=bool)))
        blocks.append(
            {
                "block": int(info.block),
                "stage": int(info.stage),
                "grid_shape": [int(s) for s in info.grid_shape],
                "window": None if info.window is None else int(info.window),
                "tokens_before": int(info.tokens_before),
                "tokens_after": int(info.tokens_after),
                "maps": seen[id(plan)],
            }
        )
    return blocks, maps, protected


def entry_dict(embedding: Embedding, key: str) -> dict[str, Any]:
    """What the cache file of ``embedding`` holds (plain tensors, lists and numbers)."""
    blocks, maps, protected = _merge_maps(embedding.merge_info)
    g = embedding.geometry
    return {
        "format": CACHE_FORMAT,
        "key": key,
        "model": embedding.model,
        "settings": embedding.settings,
        "features": embedding.features.detach().to("cpu", torch.float32).contiguous().clone(),
        "geometry": [*g.original_size, *g.resized_size, g.model_size],
        "encode_seconds": float(embedding.seconds),
        "protection": [float(v) for v in embedding.protection],
        "precision": embedding.precision,
        "blocks": blocks,
        "merge_maps": maps,
        "protected": protected,
    }


def embedding_from_dict(data: dict[str, Any], device) -> Embedding:
    """The ``Embedding`` of a cache file's contents (``from_cache`` set); ValueError when the
    contents are not an entry."""
    features = data["features"]
    if not isinstance(features, torch.Tensor) or features.dtype != torch.float32:
        raise ValueError("features are not a float32 tensor")
    if features.ndim != 4 or features.shape[0] != 1:
        raise ValueError(f"features have shape {tuple(features.shape)}")
    oh, ow, rh, rw, size = (int(v) for v in data["geometry"])
    maps, protected = data["merge_maps"], data["protected"]
    infos = [
        StoredMergeInfo(
            block=int(b["block"]),
            stage=int(b["stage"]),
            grid_shape=(int(b["grid_shape"][0]), int(b["grid_shape"][1])),
            window=b["window"],
            tokens_before=int(b["tokens_before"]),
            tokens_after=int(b["tokens_after"]),
            merge_map=maps[b["maps"]].numpy().astype(np.int64),
            protected=protected[b["maps"]].numpy(),
        )
        for b in data["blocks"]
    ]
    margin, radius = (float(v) for v in data["protection"])
    return Embedding(
        features=features.to(device),
        geometry=Geometry((oh, ow), (rh, rw), size),
        model=str(data["model"]),
        settings=str(data["settings"]),
        merge_info=infos,
        seconds=float(data["encode_seconds"]),
        protection=(margin, radius),
        from_cache=True,
        key=str(data["key"]),
        precision=str(data["precision"]),
    )


class EmbeddingCache:
    """A folder of cached image embeddings with a size limit (see the module docstring).

    ``folder``: where entries live (created if missing); default :func:`default_cache_folder`.
    ``max_bytes``: size limit (int or text such as ``"8G"``); default ``$STRUCTSAM_CACHE_MAX_BYTES``
    or 8 GiB.  Only files named ``<64 hex digits>.pt`` are ever evicted, so the folder may be
    shared with other files.  Safe to share between processes: writes are atomic renames.
    """

    def __init__(self, folder: str | os.PathLike | None = None, max_bytes: int | str | None = None):
        self.folder = Path(folder).expanduser() if folder is not None else default_cache_folder()
        if max_bytes is None:
            max_bytes = os.environ.get(CACHE_SIZE_ENV) or DEFAULT_MAX_BYTES
        self.max_bytes = parse_size(max_bytes)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StructSAMError(
                f"cannot create the embedding cache folder {self.folder}: {exc.strerror or exc}; "
                f"set ${CACHE_DIR_ENV} or pick another folder"
            ) from exc
        if not self.folder.is_dir():
            raise StructSAMError(f"embedding cache {self.folder} is not a folder")

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.folder)!r}, max_bytes={self.max_bytes})"

    def key(self, model, image, window=None, prompts=None) -> str:
        return embedding_key(model, image, window, prompts)

    def path(self, key: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", key):
            raise StructSAMError(f"not a cache key: {key!r}")
        return self.folder / f"{key}{_SUFFIX}"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str, device: str | torch.device = "cpu") -> Embedding | None:
        """The entry for ``key``, or ``None`` (missing, or unreadable: then it is deleted)."""
        path = self.path(key)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as exc:  # truncated or foreign file: many exception types
            return self._drop(path, exc)
        try:
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
                raise ValueError("unknown entry format")
            if data.get("key") != key:
                raise ValueError("entry belongs to another key")
            entry = embedding_from_dict(data, device)
        except Exception as exc:
            return self._drop(path, exc)
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently used = oldest mtime
        return entry

    def _drop(self, path: Path, exc: BaseException) -> None:
        warnings.warn(
            f"embedding cache entry {path.name} could not be read ({type(exc).__name__}: "
            f"{exc}); it was deleted and the image will be encoded again",
            stacklevel=3,
        )
        with contextlib.suppress(OSError):
            path.unlink()
        return None

    def put(self, key: str, embedding: Embedding) -> Path:
        """Store ``embedding`` under ``key`` atomically, then evict old entries over the
        limit."""
        from .io import atomic_write

        path = self.path(key)
        atomic_write(path, lambda tmp: torch.save(entry_dict(embedding, key), tmp))
        self.evict(keep=key)
        return path

    def entries(self) -> list[tuple[Path, int, float]]:
        """``(path, bytes, mtime)`` of every entry, oldest first."""
        out = []
        with os.scandir(self.folder) as it:
            for e in it:
                if _ENTRY.match(e.name):
                    with contextlib.suppress(FileNotFoundError):
                        st = e.stat()
                        out.append((Path(e.path), st.st_size, st.st_mtime))
        out.sort(key=lambda t: t[2])
        return out

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self, keep: str | None = None) -> int:
        """Delete least recently used entries until the folder fits ``max_bytes`` (never
        ``keep``); also removes temporary files of killed writers.  Returns how many went."""
        self._remove_stale_tmp()
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = 0
        keep_name = None if keep is None else f"{keep}{_SUFFIX}"
        for path, size, _ in entries:
            if total <= self.max_bytes:
                break
            if path.name == keep_name:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
            total -= size
        return removed

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        for tmp in self.folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                    tmp.unlink()

    def clear(self) -> int:
        """Delete every entry; returns how many."""
        entries = self.entries()
        for path, _, _ in entries:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return len(entries)
