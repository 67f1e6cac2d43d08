"""The image encoder's precision: a load-time setting, fp32 in and out, part of the cache key."""

import numpy as np
import pytest
import torch

import structsam
from structsam.cache import embedding_key
from structsam.errors import StructSAMError
from structsam.models.registry import resolve_precision
from structsam.samples import mni152_slice


def test_precision_names_are_checked():
    with pytest.raises(StructSAMError, match="unknown precision 'half'"):
        resolve_precision("half", torch.device("cpu"))
    with pytest.raises(StructSAMError, match="CUDA only"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")) in ("fp32", "bf16")


@pytest.mark.slow
def test_bf16_encoder_keeps_fp32_interfaces_and_masks():
    image = mni152_slice("axial", 80)
    box = np.array([60.0, 70.0, 120.0, 130.0])
    out = {}
    for precision in ("fp32", "bf16"):
        model = structsam.load_model("litemedsam", precision=precision)
        assert model.precision == precision
        assert next(model.image_encoder.parameters()).dtype == (
            torch.bfloat16 if precision == "bf16" else torch.float32
        )
        assert next(model.mask_decoder.parameters()).dtype == torch.float32
        structsam.patch(model, "structsam", 0.33)
        predictor = structsam.Predictor(model)
        assert predictor.precision == precision
        predictor.set_image(image)
        assert predictor.features.dtype == torch.float32
        masks, _, _ = predictor.predict(box=box, multimask_output=False)
        out[precision] = (masks[0], embedding_key(model, image))
    (m32, k32), (m16, k16) = out["fp32"], out["bf16"]
    iou = (m32 & m16).sum() / max((m32 | m16).sum(), 1)
    assert m32.sum() > 100 and iou > 0.9
    assert k32 != k16  # a bf16 embedding is never served for an fp32 request


@pytest.mark.slow
def test_compiled_static_parts_give_the_eager_encoder():
    # compile=True compiles only what never merges: exact up to float rounding
    from structsam.transforms import prepare_image

    image = mni152_slice("axial", 80)
    eager = structsam.load_model("litemedsam")
    compiled = structsam.load_model("litemedsam", compile=True)
    assert compiled.compiled and not getattr(eager, "compiled", False)
    x, _ = prepare_image(image, eager.structsam_spec)
    with torch.inference_mode():
        a, b = eager.image_encoder(x), compiled.image_encoder(x)
    assert (a - b).abs().max().item() < 1e-4


def test_half_precision_tinyvit_attention_on_aligned_windows(litemedsam, monkeypatch):
    # bf16 windows of 49 and 196 tokens go to the fused kernel padded to 64 and 208, their
    # padded keys masked: TinyViT's own attention up to bf16 rounding; fp32 is untouched (the
    # fused kernel pinned: where explicit products are faster, TinyViT's own attention runs)
    import copy

    from structsam.patching import kernels

    monkeypatch.setattr(kernels, "_pinned", "fused")
    model = copy.deepcopy(litemedsam)
    for layer in (1, 2):
        attn = model.image_encoder.layers[layer].blocks[0].attn
        assert type(attn).__name__ == "AlignedAttention"
        n = attn.ab.shape[-1]
        x = torch.randn(3, n, attn.qkv.in_features)
        with torch.inference_mode():
            assert torch.equal(attn(x), attn._structsam_tinyvit_attention(x))
            attn.to(torch.bfloat16)
            xb = x.bfloat16()
            got, own = attn(xb).float(), attn._structsam_tinyvit_attention(xb).float()
        err = (got - own).abs()
        assert err.mean() < 0.01 * own.abs().mean() and err.max() < 0.1 * own.abs().max()
