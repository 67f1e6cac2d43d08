"""Token merging inside TinyViT blocks (LiteMedSAM's image encoder).

A TinyViT block is: windowed attention with learned attention biases (residual), a depthwise
3x3 "local conv" on the full grid, then an MLP (residual). Measured on LiteMedSAM, attention
projections and MLPs are most of the FLOPs while the depthwise conv is cheap, so the block runs
attention and MLP on the reduced tokens and keeps the conv at full resolution: every token gets
its own input plus its group's update, and the conv sees the true grid.

Measured on 13 well-posed LiteMedSAM cases at a matched -30 % FLOPs: reduced queries (the group
mean asks) keep mask IoU 0.85 against the unmerged model, while keeping every token's query
(``queries="full"``, only keys/values merged) costs more FLOPs per merged token, needs a
higher rate for the same cut and falls to 0.78; so reduced queries are the default. Selection
once per stage and once per block gave the same embedding error (0.54 vs 0.57 relative at rate
0.5), so it is made once per stage, where it costs least.

The blocks of a stage share that plan, so ``encoder_forward`` carries the reduced tokens from
block to block and touches full resolution only for the conv: one recovery before it and one
merge after it per block, where the per-block path (``merged_forward``, kept for the ablations
and ``recovery="block"``) merges and recovers around attention and MLP separately. Measured on
LiteMedSAM at -30 % (10 interleaved rounds, 2 threads): 609 vs 669 ms per encode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .engine import full_query_attention, reduced_attention


def iter_blocks(encoder):
    """(block_index, stage_index, block) for every attention block of a TinyViT encoder."""
    index = 0
    for stage, layer in enumerate(encoder.layers):
        for blk in layer.blocks:
            if hasattr(blk, "attn"):
                yield index, stage, blk
                index += 1


def is_tinyvit(encoder) -> bool:
    return type(encoder).__name__ == "TinyViT" and hasattr(encoder, "layers")


def _tinyvit_bias(blk):
    """Position bias for the full-query path (:func:`full_query_attention`), gathered from the
    block's learned pair biases (every padding token is a key of its own there)."""
    table = _pair_bias(blk.attn).float()

    def bias(q, qpos, kpos, cache):
        heads, n, nk = table.shape
        if (heads, n, nk) not in cache:
            pair = qpos[:, None, :, None] * nk + kpos[:, None, None, :]
            head = torch.arange(heads, device=qpos.device)[None, :, None, None] * n * nk
            # int32 makes index_select about twice as fast as int64 on CPU
            cache[(heads, n, nk)] = (pair + head).to(torch.int32).view(-1)
        w, sq, sk = q.shape[0], qpos.shape[1], kpos.shape[1]
        return table.reshape(-1).index_select(0, cache[(heads, n, nk)]).view(w, heads, sq, sk)

    return bias


def _tinyvit_mask(blk, plan, dtype: torch.dtype):
    """mask(part) for :func:`reduced_attention`: a bucket part's (W, heads, S, S) additive mask
    in ``dtype``, made by one gather per block from a table of position bias plus
    log group size.

    TinyViT's bias of a query/key pair is a learned value per relative offset (one table per
    block), so with one column per offset (and per padding pattern and query position, for the
    padding key) and one row per group size, bias + log size is a lookup whose index depends on
    the plan alone and is shared by the stage's blocks. Measured on LiteMedSAM's bucket shapes,
    the gather and cast per block took 0.4-0.9 ms (fp32, bf16) where gathering the pair bias,
    adding the log sizes and casting took 0.7-1.5 ms.
    """
    attn = blk.attn
    grid = plan.grid
    state = blk._structsam_state
    # a power of two above the largest group, so that few tables are ever built
    classes = 1 << plan.max_size.bit_length()
    gkey = (grid.height, grid.width, grid.window)
    columns = state.constant(("tinyvit_bias_columns", *gkey), lambda: _bias_columns(attn, grid))
    table = state.constant(
        ("tinyvit_mask_table", blk._structsam_index, classes, dtype, *gkey),
        lambda: _mask_table(attn, grid, classes, dtype),
    )
    n = columns.shape[0]

    def mask(part):
        cache = part["index"]
        if classes not in cache:
            pos = part["pos"]  # a padding slot's query row is never read: any row will do
            col = columns[pos.clamp(max=n - 1)[:, :, None], pos[:, None, :]]
            cache[classes] = (col * classes + part["key_size"][:, None, :]).to(torch.int32)
        index = cache[classes]
        w, s, _ = index.shape
        # rows of a (columns x classes, heads) table, then heads to the front: the row gather
        # is 2-4x faster in bf16 than gathering along the table's second dimension
        rows = table.index_select(0, index.view(-1)).view(w, s, s, -1)
        return rows.permute(0, 3, 1, 2).contiguous()

    return mask


def _bias_columns(attn, grid) -> torch.Tensor:
    """(n, n + T) column of every query/key position pair in :func:`_mask_table`: the learned
    offset's column, or for padding key ``n + t`` one column per query position and pattern."""
    idxs = attn.attention_bias_idxs
    n, n_off = idxs.shape[0], attn.attention_biases.shape[1]
    t = grid.pad_patterns[1].shape[0]
    pad = (
        n_off
        + torch.arange(n, device=idxs.device)[:, None] * t
        + torch.arange(t, device=idxs.device)
    )
    return torch.cat([idxs, pad], 1)


def _mask_table(attn, grid, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(columns * classes, heads) bias + log(group size) for every column of
    :func:`_bias_columns` and size below ``classes`` (size 0: an empty slot, -inf), summed in
    fp32 and cast once to ``dtype``, as the per-pair path did."""
    lse = _pad_bias(_pair_bias(attn), grid.pad_patterns[1])[
        :, :, attn.attention_bias_idxs.shape[0] :
    ]
    heads = lse.shape[0]
    biases = torch.cat([attn.attention_biases.float(), lse.reshape(heads, -1)], 1)
    log_size = torch.arange(classes, device=biases.device, dtype=torch.float32).log()
    table = biases[:, :, None] + log_size
    return table.reshape(heads, -1).t().to(dtype).contiguous()


def _pair_bias(attn) -> torch.Tensor:
    """(heads, n, n) bias of every query/key pair of a window (TinyViT caches it in eval)."""
    if hasattr(attn, "ab") and not attn.training:
        return attn.ab
    return attn.attention_biases[:, attn.attention_bias_idxs]


def _pad_bias(ab: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """(heads, n, n) pair biases, (T, n) padded positions -> (heads, n, n + T).

    Padding tokens are zeros through the attention's LayerNorm, so their keys and values are
    identical; only their position biases differ. A window's padding keys therefore sum to one
    key whose bias is the logsumexp of theirs: exact, and on LiteMedSAM's 64x64 stages it cuts
    the edge windows' key slots from 84 padding keys (window 14) or 42 (window 7) to one.
    """
    # kept in fp32 whatever the encoder runs in: the gathered bias gets the log group sizes
    # added before the one cast to the attention's type, and a broadcast add is about 10x
    # slower in bf16 than in fp32 on this CPU (6 x (10, 5, 196, 196): 3.8 ms against 0.4)
    ab = ab.float()
    if not patterns.shape[0]:
        return ab
    masked = ab[:, :, None, :].masked_fill(~patterns[None, None], float("-inf"))
    return torch.cat([ab, torch.logsumexp(masked, dim=-1)], dim=2)


def merged_forward(self, x: torch.Tensor) -> torch.Tensor:
    """TinyViTBlock.forward with attention and MLP on the reduced tokens."""
    state = self._structsam_state
    h, w = self.input_resolution
    window = None if (h == self.window_size and w == self.window_size) else self.window_size
    plan = state.plan_for(self._structsam_index, x, h, w, window)
    if plan is None:
        return self._structsam_dense_forward(x)
    b, n, c = x.shape

    if not state.config.merge_attention:
        x = x + self.drop_path(_dense_attention(self, x))
    else:
        o = _merged_attention(self, x, plan, state.config.queries == "full")
        x = x + self.drop_path(o if state.config.queries == "full" else plan.unmerge(o))

    x = x.transpose(1, 2).reshape(b, c, h, w)
    x = self.local_conv(x)
    x = x.view(b, c, n).transpose(1, 2)

    if not state.config.merge_mlp:
        return x + self.drop_path(self.mlp(x))
    # x is the local conv's fresh output here, so the residual can be added in place
    return x.add_(self.drop_path(plan.unmerge(self.mlp(plan.merge(x)))))


def encoder_forward(self, x: torch.Tensor) -> torch.Tensor:
    """TinyViT.forward_features merging once per run of merged blocks of a stage."""
    state = self._structsam_state
    state.begin_forward()
    x = self.layers[0](self.patch_embed(x))
    runs = iter(state.config.runs)
    for layer in self.layers[1:]:
        done = 0
        while done < len(layer.blocks):
            run = next(runs)
            x = _run_blocks(layer.blocks[done : done + len(run)], x, state)
            done += len(run)
        if layer.downsample is not None:
            x = layer.downsample(x)
    b, n, c = x.shape
    h, w = self.layers[-1].input_resolution
    return self.neck(x.view(b, h, w, c).permute(0, 3, 1, 2))


def _run_blocks(blocks, x: torch.Tensor, state) -> torch.Tensor:
    """Blocks of one stage sharing one plan, with one merge and one recovery per block.

    The true tokens are ``base + unmerge(pending)``: the local conv needs them at full
    resolution, so each block recovers once (attention and the last MLP update together) before
    the conv and merges once after it. merge(base + unmerge(u)) == merge(base) + u, so the next
    attention's input is merge(conv) + mlp update, with no second merge; the per-block path
    (``merged_forward``, two merges and two recoveries per block) equals it in exact arithmetic.
    """
    first = blocks[0]
    h, w = first.input_resolution
    ws = first.window_size
    window = None if (h == ws and w == ws) else ws
    plan = state.plan_for(first._structsam_index, x, h, w, window)
    if plan is None:
        for blk in blocks:
            x = blk._structsam_dense_forward(x)
        return x
    b, n, c = x.shape
    base, xr, pending = x, plan.merge(x), None
    for i, blk in enumerate(blocks):
        if i:  # the same plan; this records the block's merge info
            state.plan_for(blk._structsam_index, x, h, w, window)
        o = _reduced_attention(blk, xr, plan)
        update = o if pending is None else pending.add_(o)
        full = base + plan.unmerge(update)
        conv = blk.local_conv(full.transpose(1, 2).reshape(b, c, h, w))
        base = conv.view(b, c, n).transpose(1, 2)
        xr = plan.merge(base)
        pending = blk.mlp(xr)
        xr = xr.add_(pending)
    # base is the last conv's fresh output, so the recovery can be added in place
    return base.add_(plan.unmerge(pending))


def _reduced_attention(blk, xr: torch.Tensor, plan) -> torch.Tensor:
    """(M, C) reduced tokens -> their windowed attention output (M, C), queries reduced."""
    attn = blk.attn
    heads, kd = attn.num_heads, attn.key_dim
    pad = _padding_qkv(blk, xr) if plan.packing(one_pad_slot=True)["has_pad"] else None
    qkv = attn.qkv(attn.norm(xr)).view(-1, heads, 2 * kd + attn.d)
    mask = _tinyvit_mask(blk, plan, qkv.dtype)
    return attn.proj(
        reduced_attention(
            qkv, [kd, kd, attn.d], plan, attn.scale, mask, pad, one_pad_slot=True
        ).reshape(-1, attn.dh)
    )


def _padding_qkv(blk, like: torch.Tensor) -> torch.Tensor:
    """(heads, 2 * key_dim + d): q/k/v of a window's zero padding, which passes through the
    attention's LayerNorm, so every padding token has the same ones. It depends on the weights
    alone: made once per patch at inference (1.7 ms per LiteMedSAM encode when made per block
    and forward), afresh where autograd records."""
    attn = blk.attn

    def build():
        return attn.qkv(attn.norm(like.new_zeros(1, like.shape[-1]))).view(attn.num_heads, -1)

    if torch.is_grad_enabled():
        return build()
    key = ("tinyvit_padding_qkv", blk._structsam_index, like.dtype, str(like.device))
    return blk._structsam_state.constant(key, build)


def _merged_attention(blk, x, plan, full_queries=False):
    """(B, N, C) -> attention output (M, C) of the reduced tokens, or (B, N, C) per token."""
    if not full_queries:
        return _reduced_attention(blk, plan.merge(x), plan)
    attn = blk.attn
    b, n, c = x.shape
    heads, kd = attn.num_heads, attn.key_dim
    xr = attn.norm(plan.merge(x))
    pad = _padding_qkv(blk, x) if plan.packing()["has_pad"] else None
    bias = _tinyvit_bias(blk)
    # split the fused projection: queries for every token, keys/values for the groups
    w = attn.qkv.weight.view(heads, 2 * kd + attn.d, c)
    bb = attn.qkv.bias.view(heads, 2 * kd + attn.d)
    q = F.linear(attn.norm(x), w[:, :kd].reshape(-1, c), bb[:, :kd].reshape(-1))
    kv = F.linear(xr, w[:, kd:].reshape(-1, c), bb[:, kd:].reshape(-1)).view(-1, heads, kd + attn.d)
    if pad is not None:
        pad = pad[:, kd:]
    o = full_query_attention(kv, [kd, attn.d], plan, attn.scale, bias, pad, q.view(-1, heads, kd))
    return attn.proj(o.reshape(b, n, attn.dh))


def _dense_attention(block, x):
    """The block's own windowed attention on every token (ablation path)."""
    h, w = block.input_resolution
    b, n, c = x.shape
    ws = block.window_size
    if h == ws and w == ws:
        return block.attn(x)
    x = x.view(b, h, w, c)
    pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
    x = torch.nn.functional.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    ph, pw = h + pad_b, w + pad_r
    nh, nw = ph // ws, pw // ws
    x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
    x = block.attn(x)
    x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
    return x[:, :h, :w].reshape(b, n, c)
