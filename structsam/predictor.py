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
        coords, _ = validate_points(
            prompts["point_coords"], prompts.get("point_labels"), geometry.original_size
        )
        out["point_coords"] = geometry.points_to_model(coords)
    return out or None


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
        state = merge_state(self.model)
        # per-call prompts replace the patch's own for this encode (even when they are empty)
        override = state is not None and bool(prompts)
        used_prompts = None
        if override:
            if not state.method.prompt_aware:
                raise PromptError(f"method {state.method.name!r} is not prompt-aware")
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
        """-> (masks (C, H, W) bool, scores (C,), low_res_logits (C, 256, 256))."""
        if self.features is None:
            raise StructSAMError("call set_image before predict")
        g = self.geometry
        points = boxes = None
        if point_coords is not None:
            coords, labels = validate_points(point_coords, point_labels, g.original_size)
            coords = torch.as_tensor(g.points_to_model(coords), dtype=torch.float32)
            labels = torch.as_tensor(labels, dtype=torch.int64)
            points = (coords[None].to(self.device), labels[None].to(self.device))
        if box is not None:
            b = g.boxes_to_model(validate_box(box, g.original_size)).reshape(1, 4)
            boxes = torch.as_tensor(b, dtype=torch.float32, device=self.device)
        if points is None and boxes is None:
            raise PromptError("give a box or at least one point")
        with torch.inference_mode():
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=None)
            low_res, scores = self.model.mask_decoder(
                image_embeddings=self.features,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            logits = g.logits_to_image(low_res)
        masks = (logits > 0.0)[0].cpu().numpy()
        return masks, scores[0].cpu().numpy(), low_res[0].cpu().numpy()
