"""``patch`` / ``unpatch``: put token merging into a SAM-family image encoder and take it out.

Patching swaps the classes of the encoder and of its blocks for subclasses whose ``forward``
merges; weights and modules are untouched, so ``unpatch`` leaves the model exactly as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import MergeError
from ..merge import get_method
from . import sam_vit, tinyvit
from .engine import BlockMergeInfo, MergeState, check_rate

_SUBCLASSES: dict[type, type] = {}


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


def _swap(module, forward, dense_attr=None):
    cls = type(module)
    key = (cls, forward)
    if key not in _SUBCLASSES:
        attrs = {"forward": forward, "_structsam_orig_class": cls}
        if dense_attr:
            attrs[dense_attr] = cls.forward
        _SUBCLASSES[key] = type(f"Merged{cls.__name__}", (cls,), attrs)
    module.__class__ = _SUBCLASSES[key]


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
    model-input pixels for prompt-aware methods (``Predictor.set_image`` sets them per image).
    Other keywords go to the method. Patching again replaces the earlier patch.
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
    state = MergeState(info, rates, stages, stage_windows, input_size, options, prompts, seed)
    for i, _, blk in block_list:
        blk._structsam_state = state
        blk._structsam_index = i
        _swap(blk, family.merged_forward, "_structsam_dense_forward")
    encoder._structsam_state = state
    _swap(encoder, _encoder_forward_for(family, state))
    return model


def _encoder_forward_for(family, state: MergeState):
    """The family's merge-once-per-stage forward where it has one and the options allow it."""
    stage_path = getattr(family, "encoder_forward", None)
    # these ablations need per-token values inside a stage, so they merge around every block
    ablation = state.queries == "full" or not state.merge_mlp or not state.merge_attention
    if stage_path is None or state.recovery == "block" or ablation:
        return _encoder_forward
    for run in state.runs:
        rates = {state.rates.get(b, 0.0) for b in run}
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
        orig = getattr(type(module), "_structsam_orig_class", None)
        if orig is not None:
            module.__class__ = orig
        for attr in ("_structsam_state", "_structsam_index"):
            if attr in module.__dict__:
                delattr(module, attr)
    return model


def merge_state(model) -> MergeState | None:
    return getattr(_encoder_of(model), "_structsam_state", None)


__all__ = ["BlockMergeInfo", "MergeState", "merge_state", "patch", "unpatch"]
