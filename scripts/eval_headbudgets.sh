#!/usr/bin/env bash
# The README's head-budget evidence (issue 11): needle (rulerniah_single, 2k context, n = 50) at 10% and
# 25% average budgets, kvpress's context protocol and query-aware, and fidelity (KL to the full cache,
# 1k context, 16 forced tokens, n = 50): DiliLazyKV, HeadKV and AdaKV against uniform SnapKV and
# PyramidKV at the same total bytes. Extra arguments go to every eval.py call (e.g. --device cuda).
# Resumable: a killed run restarts where it stopped.
#   bash scripts/eval_headbudgets.sh [--results_dir results/headbudgets] [--device cuda --dtype float32]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NEEDLE="--tasks rulerniah_single --context_length 2048 --num_samples 50 --max_new_tokens 12"
STRATEGIES="snapkv pyramid adakv headkv dililazy"
FIDELITY="--tasks fidelity --fidelity_task rulerniah_single --fidelity_tokens 16 --context_length 1024 --num_samples 50"
for protocol in "" "--query_aware"; do
    $PY eval.py $NEEDLE $protocol --cache_strategy full "$@"
    $PY eval.py $NEEDLE $protocol --cache_strategy $STRATEGIES --max_cache_length 0.1 0.25 "$@"
done
$PY eval.py $FIDELITY --cache_strategy $STRATEGIES --max_cache_length 0.1 0.25 "$@"
