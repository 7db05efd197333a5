#!/usr/bin/env bash
# Tensor-parallel decode speed (tp.py): the same rows on one GPU and split over two, random Llama-3-8B
# weights, bf16, 4k and 32k context, batch 1 and 8, the full cache and 10% budgets (snapkv, streamingllm).
# Needs a host with 2 GPUs (nvidia-h200-x2); both runs fail a row on a recompile, a graph break or a step
# outside its CUDA graph (on any rank). Tables go to stdout and results/bench_tp_{1,2}gpu.md.
#   bash scripts/bench_tp.sh                              # extra flags go to both runs, e.g. --steps 100
#   STRATEGIES="full streamingllm" bash scripts/bench_tp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# NVLink multicast off in NCCL, PyTorch and NVSHMEM: on a shared host it can take the GPUs out of service
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
read -r -a STRATS <<< "${STRATEGIES:-full snapkv streamingllm}"
ROWS=(--gpu --contexts 4096 32768 --batches 1 8 --budget 0.1 --strategies "${STRATS[@]}" "$@")
"$PY" bench.py "${ROWS[@]}" --out results/bench_tp_1gpu.md
"$PY" -m torch.distributed.run --standalone --nproc_per_node 2 bench.py "${ROWS[@]}" --out results/bench_tp_2gpu.md
