"""Command line: ``structsam segment`` and ``structsam info``."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import DEFAULT_RATE
from .errors import StructSAMError

SAMPLES = {
    "sample:mri": "MNI152 T1 volume bundled in nilearn (use --slice, default the middle)",
    "sample:lesion": "an MNI152 slice with a simulated lesion and its ground-truth box",
}


def _load_input(args):
    """-> (image 2D/RGB, reference for writing NIfTI or None, ground truth or None, box)."""
    from . import io, samples

    if args.image == "sample:lesion":
        from .eval.synthetic import lesion_cases

        case = lesion_cases(n_lesions=3)[0]
        return case.image, None, case.mask, case.box
    if args.image == "sample:mri":
        vol, _ = samples.mni152_volume()
        z = vol.shape[0] // 2 if args.slice is None else args.slice
        if not 0 <= z < vol.shape[0]:
            raise StructSAMError(f"--slice {z} is outside the volume's 0..{vol.shape[0] - 1}")
        return vol[z], None, None, None
    path = Path(args.image)
    if path.is_dir():
        return _load_dicom_folder(path, args)
    image, meta = io.read_image(path, slice_index=args.slice)
    reference = path if meta.get("format") in ("nii", "nii.gz") else None
    return image, reference, None, None


def _load_dicom_folder(path: Path, args):
    """One axial slice of a DICOM series, as napari and ``structsam embed`` read it."""
    from . import io

    vol, _, meta = io.read_dicom_series(path)
    n = vol.shape[0]
    z = args.slice if args.slice is not None else (0 if n == 1 else None)
    if z is None or not 0 <= z < n:
        got = "no --slice" if z is None else f"--slice {z}"
        raise StructSAMError(
            f"{path} is a DICOM series of {n} slices: {got}; pass --slice 0..{n - 1}"
        )
    args.slice = z
    reference = None
    if io.file_format(args.out) in (".nii", ".nii.gz"):
        import nibabel as nib

        # an empty volume in the series' geometry puts the mask where the slice is
        shape_xyz = vol.shape[::-1]
        reference = nib.Nifti1Image(np.zeros(shape_xyz, np.uint8), meta["affine"])
    return vol[z], reference, None, None


def _check_output(value: str, option: str, allowed, image_arg: str) -> Path:
    """Refuse an output path the writer would fail on, before any model is loaded."""
    import os

    from . import io

    path = Path(value)
    ext = io.file_format(path)
    if ext not in allowed:
        raise StructSAMError(
            f"{option} {value}: cannot write {ext or 'a file without extension'}; use "
            f"{', '.join(allowed)}"
        )
    if path.is_dir():
        raise StructSAMError(f"{option} {value} is a folder; give a file name ending {ext}")
    parent = path.parent
    if not parent.is_dir():
        raise StructSAMError(f"{option} {value}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StructSAMError(f"{option} {value}: folder {parent} is not writable")
    source = Path(image_arg)
    if not image_arg.startswith("sample:") and source.exists():
        if path.resolve() == source.resolve():
            raise StructSAMError(f"{option} {value} is the input image; write to another file")
        if source.is_dir() and source.resolve() in path.resolve().parents:
            raise StructSAMError(
                f"{option} {value} is inside the input DICOM folder, which must hold only the "
                "series' slices; write it elsewhere"
            )
    return path


def _check_settings(args) -> None:
    """Model, method, rate, device, checkpoint and output paths: all cheap, all before loading."""
    from . import io
    from .merge import METHODS
    from .models.registry import MODELS, resolve_device, resolve_precision

    if args.model not in MODELS:
        raise StructSAMError(f"--model {args.model}: unknown model; available: {', '.join(MODELS)}")
    if args.method != "none":
        if args.method not in METHODS:
            raise StructSAMError(
                f"--method {args.method}: unknown merge method; available: none, "
                f"{', '.join(METHODS)}"
            )
        from .patching.engine import check_rate

        check_rate(args.rate, METHODS[args.method], "--rate")
    device = resolve_device(args.device)
    try:
        resolve_precision(args.precision, device)
    except StructSAMError as exc:
        raise StructSAMError(f"--precision {args.precision}: {exc}") from None
    if args.checkpoint not in (None, "random") and not Path(args.checkpoint).is_file():
        raise StructSAMError(
            f"--checkpoint {args.checkpoint}: no such file (give a state-dict file or 'random')"
        )
    out = _check_output(args.out, "--out", io.WRITE_FORMATS, args.image)
    if args.merge_map:
        if args.method == "none" or args.rate == 0:
            raise StructSAMError("--merge-map needs merging: pass --method and --rate > 0")
        if args.block < 0:
            raise StructSAMError(f"--block {args.block}: must be 0 or more (a merged block)")
        pic = _check_output(args.merge_map, "--merge-map", (".png",), args.image)
        if pic.resolve() == out.resolve():
            raise StructSAMError("--merge-map and --out name the same file; give two names")
    if args.window:
        from .transforms import _check_window

        try:
            _check_window(args.window)
        except StructSAMError as exc:
            raise StructSAMError(f"--window: {exc}") from None


def _check_prompts(box, points, labels, shape):
    """Prompts checked against the image, clipped to it (with a warning) as predict would."""
    from .errors import PromptError
    from .transforms import validate_box, validate_points

    if box is not None:
        try:
            box = validate_box(box, shape)
        except PromptError as exc:
            raise PromptError(f"--box: {exc}") from None
    if points is not None:
        try:
            points, labels = validate_points(points, labels, shape)
        except PromptError as exc:
            raise PromptError(f"--point/--negative: {exc}") from None
    return box, points, labels


def cmd_segment(args) -> int:
    import structsam

    from . import io
    from .eval.metrics import dice
    from .vis import legend_strip, merge_map_layers, merge_picture, save_png

    # everything that can be wrong is checked before the model loads and the encoder runs
    _check_settings(args)
    has_prompt = args.box or args.point or args.negative
    if not has_prompt and args.image != "sample:lesion":
        raise StructSAMError("give a prompt: --box X0 Y0 X1 Y1 or --point X Y")
    image, reference, truth, sample_box = _load_input(args)
    box = np.array(args.box, float) if args.box else None
    if box is None and not args.point and sample_box is not None:
        box = sample_box
    points = labels = None
    if args.point or args.negative:
        pos = [tuple(p) for p in (args.point or [])]
        neg = [tuple(p) for p in (args.negative or [])]
        points = np.array(pos + neg, float)
        labels = np.array([1] * len(pos) + [0] * len(neg))
    box, points, labels = _check_prompts(box, points, labels, np.shape(image)[:2])

    model = structsam.load_model(
        args.model, checkpoint=args.checkpoint, device=args.device, precision=args.precision
    )
    print(f"image encoder in {model.precision}", file=sys.stderr)
    if args.method != "none" and args.rate > 0:
        structsam.patch(model, args.method, args.rate)
    predictor = structsam.Predictor(model)
    prompts = None
    if args.prompt_aware:
        prompts = {"box": box, "point_coords": points, "point_labels": labels}
        prompts = {k: v for k, v in prompts.items() if v is not None}
    window = tuple(args.window) if args.window else None
    predictor.set_image(image, window=window, prompts=prompts)
    masks, scores, _ = predictor.predict(point_coords=points, point_labels=labels, box=box)
    mask = masks[0]
    try:
        io.write_mask(args.out, mask, reference=reference, slice_index=args.slice)
    except OSError as exc:  # full disk, permissions changed since the check
        raise StructSAMError(f"--out {args.out}: cannot write the mask ({exc})") from exc
    kept = [f"{i.tokens_after}/{i.tokens_before}" for i in predictor.merge_info]
    print(f"mask: {int(mask.sum())} pixels -> {args.out} (score {scores[0]:.3f})")
    print(f"encoder: {predictor.encode_seconds:.2f} s, tokens kept per block: {kept or 'all'}")
    if truth is not None:
        print(f"Dice against the sample's ground truth: {dice(mask, truth):.3f}")
    if args.merge_map:
        if not predictor.merge_info:
            raise StructSAMError("--merge-map needs merging: pass --method and --rate > 0")
        layers = merge_map_layers(predictor, min(args.block, len(predictor.merge_info) - 1))
        picture = merge_picture(image, layers, mask, style=args.merge_map_style)
        save_png(args.merge_map, picture, footer=lambda w: legend_strip(layers, w))
        sizes = ", ".join("kept" if s == 1 else f"x{s}" for s, _ in layers.legend)
        print(f"merge map of block {layers.block} ({args.merge_map_style}; group sizes {sizes}; "
              f"protected region outlined in orange) -> {args.merge_map}")  # fmt: skip
    return 0


def cmd_info(args) -> int:
    import torch

    from .merge import METHODS
    from .models import MODELS

    print("models:")
    for name, spec in MODELS.items():
        print(f"  {name:<11} {spec.description}")
    print("methods:")
    print(f"  {'none':<11} the unmerged encoder")
    for name, m in METHODS.items():
        print(f"  {name:<11} rate = {m.rate_meaning} (max {m.max_rate})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    print("devices: " + ", ".join(devices))
    print("samples: " + ", ".join(f"{k} ({v})" for k, v in SAMPLES.items()))
    return 0


def cmd_evaluate(args) -> int:
    """A preset of ``bench``: one method, both modes, cuts 10-40 %, no timing."""
    args.methods = args.method
    args.models = args.model
    args.checkpoint = [f"{args.model}={args.checkpoint}"] if args.checkpoint else None
    args.modes = "plain,prompt"
    args.repeats = 0
    for name, value in _BENCH_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return cmd_bench(args)


def cmd_speed(args) -> int:
    import json

    import torch

    from .merge import METHODS
    from .speed import speed_report, speed_table

    if args.method not in METHODS:  # before any model is loaded
        raise StructSAMError(
            f"--method {args.method!r}: speed times a method by name ({', '.join(METHODS)}); "
            "options such as NAME[key=value] are for `structsam bench`"
        )
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = [(m, "random" if m.startswith("vit") else None) for m in args.models.split(",")]
    res = speed_report(
        models,
        cuts=_floats(args.cuts, "--cuts"),
        precisions=tuple(args.precisions.split(",")),
        device=args.device,
        rounds=args.rounds,
        method=args.method,
        compile=args.compile,
        allocator=args.allocator,
    )
    (out / "speed.json").write_text(json.dumps(res, indent=1, default=float))
    (out / "speed.md").write_text(speed_table(res))
    return 0


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"error: {option} {text}: give comma-separated numbers") from None


_BENCH_DEFAULTS = {
    "prompts": "box,point",
    "jitter": 0.0,
    "data": None,
    "limit": None,
    "lesions": 160,
    "random_weight_cases": 2,
    "calibration_cases": 4,
    "spectral_cases": 3,
    "split": "test",
    "cache": None,
    "quick": False,
    "quiet": False,
    "seeds": 1,
}
# --quick: a first look in a few minutes (one cut, box prompts, fewer cases, no timing)
_QUICK = {"flops_reductions": "0.30", "prompts": "box", "limit": 30, "repeats": 0}
_PARSER_DEFAULTS = {"flops_reductions": "0.25,0.30,0.40", "prompts": "box,point", "limit": None}
_PARSER_DEFAULTS["repeats"] = 3


def _bench_cases(args, quality: bool):
    """(scored cases, tuning cases for calibration) from the bundled set or ``--data``."""
    from .eval import synthetic

    if args.data:
        from .eval.datasets import load_dataset

        cases = load_dataset(args.data)
    else:
        cases = synthetic.evaluation_cases(n_lesions=args.lesions)
    scored = synthetic.split_cases(cases, args.split)
    tuning = synthetic.split_cases(cases, "tuning") or cases
    if not quality:  # random weights: FLOPs, time and distortion need only a few images
        scored = scored[: args.random_weight_cases]
    if args.limit:
        scored = scored[:: max(1, len(scored) // args.limit)][: args.limit]
    if not scored:
        raise StructSAMError(f"no case in the {args.split} split")
    return scored, tuning


def _bench_model(args, name, ckpt, settings, log_file, on_update):
    from tqdm import tqdm

    import structsam

    from .eval.protocol import BenchConfig, run_bench

    quality = ckpt != "random"
    model = structsam.load_model(name, checkpoint=ckpt, device=args.device)
    cases, tuning = _bench_cases(args, quality)
    cache = Path(args.cache) if args.cache else Path(args.out) / "dense_cache"
    config = BenchConfig(
        prompt_kinds=tuple(p.strip() for p in args.prompts.split(",")),
        jitter=args.jitter,
        quality=quality,
        repeats=args.repeats,
        calib_count=1 if not quality else args.calibration_cases,
        spectral_count=1 if not quality else args.spectral_cases,
        cache_dir=cache,
        split=args.split,
        seeds=args.seeds,
    )
    with tqdm(total=len(cases), desc=name, unit="encode", disable=args.quiet) as bar:

        def log(line, bar=bar):
            bar.write(line)
            print(line, file=log_file, flush=True)

        return run_bench(
            name + (" (random weights)" if not quality else ""),
            model,
            cases,
            tuning,
            settings,
            config,
            progress=bar.update,
            set_total=lambda n, bar=bar: setattr(bar, "total", n),
            log=log,
            on_update=on_update,
        )


def _write_bench(out: Path, results: list[dict], command: str) -> str:
    """results.json first, then the tables and plots (a failing plot must not lose numbers)."""
    import json
    import traceback

    from .eval.report import bench_plots, bench_table, spectral_plot

    for res in results:
        res["command"] = command
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    tables = ""
    try:
        tables = "\n".join(bench_table(r) for r in results)
        (out / "results.md").write_text(f"`{command}`\n\n" + tables)
        bench_plots(results, out / "bench.png")
        spectral_plot(results, out / "spectral.png")
    except Exception:  # report the bug, keep the run going: results.json has every number
        print(traceback.format_exc(), file=sys.stderr)
    return tables


def cmd_bench(args) -> int:
    import torch

    from .eval.protocol import plan_settings, timestamp

    if args.quick:  # the preset's values, where the command line left the default
        for name, value in _QUICK.items():
            if getattr(args, name) == _PARSER_DEFAULTS.get(name):
                setattr(args, name, value)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = {}
    for item in args.checkpoint or []:
        model_name, sep, value = item.partition("=")
        if not sep:
            raise StructSAMError(f"--checkpoint takes MODEL=PATH (or MODEL=random), got {item!r}")
        checkpoints[model_name] = value
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = _method_specs(args.methods)
    settings_for = {
        m: plan_settings(
            methods,
            _floats(args.flops_reductions, "--flops-reductions"),
            tuple(x.strip() for x in args.modes.split(",")),
        )
        for m in models
    }
    command = "structsam " + " ".join(sys.argv[1:])
    results: list[dict] = []
    with open(out / "bench.log", "a") as log_file:
        print(f"{timestamp()} {command}", file=log_file, flush=True)
        for name in models:

            def partial(res, done=results):
                _write_bench(out, [*done, res], command)

            res = _bench_model(
                args, name, checkpoints.get(name), settings_for[name], log_file, partial
            )
            results.append(res)
            tables = _write_bench(out, results, command)
    print(tables)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'bench.png'}")
    return 0


def _method_specs(text: str) -> list[str]:
    """Comma-separated methods, where a method may carry options in brackets:
    ``structsam[screen=2,rough=0.2],tome``."""
    specs, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            specs.append(cur.strip())
            cur = ""
        else:
            cur += ch
    specs.append(cur.strip())
    return [s for s in specs if s]


def cmd_embed(args) -> int:
    from .embed import run_cli

    return run_cli(args)


@dataclass(frozen=True)
class Command:
    """A subcommand that a package above structsam adds to the command line: the napari
    plugin's ``annotate`` (its console script is ``structsam``). structsam itself never
    imports the plugin."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]

    def add_to(self, sub) -> None:
        parser = sub.add_parser(self.name, help=self.help)
        self.configure(parser)
        parser.set_defaults(func=self.run)


# commands that the napari plugin provides, for a clear message where it is not in charge
PLUGIN_COMMANDS = {"annotate": "the napari plugin's (napari_structsam)"}


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line, like every other error of the command line."""

    def error(self, message):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _add_segment(sub) -> None:
    seg = sub.add_parser("segment", help="segment one image (or one slice) from a prompt")
    seg.add_argument("image", help="PNG/TIFF/NPY/NIfTI/DICOM file, or " + ", ".join(SAMPLES))
    seg.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"))
    seg.add_argument("--point", nargs=2, type=float, action="append", metavar=("X", "Y"))
    seg.add_argument("--negative", nargs=2, type=float, action="append", metavar=("X", "Y"))
    seg.add_argument("--model", default="litemedsam")
    seg.add_argument("--checkpoint", default=None)
    seg.add_argument("--device", default="cpu")
    seg.add_argument("--precision", default="auto", help="image encoder: auto, fp32, bf16, fp16")
    seg.add_argument("--method", default="structsam")
    seg.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        help=f"merge rate ({DEFAULT_RATE}: about 35%% fewer FLOPs)",
    )
    seg.add_argument("--prompt-aware", action="store_true", help="protect the prompt region")
    seg.add_argument("--slice", type=int, default=None, help="slice index of a 3D volume")
    seg.add_argument("--window", nargs=2, type=float, metavar=("LOW", "HIGH"))
    seg.add_argument("--out", required=True, help="mask file: .png, .npy or .nii.gz")
    seg.add_argument("--merge-map", default=None, help="also write a merge-map picture (PNG)")
    seg.add_argument("--block", type=int, default=0, help="which merged block's map to draw")
    seg.add_argument(
        "--merge-map-style",
        choices=("compression", "groups"),
        default="compression",
        help="compression: one hue, stronger where more tokens merged (default); groups: a "
        "random colour per merged group",
    )
    seg.set_defaults(func=cmd_segment)


def _add_embed(sub) -> None:
    em = sub.add_parser(
        "embed", help="precompute every slice's embedding of volumes into a cache (resumable)"
    )
    em.add_argument("volumes", nargs="+", help="NIfTI file, DICOM folder, .npy or sample:mri")
    em.add_argument("--out", default=None, help="cache folder (default: $STRUCTSAM_CACHE_DIR)")
    em.add_argument("--model", default="litemedsam")
    em.add_argument("--checkpoint", default=None)
    em.add_argument("--device", default="cpu")
    em.add_argument("--precision", default="auto", help="image encoder: auto, fp32, bf16, fp16")
    em.add_argument(
        "--compile", action="store_true", help="torch.compile the parts that never merge"
    )
    em.add_argument("--method", default="structsam", help="merge method, or none")
    em.add_argument("--rate", type=float, default=DEFAULT_RATE)
    em.add_argument("--window", default=None, help="preset (ct-lung, mr-percentiles...) or L,H")
    em.add_argument("--volume", type=int, default=None, help="volume index of a 4D/5D NIfTI")
    em.add_argument("--slices", default=None, help="only these slices, START:STOP")
    em.add_argument("--max-size", default=None, help="cache size limit, e.g. 8G")
    em.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    em.add_argument("--workers", type=int, default=None, help="local Dask workers")
    em.add_argument("--threads", type=int, default=None, help="torch threads per volume")
    em.add_argument("--no-progress", action="store_true")
    em.set_defaults(func=cmd_embed)


def cmd_bench_3d(args) -> int:
    """3D propagation on simulated lesions (structsam.eval.propagation): one box, 3D Dice."""
    import json

    import torch

    from .eval import propagation as p3d

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(settings) - set(p3d.SETTINGS))
    if unknown or not settings:
        raise StructSAMError(f"--settings takes {', '.join(p3d.SETTINGS)}, got {args.settings!r}")
    out = Path(args.out) if args.out else None
    if out is not None and (out.exists() and not out.is_dir() or not out.parent.is_dir()):
        raise StructSAMError(f"--out {out}: give a folder (it is created inside an existing one)")
    torch.set_num_threads(args.threads)
    if args.tune:
        rules, score, scored = p3d.tune(progress=print)
        print(f"best stop rules on the tuning cases (mean Dice {score:.3f}): {rules}")
        return 0
    variants = p3d.VARIANTS if args.variants else None
    rows = p3d.run(args.split, settings, variants, progress=print, limit=args.limit)
    names = list(variants or p3d.DEFAULT_VARIANTS)
    tables = "\n\n".join(f"**{n}**\n\n{p3d.format_table(rows, n)}" for n in names)
    print(tables)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(tables + "\n")
        (out / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(f"table -> {out / 'table.md'}, rows -> {out / 'rows.json'}")
    return 0


def _add_bench_3d(sub) -> None:
    b3 = sub.add_parser(
        "bench-3d", help="3D propagation from one box on simulated lesions (MNI152, CT): 3D Dice"
    )
    b3.add_argument("--split", choices=("test", "tuning", "all"), default="test")
    b3.add_argument("--settings", default="unmerged,merged", help="unmerged, merged or both")
    b3.add_argument("--limit", type=int, default=None, help="only the first N cases")
    b3.add_argument("--out", default=None, help="folder for table.md and rows.json")
    b3.add_argument("--threads", type=int, default=2)
    b3.add_argument("--tune", action="store_true", help="choose the stop rules on the tuning cases")
    b3.add_argument(
        "--variants", action="store_true", help="also the stop rules' runner-up (box margin)"
    )
    b3.set_defaults(func=cmd_bench_3d)


def _add_evaluate(sub) -> None:
    ev = sub.add_parser(
        "evaluate", help="a preset of bench: one method, both modes, cuts 10-40 %%, no timing"
    )
    ev.add_argument("--model", default="litemedsam")
    ev.add_argument("--checkpoint", default=None)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--method", default="structsam")
    ev.add_argument("--flops-reductions", default="0.1,0.2,0.3,0.4")
    ev.add_argument("--split", default="test", choices=["test", "tuning", "all"])
    ev.add_argument("--lesions", type=int, default=160)
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument("--out", default="eval_out")
    ev.set_defaults(func=cmd_evaluate)


def _add_speed(sub) -> None:
    sp = sub.add_parser(
        "speed", help="encoder wall-clock: merged against the fastest dense encoder, interleaved"
    )
    sp.add_argument("--models", default="litemedsam,vit_b", help="vit_* use random weights")
    sp.add_argument("--cuts", default="0.30,0.40", help="FLOPs cuts to calibrate merging to")
    sp.add_argument("--precisions", default="fp32,bf16")
    sp.add_argument("--compile", action="store_true", help="also time torch.compile'd encoders")
    sp.add_argument("--method", default="structsam")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--rounds", type=int, default=5)
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument(
        "--allocator",
        choices=("steady", "default"),
        default="steady",
        help="steady: glibc keeps freed memory, so no variant pays page faults that depend on "
        "what ran before it; default: as a plain process runs",
    )
    sp.add_argument("--out", default="speed_out")
    sp.set_defaults(func=cmd_speed)


def build_parser(extra_commands=()) -> argparse.ArgumentParser:
    """The parser of every command; ``extra_commands``: commands (:class:`Command`) added by
    packages above structsam (the napari plugin's ``annotate``)."""
    parser = _Parser(prog="structsam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment(sub)
    _add_evaluate(sub)
    _add_speed(sub)
    be = sub.add_parser(
        "bench", help="all merge methods against the unmerged encoder, at matched FLOPs"
    )
    be.add_argument("--models", default="litemedsam", help="comma-separated, e.g. litemedsam,vit_b")
    be.add_argument(
        "--checkpoint",
        action="append",
        metavar="MODEL=PATH",
        help="checkpoint per model (MODEL=random: random weights, no quality figures)",
    )
    # PiToMe with the fixed margin 0.5 that the tuning split preferred over its depth schedule
    # (fidelity 0.879 against 0.867 at -30 %: docs/bench_tuning/README.md)
    be.add_argument(
        "--methods", default="structsam,tome,pitome[margin=0.5],tomesd,vidtome,algm,random"
    )
    be.add_argument("--flops-reductions", default="0.25,0.30,0.40")
    be.add_argument("--modes", default="plain,prompt", help="plain (content only), prompt")
    be.add_argument("--prompts", default="box,point", help="prompt kinds per case: box,point")
    be.add_argument("--jitter", type=float, default=0.0, help="box jitter, fraction of its side")
    be.add_argument("--data", default=None, help="dataset folder/file (default: bundled cases)")
    be.add_argument(
        "--split",
        default="test",
        choices=["test", "tuning", "all"],
        help="which split is scored (rates are always calibrated on the tuning split)",
    )
    be.add_argument("--limit", type=int, default=None, help="score at most this many cases")
    be.add_argument("--lesions", type=int, default=160)
    be.add_argument("--random-weight-cases", type=int, default=2)
    be.add_argument("--calibration-cases", type=int, default=4)
    be.add_argument("--spectral-cases", type=int, default=3)
    be.add_argument("--repeats", type=int, default=3, help="timed encodes per setting (0: none)")
    be.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="seeds of a randomized method (StructSAM, ToMeSD, VidToMe, random), averaged "
        "per prompt",
    )
    be.add_argument(
        "--cache", default=None, help="dense-pass cache folder (default OUT/dense_cache)"
    )
    be.add_argument("--quick", action="store_true", help="a first look: -30 %% only, 30 cases, box")
    be.add_argument("--device", default="cpu")
    be.add_argument("--threads", type=int, default=2)
    be.add_argument("--quiet", action="store_true", help="no progress bar")
    be.add_argument("--out", default="bench_out")
    be.set_defaults(func=cmd_bench)
    _add_embed(sub)
    for command in extra_commands:
        command.add_to(sub)
    info = sub.add_parser("info", help="list models, methods and devices")
    info.set_defaults(func=cmd_info)
    _add_bench_3d(sub)
    return parser


def _format_warning(message, category, filename, lineno, line=None):
    # one line per warning, as the errors are; the source line means nothing to a CLI user
    return f"warning: {message}\n"


def main(argv=None, extra_commands=()) -> int:
    """Run one command; ``extra_commands`` as for :func:`build_parser`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    names = {c.name for c in extra_commands}
    if argv and argv[0] in PLUGIN_COMMANDS and argv[0] not in names:
        print(
            f"error: `{argv[0]}` is {PLUGIN_COMMANDS[argv[0]]} command: run it through the "
            f"`structsam` console script or `python -m napari_structsam {argv[0]}` (it needs "
            "napari: pip install '.[napari]')",
            file=sys.stderr,
        )
        return 2
    args = build_parser(extra_commands).parse_args(argv)
    start = time.perf_counter()
    # formatwarning, not showwarning: pytest.warns and other recorders still see the warnings
    saved, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        code = args.func(args)
    except StructSAMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = saved
    if args.command == "segment":
        print(f"done in {time.perf_counter() - start:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
