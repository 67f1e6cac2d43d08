"""StructSAM: structure-aware token merging with recovery (the paper's method, as tuned here).

1. Energy: first-order spatial differences of the normalised features on the token grid: each
   token's squared differences to its four neighbours (``energy="dirichlet"``, its share of the
   grid graph's Dirichlet energy). It picks each coarse group's representative, and drives the
   optional flatness screen below. Sobel (``"sobel"``, central differences) is blind to a
   one-token peak, which is what a small lesion is at LiteMedSAM's 16 x 16 stages.
2. Cells and destinations: the grid is cut into 2x2 cells inside attention windows; each cell
   has one destination, drawn at random from the engine's seeded generator
   (``destination="random"``, as ToMeSD draws it; ``"energy"``: the cell's lowest-energy
   token). Every other token of a cell is a source.
3. Matching: each source takes the most similar destination (cosine, on the normalised
   features) among the four cells its 3x3 neighbourhood touches, in its own window
   (``match="neighbours"``; ``"cell"``: its own cell's only). Sources are ranked by that
   similarity and the most similar merge until the budget is met. In prompt-aware mode the
   cells touching the prompt region are protected (never a source, never a destination) and
   the similarity of a source near the prompt is lowered by ``prompt_focus`` times
   exp(-distance to the prompt box / (``focus_scale`` x grid side)), so the budget goes to far
   background first.
4. Coarsening (``coarse=1``): a 4x4 block whose four cells each merged whole into their own
   destination becomes one group, represented by its lowest-energy token: wide flat areas
   give up 15 of 16 tokens. (A cell whose sources went to the cells beside it may straddle an
   edge; coarsening it too merged across the edge and raised the spectral distortion per
   window from 0.57 to 6.2 on two test images at -30 % FLOPs.)
5. Recovery: each source token takes its group's update back (``Plan.unmerge``).

The defaults were chosen on the tuning split (docs/bench_tuning/README.md, "Matching among
neighbours"; 57 well-posed box prompts, fidelity at equal compute per prompt, three seeds of
each randomized method): content-only +0.36 +- 0.21, +0.11 +- 0.24 and -0.41 +- 0.41 points
against ToMeSD at -25/-30/-40 % FLOPs, prompt-aware +1.77 +- 0.35, +2.08 +- 0.44 and
+2.13 +- 0.47, where the earlier rule (a flatness screen holding twice the budget, each source
merging into its own cell's lowest-energy token) was 1.1 and 0.8 points below this one at
-25/-30 % content-only (1.0 above at -40 %, on the 29 prompts it reached) and 1.1, 1.2 and
1.9 points below prompt-aware. Lowest-energy destinations and a
fixed lattice of destinations each cost about 1.1 points at -30 %, a soft flatness penalty on
the similarity 0.5-1.1. The earlier screen is still there: ``screen`` makes only the flattest
cells (those holding ``screen`` times the budget) candidates, and ``rough`` keeps the roughest
fraction of the cells out of reach.

``rate`` is the fraction of the grid's tokens removed by the 2x2 cells, image-wide; coarsening
removes more, so compare methods on measured FLOPs (``structsam.calibrate``), not on rates.
``metric_dim`` computes energy and similarity on channels averaged in groups of that many (a
ToMe-style head mean); off by default (it cost 0.2 points of prompt-aware Dice at -40 %).
"""

from __future__ import annotations

import torch

from .energy import normalise, token_energy
from .grid import Grid
from .tomesd import random_cell_dst

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


def random_cells_dst(grid: Grid, batch: int, generator, device) -> torch.Tensor:
    """(B, n_cells) one token per cell drawn at random (ToMeSD's draw, shared by the batch)."""
    n = grid.n
    is_dst = random_cell_dst(grid, generator, device=device)
    token = torch.where(is_dst, torch.arange(n, device=device), n)
    dst = torch.full((grid.n_cells,), n, device=device, dtype=torch.long)
    return dst.scatter_reduce(0, grid.cell_id, token, reduce="amin").expand(batch, -1)


def select_cells(flatness: torch.Tensor, grid: Grid, budget: torch.Tensor) -> torch.Tensor:
    """Flattest cells first until ``budget`` (B,) tokens would be removed -> (B, n_cells) bool."""
    order = torch.argsort(flatness, dim=1, stable=True)
    gain = (grid.cell_count - 1).clamp(min=0).expand_as(flatness)
    gain = torch.where(torch.isfinite(flatness), gain, 0).gather(1, order)
    before = torch.cumsum(gain, 1) - gain
    chosen_sorted = (before < budget[:, None]) & (gain > 0)
    return torch.zeros_like(chosen_sorted).scatter(1, order, chosen_sorted)


def candidate_budget(flat, grid: Grid, budget, screen: float | None, rough: float):
    """(B,) tokens the candidate cells may remove: ``screen`` times the budget (every cell when
    None), but never so many that the roughest ``rough`` fraction of the mergeable tokens'
    cells is reached, unless the budget itself needs them."""
    gain = (grid.cell_count - 1).clamp(min=0).to(flat.dtype)
    total = torch.where(torch.isfinite(flat), gain[None], 0).sum(1)
    cap = (1 - rough) * total
    wide = cap if screen is None else torch.minimum(budget * screen, cap)
    return torch.maximum(budget.to(flat.dtype), wide)


def _proximity(protect: torch.Tensor, grid: Grid, scale: float) -> torch.Tensor:
    """(N,) in (0, 1]: exp(-distance to the prompt region's box / (scale * grid side)), the
    largest in each token's cell."""
    rows = torch.nonzero(protect.any(1)).squeeze(1)
    cols = torch.nonzero(protect.any(0)).squeeze(1)
    y0, y1, x0, x1 = rows[0], rows[-1], cols[0], cols[-1]
    dy = torch.clamp(torch.maximum(y0 - grid.rows, grid.rows - y1), min=0).float()
    dx = torch.clamp(torch.maximum(x0 - grid.cols, grid.cols - x1), min=0).float()
    near = torch.exp(-torch.sqrt(dx * dx + dy * dy) / (scale * max(grid.height, grid.width)))
    cell = torch.zeros(grid.n_cells, device=protect.device)
    cell = cell.scatter_reduce(0, grid.cell_id, near, reduce="amax")
    return cell[grid.cell_id]


def neighbour_match(f, cell_dst, chosen, grid: Grid):
    """Each token's most similar destination among the chosen cells its 3x3 neighbourhood
    touches: its own cell and the cells beside, above or below and diagonal to it on the side
    of the cell it sits on (2x2 cells: exactly those four), in its own window.

    ``f`` (B, N, C) normalised features, ``cell_dst`` (B, n_cells), ``chosen`` (B, n_cells).
    Returns (destination (B, N), similarity (B, N)); -inf where no chosen cell is in reach.
    """
    b, n, c = f.shape
    rows_of = f.reshape(b * n, c)  # one row per token of the batch
    offs = torch.arange(b, device=f.device)[:, None] * n
    best_sim = torch.full((b, n), -INF, device=f.device, dtype=f.dtype)
    best_dst = torch.arange(n, device=f.device).expand(b, -1).clone()
    # geometry kept with the grid (the engine keeps its grids across forwards)
    for cell, inside in zip(*grid.neighbour_cells, strict=True):
        cell = cell.expand(b, -1)
        ok = inside[None] & chosen.gather(1, cell)
        cand = cell_dst.gather(1, cell)
        partner = rows_of.index_select(0, (cand + offs).reshape(-1)).view(b, n, c)
        # LayerNorm'd rows have norm sqrt(C): the dot product over C is the cosine similarity
        sim = (f * partner).sum(-1).div_(c).masked_fill_(~ok, -INF)
        better = sim > best_sim
        best_sim = torch.where(better, sim, best_sim)
        best_dst = torch.where(better, cand, best_dst)
    return best_dst, best_sim


def structsam_merge(
    feat: torch.Tensor,
    grid: Grid,
    rate: float,
    protect: torch.Tensor | None = None,
    *,
    energy: str = "dirichlet",
    match: str = "neighbours",
    destination: str = "random",
    prompt_focus: float = 0.2,
    focus_scale: float = 0.3,
    coarse: int = 1,
    metric_dim: int | None = None,
    screen: float | None = None,
    rough: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, C) features -> (dst (B, N), protected (B, N) bool). See the module docstring."""
    if match not in ("neighbours", "cell") or destination not in ("random", "energy"):
        raise ValueError(
            f"structsam: match={match!r} (neighbours, cell), destination={destination!r} "
            "(random, energy)"
        )
    b, n, dev = feat.shape[0], grid.n, feat.device
    c = feat.shape[-1]
    if metric_dim and c > metric_dim and c % metric_dim == 0:
        # ToMe-style head mean: energy and similarity on a few channels cost a fraction
        feat = feat.view(*feat.shape[:3], c // metric_dim, metric_dim).mean(3)
    fn = normalise(feat)
    e = token_energy(fn, energy, normalised=True).reshape(b, n)
    flat = cell_flatness(e, grid)
    near = None
    if protect is not None and protect.any():
        touched = torch.zeros(grid.n_cells, dtype=torch.bool, device=dev)
        touched[grid.cell_id[protect.reshape(-1)]] = True
        flat = flat.masked_fill(touched[None], INF)
        if prompt_focus > 0:
            near = prompt_focus * _proximity(protect, grid, focus_scale)
    budget = torch.full((b,), round(rate * n), device=dev)
    if screen is None and rough <= 0:
        chosen = torch.isfinite(flat)  # no flatness screen: every cell that can merge
    else:
        chosen = select_cells(flat, grid, candidate_budget(flat, grid, budget, screen, rough))
    if destination == "random":
        cell_dst = random_cells_dst(grid, b, generator, dev)
    else:
        cell_dst = cell_argmin(e, grid)
    dst = _merge_sources(fn.reshape(b, n, -1), cell_dst, chosen, grid, budget, match, near)
    whole = _whole_cells(dst, cell_dst, chosen, grid)
    for level in range(1, int(coarse) + 1):
        dst = _coarsen(dst, whole, e, grid, grid.cell * 2**level)
    # a source's destination may have joined a coarse group: follow it there
    return dst.gather(1, dst), ~chosen.gather(1, grid.cell_id.expand(b, -1))


def _merge_sources(f, cell_dst, chosen, grid: Grid, budget, match: str, near):
    """(B, N) destination of every token: the ``budget`` most similar sources merge (their
    similarity lowered by ``prompt_focus`` near the prompt), every other token keeps itself."""
    b, n, c = f.shape
    idx = torch.arange(n, device=f.device).expand(b, -1)
    cid = grid.cell_id.expand(b, -1)
    own = cell_dst.gather(1, cid)
    is_src = chosen.gather(1, cid) & (own != idx)
    if match == "neighbours":
        target, sim = neighbour_match(f, cell_dst, chosen, grid)
    else:
        # a row gather: 5.2 ms against 7.2 ms for gather() with an index expanded over
        # channels (16384 x 128 tokens, the first LiteMedSAM stage)
        offs = torch.arange(b, device=f.device)[:, None] * n
        partner = f.reshape(b * n, c).index_select(0, (own + offs).reshape(-1)).view(b, n, c)
        target, sim = own, (f * partner).sum(-1) / c
    if near is not None:  # the prompt focus: far background first
        sim = sim - near[None]
    sim = sim.masked_fill(~is_src, -INF)
    order = torch.argsort(sim, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, idx)
    return torch.where(is_src & (rank < budget[:, None]), target, idx)


def _whole_cells(dst, cell_dst, chosen, grid: Grid) -> torch.Tensor:
    """(B, N) bool: the token's cell was chosen and every one of its sources merged into the
    cell's own destination, so the cell is one group (a source that went to a neighbouring
    cell may sit across an edge from the rest of its cell)."""
    b, n = dst.shape
    idx = torch.arange(n, device=dst.device).expand(b, -1)
    cid = grid.cell_id.expand(b, -1)
    own = cell_dst.gather(1, cid)
    left = (own != idx) & (dst != own)  # a source that stayed, or went to another cell
    stayed = torch.zeros(b, grid.n_cells, device=dst.device)
    stayed = stayed.scatter_reduce(1, cid, left.float(), reduce="amax")
    return (chosen & (stayed < 0.5)).gather(1, cid)


def _coarsen(dst, whole, energy, grid: Grid, size: int):
    """Merge each size x size block whose 2x2 cells all merged whole into one group (its
    lowest-energy token): wide flat areas give up 15 of 16 tokens (4x4) instead of 3 of 4."""
    g4 = grid.with_cell(size)
    b = dst.shape[0]
    sid = g4.cell_id.expand(b, -1)
    block = torch.ones(b, g4.n_cells, device=dst.device)
    block = block.scatter_reduce(1, sid, whole.float(), reduce="amin") > 0.5
    block &= (g4.cell_count > (size // 2) ** 2)[None]
    sup_dst = cell_argmin(energy, g4).gather(1, sid)
    return torch.where(block.gather(1, sid), sup_dst, dst)
