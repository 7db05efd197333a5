#!/usr/bin/env bash
# Tensor-parallel decode speed (tp.py): the same rows split over two GPUs and on one, random Llama-3-8B
# weights, bf16, 4k and 32k context, batch 1 and 8, the full cache and a 10% budget (streamingllm). Needs a
# host with 2 GPUs (nvidia-h200-x2); both runs fail a row on a recompile, a graph break or a step outside
# its CUDA graph (on any rank). Tables go to stdout and results/bench_tp_{2,1}gpu.md. Not yet run: about
# 6-8 minutes expected (8 rows per run at ~10-20 s each, from bench.py's 1-GPU rows, plus start-up and
# cold compiles); the 2-GPU run goes first.
#   bash scripts/bench_tp.sh                              # extra flags go to both runs, e.g. --steps 100
#   STRATEGIES="full streamingllm snapkv" bash scripts/bench_tp.sh     # 12 rows per run: ~10 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
# NVLink multicast off in NCCL, PyTorch and NVSHMEM: on a shared host it can take the GPUs out of service
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
read -r -a STRATS <<< "${STRATEGIES:-full streamingllm}"
ROWS=(--gpu --contexts 4096 32768 --batches 1 8 --budget 0.1 --strategies "${STRATS[@]}" "$@")
"$PY" -m torch.distributed.run --standalone --nproc_per_node 2 bench.py "${ROWS[@]}" --out results/bench_tp_2gpu.md
"$PY" bench.py "${ROWS[@]}" --out results/bench_tp_1gpu.md
