"""The plugin's napari layers: created once, found again by name, aligned with the image.

Every layer takes the image layer's placement (scale, translate, rotation, shear, affine) so
that prompts, masks and overlays sit on the right voxels of anisotropic CT/MR volumes, and the
labels layers take its ``structsam_*`` metadata, the source geometry the writer saves with.
On an oblique scan napari draws each slice without its out-of-plane tilt, and maps clicks and
brush strokes through the full (tilted) transform, so they would land in other slices than
the one shown; the plugin's layers there get the placement napari draws the image with
(:func:`in_slice_matrix`), so clicks and strokes land on the voxels shown. Only GUI-thread code
calls this.
"""

from __future__ import annotations

import functools

import numpy as np

from ._placement import displayed_position, in_slice_matrix, world_matrix

__all__ = ["displayed_position", "ensure_layers", "in_slice_matrix", "merge_overlays"]

POINTS = "structsam points"
BOXES = "structsam boxes"
MASK = "structsam mask"
OBJECTS = "structsam objects"
MERGE_MAP = "structsam merge map"
PROTECTED = "structsam protected cells"
NAMES = (MERGE_MAP, PROTECTED, OBJECTS, MASK, BOXES, POINTS)  # bottom to top

POSITIVE, NEGATIVE = "positive", "negative"
POINT_COLORS = ["#39ff14", "#ff2d2d"]  # positive green, negative red (micro-sam's convention)
MASK_COLOR = "#ffd400"
PROTECTED_COLOR = "#ff4dff"  # magenta: apart from the map's blue and the boxes' orange


def _aligned(layer, image) -> None:
    if layer.ndim != image.ndim:
        layer.scale = tuple(image.scale[-layer.ndim :])
        layer.translate = tuple(image.translate[-layer.ndim :])
        return
    drawn = in_slice_matrix(image)
    if np.allclose(drawn, world_matrix(image), rtol=0, atol=1e-9):
        layer.scale, layer.translate = image.scale, image.translate
        layer.rotate, layer.shear = image.rotate, image.shear
        layer.affine = image.affine
        return
    from napari.utils.transforms import Affine

    placed = Affine(affine_matrix=drawn)
    layer.affine = np.eye(layer.ndim + 1)
    layer.scale, layer.translate = placed.scale, placed.translate
    layer.rotate, layer.shear = placed.rotate, placed.shear


def _single_colour(color: str):
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: color})


def _labels(viewer, name, shape, dtype, image, **kwargs):
    """Find ``name`` with the right shape or add it. A layer of the wrong shape that holds
    labels is renamed, not dropped, so no earlier annotation is lost."""
    layer = viewer.layers[name] if name in viewer.layers else None
    if layer is not None and tuple(layer.data.shape) != tuple(shape):
        if np.any(np.asarray(layer.data)):
            layer.name = f"{name} (earlier image)"
        else:
            viewer.layers.remove(layer)
        layer = None
    if layer is None:
        layer = viewer.add_labels(np.zeros(shape, dtype), name=name, **kwargs)
    _aligned(layer, image)
    copy_source_geometry(layer, image)
    return layer


def copy_source_geometry(labels, image) -> None:
    """Give ``labels`` the ``structsam_*`` metadata of ``image`` (the source's geometry), so
    File > Save writes them where they overlay the scan; stale keys of an earlier image go."""
    for key in [k for k in labels.metadata if k.startswith("structsam_")]:
        del labels.metadata[key]
    labels.metadata.update({k: v for k, v in image.metadata.items() if k.startswith("structsam_")})


def ensure_layers(viewer, image, shape: tuple[int, ...]) -> dict:
    """All six layers for an image layer whose spatial shape is ``shape`` (2D or 3D)."""
    ndim = len(shape)
    layers = {}
    layers[MERGE_MAP] = _labels(viewer, MERGE_MAP, shape, np.int32, image, opacity=0.45)
    layers[PROTECTED] = _labels(viewer, PROTECTED, shape, np.uint8, image, opacity=0.45)
    layers[PROTECTED].colormap = _single_colour(PROTECTED_COLOR)
    # the protected region's outline is drawn as such (most of an anatomical image is
    # protected, a fill would hide it)
    layers[PROTECTED].contour = 0
    layers[OBJECTS] = _labels(viewer, OBJECTS, shape, np.int32, image, opacity=0.6)
    layers[MASK] = _labels(viewer, MASK, shape, np.uint8, image, opacity=0.55)
    layers[MASK].colormap = _single_colour(MASK_COLOR)

    boxes = viewer.layers[BOXES] if BOXES in viewer.layers else None
    if boxes is not None and boxes.ndim != ndim:
        boxes.name = f"{BOXES} (earlier image)"
        boxes = None
    if boxes is None:
        boxes = viewer.add_shapes(
            ndim=ndim, name=BOXES, face_color="transparent", edge_color="#ffa500", edge_width=1.5
        )
    _aligned(boxes, image)
    layers[BOXES] = boxes

    points = viewer.layers[POINTS] if POINTS in viewer.layers else None
    if points is not None and points.ndim != ndim:
        points.name = f"{POINTS} (earlier image)"
        points = None
    if points is None:
        points = viewer.add_points(
            ndim=ndim,
            name=POINTS,
            features={"label": np.array([], dtype=object)},
            property_choices={"label": [POSITIVE, NEGATIVE]},
            face_color="label",
            face_color_cycle=POINT_COLORS,
            border_color="white",
            size=max(3.0, 0.02 * max(shape[-2:])),
        )
    _aligned(points, image)
    layers[POINTS] = points
    return layers


def merge_overlays(embedding, block: int, style: str = "compression"):
    """(values, outline, legend) of one merged block of a ``structsam.Embedding``, in its
    image's pixels (``structsam.vis.merge_map_layers``): ``values`` are the group size per
    pixel (``style="compression"``; 1, kept, is 0 = transparent) or a shuffled group id where
    tokens merged (``"groups"``); ``outline`` the protected region's boundary; ``legend``
    (size, RGBA) per group size present (empty for ``"groups"``)."""
    from structsam.vis import merge_map_layers

    layers = merge_map_layers(embedding, block, max_alpha=1.0)
    merged = layers.sizes > 1
    if style == "compression":
        values = np.where(merged, layers.sizes, 0).astype(np.int32)
        legend = layers.legend
    else:
        ids, inverse = np.unique(layers.groups, return_inverse=True)
        # shuffled so that neighbouring groups get unrelated colours
        order = np.random.default_rng(block).permutation(len(ids)) + 1
        values = np.where(merged, order[inverse.reshape(merged.shape)], 0).astype(np.int32)
        legend = []
    return values, layers.outline.astype(np.uint8), legend


def compression_colormap(legend):
    """Group size -> the legend's colour (size 1 and background transparent); one object
    per legend (making one takes ~0.1 s, and a new one makes napari rebuild its textures)."""
    return _compression_colormap(tuple((int(s), tuple(c)) for s, c in legend))


@functools.lru_cache(maxsize=16)
def _compression_colormap(legend: tuple):
    from napari.utils.colormaps import DirectLabelColormap

    colors = {None: "transparent", 0: "transparent"}
    colors.update({size: rgba for size, rgba in legend if size > 1})
    return DirectLabelColormap(color_dict=colors)


@functools.lru_cache(maxsize=1)
def groups_colormap():
    from napari.utils.colormaps import label_colormap

    return label_colormap(49, seed=0.5)


def legend_html(legend) -> str:
    """One line of swatches: the colour of each group size over a dark background."""
    cells = []
    for size, (r, g, b, a) in legend:
        rgb = [round(255 * (0.15 * (1 - a) + c * a)) for c in (r, g, b)]
        hex_color = "#" + "".join(f"{v:02x}" for v in rgb)
        name = "kept" if size == 1 else str(size)
        cells.append(f'<span style="background:{hex_color}">&nbsp;&nbsp;&nbsp;</span> {name}')
    return "tokens per group: " + " &nbsp;".join(cells)
