"""The one evaluation protocol: every merge method against the unmerged encoder, at matched FLOPs.

``structsam bench`` runs it; ``structsam evaluate`` is a preset of it (StructSAM alone, more
cuts, no timing). Per model:

1. **Dense pass.** The unmerged model answers every prompt (a box and a point per ground-truth
   object, single-mask output); the masks, FLOPs and noise stability are cached on disk, keyed
   by model, image, mask and prompt, so a rerun skips them.
2. **Well-posed rule (the only one).** A prompt is well-posed when its case is not marked
   ambiguous (whole-organ masks), the unmerged Dice is >= 0.8, and the unmerged mask is stable
   under input noise (mean IoU >= 0.9 against the masks under sigma = 1/255 noise). Elsewhere a
   merged mask that differs from the unmerged one measures the prompt's ambiguity, not merging.
3. **Calibration.** Each setting's rate (method, mode, FLOPs-cut target) is calibrated on a few
   *tuning-split* images (FLOPs need no ground truth), never on the scored cases; the cut
   measured over the scored prompts is reported beside the target.
4. **Scoring** on the well-posed prompts of the scored split (the test split by default): Dice,
   IoU, boundary IoU against ground truth, fidelity IoU against the unmerged mask, encoder
   FLOPs. Content-only settings encode each image once for all its prompts; prompt-aware ones
   encode per prompt (the protected tokens depend on it).
5. **Spectral distortion** of each merged stage on a few scored images
   (:mod:`structsam.eval.spectral`), per window and on the whole grid.
6. **Timing** (optional): one copy of the model per setting, interleaved, medians; peak memory.

Models with random weights (``quality=False``) get FLOPs, spectral distortion and timing only.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
import re
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..errors import MergeError, StructSAMError
from ..flops import encoder_flops, mean_reduction
from ..merge import get_method
from ..patching import patch, recording, unpatch
from ..patching import prompts as merge_prompts
from ..predictor import Predictor, model_prompts
from ..transforms import prepare_image
from .metrics import boundary_iou, dice, iou
from .spectral import merge_distortion
from .synthetic import Case

PROMPT_KINDS = ("box", "point", "box+point")
MIN_DICE = 0.8
MIN_STABILITY = 0.9
_SPEC = re.compile(r"^([A-Za-z0-9_]+)(?:\[(.*)\])?$")


def parse_method(spec: str) -> tuple[str, dict]:
    """``"pitome[m0=0.75,alpha=1]"`` -> ``("pitome", {"m0": 0.75, "alpha": 1.0})``: a method
    with options, for tuning (values are numbers, ``true``/``false`` or ``none``)."""
    match = _SPEC.match(spec.strip())
    if not match:
        raise StructSAMError(f"method {spec!r}: write NAME or NAME[key=value,...]")
    name, body = match.group(1), match.group(2)
    get_method(name)  # an unknown name fails here, before any encode
    options = {}
    for item in filter(None, (body or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise StructSAMError(f"method {spec!r}: option {item!r} is not key=value")
        low = value.strip().lower()
        if low in ("true", "false", "none"):
            options[key.strip()] = {"true": True, "false": False, "none": None}[low]
        else:
            try:
                options[key.strip()] = float(value)
            except ValueError:
                options[key.strip()] = value.strip()
    return name, options


@dataclass
class Setting:
    method: str  # a method spec: name, optionally with [options]
    mode: str  # "plain" (content only) or "prompt" (prompt-aware)
    target: float  # FLOPs-reduction target
    rate: float | None = None
    note: str = ""  # why the target is out of reach
    summary: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.method}/{self.mode}@{self.target:.2f}"

    @property
    def name(self) -> str:
        return parse_method(self.method)[0]

    @property
    def options(self) -> dict:
        return parse_method(self.method)[1]


def plan_settings(methods, reductions, modes=("plain", "prompt")) -> list[Setting]:
    settings = []
    for method in methods:
        parse_method(method)
        for mode in modes:
            if mode not in ("plain", "prompt"):
                raise StructSAMError(f"--modes: {mode!r} is neither plain nor prompt")
            settings.extend(Setting(method, mode, float(r)) for r in reductions)
    return settings


@dataclass
class Prompt:
    """One prompt on one case: ``case`` indexes the case list, ``kind`` is box/point/..."""

    case: int
    kind: str
    prompt: dict
    name: str


def case_prompt(case: Case, prompt: str, jitter: float = 0.0, rng=None) -> dict:
    """The prompt dict for ``case`` (image pixels). ``jitter``: box corners move by up to that
    fraction of the box's side, uniformly (seeded ``rng``)."""
    if prompt not in PROMPT_KINDS:
        raise StructSAMError(f"prompt must be one of {', '.join(PROMPT_KINDS)}, got {prompt!r}")
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


def make_prompts(cases: Sequence[Case], kinds=("box", "point"), jitter=0.0) -> list[Prompt]:
    rng = np.random.default_rng(0)
    return [
        Prompt(i, kind, case_prompt(case, kind, jitter, rng), f"{case.name}/{kind}")
        for i, case in enumerate(cases)
        for kind in kinds
    ]


# --------------------------------------------------------------------------------------------
# encodes


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


def _scores(mask: np.ndarray, truth: np.ndarray) -> dict:
    return {
        "dice": dice(mask, truth),
        "iou": iou(mask, truth),
        "boundary_iou": boundary_iou(mask, truth),
    }


def _image_groups(cases: Sequence[Case], prompts: Sequence[Prompt]) -> dict[str, list[int]]:
    """Prompt indices grouped by identical image content (coins share one photograph)."""
    groups: dict[str, list[int]] = {}
    keys = {}
    for j, p in enumerate(prompts):
        if p.case not in keys:
            keys[p.case] = hashlib.sha1(np.ascontiguousarray(cases[p.case].image)).hexdigest()
        groups.setdefault(keys[p.case], []).append(j)
    return groups


# --------------------------------------------------------------------------------------------
# 1-2. dense pass and the well-posed rule


def well_posed(row: dict, hint: bool = True) -> bool:
    """The protocol's one rule (module docstring, step 2)."""
    return bool(hint and row["dice"] >= MIN_DICE and row["stability"] >= MIN_STABILITY)


def _dense_key(model_name: str, case: Case, p: Prompt) -> str:
    h = hashlib.sha1(model_name.encode())
    h.update(np.ascontiguousarray(case.image).tobytes())
    h.update(np.packbits(case.mask).tobytes())
    for k in sorted(p.prompt):
        h.update(k.encode() + np.asarray(p.prompt[k], float).tobytes())
    return h.hexdigest()[:20]


def dense_pass(
    model_name: str,
    model,
    cases: Sequence[Case],
    prompts: Sequence[Prompt],
    *,
    cache_dir: Path | None = None,
    draws: int = 3,
    sigma: float = 1 / 255,
    tick: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    """The unmerged model's answer to every prompt: FLOPs, mask, scores against ground truth,
    noise stability and the well-posed flag (cached per prompt in ``cache_dir``)."""
    unpatch(model)
    predictor = Predictor(model)
    rows: list[dict | None] = [None] * len(prompts)
    for idx in _image_groups(cases, prompts).values():
        keys = [_dense_key(model_name, cases[prompts[j].case], prompts[j]) for j in idx]
        files = [cache_dir / f"{k}.pkl" if cache_dir else None for k in keys]
        if all(f is not None and f.exists() for f in files):
            for j, f in zip(idx, files, strict=True):
                rows[j] = pickle.loads(f.read_bytes())
            tick(len(idx))
            continue
        image = np.asarray(cases[prompts[idx[0]].case].image, np.float32)
        flops = encode_flops(predictor, image)
        masks = [prompt_mask(predictor, prompts[j].prompt) for j in idx]
        rng = np.random.default_rng(0)
        span = float(image.max() - image.min()) or 1.0
        stab = np.zeros(len(idx))
        for _ in range(draws):
            predictor.set_image(image + rng.normal(0, sigma * span, image.shape).astype(np.float32))
            stab += [
                iou(prompt_mask(predictor, prompts[j].prompt), m)
                for j, m in zip(idx, masks, strict=True)
            ]
        for j, m, s, f in zip(idx, masks, stab / draws, files, strict=True):
            case = cases[prompts[j].case]
            row = {"name": prompts[j].name, "kind": case.kind, "prompt": prompts[j].kind}
            row.update(flops=flops, stability=float(s), mask=m, **_scores(m, case.mask))
            row["well_posed"] = well_posed(row, case.well_posed_hint)
            if f is not None:
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(pickle.dumps(row))
            rows[j] = row
        tick(len(idx))
    return rows


# --------------------------------------------------------------------------------------------
# 3-4. calibration and scoring


def calibrate_targets(model, method: str, mode: str, targets, images, prompts, tol=0.01):
    """Rates of ``method`` (a spec) in ``mode`` for every FLOPs-cut target, on ``images``
    (tuning data): ``{target: rate}``, or the MergeError's message where out of reach.

    One regula-falsi search per target, sharing every measured (rate, cut) across targets, so
    three targets cost little more than one."""
    name, options = parse_method(method)
    top = get_method(name).max_rate
    aware = list(prompts) if mode == "prompt" else [None] * len(images)
    patch(model, name, 0.0, **options)
    dense = [encoder_flops(model, im) for im in images]
    seen: dict[float, float] = {}

    def cut(rate):
        if rate not in seen:
            patch(model, name, rate, **options)
            seen[rate] = mean_reduction(model, images, aware, dense)
        return seen[rate]

    out = {}
    for target in targets:
        try:
            out[target] = _search_target(cut, seen, name, top, target, tol)
        except MergeError as exc:
            out[target] = str(exc)
    unpatch(model)
    return out


# the smallest rate tried: ALGM's rate is 1 - tau (scaled), and at tau = 0.9987 (rate 1e-3) the
# cells of identical tokens (padding, black background) and its adaptive global stage already
# cut 28 % of LiteMedSAM's FLOPs; -25 % needs tau ~ 0.9999
MIN_RATE = 1e-5


def _search_target(cut, seen, name, top, target, tol) -> float:
    lo, hi = MIN_RATE, top
    if cut(lo) > target + tol:
        raise MergeError(
            f"{name} cannot cut encoder FLOPs by as little as {target:.0%}: at its smallest "
            f"rate ({lo}) it already cuts {cut(lo):.1%}"
        )
    if cut(hi) < target - tol:
        raise MergeError(
            f"{name} cannot cut FLOPs by {target:.0%}: at rate {hi} it cuts {cut(hi):.1%}"
        )
    for _ in range(20):
        # the tightest bracket measured so far, then a secant step inside it
        lo = max((r for r, c in seen.items() if c <= target), default=lo)
        hi = min((r for r, c in seen.items() if c >= target), default=hi)
        for r in (lo, hi):
            if abs(seen[r] - target) <= tol:
                return r
        c_lo, c_hi = seen[lo], seen[hi]
        mid = lo + (target - c_lo) * (hi - lo) / max(c_hi - c_lo, 1e-9)
        cut(min(max(mid, lo + 0.1 * (hi - lo)), hi - 0.1 * (hi - lo)))
    raise MergeError(f"calibration of {name} did not converge near {target:.0%}")


def score_setting(
    model, s: Setting, cases, prompts, dense, used, tick=lambda n: None, seeds: int = 1
) -> list:
    """Per prompt (None where not in ``used``): FLOPs, scores and fidelity of setting ``s``.

    A randomized method (``MethodInfo.randomized``) is scored with ``seeds`` seeds (from the
    spec's ``seed`` option, 0 by default, upwards) and each prompt's figures are averaged: on
    the 480-lesion tuning split, ToMeSD's mean fidelity was 0.9533, 0.9561 and 0.9487 at -25 %
    FLOPs and 0.9102, 0.9128 and 0.9048 at -40 % with seeds 0, 1 and 2 (57 prompts): draws
    differ by as much as the methods being compared.
    ``s.summary["fidelity_seeds"]`` keeps each seed's mean fidelity.
    """
    options = dict(s.options)
    first = int(options.pop("seed", 0))
    count = max(1, seeds) if get_method(s.name).randomized else 1
    runs = []
    for k in range(count):
        patch(model, s.name, s.rate, seed=first + k, **options)
        last = k == count - 1
        runs.append(_score_once(model, s.mode, cases, prompts, dense, used, tick if last else None))
    if count == 1:
        return runs[0]
    if "fidelity" in runs[0][used[0]]:
        s.summary["fidelity_seeds"] = [
            float(np.mean([rows[j]["fidelity"] for j in used])) for rows in runs
        ]
    return [
        None if row is None else _mean_row([r[j] for r in runs]) for j, row in enumerate(runs[0])
    ]


def _mean_row(rows: list[dict]) -> dict:
    """One prompt's rows from several seeds -> their mean (numbers) or the first (the rest)."""
    out = dict(rows[0])
    for key, value in out.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(np.mean([r[key] for r in rows]))
    return out


def _score_once(model, mode: str, cases, prompts, dense, used, tick) -> list:
    predictor = Predictor(model)
    rows: list[dict | None] = [None] * len(prompts)
    wanted = set(used)
    if mode == "plain":
        batches = [[j for j in g if j in wanted] for g in _image_groups(cases, prompts).values()]
    else:
        batches = [[j] for j in used]
    for batch in filter(None, batches):
        image = cases[prompts[batch[0]].case].image
        aware = prompts[batch[0]].prompt if mode == "prompt" else None
        flops = encode_flops(predictor, image, aware)
        for j in batch:
            mask = prompt_mask(predictor, prompts[j].prompt)
            row = {
                "name": prompts[j].name,
                "flops": flops,
                **_scores(mask, cases[prompts[j].case].mask),
            }
            row["fidelity"] = iou(mask, dense[j]["mask"])
            rows[j] = row
        if tick is not None:
            tick(len(batch))
    return rows


def spectral_setting(model, s: Setting, cases, prompts, picks) -> dict:
    """Mean spectral distortion of ``s``'s merges over the prompts ``picks``."""
    patch(model, s.name, s.rate, **s.options)
    predictor = Predictor(model)
    values = []
    for j in picks:
        aware = prompts[j].prompt if s.mode == "prompt" else None
        with recording(model) as feats:
            predictor.set_image(cases[prompts[j].case].image, prompts=aware)
        values.append(merge_distortion(feats, predictor.merge_info))
    return {k: float(np.mean([v[k] for v in values])) for k in values[0]} if values else {}


def _spread(items: Sequence, count: int) -> list:
    step = max(1, len(items) // max(count, 1))
    return list(items[::step][:count])


# --------------------------------------------------------------------------------------------
# 6. timing and memory


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
            # a sparse tensor has no storage of its own; its index and value tensors (made by
            # ops of their own) are counted
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.is_sparse_csr:
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


def time_settings(model, settings, image, prompt: dict | None, repeats: int) -> dict:
    """Median seconds and peak memory of the unmerged encoder and each calibrated setting."""
    unpatch(model)
    device = next(model.parameters()).device
    tensor, geometry = prepare_image(image, model.structsam_spec, device=device)
    encoders = {"unmerged": model.image_encoder}
    for s in settings:
        if s.rate is None:
            continue
        twin = copy.deepcopy(model)
        patch(twin, s.name, s.rate, **s.options)
        enc = twin.image_encoder
        if s.mode == "prompt" and prompt is not None:
            held = model_prompts(prompt, geometry)

            def enc(t, twin=twin, held=held):
                with merge_prompts(twin, held):
                    return twin.image_encoder(t)

        encoders[s.key] = enc
    times = time_encoders(encoders, tensor, repeats=repeats)
    memory = {k: peak_memory(e, tensor) for k, e in encoders.items()}
    return {k: {"seconds": times[k], "peak_memory": memory[k]} for k in encoders}


# --------------------------------------------------------------------------------------------
# the whole protocol


@dataclass
class BenchConfig:
    prompt_kinds: tuple[str, ...] = ("box", "point")
    jitter: float = 0.0
    quality: bool = True
    repeats: int = 3  # timed encodes per setting; 0: no timing
    calib_count: int = 4  # tuning images the rates are calibrated on
    spectral_count: int = 3  # scored images the spectral distortion is averaged over
    cache_dir: Path | None = None
    split: str = "test"
    seeds: int = 1  # draws of a randomized method, averaged per prompt (score_setting)


def _mean(rows, key):
    return float(np.mean([r[key] for r in rows])) if rows else float("nan")


def summarize(rows: list[dict], dense_rows: list[dict]) -> dict:
    """Means over ``rows`` (one setting's scored prompts) against the dense rows."""
    out = {"n": len(rows), "flops": _mean(rows, "flops")}
    if rows and "dice" in rows[0]:
        for key in ("dice", "iou", "boundary_iou"):
            out[key] = _mean(rows, key)
    if dense_rows:
        if "dice" in out:
            out["dice_drop"] = _mean(dense_rows, "dice") - out["dice"]
        out["flops_cut"] = 1 - out["flops"] / _mean(dense_rows, "flops")
    if rows and "fidelity" in rows[0]:
        out["fidelity"] = _mean(rows, "fidelity")
        out["fidelity_min"] = float(min(r["fidelity"] for r in rows))
    return out


def calibration_inputs(calib_cases: Sequence[Case], count: int, kinds) -> tuple[list, list]:
    """``count`` tuning images spread over the list, with their (first-kind) prompts."""
    picked = _spread(list(calib_cases), count)
    return [c.image for c in picked], [case_prompt(c, kinds[0]) for c in picked]


def run_bench(
    name: str,
    model,
    cases: Sequence[Case],
    calib_cases: Sequence[Case],
    settings: Sequence[Setting],
    config: BenchConfig,
    *,
    progress: Callable[[int], None] | None = None,
    set_total: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
    on_update: Callable[[dict], None] | None = None,
) -> dict:
    """Benchmark one model on ``cases`` (the scored split), its rates calibrated on
    ``calib_cases`` (the tuning split); see the module docstring. Returns a JSON-ready dict."""
    tick = progress or (lambda n: None)
    kinds = config.prompt_kinds if config.quality else config.prompt_kinds[:1]
    prompts = make_prompts(cases, kinds, config.jitter)
    dense = _dense_rows(name, model, cases, prompts, config, tick)
    good = [j for j, r in enumerate(dense) if r["well_posed"]]
    if not good:
        raise StructSAMError(
            f"{name}: no well-posed prompt (unmerged Dice >= {MIN_DICE} and noise-stable) among "
            f"{len(prompts)}: nothing to compare merging against"
        )
    log(f"{name}: {len(good)} of {len(prompts)} prompts well-posed ({config.split} split)")
    calib_images, calib_prompts = calibration_inputs(calib_cases, config.calib_count, kinds)
    spectral = _spread(good, config.spectral_count)
    if set_total is not None:
        set_total(len(prompts) + len(settings) * len(good))
    _calibrate_all(model, settings, calib_images, calib_prompts, log)
    per_setting: dict[str, list | None] = {}
    fixed = (name, config, cases, prompts, dense, good, settings, per_setting)
    # the most telling cut first, so that a run cut short still compares every method at it
    order = sorted(settings, key=lambda s: (_PRIORITY.get(round(s.target, 2), 9), s.target))
    for s in order:
        per_setting[s.key] = _run_setting(
            model, s, cases, prompts, dense, good, spectral, tick, log, config.seeds
        )
        if on_update is not None:
            on_update(_assemble(*fixed, {}, calib_cases, calib_images))
    unpatch(model)
    timing = {}
    if config.repeats > 0:
        j = good[0]
        image, prompt = cases[prompts[j].case].image, prompts[j].prompt
        timing = time_settings(model, settings, image, prompt, config.repeats)
    return _assemble(*fixed, timing, calib_cases, calib_images)


def _dense_rows(name, model, cases, prompts, config: BenchConfig, tick) -> list[dict]:
    """The dense pass; with random weights only the FLOPs (masks would mean nothing)."""
    if config.quality:
        return dense_pass(name, model, cases, prompts, cache_dir=config.cache_dir, tick=tick)
    predictor = Predictor(model)
    flops = [encode_flops(predictor, cases[p.case].image) for p in prompts]
    return [
        {"name": p.name, "flops": f, "well_posed": True}
        for p, f in zip(prompts, flops, strict=True)
    ]


_PRIORITY = {0.3: 0, 0.4: 1, 0.25: 2}


def _calibrate_all(model, settings, images, prompts, log) -> None:
    """Every setting's rate (or its note, when out of reach), one search per method and mode."""
    groups: dict[tuple[str, str], list[Setting]] = {}
    for s in settings:
        groups.setdefault((s.method, s.mode), []).append(s)
    for (method, mode), group in groups.items():
        rates = calibrate_targets(model, method, mode, [s.target for s in group], images, prompts)
        for s in group:
            value = rates[s.target]
            if isinstance(value, str):
                s.note = value
                log(f"{s.key}: {value}")
            else:
                s.rate = float(value)
        log(
            f"calibrated {method}/{mode}: "
            + ", ".join(f"{s.target:.2f} -> {s.rate}" for s in group)
        )


def _run_setting(model, s, cases, prompts, dense, good, spectral, tick, log, seeds=1):
    if s.rate is None:
        tick(len(good))
        return None
    rows = score_setting(model, s, cases, prompts, dense, good, tick, seeds)
    s.summary.update(spectral_setting(model, s, cases, prompts, spectral))
    summary = summarize([rows[j] for j in good], [dense[j] for j in good])
    line = f"{s.key}: rate {s.rate:.3f}, FLOPs cut {summary['flops_cut']:.1%}"
    if "fidelity" in summary:
        line += (
            f", Dice drop {100 * summary['dice_drop']:.2f} pt, fidelity {summary['fidelity']:.4f}"
        )
    if "fidelity_seeds" in s.summary:
        line += " (seeds: " + ", ".join(f"{f:.4f}" for f in s.summary["fidelity_seeds"]) + ")"
    if "spectral_global" in s.summary:
        line += f", spectral {s.summary['spectral_window']:.4g}/{s.summary['spectral_global']:.4g}"
    log(line)
    return rows


def _assemble(
    name,
    config,
    cases,
    prompts,
    dense,
    good,
    settings,
    per_setting,
    timing,
    calib_cases,
    calib_images,
):
    dense_good = [dense[j] for j in good]
    out_settings = []
    for s in settings:
        entry = {
            "method": s.method,
            "mode": s.mode,
            "target": s.target,
            "rate": s.rate,
            "note": s.note,
        }
        rows = per_setting.get(s.key)
        if rows is not None:
            entry.update(summarize([rows[j] for j in good], dense_good))
            entry.update(s.summary)
            if s.key in timing:
                entry.update(timing[s.key])
                entry["speedup"] = timing["unmerged"]["seconds"] / timing[s.key]["seconds"]
        out_settings.append(entry)
    unmerged = {"rate": 0.0, **summarize(dense_good, []), **timing.get("unmerged", {})}
    case_rows = [{k: v for k, v in r.items() if k != "mask"} for r in dense]
    return {
        "model": name,
        "quality": config.quality,
        "split": config.split,
        "prompt_kinds": list(config.prompt_kinds),
        "jitter": config.jitter,
        "threads": torch.get_num_threads(),
        "n_cases": len(cases),
        "n_prompts": len(prompts),
        "n_well_posed": len(good),
        "sources": sorted(
            {str(c.meta.get("image_id") or c.meta.get("source") or c.name) for c in cases}
        ),
        "calibration": {
            "split": "tuning",
            "n_images": len(calib_images),
            "cases": [c.name for c in _spread(list(calib_cases), len(calib_images))],
        },
        "unmerged": unmerged,
        "settings": out_settings,
        "prompts": case_rows,
        "per_setting_prompts": {
            key: [r for j, r in enumerate(rows) if r is not None and j in set(good)]
            for key, rows in per_setting.items()
            if rows is not None
        },
    }


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
