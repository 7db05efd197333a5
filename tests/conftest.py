"""Shared fixtures. Tests that need the default checkpoint (bash scripts/prepare_default.sh) skip without it."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # tokenizer.py, model.py, ...; convert_*.py


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    path = ROOT / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"
    if not (path / "model.safetensors").exists() or not (path / "config.json").exists():
        pytest.skip(f"no default checkpoint at {path}; run bash scripts/prepare_default.sh")
    return path


@pytest.fixture(scope="session")
def default_gguf(default_checkpoint) -> Path:
    """The GGUF the default checkpoint was converted from, for tests against transformers' GGUF loader."""
    path = default_checkpoint / "source.gguf"
    if not path.exists():
        pytest.skip(f"no {path}; delete the checkpoint and re-run bash scripts/prepare_default.sh")
    return path
