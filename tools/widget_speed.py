"""Encode times inside napari: the widget's merged encode against its unmerged one.

    python tools/widget_speed.py [--rounds 6] [--rate 0.38]

Drives the real widget on the MNI152 volume (as ``structsam annotate`` opens it), disk cache
off: each round moves to a fresh slice and encodes it unmerged (rate 0) and merged (in
alternating order), reading the encode seconds the status line shows. Prints the medians, the
ratio and the spread. Without a display it re-runs itself under ``xvfb-run``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rate", type=float, default=None, help="default: DEFAULT_RATE")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if not os.environ.get("DISPLAY") and not os.environ.get("XVFB_CHILD"):
        if shutil.which("xvfb-run") is None:
            sys.exit("no display and no xvfb-run: apt-get install xvfb")
        env = dict(os.environ, XVFB_CHILD="1")
        cmd = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", sys.executable]
        return subprocess.call([*cmd, *sys.argv], env=env)

    from qtpy.QtWidgets import QApplication

    from napari_structsam._launch import annotate
    from structsam import DEFAULT_RATE

    rate = DEFAULT_RATE if args.rate is None else args.rate
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    viewer, widget = annotate(block=False)
    app = QApplication.instance()
    widget.cache_check.setChecked(False)

    def settle(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)

    def encode(z: int, r: float) -> float:
        widget.set_rate(r)
        viewer.dims.set_current_step(0, z)
        settings = widget.settings()
        deadline = time.monotonic() + 300
        while widget.session.encoding(z, settings) is None and time.monotonic() < deadline:
            settle(0.05)
        widget.runner.wait(300)
        settle(0.3)  # let napari redraw, as an annotator would see it
        return widget.session.encoding(z, settings).seconds

    settle(1.0)
    widget.runner.wait(300)
    encode(60, rate)  # warm-up: model load, FLOPs counts, first-call allocations
    encode(61, 0.0)
    times = {"unmerged": [], "merged": []}
    for i in range(args.rounds):
        z = 64 + 2 * i
        order = [("unmerged", 0.0), ("merged", rate)]
        for name, r in order if i % 2 == 0 else order[::-1]:
            times[name].append(encode(z, r))
    med = {k: float(np.median(v)) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k}: median {med[k]:.3f} s (min {min(v):.3f}, max {max(v):.3f}) over {len(v)}")
    print(f"merged vs unmerged in napari at rate {rate}: {med['unmerged'] / med['merged']:.2f}x")
    print(f"status line: {widget.status.text()}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
