"""ToMe: bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023;
``facebookresearch/ToMe``, ``tome/merge.py``), adapted to SAM's windowed and global blocks.

The rule: the token sequence is split by alternating index into A (even) and B (odd); every A
token finds its most similar B token (cosine similarity of a metric); the ``r`` A tokens whose
best edge is the most similar merge into that B token, all others stay. A B token may receive
several A tokens; no B token merges, so a group is one B token plus the A tokens it drew.

Adaptation to SAM (single images, merge -> compute -> unmerge):

- Metric: ToMe uses the attention keys averaged over heads. Methods here see the block input
  only, so the metric is the block input after a LayerNorm without affine (``energy.normalise``),
  compared by cosine similarity.
- Windows: in a windowed block a group must stay inside one attention window, so the alternating
  split and the matching run per window: A and B are the even and odd positions in the raster
  order of the window's real tokens (the window's own sequence, as windowed attention sees it),
  and an A token only looks for B tokens of its window. A global block is one window holding the
  whole grid, so there the split is the image's raster order (column stripes for an even width)
  and the matching is image-wide, as in ToMe.
- Count: ``r = round(rate * N)`` edges are taken image-wide by similarity (a window of
  near-duplicates gives up more than a busy one), at most ``N // 2`` in one round, ToMe's own
  cap per block. ToMe merges ``r`` tokens in every block, so over a stage of several blocks the
  tokens shrink geometrically; the engine assigns once per stage, so a rate above 1/2 runs a
  second round on the tokens the first round kept (``max_rate`` 0.75), as a second ToMe block
  would. With one round, prompt-aware ToMe cut at most 38.7 % of LiteMedSAM's FLOPs, short of
  -40 %. Windows with an odd number of tokens give A one token more than B; a window of one
  token column has no B and merges nothing.
- Prompt protection: tokens the engine protects take no part in the matching (an edge to one
  would be undone by the engine and its budget lost).
- Merging is the engine's size-weighted mean with proportional attention (as ToMe's
  ``merge_wavg``), and every merged token takes its group's update back (unmerge, as in the SAM
  port ``tome_sam``).

The helpers below (``pack``, ``best_match``, ``top_r``, ``bipartite``) are shared by the other
baselines: they lay tokens out per window (or any other bucket) in padded (groups, slots)
tensors, so nothing loops over windows or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .energy import normalise
from .grid import Grid

INF = float("inf")
MAX_RATE = 0.75  # two rounds: half the tokens, then half of the rest


def unit_metric(feat: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) block input -> (B, N, C) LayerNorm'd features scaled to unit length.

    A token whose channels are all equal normalises to the zero vector (similarity 0 to all).
    """
    b, h, w, c = feat.shape
    return F.normalize(normalise(feat.float()).reshape(b, h * w, c), dim=-1)


def keep_all(feat: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """The identity assignment: every token its own destination, nothing protected."""
    b = feat.shape[0]
    idx = torch.arange(grid.n, device=feat.device).expand(b, -1).clone()
    return idx, torch.zeros(b, grid.n, dtype=torch.bool, device=feat.device)


@dataclass
class Packed:
    """Masked tokens laid out per (image, bucket) in padded rows.

    ``table`` (G, K): flat token index (b * N + pos) of each slot, G = B * n_buckets;
    ``valid`` (G, K): real slots; ``tokens`` (M,): flat index of every masked token;
    ``where`` (M,): its slot in the flattened (G * K) layout; ``rank`` (M,): its slot in its row.
    """

    table: torch.Tensor
    valid: torch.Tensor
    tokens: torch.Tensor
    where: torch.Tensor
    rank: torch.Tensor

    def token_rank(self, batch: int, n: int) -> torch.Tensor:
        """(B, N) rank of each masked token inside its bucket, -1 for the others."""
        out = torch.full((batch * n,), -1, dtype=torch.long, device=self.table.device)
        out[self.tokens] = self.rank
        return out.view(batch, n)


def pack(
    bucket: torch.Tensor,
    mask: torch.Tensor,
    n_buckets: int,
    order: torch.Tensor | None = None,
) -> Packed:
    """Lay out the tokens of ``mask`` (B, N) per bucket (``bucket`` (N,) or (B, N) in
    [0, n_buckets)). Inside a bucket tokens follow ``order`` (B, N) ascending, ties and the
    default in raster order."""
    b, n = mask.shape
    dev = mask.device
    bucket = bucket.expand(b, n)
    key = (torch.arange(b, device=dev)[:, None] * n_buckets + bucket).reshape(-1)
    tokens = torch.nonzero(mask.reshape(-1)).squeeze(1)
    if order is not None:
        tokens = tokens[torch.argsort(order.reshape(-1)[tokens], stable=True)]
    k = key[tokens]
    perm = torch.argsort(k, stable=True)
    tokens, k = tokens[perm], k[perm]
    n_groups = b * n_buckets
    counts = torch.bincount(k, minlength=n_groups)
    width = max(int(counts.max()) if tokens.numel() else 0, 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(tokens.numel(), device=dev) - starts[k]
    where = k * width + rank
    table = torch.zeros(n_groups * width, dtype=torch.long, device=dev)
    table[where] = tokens
    valid = torch.zeros(n_groups * width, dtype=torch.bool, device=dev)
    valid[where] = True
    return Packed(table.view(n_groups, width), valid.view(n_groups, width), tokens, where, rank)


def best_match(
    metric: torch.Tensor,
    bucket: torch.Tensor,
    n_buckets: int,
    src: torch.Tensor,
    dst: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each ``src`` token's most similar ``dst`` token of the same bucket.

    ``metric`` (B, N, C) unit vectors; ``src``, ``dst`` (B, N) bool, disjoint. Returns
    ``sim`` (B, N): the best cosine similarity, -inf for non-sources and for sources whose bucket
    holds no destination; ``target`` (B, N): the best destination's position (meaningful only
    where ``sim`` is finite; the token itself for non-sources).
    """
    b, n, c = metric.shape
    ps = pack(bucket, src, n_buckets)
    pd = pack(bucket, dst, n_buckets)
    flat = metric.reshape(b * n, c)
    sim = torch.bmm(flat[ps.table], flat[pd.table].transpose(1, 2))  # (G, Ks, Kd)
    sim.masked_fill_(~pd.valid[:, None, :], -INF)
    best, arg = sim.max(dim=-1)
    target = pd.table.gather(1, arg)
    out_sim = torch.full((b * n,), -INF, device=metric.device, dtype=sim.dtype)
    out_sim[ps.tokens] = best.reshape(-1)[ps.where]
    out_tgt = torch.arange(b * n, device=metric.device)
    out_tgt[ps.tokens] = target.reshape(-1)[ps.where]
    return out_sim.view(b, n), (out_tgt % n).view(b, n)


def top_r(score: torch.Tensor, r: int) -> torch.Tensor:
    """(B, N) bool: the ``r`` highest finite scores of each row (ties in raster order)."""
    b, n = score.shape
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    idx = torch.arange(n, device=score.device).expand(b, -1)
    rank = torch.empty_like(order).scatter_(1, order, idx)
    return (rank < r) & torch.isfinite(score)


def bipartite(
    metric: torch.Tensor,
    grid: Grid,
    cand: torch.Tensor,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's alternating split of the ``cand`` (B, N) tokens inside each window.

    Candidates are ranked per window (raster order, or ``order`` ascending); even ranks form A,
    odd ranks B. Returns (``sim``, ``target``) of every A token's best B token in its window
    (see ``best_match``) and the A mask.
    """
    b, n = cand.shape
    rank = pack(grid.window_id, cand, grid.n_windows, order).token_rank(b, n)
    a = cand & (rank % 2 == 0)
    bb = cand & (rank % 2 == 1)
    sim, target = best_match(metric, grid.window_id, grid.n_windows, a, bb)
    return sim, target, a


def tome_merge(
    feat: torch.Tensor,
    grid: Grid,
    rate: float,
    protect: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, C) features -> (dst (B, N), protected (B, N) all False). See the module
    docstring; ``generator`` is unused (ToMe is not random). ``protect`` (H, W): tokens
    the engine will keep apart; they take no part in the matching, so no edge is spent on them
    (the engine would undo it)."""
    idx, none = keep_all(feat, grid)
    r = min(round(rate * grid.n), round(MAX_RATE * grid.n))
    if r <= 0:
        return idx, none
    metric = unit_metric(feat)
    alive = torch.ones_like(none) if protect is None else ~protect.reshape(1, -1).expand_as(none)
    first = min(r, grid.n // 2)
    dst = _round(metric, grid, idx, alive, first)
    if r > first:  # a second block's worth of ToMe on the tokens the first round kept
        dst2 = _round(metric, grid, idx, alive & (dst == idx), r - first)
        dst = dst2.gather(1, dst)  # groups whose destination merged again follow it
    return dst, none


def _round(metric, grid: Grid, idx, alive, r: int):
    """One ToMe merge of ``r`` edges among the ``alive`` tokens."""
    sim, target, _ = bipartite(metric, grid, alive)
    return torch.where(top_r(sim, r), target, idx)
