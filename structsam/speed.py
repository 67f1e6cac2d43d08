"""Encoder wall-clock: merged against the fastest dense encoder on the same device.

Every variant of one model is built up front and timed interleaved, in a shuffled order per
round, so the noise of a shared machine hits all of them alike; medians and the min-max spread
are reported. Dense baselines at each precision are the stock encoder and structsam's lean
encoder at rate 0 (the same fused attention the merged one uses); a merged speed-up is always
against the faster of them, at the same precision (and compilation). The FLOPs cut is measured
on the timed image itself.

The allocator is held steady by default (:func:`steady_allocator`): under glibc's defaults a
variant's page faults depended on which variants ran before it in the process (LiteMedSAM's
lean fp32 encoder: 94k minor faults per encode after the published model, 5k alone; 0.52 s
against 0.43 s), which flattered every ratio against it. OpenMP's wait policy is the
process's own (the table names it): under ``OMP_WAIT_POLICY=PASSIVE``, which napari_structsam
sets for napari, threads sleep between the encoder's many small parallel regions, and every
variant ran slower, the merged ones most (LiteMedSAM fp32: dense 392 vs 364 ms, merged -30 %
357 vs 314 ms).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .flops import calibrate, encoder_flops
from .models import load_model
from .patching import patch
from .transforms import prepare_image

SPEED_IMAGE = ("axial", 80)  # MNI152 T1 slice: real anatomy, black background, padding


@dataclass
class Variant:
    name: str
    precision: str
    merged: bool
    compiled: bool = False
    rate: float = 0.0
    flops: int = 0
    compile_seconds: float | None = None
    times: list[float] = field(default_factory=list)
    fn: object = field(default=None, repr=False)

    @property
    def median(self) -> float:
        return float(np.median(self.times))


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_allocator() -> bool:
    """Tell glibc's malloc to keep freed memory (no trimming, no mmap below 1 GiB), so that no
    encode pays page faults for memory an earlier one gave back: the published LiteMedSAM then
    takes 0.56 s instead of 0.99 s, lean fp32 0.43 s instead of 0.52 s (interleaved, 20 rounds).
    Process-wide and not undone; returns False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_call(fn, x, device) -> float:
    """Seconds of the first call (where torch.compile compiles)."""
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        fn(x)
    _sync(device)
    return time.perf_counter() - start


def build_variants(
    name: str,
    checkpoint,
    image: np.ndarray,
    cuts: tuple[float, ...],
    precisions: tuple[str, ...],
    device: torch.device,
    method: str,
    compile: bool,
    log,
) -> tuple[list[Variant], torch.Tensor]:
    """Load and calibrate every variant of one model; ``compile`` adds lean and merged
    variants built with ``load_model(compile=True)`` (the parts that never merge compiled)."""
    from . import DEFAULT_RATE

    def load(precision, **kw):
        return load_model(name, checkpoint=checkpoint, device=device, precision=precision, **kw)

    probe = load("fp32")
    x, _ = prepare_image(image, probe.structsam_spec, device=device)
    # one calibration per cut (FLOPs do not depend on the number format), on the timed image
    rates = {cut: calibrate(probe, method, cut, images=[image]) for cut in cuts}
    log(f"{name}: rates {', '.join(f'{c:.0%} -> {r:.3f}' for c, r in rates.items())}")

    variants, flops = [], {}

    def add(label, model, merged, rate=0.0, compiled=False):
        v = Variant(label, model.precision, merged, compiled, rate)
        v.fn = model.image_encoder
        key = (label, model.precision)
        if compiled:  # same FLOPs as eager; counting would run under a dispatch mode
            v.flops = flops[key]
            v.compile_seconds = _first_call(v.fn, x, device)
        else:
            v.flops = flops[key] = encoder_flops(model, image)
        variants.append(v)

    add("published (fp32, as its authors build it)", load("fp32", fold_batchnorm=False), False)
    shipped = load("auto")
    patch(shipped, method, DEFAULT_RATE)
    add("shipped default", shipped, True, DEFAULT_RATE)
    for precision in precisions:
        for compiled in (False, True) if compile else (False,):
            group = [] if compiled else [("stock", load(precision), False, 0.0)]
            lean = load(precision, compile=compiled)
            patch(lean, method, 0.0)
            group.append(("lean", lean, False, 0.0))
            for cut, rate in rates.items():
                merged = load(precision, compile=compiled)
                patch(merged, method, rate)
                group.append((f"merged -{cut:.0%}", merged, True, rate))
            for label, model, is_merged, rate in group:
                add(label, model, is_merged, rate, compiled)
    return variants, x


def time_variants(variants: list[Variant], x, device, rounds: int, seed: int = 0) -> None:
    """One warm-up round, then ``rounds`` rounds in a fresh shuffled order each."""
    rng = np.random.default_rng(seed)
    with torch.inference_mode():
        for v in variants:
            v.fn(x)
        for _ in range(rounds):
            for i in rng.permutation(len(variants)):
                v = variants[i]
                _sync(device)
                start = time.perf_counter()
                v.fn(x)
                _sync(device)
                v.times.append(time.perf_counter() - start)


def summarize(variants: list[Variant], dense_flops: int) -> list[dict]:
    """Rows with the FLOPs cut and the speed-up against the fastest dense baseline."""
    published = variants[0].median
    fastest = {}
    for v in variants:
        if not v.merged and v.name != variants[0].name:
            key = (v.precision, v.compiled)
            fastest[key] = min(fastest.get(key, np.inf), v.median)
    rows = []
    for v in variants:
        base = fastest.get((v.precision, v.compiled))
        row = {k: val for k, val in asdict(v).items() if k not in ("fn", "times")}
        row.update(
            seconds=v.median,
            spread=(min(v.times), max(v.times)),
            flops_cut=1.0 - v.flops / dense_flops,
            vs_fastest_dense=base / v.median if base else None,
            vs_published=published / v.median,
        )
        rows.append(row)
    return rows


def speed_report(
    models=(("litemedsam", None), ("vit_b", "random")),
    cuts=(0.30, 0.40),
    precisions=("fp32", "bf16"),
    device="cpu",
    rounds=5,
    method="structsam",
    compile=False,
    allocator="steady",
    log=print,
) -> dict:
    """``allocator``: "steady" (:func:`steady_allocator`) or "default" (as a plain process
    runs, where the published model pays its page faults on every encode)."""
    from .models import resolve_device
    from .samples import mni152_slice

    if allocator not in ("steady", "default"):
        raise ValueError(f"allocator must be 'steady' or 'default', got {allocator!r}")
    if allocator == "steady" and not steady_allocator():
        allocator = "default (no glibc)"
    dev = resolve_device(device)
    image = mni152_slice(*SPEED_IMAGE)
    out = {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "allocator": allocator,
        # napari_structsam sets PASSIVE for napari; it slowed every variant here (see _cli)
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "image": f"MNI152 T1 {SPEED_IMAGE[0]} slice {SPEED_IMAGE[1]}",
        # the ratios depend on the chip: bf16 without AMX, and which attention kernel wins
        "cpu": cpu_description() if dev.type == "cpu" else None,
        "window_kernel": {p: window_kernel_choice(p, dev) for p in precisions},
        "rounds": rounds,
        "models": {},
    }
    for name, checkpoint in models:
        variants, x = build_variants(
            name, checkpoint, image, tuple(cuts), tuple(precisions), dev, method, compile, log
        )
        time_variants(variants, x, dev, rounds)
        dense = next(v.flops for v in variants if v.name == "lean")
        out["models"][name] = summarize(variants, dense)
        log(speed_table({**out, "models": {name: out["models"][name]}}))
        del variants
    return out


def cpu_description() -> str:
    """The CPU's model name and its bf16 matrix extensions, from /proc/cpuinfo."""
    from .models.registry import _cpu_flags

    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("model name")), "")
        name = line.partition(":")[2].strip() or name
    except OSError:
        pass
    bf16 = sorted({"amx_bf16", "avx512_bf16"} & _cpu_flags())
    return f"{name} ({', '.join(bf16) if bf16 else 'no bf16 instructions'})"


def window_kernel_choice(precision: str, device: torch.device) -> str:
    """Which kernel short attention windows run on (``patching.kernels``; measured here once
    per process, before any timing)."""
    from .models.registry import _DTYPES, resolve_precision
    from .patching.kernels import explicit_pays

    dtype = _DTYPES[resolve_precision(precision, device)]
    with torch.inference_mode():
        explicit = explicit_pays(device, dtype, 49)
    return "explicit products" if explicit else "fused kernel"


def speed_table(res: dict) -> str:
    lines = []
    setup = [f"allocator: {res['allocator']}"] if res.get("allocator") else []
    if res.get("omp_wait_policy"):
        setup.append(f"OMP_WAIT_POLICY: {res['omp_wait_policy']}")
    if res.get("cpu"):
        setup.append(res["cpu"])
    for precision, kernel in res.get("window_kernel", {}).items():
        setup.append(f"{precision} windows: {kernel}")
    for name, rows in res["models"].items():
        lines += [
            f"\n**{name}**" + (f" ({'; '.join(setup)})" if setup else "") + "\n",
            "| variant | precision | compiled | rate | GFLOP | FLOPs cut | median s (min-max) "
            "| vs fastest dense | vs published |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lo, hi = r["spread"]
            vs = f"{r['vs_fastest_dense']:.2f}x" if r["vs_fastest_dense"] else "–"
            lines.append(
                f"| {r['name']} | {r['precision']} | {'yes' if r['compiled'] else 'no'} "
                f"| {r['rate']:.3f} | {r['flops'] / 1e9:.1f} | {r['flops_cut']:.1%} "
                f"| {r['seconds']:.3f} ({lo:.3f}-{hi:.3f}) | {vs} | {r['vs_published']:.2f}x |"
            )
    return "\n".join(lines) + "\n"
