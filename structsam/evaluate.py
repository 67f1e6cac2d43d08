"""Quality and speed of merging against the unmerged model, measured honestly.

Quality: box prompts on bundled cases with known ground truth (simulated lesions in real MRI and
CT slices, the Shepp-Logan phantom, coins). A case counts only if the unmerged model is right
on it (Dice >= 0.8): elsewhere a merged mask differing from the unmerged one measures the
prompt's ambiguity, not merging. Each setting's rate is calibrated to a target FLOPs cut on a
few cases; the cut actually measured over the whole set is reported beside it.

Speed: dense and merged encoders timed in one run, interleaved, median of repeats.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .flops import calibrate, encoder_flops
from .metrics import dice, iou
from .patching import unpatch
from .predictor import Predictor


@dataclass
class CaseResult:
    name: str
    kind: str
    dice_dense: float
    noise_iou: float  # unmerged mask vs unmerged mask under sigma = 1/255 noise (mean)
    dense_flops: int
    merged: dict = field(default_factory=dict)  # setting -> {dice, fidelity, flops}


def encode_flops(predictor, image, prompts=None) -> int:
    """Encode ``image`` with ``predictor`` and return the FLOPs that took."""
    with FlopCounterMode(display=False) as counter:
        predictor.set_image(image, prompts=prompts)
    return int(counter.get_total_flops())


def prompt_mask(predictor, prompts: dict) -> np.ndarray:
    """The single-mask answer to ``prompts`` (``box``, ``point_coords``/``point_labels``)."""
    masks, _, _ = predictor.predict(
        point_coords=prompts.get("point_coords"),
        point_labels=prompts.get("point_labels"),
        box=prompts.get("box"),
    )
    return masks[0]


def noise_stability(predictor, image, prompts: dict, draws=3, sigma=1 / 255, seed=0) -> float:
    """Mean IoU of the unmerged mask against itself under Gaussian input noise of ``sigma``
    times the image's range: a prompt whose mask moves under such noise is ill-posed."""
    rng = np.random.default_rng(seed)
    img = np.asarray(image, np.float32)
    span = float(img.max() - img.min()) or 1.0
    predictor.set_image(img)
    clean = prompt_mask(predictor, prompts)
    ious = []
    for _ in range(draws):
        predictor.set_image(img + rng.normal(0, sigma * span, img.shape).astype(np.float32))
        ious.append(iou(prompt_mask(predictor, prompts), clean))
    return float(np.mean(ious))


def quality_curve(
    model,
    cases,
    reductions=(0.1, 0.2, 0.3, 0.4),
    modes=("plain", "prompt"),
    method="structsam",
    calib_count=6,
    min_dice=0.8,
    log=print,
) -> dict:
    """Dice and fidelity of ``method`` at matched FLOPs cuts, on the well-posed cases."""
    predictor = Predictor(model)
    unpatch(model)
    results: list[CaseResult] = []
    dense_masks = []
    for case in cases:
        flops = encode_flops(predictor, case.image)
        mask = prompt_mask(predictor, {"box": case.box})
        stab = noise_stability(predictor, case.image, {"box": case.box})
        results.append(CaseResult(case.name, case.kind, dice(mask, case.mask), stab, flops))
        dense_masks.append(mask)
    kept = [r.dice_dense >= min_dice for r in results]
    good = [c for c, k in zip(cases, kept, strict=True) if k]
    good_res = [r for r, k in zip(results, kept, strict=True) if k]
    good_masks = [m for m, k in zip(dense_masks, kept, strict=True) if k]
    log(f"well-posed: {len(good)} of {len(cases)} cases (unmerged Dice >= {min_dice})")
    # calibration cases: spread over kinds
    step = max(1, len(good) // calib_count)
    calib = good[::step][:calib_count]
    settings = []
    for mode in modes:
        for red in reductions:
            prompts = [{"box": c.box} for c in calib] if mode == "prompt" else None
            try:
                rate = calibrate(
                    model, method, red, images=[c.image for c in calib], prompts=prompts
                )
            except Exception as exc:  # out of reach: report, keep going
                log(f"{mode} -{red:.0%}: {exc}")
                continue
            key = f"{mode}@{red:.2f}"
            settings.append({"key": key, "mode": mode, "target": red, "rate": rate})
            for case, res, dense_mask in zip(good, good_res, good_masks, strict=True):
                prompts = {"box": case.box} if mode == "prompt" else None
                flops = encode_flops(predictor, case.image, prompts)
                mask = prompt_mask(predictor, {"box": case.box})
                res.merged[key] = {
                    "dice": dice(mask, case.mask),
                    "fidelity": iou(mask, dense_mask),
                    "flops": flops,
                }
            s = summarize(good_res, key)
            settings[-1].update(s)
            log(
                f"{key}: rate {rate:.3f}, measured cut {s['flops_cut']:.1%}, "
                f"Dice drop {s['dice_drop'] * 100:.2f} pt, fidelity {s['fidelity_mean']:.4f}"
            )
    unpatch(model)
    return {
        "method": method,
        "n_cases": len(cases),
        "n_well_posed": len(good),
        "dropped": [r.name for r, k in zip(results, kept, strict=True) if not k],
        "dense_dice_mean": float(np.mean([r.dice_dense for r in good_res])),
        "settings": settings,
        "cases": [asdict(r) for r in results],
    }


def summarize(results: list[CaseResult], key: str) -> dict:
    d = np.array([r.merged[key]["dice"] for r in results])
    d0 = np.array([r.dice_dense for r in results])
    fid = np.array([r.merged[key]["fidelity"] for r in results])
    cut = np.array([1 - r.merged[key]["flops"] / r.dense_flops for r in results])
    return {
        "flops_cut": float(cut.mean()),
        "dice_mean": float(d.mean()),
        "dice_drop": float(d0.mean() - d.mean()),
        "fidelity_mean": float(fid.mean()),
        "fidelity_min": float(fid.min()),
    }


def _sync(tensor: torch.Tensor) -> None:
    """GPU kernels run asynchronously: wait for them before reading the clock."""
    if tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)


def time_encoders(encoders: dict, image: torch.Tensor, repeats=5, warmup=1, seed=0) -> dict:
    """Median seconds per encoder forward, the encoders interleaved so noise hits all alike.

    ``encoders``: name -> callable(tensor). The order within each round is shuffled (seeded),
    so no encoder always runs right after another. Returns name -> median seconds.
    """
    names = list(encoders)
    times = {name: [] for name in names}
    rng = np.random.default_rng(seed)
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in encoders.values():
                fn(image)
        for _ in range(repeats):
            for name in rng.permutation(names):
                _sync(image)
                start = time.perf_counter()
                encoders[name](image)
                _sync(image)
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def write_json(path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=1, default=float))


__all__ = ["encoder_flops", "noise_stability", "quality_curve", "summarize", "time_encoders"]
