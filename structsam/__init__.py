"""StructSAM: resolution-preserving token merging for SAM-family image encoders.

Public API (imported lazily, so ``import structsam`` does not load torch)::

    model = structsam.load_model("litemedsam")
    structsam.patch(model, method="structsam", rate=0.5)
    predictor = structsam.Predictor(model)
    predictor.set_image(image, prompts={"box": box})
    masks, scores, logits = predictor.predict(box=box)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": "structsam.models",
    "MODELS": "structsam.models",
    "patch": "structsam.patching",
    "unpatch": "structsam.patching",
    "merge_state": "structsam.patching",
    "METHODS": "structsam.merge",
    "Predictor": "structsam.predictor",
    "encoder_flops": "structsam.flops",
    "calibrate": "structsam.flops",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'structsam' has no attribute {name!r}")
