#!/usr/bin/env bash
# One prepared run for a lent GPU machine (the `device` tool): the CUDA tests, then images/s of
# eager / AMP + channels_last / + torch.compile against SMP 0.6.0 (issue 7's GPU comparison).
#
# That machine has torch, torchvision, timm, huggingface_hub and pytest but no package index, so
# prepare here first (needs the registries):  make gpu-prep
# (wheels of efficientnet-pytorch, pretrainedmodels and munch into .whl/, SMP 0.6.0 into
# .bench/smp06-pkg), then call the device tool with
#   command: bash benchmarks/gpu_check.sh    carry: [".whl", ".bench/smp06-pkg"]    timeout_s: 590
# Results land in $OUT (env.txt, tests.log, bench.log, benchmarks_cuda*.md). At most ~9 minutes,
# each step under its own timeout: three resnet34 models in eager and amp, compile for Unet only
# (on 2 CPU cores its compilation took 121 s for ours, 79 s for SMP at 64x64), one round a side.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"; } 2>&1 | tee "$OUT/env.txt"

PYTHONPATH=$PWD:/tmp/site timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda.py \
  "tests/utils/test_export.py::test_autocast_float16_cuda" 2>&1 | tee "$OUT/tests.log"

common=(--device cuda --no-infer --no-train --throughput --encoders resnet34 --size 256 --tp-batch 16
        --tp-iters 10 --reps 3 --tp-rounds 1 --amp-dtype float16)
timeout 150 python3 benchmarks/compare_smp.py "${common[@]}" --archs Unet FPN DeepLabV3Plus \
  --tp-modes eager,amp --out "$OUT/benchmarks_cuda.md" 2>&1 | tee "$OUT/bench.log"
timeout 220 python3 benchmarks/compare_smp.py "${common[@]}" --archs Unet --tp-modes compile \
  --out "$OUT/benchmarks_cuda_compile.md" 2>&1 | tee -a "$OUT/bench.log"
