#!/usr/bin/env bash
# One device-tool run of benchmarks/gpu.py on a lent GPU machine: install the carried wheels
# (benchmarks/gpu_wheels.sh made them), then check, gemm and step, output to $OUT/gpu.txt.
#   run(command="bash benchmarks/gpu_device.sh", carry=[".whl"], timeout_s=540)
set -o pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1
out="${OUT:-.}/gpu.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out"
timeout 480 python3 benchmarks/gpu.py all "$@" 2>&1 | tee -a "$out"
