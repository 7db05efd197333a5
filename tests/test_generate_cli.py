"""`python generate.py ...` as a user runs it: bad input exits non-zero with one clear line on stderr and
no traceback; a normal run prints the numbers the README reports."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cache as kv

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def run(*args, cwd=ROOT, timeout=300):
    # a library's deprecation warning is not our error line; one thread: these runs are tiny, and on a busy
    # machine a second OpenMP thread makes every barrier wait a scheduler slice
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(*args, cwd=ROOT) -> str:
    r = run(*args, cwd=cwd)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    return lines[0]


def an_evicting_strategy() -> str:
    return next(n for n, c in sorted(kv.REGISTRY.items()) if c.evicts)


def test_unknown_strategy_lists_the_known_ones():
    err = one_line_error("--cache_strategy", "no_such_press", "--max_new_tokens", "2")
    assert "no_such_press" in err and all(name in err for name in kv.REGISTRY)


@pytest.mark.parametrize("budget, says", [("0", "must be > 0"), ("-3", "must be > 0"), ("5", "too small"),
                                          ("100000", "exceeds the model's maximum context of 8192")])
def test_bad_budget(default_checkpoint, budget, says):
    err = one_line_error("--cache_strategy", an_evicting_strategy(), "--max_cache_length", budget,
                         "--max_new_tokens", "2")
    assert says in err


def test_prompt_longer_than_the_model_maximum(default_checkpoint, tmp_path):
    essays = sorted((DATA / "paul_graham_essays" / "essays").glob("*.txt"))
    if not essays:
        pytest.skip(f"no essays under {DATA}")
    text = "\n".join(p.read_text() for p in essays[:30])  # ~200k characters: far past 8192 tokens
    (tmp_path / "long.txt").write_text(text)
    err = one_line_error("--prompt", tmp_path / "long.txt", "--max_new_tokens", "2")
    assert "8192" in err and "exceeds" in err


def test_missing_checkpoint_names_the_prepare_command(tmp_path):
    err = one_line_error("--checkpoint_path", tmp_path / "nowhere", "--max_new_tokens", "2")
    assert "nowhere" in err and "scripts/prepare.sh" in err
    # the default path, from a directory where it does not exist: the default's own prepare script
    err = one_line_error("--max_new_tokens", "2", cwd=tmp_path)
    assert "bash scripts/prepare_default.sh" in err


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """Small files copied, the weights symlinked: each test then breaks the copy its own way."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name == "model.safetensors" or f.suffix == ".gguf":
            (dst / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "garbage", "config"])
def test_corrupt_checkpoint_is_one_clear_error(default_checkpoint, tmp_path, damage):
    ck = copy_checkpoint(default_checkpoint, tmp_path / "ck")
    weights = ck / "model.safetensors"
    if damage == "truncated":  # the whole header, a little of the tensor data
        weights.unlink()
        with open(default_checkpoint / "model.safetensors", "rb") as f:
            weights.write_bytes(f.read(1 << 20))
    elif damage == "garbage":
        weights.unlink()
        weights.write_bytes(os.urandom(4096))
    else:
        (ck / "config.json").write_text("{ not json")
    err = one_line_error("--checkpoint_path", ck, "--max_new_tokens", "2")
    assert str(ck) in err and ("corrupt" in err or "unreadable" in err)


def test_missing_prompt_file(default_checkpoint, tmp_path):
    err = one_line_error("--prompt", tmp_path / "absent.txt", "--max_new_tokens", "2")
    assert "absent.txt" in err


def test_happy_path_prints_the_reported_numbers(default_checkpoint):
    r = run("--max_new_tokens", "8", "--prompt", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in ("prefill:", "ms for", "decode:", "tok/s", "MiB allocated", "compression ratio", "peak"):
        assert needle in out, out
    assert "Paris" in out  # the 135M model knows this one
