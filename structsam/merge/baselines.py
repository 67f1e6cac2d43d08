"""Registration of the published baselines in the method registry (``structsam.merge.METHODS``).

Each baseline is a pure function in its own module; its docstring names the source and states how
it was adapted to SAM's windowed and global blocks. ``register`` adds them to a registry dict.
"""

from __future__ import annotations

from .algm import algm_merge
from .pitome import pitome_merge
from .random_merge import random_merge
from .tome import tome_merge
from .tomesd import tomesd_merge
from .vidtome import vidtome_merge

# name, function, max_rate, prompt_extras, rate meaning
BASELINES = (
    (
        "tome",
        tome_merge,
        0.75,
        False,
        "fraction of tokens merged by ToMe bipartite matching (even/odd split per window, "
        "top edges by similarity image-wide; above 1/2 a second round on the kept tokens)",
    ),
    (
        "pitome",
        pitome_merge,
        0.75,
        False,
        "fraction of tokens merged by PiToMe (the 2x highest-energy tokens are mergeable, "
        "the rest protected; above 1/2 a second round on the kept tokens; margin 0.9 (1 - "
        "depth))",
    ),
    (
        "tomesd",
        tomesd_merge,
        0.75,
        False,
        "fraction of tokens merged into one random destination per 2x2 cell (ToMeSD), "
        "most similar sources first",
    ),
    (
        "vidtome",
        vidtome_merge,
        0.75,
        False,
        "fraction of tokens merged into a random destination strip (frame) of 4 per window "
        "(VidToMe on image strips), most similar sources first",
    ),
    (
        "algm",
        algm_merge,
        0.75,
        False,
        "ALGM's threshold, tau = 1 - rate / 0.75: 2x2 cells with mean similarity >= tau "
        "collapse (CTM), then adaptive global matching in the later half (GTM)",
    ),
    (
        "random",
        random_merge,
        0.75,
        False,
        "fraction of tokens merged at random into a random destination (one per 2x2 cell) of "
        "their window",
    ),
)

NAMES = tuple(entry[0] for entry in BASELINES)
# the baselines whose destinations are drawn at random (from the engine's seeded generator)
RANDOMIZED = ("tomesd", "vidtome", "random")


def register(methods: dict, method_info_cls) -> dict:
    """Add the baselines to ``methods`` as ``method_info_cls(name, fn, max_rate, prompt_extras,
    rate_meaning, randomized)`` entries; returns ``methods``."""
    for name, fn, max_rate, prompt_extras, meaning in BASELINES:
        info = method_info_cls(name, fn, max_rate, prompt_extras, meaning, name in RANDOMIZED)
        methods[name] = info
    return methods
