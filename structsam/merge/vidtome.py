"""VidToMe: video token merging (Li et al., CVPR 2024; ``lixirui142/VidToMe``,
``vidtome/merge.py::bipartite_soft_matching_randframe``), adapted to single images in SAM.

The rule (local merging): the tokens of F video frames are matched frame group by frame group;
in each group of ``target_stride`` (4) consecutive frames one frame, drawn at random, is the
destination frame and all its tokens are destinations; the tokens of the other frames are
sources. Each source finds its most similar destination-frame token (cosine similarity) and the
most similar sources merge into them.

Adaptation to a single image (how StructSAM's authors ran it is not known):

- Frames are horizontal strips. A group must stay inside one attention window, so a "frame" is
  a strip of a window: each window (a global block: the whole grid) is cut into ``frames`` (4)
  strips of equal height (rows ``r * frames // height`` of the window's real rows; strips are
  one row thinner or thicker when the height is not a multiple of ``frames``), and consecutive
  strips form groups of ``stride`` (4), so by default each window is one group of 4 frames with
  one random destination strip. A source only matches destinations of its own group and window.
- The destination strips come from the engine's seeded generator, one draw per (window, group),
  shared by the images of a batch.
- Count: ``r = round(rate * N)`` sources with the best matches image-wide (VidToMe merges
  ``local_merge_ratio`` of each group's sources); at most all sources: ``max_rate`` is 0.75 (3 of
  4 strips). Where a window's height is not a multiple of 4 the destination strip can be the
  thicker one and fewer sources are left (SAM ViT's 14-row windows: 10 or 11 of 14 rows).
- Not adapted: VidToMe's recursive merging over larger frame sets (8 -> 2 -> 1; here a window
  holds one group) and its global tokens carried across video chunks (a single image has no
  earlier chunk). Merging is the engine's size-weighted mean (VidToMe also offers "replace"),
  then unmerge as in VidToMe.
- Metric: the block input after a LayerNorm without affine, compared by cosine similarity.
"""

from __future__ import annotations

import torch

from .grid import Grid
from .tome import best_match, keep_all, top_r, unit_metric


def strips(grid: Grid, frames: int = 4) -> torch.Tensor:
    """(N,) strip ("frame") index of each token inside its window, in [0, frames)."""
    wy = grid.rows // grid.win
    height = torch.clamp(grid.height - wy * grid.win, max=grid.win)  # the window's real rows
    return (grid.rows - wy * grid.win) * frames // height


def dst_frames(
    grid: Grid,
    frames: int = 4,
    stride: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) bool destination mask and (N,) matching bucket (window, frame group) of each token."""
    dev = grid.rows.device
    frame = strips(grid, frames)
    n_groups = -(-frames // stride)
    group = frame // stride
    bucket = grid.window_id * n_groups + group
    draw = torch.rand(grid.n_windows * n_groups, generator=generator, device=dev)
    first = torch.arange(n_groups, device=dev) * stride
    length = torch.clamp(frames - first, max=stride)
    pick = first + (draw.view(-1, n_groups) * length).long().clamp(max=stride - 1)
    return frame == pick.reshape(-1)[bucket], bucket


def vidtome_merge(
    feat: torch.Tensor,
    grid: Grid,
    rate: float,
    protect: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    frames: int = 4,
    stride: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, C) features -> (dst (B, N), protected (B, N) all False). See the module
    docstring; ``protect`` is unused."""
    idx, none = keep_all(feat, grid)
    r = round(rate * grid.n)
    if r <= 0:
        return idx, none
    b = feat.shape[0]
    is_dst, bucket = dst_frames(grid, frames, stride, generator)
    is_dst = is_dst.to(feat.device).expand(b, -1)
    n_buckets = grid.n_windows * -(-frames // stride)
    metric = unit_metric(feat)
    sim, target = best_match(metric, bucket.to(feat.device), n_buckets, ~is_dst, is_dst)
    merged = top_r(sim, r)
    return torch.where(merged, target, idx), none
