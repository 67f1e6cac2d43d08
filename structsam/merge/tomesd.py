"""ToMeSD: token merging for Stable Diffusion (Bolya & Hoffman, CVPR-W 2023; ``dbolya/tomesd``,
``tomesd/merge.py::bipartite_soft_matching_random2d``), adapted to SAM.

The rule: the token grid is tiled into 2x2 cells; one token per cell, drawn at random, is a
destination and every other token is a source. Each source finds its most similar destination
(cosine similarity) and the ``r`` sources with the most similar matches merge into them. A
source may match the destination of another cell: cells only decide who is a destination.

Adaptation to SAM:

- Cells are ``Grid.cell_id`` cells, cut at window edges, so a cell never spans two windows. In a
  windowed block a source only looks at the destinations of its own window (``tome_sam`` runs
  ToMeSD per window too); a global block matches over the whole grid, as ToMeSD does.
- The random destination of each cell comes from the engine's seeded generator (``tome_sam``
  fixes seed 42; here the seed is the patch's ``seed`` plus the block index) and is shared by the
  images of a batch, as in ToMeSD. ``no_rand=True`` takes each cell's first (top-left) token.
- Metric: the block input after a LayerNorm without affine (ToMeSD uses the hidden state
  itself), compared by cosine similarity.
- Count: ``r = round(rate * N)`` image-wide, at most the number of sources: ``max_rate`` is
  0.75 (3 of 4 tokens per full 2x2 cell). Where windows have an odd side the cells at their edge
  are cut short and hold fewer sources, so the reachable fraction there is a little lower.
- Merging is the engine's size-weighted mean and every source takes its group's update back
  (ToMeSD's unmerge).
"""

from __future__ import annotations

import torch

from .grid import Grid
from .tome import best_match, keep_all, top_r, unit_metric

INF = float("inf")


def random_cell_dst(
    grid: Grid,
    generator: torch.Generator | None,
    no_rand: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(N,) bool: one destination per 2x2 cell, uniform at random (or the cell's first token)."""
    n = grid.n
    if no_rand:
        key = -torch.arange(n, device=device, dtype=torch.float32)
    else:
        # a random permutation gives distinct keys: exactly one maximum per cell
        key = torch.randperm(n, generator=generator, device=device).to(torch.float32)
    cid = grid.cell_id.to(device)
    best = torch.full((grid.n_cells,), -INF, device=device)
    best = best.scatter_reduce(0, cid, key, reduce="amax")
    return key == best[cid]


def tomesd_merge(
    feat: torch.Tensor,
    grid: Grid,
    rate: float,
    protect: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    no_rand: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, C) features -> (dst (B, N), protected (B, N) all False). See the module
    docstring; ``protect`` is unused (ToMeSD is not prompt-aware)."""
    idx, none = keep_all(feat, grid)
    r = round(rate * grid.n)
    if r <= 0:
        return idx, none
    b = feat.shape[0]
    is_dst = random_cell_dst(grid, generator, no_rand, feat.device).expand(b, -1)
    metric = unit_metric(feat)
    sim, target = best_match(metric, grid.window_id, grid.n_windows, ~is_dst, is_dst)
    merged = top_r(sim, r)
    return torch.where(merged, target, idx), none
