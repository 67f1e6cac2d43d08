"""Model-specific preprocessing, and maps between original-image and model-input coordinates.

Coordinates are in pixels, x to the right and y down, with the image spanning [0, W] x [0, H]
(pixel (i, j) covers [j, j+1] x [i, i+1]); this is the convention SAM's own transforms scale
with, so a box around a whole image is (0, 0, W, H).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ImageError, PromptError, PromptWarning, StructSAMError
from .models.registry import ModelSpec, get_spec, resolve_device

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# Prompts overhanging the image by up to this much (pixels) are clipped without a warning.
PROMPT_TOLERANCE = 0.5


def longest_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after scaling the longest side to ``size``, rounded like SAM's ResizeLongestSide."""
    scale = size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


@dataclass(frozen=True)
class Geometry:
    """How an image of ``original_size`` sits inside the square model input.

    The image is resized to ``resized_size`` = (h, w) and placed at the top-left of a
    ``model_size`` x ``model_size`` input; the rest is padding.
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    model_size: int

    @classmethod
    def for_image(cls, original_size: tuple[int, int], spec: ModelSpec | str) -> Geometry:
        """The geometry ``prepare_image`` uses for an image of ``original_size`` = (H, W)."""
        spec = get_spec(spec)
        height, width = (int(s) for s in original_size)
        size = spec.img_size
        resized = longest_side_shape(height, width, size) if spec.keep_aspect else (size, size)
        return cls((height, width), resized, size)

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Model-input pixels per original pixel along x and y."""
        return (
            self.resized_size[1] / self.original_size[1],
            self.resized_size[0] / self.original_size[0],
        )

    def points_to_model(self, coords_xy) -> np.ndarray:
        """(..., 2) x, y in original pixels -> model-input pixels (float64)."""
        coords = _as_float_array(coords_xy, "points", last=2)
        return coords * np.asarray(self.scale_xy)

    def points_to_image(self, coords_xy) -> np.ndarray:
        """Inverse of ``points_to_model``."""
        coords = _as_float_array(coords_xy, "points", last=2)
        return coords / np.asarray(self.scale_xy)

    def boxes_to_model(self, boxes) -> np.ndarray:
        """(..., 4) x0, y0, x1, y1 in original pixels -> model-input pixels (float64)."""
        boxes = _as_float_array(boxes, "boxes", last=4)
        return boxes * np.tile(self.scale_xy, 2)

    def boxes_to_image(self, boxes) -> np.ndarray:
        """Inverse of ``boxes_to_model``."""
        boxes = _as_float_array(boxes, "boxes", last=4)
        return boxes / np.tile(self.scale_xy, 2)

    def _source_index(self, axis: int, grid_len: int) -> np.ndarray:
        # Continuous grid coordinate of each original pixel centre along one axis. Token k covers
        # model pixels [k * S / g, (k + 1) * S / g], so padding tokens are never reached.
        n_out = self.original_size[axis]
        centres = (np.arange(n_out) + 0.5) * (self.resized_size[axis] / n_out)
        return centres * (grid_len / self.model_size)

    def grid_to_image(self, grid_map, order: int = 0) -> np.ndarray:
        """Map a 2D array on the token grid of the whole square input to original pixels.

        ``grid_map`` (gy, gx) covers the ``model_size`` square, padding included (e.g. 64x64, or
        128x128 for TinyViT stage 1). Tokens that lie only on padding are dropped. ``order=0``
        samples the nearest token (keeps integer labels and the dtype), ``order=1`` interpolates
        bilinearly between token centres (float output). Returns an (H, W) array.
        """
        if isinstance(grid_map, torch.Tensor):
            grid_map = grid_map.detach().cpu().numpy()
        grid = np.asarray(grid_map)
        if grid.ndim != 2 or min(grid.shape) < 1:
            raise StructSAMError(f"grid_to_image needs a 2D token map, got shape {grid.shape}")
        if order not in (0, 1):
            raise StructSAMError(f"order must be 0 (nearest) or 1 (bilinear), not {order!r}")
        gy, gx = grid.shape
        uy = self._source_index(0, gy)
        ux = self._source_index(1, gx)
        # Tokens touching the image; the ones after them cover padding only.
        ny = -(-self.resized_size[0] * gy // self.model_size)
        nx = -(-self.resized_size[1] * gx // self.model_size)
        if order == 0:
            iy = np.minimum(np.floor(uy).astype(np.intp), ny - 1)
            ix = np.minimum(np.floor(ux).astype(np.intp), nx - 1)
            return grid[np.ix_(iy, ix)]
        values = grid.astype(np.result_type(grid.dtype, np.float32), copy=False)
        rows = _linear_weights(uy - 0.5, ny)
        cols = _linear_weights(ux - 0.5, nx)
        out = _interp_axis(values, rows, axis=0)
        return _interp_axis(out, cols, axis=1)

    def logits_to_image(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """Mask-decoder logits (B, C, h, w) over the square input -> (B, C, H, W) logits.

        The logits are brought to the model input size, the padding is cut off, and the rest is
        resized bilinearly to the original image size (what SAM's ``postprocess_masks`` does).
        """
        if not isinstance(low_res_logits, torch.Tensor) or low_res_logits.ndim != 4:
            shape = getattr(low_res_logits, "shape", None)
            raise StructSAMError(f"logits_to_image needs a (B, C, h, w) tensor, got {shape}")
        logits = low_res_logits
        if not logits.is_floating_point():
            logits = logits.float()
        size = self.model_size
        if self.resized_size == (size, size):
            # No padding (MedSAM's stretched input): one resize, as MedSAM itself does.
            return F.interpolate(
                logits, size=self.original_size, mode="bilinear", align_corners=False
            )
        if tuple(logits.shape[-2:]) != (size, size):
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        h, w = self.resized_size
        logits = logits[..., :h, :w]
        return F.interpolate(logits, size=self.original_size, mode="bilinear", align_corners=False)


def _linear_weights(u: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower index, upper index and upper weight for linear interpolation, clamped at the edges."""
    u = np.clip(u, 0.0, n - 1)
    lo = np.floor(u).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, (u - lo)


def _interp_axis(values: np.ndarray, weights, axis: int) -> np.ndarray:
    lo, hi, frac = weights
    a = np.take(values, lo, axis=axis)
    b = np.take(values, hi, axis=axis)
    frac = frac.astype(values.dtype)
    frac = frac[:, None] if axis == 0 else frac[None, :]
    return a + (b - a) * frac


def _as_float_array(values, what: str, last: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"{what} must be numbers, got {values!r}") from exc
    if arr.ndim == 0 or arr.shape[-1] != last:
        raise PromptError(f"{what} must have shape (..., {last}), got {arr.shape}")
    return arr


# ----------------------------------------------------------------------------- images


def _as_image_array(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    try:
        arr = np.asarray(image)
    except Exception as exc:  # ragged lists and odd objects
        raise ImageError(f"cannot read the image as an array: {exc}") from exc
    if arr.dtype == object or arr.dtype.kind in "USVMm":
        raise ImageError(f"image must hold numbers, not dtype {arr.dtype}")
    if arr.dtype.kind == "c":
        raise ImageError("image is complex-valued; pass its magnitude (np.abs) or real part")
    if arr.size == 0:
        raise ImageError(f"image is empty (shape {arr.shape})")

    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3]  # alpha carries no intensity
    elif arr.ndim != 2:
        hint = ""
        if arr.ndim == 3:
            hint = (
                "; this looks like a 3D volume: pass one slice (e.g. volume[k]), or an RGB image "
                "with channels last"
            )
        elif arr.ndim > 3:
            hint = "; pass one 2D slice"
        raise ImageError(
            f"image must be 2D (H, W) or RGB/RGBA (H, W, 3|4), got shape {arr.shape}{hint}"
        )
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ImageError(f"image must be at least 2x2 pixels, got {arr.shape[:2]}")
    return arr


def _check_window(window) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in window)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"window must be (low, high), got {window!r}") from exc
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ImageError(f"window must be two finite numbers with low < high, got {window!r}")
    return low, high


def _minmax(x: np.ndarray | torch.Tensor, scale: float = 1.0):
    low, high = x.min(), x.max()
    if high <= low:
        return x * 0  # constant image: all zeros
    return (x - low) * (scale / (high - low))


def prepare_image(
    image,
    spec: ModelSpec | str,
    window: tuple[float, float] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, Geometry]:
    """Turn a 2D image into the (1, 3, S, S) float32 encoder input of ``spec``'s model.

    ``image`` is (H, W) of any numeric or boolean dtype (uint8, uint16 MR, int16 CT in HU,
    float...) or RGB/RGBA (H, W, 3|4); alpha is dropped. Non-finite pixels are replaced by the
    smallest finite value, with a warning. ``window=(low, high)`` clips intensities before
    normalisation (e.g. (-160, 240) for a CT abdomen window).

    - ``minmax`` models (LiteMedSAM, MedSAM): resize, min-max to [0, 1], pad with zeros.
    - ``sam`` models (ViT-B/L/H): uint8 without a window passes through as 0..255, anything else
      is min-max scaled to 0..255; resize; subtract SAM's pixel mean, divide by its std; pad
      with zeros after normalising, as SAM does.

    Resizing is bilinear with antialiasing; ``keep_aspect`` models resize the longest side to S
    and pad bottom/right, the others are stretched to S x S. Grayscale goes to all 3 channels.
    """
    spec = get_spec(spec)
    arr = _as_image_array(image)
    passthrough = spec.normalization == "sam" and arr.dtype == np.uint8 and window is None

    values = arr.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        if not finite.any():
            raise ImageError("image has no finite pixels (all NaN or inf)")
        fill = values[finite].min()
        warnings.warn(
            f"image has {int((~finite).sum())} NaN/inf pixels; they were set to the smallest "
            f"finite value ({fill:g})",
            stacklevel=2,
        )
        values = np.where(finite, values, fill)
    if window is not None:
        low, high = _check_window(window)
        values = np.clip(values, low, high)

    if spec.normalization == "sam":
        values = values if passthrough else _minmax(values, 255.0)
    elif spec.normalization == "minmax":
        # Done in float64 here so large offsets survive the float32 cast; repeated after resizing.
        values = _minmax(values)
    else:
        raise StructSAMError(f"unknown normalization {spec.normalization!r} in {spec.name!r}")

    dev = resolve_device(device)
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(dev)
    tensor = tensor[None, None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)[None]

    geometry = Geometry.for_image(arr.shape[:2], spec)
    h, w = geometry.resized_size
    if (h, w) != tuple(tensor.shape[-2:]):
        tensor = F.interpolate(
            tensor, size=(h, w), mode="bilinear", align_corners=False, antialias=True
        )
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)

    if spec.normalization == "minmax":
        tensor = _minmax(tensor)
    else:
        mean = torch.tensor(SAM_PIXEL_MEAN, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(SAM_PIXEL_STD, device=dev).view(1, 3, 1, 1)
        tensor = (tensor - mean) / std

    size = spec.img_size
    tensor = F.pad(tensor, (0, size - w, 0, size - h))
    return tensor.contiguous(), geometry


# ----------------------------------------------------------------------------- prompts


def _check_size(original_size) -> tuple[int, int]:
    try:
        height, width = (int(s) for s in original_size)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"original_size must be (H, W), got {original_size!r}") from exc
    if height < 1 or width < 1:
        raise PromptError(f"original_size must be positive, got {original_size!r}")
    return height, width


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in np.asarray(values, float).ravel()) + ")"


def validate_box(box, original_size) -> np.ndarray:
    """Check a box (4,) or boxes (N, 4) as x0, y0, x1, y1 in original pixels.

    Boxes overhanging the image are clipped to [0, W] x [0, H]: silently up to 0.5 px (a drag
    that ends on the border), with a :class:`~structsam.errors.PromptWarning` beyond that. A box
    entirely outside the image, non-finite, or with x0 >= x1 or y0 >= y1 raises PromptError.
    Returns float64 in the input's shape.
    """
    height, width = _check_size(original_size)
    boxes = _as_float_array(box, "box", last=4)
    if boxes.ndim > 2:
        raise PromptError(
            f"box must have shape (4,) or (N, 4) as x0, y0, x1, y1, got {boxes.shape}"
        )
    flat = boxes.reshape(-1, 4)
    if flat.shape[0] == 0:
        raise PromptError("box: no boxes given; need shape (4,) or (N, 4) as x0, y0, x1, y1")
    if not np.isfinite(flat).all():
        raise PromptError(f"box coordinates must be finite, got {flat.tolist()}")
    x0, y0, x1, y1 = flat.T
    bad = (x0 >= x1) | (y0 >= y1)
    if bad.any():
        raise PromptError(
            f"box {_fmt(flat[bad][0])} is empty or inverted: need x0 < x1 and y0 < y1 "
            "(order is x0, y0, x1, y1)"
        )
    # nothing left after clipping: no pixel of the image is inside
    off = (x0 >= width) | (x1 <= 0) | (y0 >= height) | (y1 <= 0)
    if off.any():
        raise PromptError(
            f"box {_fmt(flat[off][0])} lies entirely outside the {width}x{height} (W x H) image; "
            f"boxes must overlap x 0..{width}, y 0..{height}"
        )
    clipped = flat.copy()
    clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0, width)
    clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0, height)
    _warn_moved(
        flat,
        clipped,
        lambda a, b: f"box {a} overhangs the {width}x{height} (W x H) image; clipped to {b}",
    )
    return clipped.reshape(boxes.shape)


def _warn_moved(before: np.ndarray, after: np.ndarray, message) -> None:
    """One PromptWarning for the prompts (rows) that clipping moved by more than the tolerance;
    ``message(before, after)`` words the first of them."""
    moved = np.abs(after - before).max(axis=1) > PROMPT_TOLERANCE
    if moved.any():
        i = int(np.flatnonzero(moved)[0])
        more = f" (and {int(moved.sum()) - 1} more)" if moved.sum() > 1 else ""
        # stacklevel 3: the caller of validate_box / validate_points
        warnings.warn(message(_fmt(before[i]), _fmt(after[i])) + more, PromptWarning, stacklevel=3)


def validate_points(coords, labels, original_size) -> tuple[np.ndarray, np.ndarray]:
    """Check points (N, 2) as x, y with labels (N,) of 1 (foreground) or 0 (background).

    A single point may be given as (2,) with a scalar or (1,) label; it is taken as (1, 2).
    Points beyond the image are moved onto its edge: silently up to 0.5 px, with a
    :class:`~structsam.errors.PromptWarning` beyond that. Returns (coords float64 (N, 2),
    labels int64 (N,)), or raises PromptError on a wrong shape, a length mismatch, missing
    labels or labels other than 0/1.
    """
    height, width = _check_size(original_size)
    pts = _as_float_array(coords, "point_coords", last=2)
    if pts.ndim == 1:
        pts = pts[None]  # one point (x, y)
    if pts.ndim != 2:
        raise PromptError(f"point_coords must have shape (N, 2) as x, y, got {pts.shape}")
    if pts.shape[0] == 0:
        raise PromptError("point_coords: no points given; need shape (N, 2) as x, y")
    if not np.isfinite(pts).all():
        raise PromptError(f"point coordinates must be finite, got {pts.tolist()}")

    if labels is None:
        raise PromptError(
            "point_labels is missing: give one label per point, 1 (foreground) or 0 (background)"
        )
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    lab = np.atleast_1d(np.asarray(labels))
    if lab.ndim != 1:
        raise PromptError(f"point_labels must have shape (N,), got {lab.shape}")
    if lab.shape[0] != pts.shape[0]:
        raise PromptError(
            f"{pts.shape[0]} points but {lab.shape[0]} labels: point_labels needs one label "
            "per point"
        )
    if lab.dtype.kind not in "biuf" or not np.isin(lab, (0, 1)).all():
        raise PromptError(
            f"point_labels must be 1 (foreground) or 0 (background), got {lab.tolist()}"
        )

    clipped = np.stack([np.clip(pts[:, 0], 0, width), np.clip(pts[:, 1], 0, height)], axis=1)
    _warn_moved(
        pts,
        clipped,
        lambda a, b: (
            f"point {a} is outside the {width}x{height} (W x H) image; moved onto its edge at {b}"
        ),
    )
    return clipped, lab.astype(np.int64)


# ----------------------------------------------------------------------------- square pixels


@dataclass(frozen=True)
class SquarePixels:
    """Resampling of a slice with pixels of ``spacing`` = (dy, dx) to square pixels.

    The finer spacing is kept and the coarser axis is upsampled (``square_shape``), so no detail
    is lost and masks map back *exactly*: ``to_original(mask_to_square(m)) == m`` for every mask
    ``m`` on the original grid. Pixel (i, j) covers [j, j+1] x [i, i+1] in both grids (the
    module's convention), so the slice keeps its physical extent.
    """

    shape: tuple[int, int]
    square_shape: tuple[int, int]

    @classmethod
    def for_slice(cls, shape, spacing=None) -> SquarePixels:
        height, width = _check_size(shape)
        if spacing is None:
            return cls((height, width), (height, width))
        dy, dx = (float(s) for s in spacing)
        if not (math.isfinite(dy) and math.isfinite(dx) and dy > 0 and dx > 0):
            raise StructSAMError(f"pixel spacing must be two positive numbers, got {spacing!r}")
        pixel = min(dy, dx)
        square = (max(1, round(height * dy / pixel)), max(1, round(width * dx / pixel)))
        return cls((height, width), square)

    @property
    def identity(self) -> bool:
        return self.shape == self.square_shape

    def _nearest(self, n_from: int, n_to: int) -> np.ndarray:
        # the source pixel holding each target pixel's centre, in integers (no rounding error)
        return ((2 * np.arange(n_to) + 1) * n_from) // (2 * n_to)

    def to_square(self, image: np.ndarray, order: int = 1) -> np.ndarray:
        """(H, W[, C]) image -> square pixels: bilinear between pixel centres (``order=1``) or
        the pixel under each new centre (``order=0``, for labels and masks)."""
        image = np.asarray(image)
        if self.identity:
            return image
        if order == 0:
            rows = self._nearest(self.shape[0], self.square_shape[0])
            cols = self._nearest(self.shape[1], self.square_shape[1])
            return image[rows][:, cols]
        values = image.astype(np.result_type(image.dtype, np.float32), copy=False)
        for axis in (0, 1):
            n, m = self.shape[axis], self.square_shape[axis]
            u = (np.arange(m) + 0.5) * (n / m) - 0.5
            lo, hi, frac = _linear_weights(u, n)
            a, b = np.take(values, lo, axis=axis), np.take(values, hi, axis=axis)
            frac = frac.astype(values.dtype).reshape((-1,) + (1,) * (values.ndim - 1 - axis))
            values = a + (b - a) * frac
        return values

    def mask_to_square(self, mask: np.ndarray) -> np.ndarray:
        return self.to_square(np.asarray(mask), order=0)

    def to_original(self, mask: np.ndarray) -> np.ndarray:
        """A (H', W') map on the square grid -> the original grid: each original pixel takes the
        square pixel under its centre (which lies inside it, since square pixels are finer)."""
        mask = np.asarray(mask)
        if mask.shape[:2] != self.square_shape:
            raise StructSAMError(f"expected a {self.square_shape} map, got {mask.shape[:2]}")
        if self.identity:
            return mask
        rows = self._nearest(self.square_shape[0], self.shape[0])
        cols = self._nearest(self.square_shape[1], self.shape[1])
        return mask[rows][:, cols]

    @property
    def scale_xy(self) -> np.ndarray:
        """Square-grid pixels per original pixel along x and y."""
        return np.array(
            [self.square_shape[1] / self.shape[1], self.square_shape[0] / self.shape[0]]
        )

    def points_to_square(self, coords_xy) -> np.ndarray:
        return _as_float_array(coords_xy, "points", last=2) * self.scale_xy

    def boxes_to_square(self, boxes) -> np.ndarray:
        return _as_float_array(boxes, "boxes", last=4) * np.tile(self.scale_xy, 2)
