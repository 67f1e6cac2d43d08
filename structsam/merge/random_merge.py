"""Random merging: the floor every content-aware method should beat.

The rule mirrors ToMeSD's grid with every content-based choice replaced by chance: one token per
2x2 cell (cells cut at window edges) is drawn as a destination; ``r = round(rate * N)`` of the
other tokens, drawn uniformly over the image, merge, each into a destination drawn uniformly
among those of its own window (a global block is one window). The co-authors' ``tome25`` and
``random_bipartite_soft_matching`` are random baselines of the same kind.

All draws use the engine's seeded generator (different seeds give different groups; the same
seed the same groups). The destination cells are shared by the images of a batch; the sources
and their destinations are drawn per image. The features are not looked at. ``max_rate`` is
0.75 (3 of 4 tokens per full 2x2 cell; a little less where windows have an odd side).
"""

from __future__ import annotations

import torch

from .grid import Grid
from .tome import keep_all, pack, top_r
from .tomesd import random_cell_dst

INF = float("inf")


def random_merge(
    feat: torch.Tensor,
    grid: Grid,
    rate: float,
    protect: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, C) features (used for their shape only) -> (dst (B, N), protected all False)."""
    idx, none = keep_all(feat, grid)
    r = round(rate * grid.n)
    if r <= 0:
        return idx, none
    b, n = idx.shape
    dev = feat.device
    is_dst = random_cell_dst(grid, generator, device=dev).expand(b, -1)
    # sources: r random non-destination tokens per image
    draw = torch.rand(b, n, generator=generator, device=dev)
    merged = top_r(draw.masked_fill(is_dst, -INF), r)
    # destination: a uniform pick among the destinations of the source's window
    pd = pack(grid.window_id, is_dst, grid.n_windows)
    count = pd.valid.sum(1)  # (B * n_windows,)
    row = (torch.arange(b, device=dev)[:, None] * grid.n_windows + grid.window_id).reshape(-1)
    pick = torch.rand(b * n, generator=generator, device=dev)
    slot = (pick * count[row]).long().clamp(max=pd.table.shape[1] - 1)
    target = (pd.table[row, slot] % n).view(b, n)
    merged &= (count[row] > 0).view(b, n)
    return torch.where(merged, target, idx), none
