"""``Predictor``: encode an image once, then answer box/point prompts with the mask decoder.

Coordinates are the input image's pixels, ``(x, y)``, as in ``SamPredictor``. When the encoder is
patched, ``merge_info`` tells per merged block what merging did, and ``map_to_image`` turns a
token-grid map into image pixels for overlays.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from .errors import ImageError, PromptError, StructSAMError
from .patching import merge_state
from .transforms import Geometry, prepare_image, validate_box, validate_points
from .windows import resolve_window


def model_spec(model):
    spec = getattr(model, "structsam_spec", None)
    if spec is None:
        raise StructSAMError("this model was not built by structsam.load_model (no structsam_spec)")
    return spec


def model_prompts(prompts: dict | None, geometry: Geometry) -> dict | None:
    """Image-pixel prompts -> encoder-input pixels, validated."""
    if not prompts:
        return None
    unknown = set(prompts) - {"box", "point_coords", "point_labels"}
    if unknown:
        raise PromptError(f"unknown prompt keys {sorted(unknown)}; use box, point_coords")
    out = {}
    if prompts.get("box") is not None:
        out["box"] = geometry.boxes_to_model(validate_box(prompts["box"], geometry.original_size))
    if prompts.get("point_coords") is not None:
        labels = prompts.get("point_labels")
        if labels is None:  # protection ignores the labels: any placeholder will do
            labels = np.ones(len(np.atleast_2d(np.asarray(prompts["point_coords"], object))))
        coords, _ = validate_points(prompts["point_coords"], labels, geometry.original_size)
        out["point_coords"] = geometry.points_to_model(coords)
    return out or None


# Models fine-tuned on box prompts only: points alone often give nothing.
BOX_TRAINED = ("litemedsam", "medsam")
# Beyond this many times the encoder's input side, downsampling loses most of the detail.
LARGE_IMAGE_FACTOR = 4
# Above this many pixels the float64 working copy in prepare_image would take gigabytes.
MAX_PIXELS = 2**28


def _check_size(image, spec) -> None:
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) < 2:
        return  # prepare_image reports malformed input
    height, width = int(shape[0]), int(shape[1])
    if height * width > MAX_PIXELS:
        raise ImageError(
            f"image of {height}x{width} pixels is too large to encode (the encoder sees "
            f"{spec.img_size} px); crop the region of interest or downsample it first"
        )
    factor = max(height, width) / spec.img_size
    if factor > LARGE_IMAGE_FACTOR:
        warnings.warn(
            f"the {height}x{width} image is shrunk {factor:.0f}x to the encoder's "
            f"{spec.img_size} px input; structures smaller than about {factor:.0f} pixels are "
            "lost: crop the region of interest for finer masks",
            stacklevel=3,
        )


# A value range below this fraction of the values' magnitude is flat up to noise (min-max
# scaling would stretch that noise to full contrast).
CONSTANT_RELATIVE_RANGE = 1e-4


def _flatness(image, window) -> str | None:
    """Why the mask of ``image`` (after ``window``) would be meaningless, or None."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype.kind not in "biuf" or arr.size == 0:
        return None  # prepare_image names the problem
    if arr.dtype.kind == "b":
        arr = arr.view(np.uint8)
    rgb = arr.ndim == 3 and arr.shape[-1] in (3, 4)
    channels = [arr[..., c] for c in range(3)] if rgb else [arr]
    where = ""
    if window is not None:
        w_low, w_high = (float(v) for v in window)
        where = f" inside the window ({w_low:g}, {w_high:g})"
    reasons = []
    for ch in channels:
        values = ch[np.isfinite(ch)] if ch.dtype.kind == "f" else ch
        if values.size == 0:
            return None
        low, high = float(values.min()), float(values.max())
        value = low
        if window is not None:
            value = min(max(low, w_low), w_high)  # what a constant channel is clipped to
            low, high = max(low, w_low), min(high, w_high)
        if high <= low:
            reasons.append(f"the image is constant{where} (all values {value:g})")
            continue
        if high - low <= CONSTANT_RELATIVE_RANGE * max(abs(low), abs(high)):
            reasons.append(f"the image is nearly constant{where} (values {low:g} to {high:g})")
            continue
        return None  # one channel with content is enough
    return reasons[0]


class Predictor:
    """Encode an image once, then answer prompts.

    ``cache``: an :class:`~structsam.cache.EmbeddingCache`; ``set_image`` then serves an image
    already encoded with the same settings from it without running the encoder
    (``from_cache`` says whether the last ``set_image`` did), and stores new encodes in it.
    """

    def __init__(self, model, cache=None):
        self.model = model
        self.spec = model_spec(model)
        self.device = next(model.parameters()).device
        self.cache = cache
        self.features: torch.Tensor | None = None
        self.geometry: Geometry | None = None
        self.merge_info: list = []
        self.encode_seconds: float | None = None
        self.from_cache = False
        self.cache_key: str | None = None
        self.load_seconds: float | None = None  # time to load the last cache hit

    @property
    def precision(self) -> str:
        """The image encoder's number format (``load_model(precision=...)``, ``auto`` resolved)."""
        return getattr(self.model, "precision", "fp32")

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    def set_image(self, image, window=None, prompts: dict | None = None) -> None:
        """Encode ``image`` (2D, any numeric dtype, or RGB). ``prompts`` switch on prompt-aware
        merging for this encode: tokens around them are protected.

        ``window``: ``(low, high)``, or a name that :func:`structsam.windows.resolve_window`
        knows (``"ct-lung"``...; ``"mr-percentiles"`` is then taken over this image only:
        resolve it on the whole volume for consistent slices).  With a cache, an image encoded
        before with the same settings is loaded instead of encoded."""
        if isinstance(window, str):
            window = resolve_window(window, image)
        _check_size(image, self.spec)
        tensor, geometry = prepare_image(image, self.spec, window=window, device=self.device)
        flat = _flatness(image, window)
        if flat:
            warnings.warn(
                f"{flat}: the encoder sees no structure, so any mask is meaningless; check the "
                "slice and the window",
                stacklevel=2,
            )
        state = merge_state(self.model)
        # per-call prompts replace the patch's own for this encode (even when they are empty)
        override = state is not None and bool(prompts)
        used_prompts = None
        if override:
            used_prompts = model_prompts(prompts, geometry)
        key = None
        if self.cache is not None:
            key_prompts = (used_prompts or {}) if override else None
            key = self.cache.key(self.model, image, window, key_prompts)
            start = time.perf_counter()
            entry = self.cache.get(key, device=self.device)
            if entry is not None and entry.geometry == geometry:
                self.features = entry.features
                self.geometry = geometry
                self.merge_info = entry.merge_info
                self.encode_seconds = entry.encode_seconds
                self.from_cache, self.cache_key = True, key
                self.load_seconds = time.perf_counter() - start
                return
        saved = state.prompts if state is not None else None
        if override:
            state.prompts = used_prompts
        try:
            with torch.inference_mode():
                start = time.perf_counter()
                features = self.model.image_encoder(tensor)
                self.encode_seconds = time.perf_counter() - start
        finally:
            if state is not None:
                state.prompts = saved
        self.features = features
        self.geometry = geometry
        self.merge_info = list(state.info) if state is not None else []
        self.from_cache, self.cache_key, self.load_seconds = False, key, None
        if key is not None:
            self._store(key)

    def _store(self, key: str) -> None:
        from .cache import CacheEntry

        entry = CacheEntry(self.features, self.geometry, self.merge_info, self.encode_seconds)
        try:
            self.cache.put(key, entry)
        except OSError as exc:
            # the embedding is in memory and usable; only the cache copy is missing
            warnings.warn(
                f"could not store the embedding in {self.cache.folder}: {exc}", stacklevel=3
            )

    def reset_image(self) -> None:
        self.features = None
        self.geometry = None
        self.merge_info = []
        self.from_cache = False
        self.cache_key = None

    def map_to_image(self, grid_map: np.ndarray, order: int = 0) -> np.ndarray:
        """A token-grid map (e.g. ``merge_info[i].merge_map``) -> input-image pixels."""
        if self.geometry is None:
            raise StructSAMError("call set_image first")
        return self.geometry.grid_to_image(np.asarray(grid_map), order=order)

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=False):
        """-> (masks (C, H, W) bool, scores (C,), low_res_logits (C, 256, 256)).

        ``box`` (4,) is one box; ``box`` (K, 4) gives K masks, batched: (K, C, H, W), (K, C)
        and (K, C, 256, 256). Points go with at most one box. Prompts beyond the image are
        clipped to it with a :class:`~structsam.errors.PromptWarning`; an empty mask warns.
        """
        if self.features is None:
            raise StructSAMError("call set_image before predict")
        g = self.geometry
        points = boxes = None
        batched = False
        if point_coords is not None:
            coords, labels = validate_points(point_coords, point_labels, g.original_size)
            coords = torch.as_tensor(g.points_to_model(coords), dtype=torch.float32)
            labels = torch.as_tensor(labels, dtype=torch.int64)
            points = (coords[None].to(self.device), labels[None].to(self.device))
        elif point_labels is not None:
            raise PromptError("point_labels given without point_coords")
        if box is not None:
            checked = validate_box(box, g.original_size)
            batched = checked.ndim == 2
            b = g.boxes_to_model(checked).reshape(-1, 4)
            if points is not None and len(b) > 1:
                raise PromptError(
                    f"points go with one box, got {len(b)} boxes: call predict once per box"
                )
            boxes = torch.as_tensor(b, dtype=torch.float32, device=self.device)
        if points is None and boxes is None:
            raise PromptError("give a prompt: box=(x0, y0, x1, y1) or point_coords with labels")
        with torch.inference_mode():
            # the decoder repeats the embedding once per box
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=None)
            low_res, scores = self.model.mask_decoder(
                image_embeddings=self.features,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            logits = g.logits_to_image(low_res)
        masks = (logits > 0.0).cpu().numpy()
        scores, low_res = scores.cpu().numpy(), low_res.cpu().numpy()
        empty = ~masks.any(axis=(1, 2, 3))
        if empty.any():
            n = len(masks)
            which = "the mask is" if n == 1 else f"{int(empty.sum())} of {n} masks are"
            hint = ""
            if box is None and self.spec.name in BOX_TRAINED:
                hint = (
                    f"; {self.spec.name} was trained on boxes, points alone often fail: add a box"
                )
            warnings.warn(f"{which} empty{hint}", stacklevel=2)
        if batched:
            return masks, scores, low_res
        return masks[0], scores[0], low_res[0]
