"""PiToMe: spectrum-preserving token merging (Tran et al., NeurIPS 2024; ``hchautran/PiToMe``,
``algo/pitome/merge.py::pitome_vision``), adapted to SAM.

The rule: every token gets an energy ``E_i = mean_j ELU(cos(m_i, m_j) - margin; alpha)`` over the
tokens j it attends to (j = i included, as in PiToMe); a high energy means many near-duplicates.
Tokens are sorted by energy, highest first; the top ``2r`` are mergeable and the rest are
protected (a low energy marks an isolated, informative token). The mergeable tokens are split
alternately in rank order into A (even ranks) and B (odd ranks) and each A token merges into its
most similar B token.

Adaptation to SAM:

- Windows: in a windowed block the energy of a token is its mean over the tokens of its own
  window (a global block: over the whole grid), and the A/B split and the matching run inside
  each window, so no group spans two windows. The ``2r`` mergeable tokens are the highest
  energies image-wide; inside a window they are split by their energy rank there.
- Count: ``r = round(rate * N)``. PiToMe merges ``r`` tokens in every block, so over a
  stage of several blocks the tokens shrink geometrically; the engine assigns once per stage,
  so a rate above 1/2 runs a second round on the tokens the first round kept (the top ``2 r'``
  of their energies mergeable, ``r' = r - N/2``), as a second block of PiToMe would;
  ``max_rate`` is 0.75. Without it PiToMe cut at most 39 % of LiteMedSAM's FLOPs (37 %
  prompt-aware), short of -40 %. A window holding an odd number of mergeable tokens has one A
  token more than B tokens; of all A tokens the ``r`` with the highest energy merge, so the
  count can fall short by at most one token per window.
- Margin: scheduled over depth as in PiToMe, ``m_l = m0 * (1 - l / L)`` for a stage whose first
  block is ``l`` of ``L`` (the engine passes ``depth=(l, L)``; m0 = 0.9 as in PiToMe's BLIP/CLIP
  patches, 0.75 in its timm patch): early stages need near-duplicates to count as redundant,
  late ones count looser similarity. ``margin=`` fixes it instead (the ``tome_sam`` port's
  0.5); called without ``depth`` and without ``margin``, the margin is ``m0``.
- Metric: the block input after a LayerNorm without affine (PiToMe uses the attention keys),
  compared by cosine similarity.
- ``protected`` reports the low-energy tokens outside the top ``2r`` (for overlays).
- Merging is the engine's size-weighted mean with proportional attention, then unmerge (the
  ``tome_sam`` port adds the same unmerge).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grid import Grid
from .tome import INF, bipartite, keep_all, pack, top_r, unit_metric

MAX_RATE = 0.75  # two rounds: half the tokens, then half of the rest


def window_energy(
    metric: torch.Tensor, grid: Grid, margin: float = 0.5, alpha: float = 1.0
) -> torch.Tensor:
    """(B, N, C) unit metric -> (B, N) PiToMe energy over the tokens of each window."""
    b, n, c = metric.shape
    every = torch.ones(b, n, dtype=torch.bool, device=metric.device)
    p = pack(grid.window_id, every, grid.n_windows)
    m = metric.reshape(b * n, c)[p.table]  # (G, K, C)
    e = F.elu(torch.bmm(m, m.transpose(1, 2)) - margin, alpha=alpha)
    valid = p.valid[:, None, :]
    e = e.masked_fill(~valid, 0.0).sum(-1) / valid.sum(-1).clamp(min=1)
    out = torch.empty(b * n, device=metric.device, dtype=e.dtype)
    out[p.tokens] = e.reshape(-1)[p.where]
    return out.view(b, n)


def pitome_merge(
    feat: torch.Tensor,
    grid: Grid,
    rate: float,
    protect: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    margin: float | None = None,
    m0: float = 0.9,
    alpha: float = 1.0,
    depth: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, C) features -> (dst (B, N), protected (B, N): the low-energy tokens). See the
    module docstring; ``protect`` and ``generator`` are unused (the engine protects prompts)."""
    idx, none = keep_all(feat, grid)
    r = min(round(rate * grid.n), round(MAX_RATE * grid.n))
    if r <= 0:
        return idx, none
    if margin is None:
        margin = m0 * (1 - depth[0] / depth[1]) if depth is not None else m0
    metric = unit_metric(feat)
    energy = window_energy(metric, grid, margin, alpha)
    first = min(r, grid.n // 2)
    dst, mergeable = _round(metric, grid, energy, idx, idx == idx, first)
    if r > first:  # a second block's worth of PiToMe on the tokens the first round kept
        kept = dst == idx
        dst2, more = _round(metric, grid, energy, idx, kept, r - first)
        dst = dst2.gather(1, dst)  # groups whose destination merged again follow it
        mergeable |= more
    return dst, ~mergeable


def _round(metric, grid: Grid, energy, idx, alive, r: int):
    """One PiToMe merge of ``r`` tokens among ``alive``: the top ``2r`` energies are mergeable,
    split alternately by energy rank, each A token into its most similar B token."""
    mergeable = top_r(energy.masked_fill(~alive, -INF), 2 * r)
    sim, target, _ = bipartite(metric, grid, mergeable, order=-energy)
    merged = top_r(torch.where(torch.isfinite(sim), energy, -INF), r)
    return torch.where(merged, target, idx), mergeable


pitome_merge.depth_aware = True  # the engine passes depth=(block, n_blocks)
