"""A merge plan: which tokens share one reduced token, and how to merge and recover them.

Every method in ``structsam.merge`` returns ``dst`` of shape (B, N): the token each token merges
into (itself when it is kept). ``Plan.from_dst`` turns that into flat index tensors, so merging is
one sparse averaging-matrix product (``index_add_`` under ``torch.compile``) and recovery is one
``index_select``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from .grid import Grid


@dataclass
class Plan:
    grid: Grid
    batch: int
    group: torch.Tensor  # (B*N,) reduced index of every token
    rep: torch.Tensor  # (M,) flat token index (b*N + pos) of each reduced token's representative
    size: torch.Tensor  # (M,) float, tokens per reduced token
    src: torch.Tensor  # (S,) flat index of every merged-away token
    src_group: torch.Tensor  # (S,) its reduced index
    protected: torch.Tensor | None = None  # (B, H, W) bool, tokens the method refused to merge
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dst(cls, dst: torch.Tensor, grid: Grid, protected: torch.Tensor | None = None):
        """Build from (B, N) destinations. A destination must itself be kept (dst[d] == d)."""
        b, n = dst.shape
        offs = torch.arange(b, device=dst.device)[:, None] * n
        flat_dst = (dst + offs).reshape(-1)
        kept = flat_dst == torch.arange(b * n, device=dst.device)
        rank = torch.cumsum(kept, 0) - 1
        group = rank[flat_dst]
        rep = torch.nonzero(kept).squeeze(1)
        size = torch.bincount(group, minlength=rep.numel()).to(torch.float32)
        src = torch.nonzero(~kept).squeeze(1)
        return cls(grid, b, group, rep, size, src, group[src], protected)

    def memo(self, name: str) -> dict:
        """A dict kept with this plan for values derived from it (e.g. a block family's
        position-bias indices), so callers never reach into ``_cache``."""
        return self._cache.setdefault(name, {})

    @property
    def n_tokens(self) -> int:
        return self.group.numel()

    @property
    def n_reduced(self) -> int:
        return self.rep.numel()

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (M, C): the mean of each group, accumulated in fp32."""
        c = x.shape[-1]
        flat = x.reshape(-1, c)
        if not self.src.numel():
            return flat.index_select(0, self.rep)
        if torch.compiler.is_compiling():  # sparse tensors do not trace
            out = flat.index_select(0, self.rep)
            out.index_add_(0, self.src_group, flat.index_select(0, self.src))
            return out.mul_(self.inv_size.to(x.dtype)[:, None])
        # one sparse (M, B*N) averaging matrix product: on LiteMedSAM's grids (4096-16384
        # tokens, 128-320 channels, 2 threads) 0.4-0.8 ms against 1.0-1.6 ms for gathering the
        # representatives and index_add_ of the merged-away tokens. MKL's sparse product is
        # fp32 only, so half-precision features are averaged in fp32 (and more exactly).
        return torch.sparse.mm(self.mean_matrix(), flat.float()).to(x.dtype)

    def mean_matrix(self) -> torch.Tensor:
        """(M, B*N) sparse CSR: row g averages the tokens of group g (cached)."""
        if "mean_matrix" not in self._cache:
            members = torch.argsort(self.group, stable=True)
            crow = torch.zeros(self.n_reduced + 1, dtype=torch.long, device=self.group.device)
            torch.cumsum(self.size.long(), 0, out=crow[1:])
            with warnings.catch_warnings():  # torch calls CSR support "beta" on every build
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
                self._cache["mean_matrix"] = torch.sparse_csr_tensor(
                    crow,
                    members,
                    self.inv_size[self.group[members]],
                    size=(self.n_reduced, self.n_tokens),
                    check_invariants=False,  # built sorted and in range here
                )
        return self._cache["mean_matrix"]

    @property
    def max_size(self) -> int:
        """Tokens in the largest group (one host sync, cached)."""
        if "max_size" not in self._cache:
            self._cache["max_size"] = int(self.size.max())
        return self._cache["max_size"]

    @property
    def inv_size(self) -> torch.Tensor:
        if "inv_size" not in self._cache:
            self._cache["inv_size"] = 1.0 / self.size
        return self._cache["inv_size"]

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(M, C) -> (B, N, C): every token takes its group's value (explicit recovery)."""
        return y.index_select(0, self.group).view(self.batch, self.grid.n, -1)

    def merge_map(self) -> torch.Tensor:
        """(B, H, W) reduced-token id of every token, numbered per image from 0."""
        g = self.group.view(self.batch, -1)
        first = g[:, :1]
        return (g - first).view(self.batch, self.grid.height, self.grid.width)

    def packing(self, one_pad_slot: bool = False) -> dict:
        """Per-window layout of the reduced tokens for windowed attention (cached).

        Keys: ``n_slots`` (window slots), ``query_index`` (M,) slot of every reduced token in a
        (B*n_windows*n_slots) buffer, ``key_valid`` (B*nW, n_slots) bool, ``pos`` (B*nW, n_slots)
        local position inside the window (padding slots included), ``log_size`` (B*nW, n_slots)
        and ``key_size`` (B*nW, n_slots) int32: tokens behind each slot (1 for padding, 0 empty).
        Padding tokens of the window layout follow the real tokens of their window as keys; their
        slots are flagged in ``pad_slot`` (B*nW, n_slots) bool.

        ``one_pad_slot``: a window's padding tokens share one key slot, at position
        ``win * win + t`` for the window's padding pattern ``t`` (``Grid.pad_patterns``). Padding
        keys are identical, so where the position bias is a fixed table per pattern (TinyViT)
        their sum is one key with bias logsumexp over the pattern (``tinyvit._pad_bias``).
        """
        key = ("packing", one_pad_slot)
        if key in self._cache:
            return self._cache[key]
        g = self.grid
        dev = self.rep.device
        rep_pos = self.rep % g.n
        rep_img = self.rep // g.n
        win = rep_img * g.n_windows + g.window_id[rep_pos]  # (M,)
        n_win_total = self.batch * g.n_windows
        counts = torch.bincount(win, minlength=n_win_total)
        # rep is sorted by flat token index; a stable sort by window keeps raster order inside.
        order = torch.argsort(win, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(win)
        slot[order] = torch.arange(win.numel(), device=dev) - starts[win[order]]

        if one_pad_slot:
            pattern = g.pad_patterns[0]
            pad_win = torch.nonzero(pattern >= 0).squeeze(1)
            pad_pos = g.win**2 + pattern[pad_win]
        else:
            pad_win, pad_pos = g.pad_local_pos
        pad_counts = torch.bincount(pad_win, minlength=g.n_windows).repeat(self.batch)
        n_slots = int((counts + pad_counts).max())
        query_index = win * n_slots + slot

        pos = torch.zeros(n_win_total * n_slots, dtype=torch.long, device=dev)
        pos[query_index] = g.local_pos[rep_pos]
        valid = torch.zeros(n_win_total * n_slots, dtype=torch.bool, device=dev)
        valid[query_index] = True
        key_size = torch.zeros(n_win_total * n_slots, dtype=torch.int32, device=dev)
        key_size[query_index] = self.size.to(torch.int32)
        pad_slot = torch.zeros(n_win_total * n_slots, dtype=torch.bool, device=dev)
        if pad_win.numel():
            # padding keys go after the window's real tokens
            pw = (torch.arange(self.batch, device=dev)[:, None] * g.n_windows + pad_win).reshape(-1)
            pp = pad_pos.repeat(self.batch)
            order_p = torch.argsort(pw, stable=True)
            pw, pp = pw[order_p], pp[order_p]
            pstart = torch.cumsum(pad_counts, 0) - pad_counts
            pslot = counts[pw] + torch.arange(pw.numel(), device=dev) - pstart[pw]
            pidx = pw * n_slots + pslot
            pos[pidx] = pp
            valid[pidx] = True
            pad_slot[pidx] = True
            key_size[pidx] = 1
        shape = (n_win_total, n_slots)
        log_size = key_size.clamp(min=1).float().log()  # 0 for padding and empty slots
        self._cache[key] = {
            "n_slots": n_slots,
            "query_index": query_index,
            "key_valid": valid.view(shape),
            "pos": pos.view(shape),
            "log_size": log_size.view(shape),
            "key_size": key_size.view(shape),
            "pad_slot": pad_slot.view(shape),
            "has_pad": bool(pad_win.numel()),
            "win": win,
            "slot": slot,
            "window_fill": counts + pad_counts,
        }
        return self._cache[key]

    def buckets(self, one_pad_slot: bool = False) -> dict:
        """Windows split in up to three size classes for attention (cached).

        Padding every window to the fullest one wastes most of the attention when flat windows
        keep a few tokens and windows on edges keep all: windows sorted by fill are cut where
        the padded cost, sum over classes of windows * slots^2, is least. Returns ``rows``
        (total rows), ``query_index`` (M,) row of each reduced token, ``pad_rows``,
        ``row_source`` (rows,) reduced token of each row (0 where none) and ``parts``: per
        class (row offset, windows, slots, pos (n, S), key_bias (n, 1, 1, S), key_size (n, S)
        int: tokens behind each key slot, 1 for padding, 0 for empty slots).
        ``one_pad_slot`` as in :meth:`packing`.
        """
        key = ("buckets", one_pad_slot)
        if key in self._cache:
            return self._cache[key]
        pk = self.packing(one_pad_slot)
        dev = self.rep.device
        fill = pk["window_fill"]
        n_win = fill.numel()
        order = torch.argsort(fill, stable=True)
        sizes = fill[order]
        # three classes: try every pair of cuts i < j at once (W x W costs, no loops)
        sq = sizes.double() ** 2
        cut = torch.arange(1, n_win + 1, device=dev)
        i, j = cut[:, None], cut[None, :]
        cost = i * sq[i - 1] + (j - i) * sq[j - 1] + (n_win - j) * sq[-1]
        cost = cost.masked_fill(j < i, float("inf"))
        best = int(torch.argmin(cost))
        i, j = best // n_win + 1, best % n_win + 1
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n_win, device=dev)
        bounds = [(0, i), (i, j), (j, n_win)]
        classes = [(a, b - a, int(sizes[b - 1])) for a, b in bounds if b > a]
        offset = torch.zeros(n_win, dtype=torch.long, device=dev)
        row, parts = 0, []
        for first, count, slots in classes:
            members = (rank >= first) & (rank < first + count)
            offset[members] = row + (rank[members] - first) * slots
            wins = order[first : first + count]
            base = pk["pos"][wins, :slots]
            valid = pk["key_valid"][wins, :slots]
            kb = pk["log_size"][wins, :slots].masked_fill(~valid, float("-inf"))
            parts.append(
                {
                    "row": row,
                    "windows": count,
                    "slots": slots,
                    "pos": base,
                    "key_bias": kb[:, None, None, :],
                    "key_size": pk["key_size"][wins, :slots],
                    "index": {},
                }
            )
            row += count * slots
        n_slots = pk["n_slots"]
        pad_flat = torch.nonzero(pk["pad_slot"].reshape(-1)).squeeze(1)
        pad_rows = offset[pad_flat // n_slots] + pad_flat % n_slots
        query_index = offset[pk["win"]] + pk["slot"]
        # the reduced token in each row; 0 for padding and empty rows (see reduced_attention)
        row_source = torch.zeros(row, dtype=torch.long, device=dev)
        row_source[query_index] = torch.arange(query_index.numel(), device=dev)
        self._cache[key] = {
            "rows": row,
            "query_index": query_index,
            "pad_rows": pad_rows,
            "row_source": row_source,
            "parts": parts,
        }
        return self._cache[key]

    def full_query_index(self) -> torch.Tensor:
        """(B*N,) slot of every token in a dense (B*n_windows*win*win) window layout (cached)."""
        if "full_query_index" not in self._cache:
            g = self.grid
            img = torch.arange(self.batch, device=self.rep.device)[:, None] * g.n_windows
            win = (img + g.window_id[None]).reshape(-1)
            self._cache["full_query_index"] = win * g.win**2 + g.local_pos.repeat(self.batch)
        return self._cache["full_query_index"]

    def full_query_pos(self) -> torch.Tensor:
        """(W, win*win) window position of every query slot of the dense window layout."""
        n_win = self.batch * self.grid.n_windows
        return torch.arange(self.grid.win**2, device=self.rep.device).expand(n_win, -1)

    def key_bias(self) -> torch.Tensor:
        """(W, 1, 1, S) log group size for real keys, -inf for empty slots (cached)."""
        if "key_bias" not in self._cache:
            pk = self.packing()
            kb = pk["log_size"].masked_fill(~pk["key_valid"], float("-inf"))
            self._cache["key_bias"] = kb[:, None, None, :]
        return self._cache["key_bias"]
