"""Token merging inside SAM's ViT blocks (SAM ViT-B/L/H, MedSAM).

A SAM block is LayerNorm -> (windowed or global) attention with decomposed relative positions
-> residual -> LayerNorm -> MLP -> residual. Both attention (projections and the attention
matrix) and the MLP run on the reduced tokens; the residual stream stays per token. Windowed
and global blocks share one assignment per stage (the blocks up to and including a global
block): groups never cross a 14x14 window, so the same groups are valid in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .engine import reduced_attention


def is_sam_vit(encoder) -> bool:
    return (
        hasattr(encoder, "blocks")
        and hasattr(encoder, "patch_embed")
        and hasattr(encoder, "neck")
        and not hasattr(encoder, "layers")
    )


def iter_blocks(encoder):
    """(block_index, stage_index, block): a stage ends at each global-attention block."""
    stage = 0
    for i, blk in enumerate(encoder.blocks):
        yield i, stage, blk
        if blk.window_size == 0:
            stage += 1


def _rel_pos_bias(attn, size: int):
    """Decomposed relative-position bias for packed slots: q . R_h[dy] + q . R_w[dx]."""
    if not attn.use_rel_pos:
        return lambda qs, qpos, kpos, cache: 0.0
    rh, rw = attn.rel_pos_h, attn.rel_pos_w
    if rh.shape[0] != 2 * size - 1:
        raise ValueError(f"relative position table of {rh.shape[0]} rows does not fit {size}")

    def bias(qs, qpos, kpos, cache):
        dy = (qpos[:, :, None] // size - kpos[:, None, :] // size + size - 1)[:, None]
        dx = (qpos[:, :, None] % size - kpos[:, None, :] % size + size - 1)[:, None]
        th = qs @ rh.t()  # (W, heads, Sq, 2*size-1)
        tw = qs @ rw.t()
        shape = (qs.shape[0], qs.shape[1], qs.shape[2], kpos.shape[1])
        return th.gather(-1, dy.expand(shape)) + tw.gather(-1, dx.expand(shape))

    return bias


def merged_forward(self, x: torch.Tensor) -> torch.Tensor:
    """segment_anything Block.forward with attention and MLP on the reduced tokens."""
    state = self._structsam_state
    b, h, w, c = x.shape
    window = self.window_size or None
    plan = state.plan_for(self._structsam_index, x.view(b, h * w, c), h, w, window)
    if plan is None:
        return self._structsam_dense_forward(x)
    attn = self.attn
    heads = attn.num_heads

    hd = c // heads
    xr = plan.merge(x.view(b, h * w, c))
    bias = _rel_pos_bias(attn, plan.grid.win)
    pad = None
    if plan.packing()["has_pad"]:
        # windows are zero-padded after norm1, so padding keys are the qkv bias alone
        pad = attn.qkv.bias.view(3, heads, hd).transpose(0, 1)  # (heads, 3, hd)
    if state.queries == "full":
        # queries for every token, keys/values for the groups: attention stays per token
        wq, wkv = attn.qkv.weight[:c], attn.qkv.weight[c:]
        bq, bkv = attn.qkv.bias[:c], attn.qkv.bias[c:]
        q = F.linear(self.norm1(x).view(-1, c), wq, bq).view(-1, heads, hd)
        kv = F.linear(self.norm1(xr), wkv, bkv).view(-1, 2, heads, hd).transpose(1, 2)
        pad = pad[:, 1:].reshape(heads, -1) if pad is not None else None
        o = reduced_attention(
            kv.reshape(-1, heads, 2 * hd), [hd, hd], plan, attn.scale, bias, pad, q=q
        )
        x = x + attn.proj(o.reshape(-1, c)).view(b, h, w, c)
        xr = plan.merge(x.view(b, h * w, c))
    else:
        # qkv's output is laid out (3, heads, hd); regroup it per head as (heads, 3 * hd)
        qkv = attn.qkv(self.norm1(xr)).view(-1, 3, heads, hd).transpose(1, 2)
        pad = pad.reshape(heads, -1) if pad is not None else None
        o = reduced_attention(
            qkv.reshape(-1, heads, 3 * hd), [hd, hd, hd], plan, attn.scale, bias, pad
        )
        o = attn.proj(o.reshape(-1, c))
        # merge(x + unmerge(o)) == merge(x) + o, so the MLP input needs no second merge
        xr = xr + o
        x = x + plan.unmerge(o).view(b, h, w, c)
    if not state.merge_mlp:
        return x + self.mlp(self.norm2(x))
    return x + plan.unmerge(self.mlp(self.norm2(xr))).view(b, h, w, c)
