"""Merge-map pictures: group sizes per pixel, a clean protected outline, the CLI picture."""

import numpy as np
import pytest
from scipy import ndimage

import structsam
from structsam.samples import mni152_volume
from structsam.vis import (
    compression_level,
    group_sizes,
    merge_map_layers,
    merge_picture,
    outline,
    protected_region,
)


def test_group_sizes_count_the_members_of_each_group():
    ids = np.array([[0, 0, 1, 2], [0, 0, 1, 3], [4, 4, 4, 4], [4, 4, 4, 4]])
    sizes = group_sizes(ids)
    np.testing.assert_array_equal(sizes, [[4, 4, 2, 1], [4, 4, 2, 1], [8, 8, 8, 8], [8, 8, 8, 8]])
    level = compression_level(np.array([1, 4, 16, 64]))
    np.testing.assert_allclose(level, [0.0, 0.5, 1.0, 1.0])


def test_outline_is_the_boundary_of_the_region():
    region = np.zeros((20, 24), bool)
    region[4:12, 5:15] = True
    region[8:16, 10:20] = True
    line = outline(region)
    assert (line <= region).all()
    # every outline pixel touches the outside; no pixel inside does
    outside = ~np.pad(region, 1, constant_values=True)
    touches = ndimage.binary_dilation(outside, structure=ndimage.generate_binary_structure(2, 1))
    np.testing.assert_array_equal(line, region & touches[1:-1, 1:-1])
    # a region touching the image edge is not outlined along the edge
    edge = np.zeros((10, 10), bool)
    edge[:, :4] = True
    assert not outline(edge)[:, 0].any() and outline(edge)[:, 3].all()


def test_protected_region_closes_gaps_and_drops_specks():
    cells = np.zeros((32, 32), bool)
    cells[4:12:2, 4:16] = True  # rows of protected cells one token apart
    cells[25, 25] = True  # a lone protected token
    region = protected_region(cells)
    assert region[4:11, 4:16].all()  # the gaps between the rows are closed
    assert not region[25, 25]
    labels, n = ndimage.label(outline(region), structure=np.ones((3, 3)))
    assert n == 1  # one contour, not a dot per cell


@pytest.mark.slow
def test_merge_map_of_a_real_encode(litemedsam):
    """On the MNI152 slice merged at the default rate: sizes are true group sizes on the token
    grid (the count of groups is the number of tokens kept), the picture is the image's size."""
    vol, _ = mni152_volume()
    image = vol[80]
    structsam.patch(litemedsam, "structsam", structsam.DEFAULT_RATE)
    try:
        predictor = structsam.Predictor(litemedsam)
        predictor.set_image(image)
        layers = merge_map_layers(predictor, block=0)
        info = predictor.merge_info[0]
    finally:
        structsam.unpatch(litemedsam)
    grid_sizes = group_sizes(info.merge_map)
    assert np.isclose((1.0 / grid_sizes).sum(), info.tokens_after)
    assert set(np.unique(layers.sizes)) <= set(np.unique(grid_sizes))
    assert layers.sizes.shape == image.shape and layers.outline.shape == image.shape
    assert {s for s, _ in layers.legend} == set(np.unique(grid_sizes).tolist())
    assert 1 in dict(layers.legend) and layers.sizes.max() > 1
    np.testing.assert_array_equal(layers.outline, outline(layers.protected))
    # kept tokens are not tinted; merged ones are, more for bigger groups
    alpha = layers.rgba[..., 3]
    assert (alpha[layers.sizes == 1] == 0).all()
    assert alpha[layers.sizes == 16].min() > alpha[layers.sizes == 4].max()
    picture = merge_picture(image, layers, mask=image > 0.5)
    assert picture.shape == (*image.shape, 3) and picture.dtype == np.uint8
    with pytest.raises(ValueError, match="style"):
        merge_picture(image, layers, style="confetti")
    with pytest.raises(ValueError, match="out of range"):
        merge_map_layers(predictor, block=99)
