"""SAM ViT-B/L/H and MedSAM (ViT-B) built from segment_anything's modules.

The configurations follow segment_anything's ``build_sam.py`` so the official checkpoints load
key for key; the checkpoint itself is loaded by ``registry.load_model``.
"""

from __future__ import annotations

from functools import partial

from torch import nn

# (depth, embed_dim, num_heads, global_attn_indexes) per encoder size.
VIT_CONFIGS: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_b": (12, 768, 12, (2, 5, 8, 11)),
    "vit_l": (24, 1024, 16, (5, 11, 17, 23)),
    "vit_h": (32, 1280, 16, (7, 15, 23, 31)),
}

# MedSAM is a fine-tuned ViT-B.
_ARCHITECTURE = {"vit_b": "vit_b", "vit_l": "vit_l", "vit_h": "vit_h", "medsam": "vit_b"}

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def build_sam_vit(spec):
    """A randomly initialised ``Sam`` with the ViT encoder that ``spec.name`` names."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    depth, embed_dim, num_heads, global_attn = VIT_CONFIGS[_ARCHITECTURE[spec.name]]
    img_size = spec.img_size
    patch = 16
    prompt_dim = 256
    grid = img_size // patch

    encoder = ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=img_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=num_heads,
        patch_size=patch,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=global_attn,
        window_size=14,
        out_chans=prompt_dim,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=2048, num_heads=8),
        transformer_dim=prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    # Min-max models (MedSAM) get identity mean/std so Sam.preprocess would not re-normalise.
    if spec.normalization == "sam":
        mean, std = SAM_PIXEL_MEAN, SAM_PIXEL_STD
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return Sam(
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=list(mean),
        pixel_std=list(std),
    )
