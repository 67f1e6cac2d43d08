import os
import struct
import warnings

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_structsam import _io as pio
from structsam import io as sio
from structsam.errors import ImageError
from structsam.io import read_image, read_volume, write_mask


def blob_mask(shape=(20, 30)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - 9) ** 2 / 36 + (xx - 14) ** 2 / 100 <= 1


# A permuted, flipped (P, L, S) affine, so reorientation is really exercised.
PLS_AFFINE = np.array(
    [
        [0.0, -2.0, 0.0, 10.0],
        [-1.5, 0.0, 0.0, 20.0],
        [0.0, 0.0, 3.0, -5.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def save_nifti(path, data, affine=PLS_AFFINE):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


# ------------------------------------------------------------------------------------------
# 2D formats


def test_png_grey_rgb_rgba_and_16bit(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (12, 17), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    arr, meta = read_image(tmp_path / "g.png")
    np.testing.assert_array_equal(arr, grey)
    assert meta["format"] == "png" and meta["shape"] == (12, 17) and meta["spacing"] is None

    rgba = rng.integers(0, 256, (12, 17, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "c.PNG")
    arr, _ = read_image(tmp_path / "c.PNG")
    np.testing.assert_array_equal(arr, rgba[..., :3])

    deep = rng.integers(0, 65536, (9, 11), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    arr, meta = read_image(tmp_path / "d.png")
    assert arr.dtype == np.uint16
    np.testing.assert_array_equal(arr, deep)


def test_jpeg(tmp_path):
    rgb = np.zeros((32, 40, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[8:24, 10:30, 1] = 150
    Image.fromarray(rgb).save(tmp_path / "p.jpg", quality=95)
    arr, meta = read_image(tmp_path / "p.jpg")
    assert arr.shape == (32, 40, 3) and arr.dtype == np.uint8
    assert np.abs(arr.astype(int) - rgb).mean() < 6
    Image.fromarray(rgb[..., 1]).save(tmp_path / "q.jpeg")
    arr, _ = read_image(tmp_path / "q.jpeg")
    assert arr.shape == (32, 40)


def test_tiff_grey_rgb_and_stack(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.random((10, 14)).astype(np.float32)
    tifffile.imwrite(tmp_path / "g.tif", grey)
    arr, _ = read_image(tmp_path / "g.tif")
    np.testing.assert_array_equal(arr, grey)

    rgb = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "c.tiff", rgb, photometric="rgb")
    arr, _ = read_image(tmp_path / "c.tiff")
    np.testing.assert_array_equal(arr, rgb)

    stack = rng.integers(0, 1000, (5, 10, 14), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    with pytest.raises(ImageError, match="5 slices"):
        read_image(tmp_path / "s.tif")
    arr, meta = read_image(tmp_path / "s.tif", slice_index=3)
    np.testing.assert_array_equal(arr, stack[3])
    assert meta["slice_index"] == 3


def test_npy_2d_rgb_and_3d(tmp_path):
    rng = np.random.default_rng(2)
    img = rng.random((8, 9)).astype(np.float64)
    np.save(tmp_path / "a.npy", img)
    arr, _ = read_image(tmp_path / "a.npy")
    np.testing.assert_array_equal(arr, img)

    rgb = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    np.save(tmp_path / "rgb.npy", rgb)
    arr, _ = read_image(tmp_path / "rgb.npy")
    np.testing.assert_array_equal(arr, rgb)

    vol = rng.random((6, 8, 9)).astype(np.float32)
    np.save(tmp_path / "v.npy", vol)
    with pytest.raises(ImageError, match="6 slices"):
        read_image(tmp_path / "v.npy")
    arr, _ = read_image(tmp_path / "v.npy", slice_index=2, axis=2)
    np.testing.assert_array_equal(arr, vol[:, :, 2])
    with pytest.raises(ImageError, match="out of range"):
        read_image(tmp_path / "v.npy", slice_index=6)


def test_dicom_ct_in_hounsfield_units():
    import pydicom
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file("CT_small.dcm")
    arr, meta = read_image(path)
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert arr.shape == (128, 128) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, expected)
    assert meta["spacing"] == pytest.approx((0.661468, 0.661468))
    assert meta["modality"] == "CT"


# ------------------------------------------------------------------------------------------
# NIfTI


def test_read_volume_reorients_to_canonical_zyx(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    save_nifti(tmp_path / "v.nii.gz", data)
    vol, spacing, affine = read_volume(tmp_path / "v.nii.gz")
    canon = nib.as_closest_canonical(nib.load(tmp_path / "v.nii.gz"))
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(affine, canon.affine)
    np.testing.assert_array_equal(vol, np.asarray(canon.get_fdata(), np.float32).transpose(2, 1, 0))
    # Native axes are (P, L, S) with sizes 1.5, 2, 3 mm -> canonical x=L->R (2), y=P->A (1.5).
    assert vol.shape == (7, 5, 6)
    assert spacing == pytest.approx((3.0, 1.5, 2.0))


def test_nifti_needs_slice_and_reads_it(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    save_nifti(tmp_path / "v.nii", data, np.diag([1.0, 2.0, 3.0, 1.0]))
    with pytest.raises(ImageError, match=r"6 slices.*--slice"):
        read_image(tmp_path / "v.nii")
    arr, meta = read_image(tmp_path / "v.nii", slice_index=2)
    np.testing.assert_array_equal(arr, data[:, :, 2].T)
    assert meta["format"] == "nii"
    assert meta["spacing"] == pytest.approx((2.0, 1.0))
    assert meta["spacing_zyx"] == pytest.approx((3.0, 2.0, 1.0))
    assert meta["volume_shape"] == (6, 5, 4)
    np.testing.assert_allclose(meta["affine"], np.diag([1.0, 2.0, 3.0, 1.0]))
    arr, meta = read_image(tmp_path / "v.nii", slice_index=1, axis=2)
    np.testing.assert_array_equal(arr, data[1].T)
    assert meta["spacing"] == pytest.approx((3.0, 2.0))


def test_nifti_2d_and_single_volume_4d_need_no_slice(tmp_path):
    img2d = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_nifti(tmp_path / "flat.nii.gz", img2d, np.eye(4))
    arr, _ = read_image(tmp_path / "flat.nii.gz")
    np.testing.assert_array_equal(arr, img2d.T)
    save_nifti(tmp_path / "one.nii.gz", img2d[:, :, None, None], np.eye(4))
    arr, _ = read_image(tmp_path / "one.nii.gz")
    np.testing.assert_array_equal(arr, img2d.T)


def test_nifti_4d_asks_for_a_volume(tmp_path):
    save_nifti(tmp_path / "t.nii.gz", np.zeros((4, 4, 3, 5), np.float32))
    with pytest.raises(ImageError, match=r"4D NIfTI with 5 volumes.*pick a volume"):
        read_image(tmp_path / "t.nii.gz", slice_index=0)
    with pytest.raises(ImageError, match="pick a volume"):
        read_volume(tmp_path / "t.nii.gz")


def test_nifti_scaling_is_applied(tmp_path):
    raw = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    path = tmp_path / "s.nii"
    save_nifti(path, raw, np.eye(4))
    # Patch scl_slope (offset 112) and scl_inter (offset 116) of the NIfTI-1 header directly.
    with open(path, "r+b") as fh:
        fh.seek(112)
        fh.write(struct.pack("<ff", 2.5, -7.0))
    vol, _, _ = read_volume(path)
    assert vol.dtype == np.float32
    np.testing.assert_allclose(vol, (raw * 2.5 - 7.0).transpose(2, 1, 0))


def test_nifti_mask_roundtrip_keeps_reference_geometry(tmp_path):
    rng = np.random.default_rng(4)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    ref = save_nifti(tmp_path / "ref.nii.gz", data)
    vol, _, _ = read_volume(ref)
    mask = vol > 0.3
    out = write_mask(tmp_path / "mask.nii.gz", mask, ref)
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, PLS_AFFINE)
    assert written.get_data_dtype() == np.uint8
    native = np.asanyarray(written.dataobj)
    np.testing.assert_array_equal(native.astype(bool), data > 0.3)
    back, _, _ = read_volume(out)
    np.testing.assert_array_equal(back.astype(bool), mask)


def test_nifti_2d_mask_into_reference_slice(tmp_path):
    data = np.zeros((5, 6, 7), np.float32)
    ref = save_nifti(tmp_path / "ref.nii", data)
    vol, _, _ = read_volume(ref)
    plane = np.zeros(vol.shape[1:], dtype=bool)
    plane[1:3, 2:5] = True
    out = write_mask(tmp_path / "m.nii", plane, ref, slice_index=4, axis=0)
    back, _, _ = read_volume(out)
    assert back.sum() == plane.sum()
    np.testing.assert_array_equal(back[4].astype(bool), plane)
    with pytest.raises(ImageError, match="slice_index"):
        write_mask(tmp_path / "m2.nii", plane, ref)
    with pytest.raises(ImageError, match="does not match"):
        write_mask(tmp_path / "m3.nii", np.ones((2, 2, 2), bool), ref)


def test_nifti_mask_without_reference_is_identity(tmp_path):
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[1, 2, 3] = True
    out = write_mask(tmp_path / "m.nii.gz", mask)
    img = nib.load(out)
    np.testing.assert_allclose(img.affine, np.eye(4))
    back, spacing, _ = read_volume(out)
    np.testing.assert_array_equal(back.astype(bool), mask)
    assert spacing == (1.0, 1.0, 1.0)
    out2 = write_mask(tmp_path / "m2.nii", mask[1], slice_index=1)
    arr, _ = read_image(out2)
    np.testing.assert_array_equal(arr.astype(bool), mask[1])


# ------------------------------------------------------------------------------------------
# mask writing


def test_png_npy_tiff_mask_roundtrips(tmp_path):
    mask = blob_mask()
    out = write_mask(tmp_path / "m.png", mask)
    arr, _ = read_image(out)
    assert arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, mask.astype(np.uint8) * 255)

    out = write_mask(tmp_path / "m.npy", mask.astype(np.float32) * 3)
    arr = np.load(out)
    assert arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, mask.astype(np.uint8))

    out = write_mask(tmp_path / "m.tif", mask)
    arr, _ = read_image(out)
    np.testing.assert_array_equal(arr, mask.astype(np.uint8) * 255)
    assert sorted(os.listdir(tmp_path)) == ["m.npy", "m.png", "m.tif"]


def test_write_mask_rejects_bad_requests(tmp_path):
    with pytest.raises(ImageError, match=r"\.png.*\.nii\.gz"):
        write_mask(tmp_path / "m.jpg", blob_mask())
    with pytest.raises(ImageError, match="2D"):
        write_mask(tmp_path / "m.png", np.zeros((2, 3, 4), bool))
    assert os.listdir(tmp_path) == []
    # Reference and slice only matter for NIfTI output; a PNG ignores them.
    write_mask(tmp_path / "m.png", blob_mask(), reference=tmp_path / "r.nii", slice_index=3)
    arr, _ = read_image(tmp_path / "m.png")
    np.testing.assert_array_equal(arr > 0, blob_mask())


def test_atomic_write_leaves_no_temp_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "m.png"
    write_mask(target, blob_mask())
    before = target.read_bytes()
    assert os.listdir(tmp_path) == ["m.png"]

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_mask(target, ~blob_mask())
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.png"]

    monkeypatch.undo()

    def half_write(fh, arr, allow_pickle=False):
        fh.write(b"\x93NUMPY partial")
        raise OSError("interrupted")

    monkeypatch.setattr(sio.np, "save", half_write)
    with pytest.raises(OSError, match="interrupted"):
        write_mask(tmp_path / "n.npy", blob_mask())
    assert os.listdir(tmp_path) == ["m.png"]


# ------------------------------------------------------------------------------------------
# damaged files and unknown formats


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("name", ["t.png", "t.jpg", "t.tif", "t.npy", "t.nii", "t.nii.gz"])
def test_truncated_files_raise_image_error_naming_the_file(tmp_path, name):
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    path = tmp_path / name
    if name.endswith((".png", ".jpg")):
        Image.fromarray(img).save(path)
    elif name.endswith(".tif"):
        tifffile.imwrite(path, img)
    elif name.endswith(".npy"):
        np.save(path, img)
    else:
        save_nifti(path, rng.normal(size=(16, 16, 16)).astype(np.float32), np.eye(4))
    truncate(path, 0.5)
    with pytest.raises(ImageError, match=name.replace(".", r"\.")):
        read_image(path, slice_index=0)


@pytest.mark.parametrize("name", ["g.png", "g.jpg", "g.tiff", "g.npy", "g.nii.gz", "g.dcm"])
def test_garbage_files_raise_image_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageError, match=name.replace(".", r"\.")):
        read_image(path)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"e\.png"):
        read_image(tmp_path / "e.png")
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="no such file"):
        read_volume(tmp_path / "missing.nii.gz")


def test_unknown_extension_lists_supported(tmp_path):
    (tmp_path / "x.bmp").write_bytes(b"BM")
    with pytest.raises(ImageError, match=r"unsupported.*\.png.*\.nii\.gz"):
        read_image(tmp_path / "x.bmp")
    with pytest.raises(ImageError, match=r"\.nii"):
        read_volume(tmp_path / "x.bmp")


def test_file_format():
    assert sio.file_format("a/b/Scan.NII.GZ") == ".nii.gz"
    assert sio.file_format("x.tar.gz") == ".gz"
    assert sio.file_format("noext") == ""


# ------------------------------------------------------------------------------------------
# volumes: DICOM series, 4D/5D NIfTI, non-finite voxels, label writing, napari layer data

# Anisotropic test geometry: 2.5 mm slices, 0.7 mm rows, 0.9 mm columns.
SLICE_MM, ROW_MM, COL_MM = 2.5, 0.7, 0.9


def write_dicom_series(
    folder,
    volume_rc,
    *,
    slopes=None,
    series_uid="1.2.3.4",
    shuffle=True,
    orientation=(1, 0, 0, 0, 1, 0),
    origin=(-10.0, -20.0, 30.0),
):
    """Write ``volume_rc`` (slice, row, column) int16 stored values as CT slices, axial unless
    ``orientation`` (ImageOrientationPatient) tilts them; slice k lies at ``origin`` plus k
    slice spacings along the slice normal (LPS mm)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    n = volume_rc.shape[0]
    slopes = np.ones(n) if slopes is None else slopes
    order = np.random.default_rng(7).permutation(n) if shuffle else np.arange(n)
    for file_no, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = "test series"
        ds.InstanceNumber = int(k) + 1
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        normal = np.cross(orientation[:3], orientation[3:])
        position = np.asarray(origin, float) + SLICE_MM * int(k) * normal
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.PixelSpacing = [ROW_MM, COL_MM]
        ds.SliceThickness = SLICE_MM
        ds.RescaleSlope = float(slopes[k])
        ds.RescaleIntercept = -1024.0
        ds.Rows, ds.Columns = volume_rc.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = np.ascontiguousarray(volume_rc[k], dtype="<i2").tobytes()
        # the first file without the preamble, as older scanners write them
        preamble = file_no > 0
        ds.save_as(folder / f"IM{file_no:04d}", enforce_file_format=preamble, implicit_vr=False)
    return folder


def dicom_volume(n=4, rows=6, cols=5):
    rng = np.random.default_rng(8)
    return rng.integers(0, 2000, (n, rows, cols)).astype(np.int16)


def test_dicom_series_sorted_rescaled_and_scaled(tmp_path):
    stored = dicom_volume()
    slopes = np.array([1.0, 0.5, 2.0, 1.0])
    folder = write_dicom_series(tmp_path / "ct", stored, slopes=slopes)
    vol, spacing, meta = sio.read_dicom_series(folder)
    hu = stored * slopes[:, None, None] - 1024.0
    # LPS axial slices: columns run to patient left, rows to posterior; canonical RAS+ flips
    # both, so the canonical (Z, Y, X) volume is the stored one flipped in-plane.
    np.testing.assert_array_equal(vol, hu[:, ::-1, ::-1].astype(np.float32))
    assert vol.dtype == np.float32
    assert spacing == pytest.approx((SLICE_MM, ROW_MM, COL_MM))
    assert meta["sorted_by"] == "ImagePositionPatient" and meta["modality"] == "CT"
    assert nib.aff2axcodes(meta["affine"]) == ("R", "A", "S")
    # world position of voxel (x, y, z) = (0, 0, 0): the far corner of the last row/column
    corner = meta["affine"] @ [0, 0, 0, 1]
    assert corner[:3] == pytest.approx([10.0 - (5 - 1) * COL_MM, 20.0 - (6 - 1) * ROW_MM, 30.0])
    again, spacing2, affine = read_volume(folder)
    np.testing.assert_array_equal(again, vol)
    assert spacing2 == spacing
    np.testing.assert_allclose(affine, meta["affine"])


def test_dicom_series_falls_back_on_instance_number(tmp_path):
    import pydicom

    stored = dicom_volume(n=3)
    folder = write_dicom_series(tmp_path / "s", stored)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f, force=True)
        del ds.ImagePositionPatient
        ds.save_as(f)
    with pytest.warns(UserWarning, match="InstanceNumber"):
        vol, spacing, meta = sio.read_dicom_series(folder)
    assert meta["sorted_by"] == "InstanceNumber"
    np.testing.assert_array_equal(vol, (stored - 1024.0)[:, ::-1, ::-1])
    assert spacing[0] == pytest.approx(SLICE_MM)


def test_dicom_series_errors_are_clear(tmp_path):
    with pytest.raises(ImageError, match="no such folder"):
        sio.read_dicom_series(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no DICOM files"):
        sio.read_dicom_series(tmp_path / "empty")

    mixed = write_dicom_series(tmp_path / "mixed", dicom_volume(n=2))
    other = write_dicom_series(tmp_path / "o", dicom_volume(n=2), series_uid="9.9")
    for i, f in enumerate(sorted(other.iterdir())):
        f.rename(mixed / f"other{i}")
    with pytest.raises(ImageError, match=r"mixes 2 DICOM series.*own folder"):
        sio.read_dicom_series(mixed)

    sizes = write_dicom_series(tmp_path / "sizes", dicom_volume(n=2))
    small = write_dicom_series(tmp_path / "sm", dicom_volume(n=1, rows=3))
    next(small.iterdir()).rename(sizes / "small")
    with pytest.raises(ImageError, match="differ in Rows"):
        sio.read_dicom_series(sizes)

    junk = write_dicom_series(tmp_path / "junk", dicom_volume(n=2))
    (junk / "notes.txt").write_text("not a slice")
    with pytest.raises(ImageError, match=r"1 of 3 files are not DICOM \(notes\.txt\)"):
        sio.read_dicom_series(junk)

    dup = write_dicom_series(tmp_path / "dup", dicom_volume(n=2))
    (dup / "copy").write_bytes((dup / "IM0000").read_bytes())
    with pytest.raises(ImageError, match="share one slice position"):
        sio.read_dicom_series(dup)


def test_truncated_dicom_slice_names_the_file(tmp_path):
    folder = write_dicom_series(tmp_path / "t", dicom_volume(n=3, rows=32, cols=32))
    truncate(folder / "IM0001", 0.6)
    with pytest.raises(ImageError, match=r"IM0001.*truncated or corrupt"):
        read_volume(folder)


def test_4d_and_5d_nifti_pick_a_volume(tmp_path):
    rng = np.random.default_rng(9)
    data = rng.normal(size=(4, 5, 3, 6)).astype(np.float32)
    save_nifti(tmp_path / "t.nii.gz", data)
    with pytest.raises(ImageError, match=r"4D NIfTI with 6 volumes.*volume_index=0\.\.5"):
        read_volume(tmp_path / "t.nii.gz")
    ref, _, _ = read_volume(save_nifti(tmp_path / "v3.nii.gz", data[..., 4]))
    vol, spacing, _ = read_volume(tmp_path / "t.nii.gz", volume_index=4)
    np.testing.assert_array_equal(vol, ref)
    with pytest.raises(ImageError, match=r"volume 6 is out of range.*6 volume"):
        read_volume(tmp_path / "t.nii.gz", volume_index=6)

    five = rng.normal(size=(4, 5, 3, 1, 2)).astype(np.float32)
    save_nifti(tmp_path / "f.nii", five)
    with pytest.raises(ImageError, match=r"5D NIfTI with 2 volumes"):
        read_volume(tmp_path / "f.nii")
    vol, _, _ = read_volume(tmp_path / "f.nii", volume_index=1)
    ref, _, _ = read_volume(save_nifti(tmp_path / "f1.nii", five[:, :, :, 0, 1]))
    np.testing.assert_array_equal(vol, ref)


def test_nonfinite_voxels_are_replaced_with_a_warning_or_refused(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) + 5
    data[0, 0, 0], data[1, 2, 3] = np.nan, np.inf
    path = save_nifti(tmp_path / "n.nii.gz", data, np.eye(4))
    with pytest.warns(UserWarning, match=r"2 NaN/infinite voxels were set to .*\(6\)"):
        vol, _, _ = read_volume(path)
    assert np.isfinite(vol).all() and vol.min() == 6
    with pytest.raises(ImageError, match=r"2 voxels are NaN or infinite.*nonfinite='replace'"):
        read_volume(path, nonfinite="error")
    save_nifti(tmp_path / "all.nii", np.full((2, 2, 2), np.nan, np.float32), np.eye(4))
    with pytest.raises(ImageError, match="every voxel"):
        read_volume(tmp_path / "all.nii")


def test_write_labels_roundtrip_is_exact(tmp_path):
    rng = np.random.default_rng(10)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    src = nib.Nifti1Image(data, PLS_AFFINE)
    src.header["descrip"] = b"source scan"
    src.header.set_xyzt_units("mm", "sec")
    src.set_qform(PLS_AFFINE, code=1)
    src.set_sform(PLS_AFFINE @ np.diag([1, 1, 1, 1.0]), code=4)
    nib.save(src, tmp_path / "src.nii.gz")
    vol, spacing, affine = read_volume(tmp_path / "src.nii.gz")
    labels = rng.integers(0, 300, vol.shape).astype(np.uint16)

    out = sio.write_labels(tmp_path / "labels.nii.gz", labels, tmp_path / "src.nii.gz")
    back, spacing_back, affine_back = sio.read_labels(out)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_array_equal(affine_back, affine)
    assert spacing_back == spacing == pytest.approx((3.0, 1.5, 2.0))
    written, source = nib.load(out), nib.load(tmp_path / "src.nii.gz")
    np.testing.assert_array_equal(written.affine, source.affine)
    changed = {"datatype", "bitpix", "scl_slope", "scl_inter", "cal_min", "cal_max"}
    for name in source.header.keys():
        if name not in changed:
            np.testing.assert_array_equal(written.header[name], source.header[name], err_msg=name)
    assert sorted(os.listdir(tmp_path)) == ["labels.nii.gz", "src.nii.gz"]

    # bool and int64 labels narrow to the smallest type; floats are refused
    out = sio.write_labels(tmp_path / "b.nii", labels > 100, tmp_path / "src.nii.gz")
    assert sio.read_labels(out)[0].dtype == np.uint8
    out = sio.write_labels(tmp_path / "w.nii", labels.astype(np.int64) * 1000, source)
    back, _, _ = sio.read_labels(out)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, labels.astype(np.int64) * 1000)
    with pytest.raises(ImageError, match="integer"):
        sio.write_labels(tmp_path / "f.nii.gz", labels.astype(np.float32), source)
    with pytest.raises(ImageError, match="does not match"):
        sio.write_labels(tmp_path / "f.nii.gz", labels[:2], source)
    with pytest.raises(ImageError, match="NIfTI"):
        sio.write_labels(tmp_path / "f.png", labels, source)


def test_write_labels_for_a_dicom_series_lines_up(tmp_path):
    folder = write_dicom_series(tmp_path / "ct", dicom_volume())
    vol, spacing, meta = sio.read_dicom_series(folder)
    labels = (vol > 0).astype(np.uint8)
    out = sio.write_labels(tmp_path / "l.nii.gz", labels, folder)
    back, spacing_back, affine = sio.read_labels(out)
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_allclose(affine, meta["affine"])
    assert spacing_back == pytest.approx(spacing)


def test_interrupted_label_save_keeps_the_old_file(tmp_path, monkeypatch):
    ref = save_nifti(tmp_path / "r.nii.gz", np.zeros((3, 4, 5), np.float32))
    vol, _, _ = read_volume(ref)
    target = sio.write_labels(tmp_path / "l.nii.gz", np.ones(vol.shape, np.uint8), ref)
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sio.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        sio.write_labels(target, np.zeros(vol.shape, np.uint8), ref)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["l.nii.gz", "r.nii.gz"]


def test_layer_data_has_the_spacing_as_scale_and_writes_back(tmp_path):
    data = np.random.default_rng(11).normal(size=(5, 6, 7)).astype(np.float32)
    src = save_nifti(tmp_path / "scan.nii.gz", data)
    [(vol, kwargs, kind)] = pio.read_layer_data(src)
    assert kind == "image" and kwargs["name"] == "scan"
    assert kwargs["scale"] == pytest.approx((3.0, 1.5, 2.0))
    labels = (vol > 0).astype(np.int32)
    # what a napari writer receives: the labels layer's data and attributes
    [path] = pio.write_labels_layer(tmp_path / "seg.nii.gz", labels, kwargs)
    back, _, affine = sio.read_labels(path)
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_array_equal(nib.load(path).affine, PLS_AFFINE)

    folder = write_dicom_series(tmp_path / "dcm", dicom_volume())
    [(vol, kwargs, _)] = pio.read_layer_data(folder)
    assert kwargs["scale"] == pytest.approx((SLICE_MM, ROW_MM, COL_MM))
    assert vol.shape == (4, 6, 5)


def test_corrupt_volume_gives_a_message_not_a_traceback(tmp_path):
    path = save_nifti(tmp_path / "c.nii.gz", np.zeros((16, 16, 16), np.float32), np.eye(4))
    truncate(path, 0.4)
    with pytest.raises(ImageError, match=r"c\.nii\.gz: cannot read the file.*truncated"):
        read_volume(path)
    with pytest.raises(ImageError, match=r"c\.nii\.gz"):
        pio.read_layer_data(path)


def test_wrong_shape_is_refused_for_every_kind_of_reference(tmp_path):
    src = save_nifti(tmp_path / "src.nii.gz", np.zeros((5, 6, 7), np.float32))
    vol, _, affine = read_volume(src)
    folder = write_dicom_series(tmp_path / "ct", dicom_volume())
    series, _, series_meta = sio.read_dicom_series(folder)
    wrong = np.zeros((2, 3, 4), np.uint8)
    references = {
        "NIfTI file": (src, {}),
        "nibabel image": (nib.load(src), {}),
        "affine array": (affine, {"shape": vol.shape}),
        "DICOM folder": (folder, {}),
        "source geometry": (sio.read_source_volume(src)[1], {}),
        "DICOM source geometry": (sio.read_source_volume(folder)[1], {}),
    }
    for kind, (reference, extra) in references.items():
        with pytest.raises(ImageError, match="does not match"):
            sio.write_labels(tmp_path / "out.nii.gz", wrong, reference, **extra)
        assert not (tmp_path / "out.nii.gz").exists(), kind
    # an affine alone cannot be checked, so it is refused
    with pytest.raises(ImageError, match=r"pass shape=\(Z, Y, X\)"):
        sio.write_labels(tmp_path / "out.nii.gz", np.zeros(vol.shape, np.uint8), affine)
    # the right shape goes through for each
    for kind, (reference, extra) in references.items():
        ok = np.zeros(series.shape if "DICOM" in kind else vol.shape, np.uint8)
        out = sio.write_labels(tmp_path / "out.nii.gz", ok, reference, **extra)
        expected = series_meta["affine"] if "DICOM" in kind else affine
        np.testing.assert_allclose(sio.read_labels(out)[2], expected, atol=1e-6)


def test_labels_never_overwrite_their_source(tmp_path):
    src = save_nifti(tmp_path / "src.nii.gz", np.zeros((5, 6, 7), np.float32))
    before = src.read_bytes()
    vol, _, _ = read_volume(src)
    labels = np.ones(vol.shape, np.uint8)
    [(_, kwargs, _)] = pio.read_layer_data(src)
    geometry = sio.read_source_volume(src)[1]
    assert pio.geometry_from_metadata(kwargs["metadata"]).source == geometry.source
    for reference in (src, str(src), nib.load(src), geometry):
        with pytest.raises(ImageError, match="is the source scan.*src_labels.nii.gz"):
            sio.write_labels(src, labels, reference)
    with pytest.raises(ImageError, match="is the source scan"):
        pio.write_labels_layer(src, labels, kwargs)
    assert src.read_bytes() == before


def test_layer_writer_refuses_labels_without_source_geometry(tmp_path):
    labels = np.ones((3, 4, 5), np.uint8)
    meta = {"name": "drawn", "scale": (3.0, 1.0, 1.0), "metadata": {}}
    with pytest.raises(ImageError, match="'drawn' carries no source geometry"):
        pio.write_labels_layer(tmp_path / "l.nii.gz", labels, meta)
    assert not list(tmp_path.iterdir())


def test_read_image_warns_about_nonfinite_values(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) + 5
    data[0, 0, 0], data[1, 2, 3] = np.nan, -np.inf
    path = save_nifti(tmp_path / "n.nii.gz", data, np.eye(4))
    # counted over the whole volume, as read_volume counts them
    with pytest.warns(UserWarning, match=r"n\.nii\.gz: 2 NaN/infinite voxels were set to .*\(6\)"):
        image, _ = read_image(path, slice_index=0)
    assert np.isfinite(image).all()
    flat = np.ones((4, 5), np.float32)
    flat[1, 1] = np.nan
    np.save(tmp_path / "f.npy", flat)
    with pytest.warns(UserWarning, match=r"f\.npy: 1 NaN/infinite voxels"):
        image, _ = read_image(tmp_path / "f.npy")
    assert np.isfinite(image).all()
