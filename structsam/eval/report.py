"""Tables and plots from :func:`structsam.eval.protocol.run_bench` results."""

from __future__ import annotations

import math

import numpy as np

OURS = "structsam"
MATCH = 0.02  # a setting whose measured cut is further than this from its target is unmatched
SMALLER_CUT = 0.005  # a first place at a cut this much below the runner-up's is flagged


def _key(s: dict) -> str:
    return f"{s['method']}/{s['mode']}@{s['target']:.2f}"


def _base(method: str) -> str:
    return method.split("[", 1)[0]


def paired(res: dict, a: dict, b: dict, field: str = "dice") -> tuple[float, float, int] | None:
    """Mean and standard error (points) of the per-prompt ``field`` of setting ``a`` minus
    ``b`` over the scored well-posed prompts, and their count."""
    per = res.get("per_setting_prompts", {})
    if _key(a) not in per or _key(b) not in per:
        return None
    va = {r["name"]: r[field] for r in per[_key(a)]}
    vb = {r["name"]: r[field] for r in per[_key(b)]}
    return _paired_values(va, vb)


def worst_cases(res: dict, a: dict, b: dict, count: int = 3) -> list[tuple[str, float]]:
    """The prompts where ``a``'s fidelity falls furthest below ``b``'s (name, points)."""
    per = res.get("per_setting_prompts", {})
    va = {r["name"]: r["fidelity"] for r in per.get(_key(a), [])}
    vb = {r["name"]: r["fidelity"] for r in per.get(_key(b), [])}
    gaps = sorted((100 * (va[n] - vb[n]), n) for n in va if n in vb)
    return [(n, g) for g, n in gaps[:count] if g < 0]


def _cut(s: dict) -> str:
    """A setting's measured FLOPs cut as the verdict lines write it."""
    return f"cut {100 * s['flops_cut']:.1f} %"


def _ours(at: list[dict]) -> dict | None:
    mine = [s for s in at if s["method"] == OURS]
    return mine[0] if mine else None


def verdicts(res: dict) -> list[str]:
    """Per mode and target: is StructSAM's mean fidelity IoU the highest of all methods
    (random excluded, and any setting whose measured cut misses the target by more than
    ``MATCH``)? Where not, by how much, and which prompts cause it."""
    if not res.get("quality"):
        return []
    lines = []
    ok = [s for s in res["settings"] if "fidelity" in s]
    for mode in ("plain", "prompt"):
        for target in sorted({s["target"] for s in ok}):
            at = [s for s in ok if s["target"] == target and s["mode"] == mode]
            o = _ours(at)
            # only settings whose cut measured on the scored prompts matches the target count:
            # an adaptive method calibrated on tuning images may cut far less on other content
            off = [s for s in at if abs(s["flops_cut"] - target) > MATCH]
            rivals = [s for s in at if _base(s["method"]) not in (OURS, "random") and s not in off]
            if o is None or not rivals:
                continue
            best = max(rivals, key=lambda s: s["fidelity"])
            label = "prompt-aware" if mode == "prompt" else "content-only"
            gap = paired(res, o, best, "fidelity")
            first = o["fidelity"] > best["fidelity"]
            line = (
                f"- −{target:.0%}, {label}: StructSAM fidelity {o['fidelity']:.4f} ({_cut(o)}), "
                f"best other {best['method']} {best['fidelity']:.4f} ({_cut(best)}) → "
                f"{'first' if first else 'NOT first'}"
            )
            if gap:
                line += f" (paired {gap[0]:+.2f} ± {gap[1]:.2f} pt, n = {gap[2]})"
            less = best["flops_cut"] - o["flops_cut"]
            if first and less > SMALLER_CUT:
                # within MATCH of the target, but a win bought with less merging is no win
                line += f"; StructSAM cuts {100 * less:.1f} points less, so this is not a win at "
                line += "equal compute"
            if not first:
                cases = worst_cases(res, o, best)
                line += "; largest deficits: " + ", ".join(f"{n} {g:+.1f} pt" for n, g in cases)
            if off:
                line += "; not at matched compute, left out: " + ", ".join(
                    f"{s['method']} ({_cut(s)})" for s in off
                )
            lines.append(line)
    return lines


def _curves(res: dict, method: str, mode: str) -> dict[str, list[tuple[float, float]]]:
    """Each well-posed prompt's measured (FLOPs cut, fidelity IoU) points for one method and
    mode, starting at the unmerged model's (0, 1)."""
    dense = {p["name"]: p["flops"] for p in res.get("prompts", []) if p.get("well_posed")}
    per = res.get("per_setting_prompts", {})
    points: dict[str, list[tuple[float, float]]] = {}
    for s in res["settings"]:
        if s["method"] != method or s["mode"] != mode:
            continue
        for r in per.get(_key(s), None) or []:
            if r["name"] in dense:
                cut = 1 - r["flops"] / dense[r["name"]]
                points.setdefault(r["name"], [(0.0, 1.0)]).append((cut, r["fidelity"]))
    return points


def at_equal_compute(res: dict, method: str, mode: str, target: float) -> dict[str, float]:
    """Each prompt's fidelity IoU at exactly ``target`` FLOPs cut of its own image, read off
    its measured curve: linear between the unmerged model (0, 1) and the method's settings,
    the last segment extended at most ``MATCH`` past the largest cut measured; a prompt the
    method did not reach that far has no value. The rates are calibrated on tuning images,
    so a method's cut differs from image to image (StructSAM's with the flat area); this
    compares every method at the same compute on every prompt."""
    out = {}
    for name, pts in _curves(res, method, mode).items():
        cut, fid = (np.array(v) for v in zip(*sorted(pts), strict=True))
        if target <= cut[-1]:
            out[name] = float(np.interp(target, cut, fid))
        elif target - cut[-1] <= MATCH:
            slope = (fid[-1] - fid[-2]) / max(cut[-1] - cut[-2], 1e-9)
            out[name] = float(min(1.0, fid[-1] + slope * (target - cut[-1])))
    return out


def _paired_values(a: dict[str, float], b: dict[str, float]) -> tuple[float, float, int] | None:
    """Mean and standard error (points) of a - b over the prompts both hold, and their count."""
    diff = np.array([100 * (a[n] - b[n]) for n in a if n in b])
    if len(diff) < 2:
        return None
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff))), len(diff)


def _equal_compute_rows(res: dict, mode: str, target: float) -> list[tuple]:
    """(method, prompts reached, mean fidelity, paired difference from ours or None) per
    method, ranked by the paired difference: the means are over different prompts where a
    method fell short of the cut on some images."""
    methods = sorted({s["method"] for s in res["settings"] if s["mode"] == mode})
    vals = {m: at_equal_compute(res, m, mode, target) for m in methods}
    ours = vals.get(OURS, {})
    rows = [
        (
            m,
            len(v),
            float(np.mean(list(v.values()))),
            None if m == OURS else _paired_values(v, ours),
        )
        for m, v in vals.items()
        if v
    ]
    return sorted(rows, key=lambda r: -(r[3][0] if r[3] else 0.0))


def _equal_compute_verdict(rows: list[tuple], n_all: int, where: str) -> str | None:
    mine = [r for r in rows if r[0] == OURS]
    rivals = [r for r in rows if _base(r[0]) not in (OURS, "random") and r[3]]
    if not mine or not rivals:
        return None
    line = f"- {where}, equal compute: StructSAM "
    ahead = [f"{m} {g[0]:+.2f} ± {g[1]:.2f}" for m, _, _, g in rivals if g[0] > 0]
    if ahead:
        line += f"NOT first ({mine[0][1]} of {n_all} prompts reached); ahead of it (pt): "
        return line + ", ".join(ahead)
    m, _, _, g = rivals[0]  # the closest rival
    return (
        line
        + f"first ({mine[0][1]} of {n_all} prompts reached; next {m} {g[0]:+.2f} ± {g[1]:.2f} pt)"
    )


def equal_compute_table(res: dict) -> str:
    """Markdown: every method's fidelity IoU at exactly each target cut, per prompt
    (:func:`at_equal_compute`), with the paired difference from StructSAM of the same mode
    and a verdict per mode and target."""
    if not res.get("quality") or not res.get("per_setting_prompts"):
        return ""
    n_all = res["n_well_posed"]
    out = [
        "**At equal compute on every prompt** (fidelity IoU read off each prompt's measured "
        "curve at exactly the target cut of its own image; a prompt counts where the method's "
        f"largest cut came within {100 * MATCH:.0f} points of the target; Δ: paired per-prompt "
        "difference from StructSAM of the same mode on the prompts both reached, points, mean "
        "± s.e.)",
        "",
        "| cut | mode | method | prompts | fidelity IoU | Δ vs ours |",
        "|---|---|---|---|---|---|",
    ]
    verdicts_, head = [], len(out)
    for mode in ("plain", "prompt"):
        label = "prompt-aware" if mode == "prompt" else "content-only"
        for target in sorted({s["target"] for s in res["settings"]}):
            rows = _equal_compute_rows(res, mode, target)
            for m, n, mean, g in rows:
                delta = f"{g[0]:+.2f} ± {g[1]:.2f} (n = {g[2]})" if g else "–"
                out.append(
                    f"| −{target:.0%} | {label} | {m} | {n} of {n_all} | {mean:.4f} | {delta} |"
                )
            line = _equal_compute_verdict(rows, n_all, f"−{target:.0%}, {label}")
            verdicts_ += [line] if line else []
    if len(out) == head:  # results without per-prompt FLOPs (written before 2026-12-01)
        return ""
    return "\n".join(out + [""] + verdicts_) + "\n"


def _row(res: dict, s: dict, ours: dict | None) -> str:
    mode = "prompt-aware" if s["mode"] == "prompt" else "content"
    if "flops_cut" not in s:
        why = (
            f"out of reach: {s['note'][:90]}"
            if s.get("note")
            else "not run (the run was cut short)"
        )
        return f"| {s['method']} | {mode} | {why} |"
    cells = [s["method"], mode, f"{s['rate']:.3f}", f"{100 * s['flops_cut']:.1f}%"]
    if res["quality"]:
        worst = s.get("fidelity_min", float("nan"))  # absent from results before 2026-12-01
        cells += [f"{s['fidelity']:.4f}", f"{worst:.3f}", f"{s['dice']:.4f}"]
        cells += [f"{100 * s['dice_drop']:+.2f}"]
        for field in ("dice", "fidelity"):
            p = paired(res, s, ours, field) if ours is not None and s is not ours else None
            cells.append(f"{p[0]:+.2f} ± {p[1]:.2f}" if p else "–")
    cells += [f"{s.get('spectral_window', float('nan')):.4g}"]
    cells += [f"{s.get('spectral_global', float('nan')):.4g}"]
    if "seconds" in s:
        cells += [f"{s['seconds']:.3f}", f"{s['speedup']:.2f}×"]
    return "| " + " | ".join(cells) + " |"


def bench_table(res: dict) -> str:
    """Markdown: per target cut, one table of every method, both modes."""
    timed = any("seconds" in s for s in res["settings"])
    u = res["unmerged"]
    head = (
        f"### {res['model']}, {res.get('split', 'test')} split\n\n"
        f"{res['n_prompts']} prompts ({', '.join(res['prompt_kinds'])}) on {res['n_cases']} "
        f"cases from {len(res.get('sources', []))} sources (an image, or a slab of 16 MNI152 "
        "slices)"
    )
    if res["quality"]:
        head += (
            f"; {res['n_well_posed']} well-posed (unmerged Dice ≥ 0.8 and noise-stable), "
            f"unmerged mean Dice {u['dice']:.4f}; every figure is over those. Rates calibrated "
            f"on {res['calibration']['n_images']} tuning-split images. Paired columns: per-prompt "
            "difference from StructSAM of the same mode (points, mean ± s.e.; negative: worse "
            "than StructSAM). Worst: the lowest fidelity IoU of any prompt (a method that "
            "concentrates its merging can lose one object while the mean holds)."
        )
    cols = ["method", "mode", "rate", "FLOPs cut"]
    if res["quality"]:
        cols += ["fidelity IoU", "worst", "Dice", "Dice drop (pt)", "ΔDice vs ours"]
        cols += ["Δfidelity vs ours"]
    cols += ["spectral (window)", "spectral (global)"]
    if timed:
        cols += ["encoder s", "speed-up"]
    out = [head, ""]
    for target in sorted({s["target"] for s in res["settings"]}):
        out += [f"**−{target:.0%} FLOPs**", ""]
        out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for mode in ("plain", "prompt"):
            at = [s for s in res["settings"] if s["target"] == target and s["mode"] == mode]
            ours = _ours(at)
            out += [_row(res, s, ours) for s in sorted(at, key=lambda s: -s.get("fidelity", 0))]
        out.append("")
    text = "\n".join(out)
    lines = verdicts(res)
    if lines:
        text += "\n" + "\n".join(lines) + "\n"
    equal = equal_compute_table(res)
    if equal:
        text += "\n" + equal
    return text


def bench_plots(results: list[dict], path) -> None:
    """Per model, against the measured FLOPs cut: fidelity IoU, Dice, and both spectral
    distortions (log scale); prompt-aware dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("fidelity", "mean fidelity IoU vs unmerged mask"),
        ("dice", "mean Dice vs ground truth"),
        ("spectral_global", "spectral distortion, whole grid (log)"),
        ("spectral_window", "spectral distortion, per window (log)"),
    ]
    fig, axes = plt.subplots(len(results), 4, figsize=(20, 4.4 * len(results)), squeeze=False)
    for row, res in zip(axes, results, strict=True):
        methods = sorted({s["method"] for s in res["settings"]})
        colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
        for ax, (key, title) in zip(row, panels, strict=True):
            if key in ("fidelity", "dice") and not res["quality"]:
                ax.set_visible(False)
                continue
            if not _plot_curves(ax, res["settings"], key, colours):
                ax.set_visible(False)  # e.g. no spectral cases were run
                continue
            if key.startswith("spectral"):
                ax.set_yscale("log")
            ax.set(xlabel="encoder FLOPs cut (%)", title=f"{res['model']}: {title}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(ax, settings: list[dict], key: str, colours: dict) -> bool:
    """One line per method and mode (prompt-aware dashed): ``key`` against the FLOPs cut.
    Settings without a finite ``key`` are left out; returns whether anything was drawn."""
    drawn = False
    for method, colour in colours.items():
        for mode, style in (("plain", "-"), ("prompt", "--")):
            pts = sorted(
                (
                    s
                    for s in settings
                    if s["method"] == method and s["mode"] == mode and _finite(s.get(key))
                ),
                key=lambda s: s["flops_cut"],
            )
            if pts:
                label = method + (" (prompt-aware)" if mode == "prompt" else "")
                xs = [100 * s["flops_cut"] for s in pts]
                ax.plot(xs, [s[key] for s in pts], ls=style, marker="o", color=colour, label=label)
                drawn = True
    return drawn


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def spectral_plot(results: list[dict], path) -> None:
    """The spectral distortion of every method (random included) against the FLOPs cut, whole
    grid and per window, content-only and prompt-aware."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = results[0]
    keys = ("spectral_global", "spectral_window")
    if not any(_finite(s.get(k)) for s in res["settings"] for k in keys):
        return  # no spectral cases were run: no empty picture
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted({s["method"] for s in res["settings"]})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for ax, key in zip(axes, keys, strict=True):
        _plot_curves(ax, res["settings"], key, colours)
        where = "whole grid" if key == "spectral_global" else "per attention window"
        ax.set(
            xlabel="encoder FLOPs cut (%)",
            ylabel="mean relative error of the lowest λ",
            title=f"{res['model']}: {where}",
        )
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
