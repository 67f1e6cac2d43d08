"""Token energy from first-order spatial gradients of normalised features on the token grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
# The co-author code mistypes the first row as [-1, -2, +1]; this is the correct kernel.
_SOBEL_Y = _SOBEL_X.t().contiguous()


def normalise(feat: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine over channels, so energy compares shapes, not scales."""
    return F.layer_norm(feat, feat.shape[-1:])


def token_energy(feat: torch.Tensor, kind: str = "sobel", normalised: bool = False) -> torch.Tensor:
    """(B, H, W, C) features -> (B, H, W) energy, high at edges and low in flat regions.

    ``sobel``: E = sqrt(mean_c(Gx^2 + Gy^2)) with 3x3 Sobel kernels; ``central``: central
    differences. Replicate padding, so the image border is not mistaken for an edge.
    Computed as a depthwise convolution so FLOP counters see its cost.
    """
    f = (feat if normalised else normalise(feat)).permute(0, 3, 1, 2)  # (B, C, H, W)
    c = f.shape[1]
    if kind == "sobel":
        kernel = torch.stack([_SOBEL_X, _SOBEL_Y]) / 8.0
    elif kind == "central":
        d = torch.tensor([[0.0, 0.0, 0.0], [-0.5, 0.0, 0.5], [0.0, 0.0, 0.0]])
        kernel = torch.stack([d, d.t().contiguous()])
    else:
        raise ValueError(f"unknown energy {kind!r}: use 'sobel' or 'central'")
    weight = kernel.to(f).repeat(c, 1, 1).unsqueeze(1)  # (2C, 1, 3, 3)
    g = F.conv2d(F.pad(f, (1, 1, 1, 1), mode="replicate"), weight, groups=c)
    # one pass over the 2C maps: sqrt(sum_c(Gx^2 + Gy^2)) / sqrt(C) = sqrt(mean_c(...))
    return torch.linalg.vector_norm(g, dim=1).mul_(c**-0.5)
