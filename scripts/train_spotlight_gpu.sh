#!/usr/bin/env bash
# Spotlight's hashes on a GPU: train 64-bit and 128-bit codes, then the --eval recall table and the gate.
# Reads the default model at $CKPT and the text from data/ (copy pg19_test_gutenberg, wikitext2_raw and
# paul_graham_essays from ../shared/data there: 3.4 MB); writes the hashes and the three logs to $OUT.
#   CKPT=/tmp/ck/smol OUT=$OUT STEPS=1000 bash scripts/train_spotlight_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CKPT=${CKPT:-checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct}
OUT=${OUT:-results/spotlight}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
common=(--device cuda --checkpoint_path "$CKPT" --steps "${STEPS:-1000}" --queries 256 --max_pos 40
        --max_neg 256 --eval_every 250 --no_table)
"$PY" train_spotlight.py "${common[@]}" --out "$OUT/spotlight.safetensors" 2>&1 | tee "$OUT/train64.log"
"$PY" train_spotlight.py "${common[@]}" --bits 128 --out "$OUT/spotlight-128.safetensors" 2>&1 | tee "$OUT/train128.log"
"$PY" train_spotlight.py --device cuda --checkpoint_path "$CKPT" --eval --out "$OUT/spotlight.safetensors" \
    --hashes128 "$OUT/spotlight-128.safetensors" 2>&1 | tee "$OUT/eval.log"
