"""Tables and plots from evaluation results."""

from __future__ import annotations

import numpy as np


def quality_table(res: dict) -> str:
    lines = [
        f"Method `{res['method']}`, {res['n_well_posed']} well-posed box prompts of "
        f"{res['n_cases']} (dropped: unmerged Dice < 0.8), unmerged mean Dice "
        f"{res['dense_dice_mean']:.4f}.",
        "",
        "| mode | target cut | rate | measured FLOPs cut | mean Dice | Dice drop (pt) "
        "| fidelity IoU mean | fidelity IoU min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in res["settings"]:
        lines.append(
            f"| {s['mode']} | {s['target']:.0%} | {s['rate']:.3f} | {s['flops_cut']:.1%} "
            f"| {s['dice_mean']:.4f} | {s['dice_drop'] * 100:+.2f} | {s['fidelity_mean']:.4f} "
            f"| {s['fidelity_min']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def quality_plot(res: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for mode, marker in (("plain", "o"), ("prompt", "s")):
        pts = [s for s in res["settings"] if s["mode"] == mode]
        if not pts:
            continue
        x = [100 * s["flops_cut"] for s in pts]
        label = "prompt-aware" if mode == "prompt" else "content-aware"
        axes[0].plot(
            x,
            [100 * (res["dense_dice_mean"] - s["dice_drop"]) for s in pts],
            marker=marker,
            label=label,
        )
        axes[1].plot(x, [s["fidelity_mean"] for s in pts], marker=marker, label=label)
    axes[0].axhline(100 * res["dense_dice_mean"], color="k", ls="--", lw=1, label="unmerged")
    axes[0].set(xlabel="encoder FLOPs cut (%)", ylabel="mean Dice vs ground truth (%)")
    axes[1].set(xlabel="encoder FLOPs cut (%)", ylabel="mask IoU vs unmerged")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{res['method']} on LiteMedSAM, {res['n_well_posed']} well-posed box prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pct(x) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}%"


def bench_verdicts(res: dict) -> list[str]:
    """Per target cut: does StructSAM have the best fidelity and the smallest Dice drop?

    Content-only StructSAM is compared with the baselines; prompt-aware StructSAM with the
    baselines too (they cannot use the prompt). Only settings that reached their target count.
    """
    if not res.get("quality"):
        return []
    lines = []
    ok = [s for s in res["settings"] if "dice_drop" in s]
    for target in sorted({s["target"] for s in ok}):
        at = [s for s in ok if s["target"] == target]
        rivals = [s for s in at if s["method"] not in ("structsam", "random")]
        for mode in ("plain", "prompt"):
            ours = [s for s in at if s["method"] == "structsam" and s["mode"] == mode]
            if not ours or not rivals:
                continue
            o = ours[0]
            best_fid = max(rivals, key=lambda s: s["fidelity"])
            best_drop = min(rivals, key=lambda s: s["dice_drop"])
            fid_ok = o["fidelity"] > best_fid["fidelity"]
            drop_ok = o["dice_drop"] < best_drop["dice_drop"]
            label = "prompt-aware" if mode == "prompt" else "content-only"
            line = (
                f"- −{target:.0%}, StructSAM {label}: fidelity {o['fidelity']:.4f} vs best "
                f"baseline {best_fid['fidelity']:.4f} ({best_fid['method']}) → "
                f"{'best' if fid_ok else 'NOT best'}; Dice drop {100 * o['dice_drop']:.2f} pt "
                f"vs {100 * best_drop['dice_drop']:.2f} pt ({best_drop['method']}) → "
                f"{'smallest' if drop_ok else 'NOT smallest'}"
            )
            paired = _paired_dice(res, o, best_drop)
            if paired is not None:
                line += f" (per-case Dice difference {paired[0]:+.2f} ± {paired[1]:.2f} pt, s.e.)"
            lines.append(line)
    return lines


def _paired_dice(res: dict, a: dict, b: dict) -> tuple[float, float] | None:
    """Mean and standard error (points) of the per-case Dice of setting ``a`` minus ``b`` over
    the well-posed cases: how much of a difference in Dice drop is noise."""
    per = res.get("per_setting_cases", {})

    def key(s):
        return f"{s['method']}/{s['mode']}@{s['target']:.2f}"

    if key(a) not in per or key(b) not in per:
        return None
    good = {c["name"] for c in res.get("cases", []) if c.get("well_posed")}
    da = {r["name"]: r["dice"] for r in per[key(a)] if r["name"] in good}
    db = {r["name"]: r["dice"] for r in per[key(b)] if r["name"] in good}
    diff = np.array([100 * (da[n] - db[n]) for n in da if n in db])
    if len(diff) < 2:
        return None
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def bench_table(res: dict) -> str:
    """Markdown: one row per setting plus the unmerged model, for one model's results."""
    u = res["unmerged"]
    head = (
        f"### {res['model']}\n\n"
        f"{res['prompt']} prompts, {res['n_cases']} cases"
        + (
            f", {res['n_well_posed']} well-posed (unmerged Dice ≥ 0.8 and noise-stable); "
            f"quality is averaged over those"
            if res["quality"]
            else "; random weights: masks are meaningless, so no quality columns"
        )
        + f". Wall-clock: {res['device']}, {res['threads']} threads, median of interleaved "
        f"repeats on `{res['timing_case']}`.\n\n"
    )
    if res["quality"]:
        cols = (
            "| method | mode | target | rate | FLOPs cut | mIoU | Dice | Dice drop (pt) "
            "| boundary IoU | fidelity IoU | fidelity min | spectral dist. | encoder s | speed-up "
            "| peak MB |"
        )
        sep = "|" + "---|" * 15
        rows = [
            f"| unmerged | – | – | – | 0% | {u['iou']:.4f} | {u['dice']:.4f} | – "
            f"| {u['boundary_iou']:.4f} | 1 | 1 | 0 | {u['seconds']:.3f} | 1.00× "
            f"| {u['peak_memory'] / 2**20:.0f} |"
        ]
    else:
        cols = (
            "| method | mode | target | rate | FLOPs cut | GFLOP | spectral dist. | encoder s "
            "| speed-up | peak MB |"
        )
        sep = "|" + "---|" * 10
        rows = [
            f"| unmerged | – | – | – | 0% | {u['flops'] / 1e9:.1f} | 0 | {u['seconds']:.3f} "
            f"| 1.00× | {u['peak_memory'] / 2**20:.0f} |"
        ]
    for s in sorted(res["settings"], key=lambda s: (s["target"], s["mode"], s["method"])):
        mode = "prompt-aware" if s["mode"] == "prompt" else "content"
        if "flops_cut" not in s:
            n = 15 if res["quality"] else 10
            rows.append(
                f"| {s['method']} | {mode} | {s['target']:.0%} | out of reach"
                + " | –" * (n - 4)
                + " |"
            )
            continue
        common = (
            f"| {s['method']} | {mode} | {s['target']:.0%} | {s['rate']:.3f} "
            f"| {_pct(s['flops_cut'])} "
        )
        tail = (
            f"| {s['spectral_distortion']:.4f} | {s['seconds']:.3f} | {s['speedup']:.2f}× "
            f"| {s['peak_memory'] / 2**20:.0f} |"
        )
        if res["quality"]:
            rows.append(
                common + f"| {s['iou']:.4f} | {s['dice']:.4f} | {100 * s['dice_drop']:+.2f} "
                f"| {s['boundary_iou']:.4f} | {s['fidelity']:.4f} | {s['fidelity_min']:.4f} " + tail
            )
        else:
            rows.append(common + f"| {s['flops'] / 1e9:.1f} " + tail)
    text = head + "\n".join([cols, sep, *rows]) + "\n"
    verdicts = bench_verdicts(res)
    if verdicts:
        text += "\n" + "\n".join(verdicts) + "\n"
    ill = res["unmerged"].get("ill_posed")
    if ill:
        text += (
            f"\nIll-posed cases reported apart ({ill['n']}: whole-organ/tissue masks, a box does "
            f"not say which structure is meant): unmerged Dice {ill['dice']:.4f}; "
            + ", ".join(
                f"{s['method']}/{s['mode']}@{s['target']:.0%} {s['ill_posed']['dice']:.4f}"
                for s in res["settings"]
                if "ill_posed" in s and s["target"] == max(x["target"] for x in res["settings"])
            )
            + ".\n"
        )
    notes = [s for s in res["settings"] if s.get("note")]
    if notes:
        text += (
            "\nOut of reach: "
            + "; ".join(f"{s['method']}/{s['mode']}@{s['target']:.0%}: {s['note']}" for s in notes)
            + "\n"
        )
    return text


def bench_plots(results: list[dict], path) -> None:
    """Per model, against encoder GFLOPs: mean Dice vs ground truth, mean fidelity IoU vs the
    unmerged mask and wall-clock (random weights: spectral distortion and wall-clock). One line
    per method, prompt-aware dashed; the quality axes are scaled to the published methods, so
    the random floor may run below them (its label says so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 3, figsize=(15, 4.4 * len(results)), squeeze=False)
    methods = sorted({s["method"] for r in results for s in r["settings"]})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}

    def series(res, method, mode):
        pts = [
            s
            for s in res["settings"]
            if s["method"] == method and s["mode"] == mode and "flops" in s
        ]
        return sorted(pts, key=lambda s: -s["flops"])

    for row, res in zip(axes, results, strict=True):
        u = res["unmerged"]
        if res["quality"]:
            panels = [
                ("dice", 100, "mean Dice vs ground truth (%)", "quality"),
                ("fidelity", 100, "mean fidelity IoU vs unmerged mask (%)", "fidelity"),
            ]
        else:
            panels = [("spectral_distortion", 1, "spectral distortion (mean |Δλ|)", "distortion")]
        panels.append(("seconds", 1, "encoder wall-clock (s, median)", "wall-clock"))
        for ax, (key, scale, ylabel, what) in zip(row, panels, strict=False):
            shown = []  # values of the non-random methods, for the axis range
            for method in methods:
                for mode, style in (("plain", "-"), ("prompt", "--")):
                    pts = series(res, method, mode)
                    if not pts:
                        continue
                    start = {"dice": u.get("dice"), "fidelity": 1.0, "seconds": u["seconds"]}
                    start["spectral_distortion"] = 0.0
                    ys = [scale * start[key]] + [scale * s[key] for s in pts]
                    gf = [u["flops"] / 1e9] + [s["flops"] / 1e9 for s in pts]
                    label = method + (" (prompt-aware)" if mode == "prompt" else "")
                    if method != "random" or key in ("seconds", "spectral_distortion"):
                        shown += ys
                    ax.plot(gf, ys, color=colours[method], ls=style, marker="o", label=label)
            if key in ("dice", "fidelity") and shown:
                lo, hi = min(shown), max(shown)
                pad = 0.1 * (hi - lo) or 1.0
                ax.set_ylim(lo - pad, hi + pad)
                for line in ax.get_lines():
                    if line.get_label() == "random" and min(line.get_ydata()) < lo - pad:
                        line.set_label("random (runs below the axis)")
            title = f"{res['model']}: {what}"
            if key == "dice":
                title += f", {res['n_well_posed']} well-posed {res['prompt']} prompts"
            if key == "seconds":
                title += f" on {res['device']}, {res['threads']} threads"
            ax.set(xlabel="encoder GFLOPs (mean per image)", ylabel=ylabel, title=title)
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in row[len(panels) :]:
            ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
