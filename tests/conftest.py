"""Shared fixtures. Tests that need the default checkpoint (bash scripts/prepare_default.sh) skip without it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="session")
def hf_gguf_model(default_gguf, tmp_path_factory):
    """An independent reference: transformers' own LlamaForCausalLM built from the GGUF (it dequantizes
    and un-permutes q/k itself), fp32, eager attention. Loading takes ~20 s, so once per session."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    d = tmp_path_factory.mktemp("gguf")
    (d / "model.gguf").symlink_to(default_gguf)  # alone: transformers must not see our config.json
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="model.gguf", dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval().requires_grad_(False)


def in_triton_interpreter(module: str, check: str):
    """Run tests/<module>.<check>('cpu') in a subprocess under Triton's interpreter on CPU (TRITON_INTERPRET=1
    must be set before triton is imported, hence the subprocess); fail with its output if it fails."""
    pytest.importorskip("triton")
    code = f"import sys; sys.path[:0] = ['tests', '.']; import {module}; {module}.{check}('cpu')"
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def tiny_model(n_layer=3, seed=0, n_kv=2, n_head=4):
    """The "tiny" config with n_layer layers and n_kv / n_head heads, seeded N(0, 0.3) weights."""
    from model import ModelArgs, Transformer
    torch.manual_seed(seed)
    args = ModelArgs.from_name("tiny")
    args.n_layer, args.n_local_heads, args.n_head = n_layer, n_kv, n_head
    model = Transformer(args).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def needs_data(*folders):
    """Skip unless every evaluation data folder is in the repository's data/ or in ../shared/data beside it
    (eval.py's lookup; a clone elsewhere has neither until scripts/prepare_data.py fills data/)."""
    have = lambda f: any((d / f).is_dir() for d in (ROOT / "data", ROOT.parent / "shared" / "data"))  # noqa: E731
    missing = [f for f in folders if not have(f)]
    return pytest.mark.skipif(bool(missing), reason=f"no data {missing} (python scripts/prepare_data.py)")


class Capture(torch.nn.Module):
    """Records each layer's prefill q and k (a duck-typed cache around a full one)."""

    def __init__(self, cache):
        super().__init__()
        self.cache = cache

    def prefill(self, q, k, v, pos):
        self.q, self.k = q, k
        self.cache.prefill(q, k, v, pos)


def hash24(*keys):
    """The random strategy's documented stream (cache.hash_uniform), in Python ints."""
    x = 0
    for key in keys:
        x = (x * 0x27D4EB2F + key) & 0xFFFFFFFF
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
        x = (x >> 16) ^ x
    return x >> 8
