"""The benchmark: spectral distortion, peak memory, prompts, and one small end-to-end run."""

import json

import numpy as np
import pytest
import torch

from structsam.bench import Setting, bench_model, case_prompt, peak_memory, plan_settings
from structsam.errors import StructSAMError
from structsam.report import bench_plots, bench_table, bench_verdicts
from structsam.samples import coin_cases
from structsam.spectral import spectral_distortion


def _pairs_map(h, w):
    """Merge map grouping horizontal neighbour pairs (0,1), (2,3), ..."""
    ids = np.arange(h * w).reshape(h, w)
    ids[:, 1::2] = ids[:, 0::2]
    return ids


def test_spectral_distortion_is_zero_without_merging_and_for_duplicates():
    torch.manual_seed(0)
    feat = torch.randn(12, 12, 16)
    assert spectral_distortion(feat, np.arange(144).reshape(12, 12), 5) == pytest.approx(
        0, abs=1e-9
    )
    dup = feat.clone()
    dup[:, 1::2] = dup[:, 0::2]  # every pair holds two identical tokens
    assert spectral_distortion(dup, _pairs_map(12, 12), 6) == pytest.approx(0, abs=1e-9)
    # the same partition over distinct random tokens does distort
    assert spectral_distortion(feat, _pairs_map(12, 12), 6) > 0.01


def test_similarity_guided_merging_distorts_less_than_random():
    """Piecewise-constant features with noise: pairing tokens of one region distorts the
    spectrum less than pairing tokens at random (the paper's argument, after PiToMe)."""
    gen = torch.Generator().manual_seed(1)
    h = w = 16
    region = (torch.arange(h)[:, None] // 4 + torch.arange(w)[None, :] // 4) % 3  # 3 classes
    centres = torch.randn(3, 24, generator=gen)
    feat = centres[region] + 0.05 * torch.randn(h, w, 24, generator=gen)
    guided = _pairs_map(h, w)  # neighbours: same 4x4 block, so same region
    rng = np.random.default_rng(0)
    perm = rng.permutation(h * w)
    rand = np.empty(h * w, int)
    rand[perm[0::2]] = perm[0::2]
    rand[perm[1::2]] = perm[0::2]  # random pairs, same count of merges
    d_guided = spectral_distortion(feat, guided, None)
    d_random = spectral_distortion(feat, rand.reshape(h, w), None)
    assert d_guided < 0.5 * d_random


def test_spectral_distortion_handles_cut_windows():
    """10x10 grid, window 4: windows of 16, 8 and 4 tokens at the edges."""
    torch.manual_seed(0)
    feat = torch.randn(10, 10, 8)
    value = spectral_distortion(feat, _pairs_map(10, 10), 4)
    assert 0 < value < 2


def test_peak_memory_sees_intermediates():
    def encoder(x):
        big = x.repeat(64, 1)  # 64x the input, freed before the end
        return big.sum(0, keepdim=True)

    x = torch.ones(1, 4096)
    peak = peak_memory(encoder, x)
    assert 64 * 4096 * 4 <= peak < 2 * 64 * 4096 * 4


def test_case_prompt_box_point_and_jitter():
    case = coin_cases(1)[0]
    box = case_prompt(case, "box")
    assert set(box) == {"box"} and np.allclose(box["box"], case.box)
    both = case_prompt(case, "box+point")
    assert set(both) == {"box", "point_coords", "point_labels"}
    assert both["point_labels"].tolist() == [1]
    rng = np.random.default_rng(3)
    j = case_prompt(case, "box", jitter=0.1, rng=rng)["box"]
    side = np.array([case.box[2] - case.box[0], case.box[3] - case.box[1]] * 2) + 1
    assert not np.allclose(j, case.box)
    assert np.all(np.abs(j - case.box) <= 0.1 * side + 1e-9)
    assert j[0] <= j[2] and j[1] <= j[3]
    with pytest.raises(StructSAMError, match="--prompt must be one of"):
        case_prompt(case, "scribble")


def test_plan_settings_gives_every_method_both_modes():
    # prompt protection is the engine's: every method runs prompt-aware too
    keys = [s.key for s in plan_settings(["structsam", "tome"], [0.3])]
    assert keys == [
        "structsam/plain@0.30",
        "structsam/prompt@0.30",
        "tome/plain@0.30",
        "tome/prompt@0.30",
    ]


@pytest.mark.slow
def test_bench_model_end_to_end(litemedsam, tmp_path):
    cases = coin_cases(2)
    settings = plan_settings(["structsam"], [0.30]) + [Setting("tome", "plain", 0.60)]
    res = bench_model(
        "litemedsam",
        litemedsam,
        cases,
        settings,
        repeats=1,
        calib_count=1,
        spectral_count=1,
        log=lambda s: None,
    )
    assert res["n_well_posed"] == 2  # coins: unmerged Dice ~0.98, stable under noise
    by_key = {(s["method"], s["mode"], s["target"]): s for s in res["settings"]}
    # matched compute: calibrated on one image to ±1 pp, measured on both
    for mode in ("plain", "prompt"):
        s = by_key[("structsam", mode, 0.3)]
        assert s["flops_cut"] == pytest.approx(0.30, abs=0.03)
        assert 0.5 < s["fidelity"] <= 1 and s["fidelity_min"] <= s["fidelity"]
        assert s["spectral_distortion"] > 0
        assert s["seconds"] > 0 and s["speedup"] > 0 and s["peak_memory"] > 0
    # ToMe merges at most half the tokens per block: -60% is out of reach, and it says so
    s = by_key[("tome", "plain", 0.6)]
    assert s["rate"] is None and "cannot cut encoder FLOPs by 60%" in s["note"]
    assert res["unmerged"]["dice"] > 0.95
    table = bench_table(res)
    assert "| unmerged |" in table and "out of reach" in table
    path = tmp_path / "bench.png"
    bench_plots([res], path)
    assert path.stat().st_size > 10_000
    json.dumps(res, default=float)  # JSON-ready


def _fake_result(ours_plain, ours_prompt, tome):
    def s(method, mode, fid, drop):
        return {"method": method, "mode": mode, "target": 0.3, "fidelity": fid, "dice_drop": drop}

    return {
        "quality": True,
        "settings": [
            s("structsam", "plain", *ours_plain),
            s("structsam", "prompt", *ours_prompt),
            s("tome", "plain", *tome),
            s("random", "plain", 0.99, -0.5),  # the floor is not a rival
        ],
    }


def test_verdicts_compare_structsam_with_the_baselines_only():
    lines = bench_verdicts(_fake_result((0.95, 0.01), (0.97, 0.002), (0.93, 0.02)))
    assert len(lines) == 2
    assert all("→ best" in line and "→ smallest" in line for line in lines)
    lines = bench_verdicts(_fake_result((0.90, 0.03), (0.97, 0.002), (0.93, 0.02)))
    assert "NOT best" in lines[0] and "NOT smallest" in lines[0]
    assert "NOT" not in lines[1]


def test_paired_dice_difference_uses_well_posed_cases_only():
    from structsam.report import _paired_dice

    a = {"method": "structsam", "mode": "plain", "target": 0.3}
    b = {"method": "tome", "mode": "plain", "target": 0.3}
    res = {
        "cases": [
            {"name": "x", "well_posed": True},
            {"name": "y", "well_posed": True},
            {"name": "z", "well_posed": False},
        ],
        "per_setting_cases": {
            "structsam/plain@0.30": [
                {"name": "x", "dice": 0.90},
                {"name": "y", "dice": 0.80},
                {"name": "z", "dice": 0.10},
            ],
            "tome/plain@0.30": [
                {"name": "x", "dice": 0.88},
                {"name": "y", "dice": 0.80},
                {"name": "z", "dice": 0.90},
            ],
        },
    }
    mean, se = _paired_dice(res, a, b)
    assert mean == pytest.approx(1.0)  # (+2 + 0) / 2 points; z is ignored
    assert se == pytest.approx(1.0)  # std of (2, 0) is sqrt(2), over sqrt(2)
    assert _paired_dice({"per_setting_cases": {}}, a, b) is None


@pytest.mark.slow
def test_bench_without_quality_reports_flops_time_and_distortion(litemedsam, tmp_path):
    # the random-weights path (vit_b with checkpoint="random"): no masks, no quality columns
    res = bench_model(
        "litemedsam (as if random)",
        litemedsam,
        coin_cases(1),
        [Setting("structsam", "plain", 0.30), Setting("tome", "plain", 0.30)],
        quality=False,
        repeats=1,
        calib_count=1,
        spectral_count=1,
        log=lambda s: None,
    )
    assert "dice" not in res["unmerged"] and res["unmerged"]["flops"] > 0
    for s in res["settings"]:
        assert s["flops_cut"] == pytest.approx(0.30, abs=0.02)
        assert "dice" not in s and "fidelity" not in s
        assert s["spectral_distortion"] > 0 and s["speedup"] > 0
    table = bench_table(res)
    assert "no quality columns" in table and "| structsam |" in table
    bench_plots([res], tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 10_000
