import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from structsam.errors import ImageError
from structsam.eval import datasets
from structsam.eval.datasets import (
    detect_format,
    iter_dataset,
    load_dataset,
    load_hq_sam,
    load_image_mask,
    load_nifti,
    load_npz,
)

H, W = 40, 50


def rect(y0, y1, x0, x1, shape=(H, W), value=1, dtype=np.uint8):
    """A mask with ``value`` on rows y0..y1 and columns x0..x1 (inclusive)."""
    m = np.zeros(shape, dtype)
    m[y0 : y1 + 1, x0 : x1 + 1] = value
    return m


def ellipse(cy, cy_r, cx, cx_r, shape=(H, W)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) / cy_r) ** 2 + ((xx - cx) / cx_r) ** 2 <= 1


def photo(seed=0, shape=(H, W, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return path


def boxes(cases):
    return [c.box.tolist() for c in cases]


# ------------------------------------------------------------------------------------------
# HQ-SAM layout


def make_dis(root):
    """DIS5K/DIS-VD: im/*.jpg + gt/*.png; 'a' has anti-aliased edges, 'b' two separate parts."""
    vd = root / "DIS5K" / "DIS-VD"
    a = rect(5, 14, 8, 27, value=255)
    a[4, 8:28] = 100  # anti-aliased row below the threshold: background
    a[15, 8:28] = 200  # above it: foreground
    b = rect(2, 6, 3, 9, value=255) | rect(30, 35, 40, 45, value=255)
    for name, mask in (("a", a), ("b", b)):
        save(vd / "im" / f"{name}.jpg", photo())
        save(vd / "gt" / f"{name}.png", mask)
    return vd


def test_hq_sam_dis_whole_foreground_per_mask(tmp_path):
    vd = make_dis(tmp_path)
    cases = load_hq_sam(vd)
    assert [c.name for c in cases] == ["a", "b"]
    assert boxes(cases) == [[8, 5, 27, 15], [3, 2, 45, 35]]  # b: one box over both parts
    a = cases[0]
    assert a.kind == "hq-sam" and a.image.shape == (H, W, 3) and a.mask.sum() == 11 * 20
    assert a.meta == {
        "dataset": "hq-sam",
        "source": str(vd / "im" / "a.jpg"),
        "mask": str(vd / "gt" / "a.png"),
        "label": 1,
        "slice": None,
    }
    assert detect_format(vd) == "hq-sam"
    assert boxes(load_dataset(vd / "im")) == boxes(cases)  # the image folder itself


def test_hq_sam_folder_names(tmp_path):
    thin = tmp_path / "ThinObject5K"
    save(thin / "images_train" / "t.jpg", photo())
    save(thin / "masks_train" / "t.png", rect(0, 9, 0, 9, value=255))
    save(thin / "images_test" / "x.jpg", photo())
    save(thin / "masks_test" / "x.png", rect(10, 19, 20, 29, value=255))
    hrsod = tmp_path / "HRSOD"
    save(hrsod / "images" / "h.jpg", photo())
    save(hrsod / "masks_max255" / "h.png", rect(1, 2, 3, 12, value=255))
    psp = tmp_path / "ecssd"  # cascade_psp: images and masks side by side
    save(psp / "e.jpg", photo())
    save(psp / "e.png", rect(3, 8, 4, 9, value=255))

    assert [c.name for c in load_dataset(thin)] == ["x"]  # the test split
    assert boxes(load_dataset(hrsod)) == [[3, 1, 12, 2]]
    assert boxes(load_dataset(psp)) == [[4, 3, 9, 8]]
    assert {detect_format(p) for p in (thin, hrsod, psp)} == {"hq-sam"}


# ------------------------------------------------------------------------------------------
# image + mask folders


def test_image_mask_16bit_labels_and_min_area(tmp_path):
    labels = rect(2, 11, 3, 12, value=300, dtype=np.uint16)  # 100 px
    labels[ellipse(25, 6, 30, 10)] = 2  # 13 x 21 ellipse
    labels[37:39, 45:48] = 7  # 6 px: below min_area
    save(tmp_path / "images" / "s1.png", photo()[..., 0])
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "masks" / "s1_mask.tif", labels)

    cases = load_dataset(tmp_path, min_area=10)
    assert detect_format(tmp_path) == "image-mask"
    assert [c.meta["label"] for c in cases] == [2, 300]
    assert [c.name for c in cases] == ["s1-label2", "s1-label300"]
    assert boxes(cases) == [[20, 19, 40, 31], [3, 2, 12, 11]]
    assert cases[0].point.tolist() == [30, 25]  # the ellipse's centre
    assert all(c.kind == "image-mask" and c.image.shape == (H, W) for c in cases)
    assert len(load_dataset(tmp_path, min_area=1)) == 3
    assert len(load_dataset(tmp_path, min_area=101)) == 1


def test_image_mask_palette_binary_and_components(tmp_path):
    palette = rect(0, 4, 0, 4, value=5) + rect(10, 14, 20, 29, value=9)
    pal = Image.fromarray(palette, mode="P")
    pal.putpalette([0, 0, 0] + [255, 0, 0] * 255)  # every label drawn in the same colour
    (tmp_path / "labels").mkdir()
    pal.save(tmp_path / "labels" / "p.png")
    save(tmp_path / "images" / "p.jpg", photo())
    binary = rect(20, 24, 0, 9, value=255) | rect(30, 39, 30, 34, value=255)
    binary[19, :10] = 60  # a faint anti-aliased edge: background after thresholding
    save(tmp_path / "labels" / "q.png", binary)
    save(tmp_path / "images" / "q.jpg", photo(1))

    cases = load_image_mask(tmp_path)
    assert [(c.name, c.meta["label"]) for c in cases] == [
        ("p-label5", 5),
        ("p-label9", 9),
        ("q-label1", 1),
    ]
    assert boxes(cases) == [[0, 0, 4, 4], [20, 10, 29, 14], [0, 20, 34, 39]]
    parts = load_image_mask(tmp_path, components=True)
    assert boxes(parts)[2:] == [[0, 20, 9, 24], [30, 30, 34, 39]]
    assert [c.meta["label"] for c in parts] == [5, 9, 1, 1]


def test_image_mask_colour_coded_and_large_ids(tmp_path):
    colours = np.zeros((H, W, 3), np.uint8)
    colours[2:5, 3:9] = (255, 0, 0)
    colours[10:20, 10:30] = (0, 0, 255)
    save(tmp_path / "images" / "c.png", photo())
    save(tmp_path / "masks" / "c_gt.png", colours)
    ids = rect(0, 4, 0, 4, value=100_000, dtype=np.int32) + rect(20, 24, 30, 34, value=7)
    np.save(tmp_path / "images" / "d.npy", photo()[..., 0])
    np.save(tmp_path / "masks" / "d.npy", ids)

    cases = load_image_mask(tmp_path)
    assert [c.name for c in cases] == ["c-label1", "c-label2", "d-label7", "d-label100000"]
    assert boxes(cases) == [[10, 10, 29, 19], [3, 2, 8, 4], [30, 20, 34, 24], [0, 0, 4, 4]]


# ------------------------------------------------------------------------------------------
# MedSAM npz


def test_npz_2d_keys(tmp_path):
    gts = rect(5, 9, 10, 19, value=1) + rect(20, 29, 0, 4, value=3)
    np.savez(tmp_path / "CT_a.npz", imgs=photo(), gts=gts)
    np.savez(tmp_path / "CT_b.npz", img=photo()[..., 0], gt=rect(0, 9, 0, 9, value=4))
    np.savez(tmp_path / "CT_c.npz", image=photo(), gts=rect(1, 1, 1, 1, value=2))  # 1 px

    cases = load_dataset(tmp_path)
    assert detect_format(tmp_path) == detect_format(tmp_path / "CT_a.npz") == "npz"
    assert [c.name for c in cases] == ["CT_a-label1", "CT_a-label3", "CT_b-label4"]
    assert boxes(cases) == [[10, 5, 19, 9], [0, 20, 4, 29], [0, 0, 9, 9]]
    assert cases[0].image.shape == (H, W, 3) and cases[2].image.shape == (H, W)
    assert cases[0].meta["slice"] is None and cases[0].kind == "npz"
    assert len(load_npz(tmp_path / "CT_c.npz", min_area=1)) == 1


def make_volume(depth=12):
    """Label 1 on slices 2..9, widest on slice 5; label 2 a 4-pixel speck on slice 0."""
    labels = np.zeros((depth, H, W), np.uint8)
    for z, half in zip(range(2, 10), (2, 4, 6, 9, 7, 5, 3, 2), strict=True):
        labels[z, 10:20, 25 - half : 25 + half + 1] = 1
    labels[0, 0:2, 0:2] = 2
    image = np.linspace(0, 1, labels.size, dtype=np.float32).reshape(labels.shape)
    return image, labels


def test_npz_3d_slice_choice(tmp_path):
    image, labels = make_volume()
    np.savez(tmp_path / "MR_vol.npz", imgs=image, gts=labels, spacing=np.array([0.5, 0.6, 3.0]))

    cases = load_npz(tmp_path)
    assert [c.meta["slice"] for c in cases] == [3, 5, 7]  # largest and +-quarter of extent 8
    assert [c.name for c in cases] == [
        "MR_vol-label1-z003",
        "MR_vol-label1-z005",
        "MR_vol-label1-z007",
    ]
    assert boxes(cases) == [[21, 10, 29, 19], [16, 10, 34, 19], [20, 10, 30, 19]]
    np.testing.assert_array_equal(cases[1].image, image[5])
    assert cases[0].meta["spacing"] == (0.6, 0.5)  # (row, column) from (x, y, z)
    assert [c.meta["slice"] for c in load_npz(tmp_path, max_slices_per_object=1)] == [5]
    every = load_npz(tmp_path, max_slices_per_object=None, min_area=1)
    assert [(c.meta["label"], c.meta["slice"]) for c in every] == [(1, z) for z in range(2, 10)] + [
        (2, 0)
    ]


def test_npz_challenge_layout(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "gts").mkdir()
    np.savez(tmp_path / "imgs" / "2D_x.npz", imgs=photo(), boxes=np.zeros((1, 4)))
    np.savez(tmp_path / "gts" / "2D_x.npz", gts=rect(3, 7, 5, 9, value=1))
    cases = load_dataset(tmp_path)
    assert boxes(cases) == [[5, 3, 9, 7]]
    assert cases[0].meta["source"] == str(tmp_path / "imgs" / "2D_x.npz")


# ------------------------------------------------------------------------------------------
# NIfTI


def save_nifti(path, zyx, zooms=(0.7, 0.8, 2.5)):
    """Save a (Z, Y, X) array with voxel sizes (x, y, z) = ``zooms``, RAS+ axes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(
        nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), np.diag([*zooms, 1])), path
    )


def test_nifti_nnunet_layout(tmp_path):
    image, labels = make_volume()
    labels[4, 30:35, 40:46] = 3  # label 3 on one slice only
    save_nifti(tmp_path / "imagesTr" / "liver_001_0000.nii.gz", image)
    save_nifti(tmp_path / "imagesTr" / "liver_001_0001.nii.gz", 1 - image)  # second channel
    save_nifti(tmp_path / "labelsTr" / "liver_001.nii.gz", labels.astype(np.float32))
    (tmp_path / "imagesTr" / "._liver_001_0000.nii.gz").write_bytes(b"macOS fork")

    cases = load_dataset(tmp_path)
    assert detect_format(tmp_path) == "nifti"
    assert [(c.meta["label"], c.meta["slice"]) for c in cases] == [(1, 3), (1, 5), (1, 7), (3, 4)]
    assert cases[1].name == "liver_001-label1-z005" and cases[1].kind == "nifti"
    assert boxes(cases)[1:] == [[16, 10, 34, 19], [20, 10, 30, 19], [40, 30, 45, 34]]
    np.testing.assert_allclose(cases[1].image, image[5])  # the _0000 channel
    assert cases[0].meta["spacing"] == pytest.approx((0.8, 0.7))  # (row, column) in mm
    assert cases[0].meta["source"] == str(tmp_path / "imagesTr" / "liver_001_0000.nii.gz")


def test_nifti_images_labels_folder(tmp_path):
    image, labels = make_volume()
    save_nifti(tmp_path / "images" / "brain.nii", image)
    save_nifti(tmp_path / "labels" / "brain_seg.nii", labels)
    assert [c.meta["slice"] for c in load_nifti(tmp_path, max_slices_per_object=2)] == [5, 7]


# ------------------------------------------------------------------------------------------
# limit, laziness, errors


def test_limit_reads_lazily(tmp_path):
    for i in range(3):
        save(tmp_path / "images" / f"{i}.png", photo(i))
        save(tmp_path / "masks" / f"{i}.png", rect(i, i + 5, 0, 9, value=1))
    (tmp_path / "images" / "2.png").write_bytes(b"not a png")  # never reached
    assert [c.name for c in load_dataset(tmp_path, limit=2)] == ["0-label1", "1-label1"]
    first = next(iter_dataset(tmp_path))
    assert first.box.tolist() == [0, 0, 9, 5]
    with pytest.raises(ImageError, match=r"2\.png: cannot read"):
        load_dataset(tmp_path)


def test_errors_name_the_problem(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match="no images, masks, .npz or NIfTI files found"):
        load_dataset(empty)
    with pytest.raises(ImageError, match="no such file or folder"):
        load_dataset(tmp_path / "missing")

    lonely = tmp_path / "lonely"
    save(lonely / "images" / "a.png", photo())
    save(lonely / "images" / "b.png", photo())
    save(lonely / "masks" / "a.png", rect(0, 5, 0, 5))
    with pytest.raises(ImageError, match=r"images/b\.png: no mask found for this image"):
        load_dataset(lonely)
    save(lonely / "masks" / "b.png", rect(0, 5, 0, 5))
    save(lonely / "masks" / "c.png", rect(0, 5, 0, 5))
    with pytest.raises(ImageError, match=r"masks/c\.png: no image found for this mask"):
        load_dataset(lonely)

    odd = tmp_path / "odd"
    save(odd / "images" / "a.png", photo())
    save(odd / "masks" / "a.png", rect(0, 5, 0, 5, shape=(H, W + 1)))
    with pytest.raises(ImageError, match=r"a\.png: image shape \(40, 50, 3\) does not match"):
        load_dataset(odd)

    small = tmp_path / "small"
    save(small / "s.jpg", photo())
    save(small / "s.png", rect(0, 5, 0, 5, value=255))
    with pytest.raises(ImageError, match="no ground-truth object of at least 1000 pixels"):
        load_dataset(small, min_area=1000)
    with pytest.raises(ImageError, match="unknown dataset format 'coco'"):
        load_dataset(odd, format="coco")

    np.savez(tmp_path / "nolabels.npz", imgs=photo())
    with pytest.raises(ImageError, match=r"nolabels\.npz: no label array \(keys \['imgs'\]"):
        load_npz(tmp_path / "nolabels.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ImageError, match=r"broken\.npz: cannot read the file"):
        load_npz(tmp_path / "broken.npz")
    np.savez(tmp_path / "float.npz", imgs=photo(), gts=np.full((H, W), 0.5))
    with pytest.raises(ImageError, match="non-integer values"):
        load_npz(tmp_path / "float.npz")

    save_nifti(tmp_path / "vol.nii.gz", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ImageError, match="a dataset is a folder or a MedSAM .npz file"):
        load_dataset(tmp_path / "vol.nii.gz")


def test_public_names():
    assert set(datasets.FORMATS) == {"hq-sam", "npz", "image-mask", "nifti"}
    with pytest.raises(ValueError, match="max_slices_per_object"):
        load_dataset(".", max_slices_per_object=0)
