#!/usr/bin/env bash
# Every GPU check and measurement the project owes, in one command for one lent-GPU session.
#
#   bash bench/gpu_session.sh [OUT_DIR]      (default OUT_DIR: bench/results)
#
# Needs a CUDA machine with torch, timm and triton (compressai/onnx only for the parts that use them:
# install the project with `pip install -e .` first where the network allows). Runs, in order of value:
#   1. tests/test_kernels_cuda.py     Triton kernels vs the references at real sizes (log: gpu-tests.log)
#   2. bench/kernels.py --device cuda merge/gather/scan timings vs torch and the bandwidth floor
#   3. bench/throughput.py            DeiT-S vs ppt/tome/topk, bf16 batch 256
#   4. bench/finetune.py              full vs adapters vs Sparse-Tuning, ViT-B/16 batch 32
# Each step's log lands in OUT_DIR; a failing step is reported and the next one still runs. Exit status:
# the number of failed steps.
set -u
out="${1:-bench/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
failed=0
step() {
    local name="$1"; shift
    echo "== $name: $*"
    if "$@" >"$out/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $out/$name.log)"; failed=$((failed + 1)); fi
    tail -n 5 "$out/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu-device.txt" 2>&1
step gpu-tests python -m pytest -q -rs tests/test_kernels_cuda.py tests/test_kernels_compile.py
step gpu-kernels python bench/kernels.py --device cuda --dtype bfloat16
step gpu-throughput python bench/throughput.py --device cuda --out "$out"
step gpu-finetune python bench/finetune.py --device cuda --model vit_base_patch16_224 --batch 32 \
    --out "$out/finetune-cuda"
exit "$failed"
