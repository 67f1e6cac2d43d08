"""Spectral distortion of a merge: how far coarsening moves the token graph's low spectrum.

The paper argues (after PiToMe, NeurIPS 2024, and Loukas' graph-coarsening bounds, JMLR 2019)
that score-guided merging keeps the token graph's spectrum close to the original, while random
or window-restricted merging does not. Measured here as follows:

- **graph**: a sparse spatial graph on the token grid, each token joined to its 4 neighbours
  (8 with ``neighbours=8``), the edge weighted by feature similarity
  ``w_ij = exp(-(1 - cos(x_i, x_j)) / s)`` on the block input after a plain LayerNorm, where
  ``s`` is the mean of ``1 - cos`` over the graph's edges (a self-tuning scale, so that the
  metric means the same on every model and stage); ``L = D - W``, the combinatorial Laplacian.
  A dense cosine graph, as measured before, has one near-zero eigenvalue per feature cluster
  and ~1 elsewhere, so it cannot tell methods apart; a spatial graph's low eigenvalues are the
  smooth modes and cuts along feature edges, which is what merging must keep.
- **coarsening**: a merge is a partition ``P`` (token -> group). The coarsened Laplacian is
  ``L_c = Pᵀ L P`` with the group sizes ``S = Pᵀ P`` as its mass: its generalised eigenvalues
  ``L_c v = λ S v`` are the Rayleigh quotients of ``L`` restricted to vectors constant on each
  group, so by Courant-Fischer ``λ̃_k >= λ_k`` (Loukas' restricted spectral approximation),
  with equality when nothing merges.
- **distortion**: the mean relative error ``(λ̃_k - λ_k) / λ_k`` of the ``k`` lowest non-zero
  eigenvalues (a group that straddles a feature edge destroys the cut along it: its λ rises from
  the edge's small weight to the flat areas' large one). Where fewer than ``k + 1`` groups are
  left the missing ``λ̃`` are taken as ``L``'s largest eigenvalue (the bound's ceiling).
- **global** variant: the whole grid is one graph (edges across attention windows included), so
  window-restricted merging shows; **per-window** variant: each attention window's own graph
  (the whole grid in a global block), averaged over windows.

Each window's graph is small (49-196 tokens) and goes through one dense ``eigvalsh``; the global
graph goes through a sparse shift-invert eigen-solver.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import eigsh

from ..merge.grid import Grid

_FLOOR = 1e-9  # relative to the largest eigenvalue: the floor of a denominator λ_k


def _edges(h: int, w: int, neighbours: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) of neighbouring grid tokens, each edge once."""
    idx = np.arange(h * w).reshape(h, w)
    pairs = [(idx[:, :-1], idx[:, 1:]), (idx[:-1, :], idx[1:, :])]
    if neighbours == 8:
        pairs += [(idx[:-1, :-1], idx[1:, 1:]), (idx[:-1, 1:], idx[1:, :-1])]
    elif neighbours != 4:
        raise ValueError(f"neighbours must be 4 or 8, got {neighbours}")
    return (
        np.concatenate([a.ravel() for a, _ in pairs]),
        np.concatenate([b.ravel() for _, b in pairs]),
    )


def edge_weights(features: torch.Tensor, neighbours: int = 4):
    """(H, W, C) features -> (i, j, w): the grid graph's edges and similarity weights."""
    h, w, c = features.shape
    x = F.normalize(F.layer_norm(features.double().reshape(h * w, c), (c,)), dim=-1)
    i, j = _edges(h, w, neighbours)
    ti, tj = torch.as_tensor(i), torch.as_tensor(j)
    dist = (1 - (x[ti] * x[tj]).sum(-1)).clamp_min(0).numpy()
    scale = float(dist.mean()) or 1.0
    return i, j, np.maximum(np.exp(-dist / scale), 1e-12)


def _relative_error(lam: np.ndarray, lam_c: np.ndarray, top: np.ndarray) -> np.ndarray:
    """(..., k) eigenvalues -> (...,) mean (λ̃ - λ) / λ, denominators floored."""
    den = np.maximum(lam, _FLOOR * top[..., None])
    return (np.maximum(lam_c - lam, 0) / den).mean(-1)


def _membership(groups: np.ndarray) -> sp.csr_matrix:
    """(N,) group ids -> (N, G) orthonormal group-indicator basis ``P S^{-1/2}``."""
    _, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    vals = 1 / np.sqrt(counts[inv])
    return sp.csr_matrix((vals, (np.arange(groups.size), inv)), shape=(groups.size, counts.size))


def _lowest(mat: sp.spmatrix, k: int) -> np.ndarray:
    """The ``k`` smallest eigenvalues of a PSD sparse matrix (dense below 600 rows)."""
    n = mat.shape[0]
    if n <= 600 or k >= n - 1:
        return np.linalg.eigvalsh(mat.toarray())[:k]
    vals = eigsh(mat.tocsc(), k=k, sigma=-1e-6, which="LM", return_eigenvectors=False)
    return np.sort(vals)


def global_distortion(features, merge_map, k: int = 32, neighbours: int = 4) -> float:
    """Distortion of the lowest ``k`` non-zero eigenvalues on the whole grid's graph."""
    h, w, _ = features.shape
    i, j, wt = edge_weights(features, neighbours)
    n = h * w
    adj = sp.coo_matrix((wt, (i, j)), shape=(n, n))
    adj = (adj + adj.T).tocsr()
    lap = sp.diags(np.asarray(adj.sum(1)).ravel()) - adj
    k = min(k, n - 2)
    lam = _lowest(lap, k + 1)[1:]
    top = np.asarray(2 * lap.diagonal().max())  # Gershgorin: λ_max <= 2 max degree
    q = _membership(np.asarray(merge_map).reshape(-1))
    coarse = (q.T @ lap @ q).tocsr()
    g = coarse.shape[0]
    lam_c = np.full(k, float(top))
    found = _lowest(coarse, min(k + 1, g))[1:]
    lam_c[: found.size] = found
    return float(_relative_error(lam, lam_c, top))


def window_distortion(
    features, merge_map, window: int | None, k: int = 8, neighbours: int = 4
) -> float:
    """Distortion averaged over attention windows, each window's own grid graph."""
    h, w, c = features.shape
    if window is None:
        return global_distortion(features, merge_map, k, neighbours)
    grid = Grid(h, w, window)
    win = grid.window_id.reshape(-1).cpu().numpy()
    i, j, wt = edge_weights(features, neighbours)
    inside = win[i] == win[j]
    n = h * w
    adj = sp.coo_matrix((wt[inside], (i[inside], j[inside])), shape=(n, n))
    adj = (adj + adj.T).tocsr()
    lap = (sp.diags(np.asarray(adj.sum(1)).ravel()) - adj).tocsr()
    groups = np.asarray(merge_map).reshape(-1)
    errors = []
    for wid in np.unique(win):
        # windows are few (at most a few hundred) and small: one dense solve each
        tok = np.flatnonzero(win == wid)
        sub = lap[tok][:, tok].toarray()
        lam_all = np.linalg.eigvalsh(sub)
        kk = min(k, tok.size - 1)
        if kk < 1:
            continue
        q = _membership(groups[tok]).toarray()
        lam_c_all = np.linalg.eigvalsh(q.T @ sub @ q)
        lam_c = np.full(kk, lam_all[-1])
        found = lam_c_all[1 : kk + 1]
        lam_c[: found.size] = found
        errors.append(_relative_error(lam_all[1 : kk + 1], lam_c, np.asarray(lam_all[-1])))
    return float(np.mean(errors)) if errors else 0.0


def spectral_distortion(features, merge_map, window: int | None) -> dict:
    """Both variants for one merge: ``{"window": ..., "global": ...}`` (module docstring)."""
    return {
        "window": window_distortion(features, merge_map, window),
        "global": global_distortion(features, merge_map),
    }


def merge_distortion(features: dict, merge_info) -> dict:
    """Mean distortion over the merged stages of one encode: ``features`` from
    ``structsam.patching.recording``, ``merge_info`` from ``Predictor.merge_info``."""
    seen, values = set(), []
    for info in merge_info:
        if info.stage in seen or info.stage not in features:
            continue
        seen.add(info.stage)
        feats = features[info.stage].detach().cpu()
        values.append(spectral_distortion(feats, info.merge_map, info.plan.grid.window))
    if not values:
        return {"spectral_window": 0.0, "spectral_global": 0.0}
    return {
        "spectral_window": float(np.mean([v["window"] for v in values])),
        "spectral_global": float(np.mean([v["global"] for v in values])),
    }
