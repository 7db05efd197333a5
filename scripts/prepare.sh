#!/usr/bin/env bash
# Download a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 / Phi-3 checkpoint and convert it (needs
# the hub; honours HF_TOKEN: Llama and Gemma repos are gated). A multimodal Gemma 3 (4B and up) gives its text model.
#   bash scripts/prepare.sh meta-llama/Llama-3.2-1B-Instruct   ->  checkpoints/meta-llama/Llama-3.2-1B-Instruct/
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=${1:?usage: bash scripts/prepare.sh <hf_repo_id>}
PY=${PYTHON:-python}
OUT=checkpoints/$REPO
"$PY" - "$REPO" "$OUT/hf" <<'PYEOF'
import os, sys
from huggingface_hub import list_repo_files, snapshot_download
repo, dest = sys.argv[1:]
token = os.environ.get("HF_TOKEN")
# safetensors when the repo has them, else the old pickles; never Meta's consolidated.* duplicates.
has_st = any(f.endswith(".safetensors") for f in list_repo_files(repo, token=token))
weights = ["*.safetensors"] if has_st else ["pytorch_model*.bin"]
snapshot_download(repo, local_dir=dest, token=token, ignore_patterns=["consolidated*", "original/*.pth"],
                  allow_patterns=weights + ["*.json", "*.jinja", "tokenizer.model", "original/tokenizer.model"])
PYEOF
"$PY" scripts/convert_hf.py "$OUT/hf" "$OUT" >/dev/null
echo "checkpoint ready: $OUT"
