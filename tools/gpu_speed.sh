#!/usr/bin/env bash
# Merged against the fastest dense encoder on one GPU: SAM ViT-B (random weights) and LiteMedSAM
# at -30 % and -40 % encoder FLOPs, fp32 / bf16 / fp16, eager and with the parts that never merge
# torch.compile'd (load_model(compile=True)), interleaved
# and synchronised (structsam speed). Writes gpu_speed/speed.{md,json} (or $OUT) and prints the
# tables. Budget: about 5 minutes on an H100/H200 class GPU, most of it compilation.
#
#   tools/gpu_speed.sh                     # the GPU run (after tools/gpu_wheels.sh, carry .whl)
#   tools/gpu_speed.sh --device cpu        # smoke test on a CPU: litemedsam, one round, eager
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
[ "${1:-}" = "--device" ] && device=${2:?--device needs a value}
out=${OUT:-gpu_speed}

# On the lent GPU machine (no package index) the missing packages come as wheels fetched here
# by tools/gpu_wheels.sh; elsewhere an editable install does it.
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
elif ! python3 -c "import structsam" 2>/dev/null; then
    python3 -m pip install -q -e .
fi
speed() { python3 -m structsam.cli speed "$@"; }
python3 - <<EOF
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF

if [ "$device" = cpu ]; then
    speed --device cpu --models litemedsam --cuts 0.30 --precisions fp32 --rounds 1 --out "$out"
    exit
fi
speed --device "$device" --models vit_b,litemedsam --cuts 0.30,0.40 \
    --precisions fp32,bf16,fp16 --compile --rounds 10 --threads 8 --out "$out"
