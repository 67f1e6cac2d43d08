"""Pictures of what merging did: token groups in random colours, protected cells, masks."""

from __future__ import annotations

import numpy as np


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


def merge_overlay(image, merge_map, protected=None, mask=None, alpha=0.45) -> np.ndarray:
    """One RGB picture: the image, merged groups in colour, protected cells left grey, and
    the mask outlined in yellow. ``merge_map``/``protected``/``mask`` are in image pixels."""
    from scipy import ndimage

    base = to_uint8(image).astype(np.float32)
    colors = group_colors(merge_map).astype(np.float32)
    ids, counts = np.unique(merge_map, return_counts=True)
    merged = np.isin(merge_map, ids[counts > 1])
    if protected is not None:
        merged &= ~protected
    out = base.copy()
    out[merged] = (1 - alpha) * base[merged] + alpha * colors[merged]
    if protected is not None:
        edge = protected & ~ndimage.binary_erosion(protected)
        out[edge] = (0, 170, 255)
    if mask is not None:
        m = np.asarray(mask, bool)
        outline = m & ~ndimage.binary_erosion(m, iterations=2)
        out[outline] = (255, 230, 0)
    return out.astype(np.uint8)


def save_png(path, rgb: np.ndarray, min_side: int = 512) -> None:
    """Write a PNG, enlarged by an integer factor (nearest) so small slices stay readable."""
    from PIL import Image

    rgb = np.asarray(rgb, dtype=np.uint8)
    k = max(1, -(-min_side // max(rgb.shape[:2])))
    if k > 1:
        rgb = rgb.repeat(k, axis=0).repeat(k, axis=1)
    Image.fromarray(rgb).save(path)
