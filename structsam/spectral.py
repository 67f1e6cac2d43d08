"""Spectral distortion of a merge: how much coarsening changes the token graph's Laplacian spectrum.

The paper argues (after PiToMe, NeurIPS 2024) that score-guided merging keeps the Laplacian
spectrum of the token-similarity graph close to the original, while random or window-restricted
merging does not. Measured here as follows:

- graph: the tokens of one attention window (the whole grid for global attention) with weights
  ``W_ij = max(cos(x_i, x_j), 0)`` on the block input after a plain LayerNorm; self-loops
  (``W_ii = 1``) are kept, so that merging exact duplicates changes nothing;
- coarsening lifted back to the tokens: ``W_l = B W Bᵀ`` with ``B_ia = 1/|g(i)|`` for ``a`` in
  token ``i``'s group ``g(i)``, so ``W_l[i, j]`` is the mean weight between the two groups; an
  unmerged token keeps its row of ``W`` exactly;
- distortion: ``mean_k |λ_k(L) − λ_k(L_l)|`` over the sorted eigenvalues of the normalised
  Laplacians ``L = I − D^{-1/2} W D^{-1/2}``, averaged over tokens. It lies in [0, 2] and is 0
  when nothing merges.

Windows of equal size are batched through one ``eigvalsh``; there are at most four sizes (full
windows and the cut ones at the right and bottom edges).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .merge.grid import Grid


def _normalized_laplacian(w: torch.Tensor) -> torch.Tensor:
    deg = w.sum(-1)
    inv = torch.where(deg > 0, deg.clamp_min(1e-12).rsqrt(), torch.zeros_like(deg))
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    return eye - inv[..., :, None] * w * inv[..., None, :]


def _window_distortion(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """x (K, n, C) tokens of K windows, groups (K, n) ids -> (K,) summed |Δλ|."""
    x = F.normalize(x, dim=-1)
    w = (x @ x.transpose(1, 2)).clamp_min(0)
    same = (groups[:, :, None] == groups[:, None, :]).to(w.dtype)
    b = same / same.sum(-1, keepdim=True)
    lifted = b @ w @ b.transpose(1, 2)
    lam = torch.linalg.eigvalsh(_normalized_laplacian(w))
    lam_l = torch.linalg.eigvalsh(_normalized_laplacian(lifted))
    return (lam - lam_l).abs().sum(-1)


def spectral_distortion(features: torch.Tensor, merge_map, window: int | None) -> float:
    """Mean per-token Laplacian spectral distortion of one merge (see the module docstring).

    ``features``: (H, W, C) block input; ``merge_map``: (H, W) group id per token (tokens of a
    group share an id); ``window``: the attention window in tokens, or None for global.
    """
    h, w, c = features.shape
    x = F.layer_norm(features.double().reshape(h * w, c), (c,))
    groups = torch.as_tensor(np.asarray(merge_map), device=x.device).reshape(-1)
    grid = Grid(h, w, window, device=x.device)
    win = grid.window_id.reshape(-1)
    order = torch.argsort(win * (h * w) + torch.arange(h * w, device=x.device))
    sizes = torch.bincount(win, minlength=int(win.max()) + 1)
    starts = torch.cumsum(sizes, 0) - sizes
    total = x.new_zeros(())
    for size in torch.unique(sizes).tolist():
        chosen = torch.nonzero(sizes == size).flatten()
        idx = (starts[chosen][:, None] + torch.arange(size, device=x.device)).reshape(-1)
        tokens = order[idx]
        part = _window_distortion(x[tokens].view(-1, size, c), groups[tokens].view(-1, size))
        total = total + part.sum()
    return float(total / (h * w))
