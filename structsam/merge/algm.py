"""ALGM: adaptive local-then-global token merging (Norouzi et al., CVPR 2024;
``tue-mps/algm-segmenter``, ``algm/algm/local_merge.py::conditional_pooling`` and
``global_merge.py::turbo_matching``), adapted to SAM.

The rule:

1. Local stage (CTM): the grid is tiled into 2x2 cells; a cell's score is the mean pairwise
   cosine similarity of its tokens, self pairs excluded. Every cell scoring at least ``tau``
   (0.88) collapses into one token (its last token is the destination). The count is adaptive:
   ALGM has no merge rate.
2. Global stage (GTM, optional here): ToMe's alternating split and bipartite matching on the
   tokens left after CTM, where an A token merges into its best B token when its similarity is at
   least ``mean + std / layer`` of the A tokens' best similarities (adaptive count).

Adaptation to SAM:

- Cells are ``Grid.cell_id`` cells, cut at window edges (a cut cell of two tokens or one column
  still collapses when similar enough; a one-token cell cannot).
- ``rate``: the cells above ``tau`` always collapse, and ``rate`` sets a floor: when they remove
  fewer than ``round(rate * N)`` tokens, further cells collapse in descending score order until
  that many are removed (whole cells, so up to 2 tokens more). This keeps ALGM's adaptive
  threshold and gives a knob for matched-compute comparisons (calibrate on measured FLOPs: on a
  flat image the threshold alone can remove up to 3/4 of the tokens, whatever the rate; at rate
  0 only the threshold acts). ``tau=None`` drops the threshold (rate-only). ``max_rate`` is 0.75,
  the most CTM can remove (3 of 4 tokens per full cell).
- ``global_stage=True`` runs GTM after CTM, on the kept tokens of each window (the split
  alternates over their raster order inside the window and matching stays in the window);
  ``layer`` (default 1) is ALGM's layer index in the threshold. It removes tokens beyond
  ``rate``. ALGM runs CTM once early and GTM once later and keeps tokens merged to the decoder;
  here the engine asks for one assignment per stage and unmerges after every block, so both
  stages act on the same block input.
- Counts are per image (ALGM takes the minimum over the batch to keep tensor shapes equal).
- Metric: the block input after a LayerNorm without affine, compared by cosine similarity
  (ALGM uses the raw tokens for CTM and the keys for GTM).
"""

from __future__ import annotations

import torch

from .grid import Grid
from .structsam import select_cells
from .tome import INF, bipartite, keep_all, unit_metric


def cell_similarity(metric: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, N, C) unit metric -> (B, n_cells) mean pairwise cosine similarity of each cell's
    tokens, self pairs excluded; -inf for cells of fewer than two tokens.

    sum_{i != j} m_i . m_j = |sum_i m_i|^2 - sum_i |m_i|^2, so no pair is formed explicitly.
    """
    b, n, c = metric.shape
    cid = grid.cell_id
    total = metric.new_zeros(b, grid.n_cells, c).index_add_(1, cid, metric)
    sq = metric.new_zeros(b, grid.n_cells).index_add_(1, cid, (metric * metric).sum(-1))
    k = grid.cell_count.to(metric.dtype)
    pairs = (total * total).sum(-1) - sq
    score = pairs / (k * (k - 1)).clamp(min=1)
    return score.masked_fill((grid.cell_count <= 1)[None], -INF)


def algm_merge(
    feat: torch.Tensor,
    grid: Grid,
    rate: float,
    protect: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    tau: float | None = 0.88,
    global_stage: bool = False,
    layer: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, C) features -> (dst (B, N), protected (B, N) all False). See the module
    docstring; ``protect`` and ``generator`` are unused."""
    idx, none = keep_all(feat, grid)
    b, n = idx.shape
    dev = feat.device
    metric = unit_metric(feat)
    score = cell_similarity(metric, grid)  # (B, n_cells)
    budget = torch.full((b,), round(rate * n), device=dev)
    chosen = select_cells(-score, grid, budget)  # highest scores first
    if tau is not None:
        chosen |= score >= tau
    last = torch.full((grid.n_cells,), -1, dtype=torch.long, device=dev)
    last = last.scatter_reduce(0, grid.cell_id, torch.arange(n, device=dev), reduce="amax")
    cid = grid.cell_id.expand(b, -1)
    dst = torch.where(chosen.gather(1, cid), last[grid.cell_id].expand(b, -1), idx)
    if not global_stage:
        return dst, none

    # GTM on the tokens CTM kept, with ALGM's adaptive threshold mean + std / layer
    kept = dst == idx
    sim, target, _ = bipartite(metric, grid, kept)
    finite = torch.isfinite(sim)
    count = finite.sum(1, keepdim=True)
    vals = torch.where(finite, sim, 0.0)
    mean = vals.sum(1, keepdim=True) / count.clamp(min=1)
    var = (torch.where(finite, sim - mean, 0.0) ** 2).sum(1, keepdim=True)
    std = (var / (count - 1).clamp(min=1)).sqrt()
    merged = finite & (sim >= mean + std / layer)
    dst2 = torch.where(merged, target, idx)
    # CTM groups whose destination merged in GTM follow it: one level, no chains
    return dst2.gather(1, dst), none
