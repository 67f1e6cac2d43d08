"""``Predictor``: encode an image once, then answer box/point prompts with the mask decoder.

Coordinates are the input image's pixels, ``(x, y)``, as in ``SamPredictor``. When the encoder is
patched, ``merge_info`` tells per merged block what merging did, and ``map_to_image`` turns a
token-grid map into image pixels for overlays.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .errors import PromptError, StructSAMError
from .patching import merge_state
from .transforms import Geometry, prepare_image, validate_box, validate_points


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


class Predictor:
    def __init__(self, model):
        self.model = model
        self.spec = model_spec(model)
        self.device = next(model.parameters()).device
        self.features: torch.Tensor | None = None
        self.geometry: Geometry | None = None
        self.merge_info: list = []
        self.encode_seconds: float | None = None

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    def set_image(self, image, window=None, prompts: dict | None = None) -> None:
        """Encode ``image`` (2D, any numeric dtype, or RGB). ``prompts`` switch on prompt-aware
        merging for this encode: tokens around them are protected."""
        tensor, geometry = prepare_image(image, self.spec, window=window, device=self.device)
        state = merge_state(self.model)
        saved = state.prompts if state is not None else None
        if state is not None and prompts:
            if not state.method.prompt_aware:
                raise PromptError(f"method {state.method.name!r} is not prompt-aware")
            state.prompts = model_prompts(prompts, geometry)
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

    def reset_image(self) -> None:
        self.features = None
        self.geometry = None
        self.merge_info = []

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
