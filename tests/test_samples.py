import warnings
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage as ndi

from structsam import samples as images
from structsam.eval import synthetic as samples
from structsam.eval.synthetic import Case


@pytest.fixture(scope="module")
def cases():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return samples.evaluation_cases()


@pytest.fixture(scope="module")
def anatomy():
    return samples.anatomy_cases()


def tight_box(mask):
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=float)


def check_case(case: Case):
    assert isinstance(case.name, str) and case.name
    assert case.kind in samples.KINDS
    img = case.image
    if img.ndim == 2:
        assert img.dtype == np.float32
    else:
        assert img.shape[2] == 3 and img.dtype == np.uint8
    assert np.isfinite(img).all()
    assert max(img.shape[:2]) <= 512
    assert case.mask.dtype == bool and case.mask.shape == img.shape[:2]
    assert case.mask.any()
    assert case.box.shape == (4,) and case.point.shape == (2,)
    np.testing.assert_array_equal(case.box, tight_box(case.mask))
    x, y = case.point.astype(int)
    assert case.mask[y, x], "the point must lie inside the mask"
    x0, y0, x1, y1 = case.box
    assert 0 <= x0 <= x1 < img.shape[1] and 0 <= y0 <= y1 < img.shape[0]


def test_mni152_volume_and_slices():
    vol, spacing = images.mni152_volume()
    assert vol.dtype == np.float32 and vol.ndim == 3
    assert spacing == (1.0, 1.0, 1.0)
    assert vol.shape == (189, 233, 197)  # (z, y, x)
    vol[:] = 0  # a copy: the cache must not be affected
    for plane, shape in (("axial", (233, 197)), ("coronal", (189, 197)), ("sagittal", (189, 233))):
        sl = samples.mni152_slice(plane)
        assert sl.shape == shape and sl.dtype == np.float32
        assert sl.max() > 0.5
        brain = samples.mni152_mask_slice("brain", plane)
        assert brain.shape == shape and brain.sum() > 0.2 * brain.size
    vol2, _ = images.mni152_volume()
    axial = samples.mni152_slice("axial", 80)
    np.testing.assert_array_equal(axial, vol2[80, ::-1, :])
    with pytest.raises(ValueError):
        samples.mni152_slice("oblique")
    with pytest.raises(ValueError):
        samples.mni152_slice("axial", 500)


def test_all_cases_valid(cases, anatomy):
    assert 200 <= len(cases) <= 240
    for case in cases + anatomy:
        check_case(case)
    names = [c.name for c in cases + anatomy]
    assert len(set(names)) == len(names)


def test_case_counts(cases, anatomy):
    kinds = Counter(c.kind for c in cases)
    assert kinds["lesion-mri"] + kinds["lesion-ct"] >= 120
    assert kinds["anatomy-mri"] >= 20  # the lateral ventricles
    assert kinds["lesion-ct"] >= 2
    assert kinds["phantom"] >= 4
    assert kinds["photo"] >= 4
    planes = {c.meta.get("plane") for c in cases if c.name.startswith("lesion") and "mni" in c.name}
    assert planes == {"axial", "coronal", "sagittal"}
    assert all(c.well_posed_hint for c in cases)
    assert len(anatomy) == 9
    assert all(c.kind == "anatomy-mri" and not c.well_posed_hint for c in anatomy)


def test_lesions_have_contrast_with_their_surroundings(cases):
    lesions = [c for c in cases if c.kind.startswith("lesion")]
    signs = []
    for c in lesions:
        ring = ndi.binary_dilation(c.mask, iterations=6) & ~ndi.binary_dilation(
            c.mask, iterations=2
        )
        diff = float(c.image[c.mask].mean() - c.image[ring].mean())
        assert abs(diff) > 0.15 * c.meta["tissue_range"], c.name
        signs.append(np.sign(diff))
        assert 3 <= c.meta["radius_px"] <= 20, c.name
        assert ndi.label(c.mask)[1] == 1, c.name
        equiv_radius = np.sqrt(c.mask.sum() / np.pi)
        assert 3 <= equiv_radius <= 30, c.name
    assert signs.count(1) >= 5 and signs.count(-1) >= 5


def test_lesions_lie_in_tissue_not_background(cases):
    for c in cases:
        if not c.name.startswith("lesion") or "mni" not in c.name:
            continue
        original = samples.mni152_slice(c.meta["plane"], c.meta["slice_index"])
        brain = samples.mni152_mask_slice("brain", c.meta["plane"], c.meta["slice_index"])
        assert brain[c.mask].all(), c.name
        assert (original[c.mask] > 0).all(), c.name
        # Outside the lesion's soft edge the real slice is untouched.
        far = ~ndi.binary_dilation(c.mask, iterations=8)
        np.testing.assert_array_equal(c.image[far], original[far])


def test_dicom_lesions_lie_in_the_body(cases):
    sources = {"ct-body": "CT_small.dcm", "ct-head": "J2K_pixelrep_mismatch.dcm"}
    sources["mr-abdomen"] = "examples_overlay.dcm"
    seen = 0
    for c in cases:
        key = c.name[len("lesion-00-") :]
        if key not in sources:
            continue
        original = np.asarray(samples._dicom(sources[key])["image"])
        background = original < (-400 if key.startswith("ct") else 0.1 * np.median(original))
        assert not (background & c.mask).any(), c.name
        seen += 1
    assert seen >= 4


def test_lesion_edges_are_smooth(cases):
    # Soft alpha blending: the lesion/background step is spread over more than one pixel, so
    # there are intermediate values at the edge.
    for c in cases:
        if not c.name.startswith("lesion-") or "mni" not in c.name:
            continue
        original = samples.mni152_slice(c.meta["plane"], c.meta["slice_index"])
        changed = np.abs(c.image - original) > 1e-6
        assert changed.sum() > c.mask.sum(), c.name


def test_ct_lesions_in_hounsfield_window(cases):
    ct = [c for c in cases if c.kind == "lesion-ct"]
    assert ct
    for c in ct:
        lo, hi = c.meta["window"]
        assert c.image.min() >= lo and c.image.max() <= hi


def test_phantom_masks_rebuild_the_phantom():
    from skimage import data

    phantom = data.shepp_logan_phantom()
    masks = samples.shepp_logan_masks(phantom.shape[0])
    weights = np.array([e[0] for e in samples.SHEPP_LOGAN_ELLIPSES])
    rebuilt = np.tensordot(weights, masks.astype(float), axes=1)
    # The bundled phantom is an 8-bit PNG: equal up to its quantisation step.
    np.testing.assert_allclose(rebuilt, phantom, atol=1 / 255)


def test_coin_masks_cover_bright_coins(cases):
    for c in cases:
        if c.kind != "photo":
            continue
        ring = ndi.binary_dilation(c.mask, iterations=5) & ~ndi.binary_dilation(
            c.mask, iterations=2
        )
        assert c.image[c.mask].mean() > c.image[ring].mean() + 40
        labels, n = ndi.label(c.mask)
        assert n == 1


def test_determinism():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = samples.lesion_cases(8, seed=3)
        b = samples.lesion_cases(8, seed=3)
        c = samples.lesion_cases(8, seed=4)
    for x, y in zip(a, b, strict=True):
        assert x.name == y.name
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.mask, y.mask)
        np.testing.assert_array_equal(x.box, y.box)
    assert any(not np.array_equal(x.mask, z.mask) for x, z in zip(a, c, strict=True))
    p1, p2 = samples.phantom_cases(), samples.phantom_cases()
    np.testing.assert_array_equal(p1[0].mask, p2[0].mask)
    k1, k2 = samples.coin_cases(), samples.coin_cases()
    assert [k.name for k in k1] == [k.name for k in k2]


def test_case_from_mask_rejects_empty():
    with pytest.raises(ValueError):
        samples.case_from_mask("x", np.zeros((4, 4), np.float32), np.zeros((4, 4), bool), "photo")


def test_ventricles_are_dark_csf_inside_the_brain():
    vents = samples.ventricle_cases()
    assert {c.meta["plane"] for c in vents} == set(samples.PLANES)
    for c in vents:
        check_case(c)
        brain = images.mni152_mask_slice("brain", c.meta["plane"], c.meta["slice_index"])
        assert brain[c.mask].all(), c.name
        ring = ndi.binary_dilation(c.mask, iterations=3) & ~c.mask & brain
        # CSF is ~0.25 in the template, the tissue around a ventricle ~0.5 and more
        assert c.image[c.mask].mean() < 0.4 < c.image[ring].mean(), c.name


def test_split_keeps_every_source_on_one_side(cases):
    tuning = samples.split_cases(cases, "tuning")
    test = samples.split_cases(cases, "test")
    assert len(tuning) + len(test) == len(cases)
    assert {samples.source_of(c) for c in tuning}.isdisjoint(samples.source_of(c) for c in test)
    # the same slab of MNI slices (lesions and ventricles) never straddles the split
    slabs = {}
    for c in cases:
        slabs.setdefault(samples.source_of(c), set()).add(samples.split_of(c))
    assert all(len(sides) == 1 for sides in slabs.values())
    assert len(test) >= 60 and len(tuning) >= 20
    assert {c.kind for c in test} >= {"lesion-mri", "lesion-ct", "photo", "anatomy-mri"}
    # deterministic, and decided by the source alone
    assert [c.name for c in samples.split_cases(cases, "test")] == [c.name for c in test]
    with pytest.raises(ValueError, match="split"):
        samples.split_cases(cases, "train")


def test_loaded_cases_split_by_file():
    img = np.zeros((8, 8), np.float32)
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    a = [
        samples.case_from_mask(f"a{i}", img, mask, "npz", meta={"source": "vol1.npz"})
        for i in range(3)
    ]
    sides = {samples.split_of(c) for c in a}
    assert len(sides) == 1  # every slice of one file on one side
