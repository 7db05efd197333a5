#!/usr/bin/env bash
# A separate virtual environment, .venv-kvpress (git-ignored), for tests/test_kvpress.py: NVIDIA's kvpress
# as a test-only reference. kvpress 0.5.5 needs transformers < 5.3 and our .venv has a newer 5.x, so it
# cannot live beside ours; the test runs tests/kvpress_positions.py in this venv as a subprocess and skips
# when the venv is absent. Pinned exactly (kvpress's other dependencies resolve within its own ranges);
# torch is the CPU build on local disk here. Idempotent: an install with these pins is kept, an
# interrupted one is completed, a failed one removed. About 1-2 minutes on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-kvpress
PINS=(torch==2.13.0 kvpress==0.5.5 transformers==5.2.0)
if [ -x $VENV/bin/python ] && $VENV/bin/python - "${PINS[@]}" 2>/dev/null <<'PY'; then exit 0; fi
import importlib.metadata as m, sys
sys.exit(any(m.version(n) != v for n, v in (p.split("==") for p in sys.argv[1:])))
PY
trap 'rm -rf $VENV' ERR  # a failed install leaves no venv: the test then skips instead of failing
python3 -m venv $VENV
# torch first and pinned: an unpinned torch (kvpress asks for torch < 3) would pull a multi-GB CUDA build
$VENV/bin/python -m pip install -q torch==2.13.0
$VENV/bin/python -m pip install -q "${PINS[@]}"
