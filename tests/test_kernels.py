"""The short-window attention kernels: explicit products equal the fused kernel, and the
choice between them (measured per device and number format) changes neither encodings beyond
rounding nor the FLOPs count."""

import copy

import pytest
import torch
import torch.nn.functional as F

import structsam
from structsam.patching import kernels
from structsam.patching.kernels import explicit_attention, set_window_kernel
from structsam.samples import mni152_slice


@pytest.mark.parametrize("mask_shape", ["full", "broadcast", None])
def test_explicit_attention_is_the_fused_kernel(mask_shape):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 3, 40, 16, generator=gen) for _ in range(3))
    mask = {
        "full": torch.randn(6, 3, 40, 40, generator=gen),
        "broadcast": torch.randn(6, 1, 1, 40, generator=gen),
        None: None,
    }[mask_shape]
    if mask is not None:
        mask[..., -5:] = float("-inf")  # empty key slots
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    got = explicit_attention(q, k, v, mask, 0.3)
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-5


def test_window_kernel_names_are_checked():
    with pytest.raises(ValueError, match="window kernel must be one of"):
        set_window_kernel("flash")


def test_long_windows_and_autograd_keep_the_fused_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "_pinned", "explicit")
    cpu = torch.device("cpu")
    with torch.inference_mode():
        assert kernels.explicit_pays(cpu, torch.float32, 196)
        assert not kernels.explicit_pays(cpu, torch.float32, 4096)  # (S, S) logits too large
    assert not kernels.explicit_pays(cpu, torch.float32, 196)  # grad enabled: the fused kernel


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dense_litemedsam_is_the_same_with_either_kernel(litemedsam, precision, monkeypatch):
    # in bf16 the dense TinyViT windows run padded through the fused kernel or as TinyViT's own
    # products, whichever is faster here: the same embedding up to rounding, the same FLOPs
    from structsam.transforms import prepare_image

    image = mni152_slice("axial", 80)
    model = (
        litemedsam if precision == "fp32" else structsam.load_model("litemedsam", precision="bf16")
    )
    x, _ = prepare_image(image, model.structsam_spec)
    out, flops = {}, {}
    for kind in ("fused", "explicit"):
        monkeypatch.setattr(kernels, "_pinned", kind)
        with torch.inference_mode():
            out[kind] = model.image_encoder(x).float()
        flops[kind] = structsam.encoder_flops(model, image)
    rel = (out["fused"] - out["explicit"]).norm() / out["fused"].norm()
    assert rel < (1e-6 if precision == "fp32" else 2e-2)
    assert flops["fused"] == flops["explicit"]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_merged_windows_are_the_same_with_either_kernel(litemedsam, stage, monkeypatch):
    # one real plan per stage (bucketed windows, empty slots, padding keys): the reduced
    # attention agrees between the kernels, and so does its FLOPs count
    from torch.utils.flop_counter import FlopCounterMode

    from structsam.patching.tinyvit import _reduced_attention
    from structsam.transforms import prepare_image

    model = copy.deepcopy(litemedsam)
    structsam.patch(model, "structsam", 0.4)
    x, _ = prepare_image(mni152_slice("axial", 80), model.structsam_spec)
    with torch.inference_mode():
        model.image_encoder(x)
    info = next(i for i in model.image_encoder._structsam_state.info if i.stage == stage + 1)
    blk = next(
        b
        for layer in model.image_encoder.layers[1:]
        for b in layer.blocks
        if b._structsam_index == info.block
    )
    xr = torch.randn(info.plan.n_reduced, blk.attn.qkv.in_features)
    out, flops = {}, {}
    for kind in ("fused", "explicit"):
        monkeypatch.setattr(kernels, "_pinned", kind)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            out[kind] = _reduced_attention(blk, xr, info.plan)
        flops[kind] = counter.get_total_flops()
    assert torch.isfinite(out["fused"]).all()
    assert (out["fused"] - out["explicit"]).abs().max() < 1e-4
    assert flops["fused"] == flops["explicit"] > 0
