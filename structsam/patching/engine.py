"""The merge -> compute -> unmerge engine shared by every encoder family.

A ``MergeState`` lives on the patched image encoder. At each encoder forward it forgets the old
plans; the first merged block of a stage asks the method for an assignment on that block's input
and every later block of the stage reuses it (selection once per stage keeps its cost far below
what merging saves). Blocks run their attention and MLP on the reduced tokens and add each
group's update back to every member token, so the output keeps its full grid.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ..errors import MergeError
from ..identity import canonical
from ..merge import Grid, MethodInfo, Plan, prompt_mask
from .kernels import explicit_attention, explicit_pays

# Logit of an empty key slot: exp() of it is 0 in every float type, and unlike -inf it stays
# finite in a matmul (0 * -inf would be NaN).
MASKED_LOGIT = -30000.0


@torch.library.custom_op("structsam::attention", mutates_args=())
def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    head_dim: int,
    tokens: int = -1,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` of (n, heads, S, d) inputs, returned as (n, S, heads,
    dv), contiguous: the fused CPU kernel writes that layout, so the reshape back to tokens is
    free, and torch.compile takes a custom op's output to be contiguous. Short windows run as
    explicit products where those are faster on this device (``kernels.explicit_pays``). FLOPs
    count ``head_dim`` wide and ``tokens`` long (-1: S), whichever kernel ran.

    Folding position biases into q/k widens them, and the kernel runs faster on padded widths
    and lengths (``sam_vit._folded_attention``); FLOPs are the model's, so the count uses its
    own head width and token count. torch's counter does not count the fused CPU kernel at
    all, which would hide attention from every FLOPs cut.
    """
    if explicit_pays(q.device, q.dtype, k.shape[2]):
        out = explicit_attention(q, k, v, mask, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).contiguous()


@fused_attention.register_fake
def _(q, k, v, mask, scale, head_dim, tokens=-1):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])


@register_flop_formula(torch.ops.structsam.attention)
def _attention_flops(
    q_shape, k_shape, v_shape, mask_shape, scale, head_dim, tokens=-1, out_shape=None, **kw
):
    *batch, sq, _ = q_shape
    sk = k_shape[-2]
    if tokens >= 0:
        sq = sk = tokens
    return 4 * int(np.prod(batch)) * sq * sk * head_dim


@dataclass
class BlockMergeInfo:
    """What one merged block did, for diagnostics and overlays (arrays are for image 0)."""

    block: int
    stage: int
    grid_shape: tuple[int, int]
    window: int | None
    plan: Plan

    @property
    def tokens_before(self) -> int:
        return self.plan.grid.n

    @property
    def tokens_after(self) -> int:
        return int((self.plan.rep < self.plan.grid.n).sum())

    @property
    def merge_map(self) -> np.ndarray:
        """(H, W) int: reduced-token id of each token; members of a group share an id."""
        return self.plan.merge_map()[0].cpu().numpy()

    @property
    def protected(self) -> np.ndarray:
        """(H, W) bool: tokens in cells the method protected (boundaries, prompt regions)."""
        p = self.plan.protected
        if p is None:
            return np.zeros(self.grid_shape, dtype=bool)
        return p[0].view(self.grid_shape).cpu().numpy()


_OPTION_DEFAULTS = {
    "prompt_margin": 2.0,
    "point_radius": 3.0,
    "merge_attention": True,
    "merge_mlp": True,
    "queries": "reduced",
    "recovery": "stage",
}


@dataclass(frozen=True, slots=True)  # slots: the forwards read its fields every block
class MergeConfig:
    """What one ``patch`` set, fixed for the life of the patch (``identity`` keys caches).

    ``options`` are the method's own keywords; the engine's (prompt margins, the ablations
    ``merge_attention``/``merge_mlp``/``queries`` and ``recovery``) are fields of their own.
    """

    method: MethodInfo
    rates: Mapping[int, float]  # merged blocks only (rate > 0)
    stages: Mapping[int, int]
    stage_windows: Mapping[int, int | None]
    input_size: int
    options: Mapping[str, Any]
    prompts: Mapping[str, Any] | None = None  # the patch's own, in model-input pixels
    seed: int = 0
    precision: str = "fp32"
    prompt_margin: float = 2.0
    point_radius: float = 3.0
    # which parts of a block run on reduced tokens (ablations; both by default)
    merge_attention: bool = True
    merge_mlp: bool = True
    # "reduced": queries are the group means too; "full": every token queries the reduced
    # keys/values, so attention outputs stay per token
    queries: str = "reduced"
    # "stage": merge once per run of merged blocks of a stage; "block": around every block
    recovery: str = "stage"
    # blocks in forward order, cut where the stage or merged/dense changes (stage path)
    runs: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def build(cls, method, rates, stages, stage_windows, input_size, options, prompts=None,
              seed=0, precision="fp32") -> MergeConfig:  # fmt: skip
        """Split the engine's options from the method's and check them."""
        options = dict(options)
        engine = {k: options.pop(k, v) for k, v in _OPTION_DEFAULTS.items()}
        if engine["queries"] not in ("reduced", "full"):
            raise MergeError(f"queries must be 'reduced' or 'full', got {engine['queries']!r}")
        if engine["recovery"] not in ("stage", "block"):
            raise MergeError(f"recovery must be 'stage' or 'block', got {engine['recovery']!r}")
        rates = {int(b): float(r) for b, r in rates.items()}
        return cls(
            method=method,
            rates=MappingProxyType(rates),
            stages=MappingProxyType(dict(stages)),
            stage_windows=MappingProxyType(dict(stage_windows)),
            input_size=int(input_size),
            options=MappingProxyType(options),
            prompts=None if prompts is None else MappingProxyType(dict(prompts)),
            seed=int(seed),
            precision=str(precision),
            prompt_margin=float(engine["prompt_margin"]),
            point_radius=float(engine["point_radius"]),
            merge_attention=bool(engine["merge_attention"]),
            merge_mlp=bool(engine["merge_mlp"]),
            queries=engine["queries"],
            recovery=engine["recovery"],
            runs=tuple(tuple(r) for r in _runs(stages, rates)),
        )

    def __deepcopy__(self, memo) -> MergeConfig:
        return self  # immutable: a copied model shares its configuration

    @property
    def ablation(self) -> bool:
        """Options that need per-token values inside a stage (the per-block path)."""
        return self.queries == "full" or not self.merge_mlp or not self.merge_attention

    def identity(self) -> dict[str, Any]:
        """Everything the encoder output depends on, JSON-able (floats by their exact repr)."""
        return {
            "method": self.method.name,
            "rates": [[b, repr(r)] for b, r in sorted(self.rates.items())],
            "stage_windows": canonical(dict(self.stage_windows)),
            "input_size": self.input_size,
            # the method's defaults too: a default changed in the code must not reuse
            # embeddings cached under the old one
            "options": canonical({**method_defaults(self.method.fn), **self.options}),
            "prompts": canonical(None if self.prompts is None else dict(self.prompts)),
            "seed": canonical(self.seed),
            "precision": self.precision,
            "prompt_margin": repr(self.prompt_margin),
            "point_radius": repr(self.point_radius),
            "merge_attention": self.merge_attention,
            "merge_mlp": self.merge_mlp,
            "queries": self.queries,
            "recovery": self.recovery,
        }


def method_defaults(fn) -> dict[str, Any]:
    """The keyword-only options of a method function and their defaults (``generator`` and
    the engine-supplied ``depth`` left out: they are not the user's settings)."""
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is p.KEYWORD_ONLY
        and p.default is not p.empty
        and name not in ("generator", "depth")
    }


# "the patch's own prompts": a per-call override may also be None (protect nothing)
_PATCH_PROMPTS = object()


class MergeState:
    """One patch's fixed ``config`` plus the per-forward plans and diagnostics.

    Only ``structsam.patching`` changes it: per-call prompts through
    :func:`structsam.patching.prompts`, feature recording through
    :func:`structsam.patching.recording`; a forward rebuilds the plans and ``info``.
    """

    def __init__(self, config: MergeConfig):
        self.config = config
        self._call_prompts = _PATCH_PROMPTS
        self._identity: dict[tuple, Plan] = {}
        self._grids: dict[tuple, Grid] = {}
        self._constants: dict = {}
        self.info: list[BlockMergeInfo] = []
        # diagnostics (spectral distortion): each stage's first block input, image 0
        self._recording: dict[int, torch.Tensor] | None = None
        self._assign: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._plans: dict[tuple[int, int | None], Plan] = {}

    def __deepcopy__(self, memo) -> MergeState:
        # a copied model gets the same patch and empty per-forward caches (plans hold sparse
        # tensors, which deepcopy cannot copy, and a copy recomputes them on its first forward)
        twin = MergeState(self.config)
        if self._call_prompts is not _PATCH_PROMPTS:  # the sentinel must stay itself
            twin._call_prompts = copy.deepcopy(self._call_prompts, memo)
        memo[id(self)] = twin
        return twin

    # the configuration, read by the patched forwards
    @property
    def rates(self) -> Mapping[int, float]:
        return self.config.rates

    @property
    def runs(self) -> tuple[tuple[int, ...], ...]:
        return self.config.runs

    @property
    def prompts(self) -> Mapping[str, Any] | None:
        """The prompts the next forward protects (model-input pixels)."""
        if self._call_prompts is _PATCH_PROMPTS:
            return self.config.prompts
        return self._call_prompts

    def begin_forward(self) -> None:
        self.info = []
        if self._recording is not None:
            self._recording.clear()
        self._assign.clear()
        self._plans.clear()

    def plan_for(
        self, block: int, x: torch.Tensor, height: int, width: int, window: int | None
    ) -> Plan | None:
        """The plan for ``block`` (None: run it dense). ``x`` is the (B, N, C) block input."""
        cfg = self.config
        rate = cfg.rates.get(block, 0.0)
        if rate <= 0:
            return None
        stage = cfg.stages[block]
        if stage not in self._assign:
            self._assign[stage] = self._assignment(block, stage, rate, x, height, width)
        key = (stage, window)
        if key not in self._plans:
            dst, protected = self._assign[stage]
            grid = self.grid(height, width, window, x.device)
            self._plans[key] = Plan.from_dst(dst, grid, protected.view(-1, height, width))
        plan = self._plans[key]
        self.info.append(BlockMergeInfo(block, stage, (height, width), window, plan))
        return plan

    def _assignment(self, block, stage, rate, x, height, width):
        """The method's (dst, protected) for a stage, with the engine's prompt protection."""
        cfg = self.config
        grid = self.grid(height, width, cfg.stage_windows[stage], x.device)
        protect = None
        prompts = self.prompts
        if prompts:
            protect = prompt_mask(
                grid, cfg.input_size, prompts, cfg.prompt_margin, cfg.point_radius
            )
        gen = torch.Generator(device=x.device).manual_seed(cfg.seed + block)
        # decisions in fp32 whatever the encoder runs in, so precision does not move them
        feat = x.detach().float().view(x.shape[0], height, width, -1)
        if self._recording is not None:
            self._recording[stage] = feat[0].clone()
        # methods that schedule over depth (PiToMe's margin, ALGM's global stage) learn where
        # the stage starts: its first block and the encoder's block count
        depth = (
            {"depth": (block, len(cfg.stages))} if getattr(cfg.method.fn, "depth_aware", 0) else {}
        )
        dst, protected = cfg.method.fn(
            feat, grid, rate, protect, generator=gen, **depth, **cfg.options
        )
        if protect is not None:
            dst, protected = protect_tokens(dst, protected, protect.view(1, -1))
        return dst, protected

    def constant(self, key, build):
        """``build()``, made once per patch: values that depend only on the model's weights and
        a grid (e.g. a block's padding-key biases)."""
        if key not in self._constants:
            self._constants[key] = build()
        return self._constants[key]

    def grid(self, height: int, width: int, window, device) -> Grid:
        """Grids (and their cached index tensors) kept across forwards: they depend only on
        the shape; rebuilding LiteMedSAM's three took 2.1 ms per encode."""
        key = (height, width, window, str(device))
        if key not in self._grids:
            self._grids[key] = Grid(height, width, window, device=device)
        return self._grids[key]

    def identity_plan(self, batch: int, height: int, width: int, window, device) -> Plan:
        """Every token its own group: dense blocks through the merged path (kept across calls,
        as it depends only on the grid)."""
        key = (batch, height, width, window, str(device))
        if key not in self._identity:
            grid = self.grid(height, width, window, device)
            dst = torch.arange(grid.n, device=device).expand(batch, -1)
            self._identity[key] = Plan.from_dst(dst, grid)
        return self._identity[key]


def protect_tokens(dst, protected, protect):
    """The engine's prompt protection, the same for every method: a protected token is never a
    source nor a destination. It and every token that would merge into one stay their own
    group (calibration at matched FLOPs then spends the budget elsewhere)."""
    idx = torch.arange(dst.shape[1], device=dst.device).expand_as(dst)
    protect = protect.expand_as(dst)
    hit = protect | protect.gather(1, dst)
    return torch.where(hit, idx, dst), protected | protect


def _runs(stages: dict[int, int], rates: dict[int, float]) -> list[list[int]]:
    """Consecutive blocks of one stage that are all merged (or all dense)."""
    runs: list[list[int]] = []
    prev = None
    for block in sorted(stages):
        key = (stages[block], rates.get(block, 0.0) > 0)
        if key != prev:
            runs.append([])
            prev = key
        runs[-1].append(block)
    return runs


def pack(t: torch.Tensor, packing: dict, fill: torch.Tensor | None = None) -> torch.Tensor:
    """(M, heads, d) reduced tokens -> (W, heads, S, d) window slots (padding keys = ``fill``)."""
    n_win, n_slots = packing["key_valid"].shape
    out = t.new_zeros(n_win * n_slots, *t.shape[1:])
    if fill is not None and packing["has_pad"]:
        out[packing["pad_slot"].view(-1)] = fill.to(t.dtype)
    out.index_copy_(0, packing["query_index"], t)
    return out.view(n_win, n_slots, *t.shape[1:]).transpose(1, 2)


def _attend(q, k, v, bias, key_bias, scale):
    """softmax(q k^T * scale + bias + key_bias) v for (W, heads, S, d) slots -> (W, S, heads,
    d)."""
    w, h, sq, _ = q.shape
    sk = k.shape[2]
    bias = bias.add_(key_bias) if bias.shape == (w, h, sq, sk) else bias + key_bias
    return fused_attention(q, k, v, bias.to(q.dtype), scale, q.shape[-1])


def window_slots(bk: dict, kv: torch.Tensor, pad_kv=None) -> torch.Tensor:
    """(rows, ...) per-window slots of ``Plan.buckets``: each reduced token of ``kv`` (M, ...)
    in its row, ``pad_kv`` (zeros if None) in the padding rows.

    One gather of every row: twice as fast on CPU as zeroing a fresh buffer and index_copy_ of
    the reduced tokens (0.46 vs 0.90 ms at LiteMedSAM's first stage). Empty slots read token 0:
    finite values behind masked keys weigh exactly 0 (uninitialised memory could be NaN).
    """
    buf = kv.index_select(0, bk["row_source"])
    if bk["pad_rows"].numel():
        buf[bk["pad_rows"]] = 0 if pad_kv is None else pad_kv.to(kv.dtype)
    return buf


def reduced_attention(
    kv, splits, plan: Plan, scale: float, mask_fn, pad_kv=None, one_pad_slot=False
):
    """Windowed softmax attention among the reduced tokens (queries reduced too).

    ``kv``: (M, heads, d...) q/k/v per reduced token, split by ``splits``. Windows are packed in
    the size classes of ``Plan.buckets``; each query attends to the reduced tokens of its
    window, each group at its representative's position with ToMe's proportional attention (log
    group size added to its logits, exact when a group's tokens are identical), and zero-padding
    tokens of the window layout appended as keys, as the dense block sees them. ``mask_fn(part)``
    returns a bucket part's (W, heads, S, S) additive mask in ``kv``'s dtype: position bias plus
    log ``part["key_size"]``, -inf for empty slots. ``one_pad_slot``: each window's padding keys
    are one slot (``Plan.packing``), whose bias ``mask_fn`` must give. Returns (M, heads, dv).
    """
    bk = plan.buckets(one_pad_slot)
    buf = window_slots(bk, kv, pad_kv)
    out = kv.new_empty(bk["rows"], kv.shape[1], splits[-1])
    for part in bk["parts"]:
        n_rows = part["windows"] * part["slots"]
        rows = buf[part["row"] : part["row"] + n_rows]
        slots = rows.view(part["windows"], part["slots"], *kv.shape[1:]).transpose(1, 2)
        qs, ks, vs = slots.split(splits, dim=-1)
        o = fused_attention(qs, ks, vs, mask_fn(part), scale, qs.shape[-1])
        out[part["row"] : part["row"] + n_rows] = o.reshape(n_rows, kv.shape[1], -1)
    return out.index_select(0, bk["query_index"])


def full_query_attention(kv, splits, plan: Plan, scale: float, bias_fn, pad_kv, q):
    """Every token's query (``q``: (B*N, heads, dq)) against the reduced keys/values ``kv``
    (M, heads, dk + dv, split by ``splits``) of its window, with proportional attention and the
    window's zero-padding keys (``pad_kv``) as in :func:`reduced_attention`. ``bias_fn(q, qpos,
    kpos, cache)`` returns a fresh (W, heads, Sq, Sk) position bias. Returns (B*N, heads, dv).
    """
    pk = plan.packing()
    k, v = pack(kv, pk, pad_kv).split(splits, dim=-1)
    g = plan.grid
    n_win = plan.batch * g.n_windows
    qs = q.new_zeros(n_win * g.win**2, *q.shape[1:])
    qs.index_copy_(0, plan.full_query_index(), q)
    qs = qs.view(n_win, g.win**2, *q.shape[1:]).transpose(1, 2)
    cache = plan.memo("full_bias_index")
    bias = bias_fn(qs, plan.full_query_pos(), pk["pos"], cache)
    out = _attend(qs, k, v, bias, plan.key_bias(), scale)
    w, sq, h, _ = out.shape
    return out.reshape(w * sq, h, -1).index_select(0, plan.full_query_index())


def check_rate(rate, method: MethodInfo, name: str = "rate") -> float:
    """``rate`` as a float, or MergeError unless it is a finite number in [0, max_rate].

    ``name`` is how the caller's user spells the argument (``--rate`` on the command line).
    """
    accepted = (
        f"{name} must be in [0, {method.max_rate:g}], a finite number (0: no merging; method "
        f"{method.name!r} removes at most {method.max_rate:.0%} of a block's tokens)"
    )
    # bool is an int, and float("0.3") would let a string through
    if isinstance(rate, bool | str | bytes):
        raise MergeError(f"{accepted}, got {rate!r}")
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise MergeError(f"{accepted}, got {rate!r}") from None
    # NaN fails every comparison, so test for the accepted range, not the rejected one
    if not (np.isfinite(value) and 0.0 <= value <= method.max_rate):
        raise MergeError(f"{accepted}, got {value:g}")
    return value
