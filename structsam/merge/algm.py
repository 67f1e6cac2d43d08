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
- ``rate`` is ALGM's own knob, the threshold: ``tau = 1 - rate / 0.75`` (rate 0.75 -> tau 0,
  every cell with a non-negative mean similarity collapses; rate 0.09 -> tau 0.88, Segmenter's
  value). Calibrating ``rate`` on FLOPs is therefore calibrating ``tau``: at Segmenter's 0.88
  CTM alone cut 29.7 % of LiteMedSAM's FLOPs, so -25 % was out of reach with the threshold held
  fixed. Cells of identical tokens (the zero padding of LiteMedSAM's 256 x 256 input, black
  background) collapse at any tau < 1 and GTM adds its adaptive share, so on the bench's
  tuning images -25 % needs tau = 0.9996 (rate 3.3e-4); at tau 0.9999 CTM alone cuts 15 % and
  CTM + GTM 24 %. Pass ``tau=`` to fix the threshold instead (then ``rate`` is unused).
- Global stage (GTM, on by default): ALGM runs CTM at an early layer and GTM at a later one; the
  engine asks for one assignment per stage, so GTM runs in the stages that start at or after
  ``global_from`` (a fraction of the encoder's depth, 0.5 by default, where ALGM's recipe puts
  it in ViT-S: layer 5 of 12) on the tokens CTM kept, with ALGM's adaptive threshold
  ``mean + std / layer`` where ``layer`` is the stage's first block (1-based). Its count is
  adaptive (not set by ``rate``). The engine passes ``depth=(block, n_blocks)``; called without
  it, GTM runs whenever ``global_stage`` is on, with ``layer`` 1.
- Counts are per image (ALGM takes the minimum over the batch to keep tensor shapes equal).
- Metric: the block input after a LayerNorm without affine, compared by cosine similarity
  (ALGM uses the raw tokens for CTM and the keys for GTM). Merging is the engine's
  merge-compute-unmerge per stage, where ALGM keeps tokens merged to the decoder.
"""

from __future__ import annotations

import torch

from .grid import Grid
from .tome import INF, bipartite, keep_all, unit_metric

MAX_RATE = 0.75  # rate at which tau reaches 0


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
    tau: float | None = None,
    global_stage: bool = True,
    global_from: float = 0.5,
    depth: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, C) features -> (dst (B, N), protected (B, N) all False). See the module
    docstring; ``protect`` and ``generator`` are unused (the engine protects prompts)."""
    idx, none = keep_all(feat, grid)
    if tau is None and rate <= 0:
        return idx, none  # rate 0 is tau 1: nothing merges, GTM included
    b, n = idx.shape
    dev = feat.device
    metric = unit_metric(feat)
    score = cell_similarity(metric, grid)  # (B, n_cells)
    threshold = 1.0 - rate / MAX_RATE if tau is None else float(tau)
    chosen = score >= threshold
    last = torch.full((grid.n_cells,), -1, dtype=torch.long, device=dev)
    last = last.scatter_reduce(0, grid.cell_id, torch.arange(n, device=dev), reduce="amax")
    cid = grid.cell_id.expand(b, -1)
    dst = torch.where(chosen.gather(1, cid), last[grid.cell_id].expand(b, -1), idx)
    layer = 1
    if depth is not None:
        block, n_blocks = depth
        layer = block + 1
        global_stage = global_stage and block >= global_from * n_blocks
    if not global_stage:
        return dst, none
    return _global_stage(metric, grid, dst, idx, layer), none


def _global_stage(metric, grid: Grid, dst, idx, layer: int) -> torch.Tensor:
    """GTM on the tokens CTM kept, with ALGM's adaptive threshold mean + std / layer."""
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
    return dst2.gather(1, dst)


algm_merge.depth_aware = True  # the engine passes depth=(block, n_blocks)
