"""The orthogonal vote's box margin, chosen on the tuning lesions (docs/propagation/README.md).

    python tools/vote_margins.py tuning unmerged    # 24 tuning lesions, ~17 min on 2 cores
    python tools/vote_margins.py tuning merged

Each lesion is walked once (no vote); every slice along the two other axes that the walk's mask
crosses is encoded once and decoded from its cross-section's box widened by each margin of
MARGINS (pixels of the model's input), so that all margins share the encodes. Prints the 3D Dice
of the walk and of the vote at each margin, per lesion and the mean and median.
"""

import json
import sys

import numpy as np
import torch

from structsam.eval import propagation as p3d
from structsam.interactive.propagate import _box_of, _check_spacing, _put, _Slices, _take
from structsam.transforms import Geometry

MARGINS = (2.0, 3.0, 4.0, 6.0, 8.0)


def views(predictor, case, walk):
    """{(axis, margin): bool volume} of the two orthogonal planes, prompted from ``walk``."""
    out = {}
    for b in (a for a in range(3) if a != case.axis):
        sl = _Slices(predictor, case.volume, b, _check_spacing(case.spacing, b), case.window, False)
        sx, sy = Geometry.for_image(sl.square.square_shape, predictor.spec).scale_xy
        for m in MARGINS:
            out[(b, m)] = np.zeros_like(walk)
        for j in np.flatnonzero(walk.any(axis=tuple(a for a in range(3) if a != b))):
            cross = sl.square.mask_to_square(_take(walk, b, j))
            embedding = sl.embed(sl.image(j))
            boxes = np.stack([_box_of(cross, 0.0, np.array([m / sx, m / sy])) for m in MARGINS])
            for (mask, _, _), m in zip(sl.decode(embedding, boxes), MARGINS, strict=True):
                _put(out[(b, m)], b, j, sl.square.to_original(mask))
    return out


def main(split: str, setting: str) -> None:
    torch.set_num_threads(2)
    cases = p3d.lesion_cases(split)
    if split == "tuning":  # the 6 tuning lesions and 18 more in the same hosts (seed 1)
        cases += p3d.lesion_cases("all", seed=1)
    predictor = p3d.make_predictor(setting)
    rows = []
    for case in cases:
        walk = p3d.run_case(predictor, case, orthogonal=False).mask
        v = views(predictor, case, walk)
        a, b = (x for x in range(3) if x != case.axis)
        row = {"case": case.name, "walk": p3d.dice(walk, case.truth)}
        for m in MARGINS:
            vote = (walk.astype(int) + v[(a, m)] + v[(b, m)]) >= 2
            _put(vote, case.axis, case.z, _take(walk, case.axis, case.z))  # the prompted slice
            row[f"vote{m:g}"] = p3d.dice(vote, case.truth)
        rows.append(row)
        print(json.dumps({k: round(x, 3) if isinstance(x, float) else x for k, x in row.items()}))
    keys = [k for k in rows[0] if k != "case"]
    print("mean", {k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys})
    print("median", {k: round(float(np.median([r[k] for r in rows])), 4) for k in keys})


if __name__ == "__main__":
    main(*sys.argv[1:3])
