"""The benchmark script runs end to end at the tiny shape on CPU (its GPU numbers live in BENCHMARKS.md;
this guards the code path that produces them), and its honesty checks fire."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import generate as gen

ROOT = Path(__file__).resolve().parents[1]


def run(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_bench_gpu_path_on_cpu_with_strategies_and_transformers(tmp_path):
    specs = ["full", "h2o", "spotlight:spotlight_prune=0.98", "quest"]
    out = run("bench.py", "--gpu", "--tiny", "--cpu", "--contexts", "256", "--batches", "1", "2", "--steps", "3",
              "--strategies", *specs, "--hf", "--bandwidth", "20", "--out", str(tmp_path / "b.md"))
    table = (tmp_path / "b.md").read_text()
    rows = [line for line in table.splitlines() if any(line.startswith(f"| {s} |") for s in specs)]
    assert len(rows) == 8 and not any("FAILED" in r for r in rows), table
    assert all(r.split("|")[9].strip().endswith("×") for r in rows if not r.startswith("| full |")), table  # vs full
    assert "random weights" in out and table.count("| 256 | 1 |") == 5  # four strategies + transformers
    assert "roofline at 20 GB/s (given)" in table


def test_a_recompile_in_the_timed_steps_fails_the_row():
    torch._dynamo.reset()
    f = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    f(torch.ones(3))
    counts = bench.compile_counts()
    bench.check_honest(f, "cpu", 5, counts, None)  # nothing compiled since: honest
    f(torch.ones(4))  # a new shape compiles again
    with pytest.raises(bench.BenchError, match="recompiled 1 time"):
        bench.check_honest(f, "cpu", 5, counts, None)


def test_a_step_outside_its_cuda_graph_fails_the_row():
    step = gen.DecodeGraph(model=None, step=None)
    step.replays, step.captures = 10, 1
    bench.check_honest(step, "cuda", 10, bench.compile_counts(), 0)
    with pytest.raises(bench.BenchError, match="2 of 10 timed steps ran without their CUDA graph"):
        bench.check_honest(step, "cuda", 10, bench.compile_counts(), 2)
    with pytest.raises(bench.BenchError, match="not a CUDA graph"):
        bench.check_honest(lambda *a: None, "cuda", 10, bench.compile_counts(), 0)


def test_strategy_specs():
    assert bench.parse_spec("spotlight:spotlight_prune=0.98,spotlight_recent=64") == (
        "spotlight", {"spotlight_prune": 0.98, "spotlight_recent": 64})
    assert bench.parse_spec("l2:l2_one_shot=true") == ("l2", {"l2_one_shot": True})
    assert bench.parse_spec("full") == ("full", {})


def test_prompt_scoring_over_twice_a_plain_prefill_is_marked():
    """--prefill's fill column: the strategy's prefill (plain prefill + its fill beyond the full cache's) over
    the plain prefill, marked past issue 10's 2x (Scissorhands' 2.41x had gone unseen in a table)."""
    full = dict(spec="full", context=256, batch=1, kept=1.0, tok_s=10.0, ms=100.0, gb=1.0, roof=20.0, cache_gb=1.0,
                peak_gb=1.0, fill_s=1.0, compile_s=1.0, timed_s=1.0)
    cells = {s: bench.row(dict(full, spec="x", fill_s=s), full, plain_s=10.0).split("|")[13] for s in (20.0, 2.0)}
    assert "2.90× plain prefill, OVER 2×" in cells[20.0] and "1.10× plain prefill)" in cells[2.0], cells


def test_an_inductor_setting_that_does_not_exist_is_one_line():
    r = subprocess.run([sys.executable, "bench.py", "--gpu", "--inductor", "reorder_for_locality=Fals"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--inductor reorder_for_locality=Fals" in r.stderr
