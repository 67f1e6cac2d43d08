"""Pictures of what merging did, and the arrays an overlay needs to show it.

The default picture is a *compression map*: one hue whose strength says how many tokens each
pixel's token was merged with (its group size: 1 = kept as it was, 4 = a 2x2 cell, 16 = a 4x4
block; windows cut some groups short, so 2, 8 or 12 occur too), with the cells the method
protected drawn as one clean outline around the protected region. Random colours per group
(``style="groups"``) remain as an option: they show the groups themselves but read as confetti
at the default rates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# The hue of the compression map (a blue that stays visible on grey MR and CT) and of the
# protected outline and mask outline.
HUE = (30, 120, 255)
OUTLINE = (255, 140, 0)
MASK = (255, 230, 0)
LARGEST_GROUP = 16  # 4x4 blocks: the map saturates there
# Protected regions are cleaned on the token grid before outlining: gaps of this many tokens
# are closed and pieces smaller than this many tokens dropped, so the outline is a few clean
# contours rather than a dot per protected cell.
CLOSE_TOKENS = 1
MIN_REGION_TOKENS = 8


def group_sizes(merge_map: np.ndarray) -> np.ndarray:
    """(H, W) group ids -> (H, W) int: the size of each pixel's (or token's) group."""
    merge_map = np.asarray(merge_map)
    _, inverse, counts = np.unique(merge_map, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(merge_map.shape)]


def compression_level(sizes: np.ndarray, largest: int = LARGEST_GROUP) -> np.ndarray:
    """Group sizes -> 0..1 on a log scale: 0 kept, 0.5 for a 2x2 cell, 1 for a 4x4 block."""
    sizes = np.asarray(sizes, dtype=np.float32)
    return np.clip(np.log(np.maximum(sizes, 1)) / np.log(largest), 0.0, 1.0)


def protected_region(protected: np.ndarray, close: int = CLOSE_TOKENS,
                     min_tokens: int = MIN_REGION_TOKENS) -> np.ndarray:  # fmt: skip
    """A token grid's protected cells as a region: small gaps closed, specks dropped."""
    region = np.asarray(protected, bool)
    if close > 0 and region.any():
        padded = np.pad(region, close, mode="edge")  # no closing artefacts at the grid's edge
        square = np.ones((3, 3), bool)
        closed = ndimage.binary_closing(padded, structure=square, iterations=close)
        region = closed[close:-close, close:-close]
    labels, n = ndimage.label(region)
    if n:
        counts = np.bincount(labels.ravel())
        keep = counts >= min_tokens
        keep[0] = False
        region = keep[labels]
    return region


def outline(region: np.ndarray) -> np.ndarray:
    """The inner boundary of a region: its pixels with a 4-neighbour outside it (the image's
    edge does not count as outside)."""
    region = np.asarray(region, bool)
    inner = ndimage.binary_erosion(np.pad(region, 1, mode="edge"))[1:-1, 1:-1]
    return region & ~inner


@dataclass
class MergeMapLayers:
    """What an overlay of one merged block shows, in image pixels.

    ``sizes``: group size per pixel (1 = kept). ``level``: ``compression_level(sizes)``.
    ``rgba``: float32 (H, W, 4) single-hue layer, transparent where nothing merged.
    ``protected``: the cleaned protected region; ``outline``: its boundary (one pixel wide).
    ``groups``: group id per pixel, for the random-colour style. ``legend``: (size, RGBA) for
    each group size present, smallest first.
    """

    block: int
    sizes: np.ndarray
    level: np.ndarray
    rgba: np.ndarray
    protected: np.ndarray
    outline: np.ndarray
    groups: np.ndarray
    legend: list[tuple[int, tuple[float, float, float, float]]]


def _rgba(level: np.ndarray, max_alpha: float) -> np.ndarray:
    rgba = np.empty((*level.shape, 4), np.float32)
    rgba[..., :3] = np.asarray(HUE, np.float32) / 255
    rgba[..., 3] = max_alpha * level
    return rgba


def merge_map_layers(source, block: int = 0, max_alpha: float = 0.7) -> MergeMapLayers:
    """The overlay arrays of merged block ``block`` of ``source`` -- a
    :class:`~structsam.Predictor` after ``set_image`` or an ``Embedding``: anything with
    ``merge_info`` and ``map_to_image``. Pure: reads the merge plan, changes nothing."""
    info = list(source.merge_info)
    if not info:
        raise ValueError("nothing was merged (no merge_info): patch the model and encode first")
    if not -len(info) <= block < len(info):
        raise ValueError(f"block {block} out of range: {len(info)} merged blocks")
    merged = info[block]
    grid_ids = np.asarray(merged.merge_map)
    grid_sizes = group_sizes(grid_ids)
    region_grid = protected_region(np.asarray(merged.protected, bool))
    sizes = np.asarray(source.map_to_image(grid_sizes))
    groups = np.asarray(source.map_to_image(grid_ids))
    region = np.asarray(source.map_to_image(region_grid.astype(np.uint8))).astype(bool)
    level = compression_level(sizes)
    legend = [
        (int(s), (*(np.asarray(HUE) / 255).tolist(), float(max_alpha * compression_level(s))))
        for s in np.unique(grid_sizes)
    ]
    return MergeMapLayers(
        merged.block, sizes, level, _rgba(level, max_alpha), region, outline(region), groups, legend
    )


# ---------------------------------------------------------------------------- pictures


def group_colors(merge_map: np.ndarray, seed: int = 0) -> np.ndarray:
    """(H, W) group ids -> (H, W, 3) uint8, one random colour per group."""
    ids, inverse = np.unique(merge_map, return_inverse=True)
    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 256, size=(len(ids), 3), dtype=np.uint8)
    return palette[inverse.reshape(merge_map.shape)]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Any 2D/RGB image -> uint8 RGB for display (min-max per image)."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.nanmin(img), np.nanmax(img)
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    img = (np.nan_to_num(img) * 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img[..., :3]


def merge_picture(image, layers: MergeMapLayers, mask=None, style: str = "compression",
                  alpha: float = 0.45) -> np.ndarray:  # fmt: skip
    """One RGB picture: the image with the compression map (or random group colours where
    tokens merged), the protected region's outline in orange and the mask's in yellow."""
    if style not in ("compression", "groups"):
        raise ValueError(f"style must be 'compression' or 'groups', got {style!r}")
    base = to_uint8(image).astype(np.float32)
    if style == "compression":
        weight = layers.rgba[..., 3:4]
        out = (1 - weight) * base + weight * (layers.rgba[..., :3] * 255)
    else:
        merged = layers.sizes > 1
        colors = group_colors(layers.groups).astype(np.float32)
        out = base.copy()
        out[merged] = (1 - alpha) * base[merged] + alpha * colors[merged]
    out[layers.outline] = OUTLINE
    if mask is not None:
        m = np.asarray(mask, bool)
        out[m & ~ndimage.binary_erosion(m, iterations=2)] = MASK
    return np.clip(out, 0, 255).astype(np.uint8)


def legend_strip(layers: MergeMapLayers, width: int, height: int = 16) -> np.ndarray:
    """(height, width, 3) uint8: a swatch per group size present, labelled with the size."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    n = max(len(layers.legend), 1)
    for k, (size, rgba) in enumerate(layers.legend):
        a = rgba[3]
        colour = tuple(int((1 - a) * 255 + a * c * 255) for c in rgba[:3])
        x0, x1 = k * width // n, (k + 1) * width // n
        draw.rectangle([x0, 0, x1 - 1, height - 1], fill=colour)
        draw.text((x0 + 2, 2), "kept" if size == 1 else f"x{size}", fill=(0, 0, 0))
    return np.asarray(strip)


def save_png(path, rgb: np.ndarray, min_side: int = 512, footer=None) -> None:
    """Write a PNG, enlarged by an integer factor (nearest) so small slices stay readable;
    ``footer(width)`` (e.g. a :func:`legend_strip`) goes under it at the enlarged width."""
    from PIL import Image

    rgb = np.asarray(rgb, dtype=np.uint8)
    k = max(1, -(-min_side // max(rgb.shape[:2])))
    if k > 1:
        rgb = rgb.repeat(k, axis=0).repeat(k, axis=1)
    if footer is not None:
        rgb = np.concatenate([rgb, footer(rgb.shape[1])], axis=0)
    Image.fromarray(rgb).save(path)
