"""Which kernel runs short-window softmax attention fastest on this device.

Windows of a few dozen to a few hundred tokens (TinyViT's, SAM ViT's 14 x 14 windows, and
the merged windows of every encoder) can run through torch's fused kernel
(``scaled_dot_product_attention``) or as explicit batched products and a softmax (``baddbmm``,
``softmax``, ``bmm``). Which is faster depends on the CPU and the number format; measured
with masked windows of 20-196 tokens, 2 threads:

- AMD EPYC with AVX-512 bf16 and no AMX (2026-12-07): in bf16 the explicit products were
  1.1-1.9x faster (25 windows x 5 heads x 196 tokens: 5.8 against 10.9 ms; 361 x 4 x 49: 9.6
  against 14.0 ms), and TinyViT's dense windows padded to 16 tokens for the fused kernel took
  twice as long as TinyViT's own products (136 against 59 ms per LiteMedSAM encode); in fp32
  the two were level within 15 %.
- Xeon with AMX (the same day, an earlier VM): the fused kernel on windows padded to 16 tokens
  beat TinyViT's own products (bf16 LiteMedSAM dense 127.5 -> 119 ms).

So on the CPU the choice is measured once per process for each number format (about 0.1 s, at
the first merged or half-precision encode); other devices keep the fused kernel (a GPU's is
the fast one, and no GPU was lent to measure). :func:`set_window_kernel` pins it (tests, A/B
timings).
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

WINDOW_KERNELS = ("auto", "fused", "explicit")
_pinned = "auto"

# the longest window the explicit products take: the (windows, heads, S, S) logits are
# materialised, which a global block of 4096 tokens could not afford
MAX_EXPLICIT_TOKENS = 256


def set_window_kernel(kind: str) -> str:
    """Pin the short-window kernel ("fused", "explicit") or let it be measured ("auto");
    returns the previous setting."""
    global _pinned
    if kind not in WINDOW_KERNELS:
        raise ValueError(f"window kernel must be one of {WINDOW_KERNELS}, got {kind!r}")
    previous, _pinned = _pinned, kind
    return previous


def explicit_pays(device: torch.device, dtype: torch.dtype, tokens: int) -> bool:
    """Whether ``tokens``-long windows on ``device`` in ``dtype`` should run as explicit
    products (:func:`explicit_attention`) rather than through the fused kernel."""
    if tokens > MAX_EXPLICIT_TOKENS or torch.is_grad_enabled():
        return False
    if _pinned != "auto":
        return _pinned == "explicit"
    if device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return _measured_explicit_faster(dtype)


@functools.cache
def _measured_explicit_faster(dtype: torch.dtype) -> bool:
    """Both kernels on two window shapes of LiteMedSAM's (full additive masks), best of three;
    outside any dispatch mode, so that a FLOPs count in progress does not count them."""
    shapes = ((96, 4, 49), (12, 5, 196))
    gen = torch.Generator().manual_seed(0)
    with _disable_current_modes(), torch.inference_mode():
        totals = {"fused": 0.0, "explicit": 0.0}
        for w, h, s in shapes:
            q, k, v = (torch.randn(w, h, s, 32, generator=gen).to(dtype) for _ in range(3))
            mask = torch.randn(w, h, s, s, generator=gen).to(dtype)
            for name, fn in (("fused", _fused), ("explicit", explicit_attention)):
                fn(q, k, v, mask, 0.2)  # warm-up: kernels are built on first use
                runs = []
                for _ in range(3):
                    start = time.perf_counter()
                    fn(q, k, v, mask, 0.2)
                    runs.append(time.perf_counter() - start)
                totals[name] += min(runs)
    # a clear win only: where the two are level (fp32 here) noise must not flip the choice
    return totals["explicit"] < 0.9 * totals["fused"]


def _fused(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def explicit_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for (n, heads, S, d) inputs, as (n, heads, S, dv), with
    batched products; ``mask`` (n, heads, S, Sk), broadcastable to it, or None.

    A fully masked row (an empty slot's query, never read) comes out NaN, as in the fused
    kernel's rows of -inf."""
    n, h, s, d = q.shape
    sk = k.shape[2]
    qf = q.reshape(n * h, s, d)
    kt = k.reshape(n * h, sk, d).transpose(1, 2)
    if mask is not None and mask.shape == (n, h, s, sk):
        logits = torch.baddbmm(mask.reshape(n * h, s, sk), qf, kt, alpha=scale)
    else:
        logits = torch.bmm(qf, kt).mul_(scale)
        if mask is not None:
            logits = logits.view(n, h, s, sk).add_(mask).view(n * h, s, sk)
    probs = logits.softmax(-1)
    return torch.bmm(probs, v.reshape(n * h, sk, -1)).view(n, h, s, -1)
