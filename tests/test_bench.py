"""The benchmark scripts run end to end at the tiny shape on CPU (their GPU numbers live in BENCHMARKS.md;
this only guards the code path that produces them)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_bench_gpu_path_on_cpu_with_a_strategy_and_transformers(tmp_path):
    out = run("bench.py", "--gpu", "--tiny", "--cpu", "--contexts", "256", "--batches", "1", "2",
              "--strategies", "full", "h2o", "spotlight", "--hf", "--out", str(tmp_path / "b.md"))
    table = (tmp_path / "b.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| full |") or line.startswith("| h2o |")
            or line.startswith("| spotlight |")]
    assert len(rows) == 6 and not any("Error" in r for r in rows), table
    assert "random weights" in out and table.count("| 256 | 1 |") == 4  # three strategies + transformers


def test_bench_retrieval_tiny():
    out = run("bench_retrieval.py", "--tiny", "--quest_budget")
    rows = [line for line in out.splitlines() if line.startswith("| 256 |")]
    assert len(rows) == 6 and not any("failed" in r or "memory" in r for r in rows), out  # full, 2 prunes, 2 batches
