"""Swapping a module's class for a subclass with another ``forward``: structsam's one way to
change how an encoder part computes without touching its weights or submodules.

Used by the channels-last conv stage (``litemedsam``) and by token merging
(``structsam.patching``); each swap carries a tag, so taking one kind back leaves the others.
"""

from __future__ import annotations

_SUBCLASSES: dict[tuple, type] = {}


def swap_class(module, forward, tag: str, keep_forward_as: str | None = None) -> None:
    """Give ``module`` a cached subclass of its class named ``<tag><class>`` whose ``forward``
    is ``forward``; ``keep_forward_as`` names an attribute that keeps the original forward."""
    cls = type(module)
    key = (cls, tag, forward, keep_forward_as)
    if key not in _SUBCLASSES:
        attrs = {"forward": forward, "_structsam_orig_class": cls, "_structsam_swap": tag}
        if keep_forward_as:
            attrs[keep_forward_as] = cls.forward
        _SUBCLASSES[key] = type(f"{tag}{cls.__name__}", (cls,), attrs)
    module.__class__ = _SUBCLASSES[key]


def restore_class(module, tag: str) -> bool:
    """Undo a ``swap_class`` with ``tag`` on ``module``; False when it has none."""
    cls = type(module)
    if cls.__dict__.get("_structsam_swap") != tag:
        return False
    module.__class__ = cls._structsam_orig_class
    return True
