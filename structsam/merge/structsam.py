"""StructSAM: energy-guided, flatness-screened token merging (the paper's method).

1. Energy: first-order spatial gradients (Sobel) of the normalised features on the token grid.
2. Flatness screening: the grid is cut into 2x2 cells inside attention windows; a cell's flatness
   is its *maximum* energy, so one edge token protects its whole cell. Only the flattest cells
   are merged; every token of another cell is protected (boundaries), and so is every cell
   touching a prompt region in prompt-aware mode.
3. Destination: the lowest-energy token of each selected cell. Sources are ranked by their
   cosine similarity to it and the most similar are merged until the budget is met (the least
   similar stay as they are), as in the co-authors' "cell PiToMe" matching.
4. Recovery: each source token takes its group's update back (``Plan.unmerge``).

``rate`` is the fraction of the grid's tokens removed, but it is spent where the image is flat:
the budget is shared over the whole image rather than split evenly over windows, so a window
on an edge may merge nothing while a background window merges 3 of every 4 tokens. The most
that can be removed is 3/4 of the unprotected tokens.
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


def structsam_merge(
    feat: torch.Tensor,
    grid: Grid,
    rate: float,
    protect: torch.Tensor | None = None,
    *,
    energy: str = "sobel",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, C) features -> (dst (B, N), protected (B, N) bool). See the module docstring."""
    b = feat.shape[0]
    n = grid.n
    dev = feat.device
    fn = normalise(feat)
    e = token_energy(fn, energy, normalised=True).reshape(b, n)
    flat = cell_flatness(e, grid)
    if protect is not None:
        touched = torch.zeros(grid.n_cells, dtype=torch.bool, device=dev)
        touched[grid.cell_id[protect.reshape(-1)]] = True
        flat = flat.masked_fill(touched[None], INF)
    budget = torch.full((b,), round(rate * n), device=dev)
    chosen = select_cells(flat, grid, budget)  # (B, n_cells)
    cell_dst = cell_argmin(e, grid)  # (B, n_cells)

    idx = torch.arange(n, device=dev).expand(b, -1)
    cid = grid.cell_id.expand(b, -1)
    own_dst = cell_dst.gather(1, cid)
    is_src = chosen.gather(1, cid) & (own_dst != idx)

    # Rank sources by similarity to their destination; merge the most similar within budget.
    # LayerNorm'd rows have norm sqrt(C): the dot product over C is the cosine similarity
    f = fn.reshape(b, n, -1)
    sim = (f * f.gather(1, own_dst[..., None].expand_as(f))).sum(-1) / f.shape[-1]
    sim = sim.masked_fill(~is_src, -INF)
    order = torch.argsort(sim, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, idx)
    merged = is_src & (rank < budget[:, None])
    dst = torch.where(merged, own_dst, idx)
    protected = ~chosen.gather(1, cid)
    return dst, protected
