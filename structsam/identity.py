"""Stable, JSON-able identities of settings and arrays (cache keys, merge configurations)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

__all__ = ["canonical", "sha256_array"]


def sha256_array(arr: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(memoryview(arr.reshape(-1)).cast("B"))
    return h.hexdigest()


def canonical(obj: Any) -> Any:
    """A JSON-able, order-independent form of a value (floats keep their exact repr, arrays
    and tensors become their hash)."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, np.generic):
        return canonical(obj.item())
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # a torch tensor (torch not imported)
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return {"array": sha256_array(obj)}
    if hasattr(obj, "items"):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, list | tuple):
        return [canonical(v) for v in obj]
    # anything else (a callable option...) is keyed by its repr, which is stable for functions
    return {"repr": repr(obj)}
