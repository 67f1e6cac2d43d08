"""The StructSAM selection rule on hand-built feature maps."""

import pytest
import torch

from structsam.merge import Grid, Plan
from structsam.merge.energy import token_energy
from structsam.merge.structsam import structsam_merge

# the earlier rule (until 2026-12-07): each source merges into its own cell's lowest-energy token
OWN_CELL = {"match": "cell", "destination": "energy"}


def _step_features(h=8, w=8, c=16, edge_col=4):
    """Two flat halves with a vertical edge between columns edge_col-1 and edge_col."""
    torch.manual_seed(0)
    a, b = torch.randn(c), torch.randn(c)
    feat = torch.empty(1, h, w, c)
    feat[:, :, :edge_col] = a
    feat[:, :, edge_col:] = b
    return feat


def test_energy_is_high_at_the_edge_and_zero_in_flat_parts():
    e = token_energy(_step_features())[0]
    assert torch.all(e[:, [0, 1, 6, 7]] < 1e-5)
    assert torch.all(e[:, [3, 4]] > 0.1)


def test_dirichlet_energy_is_the_mean_squared_difference_to_the_grid_neighbours():
    # against a loop over the four neighbours (replicate padding: a missing neighbour adds 0)
    from structsam.merge.energy import normalise

    feat = torch.randn(2, 5, 7, 6, generator=torch.Generator().manual_seed(4))
    f = normalise(feat)
    ref = torch.zeros(2, 5, 7)
    for y in range(5):
        for x in range(7):
            for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                if 0 <= y + dy < 5 and 0 <= x + dx < 7:
                    ref[:, y, x] += ((f[:, y, x] - f[:, y + dy, x + dx]) ** 2).sum(-1)
    ref = (ref / (2 * 6)).sqrt()
    assert torch.allclose(token_energy(feat, "dirichlet"), ref, atol=1e-5)


def test_dirichlet_energy_sees_a_one_token_peak_that_sobel_misses():
    # a small lesion at a coarse stage: one token unlike its neighbours
    feat = torch.zeros(1, 7, 7, 4)
    feat[0, :, :, 0] = 1.0
    feat[0, 3, 3] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    sobel = token_energy(feat)[0]
    dirichlet = token_energy(feat, "dirichlet")[0]
    assert sobel[3, 3] < 1e-5 < sobel[3, 2]  # central differences cancel at the peak
    assert dirichlet[3, 3] == dirichlet.max() and dirichlet[3, 3] > 1.5 * dirichlet[3, 2] > 0
    assert dirichlet[0, 0] < 1e-5  # flat far away
    with pytest.raises(ValueError, match="dirichlet"):
        token_energy(feat, "laplace")


@pytest.mark.parametrize("rate, screen", [(0.5, 1.0), (0.25, 2.0)])
def test_edge_cells_are_protected_and_flat_cells_merged(rate, screen):
    # candidates are the flattest cells holding screen x the budget: 36 removable tokens in the
    # 12 flat cells cover 32 = 0.5 * 64 (screen 1) and 2 * 16 = 0.25 * 64 * 2 (screen 2)
    feat = _step_features(edge_col=5)  # edge inside the cells of columns 4-5
    grid = Grid(8, 8, None)
    dst, protected = structsam_merge(feat, grid, rate=rate, coarse=0, screen=screen, **OWN_CELL)
    dst, protected = dst[0].view(8, 8), protected[0].view(8, 8)
    # columns 4-5 hold the edge (energy at 4 and 5): their cells are protected, never merged
    assert protected[:, 4:6].all()
    idx = torch.arange(64).view(8, 8)
    assert torch.equal(dst[:, 4:6], idx[:, 4:6])
    # rate * 64 tokens removed, from the flat cells only
    assert int((dst != idx).sum()) == round(rate * 64)


def test_screen_lets_similarity_pick_sources_among_candidate_cells():
    # with screen 2 the candidate cells hold twice the budget; inside them the merged sources
    # are exactly the most similar to their cell's destination (the rest stay, unprotected)
    torch.manual_seed(2)
    feat = torch.randn(1, 8, 8, 16)
    grid = Grid(8, 8, None)
    budget = 16
    dst, protected = structsam_merge(feat, grid, rate=budget / 64, coarse=0, screen=2.0, **OWN_CELL)
    dst, protected = dst[0], protected[0]
    idx = torch.arange(64)
    merged = dst != idx
    assert int(merged.sum()) == budget
    cand = ~protected
    assert int(cand.sum()) > 2 * budget  # more candidates than the budget needs
    # each candidate cell's destination: the token its merged members point at, else itself
    f = torch.nn.functional.layer_norm(feat[0].reshape(64, 16), (16,))
    cell_dst = {}
    for t in torch.nonzero(merged).squeeze(1).tolist():
        cell_dst[int(grid.cell_id[t])] = int(dst[t])
    sims_merged, sims_left = [], []
    for t in torch.nonzero(cand).squeeze(1).tolist():
        d = cell_dst.get(int(grid.cell_id[t]))
        if d is None or d == t:
            continue
        sim = float(f[t] @ f[d])
        (sims_merged if merged[t] else sims_left).append(sim)
    assert sims_left and min(sims_merged) >= max(sims_left)


def test_energy_destination_is_the_lowest_energy_token_of_its_cell():
    torch.manual_seed(1)
    feat = torch.randn(1, 4, 4, 8) * 0.01
    feat[0, 0, 0] += 5.0  # a spike: high energy around (0, 0)
    grid = Grid(4, 4, None)
    dst, _ = structsam_merge(feat, grid, rate=0.75, coarse=0, **OWN_CELL)
    e = token_energy(feat, "dirichlet")[0].reshape(-1)
    for cell in range(grid.n_cells):
        members = torch.nonzero(grid.cell_id == cell).squeeze(1)
        targets = dst[0, members].unique()
        if len(targets) == 1 and (dst[0, members] != members).any():
            assert e[targets[0]] == e[members].min()


def test_prompt_protection_wins_over_flatness():
    feat = torch.zeros(1, 8, 8, 4)  # perfectly flat
    grid = Grid(8, 8, None)
    protect = torch.zeros(8, 8, dtype=torch.bool)
    protect[2:4, 2:4] = True
    dst, protected = structsam_merge(feat, grid, rate=0.75, protect=protect)
    idx = torch.arange(64).view(8, 8)
    assert torch.equal(dst[0].view(8, 8)[2:4, 2:4], idx[2:4, 2:4])
    assert protected[0].view(8, 8)[2:4, 2:4].all()


def test_cells_stop_at_window_edges():
    grid = Grid(14, 14, window=7)  # 7 is odd: the last cell of each window is one token wide
    cid = grid.cell_id.view(14, 14)
    assert cid[0, 6] != cid[0, 7]  # columns 6 and 7 are in different windows
    assert cid[0, 4] == cid[0, 5]
    assert int(grid.cell_count.max()) == 4 and int(grid.cell_count.min()) == 1


def test_plan_merge_is_the_group_mean_and_unmerge_recovers():
    grid = Grid(2, 2, None)
    dst = torch.tensor([[1, 1, 2, 1]])  # tokens 0 and 3 merge into 1, token 2 alone
    plan = Plan.from_dst(dst, grid)
    x = torch.tensor([[[1.0], [2.0], [10.0], [6.0]]])
    xr = plan.merge(x)
    assert torch.allclose(xr[:, 0], torch.tensor([3.0, 10.0]))
    assert torch.equal(plan.size, torch.tensor([3.0, 1.0]))
    back = plan.unmerge(xr)
    assert torch.allclose(back[0, :, 0], torch.tensor([3.0, 3.0, 10.0, 3.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_merge_equals_the_group_mean_on_a_real_plan(dtype):
    # the sparse averaging matrix against a per-group mean, two images, groups up to 4x4
    torch.manual_seed(0)
    grid = Grid(28, 28, window=14)
    feat = torch.nn.functional.avg_pool2d(torch.randn(2, 16, 28, 28), 5, 1, 2)
    feat = feat.permute(0, 2, 3, 1).contiguous()
    dst, _ = structsam_merge(feat, grid, rate=0.5, screen=2.0, rough=0.05, **OWN_CELL)
    plan = Plan.from_dst(dst, grid)
    x = torch.randn(2, grid.n, 8)
    ref = torch.zeros(plan.n_reduced, 8).index_add_(0, plan.group, x.reshape(-1, 8))
    ref /= plan.size[:, None]
    assert int(plan.size.max()) > 4 and plan.n_reduced < grid.n  # coarse groups too
    out = plan.merge(x.to(dtype))
    assert out.dtype == dtype
    assert torch.allclose(out.float(), ref, atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_padding_patterns_of_a_window_layout():
    pattern, masks = Grid(64, 64, window=14).pad_patterns  # padded to 70: 6 rows/cols of pad
    assert masks.shape == (3, 196)
    assert sorted(masks.sum(1).tolist()) == [84, 84, 132]
    assert (pattern >= 0).sum() == 9 and pattern[0] == -1 and pattern[-1] >= 0
    assert Grid(28, 28, window=14).pad_patterns[1].shape == (0, 196)


def test_coarse_merges_a_whole_flat_4x4_block_into_one_token():
    feat = _step_features(edge_col=5)
    grid = Grid(8, 8, None)
    dst, _ = structsam_merge(feat, grid, rate=36 / 64, coarse=1, screen=1.0, **OWN_CELL)
    d = dst[0].view(8, 8)
    # columns 0-3 are flat and wholly chosen: each 4x4 block becomes one group
    assert len(d[:4, :4].unique()) == 1 and len(d[4:, :4].unique()) == 1
    idx = torch.arange(64).view(8, 8)
    assert torch.equal(d[:, 4:6], idx[:, 4:6])  # the edge stays protected


@pytest.mark.parametrize("rough", [0.1, 0.2, 0.3])
def test_roughest_cells_stay_protected_at_high_rates(rough):
    """At rate 0.46 (about -40 % FLOPs) screen 2 once made every cell a candidate; the cap
    keeps the roughest ``rough`` of the cells out of reach, and the budget is still met."""
    torch.manual_seed(3)
    grid = Grid(16, 16, None)
    # one feature vector everywhere plus noise whose amplitude grows along the rows: roughness
    # is known (a ramp equal in every channel would vanish in the energy's LayerNorm)
    base = torch.randn(8)[None, None, :].expand(16, 16, 8)
    noise = torch.randn(16, 16, 8) * torch.linspace(0, 2, 16)[:, None, None]
    feat = (base + noise)[None]
    rate = 0.46
    dst, protected = structsam_merge(
        feat, grid, rate=rate, coarse=0, screen=2.0, rough=rough, **OWN_CELL
    )
    cells = protected[0].view(16, 16)[::2, ::2]  # one token per 2x2 cell
    assert int(cells.sum()) >= rough * 64 - 1  # the roughest cells are never candidates
    assert int((dst[0] != torch.arange(256)).sum()) == round(rate * 256)
    # the protected cells are the roughest: the noisy bottom rows
    assert cells[-2:].float().mean() > cells[:2].float().mean()
    # without the cap every cell is a candidate
    _, none = structsam_merge(feat, grid, rate=rate, coarse=0, screen=2.0, rough=0.0, **OWN_CELL)
    assert not none.any()


def _cell_destinations(grid, seed):
    from structsam.merge.structsam import random_cells_dst

    return random_cells_dst(grid, 1, torch.Generator().manual_seed(seed), "cpu")[0]


def test_sources_take_the_most_similar_destination_of_the_four_cells_around_them():
    torch.manual_seed(5)
    grid = Grid(12, 12, window=6)
    feat = torch.nn.functional.avg_pool2d(torch.randn(1, 8, 12, 12), 3, 1, 1)
    feat = feat.permute(0, 2, 3, 1).contiguous()
    dst, _ = structsam_merge(
        feat, grid, rate=0.3, coarse=0, generator=torch.Generator().manual_seed(7)
    )
    dst = dst[0]
    cell_dst = _cell_destinations(grid, 7)
    f = torch.nn.functional.layer_norm(feat[0].reshape(144, 8), (8,))
    best = {}
    for t in range(144):
        if int(cell_dst[grid.cell_id[t]]) == t:
            continue  # a destination is never a source
        y, x = divmod(t, 12)
        # reference: every destination of a cell that the 3x3 neighbourhood touches, same window
        near = {
            int(cell_dst[grid.cell_id[(y + dy) * 12 + x + dx]])
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if 0 <= y + dy < 12
            and 0 <= x + dx < 12
            and grid.window_id[(y + dy) * 12 + x + dx] == grid.window_id[t]
        }
        sims = {d: float(f[t] @ f[d]) / 8 for d in near}
        best[t] = max(sims.values())
        if dst[t] != t:
            assert int(dst[t]) in near and sims[int(dst[t])] == pytest.approx(best[t], abs=1e-5)
    merged = [best[t] for t in best if dst[t] != t]
    assert len(merged) == round(0.3 * 144)
    assert min(merged) >= max(best[t] for t in best if dst[t] == t) - 1e-6  # most similar first


def test_random_destinations_follow_the_seed_and_every_destination_is_kept():
    feat = torch.nn.functional.avg_pool2d(torch.randn(1, 8, 32, 32), 5, 1, 2)
    feat = feat.permute(0, 2, 3, 1).contiguous()
    feat[:, :12, :12] = feat[:, :1, :1]  # a flat corner, where whole 4x4 blocks form
    grid = Grid(32, 32, window=14)

    def run(seed):
        return structsam_merge(feat, grid, rate=0.5, generator=torch.Generator().manual_seed(seed))[
            0
        ]

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    for dst in (a, c):
        assert torch.equal(dst.gather(1, dst), dst)  # coarse groups absorbed their neighbours
        plan = Plan.from_dst(dst, grid)
        assert int(plan.size.max()) >= 16  # whole 4x4 blocks merged
        assert (grid.window_id[dst[0]] == grid.window_id).all()  # never across a window


def test_prompt_focus_merges_far_background_first():
    # flat: one feature vector plus faint noise, every source about as similar as any other
    gen = torch.Generator().manual_seed(0)
    feat = torch.tensor([1.0, -1.0, 0.5, 2.0]) + 1e-3 * torch.randn(1, 16, 16, 4, generator=gen)
    grid = Grid(16, 16, None)
    protect = torch.zeros(16, 16, dtype=torch.bool)
    protect[2:4, 2:4] = True
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    far = ((yy - 3).square() + (xx - 3).square()).sqrt().reshape(-1)

    def mean_distance(focus):
        dst, protected = structsam_merge(
            feat, grid, rate=0.2, protect=protect, prompt_focus=focus, coarse=0,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        assert protected[0].view(16, 16)[2:4, 2:4].all()
        return float(far[dst[0] != torch.arange(256)].mean())

    assert mean_distance(0.2) > mean_distance(0.0) + 2


def test_unknown_match_or_destination_is_refused():
    feat = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ValueError, match="match='window'"):
        structsam_merge(feat, Grid(4, 4, None), 0.5, match="window")


def test_no_group_spans_an_edge_inside_a_cell():
    # the edge runs inside the cells of columns 4-5: their sources merge into the cells beside
    # them, on their own side; such a cell is not one group, so its 4x4 block must not coarsen
    feat = _step_features(h=8, w=16, edge_col=5)
    grid = Grid(8, 16, None)
    for seed in range(5):
        dst, _ = structsam_merge(feat, grid, 0.7, generator=torch.Generator().manual_seed(seed))
        side = (torch.arange(128) % 16 >= 5).long()
        plan = Plan.from_dst(dst, grid)
        sides = torch.zeros(plan.n_reduced, 2).index_put_((plan.group, side), torch.ones(128))
        assert not (sides > 0).all(1).any(), f"seed {seed}: a group spans the edge"
