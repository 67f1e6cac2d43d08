"""The evaluation protocol: spectral distortion, peak memory, prompts, calibration, report, and
one small end-to-end run."""

import json
import warnings

import numpy as np
import pytest
import torch

from structsam.errors import StructSAMError
from structsam.eval.protocol import (
    BenchConfig,
    Setting,
    calibrate_targets,
    case_prompt,
    parse_method,
    peak_memory,
    plan_settings,
    run_bench,
    well_posed,
)
from structsam.eval.report import (
    at_equal_compute,
    bench_plots,
    bench_table,
    equal_compute_table,
    paired,
    spectral_plot,
    verdicts,
)
from structsam.eval.spectral import global_distortion, spectral_distortion, window_distortion
from structsam.eval.synthetic import coin_cases, phantom_cases


def _two_regions(h=16, w=16, edge=8, seed=0):
    """Two flat regions (features a | b) split by a vertical edge at column ``edge``."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=8), rng.normal(size=8)
    feat = np.where((np.arange(w) < edge)[None, :, None], a, b)
    return torch.tensor(feat + 0.01 * rng.normal(size=(h, w, 8)))


def _cells(h, w, shift=0):
    """2x2 cells; ``shift`` moves the column boundaries (1: cells straddle column 8's edge)."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return (r // 2) * w + (c + shift) // 2


def test_toy_merging_across_an_edge_scores_far_worse_than_within_regions():
    feat = _two_regions()
    none = np.arange(256).reshape(16, 16)
    assert global_distortion(feat, none) == pytest.approx(0, abs=1e-9)
    within = global_distortion(feat, _cells(16, 16))
    across = global_distortion(feat, _cells(16, 16, shift=1))
    assert 0 < within < 5
    assert across > 100 * within
    # per window (one 16x16 window = the whole grid): the same verdict
    assert window_distortion(feat, _cells(16, 16, 1), 16) > 100 * window_distortion(
        feat, _cells(16, 16), 16
    )


def test_guided_merging_distorts_less_than_random_pairs():
    gen = torch.Generator().manual_seed(1)
    h = w = 16
    region = (torch.arange(h)[:, None] // 4 + torch.arange(w)[None, :] // 4) % 3
    feat = torch.randn(3, 24, generator=gen)[region] + 0.05 * torch.randn(h, w, 24, generator=gen)
    guided = np.arange(h * w).reshape(h, w)
    guided[:, 1::2] = guided[:, 0::2]  # horizontal pairs inside 4x4 blocks
    perm = np.random.default_rng(0).permutation(h * w)
    rand = np.empty(h * w, int)
    rand[perm[0::2]] = perm[0::2]
    rand[perm[1::2]] = perm[0::2]  # random pairs, the same number of merges
    both = spectral_distortion(feat, guided, 8)
    worse = spectral_distortion(feat, rand.reshape(h, w), 8)
    assert both["global"] < 0.1 * worse["global"]


def test_window_distortion_handles_cut_windows():
    """10x10 grid, window 4: windows of 16, 8 and 4 tokens at the edges."""
    feat = torch.randn(10, 10, 8, generator=torch.Generator().manual_seed(0))
    value = window_distortion(feat, _cells(10, 10), 4)
    assert np.isfinite(value) and value > 0


def test_peak_memory_sees_intermediates():
    def encoder(x):
        big = x.repeat(64, 1)  # 64x the input, freed before the end
        return big.sum(0, keepdim=True)

    peak = peak_memory(encoder, torch.ones(1, 4096))
    assert 64 * 4096 * 4 <= peak < 2 * 64 * 4096 * 4


def test_case_prompt_box_point_and_jitter():
    case = coin_cases(1)[0]
    box = case_prompt(case, "box")
    assert set(box) == {"box"} and np.allclose(box["box"], case.box)
    both = case_prompt(case, "box+point")
    assert set(both) == {"box", "point_coords", "point_labels"}
    j = case_prompt(case, "box", jitter=0.1, rng=np.random.default_rng(3))["box"]
    side = np.array([case.box[2] - case.box[0], case.box[3] - case.box[1]] * 2) + 1
    assert not np.allclose(j, case.box)
    assert np.all(np.abs(j - case.box) <= 0.1 * side + 1e-9)
    with pytest.raises(StructSAMError, match="prompt must be one of"):
        case_prompt(case, "scribble")


def test_method_specs_and_settings():
    assert parse_method("pitome[m0=0.75,margin=none]") == ("pitome", {"m0": 0.75, "margin": None})
    assert parse_method("structsam") == ("structsam", {})
    with pytest.raises(ValueError, match="unknown merge method"):
        parse_method("tome2")
    with pytest.raises(StructSAMError, match="key=value"):
        parse_method("tome[fast]")
    keys = [s.key for s in plan_settings(["structsam", "tome"], [0.3])]
    assert keys == [
        "structsam/plain@0.30",
        "structsam/prompt@0.30",
        "tome/plain@0.30",
        "tome/prompt@0.30",
    ]
    s = Setting("structsam[screen=3]", "plain", 0.3)
    assert s.name == "structsam" and s.options == {"screen": 3.0}


def test_one_well_posed_rule():
    assert well_posed({"dice": 0.85, "stability": 0.95})
    assert not well_posed({"dice": 0.85, "stability": 0.95}, hint=False)
    assert not well_posed({"dice": 0.79, "stability": 0.99})
    assert not well_posed({"dice": 0.99, "stability": 0.89})


@pytest.mark.slow
@pytest.mark.parametrize("method", ["algm", "pitome"])
def test_algm_and_pitome_reach_every_target_on_litemedsam(litemedsam, method):
    """ALGM through its threshold tau (global stage on), PiToMe with its margin schedule: -25,
    -30 and -40 % are all within reach, calibrated on two images."""
    cases = phantom_cases()[:1] + coin_cases(1)
    images = [c.image for c in cases]
    prompts = [case_prompt(c, "box") for c in cases]
    rates = calibrate_targets(litemedsam, method, "plain", [0.25, 0.30, 0.40], images, prompts)
    assert all(isinstance(r, float) for r in rates.values()), rates
    assert rates[0.25] < rates[0.30] < rates[0.40]


def _fake(fid_ours, fid_tome, names=("x", "y")):
    def s(method, fid):
        cut = 0.21 if method == "algm" else 0.3
        return {"method": method, "mode": "plain", "target": 0.3, "fidelity": fid, "flops_cut": cut}

    per = {
        "structsam/plain@0.30": [
            {"name": n, "fidelity": fid_ours, "dice": fid_ours} for n in names
        ],
        "tome/plain@0.30": [
            {"name": n, "fidelity": fid_tome + 0.01 * i, "dice": fid_tome}
            for i, n in enumerate(names)
        ],
    }
    return {
        "quality": True,
        "settings": [
            s("structsam", fid_ours),
            s("tome", fid_tome),
            s("random", 0.999),
            s("algm", 0.999),  # it cut 21 %, not 30 %: no rival at -30 %
        ],
        "per_setting_prompts": per,
    }


def test_verdicts_name_the_best_rival_and_the_cases_behind_a_loss():
    res = _fake(0.95, 0.93)
    (line,) = verdicts(res)  # random is no rival, nor a method that missed the target
    assert "→ first" in line and "tome" in line
    assert "not at matched compute, left out: algm (cut 21.0 %)" in line
    res = _fake(0.90, 0.93)
    (line,) = verdicts(res)
    assert "NOT first" in line and "largest deficits: y" in line
    mean, se, n = paired(res, res["settings"][0], res["settings"][1], "fidelity")
    assert mean == pytest.approx(-3.5) and se == pytest.approx(0.5) and n == 2


def test_a_first_place_bought_with_a_smaller_cut_is_flagged():
    res = _fake(0.95, 0.93)
    (line,) = verdicts(res)
    assert "(cut 30.0 %)" in line and "not a win at equal compute" not in line
    res["settings"][0]["flops_cut"] = 0.288  # within MATCH of -30 %, but 1.2 points less
    (line,) = verdicts(res)
    assert "→ first" in line and "StructSAM cuts 1.2 points less" in line


def test_fidelity_at_equal_compute_is_read_off_each_prompts_own_curve():
    """Per prompt, fidelity is interpolated at exactly the target cut between the unmerged
    model (0, 1) and the measured settings; the last segment extends at most 2 points."""
    measured = {  # method -> target -> prompt -> (cut, fidelity)
        "structsam": {
            0.25: {"x": (0.20, 0.96), "y": (0.10, 0.99), "z": (0.30, 0.90)},
            0.40: {"x": (0.40, 0.92), "y": (0.20, 0.98), "z": (0.30, 0.90)},
        },
        "tomesd": {0.30: {"x": (0.30, 0.95), "y": (0.30, 0.97), "z": (0.30, 0.96)}},
    }
    settings, per = [], {}
    for method, by_target in measured.items():
        for target, rows in by_target.items():
            settings.append({"method": method, "mode": "plain", "target": target})
            per[f"{method}/plain@{target:.2f}"] = [
                {"name": n, "flops": 100 * (1 - c), "fidelity": f} for n, (c, f) in rows.items()
            ]
    prompts = [{"name": n, "flops": 100.0, "well_posed": True} for n in "xyz"]
    res = {"quality": True, "settings": settings, "per_setting_prompts": per}
    res.update(prompts=prompts, n_well_posed=3)
    ours = at_equal_compute(res, "structsam", "plain", 0.30)
    assert ours == pytest.approx({"x": 0.94, "z": 0.90})  # y's largest cut is 10 points short
    assert at_equal_compute(res, "structsam", "plain", 0.10)["x"] == pytest.approx(0.98)
    assert at_equal_compute(res, "structsam", "plain", 0.21)["y"] == pytest.approx(0.979)
    table = equal_compute_table(res)
    assert "| −30% | content-only | structsam | 2 of 3 | 0.9200 | – |" in table
    assert "| tomesd | 3 of 3 | 0.9600 | +3.50 ± 2.50 (n = 2) |" in table
    assert "−30%, content-only, equal compute: StructSAM NOT first (2 of 3" in table
    assert "ahead of it (pt): tomesd +3.50 ± 2.50" in table
    for row in per["tomesd/plain@0.30"]:
        row["fidelity"] -= 0.06  # now 5 and 0 points below StructSAM on x and z
    table = equal_compute_table(res)
    assert "−30%, content-only, equal compute: StructSAM first (2 of 3 prompts reached; " in table
    assert "next tomesd -2.50 ± 2.50 pt)" in table
    assert equal_compute_table({**res, "prompts": []}) == ""  # no per-prompt FLOPs: no table


def test_plots_without_spectral_cases_warn_nothing_and_skip_the_empty_picture(tmp_path):
    res = _fake(0.95, 0.93)
    res["model"] = "litemedsam"
    for s in res["settings"]:
        s.update(dice=s["fidelity"], spectral_global=float("nan"), spectral_window=float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" among them
        bench_plots([res], tmp_path / "bench.png")
        spectral_plot([res], tmp_path / "spectral.png")
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert not (tmp_path / "spectral.png").exists()


@pytest.mark.slow
def test_run_bench_end_to_end(litemedsam, tmp_path):
    cases = coin_cases(2)
    calib = phantom_cases()[:1]
    settings = plan_settings(["structsam"], [0.30]) + [Setting("tome", "plain", 0.60)]
    config = BenchConfig(prompt_kinds=("box",), repeats=1, calib_count=1, spectral_count=1)
    config.cache_dir = tmp_path / "cache"
    res = run_bench("litemedsam", litemedsam, cases, calib, settings, config, log=lambda s: None)
    assert res["n_well_posed"] == 2  # coins: unmerged Dice ~0.98, stable under noise
    assert res["calibration"]["cases"] == ["phantom-ellipse-3"]  # never a scored case
    by_key = {(s["method"], s["mode"], s["target"]): s for s in res["settings"]}
    for mode in ("plain", "prompt"):
        s = by_key[("structsam", mode, 0.3)]
        assert s["flops_cut"] == pytest.approx(0.30, abs=0.05)  # calibrated on another image
        assert 0.5 < s["fidelity"] <= 1 and s["fidelity_min"] <= s["fidelity"]
        assert s["spectral_global"] > 0 and s["spectral_window"] > 0
        assert s["seconds"] > 0 and s["speedup"] > 0
    s = by_key[("tome", "plain", 0.6)]
    assert s["rate"] is None and "cannot cut FLOPs by 60%" in s["note"]
    assert len(list(config.cache_dir.glob("*.pkl"))) == 2  # the dense pass is cached
    table = bench_table(res)
    assert "−30% FLOPs" in table and "out of reach" in table
    assert f"| {by_key[('structsam', 'plain', 0.3)]['fidelity_min']:.3f} |" in table
    bench_plots([res], tmp_path / "bench.png")
    spectral_plot([res], tmp_path / "spectral.png")
    assert (tmp_path / "spectral.png").stat().st_size > 10_000
    json.dumps(res, default=float)


def test_a_randomized_method_is_averaged_over_seeds(litemedsam):
    from structsam.eval.protocol import dense_pass, make_prompts, score_setting

    cases = coin_cases(1)
    prompts = make_prompts(cases, ("box",))
    dense = dense_pass("litemedsam", litemedsam, cases, prompts)

    def score(spec, seeds):
        s = Setting(spec, "plain", 0.4, rate=0.6)
        rows = score_setting(litemedsam, s, cases, prompts, dense, [0], seeds=seeds)
        return rows[0], s.summary

    single = [score(f"tomesd[seed={k}]", 1)[0] for k in (0, 1)]
    assert single[0]["fidelity"] != single[1]["fidelity"]  # two draws, two masks
    mean, summary = score("tomesd", 2)
    assert summary["fidelity_seeds"] == pytest.approx([r["fidelity"] for r in single])
    for key in ("fidelity", "dice", "flops"):
        assert mean[key] == pytest.approx((single[0][key] + single[1][key]) / 2)
    assert mean["name"] == single[0]["name"]
    _, summary = score("tome", 3)  # deterministic: scored once
    assert "fidelity_seeds" not in summary
    _, summary = score("structsam", 2)  # random destinations since 2026-12-07
    assert len(summary["fidelity_seeds"]) == 2


def test_cli_method_specs_and_quick_preset(monkeypatch):
    from structsam import cli

    assert cli._method_specs("structsam[screen=2,rough=0.1],tome, algm") == [
        "structsam[screen=2,rough=0.1]",
        "tome",
        "algm",
    ]
    args = cli.build_parser().parse_args(["bench", "--quick", "--limit", "4"])
    seen = {}
    monkeypatch.setattr(cli, "_bench_model", lambda a, *rest: seen.update(vars(a)) or {})
    monkeypatch.setattr(cli, "_write_bench", lambda *a: "")
    monkeypatch.chdir(pytest.importorskip("tempfile").mkdtemp())
    cli.cmd_bench(args)
    # the preset fills what the command line left at its default, and keeps the rest
    assert seen["flops_reductions"] == "0.30" and seen["prompts"] == "box"
    assert seen["limit"] == 4 and seen["repeats"] == 0 and seen["split"] == "test"


def test_evaluate_is_a_preset_of_bench(monkeypatch, tmp_path):
    from structsam import cli

    args = cli.build_parser().parse_args(["evaluate", "--out", str(tmp_path)])
    seen = {}
    monkeypatch.setattr(cli, "_bench_model", lambda a, *rest: seen.update(vars(a)) or {})
    monkeypatch.setattr(cli, "_write_bench", lambda *a: "")
    assert args.func(args) == 0
    assert seen["methods"] == "structsam" and seen["modes"] == "plain,prompt"
    assert seen["flops_reductions"] == "0.1,0.2,0.3,0.4" and seen["repeats"] == 0
    assert seen["split"] == "test"
