"""Merge methods: pure functions from block features to a merge plan.

Each method takes ``(feat (B, H, W, C), grid, rate, protect, *, generator, **options)`` and
returns ``(dst (B, N), protected (B, N))``: the token each token merges into (itself when kept)
and the tokens it refused to merge. ``Plan.from_dst`` does the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .baselines import register as register_baselines
from .grid import Grid, prompt_mask
from .plan import Plan
from .structsam import structsam_merge


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: Callable
    max_rate: float  # largest removable fraction per merged block
    # merges differently near prompts, beyond the protection every method gets from the engine
    # (StructSAM: far background first)
    prompt_extras: bool
    rate_meaning: str
    # its groups are drawn from the engine's seeded generator (StructSAM, ToMeSD, VidToMe,
    # random), so one seed is one draw: ``structsam bench --seeds`` averages over several
    randomized: bool = False


METHODS: dict[str, MethodInfo] = {
    "structsam": MethodInfo(
        "structsam",
        structsam_merge,
        0.75,
        True,
        "fraction of tokens merged per stage into a random destination among the four 2x2 "
        "cells around them, most similar first, image-wide (whole flat 4x4 blocks merge "
        "further; calibrate on FLOPs)",
        randomized=True,
    ),
}


register_baselines(METHODS, MethodInfo)


def get_method(name: str) -> MethodInfo:
    try:
        return METHODS[name]
    except KeyError:
        valid = ", ".join(["none", *METHODS])
        raise ValueError(f"unknown merge method {name!r}; choose one of: {valid}") from None


__all__ = ["METHODS", "Grid", "MethodInfo", "Plan", "get_method", "prompt_mask"]
