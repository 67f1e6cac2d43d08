"""Take the README's screenshot: napari with the StructSAM widget on the MRI in the sagittal
plane, two committed objects, a third being segmented and the compression map with its legend.

    python tools/screenshot.py [--out docs/napari_widget.png]

Without a display it re-runs itself under ``xvfb-run`` (Debian package ``xvfb``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
X = 88  # the sagittal slice through the left lateral ventricle
# boxes in the sagittal plane's pixels (x along y, y along z): the lateral ventricle and the
# cerebellum (committed, one batched decode), then the brainstem (segmented, not committed)
COMMITTED = ((70, 72, 135, 100), (145, 20, 198, 72))
CURRENT = (122, 5, 150, 62)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "docs" / "napari_widget.png"))
    parser.add_argument("--size", nargs=2, type=int, default=(1500, 900))
    args = parser.parse_args()
    if not os.environ.get("DISPLAY") and not os.environ.get("XVFB_CHILD"):
        if shutil.which("xvfb-run") is None:
            sys.exit("no display and no xvfb-run: apt-get install xvfb")
        env = dict(os.environ, XVFB_CHILD="1")
        w, h = args.size
        cmd = ["xvfb-run", "-a", "-s", f"-screen 0 {w + 100}x{h + 100}x24", sys.executable]
        return subprocess.call([*cmd, *sys.argv], env=env)

    import tempfile

    import napari._qt.qt_main_window as qt_main_window

    # a fresh cache and autosave folder: no objects of an earlier run come back into the picture
    os.environ["STRUCTSAM_CACHE_DIR"] = tempfile.mkdtemp(prefix="structsam-screenshot-")

    from napari_structsam import _layers as L
    from napari_structsam._launch import annotate

    # napari 0.9 toasts a PyQt5 deprecation notice over the canvas; keep it out of the picture
    qt_main_window.SHOW_QT_WARNING = False
    viewer, widget = annotate(block=False)
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    viewer.window._qt_window.resize(*args.size)  # no public API for the window size
    viewer.dims.order = (2, 0, 1)  # sagittal: rows z, columns y
    viewer.dims.set_current_step(2, X)

    def settle(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)

    def box(x0, y0, x1, y1) -> None:
        rect = np.array([[y, x, X] for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))], float)
        viewer.layers[L.BOXES].add_rectangles(rect)

    def segmented() -> None:
        deadline = time.monotonic() + 300
        while not viewer.layers[L.MASK].data[:, :, X].any() and time.monotonic() < deadline:
            settle(0.1)
        widget.runner.wait(300)
        settle(0.5)

    settle(0.5)
    widget.runner.wait(300)
    for rect in COMMITTED:
        box(*rect)
    segmented()
    widget.commit()
    box(*CURRENT)
    segmented()
    for check in (widget.show_mask, widget.show_merge, widget.show_protected):
        check.setChecked(True)
    viewer.layers.selection.active = viewer.layers[L.BOXES]
    settle(0.5)
    viewer.camera.center = (0, 85, 110)
    viewer.camera.zoom = 2.6
    settle(1.0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False)
    print(f"wrote {out}: {widget.status.text()}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
