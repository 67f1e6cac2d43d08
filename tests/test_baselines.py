"""The published baselines (ToMe, ToMeSD, PiToMe, VidToMe, ALGM, random) on hand-built inputs."""

import pytest
import torch

import structsam.merge as merge
from structsam.errors import MergeError
from structsam.merge import Grid
from structsam.merge.algm import algm_merge
from structsam.merge.baselines import BASELINES, NAMES, register
from structsam.merge.pitome import pitome_merge, window_energy
from structsam.merge.random_merge import random_merge
from structsam.merge.tome import unit_metric
from structsam.merge.tomesd import tomesd_merge
from structsam.merge.vidtome import dst_frames, strips
from structsam.patching import merge_state, patch, unpatch

FNS = {name: fn for name, fn, *_ in BASELINES}
MAX_RATE = {name: max_rate for name, _, max_rate, *_ in BASELINES}
GRIDS = {"windowed": Grid(14, 14, window=7), "global": Grid(8, 8)}
FIXED_COUNT = ["tome", "pitome", "tomesd", "vidtome", "random"]


def _feat(grid, b=2, c=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, grid.height, grid.width, c, generator=g)


def _run(name, feat, grid, rate, seed=0, **options):
    gen = torch.Generator().manual_seed(seed)
    return FNS[name](feat, grid, rate, None, generator=gen, **options)


def _removed(dst):
    return (dst != torch.arange(dst.shape[1])).sum(1)


@pytest.fixture()
def registered():
    """The baselines in ``structsam.merge.METHODS`` for the duration of a test."""
    added = [n for n in NAMES if n not in merge.METHODS]
    register(merge.METHODS, merge.MethodInfo)
    yield
    for n in added:
        del merge.METHODS[n]


# --- every method -------------------------------------------------------------------------


@pytest.mark.parametrize("grid_kind", list(GRIDS))
@pytest.mark.parametrize("name", NAMES)
def test_assignment_is_valid(name, grid_kind):
    grid = GRIDS[grid_kind]
    feat = _feat(grid)
    for rate in (0.2, MAX_RATE[name]):
        dst, protected = _run(name, feat, grid, rate)
        assert dst.shape == (2, grid.n) and dst.dtype == torch.long
        assert protected.shape == (2, grid.n) and protected.dtype == torch.bool
        assert int(dst.min()) >= 0 and int(dst.max()) < grid.n
        # one level: every destination is kept
        assert torch.equal(dst.gather(1, dst), dst)
        # no group spans two windows
        assert torch.equal(grid.window_id[dst], grid.window_id.expand(2, -1))
        # protected tokens are kept and receive nobody
        assert torch.equal(dst[protected], torch.nonzero(protected)[:, 1])
        merged = dst != torch.arange(grid.n)
        assert not protected.gather(1, dst)[merged].any()
        assert int(_removed(dst).max()) <= round(rate * grid.n) + 2


@pytest.mark.parametrize("grid_kind", list(GRIDS))
@pytest.mark.parametrize("name", FIXED_COUNT)
def test_removed_count_is_the_rate(name, grid_kind):
    grid = GRIDS[grid_kind]
    dst, _ = _run(name, _feat(grid), grid, 0.3)
    assert _removed(dst).tolist() == [round(0.3 * grid.n)] * 2


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_with_a_seed(name):
    grid = GRIDS["windowed"]
    feat = _feat(grid)
    a, pa = _run(name, feat, grid, 0.4, seed=5)
    b, pb = _run(name, feat, grid, 0.4, seed=5)
    assert torch.equal(a, b) and torch.equal(pa, pb)


@pytest.mark.parametrize("grid_kind", list(GRIDS))
@pytest.mark.parametrize("name", NAMES)
def test_nothing_merges_at_rate_zero(name, grid_kind):
    # random features: no ALGM cell reaches its similarity threshold either
    grid = GRIDS[grid_kind]
    dst, _ = _run(name, _feat(grid), grid, 0.0)
    assert torch.equal(dst, torch.arange(grid.n).expand(2, -1))


# --- ToMe ---------------------------------------------------------------------------------


def test_tome_alternating_split_inside_windows():
    grid = GRIDS["windowed"]  # 7x7 windows, no padding: the local index is grid.local_pos
    feat = _feat(grid)
    dst, _ = _run("tome", feat, grid, 0.4)
    idx = torch.arange(grid.n).expand(2, -1)
    merged = dst != idx
    even = (grid.local_pos % 2 == 0).expand(2, -1)
    assert (even[merged]).all()  # sources are A (even local index) ...
    assert (~even.gather(1, dst)[merged]).all()  # ... and merge into B (odd local index)
    # each merged A token goes to its most similar B token of its window
    m = unit_metric(feat)
    for bi in range(2):
        for t in torch.nonzero(merged[bi]).squeeze(1).tolist()[:20]:
            cand = (grid.window_id == grid.window_id[t]) & ~even[0]
            sims = m[bi, cand] @ m[bi, t]
            best = torch.nonzero(cand).squeeze(1)[int(sims.argmax())]
            assert int(dst[bi, t]) == int(best)


def test_tome_merges_the_most_similar_edges_then_a_second_round():
    grid = Grid(4, 4)
    feat = _feat(grid, b=1)
    feat[0, 0, 0] = feat[0, 0, 1]  # A token 0 duplicates B token 1: the best edge
    dst, _ = _run("tome", feat, grid, 1 / 16)
    assert int(dst[0, 0]) == 1 and int(_removed(dst)[0]) == 1
    # one round takes at most half of the tokens; beyond, a second round on the kept half
    dst, _ = _run("tome", feat, grid, 0.5)
    assert int(_removed(dst)[0]) == 8
    dst, _ = _run("tome", feat, grid, 0.75)
    assert int(_removed(dst)[0]) == 12 and MAX_RATE["tome"] == 0.75
    roots = dst[0]
    assert bool((roots.gather(0, roots) == roots).all())  # one level: destinations stay put


def test_tome_spends_no_edge_on_protected_tokens():
    from structsam.merge.tome import tome_merge

    grid = Grid(4, 4)
    feat = _feat(grid, b=1)
    protect = torch.zeros(4, 4, dtype=torch.bool)  # (H, W), as the engine passes it
    protect[:2] = True  # the top half
    dst, _ = tome_merge(feat, grid, 0.25, protect)
    moved = dst[0] != torch.arange(16)
    assert int(moved.sum()) == 4 and not moved[:8].any() and not bool((dst[0][moved] < 8).any())


# --- ToMeSD -------------------------------------------------------------------------------


def test_tomesd_keeps_exactly_one_destination_per_cell():
    for grid in GRIDS.values():
        feat = _feat(grid)
        # at the maximum rate every source merges: the kept tokens are the cells' destinations
        dst, _ = _run("tomesd", feat, grid, 0.75, seed=3)
        kept = dst == torch.arange(grid.n)
        per_cell = torch.zeros(2, grid.n_cells, dtype=torch.long)
        per_cell.index_add_(1, grid.cell_id, kept.long())
        assert (per_cell == 1).all()
        # at a lower rate (same seed) only those destinations receive sources, possibly from
        # other cells of the same window
        low, _ = _run("tomesd", feat, grid, 0.3, seed=3)
        merged = low != torch.arange(grid.n)
        assert kept.gather(1, low)[merged].all()


def test_tomesd_destinations_are_random_per_cell_and_no_rand_takes_the_first():
    grid = Grid(8, 8)
    feat = _feat(grid, b=1)
    a, _ = _run("tomesd", feat, grid, 0.75, seed=1)
    b, _ = _run("tomesd", feat, grid, 0.75, seed=2)
    assert not torch.equal(a, b)
    d, _ = tomesd_merge(feat, grid, 0.75, no_rand=True)
    kept = torch.nonzero(d[0] == torch.arange(grid.n)).squeeze(1)
    assert torch.equal(grid.rows[kept] % 2, torch.zeros_like(kept))
    assert torch.equal(grid.cols[kept] % 2, torch.zeros_like(kept))


# --- PiToMe -------------------------------------------------------------------------------


@pytest.mark.parametrize("grid_kind", list(GRIDS))
def test_pitome_protects_an_isolated_token(grid_kind):
    grid = GRIDS[grid_kind]
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, generator=g)
    feat = base + 0.05 * torch.randn(1, grid.height, grid.width, 16, generator=g)
    feat[0, 2, 3] = torch.randn(16, generator=g) * 3  # one distinct token
    lone = 2 * grid.width + 3
    dst, protected = pitome_merge(feat, grid, 0.25)
    assert int(_removed(dst)[0]) == round(0.25 * grid.n)  # near-duplicates merge
    assert int(dst[0, lone]) == lone and bool(protected[0, lone])
    assert int((dst[0] == lone).sum()) == 1  # nobody merges into it
    # the top 2r energies are mergeable, the rest protected
    assert int((~protected).sum()) == 2 * round(0.25 * grid.n)


def test_pitome_pairs_alternate_in_energy_order():
    grid = Grid(8, 8)
    feat = _feat(grid, b=1)
    dst, protected = pitome_merge(feat, grid, 0.5, margin=0.5)  # 2r = N: all mergeable
    assert not protected.any()
    energy = window_energy(unit_metric(feat), grid)[0]
    rank = torch.empty(grid.n, dtype=torch.long)
    rank[torch.argsort(energy, descending=True, stable=True)] = torch.arange(grid.n)
    merged = dst[0] != torch.arange(grid.n)
    # A (even energy ranks) merge, each into a B (odd rank)
    assert torch.equal(merged, rank % 2 == 0)
    assert (rank[dst[0][merged]] % 2 == 1).all()


# --- VidToMe ------------------------------------------------------------------------------


@pytest.mark.parametrize("grid_kind", list(GRIDS))
def test_vidtome_destinations_lie_in_one_strip_per_window(grid_kind):
    grid = GRIDS[grid_kind]
    feat = _feat(grid)
    dst, _ = _run("vidtome", feat, grid, 0.5, seed=4)
    is_dst, _ = dst_frames(grid, generator=torch.Generator().manual_seed(4))
    frame = strips(grid)
    merged = dst != torch.arange(grid.n)
    assert is_dst.expand(2, -1).gather(1, dst)[merged].all()  # targets in the dst frame
    assert not is_dst.expand(2, -1)[merged].any()  # sources outside it
    for w in range(grid.n_windows):
        in_w = grid.window_id == w
        assert len(frame[in_w & is_dst].unique()) == 1  # the dst frame is one strip
        assert len(frame[in_w].unique()) == 4  # of 4 frames
    # another seed draws other destination strips
    other, _ = dst_frames(grid, generator=torch.Generator().manual_seed(5))
    if grid.n_windows > 1:
        assert not torch.equal(other, is_dst)


# --- ALGM ---------------------------------------------------------------------------------


def _algm_features():
    grid = Grid(8, 8)
    feat = _feat(grid, b=1)
    feat[0, 0:2, 0:2] = feat[0, 0, 0]  # a cell of identical tokens
    feat[0, 0:2, 2:4] = feat[0, 0, 2]  # a cell of three identical tokens ...
    feat[0, 1, 3] = -feat[0, 0, 2]  # ... and one very different token
    return grid, feat


def test_algm_rate_is_its_threshold():
    grid, feat = _algm_features()
    dst, _ = algm_merge(feat, grid, 0.09, global_stage=False)  # tau = 0.88, Segmenter's
    d = dst[0].view(8, 8)
    last = 1 * 8 + 1  # the cell's last token
    assert (d[0:2, 0:2] == last).all()
    idx = torch.arange(64).view(8, 8)
    assert torch.equal(d[:, 2:], idx[:, 2:])  # the mixed cell and the random ones stay
    assert int(_removed(dst)[0]) == 3
    # rate 0 is tau 1: nothing merges; a fixed tau ignores the rate
    assert int(_removed(algm_merge(feat, grid, 0.0)[0])[0]) == 0
    fixed, _ = algm_merge(feat, grid, 0.5, tau=0.88, global_stage=False)
    assert torch.equal(fixed, dst)
    # a higher rate is a lower tau: more (whole) cells collapse
    removed = [
        int(_removed(algm_merge(feat, grid, r, global_stage=False)[0])[0]) for r in (0.3, 0.6, 0.75)
    ]
    assert removed == sorted(removed) and removed[-1] > 3
    assert all(r % 3 == 0 for r in removed)


def test_algm_global_stage_runs_in_the_later_half_and_stays_valid():
    grid = GRIDS["windowed"]
    feat = _feat(grid)
    ctm, _ = algm_merge(feat, grid, 0.2, global_stage=False)
    early, _ = algm_merge(feat, grid, 0.2, depth=(2, 12))
    assert torch.equal(early, ctm)  # before global_from (half the depth): CTM only
    both, _ = algm_merge(feat, grid, 0.2, depth=(6, 12))
    assert (_removed(both) > _removed(ctm)).all()
    assert torch.equal(both.gather(1, both), both)
    assert torch.equal(grid.window_id[both], grid.window_id.expand(2, -1))
    # every CTM group stays together
    assert torch.equal(both.gather(1, ctm), both)


def test_pitome_margin_follows_depth_and_a_second_round_goes_past_half():
    grid = GRIDS["windowed"]
    feat = _feat(grid)
    early, _ = pitome_merge(feat, grid, 0.3, depth=(0, 12))
    assert torch.equal(early, pitome_merge(feat, grid, 0.3, margin=0.9)[0])
    late, _ = pitome_merge(feat, grid, 0.3, depth=(9, 12))
    assert torch.equal(late, pitome_merge(feat, grid, 0.3, margin=0.9 * (1 - 9 / 12))[0])
    dst, _ = pitome_merge(feat, grid, 0.7)
    assert torch.equal(dst.gather(1, dst), dst)  # one level, no chains
    removed = _removed(dst)
    assert (removed >= round(0.7 * grid.n) - grid.n_windows * 2).all()
    assert (removed > grid.n // 2).all()


# --- random -------------------------------------------------------------------------------


def test_random_differs_from_seed_to_seed():
    grid = GRIDS["windowed"]
    feat = _feat(grid)
    a, _ = random_merge(feat, grid, 0.5, generator=torch.Generator().manual_seed(0))
    b, _ = random_merge(feat, grid, 0.5, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)
    # it ignores the features
    c, _ = random_merge(feat * 0, grid, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, c)


# --- registration and end to end ----------------------------------------------------------


def test_register_adds_every_baseline(registered):
    for name in ("tome", "pitome", "tomesd", "vidtome", "algm", "random"):
        info = merge.get_method(name)
        assert info.name == name and not info.prompt_extras
        assert 0 < info.max_rate < 1 and info.rate_meaning


@pytest.mark.parametrize("name", NAMES)
def test_patched_small_vit_runs(name, small_vit, registered):
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = small_vit(x)
    # ALGM's rate is its threshold: 0.7 is tau 0.07, low enough for random weights' tokens
    patch(small_vit, name, 0.7 if name == "algm" else min(0.4, MAX_RATE[name]))
    try:
        with torch.inference_mode():
            out = small_vit(x)
        info = merge_state(small_vit).info
    finally:
        unpatch(small_vit)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert len(info) == 4 and all(i.tokens_after < i.tokens_before for i in info)


def test_patched_small_vit_with_options_and_errors(small_vit, registered):
    x = torch.randn(1, 3, 256, 256)
    patch(small_vit, "algm", 0.3, global_stage=True, tau=0.9)
    try:
        with torch.inference_mode():
            assert torch.isfinite(small_vit(x)).all()
    finally:
        unpatch(small_vit)
    with pytest.raises(MergeError, match="at most 75%"):
        patch(small_vit, "tome", 0.8)
    # every baseline takes prompts: the engine protects them
    patch(small_vit, "tomesd", 0.3, prompts={"box": [10.0, 10.0, 100.0, 100.0]})
    try:
        with torch.inference_mode():
            assert torch.isfinite(small_vit(x)).all()
    finally:
        unpatch(small_vit)
