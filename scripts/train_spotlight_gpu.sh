#!/usr/bin/env bash
# Spotlight's hashes on a GPU: train 64-bit and 128-bit codes, then the --eval recall table and the gate.
# Reads the default model at $CKPT and the text from $DATA_DIR (pg19_test_gutenberg, wikitext2_raw and
# paul_graham_essays copied from ../shared/data: 3.4 MB); writes the hashes and the three logs to $OUT.
# RUN_TIMEOUT (seconds) bounds each training run; the hashes saved last (every EVAL_EVERY steps) are kept.
#   CKPT=/tmp/ck/smol OUT=$OUT DATA_DIR=.carry/data STEPS=1000 bash scripts/train_spotlight_gpu.sh
# The README's table: STEPS=600 EVAL_EVERY=150 RUN_TIMEOUT=50 (the runs ended past step 300; hashes of step 300).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CKPT=${CKPT:-checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct}
OUT=${OUT:-results/spotlight}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
data=(); [ -n "${DATA_DIR:-}" ] && data=(--data_dir "$DATA_DIR")
limit=(); [ -n "${RUN_TIMEOUT:-}" ] && limit=(timeout "$RUN_TIMEOUT")
common=(--device cuda --checkpoint_path "$CKPT" "${data[@]}" --steps "${STEPS:-1000}" --queries 256 --max_pos 40
        --max_neg 256 --eval_every "${EVAL_EVERY:-250}" --no_table)
"${limit[@]}" "$PY" train_spotlight.py "${common[@]}" --out "$OUT/spotlight.safetensors" > "$OUT/train64.log" 2>&1
echo "64-bit training: exit $?"; tail -3 "$OUT/train64.log"
"${limit[@]}" "$PY" train_spotlight.py "${common[@]}" --bits 128 --out "$OUT/spotlight-128.safetensors" > "$OUT/train128.log" 2>&1
echo "128-bit training: exit $?"; tail -3 "$OUT/train128.log"
"$PY" train_spotlight.py --device cuda --checkpoint_path "$CKPT" "${data[@]}" --eval --out "$OUT/spotlight.safetensors" \
    --hashes128 "$OUT/spotlight-128.safetensors" 2>&1 | tee "$OUT/eval.log"
