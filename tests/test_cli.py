"""The command line on real files."""

import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from test_io import write_dicom_series

import structsam.models
from structsam.cli import main
from structsam.errors import StructSAMError
from structsam.eval.metrics import dice
from structsam.eval.synthetic import phantom_cases
from structsam.io import read_volume


def test_segment_a_nifti_slice(tmp_path, capsys):
    case = next(c for c in phantom_cases() if c.name == "phantom-ellipse-5")
    vol = np.stack([case.image * 1000] * 3).transpose(2, 1, 0)  # (x, y, z)
    src = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([0.8, 0.8, 2.5, 1])), src)
    out = tmp_path / "mask.nii.gz"
    pic = tmp_path / "merge.png"
    box = [str(v) for v in case.box]
    code = main(
        [
            "segment",
            str(src),
            "--slice",
            "1",
            "--box",
            *box,
            "--rate",
            "0.3",
            "--out",
            str(out),
            "--merge-map",
            str(pic),
        ]
    )
    assert code == 0
    mask = nib.load(out)
    assert mask.shape == vol.shape
    assert np.allclose(mask.affine, np.diag([0.8, 0.8, 2.5, 1]))
    assert mask.get_fdata()[..., 1].sum() > 0.5 * case.mask.sum()
    assert pic.stat().st_size > 0
    assert "tokens kept per block" in capsys.readouterr().out


def test_bad_input_gives_a_message_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    code = main(
        ["segment", str(bad), "--box", "1", "1", "5", "5", "--out", str(tmp_path / "m.png")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "broken.nii.gz" in err


def test_info_lists_models_methods_devices(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("litemedsam", "vit_b", "medsam", "structsam", "cpu"):
        assert word in out


def test_import_is_light():
    # napari imports plugins at start-up: torch and the models load only when used
    import subprocess
    import sys

    code = "import sys, structsam; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _phantom_npy(tmp_path):
    case = next(c for c in phantom_cases() if c.name == "phantom-ellipse-5")
    src = tmp_path / "phantom.npy"
    np.save(src, case.image)
    return case, src


@pytest.fixture
def no_model(monkeypatch):
    """load_model fails loudly: a check that passes it ran after loading the model."""

    def refuse(*args, **kwargs):
        raise StructSAMError("MODEL LOADED")

    monkeypatch.setattr(structsam.models, "load_model", refuse)


def _bad(tmp_path, src, **changes):
    base = {"--box": ["158", "80", "241", "179"], "--out": [str(tmp_path / "m.png")]}
    base.update(changes)
    argv = ["segment", str(src)]
    for option, values in base.items():
        if values is not None:
            argv += [option, *values]
    return argv


BAD_CASES = {
    # what is wrong -> (options changed, words the one-line message must hold)
    "box outside": ({"--box": ["500", "10", "600", "50"]}, ["--box", "entirely outside"]),
    "box inverted": ({"--box": ["50", "10", "20", "50"]}, ["--box", "x0 < x1"]),
    "box nan": ({"--box": ["nan", "10", "20", "50"]}, ["--box", "finite"]),
    "no prompt": ({"--box": None}, ["--box X0 Y0 X1 Y1", "--point X Y"]),
    "rate nan": ({"--rate": ["nan"]}, ["--rate", "[0, 0.75]", "got nan"]),
    "rate -1": ({"--rate": ["-1"]}, ["--rate", "[0, 0.75]", "got -1"]),
    "rate 1": ({"--rate": ["1"]}, ["--rate", "[0, 0.75]"]),
    "rate inf": ({"--rate": ["inf"]}, ["--rate", "got inf"]),
    "tome rate 0.8": ({"--method": ["tome"], "--rate": ["0.8"]}, ["--rate", "[0, 0.75]"]),
    "method foo": ({"--method": ["foo"]}, ["--method foo", "none, structsam, tome"]),
    "model foo": ({"--model": ["foo"]}, ["--model foo", "litemedsam"]),
    "precision half": ({"--precision": ["half"]}, ["--precision half", "'bf16'"]),
    "fp16 on a cpu": ({"--precision": ["fp16"]}, ["--precision fp16", "CUDA only"]),
    "out format": ({"--out": ["{tmp}/m.jpg"]}, ["--out", ".png", ".nii.gz"]),
    "out folder missing": ({"--out": ["{tmp}/nope/m.png"]}, ["--out", "does not exist"]),
    "out is a folder": ({"--out": ["{tmp}/dir.png"]}, ["--out", "is a folder"]),
    "out is the input": ({"--out": ["{src}"]}, ["--out", "is the input image"]),
    "merge map unmerged": (
        {"--method": ["none"], "--merge-map": ["{tmp}/map.png"]},
        ["--merge-map needs merging"],
    ),
    "merge map format": ({"--merge-map": ["{tmp}/map.gif"]}, ["--merge-map", ".png"]),
    "window": ({"--window": ["5", "-5"]}, ["--window", "low < high"]),
    "checkpoint": ({"--checkpoint": ["{tmp}/none.pth"]}, ["--checkpoint", "no such file"]),
}


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_arguments_fail_fast_with_one_line_before_any_model(name, tmp_path, capsys, no_model):
    case, src = _phantom_npy(tmp_path)
    (tmp_path / "dir.png").mkdir()
    changes, words = BAD_CASES[name]
    fill = {"{tmp}": str(tmp_path), "{src}": str(src)}
    for option, values in changes.items():
        for key, value in fill.items():
            values = values and [v.replace(key, value) for v in values]
        changes[option] = values
    start = time.perf_counter()
    code = main(_bad(tmp_path, src, **changes))
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert "MODEL LOADED" not in err and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert elapsed < 2.0  # no model is loaded, nothing is encoded
    assert not (tmp_path / "m.png").exists()


def test_argparse_mistakes_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["segment", "x.png", "--rate", "abc", "--out", "m.png"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rate" in err and "invalid float value" in err


def test_overhanging_box_is_clipped_with_a_warning_line(tmp_path):
    # a subprocess: pytest records warnings itself, and the point is what the user sees
    import subprocess
    import sys

    _, src = _phantom_npy(tmp_path)
    argv = _bad(tmp_path, src, **{"--box": ["-20", "300", "120", "450"]})
    code = (
        "import sys, structsam.models as m\n"
        "from structsam.errors import StructSAMError\n"
        "def refuse(*a, **k): raise StructSAMError('MODEL LOADED')\n"
        "m.load_model = refuse\n"
        "from structsam.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    err = run.stderr.splitlines()
    # the clipped prompt passed its checks: the (refused) model load is the next step
    assert run.returncode == 2 and err[-1] == "error: MODEL LOADED", run.stderr
    assert len(err) == 2 and err[0] == (
        "warning: box (-20, 300, 120, 450) overhangs the 400x400 (W x H) image; clipped to "
        "(0, 300, 120, 400)"
    )


def test_mask_inside_the_input_dicom_folder_is_refused(tmp_path, capsys, no_model):
    folder = write_dicom_series(tmp_path / "ct", np.zeros((3, 8, 8), np.int16))
    code = main(
        [
            "segment",
            str(folder),
            "--slice",
            "1",
            "--box",
            "1",
            "1",
            "5",
            "5",
            "--out",
            str(folder / "mask.png"),
        ]
    )
    assert code == 2 and "inside the input DICOM folder" in capsys.readouterr().err
    code = main(
        ["segment", str(folder), "--box", "1", "1", "5", "5", "--out", str(tmp_path / "mask.png")]
    )
    assert code == 2 and "pass --slice 0..2" in capsys.readouterr().err


def test_segment_reads_a_dicom_folder(tmp_path, capsys):
    case = next(c for c in phantom_cases() if c.name == "phantom-ellipse-5")
    canonical = np.stack([case.image * 0] + [case.image * 1000] * 2)  # (Z, Y, X)
    # LPS axial slices come back flipped in-plane: store them so that slice 1 reads as the image
    stored = canonical[:, ::-1, ::-1].astype(np.int16)
    folder = write_dicom_series(tmp_path / "ct", stored, shuffle=False)
    out = tmp_path / "mask.nii.gz"
    box = [str(v) for v in case.box]
    code = main(["segment", str(folder), "--slice", "1", "--box", *box, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    mask, _, _ = read_volume(out)
    # the mask lands on slice 1 of the series, in napari's (Z, Y, X) layout
    assert mask.shape == canonical.shape
    assert mask[0].sum() == 0 and mask[2].sum() == 0
    assert dice(mask[1] > 0, case.mask) > 0.9


@pytest.mark.parametrize(
    ("user", "command", "expected"),
    [
        (None, "speed", "unset"),  # the package's PASSIVE is for napari only
        (None, "annotate", "PASSIVE"),
        ("ACTIVE", "speed", "ACTIVE"),  # a user's own setting always wins
        ("PASSIVE", "speed", "PASSIVE"),
    ],
)
def test_console_script_keeps_passive_openmp_for_annotate_only(user, command, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if user:
        env["OMP_WAIT_POLICY"] = user
    code = (
        "import os, sys\n"
        "from napari_structsam._cli import release_passive_openmp\n"
        f"release_passive_openmp([{command!r}])\n"
        "assert 'torch' not in sys.modules  # before torch loads its OpenMP runtime\n"
        "print(os.environ.get('OMP_WAIT_POLICY', 'unset'))\n"
        "print(os.environ.get('GOMP_SPINCOUNT', 'unset'))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    # napari's passive threads still spin briefly (libgomp), unless the user chose a policy
    spin = "1000" if (user, command) == (None, "annotate") else "unset"
    assert run.stdout.split() == [expected, spin]
