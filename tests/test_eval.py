"""The eval runner on CPU with the tiny model: sweeps, every task kind, fair budgets, resuming after a
failure or a SIGKILL, two torchrun ranks against one process, and the report against metrics.json."""
import base64
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cache as kv
import eval as E
import generate as gen
from model import ModelArgs, Transformer
from test_tasks import ByteTok

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"prefill_ms", "decode_tok_s"}  # the only fields that may differ between identical runs
EVICT = next((n for n in ("streamingllm", "h2o", "random") if n in kv.REGISTRY),
             next((n for n, c in kv.REGISTRY.items() if c.evicts), None))
needs_evict = pytest.mark.skipif(EVICT is None, reason="no evicting strategy registered")


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only spin (20x slower on a busy 2-core box)
    torch.manual_seed(0)
    yield Transformer(ModelArgs.from_name("tiny")).eval().requires_grad_(False)
    torch.set_num_threads(threads)


@pytest.fixture
def data(tmp_path):
    """A small offline data folder: two MedQA records of different lengths and one PG-19-style book."""
    d = tmp_path / "data"
    (d / "medqa").mkdir(parents=True)
    recs = [{"question": "A man has a cough. " * k + "Which drug is best?", "answer_idx": "C",
             "options": {"A": "Aspirin", "B": "Beta blocker", "C": "Cough syrup", "D": "Digoxin"}} for k in (1, 4)]
    (d / "medqa/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "pg19_test_gutenberg").mkdir()
    for k in (1, 2):
        (d / f"pg19_test_gutenberg/{k}.txt").write_text("*** START OF X ***\n" + "It was a dark night. " * 30 * k + "\n*** END")
    return d


def run(model, out, *argv, tok=None):
    E.main(["--results_dir", str(out), "--checkpoint_path", "tiny", "--device", "cpu", *argv],
           loaded=(model, tok or ByteTok()))


def rows(path: Path, drop=TIMING):
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


def metrics(path: Path):
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING}


# ---------------------------------------------------------------- sweeps
@needs_evict
def test_sweep_expansion_and_yaml_configs(tmp_path):
    names = list(E.parse_configs(["--cache_strategy", "full", EVICT, "--max_cache_length", "0.5", "0.25"]))
    assert names == ["full", f"{EVICT}-0.5", f"{EVICT}-0.25"]  # full ignores the budget: one run
    (name, (cfg, _)), = E.parse_configs(["--cache_strategy", EVICT, "--max_cache_length", "0.5,0.25"]).items()
    assert cfg.max_cache_length == ["0.5", "0.25"]  # a comma list is one per-layer budget, not a sweep
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"cache_strategy: {EVICT}\nmax_cache_length: 0.3\nrecent_window: 20\n")
    b.write_text(f"cache_strategy: {EVICT}\nmax_cache_length: 0.2\n")
    confs = list(E.parse_configs(["--cache_config", str(a), str(b)]).values())
    assert [c.max_cache_length for c, _ in confs] == [["0.3"], ["0.2"]]
    assert [c.recent_window for c, _ in confs] == [20, 10]  # a's YAML does not leak into b's run
    (cfg, args), = E.parse_configs(["--cache_config", str(a), "--max_cache_length", "0.1", "--query_aware"]).values()
    assert cfg.max_cache_length == ["0.1"] and cfg.recent_window == 20  # the command line wins
    assert E.config_name(cfg, args) == f"{EVICT}-0.1-recent_window=20-qa"


# ---------------------------------------------------------------- every kind of task
@needs_evict
def test_every_task_kind_runs_and_records(tiny, tmp_path, data):
    run(tiny, tmp_path, "--data_dir", str(data), "--tasks", "passkey", "medqa_mc", "ppl", "fidelity",
        "--num_samples", "2", "--context_length", "450", "--max_new_tokens", "4", "--ppl_prefill", "350",
        "--ppl_bin", "50", "--fidelity_task", "passkey", "--fidelity_tokens", "4",
        "--cache_strategy", "full", EVICT, "--max_cache_length", "0.5")
    res = tmp_path / "tiny"
    for task in ("passkey-450", "medqa_mc", "ppl-pg19-450", "fidelity-passkey-450-4"):
        for conf in ("full", f"{EVICT}-0.5"):
            d = res / task / conf
            m, cfg = json.loads((d / "metrics.json").read_text()), json.loads((d / "config.json").read_text())
            assert m["n"] == 2 and len(rows(d / "predictions.jsonl")) == 2
            assert cfg["cache"]["strategy"] == conf.split("-")[0] and cfg["query_aware"] is False
            if conf == "full":
                assert m["compression_ratio"] == 0.0
            else:
                assert m["compression_ratio"] == pytest.approx(0.5, abs=0.05)
    assert len(rows(res / "medqa_mc/full/predictions.jsonl")[0]["option_loglik"]) == 4
    assert (res / "ppl-pg19-450/full/curve.png").exists()
    ppl = json.loads((res / "ppl-pg19-450/full/metrics.json").read_text())
    assert [p for p, _ in ppl["curve"]] == [0, 50, 100, 150, 200, 250, 300, 350, 400]  # bins of --ppl_bin
    E.report(tmp_path, tmp_path / "plots")
    assert (tmp_path / "plots/curve-tiny-ppl-pg19-450.png").exists()  # one line per configuration
    full = json.loads((res / "fidelity-passkey-450-4/full/metrics.json").read_text())
    assert full["score"] == 100.0 and abs(full["kl"]) < 1e-4  # the full cache against itself


def test_full_cache_gives_the_same_answer_in_both_query_modes(tiny, tmp_path):
    """Decode-fed question tokens and a prefilled question are the same computation for a full cache."""
    common = ["--tasks", "passkey", "--num_samples", "3", "--context_length", "450", "--max_new_tokens", "6"]
    run(tiny, tmp_path, *common)
    run(tiny, tmp_path, *common, "--query_aware")
    agnostic = rows(tmp_path / "tiny/passkey-450/full/predictions.jsonl")
    aware = rows(tmp_path / "tiny/passkey-450/full-qa/predictions.jsonl")
    assert [r["prediction"] for r in agnostic] == [r["prediction"] for r in aware]
    assert all(a["n_context"] < b["n_context"] == b["n_prompt"] for a, b in zip(agnostic, aware))


@needs_evict
def test_each_sample_budget_comes_from_its_own_length(tiny, tmp_path, data):
    run(tiny, tmp_path, "--data_dir", str(data), "--tasks", "medqa", "--max_new_tokens", "4",
        "--cache_strategy", EVICT, "--max_cache_length", "0.5")
    short, long = rows(tmp_path / f"tiny/medqa/{EVICT}-0.5/predictions.jsonl")
    assert short["n_prompt"] < long["n_prompt"] and short["cache_bytes"] < long["cache_bytes"]
    for r in (short, long):  # measured, so a cache sized from the longest sample would show here
        assert r["compression_ratio"] == pytest.approx(0.5, abs=0.01)


@needs_evict
def test_compiled_eval_matches_eager_and_compiles_once_per_config(tiny, tmp_path, data, capsys):
    """--compile: the same predictions as eager; with a token budget, prompts of different lengths share
    one graph per configuration (full caches are allocated in ALLOC_STEP buckets, eviction buffers at
    the budget), the question tokens fed by decode steps included."""
    from torch._dynamo.utils import counters
    common = ["--data_dir", str(data), "--tasks", "medqa", "medqa_mc", "passkey", "--num_samples", "2", "--context_length", "450",
              "--max_new_tokens", "5", "--cache_strategy", "full", EVICT, "--max_cache_length", "100"]
    run(tiny, tmp_path / "eager", *common)
    before = counters["stats"]["unique_graphs"]
    run(tiny, tmp_path / "compiled", *common, "--compile")
    assert counters["stats"]["unique_graphs"] - before == 2  # 5 prompt lengths x 2 configs: 2 graphs
    lengths = set()
    for task in ("medqa", "medqa_mc", "passkey-450"):
        for conf in ("full", f"{EVICT}-100"):
            eager, compiled = (rows(tmp_path / d / f"tiny/{task}/{conf}/predictions.jsonl") for d in ("eager", "compiled"))
            assert [r["prediction"] for r in eager] == [r["prediction"] for r in compiled]
            if task == "medqa_mc":  # options teacher-forced by compiled steps vs Transformer.feed
                for a, b in zip(eager, compiled):
                    assert a["option_loglik"] == pytest.approx(b["option_loglik"], abs=1e-4)
            lengths |= {r["n_prompt"] for r in eager}
    assert len(lengths) == 5  # medqa 2, medqa_mc 2 (the options come after), passkey 1
    run(tiny, tmp_path / "frac", "--tasks", "passkey", "--num_samples", "1", "--context_length", "450",
        "--max_new_tokens", "2", "--cache_strategy", EVICT, "--max_cache_length", "0.5", "--compile")
    assert f"a fractional budget recompiles the decode step for every prompt length ({EVICT}-0.5)" in capsys.readouterr().err


# ---------------------------------------------------------------- resuming
@needs_evict
def test_rerun_after_a_failure_and_a_torn_line_matches_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    args = ["--tasks", "passkey", "--num_samples", "6", "--context_length", "450", "--max_new_tokens", "4",
            "--cache_strategy", EVICT, "--max_cache_length", "0.5"]
    run(tiny, tmp_path / "a", *args)
    reference = rows(tmp_path / f"a/tiny/passkey-450/{EVICT}-0.5/predictions.jsonl")

    real, calls = E.RUNNERS["generate"], []

    def flaky(*a):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return real(*a)
    monkeypatch.setitem(E.RUNNERS, "generate", flaky)
    with pytest.raises(RuntimeError):
        run(tiny, tmp_path / "b", *args)
    pred = tmp_path / f"b/tiny/passkey-450/{EVICT}-0.5/predictions.jsonl"
    assert len(rows(pred)) == 3 and not (pred.parent / "metrics.json").exists()
    with open(pred, "ab") as f:  # a process killed in the middle of a write
        f.write(b'{"id": "3", "predic')
    calls.clear()
    run(tiny, tmp_path / "b", *args)
    assert len(calls) == 3  # the 3 finished samples were skipped
    assert rows(pred) == reference


def write_checkpoint(d: Path, model) -> Path:
    """The tiny model as a converted checkpoint with a byte-level tiktoken tokenizer (256 one-byte tokens)."""
    from safetensors.torch import save_file
    from tokenizer import GPT2_PATTERN
    d.mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if ".kv_cache." not in k}
    save_file(weights, str(d / "model.safetensors"))
    (d / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    spec = {"kind": "tiktoken", "file": "tokenizer.model", "pattern": GPT2_PATTERN, "stop_ids": [], "chat_format": "none"}
    (d / "config.json").write_text(json.dumps({**dataclasses.asdict(model.args), "tokenizer": spec}))
    return d


def cli(*argv, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_sigkilled_run_resumes_without_loss_or_duplicates(tiny, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny)
    args = ["--checkpoint_path", str(ckpt), "--device", "cpu", "--tasks", "passkey", "--num_samples", "30",
            "--context_length", "450", "--max_new_tokens", "24"]
    E.main(["--results_dir", str(tmp_path / "a"), *args], loaded=gen.load(ckpt, "cpu", torch.float32))
    reference = rows(tmp_path / "a/ckpt/passkey-450/full/predictions.jsonl")
    pred = tmp_path / "b/ckpt/passkey-450/full/predictions.jsonl"
    proc = cli("eval.py", "--results_dir", str(tmp_path / "b"), *args)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (not pred.exists() or pred.read_text().count("\n") < 3):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    n_killed = len(rows(pred))
    assert 3 <= n_killed < 30, "the run was not killed midway"
    out = cli("eval.py", "--results_dir", str(tmp_path / "b"), *args)
    assert out.wait() == 0, out.stderr.read()
    assert rows(pred) == reference


# ---------------------------------------------------------------- data parallel
@needs_evict
def test_two_torchrun_ranks_match_one_process(tiny, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny)
    args = ["--checkpoint_path", str(ckpt), "--device", "cpu", "--tasks", "passkey", "--num_samples", "7",
            "--context_length", "450", "--max_new_tokens", "6", "--cache_strategy", "full", EVICT, "--max_cache_length", "0.5"]
    E.main(["--results_dir", str(tmp_path / "one"), *args], loaded=gen.load(ckpt, "cpu", torch.float32))
    proc = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "eval.py",
               "--results_dir", str(tmp_path / "two"), *args)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    for conf in ("full", f"{EVICT}-0.5"):
        one, two = tmp_path / "one/ckpt/passkey-450" / conf, tmp_path / "two/ckpt/passkey-450" / conf
        drop = {"run"}
        assert {k: v for k, v in metrics(one / "metrics.json").items() if k not in drop} == \
            {k: v for k, v in metrics(two / "metrics.json").items() if k not in drop}
        assert rows(one / "predictions.jsonl") == rows(two / "predictions.jsonl")
        assert not list(two.glob("predictions.rank*"))  # rank 0 merged the shards


# ---------------------------------------------------------------- report, refusals, absent data
@needs_evict
def test_report_table_matches_metrics(tiny, tmp_path):
    run(tiny, tmp_path, "--tasks", "passkey", "niah", "--num_samples", "2", "--context_length", "450",
        "--niah_lengths", "450", "--niah_depths", "0", "100", "--max_new_tokens", "4",
        "--cache_strategy", "full", EVICT, "--max_cache_length", "0.5", "0.25", "--data_dir", str(E.DATA_DIR))
    found = {(m["task"], m["config"]): m for m in map(json.loads, map(Path.read_text, tmp_path.rglob("metrics.json")))}
    text = E.report(tmp_path, tmp_path / "plots")
    table = text.splitlines()[:text.splitlines().index("", 2)]  # "### tiny", "", header, rule, rows
    header = [c.strip() for c in table[2].strip("|").split("|")]
    assert header[:2] == ["task", "metric"] and header[2] == "full"
    seen = 0
    for line in table[4:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for conf, cell in zip(header[2:], cells[2:]):
            if (cells[0], conf) in found:
                m = found[cells[0], conf]
                assert cell == f"{m['score']:.2f} ± {m['score_stderr']:.2f}"  # n = 2: a standard error
                seen += 1
    assert seen == len(found) >= 5
    assert (tmp_path / "plots/pareto-tiny-passkey-450.png").exists()


def test_rerun_with_another_config_is_refused(tiny, tmp_path):
    common = ["--tasks", "passkey", "--num_samples", "2", "--context_length", "450", "--max_new_tokens", "4"]
    run(tiny, tmp_path, *common)
    with pytest.raises(gen.UserError, match="another configuration"):
        run(tiny, tmp_path, *common, "--seed", "1")
    run(tiny, tmp_path, *common, "--seed", "1", "--overwrite")
    assert json.loads((tmp_path / "tiny/passkey-450/full/config.json").read_text())["seed"] == 1


def test_absent_data_is_one_line(tiny, tmp_path, capsys):
    run(tiny, tmp_path, "--tasks", "longbench_qasper", "passkey", "--num_samples", "1", "--context_length", "450",
        "--max_new_tokens", "2", "--data_dir", str(tmp_path))
    err = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.startswith("skip")]
    assert len(err) == 1 and err[0].startswith("skip longbench_qasper: no data at")
    assert (tmp_path / "tiny/passkey-450/full/metrics.json").exists()
    with pytest.raises(gen.UserError, match="no task could run"):
        run(tiny, tmp_path, "--tasks", "medqa", "--data_dir", str(tmp_path))
