"""``Embedding``: one encoded image as a value, the one container of an encoder's output.

``Predictor.encode`` returns it, ``Predictor.predict(..., embedding=...)`` answers prompts from
it, the disk cache (:mod:`structsam.cache`) stores and returns it and the napari plugin keeps it
per slice. It is frozen: a new encode makes a new value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import PromptError
from .transforms import Geometry, validate_box, validate_points

__all__ = ["Embedding", "model_prompts"]


def model_prompts(prompts: Mapping | None, geometry: Geometry) -> dict | None:
    """Image-pixel prompts -> encoder-input pixels, validated (None when there are none)."""
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


@dataclass(frozen=True, eq=False)
class Embedding:
    """An image's embedding and how it was made.

    ``features``: the (1, C, 64, 64) encoder output the mask decoder reads. ``geometry``: how
    image pixels map to the encoder input. ``model``: the model name (a decoder of another
    model cannot read it). ``settings``: identity (SHA-256) of everything the embedding depends
    on besides the image (weights, precision, merge configuration, window, prompts).
    ``merge_info``: per merged block, what merging did (``tokens_before/after``,
    ``merge_map``, ``protected``). ``seconds``: the encoder's wall-clock time (of the original
    encode, for a cache hit). ``prompts``: the image-pixel prompts that prompt-aware merging
    protected, None for a plain encode; ``protection``: the patch's (margin, point radius) in
    tokens. ``from_cache``/``key``: served by the disk cache / its key there. ``precision``:
    the encoder's number format.
    """

    features: Any
    geometry: Geometry
    model: str
    settings: str
    merge_info: list = field(default_factory=list)  # read-only by convention
    seconds: float = 0.0
    prompts: Mapping | None = None
    protection: tuple[float, float] = (2.0, 3.0)
    from_cache: bool = False
    key: str | None = None
    precision: str = "fp32"  # the image encoder's number format

    def map_to_image(self, grid_map: np.ndarray, order: int = 0) -> np.ndarray:
        """A token-grid map (e.g. ``merge_info[i].merge_map``) -> input-image pixels."""
        return self.geometry.grid_to_image(np.asarray(grid_map), order=order)

    def tokens(self) -> tuple[int, int]:
        """(kept, total) tokens summed over the merged blocks; (0, 0) when nothing merged."""
        kept = sum(i.tokens_after for i in self.merge_info)
        total = sum(i.tokens_before for i in self.merge_info)
        return kept, total

    def covers(self, prompts: Mapping | None) -> bool:
        """True when every token that ``prompts`` (image pixels) would protect was protected
        when this embedding was made, on the token grid of every merged block: then it answers
        them as a prompt-aware encode with them would. Prompts past the image are clipped
        (``PromptWarning``) as ``encode`` clips them."""
        import torch

        from .merge import Grid, prompt_mask

        if not prompts:
            return True
        margin, radius = self.protection
        size = self.geometry.model_size
        have_prompts = model_prompts(self.prompts, self.geometry)
        want_prompts = model_prompts(prompts, self.geometry)
        for shape in {tuple(i.grid_shape) for i in self.merge_info}:
            grid = Grid(shape[0], shape[1], None, device=torch.device("cpu"))
            have = prompt_mask(grid, size, have_prompts, margin, radius)
            want = prompt_mask(grid, size, want_prompts, margin, radius)
            if want is not None and (have is None or bool((want & ~have).any())):
                return False
        return True
