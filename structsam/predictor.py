"""``Predictor``: encode an image once, then answer box/point prompts with the mask decoder.

Coordinates are the input image's pixels, ``(x, y)``, as in ``SamPredictor``. ``encode`` returns
an :class:`~structsam.embedding.Embedding` (a value: features, geometry, what merging did) and
``predict(..., embedding=...)`` answers prompts from one, so embeddings can be kept, cached and
shared; ``set_image`` keeps one in the predictor, as ``SamPredictor`` does.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import replace

import numpy as np
import torch

from .embedding import Embedding, model_prompts
from .errors import ImageError, PromptError, StructSAMError
from .patching import merge_config, merge_state
from .patching import prompts as merge_prompts
from .transforms import prepare_image, validate_box, validate_points
from .windows import resolve_window


def model_spec(model):
    spec = getattr(model, "structsam_spec", None)
    if spec is None:
        raise StructSAMError("this model was not built by structsam.load_model (no structsam_spec)")
    return spec


__all__ = ["Embedding", "Predictor", "model_prompts", "model_spec"]

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

    ``cache``: an :class:`~structsam.cache.EmbeddingCache`; ``encode``/``set_image`` then serve
    an image already encoded with the same settings from it without running the encoder
    (``Embedding.from_cache``), and store new encodes in it.
    """

    def __init__(self, model, cache=None):
        self.model = model
        self.spec = model_spec(model)
        self.device = next(model.parameters()).device
        self.cache = cache
        self.embedding: Embedding | None = None

    @property
    def precision(self) -> str:
        """The image encoder's number format (``load_model(precision=...)``, ``auto`` resolved)."""
        return getattr(self.model, "precision", "fp32")

    # the kept embedding's parts, as SamPredictor names them
    @property
    def is_image_set(self) -> bool:
        return self.embedding is not None

    @property
    def features(self):
        return None if self.embedding is None else self.embedding.features

    @property
    def geometry(self):
        return None if self.embedding is None else self.embedding.geometry

    @property
    def merge_info(self) -> list:
        return [] if self.embedding is None else list(self.embedding.merge_info)

    @property
    def encode_seconds(self) -> float | None:
        return None if self.embedding is None else self.embedding.seconds

    @property
    def from_cache(self) -> bool:
        return self.embedding is not None and self.embedding.from_cache

    @property
    def cache_key(self) -> str | None:
        return None if self.embedding is None else self.embedding.key

    def set_image(self, image, window=None, prompts: dict | None = None) -> None:
        """``encode`` and keep the result for ``predict``."""
        self.embedding = self.encode(image, window, prompts)

    def set_embedding(self, embedding: Embedding) -> None:
        """Keep an embedding made before (by ``encode``, the cache, another predictor)."""
        self.embedding = self._check_embedding(embedding)

    def reset_image(self) -> None:
        self.embedding = None

    def encode(self, image, window=None, prompts: dict | None = None) -> Embedding:
        """Encode ``image`` (2D, any numeric dtype, or RGB). ``prompts`` (image pixels) switch
        on prompt-aware merging for this encode: tokens around them are protected.

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
                stacklevel=3,
            )
        config = merge_config(self.model)
        # per-call prompts replace the patch's own for this encode (even when they are empty)
        override = config is not None and bool(prompts)
        used = model_prompts(prompts, geometry) if override else None
        from .cache import identities, settings_identity

        key_prompts = (used or {}) if override else None
        key = None
        if self.cache is None:
            settings = settings_identity(self.model, window, key_prompts)
        else:
            settings, key = identities(self.model, image, window, key_prompts)
            hit = self.cache.get(key, device=self.device)
            if hit is not None and hit.geometry == geometry and hit.settings == settings:
                return replace(hit, prompts=dict(prompts) if override else None)
        protect = merge_prompts(self.model, used) if override else contextlib.nullcontext()
        with protect, torch.inference_mode():
            start = time.perf_counter()
            features = self.model.image_encoder(tensor)
            seconds = time.perf_counter() - start
            state = merge_state(self.model)
            info = list(state.info) if state is not None else []
        protection = (2.0, 3.0) if config is None else (config.prompt_margin, config.point_radius)
        embedding = Embedding(
            features, geometry, self.spec.name, settings, info, seconds,
            dict(prompts) if override else None, protection, False, key, self.precision,
        )  # fmt: skip
        if key is not None:
            self._store(key, embedding)
        return embedding

    def _store(self, key: str, embedding: Embedding) -> None:
        try:
            self.cache.put(key, embedding)
        except OSError as exc:
            # the embedding is in memory and usable; only the cache copy is missing
            warnings.warn(
                f"could not store the embedding in {self.cache.folder}: {exc}", stacklevel=4
            )

    def _check_embedding(self, embedding) -> Embedding:
        if not isinstance(embedding, Embedding):
            raise StructSAMError(
                f"embedding must be a structsam Embedding, not {type(embedding).__name__}"
            )
        if embedding.model != self.spec.name:
            raise StructSAMError(
                f"this embedding was made by {embedding.model!r}; the {self.spec.name!r} "
                "decoder cannot read it"
            )
        return embedding

    def map_to_image(self, grid_map: np.ndarray, order: int = 0) -> np.ndarray:
        """A token-grid map (e.g. ``merge_info[i].merge_map``) -> input-image pixels."""
        if self.embedding is None:
            raise StructSAMError("call set_image first")
        return self.embedding.map_to_image(grid_map, order)

    def predict(
        self, point_coords=None, point_labels=None, box=None, multimask_output=False,
        embedding: Embedding | None = None,
    ):  # fmt: skip
        """-> (masks (C, H, W) bool, scores (C,), low_res_logits (C, 256, 256)).

        ``box`` (4,) is one box; ``box`` (K, 4) gives K masks, batched: (K, C, H, W), (K, C)
        and (K, C, 256, 256). Points go with at most one box. Prompts beyond the image are
        clipped to it with a :class:`~structsam.errors.PromptWarning`; an empty mask warns.
        ``embedding``: answer from this one (``encode``) instead of the ``set_image`` one.
        """
        if embedding is None:
            embedding = self.embedding
            if embedding is None:
                raise StructSAMError("call set_image before predict (or pass an embedding)")
        else:
            embedding = self._check_embedding(embedding)
        g = embedding.geometry
        points, boxes, batched = self._prompt_tensors(point_coords, point_labels, box, g)
        with torch.inference_mode():
            # the decoder repeats the embedding once per box
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=None)
            low_res, scores = self.model.mask_decoder(
                image_embeddings=embedding.features,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            logits = g.logits_to_image(low_res)
        masks = (logits > 0.0).cpu().numpy()
        scores, low_res = scores.cpu().numpy(), low_res.cpu().numpy()
        self._warn_empty(masks, box is None)
        if batched:
            return masks, scores, low_res
        return masks[0], scores[0], low_res[0]

    def _prompt_tensors(self, point_coords, point_labels, box, g):
        """Validated prompts as the prompt encoder's (points, boxes), and whether boxes were
        batched."""
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
        return points, boxes, batched

    def _warn_empty(self, masks, no_box: bool) -> None:
        empty = ~masks.any(axis=(1, 2, 3))
        if empty.any():
            n = len(masks)
            which = "the mask is" if n == 1 else f"{int(empty.sum())} of {n} masks are"
            hint = ""
            if no_box and self.spec.name in BOX_TRAINED:
                hint = (
                    f"; {self.spec.name} was trained on boxes, points alone often fail: add a box"
                )
            warnings.warn(f"{which} empty{hint}", stacklevel=3)
