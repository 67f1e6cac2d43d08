"""The plugin's reader and writer in a real viewer: NIfTI and DICOM in, NIfTI labels out."""

import nibabel as nib
import numpy as np
import pytest
from test_io import PLS_AFFINE, dicom_volume, write_dicom_series

from napari_structsam._io import get_reader


def test_reader_claims_nifti_and_dicom_folders_only(tmp_path):
    nii = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), PLS_AFFINE), nii)
    dcm = write_dicom_series(tmp_path / "ct", dicom_volume())
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"x")
    assert get_reader(str(nii)) is not None
    assert get_reader(str(dcm)) is not None
    assert get_reader(str(tmp_path / "photos")) is None
    assert get_reader(str(tmp_path / "photos" / "a.png")) is None


def test_nifti_opens_with_spacing_and_labels_save_back_exactly(make_napari_viewer, tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 7, 8)).astype(np.float32)  # (x, y, z) on disk
    src = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, PLS_AFFINE), src)
    viewer = make_napari_viewer()
    [image] = viewer.open(str(src), plugin="napari-structsam")
    # PLS_AFFINE's voxel sizes are 1.5 (x), 2 (y), 3 (z): canonical (Z, Y, X) order
    assert image.data.ndim == 3
    assert sorted(image.scale) == pytest.approx([1.5, 2.0, 3.0])
    labels = np.zeros(image.data.shape, np.uint8)
    labels[1:3, 2:5, 3:6] = 2
    labels[4, 0, 0] = 7
    layer = viewer.add_labels(labels, name="seg", scale=image.scale, metadata=image.metadata)
    out = tmp_path / "seg.nii.gz"
    viewer.layers.selection = {layer}
    viewer.layers.save(str(out), selected=True, plugin="napari-structsam")
    saved = nib.load(out)
    np.testing.assert_array_equal(saved.affine, nib.load(src).affine)
    # back through the reader, the labels are the ones drawn, voxel for voxel
    [(again, kwargs, _)] = get_reader(str(out))(str(out))
    np.testing.assert_array_equal(again, labels)
    assert kwargs["scale"] == pytest.approx(tuple(image.scale))


def test_dicom_series_opens_in_hounsfield_units(make_napari_viewer, tmp_path):
    stored = dicom_volume()
    folder = write_dicom_series(tmp_path / "ct", stored)
    viewer = make_napari_viewer()
    [image] = viewer.open(str(folder), plugin="napari-structsam")
    assert image.data.shape == stored.shape
    assert float(image.data.min()) == pytest.approx(float(stored.min()) - 1024.0)
    assert len(set(np.round(image.scale, 6))) > 1  # anisotropic spacing on the layer


def test_corrupt_nifti_gives_a_message(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00not really gzip")
    from structsam.errors import ImageError

    with pytest.raises(ImageError, match="broken.nii.gz"):
        get_reader(str(bad))(str(bad))


def test_one_dicom_slice_opens_its_series(tmp_path):
    stored = dicom_volume()
    folder = write_dicom_series(tmp_path / "ct", stored)
    one = folder / "slice.dcm"
    sorted(folder.iterdir())[1].rename(one)
    [(vol, kwargs, _)] = get_reader(str(one))(str(one))
    assert vol.shape == stored.shape
    assert kwargs["metadata"]["structsam_source"] == str(folder)
