"""`python generate.py ...` as a user runs it: bad input exits non-zero with one clear line on stderr and
no traceback; a normal run prints the numbers the README reports."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("budget, says", [("0", "a fraction in (0, 1]"), ("-3", "a fraction in (0, 1]"),
                                          ("1.5", "whole number of tokens"), ("abc", "is not a number"),
                                          ("5", "too small"), ("100000", "exceeds the model's maximum context of 8192")])
def test_bad_budget(default_checkpoint, budget, says):
    err = one_line_error("--cache_strategy", "lsh", "--max_cache_length", budget,  # 4 sinks + 10 recent: a floor of 15
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


def test_defaults_resolve_in_the_repository_not_the_current_folder(default_checkpoint, tmp_path):
    r = run("--max_new_tokens", "2", "--cache_config", "h2o", cwd=tmp_path)  # checkpoint and cache_configs/
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("flags, says", [
    (["--device", "tpu"], "--device tpu: give cpu or cuda"),
    (["--dtype", "int8"], "--dtype int8: give float32, bfloat16 or float16"),
    (["--top_k", "-5"], "--top_k -5"),
    (["--batch_size", "0"], "--batch_size 0"),
    (["--num_samples", "0"], "--num_samples 0"),
    (["--temperature", "-1"], "--temperature"),
    (["--threads", "0"], "--threads 0"),
    (["--max_new_tokens", "abc"], "--max_new_tokens"),
    (["--cache_strategy", "h2o", "--global_tokens", "-3"], "--global_tokens -3"),
    (["--cache_strategy", "h2o", "--recent_window", "-2"], "--recent_window -2"),
    (["--cache_strategy", "tova", "--tova_per_head", "maybe"], "--tova_per_head"),
    (["--no_chat", "--prompt", ""], "prompt 0 is empty"),
])
def test_bad_flags_are_one_line(default_checkpoint, flags, says):
    assert says in one_line_error(*flags, "--max_new_tokens", "2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it(default_checkpoint):
    assert "--device cuda: this machine has no CUDA GPU" in one_line_error("--device", "cuda", "--max_new_tokens", "2")


def test_bad_prompt_file_and_cache_config(default_checkpoint, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert "is not UTF-8 text" in one_line_error("--prompt", tmp_path / "latin1.txt", "--max_new_tokens", "2")
    (tmp_path / "bad.yaml").write_text("cache_strategy: [h2o\n")
    assert "is not valid YAML" in one_line_error("--cache_config", tmp_path / "bad.yaml", "--max_new_tokens", "2")
    (tmp_path / "list.yaml").write_text("- cache_strategy\n- h2o\n")
    assert "must be a YAML mapping" in one_line_error("--cache_config", tmp_path / "list.yaml", "--max_new_tokens", "2")


@pytest.mark.parametrize("edit, says", [(lambda c: c.pop("rope_base"), "lacks rope_base"),
                                        (lambda c: c.pop("block_size"), "lacks block_size"),
                                        (lambda c: c.update(rope_theta=1.0), "unknown keys rope_theta")])
def test_checkpoint_config_is_validated(default_checkpoint, tmp_path, edit, says):
    ck = copy_checkpoint(default_checkpoint, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    edit(cfg)
    (ck / "config.json").write_text(json.dumps(cfg))
    assert says in one_line_error("--checkpoint_path", ck, "--max_new_tokens", "2")


def test_ctrl_c_is_one_line(default_checkpoint):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--max_new_tokens", "2000", "--threads", "1"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.readline()  # the settings line: the model is loaded and about to generate
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip() == "interrupted (Ctrl-C)", err


def test_compressing_strategy_compresses_by_default_and_says_so(default_checkpoint):
    r = run("--cache_strategy", "h2o", "--max_new_tokens", "16", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "h2o: budget 0.5 of each prompt's tokens (the default" in r.stdout
    ratio = float(r.stdout.split("compression ratio ")[1].split()[0])
    prompt = int(r.stdout.split("sequence 0 (")[1].split()[0])
    new = int(r.stdout.split("batch 1, ")[1].split()[0]) + 2  # timed steps + the first two tokens
    assert abs(ratio - (1 - math.ceil(0.5 * prompt) / (prompt + new - 1))) < 0.02, r.stdout  # half the prompt kept
    r = run("--max_new_tokens", "4")  # full: nothing compressed; the threads picked from the idle cores
    assert "full: no compression" in r.stdout and "one per idle core" in r.stdout


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


def test_boolean_flags_are_strict():
    import generate as gen
    assert [gen.flag_bool(v) for v in ("on", "True", "1", "off", "no", "0")] == [True] * 3 + [False] * 3
    with pytest.raises(Exception, match="not a boolean"):
        gen.flag_bool("maybe")


@pytest.mark.parametrize("flags, says", [(["--kv_bits", "3"], "invalid choice: 3"),
                                         (["--kv_bits", "4", "--kv_residual", "20"], "a multiple of it"),
                                         (["--kv_bits", "4", "--kv_residual", "0"], "at least one group"),
                                         (["--kv_bits", "4", "--kv_group", "0"], "the group must be >= 1"),
                                         (["--kv_bits", "4", "--kv_group", "48", "--kv_residual", "96"], "divide head_dim (64)")])
def test_bad_kv_quantization(default_checkpoint, flags, says):
    assert says in one_line_error(*flags, "--max_new_tokens", "2")


@pytest.mark.parametrize("flags", [["--freeze"], ["--freeze", "--compile", "--device", "cuda"]])
def test_freeze_needs_a_compiled_cpu_step(default_checkpoint, flags):
    assert "give it with --compile and --device cpu" in one_line_error(*flags, "--max_new_tokens", "2")


def test_quantized_cache_prints_its_bytes_and_bits(default_checkpoint):
    """--kv_bits 2: the run prints the bits and fewer bytes than the 16-bit cache's (the full cache's 1,024
    slots; a cache of a few dozen slots is mostly its full-precision residual)."""
    got = {}
    for bits in ("16", "2"):
        r = run("--kv_bits", bits, "--max_new_tokens", "3", "--threads", "1")
        assert r.returncode == 0, r.stderr
        line = next(x for x in r.stdout.splitlines() if x.startswith("cache: "))
        got[bits] = int(line.split("(")[1].split(" bytes")[0].replace(",", ""))
        assert ("2-bit KIVI codes, group 32, residual 128" in line) == (bits == "2"), line
    assert got["2"] < 0.35 * got["16"]  # 14.4 MB of 47.9 (fp32 on CPU: 4-byte scales)
