"""Model registry and loading: LiteMedSAM, SAM ViT-B/L/H and MedSAM as ``segment_anything`` Sam."""

from .checkpoints import (
    check_state_dict,
    download_checkpoint,
    guess_model,
    load_state_dict,
    sha256_of,
    verify_sha256,
)
from .litemedsam import fold_conv_bn
from .registry import (
    MODELS,
    RANDOM_INIT_SEED,
    ModelSpec,
    default_cache_dir,
    get_spec,
    load_model,
    resolve_device,
)

__all__ = [
    "MODELS",
    "RANDOM_INIT_SEED",
    "ModelSpec",
    "check_state_dict",
    "default_cache_dir",
    "download_checkpoint",
    "fold_conv_bn",
    "get_spec",
    "guess_model",
    "load_model",
    "load_state_dict",
    "resolve_device",
    "sha256_of",
    "verify_sha256",
]
