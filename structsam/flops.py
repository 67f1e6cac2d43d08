"""Encoder FLOPs and matched-compute calibration.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per
multiply-add of matrix products and convolutions (not element-wise ops, norms or softmax). The
merging overheads that are such products (the energy's difference convolutions, the reduced
attention) are included; index bookkeeping (gather/scatter) costs no FLOPs in this count.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .errors import MergeError
from .merge import get_method
from .patching import patched
from .patching import prompts as merge_prompts
from .predictor import model_prompts, model_spec
from .transforms import prepare_image


def default_images() -> list[np.ndarray]:
    """Bundled calibration images: MNI152 T1 slices in three planes."""
    from .samples import mni152_slice

    return [mni152_slice(plane) for plane in ("axial", "coronal", "sagittal")]


def encoder_flops(model, image=None, prompts: dict | None = None) -> int:
    """FLOPs of one encoder forward on ``image`` (default: a bundled MRI slice).

    ``prompts`` (image pixels) switch on prompt-aware merging for this count.
    """
    spec = model_spec(model)
    if image is None:
        image = default_images()[0]
    device = next(model.parameters()).device
    tensor, geometry = prepare_image(image, spec, device=device)
    protect = merge_prompts(model, model_prompts(prompts, geometry)) if prompts else nullcontext()
    with protect, torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.image_encoder(tensor)
    return int(counter.get_total_flops())


def mean_reduction(model, images, prompts, dense: list[int]) -> float:
    triples = zip(images, prompts, dense, strict=True)
    cuts = [1.0 - encoder_flops(model, im, pr) / d for im, pr, d in triples]
    return float(np.mean(cuts))


MIN_RATE = 1e-3  # the smallest rate calibration tries


def calibrate(
    model,
    method: str = "structsam",
    flops_reduction: float = 0.30,
    images: Sequence[np.ndarray] | None = None,
    prompts: Sequence[dict] | None = None,
    tolerance: float = 0.01,
    **options,
) -> float:
    """The rate whose mean encoder-FLOPs cut over ``images`` is ``flops_reduction`` ± tolerance.

    The model is left as it was (patched or not); patch it with the returned rate to use it.
    Raises ``MergeError`` if the target is out of reach.
    """
    info = get_method(method)
    images = list(images) if images is not None else default_images()
    prompts = list(prompts) if prompts is not None else [None] * len(images)
    if len(prompts) != len(images):
        raise MergeError("give one prompt dict (or None) per calibration image")
    # the reference is the same implementation with nothing merged: SAM ViT's lean attention
    # skips the window padding that the stock block projects (2.6 % of ViT-B's FLOPs), and
    # that saving is not merging's
    with patched(model, method, 0.0, **options):
        dense = [encoder_flops(model, im) for im in images]

    def cut(rate):
        with patched(model, method, rate, **options):
            return mean_reduction(model, images, prompts, dense)

    return _search(cut, method, info.max_rate, flops_reduction, tolerance)


def _search(cut, method: str, max_rate: float, target: float, tolerance: float) -> float:
    """The rate where ``cut(rate)`` is ``target`` ± ``tolerance`` (regula falsi, Illinois)."""
    # the smallest rate that merges at all may already cut a lot: ALGM's similarity threshold
    # collapses every similar cell whatever the rate (30.7 % on the MNI slice)
    lo = MIN_RATE
    c_lo = cut(lo)
    if c_lo > target + tolerance:
        raise MergeError(
            f"{method} cannot cut encoder FLOPs by as little as {target:.0%}: at its "
            f"smallest rate ({lo}) it already cuts {c_lo:.1%} (its own threshold merges)"
        )
    if abs(c_lo - target) <= tolerance:
        return lo
    hi = max_rate
    c_hi = cut(hi)
    if c_hi < target - tolerance:
        raise MergeError(
            f"{method} cannot cut encoder FLOPs by {target:.0%}: at its largest rate "
            f"({hi}) it cuts {c_hi:.1%}"
        )
    if abs(c_hi - target) <= tolerance:
        return hi
    # the cut grows about linearly with the rate: regula falsi converges in a few steps
    side = 0
    for _ in range(25):
        mid = hi - (c_hi - target) * (hi - lo) / (c_hi - c_lo)
        mid = min(max(mid, lo + 1e-4), hi - 1e-4)
        c = cut(mid)
        if abs(c - target) <= tolerance:
            return mid
        if c < target:
            lo, c_lo = mid, c
            c_hi = c_hi / 2 + target / 2 if side == -1 else c_hi  # Illinois step
            side = -1
        else:
            hi, c_hi = mid, c
            c_lo = c_lo / 2 + target / 2 if side == 1 else c_lo
            side = 1
    raise MergeError(f"calibration of {method} did not converge near {target:.0%}")
