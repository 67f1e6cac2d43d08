"""Interactive annotation in the library: prompts, objects and 3D propagation (no Qt).

* :mod:`.settings`: :class:`EncoderSettings` (what an embedding depends on besides the image)
  and the re-encode rule (:func:`reencode_reason`, :class:`Reencode`);
* :mod:`.service`: :class:`EncoderService`, one patched model per setting, encodes with
  cancellation, decodes, FLOPs statistics (:class:`StatsBook`) and per-slice embeddings
  (:class:`EmbeddingStore`);
* :mod:`.propagate`: an object carried slice by slice through a volume.

A GUI (the napari plugin) runs ``encode``/``flops`` in worker threads and keeps the results.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "EncoderSettings": ".settings",
    "Reencode": ".settings",
    "reencode_reason": ".settings",
    "DecoderBusy": ".service",
    "EmbeddingStore": ".service",
    "EncodeCancelled": ".service",
    "EncoderService": ".service",
    "ModelPool": ".service",
    "Stats": ".service",
    "StatsBook": ".service",
    "shared_service": ".service",
    "propagate": ".propagate",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'structsam.interactive' has no attribute {name!r}")
