"""The command line on real files."""

import nibabel as nib
import numpy as np

from structsam.cli import main
from structsam.samples import phantom_cases


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
