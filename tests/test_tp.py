"""Tensor parallel (tp.py) on CPU with gloo: 2 and 3 torchrun processes against one process, for the full
cache and every strategy (greedy tokens identical, logits equal to float rounding), the compiled decode
step (fullgraph, no recompile, in every rank), each rank's bytes (1/N of one process's), and the
command lines (generate.py, eval.py --tensor_parallel, a process count that does not divide the heads)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as E
import tp
from test_eval import metrics, names, rows, write_checkpoint
from tp_worker import CASES, learned_files, run_all, tiny_model

ROOT = Path(__file__).resolve().parents[1]
REPLICATED_AUX = {"lsh", "random", "scissorhands"}  # a per-layer buffer without a head axis (R, salt, step)


def torchrun(n, *argv, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_model()
    eager, _ = run_all(model, learned_files(tmp_path_factory.mktemp("files"), model.args))
    torch.set_num_threads(threads)
    return eager, {n: tp.weight_split(model, n) for n in (2, 3)}  # 2 split the output (vocabulary 256), 3 do not


@pytest.mark.parametrize("n", [2, 3])
def test_ranks_match_one_process(n, one_process, tmp_path):
    r = torchrun(n, "tests/tp_worker.py", str(tmp_path), *(["compile"] if n == 2 else []))
    assert r.returncode == 0, r.stderr[-4000:]
    ref, weights = one_process
    sharded, replicated = weights[n]
    assert (weights[2][1] < weights[3][1]) and (weights[2][0] > weights[3][0])  # 2 ranks split the output, 3 do not
    got = [torch.load(tmp_path / f"rank{i}.pt") for i in range(n)]
    for case, (logits, tokens, nbytes) in ref.items():
        for g in got:
            assert torch.equal(g["eager"][case][1], tokens), case
            torch.testing.assert_close(g["eager"][case][0], logits, rtol=1e-4, atol=1e-4, msg=case)
        ranks = [g["eager"][case][2] for g in got]
        name = case.split()[0]
        if name == "adakv":  # any rank's heads may win the whole flattened top-k: the layer's budget per rank
            assert all(nbytes / n < b < nbytes for b in ranks), (case, ranks, nbytes)
        elif name in ("headkv", "dililazy"):  # heads' budgets differ: the ranks' bytes add up to one process's
            assert sum(ranks) == nbytes, (case, ranks, nbytes)
        elif name in REPLICATED_AUX:
            assert all(abs(b * n - nbytes) < 0.06 * nbytes for b in ranks), (case, ranks, nbytes)
        else:
            assert all(b * n == nbytes for b in ranks), (case, ranks, nbytes)
    for g in got:
        assert g["weights"] == (sharded // n, replicated) and sharded % n == 0
        for name, (logits, tokens, graphs, breaks) in g["compiled"].items():
            assert (graphs, breaks) == (1, 0), name  # fullgraph, and error_on_recompile held for 12 steps
            want = ref[f"{name.split()[0]} {{}}"]
            assert torch.equal(tokens, want[1]), name
            torch.testing.assert_close(logits, want[0], rtol=1e-4, atol=1e-4)
    assert len(got[0]["compiled"]) == (4 if n == 2 else 0)


def test_generate_three_ranks(default_checkpoint):
    """SmolLM2-135M (3 KV heads) over 3 processes: the text of one process, and each rank's bytes."""
    flags = ["generate.py", "--max_new_tokens", "8", "--cache_strategy", "tova", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    three = torchrun(3, *flags)
    assert one.returncode == 0 and three.returncode == 0, three.stderr[-3000:]
    text = lambda out: out[out.index("--- sample"):out.index("prefill:")]  # noqa: E731
    assert text(three.stdout) == text(one.stdout)
    lines = re.findall(r"rank (\d) of 3: .*\(bytes: sharded (\d+), replicated (\d+), cache (\d+)\)", three.stdout)
    assert sorted(int(r[0]) for r in lines) == [0, 1, 2] and len({r[1:] for r in lines}) == 1
    cache_mib = float(re.search(r"cache: ([\d.]+) MiB allocated", one.stdout)[1])
    assert abs(3 * int(lines[0][3]) / 2**20 - cache_mib) < 0.01


def test_heads_not_divisible_is_one_line(default_checkpoint):
    r = torchrun(2, "generate.py", "--max_new_tokens", "2", "--threads", "1")
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: torchrun --nproc_per_node 2: 2 processes do not divide the model's 3 KV heads; "
                      "use a divisor of it"], r.stderr[-2000:]


def test_eval_tensor_parallel_writes_once(tmp_path):
    """eval.py --tensor_parallel: two ranks run every sample together; rank 0 alone writes, and its
    predictions and metrics are one process's."""
    model = tiny_model()
    ckpt = write_checkpoint(tmp_path / "ckpt", model)
    args = ["--checkpoint_path", str(ckpt), "--device", "cpu", "--threads", "1", "--tasks", "passkey", "--num_samples",
            "3", "--context_length", "450", "--max_new_tokens", "4", "--cache_strategy", "full", "tova",
            "--max_cache_length", "0.5"]
    import generate as gen
    E.main(["--results_dir", str(tmp_path / "one"), *args], loaded=gen.load(ckpt, "cpu", torch.float32))
    r = torchrun(2, "eval.py", "--results_dir", str(tmp_path / "two"), "--tensor_parallel", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    for conf in names(*args):
        one, two = tmp_path / "one/ckpt/passkey-450" / conf, tmp_path / "two/ckpt/passkey-450" / conf
        assert {k: v for k, v in metrics(one / "metrics.json").items() if k != "run"} == \
            {k: v for k, v in metrics(two / "metrics.json").items() if k != "run"}
        assert rows(one / "predictions.jsonl") == rows(two / "predictions.jsonl")
        assert sorted(p.name for p in two.glob("predictions*")) == ["predictions.jsonl"]
