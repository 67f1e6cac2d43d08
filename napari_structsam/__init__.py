"""napari plugin for StructSAM: click-to-segment on 2D and 3D images with a token-merging SAM
encoder running in a background worker, and live overlays of what merging did.

Importing this package is light (no torch, no Qt): the widget, the session and the sample data
import their dependencies when napari asks for them.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting for work steal the CPU from napari's render threads
# (and the other way round): with the canvas drawing, a merged LiteMedSAM encode took 6.7 s
# instead of 1.1 s on 2 cores. Passive waiting removes that; it must be set before torch loads
# its OpenMP runtime, and a user's own setting wins.
# The console script's other commands take it back (``_cli``): ``structsam speed`` measured every
# variant slower under it (LiteMedSAM fp32 dense 392 vs 364 ms, merged -30 % 357 vs 314 ms).
# Fully passive threads wake late for each of the merged encoder's many small parallel regions
# (LiteMedSAM bf16 at 0.38 on 2 cores: 277 ms against 249 ms spinning, dense 314 vs 302), so
# libgomp (torch's OpenMP on Linux) still spins 1000 rounds before it sleeps: idle 249-261 ms,
# and with a busy process beside it 496-515 ms against 440-468 passive and 812-872 spinning
# torch's default (20 and 4 MNI152 slices, 2026-12-07, AMD EPYC).
OMP_PASSIVE_SET_HERE = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
SPIN_SET_HERE = OMP_PASSIVE_SET_HERE and "GOMP_SPINCOUNT" not in os.environ
if SPIN_SET_HERE:
    os.environ["GOMP_SPINCOUNT"] = "1000"

__version__ = "0.1.0"

__all__ = ["__version__"]
