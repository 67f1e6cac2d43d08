"""Encoder settings of an interactive session and the rules that decide when to re-encode."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum

from .. import DEFAULT_RATE  # a constant: importing structsam loads no torch

__all__ = ["EncoderSettings", "Reencode", "reencode_reason"]


@dataclass(frozen=True)
class EncoderSettings:
    """Everything an embedding depends on besides the image, the window and the prompts."""

    model: str = "litemedsam"
    checkpoint: str | None = None
    device: str = "cpu"
    precision: str = "auto"
    method: str = "structsam"
    rate: float = DEFAULT_RATE
    prompt_aware: bool = False

    @property
    def merging(self) -> bool:
        return self.method not in (None, "none") and self.rate > 0

    @property
    def uses_prompts(self) -> bool:
        return self.merging and self.prompt_aware

    @property
    def model_key(self) -> tuple:
        """What the loaded weights depend on: settings with one model_key share a decoder."""
        return (self.model, self.checkpoint, self.device, self.precision)

    @property
    def patch_key(self) -> tuple:
        """What the patched model depends on: one patched model per patch_key."""
        if not self.merging:
            return (*self.model_key, None, 0.0)
        return (*self.model_key, self.method, float(self.rate))

    def unmerged(self) -> EncoderSettings:
        return replace(self, method="none", rate=0.0, prompt_aware=False)


class Reencode(str, Enum):
    """Why a slice must be encoded (again) before its prompts can be answered. A ``str``, so
    the value is also the text shown to the user."""

    NOT_ENCODED = "slice not encoded yet"
    FIRST_PROMPT = "prompt-aware: first encode with this prompt"
    OUTSIDE = "prompt-aware: the new prompt lies outside the protected region"

    @property
    def prompt_aware(self) -> bool:
        """Only because prompt-aware merging protects other tokens (a plain embedding of the
        slice exists)."""
        return self is not Reencode.NOT_ENCODED

    def __str__(self) -> str:
        return self.value


def reencode_reason(embedding, settings: EncoderSettings, prompts: Mapping | None):
    """Why ``embedding`` (None: the slice has none for ``settings``) cannot answer ``prompts``
    (image pixels), or None when it can.

    In prompt-aware mode the embedding depends on the prompts: it is reused as long as every
    token the new prompts would protect was already protected by the prompts it was made with
    (``Embedding.covers``). Without prompts to protect, any embedding of the slice serves.
    """
    if embedding is None:
        return Reencode.NOT_ENCODED
    if not settings.uses_prompts or not prompts:
        return None
    if embedding.prompts is None:
        return Reencode.FIRST_PROMPT
    if not embedding.covers(prompts):
        return Reencode.OUTSIDE
    return None
