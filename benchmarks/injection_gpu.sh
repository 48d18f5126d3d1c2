#!/usr/bin/env bash
# The injection benchmark on one CUDA GPU, bf16; records go to bench-results/ named after the GPU.
#
#   PYTHON=python bash benchmarks/injection_gpu.sh      # a Python with CUDA torch and vif installed
#
# 1. one attention layer at 7B shapes, S in {2048, 4096}, B in {1, 8}: throughput of
#    --inner back-to-back calls between CUDA events, interleaved rounds; then the same
#    replayed from CUDA graphs (what removes launch latency at small shapes);
# 2. peak memory of one injected prefill call vs base (B = 8, S = 2048), own processes;
# 3. the whole model at 7B proportions (hidden 4096, 32 layers; fits in bf16 on one GPU),
#    compact and paper presets, prefill and per-token decode.
# Each step prints its table and appends its records to the same JSON file.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python}
name=$($python -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '_', torch.cuda.get_device_name().lower()).strip('_'))")
out=../bench-results/injection_cuda_bf16_${name}.json
rm -f "$out"
common=(--device cuda --dtype bfloat16 --append --out "$out")
$python injection.py "${common[@]}" --part layer memory --seq 2048 4096 --layer-batch 1 8 --rounds 9 --inner 50
$python injection.py "${common[@]}" --part layer --cuda-graphs --seq 2048 4096 --layer-batch 1 8 --rounds 9 --inner 50
$python injection.py "${common[@]}" --part model --hidden 4096 --layers 32 --vocab 32000 --seq 640 2048 \
    --batch 1 8 --preset compact paper --model-rounds 5 --new-tokens 16
echo "records in benchmarks/$out"
