"""StructSAM: energy-guided, flatness-screened token merging (the paper's method).

1. Energy: first-order spatial differences of the normalised features on the token grid: each
   token's squared differences to its four neighbours (``energy="dirichlet"``, its share of the
   grid graph's Dirichlet energy). Sobel (``"sobel"``, central differences) is blind to a
   one-token peak, which is what a small lesion is at LiteMedSAM's 16 x 16 stages: on the
   tuning split Dirichlet energy raised content-only fidelity at -25/-30/-40 % FLOPs from
   0.931/0.923/0.925 to 0.942/0.925/0.929 (docs/bench_tuning/README.md).
2. Flatness screening: the grid is cut into 2x2 cells inside attention windows; a cell's flatness
   is its *maximum* energy, so one edge token protects its whole cell. Only the flattest cells
   are merged; every token of another cell is protected (boundaries), and so is every cell
   touching a prompt region in prompt-aware mode.
3. Destination: the lowest-energy token of each selected cell. Sources are ranked by their
   cosine similarity to it and the most similar are merged until the budget is met (the least
   similar stay as they are), as in the co-authors' "cell PiToMe" matching. ``screen`` sets how
   many cells are candidates: the flattest cells holding ``screen`` times the budget, capped so
   that the roughest ``rough`` fraction of the cells (by their removable tokens) is never a
   candidate unless the budget needs it. At ``screen=1`` every candidate cell merges whole; at 2
   (default) flatness screens out the roughest cells and similarity picks the sources among the
   rest. Without the cap (``rough=0``) ``screen=2`` made every cell a candidate beyond a rate of
   3/8 (-40 % FLOPs needs about 0.46), and flatness protected nothing. The defaults were chosen
   on the tuning split (docs/bench_tuning/README.md).
4. Recovery: each source token takes its group's update back (``Plan.unmerge``).

``metric_dim=32`` computes energy and similarity on channels averaged in groups of 32 (a
ToMe-style head mean): on LiteMedSAM it halves the selection time (22 -> 10 ms) and lifts the
encoder speed-up from about 1.09x to 1.10x (before windows were packed in three size
classes), but over the 25 evaluation cases the prompt-aware
Dice drop at -40 % FLOPs grew from 0.83 to 1.01 points (at -30 %: 0.33 -> 0.09), so it is off
by default.

Prompt-aware mode merges the background harder: cells near the prompt region are made to look
less flat (``prompt_focus`` times the mean flatness, fading with the distance to the prompt box
over ``focus_scale`` of the grid side), so the budget goes to flat cells far from the object
first. Both defaults were chosen on the tuning split (docs/bench_tuning/README.md):
``prompt_focus`` 6 over 3 on its 480-lesion version (fidelity +0.12, +0.13, +0.31 points at
-25/-30/-40 % FLOPs, 57 prompts), ``focus_scale`` 0.3.

``rate`` is the fraction of the grid's tokens removed by the 2x2 cells, spent where the image
is flat: the budget is shared over the whole image rather than split evenly over windows, so a
window on an edge may merge nothing while a background window merges 3 of every 4 tokens. With
``coarse=1`` (default) a 4x4 block whose four cells were all chosen becomes one group, so wide
flat areas give up 15 of 16 tokens and the removed fraction exceeds ``rate``; compare methods
on measured FLOPs (``structsam.calibrate``), not on rates. ``coarse=0`` removes exactly
``rate`` (at most 3/4 of the unprotected tokens).
"""

from __future__ import annotations

import torch

from .energy import normalise, token_energy
from .grid import Grid

INF = float("inf")


def cell_flatness(energy: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, N) energy -> (B, n_cells) max energy per cell; +inf for cells that cannot merge."""
    b = energy.shape[0]
    cid = grid.cell_id.expand(b, -1)
    flat = torch.full((b, grid.n_cells), -INF, device=energy.device, dtype=energy.dtype)
    flat = flat.scatter_reduce(1, cid, energy, reduce="amax")
    return flat.masked_fill((grid.cell_count <= 1)[None], INF)


def cell_argmin(energy: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, N) energy -> (B, n_cells) token index of each cell's lowest-energy token."""
    b, n = energy.shape
    cid = grid.cell_id.expand(b, -1)
    low = torch.full((b, grid.n_cells), INF, device=energy.device, dtype=energy.dtype)
    low = low.scatter_reduce(1, cid, energy, reduce="amin")
    idx = torch.arange(n, device=energy.device).expand(b, -1)
    cand = torch.where(energy <= low.gather(1, cid), idx, n)  # ties go to the first token
    first = torch.full((b, grid.n_cells), n, device=energy.device, dtype=torch.long)
    return first.scatter_reduce(1, cid, cand, reduce="amin")


def select_cells(flatness: torch.Tensor, grid: Grid, budget: torch.Tensor) -> torch.Tensor:
    """Flattest cells first until ``budget`` (B,) tokens would be removed -> (B, n_cells) bool."""
    order = torch.argsort(flatness, dim=1, stable=True)
    gain = (grid.cell_count - 1).clamp(min=0).expand_as(flatness)
    gain = torch.where(torch.isfinite(flatness), gain, 0).gather(1, order)
    before = torch.cumsum(gain, 1) - gain
    chosen_sorted = (before < budget[:, None]) & (gain > 0)
    return torch.zeros_like(chosen_sorted).scatter(1, order, chosen_sorted)


def candidate_budget(flat, grid: Grid, budget, screen: float, rough: float) -> torch.Tensor:
    """(B,) tokens the candidate cells may remove: ``screen`` times the budget, but never so
    many that the roughest ``rough`` fraction of the mergeable tokens' cells is reached, unless
    the budget itself needs them. Without the cap, ``screen=2`` makes every cell a candidate
    once the rate passes 3/8 and nothing stays protected for being rough."""
    gain = (grid.cell_count - 1).clamp(min=0).to(flat.dtype)
    total = torch.where(torch.isfinite(flat), gain[None], 0).sum(1)
    cap = (1 - rough) * total
    return torch.maximum(budget.to(flat.dtype), torch.minimum(budget * screen, cap))


def _finite_mean(x: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(x)
    return torch.where(finite, x, 0).sum(1) / finite.sum(1).clamp(min=1)


def _proximity(protect: torch.Tensor, grid: Grid, scale: float) -> torch.Tensor:
    """(n_cells,) in (0, 1]: exp(-distance to the prompt region's box / (scale * grid side))."""
    rows = torch.nonzero(protect.any(1)).squeeze(1)
    cols = torch.nonzero(protect.any(0)).squeeze(1)
    y0, y1, x0, x1 = rows[0], rows[-1], cols[0], cols[-1]
    dy = torch.clamp(torch.maximum(y0 - grid.rows, grid.rows - y1), min=0).float()
    dx = torch.clamp(torch.maximum(x0 - grid.cols, grid.cols - x1), min=0).float()
    d = torch.sqrt(dx * dx + dy * dy)
    near = torch.exp(-d / (scale * max(grid.height, grid.width)))
    out = torch.zeros(grid.n_cells, device=protect.device)
    return out.scatter_reduce(0, grid.cell_id, near, reduce="amax")


def structsam_merge(
    feat: torch.Tensor,
    grid: Grid,
    rate: float,
    protect: torch.Tensor | None = None,
    *,
    energy: str = "dirichlet",
    prompt_focus: float = 6.0,
    focus_scale: float = 0.3,
    coarse: int = 1,
    metric_dim: int | None = None,
    screen: float = 2.0,
    rough: float = 0.05,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, C) features -> (dst (B, N), protected (B, N) bool). See the module docstring."""
    b = feat.shape[0]
    n = grid.n
    dev = feat.device
    c = feat.shape[-1]
    if metric_dim and c > metric_dim and c % metric_dim == 0:
        # ToMe-style head mean: energy and similarity on a few channels cost a fraction
        feat = feat.view(*feat.shape[:3], c // metric_dim, metric_dim).mean(3)
    fn = normalise(feat)
    e = token_energy(fn, energy, normalised=True).reshape(b, n)
    flat = cell_flatness(e, grid)
    if protect is not None:
        touched = torch.zeros(grid.n_cells, dtype=torch.bool, device=dev)
        touched[grid.cell_id[protect.reshape(-1)]] = True
        flat = flat.masked_fill(touched[None], INF)
        if prompt_focus > 0 and protect.any():
            flat = (
                flat
                + prompt_focus
                * _proximity(protect, grid, focus_scale)[None]
                * (_finite_mean(flat)[:, None])
            )
    budget = torch.full((b,), round(rate * n), device=dev)
    chosen = select_cells(flat, grid, candidate_budget(flat, grid, budget, screen, rough))
    cell_dst = cell_argmin(e, grid)  # (B, n_cells)

    idx = torch.arange(n, device=dev).expand(b, -1)
    cid = grid.cell_id.expand(b, -1)
    own_dst = cell_dst.gather(1, cid)
    is_src = chosen.gather(1, cid) & (own_dst != idx)

    # Rank sources by similarity to their destination; merge the most similar within budget.
    # LayerNorm'd rows have norm sqrt(C): the dot product over C is the cosine similarity
    f = fn.reshape(b * n, -1)
    # a row gather: 5.2 ms against 7.2 ms for gather() with an index expanded over channels
    # (16384 x 128 tokens, the first LiteMedSAM stage)
    offs = torch.arange(b, device=dev)[:, None] * n
    partner = f.index_select(0, (own_dst + offs).reshape(-1))
    sim = (f * partner).sum(-1).view(b, n) / f.shape[-1]
    sim = sim.masked_fill(~is_src, -INF)
    order = torch.argsort(sim, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, idx)
    merged = is_src & (rank < budget[:, None])
    dst = torch.where(merged, own_dst, idx)
    tok_chosen = chosen.gather(1, cid)
    # coarsening takes only cells whose every source merged (all of them when screen is 1)
    unmerged_src = torch.zeros(b, grid.n_cells, device=dev)
    unmerged_src = unmerged_src.scatter_reduce(1, cid, (is_src & ~merged).float(), reduce="amax")
    whole = (chosen & (unmerged_src < 0.5)).gather(1, cid)
    for level in range(1, int(coarse) + 1):
        dst = _coarsen(dst, whole, e, grid, grid.cell * 2**level)
    return dst, ~tok_chosen


def _coarsen(dst, tok_chosen, energy, grid: Grid, size: int):
    """Merge each size x size block whose 2x2 cells were all chosen into one group (its
    lowest-energy token): wide flat areas give up 15 of 16 tokens (4x4) instead of 3 of 4."""
    g4 = grid.with_cell(size)
    b = dst.shape[0]
    sid = g4.cell_id.expand(b, -1)
    whole = torch.ones(b, g4.n_cells, device=dst.device)
    whole = whole.scatter_reduce(1, sid, tok_chosen.float(), reduce="amin") > 0.5
    whole &= (g4.cell_count > (size // 2) ** 2)[None]
    sup_dst = cell_argmin(energy, g4).gather(1, sid)
    return torch.where(whole.gather(1, sid), sup_dst, dst)
