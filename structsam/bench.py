"""``structsam bench``: every merge method against the unmerged encoder, at matched compute.

Protocol (after the paper): one prompt per ground-truth object (a box, a point or both, the box
optionally jittered), single-mask output. Per model:

1. The unmerged model segments every case; a case is *well-posed* when its Dice is >= 0.8 and its
   mask is stable under input noise (mean IoU >= 0.9 against the mask under sigma = 1/255
   noise). Elsewhere a merged mask that differs from the unmerged one measures the prompt's
   ambiguity, not merging, so quality is averaged over well-posed cases only; the rest are
   listed, and cases the dataset marks ill-posed (whole-organ masks) are summarised apart.
2. Each method's rate is calibrated, per FLOPs-reduction target and mode (content-only, or
   prompt-aware where the method can protect prompts), on a few well-posed cases; the cut
   measured over all cases is reported beside the target.
3. Quality per case: Dice, IoU, boundary IoU against ground truth, fidelity IoU against the
   unmerged mask, encoder FLOPs. Spectral distortion of each stage's merge, on a few images.
4. Wall-clock: one copy of the model per setting, all timed in one run, interleaved in a
   shuffled order each round, medians; peak memory of one encode.

Models with random weights (``checkpoint="random"``) get FLOPs, wall-clock, memory and spectral
distortion only: their masks mean nothing.
"""

from __future__ import annotations

import copy
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import MergeError, StructSAMError
from .evaluate import encode_flops, noise_stability, prompt_mask, time_encoders
from .flops import calibrate
from .merge import get_method
from .metrics import boundary_iou, dice, iou
from .patching import merge_state, patch, unpatch
from .predictor import Predictor, model_prompts
from .samples import Case
from .spectral import spectral_distortion
from .transforms import prepare_image

PROMPTS = ("box", "point", "box+point")
MIN_DICE = 0.8
MIN_STABILITY = 0.9


@dataclass
class Setting:
    method: str
    mode: str  # "plain" (content only) or "prompt" (prompt-aware)
    target: float  # FLOPs-reduction target
    rate: float | None = None
    note: str = ""  # why the target is out of reach
    summary: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.method}/{self.mode}@{self.target:.2f}"


def case_prompt(case: Case, prompt: str, jitter: float = 0.0, rng=None) -> dict:
    """The prompt dict for ``case`` (image pixels). ``jitter``: box corners move by up to that
    fraction of the box's side, uniformly (seeded ``rng``)."""
    if prompt not in PROMPTS:
        raise StructSAMError(f"--prompt must be one of {', '.join(PROMPTS)}, got {prompt!r}")
    out = {}
    if "box" in prompt:
        box = np.asarray(case.box, float).copy()
        if jitter > 0:
            side = np.array([box[2] - box[0], box[3] - box[1]] * 2) + 1
            box += (rng or np.random.default_rng(0)).uniform(-jitter, jitter, 4) * side
            h, w = case.image.shape[:2]
            box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1])
            box = np.concatenate([np.minimum(box[:2], box[2:]), np.maximum(box[:2], box[2:])])
        out["box"] = box
    if "point" in prompt:
        out["point_coords"] = np.asarray(case.point, float).reshape(1, 2)
        out["point_labels"] = np.array([1])
    return out


class _PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensors created during a forward and still alive (CPU activations).

    Storages are counted once however many views point at them and released when the last
    tensor made here that refers to them is garbage collected.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list] = {}  # data_ptr -> [tensor count, bytes]

    def _release(self, ptr: int) -> None:
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            ptr = t.untyped_storage().data_ptr()
            entry = self._refs.get(ptr)
            if entry is None:
                entry = self._refs[ptr] = [0, t.untyped_storage().nbytes()]
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def peak_memory(encoder, tensor: torch.Tensor) -> int:
    """Peak bytes allocated by one encoder forward beyond its input: CUDA's allocator
    statistics on a GPU, live tensor bytes traced through the dispatcher on the CPU."""
    with torch.inference_mode():
        if tensor.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            encoder(tensor)
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated() - base)
        with _PeakTensorMemory() as tracker:
            encoder(tensor)
        return int(tracker.peak)


def merge_distortion(model, image, prompts=None) -> float:
    """Mean spectral distortion over the merged stages of one encode of ``image``."""
    state = merge_state(model)
    if state is None:
        return 0.0
    predictor = Predictor(model)
    state.record_features = True
    try:
        predictor.set_image(image, prompts=prompts)
        feats = dict(state.features)
    finally:
        state.record_features = False
        state.features = {}
    values = []
    seen = set()
    for info in predictor.merge_info:
        if info.stage in seen or info.stage not in feats:
            continue
        seen.add(info.stage)
        grid_window = info.plan.grid.window
        values.append(spectral_distortion(feats[info.stage], info.merge_map, grid_window))
    return float(np.mean(values)) if values else 0.0


def _scores(mask: np.ndarray, truth: np.ndarray) -> dict:
    """Quality of ``mask`` against ground truth ``truth``."""
    return {
        "dice": dice(mask, truth),
        "iou": iou(mask, truth),
        "boundary_iou": boundary_iou(mask, truth),
    }


def _spread(items: Sequence, count: int) -> list:
    step = max(1, len(items) // max(count, 1))
    return list(items[::step][:count])


def _summary(rows: list[dict], dense_rows: list[dict]) -> dict:
    def mean(key, rs):
        return float(np.mean([r[key] for r in rs])) if rs else float("nan")

    out = {"n": len(rows), "flops": mean("flops", rows)}
    quality = bool(rows) and "dice" in rows[0]  # random weights: FLOPs only
    if quality:
        out.update(dice=mean("dice", rows), iou=mean("iou", rows))
        out["boundary_iou"] = mean("boundary_iou", rows)
    if dense_rows:
        if quality:
            out["dice_drop"] = mean("dice", dense_rows) - out["dice"]
            out["iou_drop"] = mean("iou", dense_rows) - out["iou"]
        out["flops_cut"] = 1 - out["flops"] / mean("flops", dense_rows)
    if rows and "fidelity" in rows[0]:
        out["fidelity"] = mean("fidelity", rows)
        out["fidelity_min"] = float(min(r["fidelity"] for r in rows))
    return out


def plan_settings(methods, reductions, modes=("plain", "prompt")) -> list[Setting]:
    settings = []
    for method in methods:
        get_method(method)  # an unknown name fails here, before any encode
        for mode in modes:
            settings.extend(Setting(method, mode, float(r)) for r in reductions)
    return settings


def bench_model(
    name: str,
    model,
    cases: Sequence[Case],
    settings: Sequence[Setting],
    *,
    prompt: str = "box",
    jitter: float = 0.0,
    quality: bool = True,
    repeats: int = 5,
    calib_count: int = 4,
    spectral_count: int = 2,
    progress: Callable[[int], None] | None = None,
    set_total: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Benchmark one model (see the module docstring); returns a JSON-ready dict."""
    tick = progress or (lambda n: None)
    rng = np.random.default_rng(0)
    prompts = [case_prompt(c, prompt, jitter, rng) for c in cases]
    unpatch(model)
    predictor = Predictor(model)
    device = next(model.parameters()).device

    # 1. the unmerged model; the well-posedness filter
    dense = []
    for case, pr in zip(cases, prompts, strict=True):
        flops = encode_flops(predictor, case.image)
        row = {"name": case.name, "kind": case.kind, "flops": flops}
        if quality:
            mask = prompt_mask(predictor, pr)
            row.update(
                _scores(mask, case.mask),
                stability=noise_stability(predictor, case.image, pr),
                well_posed_hint=case.well_posed_hint,
            )
            row["well_posed"] = bool(
                case.well_posed_hint
                and row["dice"] >= MIN_DICE
                and row["stability"] >= MIN_STABILITY
            )
            row["_mask"] = mask
        else:
            row["well_posed"] = True
        dense.append(row)
        tick(1)
    good = [i for i, r in enumerate(dense) if r["well_posed"]]
    ill = [i for i, r in enumerate(dense) if quality and not r["well_posed_hint"]]
    if not good:
        raise StructSAMError(
            f"{name}: no well-posed case (unmerged Dice >= {MIN_DICE} and noise-stable) "
            f"among {len(cases)}: nothing to compare merging against"
        )
    log(f"{name}: {len(good)} of {len(cases)} cases well-posed")
    calib = _spread(good, calib_count)
    spectral = _spread(good, spectral_count)
    timing_case = good[0]
    # merged settings segment only the cases some summary uses: well-posed and ill-posed ones
    used = sorted(set(good) | set(ill))
    if set_total is not None:  # the progress bar's length, now that it is known
        set_total(len(cases) + len(settings) * len(used))

    # 2-3. calibrate every setting, then segment every case with it
    results = []
    for s in settings:
        cal_prompts = [prompts[i] if s.mode == "prompt" else None for i in calib]
        try:
            s.rate = calibrate(
                model,
                s.method,
                s.target,
                images=[cases[i].image for i in calib],
                prompts=cal_prompts,
            )
        except MergeError as exc:
            s.note = str(exc)
            log(f"{s.key}: {exc}")
            tick(len(used))
            results.append({"setting": s, "rows": []})
            continue
        rows: list[dict | None] = [None] * len(cases)
        for i in used:
            case, pr = cases[i], prompts[i]
            flops = encode_flops(predictor, case.image, pr if s.mode == "prompt" else None)
            row = {"name": case.name, "flops": flops}
            if quality:
                mask = prompt_mask(predictor, pr)
                row.update(_scores(mask, case.mask), fidelity=iou(mask, dense[i]["_mask"]))
            rows[i] = row
            tick(1)
        s.summary["spectral_distortion"] = float(
            np.mean(
                [
                    merge_distortion(
                        model, cases[i].image, prompts[i] if s.mode == "prompt" else None
                    )
                    for i in spectral
                ]
            )
        )
        results.append({"setting": s, "rows": rows})
        log(_progress_line(s, rows, dense, good))

    # 4. wall-clock and memory: one patched copy per setting, interleaved
    unpatch(model)
    image = cases[timing_case].image
    tensor, geometry = prepare_image(image, model.structsam_spec, device=device)
    encoders = {"unmerged": model.image_encoder}
    for s in settings:
        if s.rate is None:
            continue
        twin = copy.deepcopy(model)
        patch(twin, s.method, s.rate)
        if s.mode == "prompt":
            merge_state(twin).prompts = model_prompts(prompts[timing_case], geometry)
        encoders[s.key] = twin.image_encoder
    times = time_encoders(encoders, tensor, repeats=repeats)
    memory = {k: peak_memory(enc, tensor) for k, enc in encoders.items()}
    del encoders

    # summaries
    dense_good = [dense[i] for i in good]
    out_settings = []
    for res in results:
        s, rows = res["setting"], res["rows"]
        entry = {
            "method": s.method,
            "mode": s.mode,
            "target": s.target,
            "rate": s.rate,
            "note": s.note,
        }
        if rows:
            entry.update(_summary([rows[i] for i in good], dense_good))
            all_cut = 1 - np.mean([rows[i]["flops"] for i in used]) / np.mean(
                [dense[i]["flops"] for i in used]
            )
            entry["flops_cut_all"] = float(all_cut)
            entry.update(s.summary)
            if ill:
                entry["ill_posed"] = _summary([rows[i] for i in ill], [dense[i] for i in ill])
            entry["seconds"] = times[s.key]
            entry["speedup"] = times["unmerged"] / times[s.key]
            entry["peak_memory"] = memory[s.key]
        out_settings.append(entry)
    for d in dense:
        d.pop("_mask", None)
    unmerged = {
        "rate": 0.0,
        "seconds": times["unmerged"],
        "peak_memory": memory["unmerged"],
        "spectral_distortion": 0.0,
        **_summary(dense_good, []),
    }
    if ill:
        unmerged["ill_posed"] = _summary([dense[i] for i in ill], [])
    return {
        "model": name,
        "quality": quality,
        "prompt": prompt,
        "jitter": jitter,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "n_cases": len(cases),
        "n_well_posed": len(good),
        "n_ill_posed": len(ill),
        "calibration_cases": [cases[i].name for i in calib],
        "timing_case": cases[timing_case].name,
        "unmerged": unmerged,
        "settings": out_settings,
        "cases": dense,
        "per_setting_cases": {
            res["setting"].key: [r for r in res["rows"] if r is not None]
            for res in results
            if res["rows"]
        },
    }


def _progress_line(s: Setting, rows, dense, good) -> str:
    cut = 1 - np.mean([rows[i]["flops"] for i in good]) / np.mean([dense[i]["flops"] for i in good])
    line = f"{s.key}: rate {s.rate:.3f}, FLOPs cut {cut:.1%}"
    if "fidelity" in rows[good[0]]:
        fid = np.mean([rows[i]["fidelity"] for i in good])
        drop = np.mean([dense[i]["dice"] for i in good]) - np.mean([rows[i]["dice"] for i in good])
        line += f", Dice drop {100 * drop:.2f} pt, fidelity {fid:.4f}"
    return line


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
