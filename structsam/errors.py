"""Errors that name the problem for the user, instead of a traceback from deep inside torch."""


class StructSAMError(Exception):
    """Base class of every error structsam raises on purpose."""


class CheckpointError(StructSAMError):
    """A checkpoint file is missing, truncated, of the wrong model, or fails its hash."""


class ImageError(StructSAMError):
    """An input image has a shape, dtype or content the models cannot take."""


class PromptError(StructSAMError):
    """A box or point prompt is malformed or lies outside the image."""


class MergeError(StructSAMError):
    """A merge method, rate or option is not valid for this model."""


class PromptWarning(UserWarning):
    """A prompt was changed to fit the image (clipped to its edges); the message says how."""
