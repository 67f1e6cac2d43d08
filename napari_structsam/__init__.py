"""napari plugin for StructSAM: click-to-segment on 2D and 3D images with a token-merging SAM
encoder running in a background worker, and live overlays of what merging did.

Importing this package is light (no torch, no Qt): the widget, the session and the sample data
import their dependencies when napari asks for them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
