"""``patch`` / ``unpatch``: put token merging into a SAM-family image encoder and take it out.

Patching swaps the classes of the encoder and of its blocks for subclasses whose ``forward``
merges; weights and modules are untouched, so ``unpatch`` leaves the model exactly as it was.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from ..errors import MergeError
from ..merge import get_method
from ..models.swap import restore_class, swap_class
from . import sam_vit, tinyvit
from .engine import BlockMergeInfo, MergeConfig, MergeState, check_rate

_TAG = "Merged"  # the class-swap tag of merging (models.swap)


def _encoder_of(model):
    return getattr(model, "image_encoder", model)


def _family(encoder):
    if tinyvit.is_tinyvit(encoder):
        return tinyvit
    if sam_vit.is_sam_vit(encoder):
        return sam_vit
    raise MergeError(f"cannot patch an image encoder of type {type(encoder).__name__}")


def _encoder_forward(self, x):
    self._structsam_state.begin_forward()
    return self._structsam_orig_class.forward(self, x)


def _rates(rate, blocks, n_blocks, info) -> dict[int, float]:
    # every value is checked, so NaN or -1 cannot fall through as "no merging"
    if isinstance(rate, Mapping):
        rates = {int(k): check_rate(v, info, f"rate[{k}]") for k, v in rate.items()}
    elif isinstance(rate, Sequence) and not isinstance(rate, str | bytes):
        if len(rate) != n_blocks:
            raise MergeError(f"a per-block rate schedule needs {n_blocks} values, got {len(rate)}")
        rates = {i: check_rate(r, info, f"rate[{i}]") for i, r in enumerate(rate)}
    else:
        value = check_rate(rate, info)
        rates = {i: value for i in range(n_blocks)}
    if blocks is not None:
        blocks = {int(b) for b in blocks}
        bad = sorted(b for b in blocks if not 0 <= b < n_blocks)
        if bad:
            raise MergeError(
                f"blocks {bad} do not exist; this encoder has blocks 0..{n_blocks - 1}"
            )
        rates = {i: r for i, r in rates.items() if i in blocks}
    return rates


def patch(
    model, method: str = "structsam", rate=0.5, *, blocks=None, prompts=None, seed=0, **options
):
    """Patch ``model``'s image encoder with ``method`` at ``rate`` and return the model.

    ``rate``: a float for every block, a per-block sequence, or ``{block: rate}``. ``blocks``:
    which blocks merge (default all). ``prompts``: ``{"box": ..., "point_coords": ...}`` in
    model-input pixels for prompt-aware methods (``with prompts(model, ...)`` or
    ``Predictor.encode(..., prompts=...)`` replace them for one encode). Other keywords go to the
    method. The configuration is fixed (:class:`MergeConfig`); patching again replaces it.
    """
    unpatch(model)
    encoder = _encoder_of(model)
    family = _family(encoder)
    if method in (None, "none"):
        return model
    info = get_method(method)
    block_list = list(family.iter_blocks(encoder))
    rates = _rates(rate, blocks, len(block_list), info)
    rates = {i: r for i, r in rates.items() if r > 0}
    stages, stage_windows = {}, {}
    for i, stage, blk in block_list:
        stages[i] = stage
        win = getattr(blk, "window_size", 0) or None
        h, w = _block_grid(blk, encoder)
        if win is not None and win >= max(h, w):
            win = None
        # a stage mixing windowed and global blocks keeps its groups inside the windows
        if win is not None:
            old = stage_windows.get(stage)
            stage_windows[stage] = win if old is None else min(old, win)
        else:
            stage_windows.setdefault(stage, None)
    input_size = int(getattr(encoder, "img_size", 1024))
    precision = getattr(model, "precision", "fp32")
    config = MergeConfig.build(
        info, rates, stages, stage_windows, input_size, options, prompts, seed, precision
    )
    _install(model, config)
    return model


def _install(model, config: MergeConfig) -> None:
    """Swap the encoder's and its blocks' classes for merging ones sharing a fresh state."""
    unpatch(model)  # the family is told by the original classes
    encoder = _encoder_of(model)
    family = _family(encoder)
    forward = _encoder_forward_for(family, config)
    state = MergeState(config)
    for i, _, blk in family.iter_blocks(encoder):
        blk._structsam_state = state
        blk._structsam_index = i
        swap_class(blk, family.merged_forward, _TAG, "_structsam_dense_forward")
    encoder._structsam_state = state
    swap_class(encoder, forward, _TAG)


def _encoder_forward_for(family, config: MergeConfig):
    """The family's merge-once-per-stage forward where it has one and the options allow it."""
    stage_path = getattr(family, "encoder_forward", None)
    # these ablations need per-token values inside a stage, so they merge around every block
    if stage_path is None or config.recovery == "block" or config.ablation:
        return _encoder_forward
    for run in config.runs:
        rates = {config.rates.get(b, 0.0) for b in run}
        if len(rates) > 1:
            raise MergeError(
                f"blocks {run[0]}..{run[-1]} share one merge (one stage) but have rates "
                f"{sorted(rates)}; give them one rate, or pass recovery='block'"
            )
    return stage_path


def _block_grid(blk, encoder):
    if hasattr(blk, "input_resolution"):
        return tuple(blk.input_resolution)
    size = encoder.img_size // encoder.patch_embed.proj.kernel_size[0]
    return size, size


def unpatch(model):
    """Remove any patch; the model computes exactly as before ``patch``."""
    encoder = _encoder_of(model)
    for module in encoder.modules():
        restore_class(module, _TAG)
        for attr in ("_structsam_state", "_structsam_index"):
            if attr in module.__dict__:
                delattr(module, attr)
    return model


def merge_state(model) -> MergeState | None:
    """The patch's state (read it; change it only through this package)."""
    return getattr(_encoder_of(model), "_structsam_state", None)


def merge_config(model) -> MergeConfig | None:
    """The fixed configuration of ``model``'s patch, None when it is not patched."""
    state = merge_state(model)
    return None if state is None else state.config


@contextmanager
def prompts(model, model_prompts: Mapping | None) -> Iterator[None]:
    """Protect ``model_prompts`` (model-input pixels; None: nothing) in the forwards run inside
    the block, instead of the patch's own prompts. Nothing happens on an unpatched model."""
    state = merge_state(model)
    if state is None:
        yield
        return
    saved = state._call_prompts
    state._call_prompts = None if model_prompts is None else dict(model_prompts)
    try:
        yield
    finally:
        state._call_prompts = saved


@contextmanager
def recording(model) -> Iterator[dict[int, torch.Tensor]]:
    """``with recording(model) as feats:`` each forward inside fills ``feats`` with every merged
    stage's input (image 0, fp32, (H, W, C)) keyed by stage; empty on an unpatched model."""
    state = merge_state(model)
    feats: dict[int, torch.Tensor] = {}
    if state is None:
        yield feats
        return
    saved = state._recording
    state._recording = feats
    try:
        yield feats
    finally:
        state._recording = saved


@contextmanager
def patched(model, method: str = "structsam", rate=0.5, **kwargs) -> Iterator[object]:
    """``patch`` for the duration of the block; the model's earlier patch (or none) after."""
    before = merge_config(model)
    patch(model, method, rate, **kwargs)
    try:
        yield model
    finally:
        if before is None:
            unpatch(model)
        else:
            _install(model, before)


__all__ = [
    "BlockMergeInfo",
    "MergeConfig",
    "MergeState",
    "merge_config",
    "merge_state",
    "patch",
    "patched",
    "prompts",
    "recording",
    "unpatch",
]
