"""Token merging inside SAM's ViT blocks (SAM ViT-B/L/H, MedSAM).

A SAM block is LayerNorm -> (windowed or global) attention with decomposed relative positions
-> residual -> LayerNorm -> MLP -> residual. Windowed and global blocks share one assignment per
stage (the blocks up to and including a global block): groups never cross a 14x14 window, so the
same groups are valid in both.

The default path (``encoder_forward``) merges once at the start of a stage, runs every block of
the stage on the reduced tokens and recovers once at its end. With shared-update recovery
(every member token receives its group's update) this equals merging and recovering around
every block in exact arithmetic: merge(x + unmerge(u)) == merge(x) + u. ``recovery="block"``
keeps the per-block path (``merged_forward``) for that check and for the ablations that need
per-token values inside a stage (``queries="full"``, ``merge_mlp=False``).

Attention runs through ``scaled_dot_product_attention`` with the decomposed relative-position
bias folded into the dot product, so no (heads, S, S) bias is ever built (``_folded_attention``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .engine import MASKED_LOGIT, full_query_attention, fused_attention, window_slots
from .kernels import explicit_pays


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
    """segment_anything Block.forward with attention and MLP on the reduced tokens, merged and
    recovered around this block (``recovery="block"`` and the ablations)."""
    state = self._structsam_state
    b, h, w, c = x.shape
    window = self.window_size or None
    plan = state.plan_for(self._structsam_index, x.view(b, h * w, c), h, w, window)
    if plan is None:
        return self._structsam_dense_forward(x)
    attn = self.attn
    if not state.config.merge_attention:
        # every token through the same lean attention, merged for the MLP only
        dense = state.identity_plan(b, h, w, window, x.device)
        o = _window_attention(attn, attn.qkv(self.norm1(x.reshape(-1, c))), dense)
        x = x + attn.proj(o).view(b, h, w, c)
        xr = plan.merge(x.view(b, h * w, c))
    elif state.config.queries == "full":
        # queries for every token, keys/values for the groups: attention stays per token
        heads = attn.num_heads
        hd = c // heads
        xr = plan.merge(x.view(b, h * w, c))
        pad = None
        if plan.packing()["has_pad"]:
            # windows are zero-padded after norm1, so padding keys are the qkv bias alone
            pad = attn.qkv.bias.view(3, heads, hd).transpose(0, 1)[:, 1:].reshape(heads, -1)
        wq, wkv = attn.qkv.weight[:c], attn.qkv.weight[c:]
        bq, bkv = attn.qkv.bias[:c], attn.qkv.bias[c:]
        q = F.linear(self.norm1(x).view(-1, c), wq, bq).view(-1, heads, hd)
        kv = F.linear(self.norm1(xr), wkv, bkv).view(-1, 2, heads, hd).transpose(1, 2)
        bias = _rel_pos_bias(attn, plan.grid.win)
        o = full_query_attention(
            kv.reshape(-1, heads, 2 * hd), [hd, hd], plan, attn.scale, bias, pad, q
        )
        x = x + attn.proj(o.reshape(-1, c)).view(b, h, w, c)
        xr = plan.merge(x.view(b, h * w, c))
    else:
        xr = plan.merge(x.view(b, h * w, c))
        o = attn.proj(_window_attention(attn, attn.qkv(self.norm1(xr)), plan))
        # merge(x + unmerge(o)) == merge(x) + o, so the MLP input needs no second merge
        xr = xr + o
        x = x + plan.unmerge(o).view(b, h, w, c)
    if not state.config.merge_mlp:
        return x + self.mlp(self.norm2(x))
    return x + plan.unmerge(self.mlp(self.norm2(xr))).view(b, h, w, c)


def encoder_forward(self, x: torch.Tensor) -> torch.Tensor:
    """ImageEncoderViT.forward that merges once per run of merged blocks (see module doc)."""
    state = self._structsam_state
    state.begin_forward()
    x = self.patch_embed(x)
    if self.pos_embed is not None:
        x = x + self.pos_embed
    b, h, w, c = x.shape
    flat = x.reshape(b, h * w, c)
    for run in state.config.runs:
        first = self.blocks[run[0]]
        stage_plan = state.plan_for(run[0], flat, h, w, first.window_size or None)
        if stage_plan is None:
            # dense blocks go through the same lean attention, with every token its own group
            xr = flat.reshape(-1, c)
            for i in run:
                blk = self.blocks[i]
                plan = state.identity_plan(b, h, w, blk.window_size or None, x.device)
                xr = _reduced_block(blk, xr, plan)
            flat = xr.view(b, h * w, c)
            continue
        xr0 = stage_plan.merge(flat)
        xr = _reduced_block(first, xr0, stage_plan)
        for i in run[1:]:
            blk = self.blocks[i]
            xr = _reduced_block(blk, xr, state.plan_for(i, flat, h, w, blk.window_size or None))
        flat = flat + stage_plan.unmerge(xr - xr0)
    return self.neck(flat.view(b, h, w, c).permute(0, 3, 1, 2))


def _reduced_block(blk, xr: torch.Tensor, plan) -> torch.Tensor:
    """One SAM block on (M, C) reduced tokens (groups at their representatives' positions)."""
    attn = blk.attn
    qkv = attn.qkv(blk.norm1(xr))
    xr = xr + attn.proj(_window_attention(attn, qkv, plan))
    return xr + blk.mlp(blk.norm2(xr))


def _window_attention(attn, qkv: torch.Tensor, plan) -> torch.Tensor:
    """(M, 3C) fused q/k/v of the reduced tokens -> (M, C) attention output.

    The reduced tokens are copied once into per-window slots (``plan.buckets()``: up to three
    slot counts, so flat windows with few tokens do not pay for full ones); window padding
    tokens are zero after norm1, so their q/k/v are the qkv bias.
    """
    heads = attn.num_heads
    m, c3 = qkv.shape
    hd = c3 // (3 * heads)
    bk = plan.buckets()
    buf = window_slots(bk, qkv.view(m, 3, heads, hd), attn.qkv.bias.view(3, heads, hd))
    out = qkv.new_empty(bk["rows"], heads * hd)
    for part in bk["parts"]:
        n, s, row = part["windows"], part["slots"], part["row"]
        q, k, v = buf[row : row + n * s].view(n, s, 3, heads, hd).permute(2, 0, 3, 1, 4)
        o = _folded_attention(attn, q, k, v, _fold_layout(part, plan.grid.win, qkv.dtype))
        out[row : row + n * s] = o.reshape(n * s, heads * hd)
    return out.index_select(0, bk["query_index"])


def _fold_layout(part: dict, size: int, dtype) -> dict:
    """Per-plan constants that fold the relative-position bias into q . k (cached per part).

    For a query at row ry and a key at row r the bias is q . R_h[ry - r + size - 1] (same for
    columns). Keys get one-hot row and column indicators and queries the matching scores; the
    last row and column are dropped (their scores subtracted from the others), a per-query
    constant that softmax ignores, which keeps a 14-window at 64 + 27 dims and a 64x64 global
    block at 64 + 127. A last key dimension carries the log group size (proportional
    attention), or ``MASKED_LOGIT`` for an empty slot, against a query dimension of ones.
    """
    cache = part.setdefault("fold", {})
    key = (size, dtype)
    if key not in cache:
        pos = part["pos"]  # (n, S) local position row * size + col
        rows, cols = pos // size, pos % size
        r = torch.arange(size, device=pos.device)
        log_size = part["key_bias"].view(pos.shape).clamp_min(MASKED_LOGIT)
        ext = torch.cat(
            [
                F.one_hot(rows, size)[..., :-1],
                F.one_hot(cols, size)[..., :-1],
                log_size[..., None],
            ],
            dim=-1,
        )
        cache[key] = {
            "size": size,
            "row_index": (rows[..., None] - r + size - 1)[:, None],  # (n, 1, S, size)
            "col_index": (cols[..., None] - r + size - 1)[:, None],
            "key_ext": ext.to(dtype)[:, None],  # (n, 1, S, 2 * size - 1)
        }
    return cache[key]


def _extra_tokens(s: int, dtype: torch.dtype) -> int:
    """Empty key slots that bring a long half-precision window to a multiple of 64 tokens."""
    return -s % 64 if dtype != torch.float32 and s >= 512 else 0


def _folded_attention(attn, q, k, v, fold: dict) -> torch.Tensor:
    """softmax(q k^T * scale + rel-pos bias + log size) v for (n, heads, S, hd) windows,
    returned as (n, S, heads, hd).

    The bias is folded into extra q/k dimensions (``_fold_layout``) so attention is one fused
    ``scaled_dot_product_attention`` call. Measured on this CPU (2 threads, 12 heads x 4096
    tokens): the explicit softmax(q k^T + bias) v takes 1.64 s in fp32, SDPA on 192 dims 0.77 s.
    SDPA's fused CPU kernel needs q, k and v of one width, so v is zero-padded to it.

    The kernel is much faster on aligned shapes, so the width is zero-padded to a multiple of
    32 and, in half precision, a long window (a global block) to a multiple of 64 tokens with
    empty key slots (``MASKED_LOGIT``); the padded queries' outputs are dropped. Measured on
    this CPU with AMX, bf16, 12 heads: 4096 tokens 152 -> 119 ms (width 191 -> 192); 3018
    tokens 127 ms at width 191, 91 ms at 192, 66 ms at 192 and 3072 tokens. In fp32 the width
    helped (315 -> 279 ms at 3018 tokens) and the length did not (286 ms at 3072).
    """
    n, heads, s, hd = q.shape
    size = fold["size"]
    shape = (n, heads, s, size)
    if attn.use_rel_pos:
        if attn.rel_pos_h.shape[0] != 2 * size - 1:
            raise ValueError(
                f"relative position table of {attn.rel_pos_h.shape[0]} rows does not fit {size}"
            )
        qh = (q @ attn.rel_pos_h.t()).gather(-1, fold["row_index"].expand(shape))
        qw = (q @ attn.rel_pos_w.t()).gather(-1, fold["col_index"].expand(shape))
        qh, qw = qh[..., :-1] - qh[..., -1:], qw[..., :-1] - qw[..., -1:]
    else:
        qh = qw = q.new_zeros(n, heads, s, size - 1)
    ext = fold["key_ext"]
    width = hd + ext.shape[-1]
    pad = [q.new_zeros(n, heads, s, -width % 32)]
    qf = torch.cat([q * attn.scale, qh, qw, q.new_ones(n, heads, s, 1), *pad], dim=-1)
    kf = torch.cat([k, ext.expand(n, heads, s, ext.shape[-1]), *pad], dim=-1)
    # the fused kernel needs v as wide as q; explicit products (short windows, where they are
    # faster here) take it as it is
    vf = v if explicit_pays(q.device, q.dtype, s) else F.pad(v, (0, qf.shape[-1] - hd))
    extra = _extra_tokens(s, q.dtype)
    if extra:
        qf, kf, vf = (F.pad(t, (0, 0, 0, extra)) for t in (qf, kf, vf))
        kf[:, :, s:, width - 1] = MASKED_LOGIT  # empty key slots: exp() of them is 0
    out = fused_attention(qf, kf, vf, None, 1.0, hd, s)
    return out[:, :s, :, :hd]
