"""The eval runner on CPU with the tiny model: sweeps, every task kind, fair budgets, resuming after a
failure or a SIGKILL, two torchrun ranks against one process, and the report against metrics.json."""
import argparse
import base64
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cache as kv
import eval as E
import generate as gen
import tasks as T
from model import ModelArgs, Transformer
from test_tasks import ByteTok
from conftest import needs_data

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
    threads = [] if "--threads" in argv else ["--threads", "1"]  # as the fixture: a default could spin idle cores
    E.main(["--results_dir", str(out), "--checkpoint_path", "tiny", "--device", "cpu", *threads, *argv],
           loaded=(model, tok or ByteTok()))


def rows(path: Path, drop=TIMING):
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


def metrics(path: Path):
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING}


def names(*argv) -> list[str]:
    """The configuration folders eval.py makes for these flags (readable name + settings hash)."""
    return list(E.parse_configs(["--device", "cpu", *argv]))


HASHED = r"-[0-9a-f]{6}"


# ---------------------------------------------------------------- sweeps
@needs_evict
def test_sweep_expansion_and_yaml_configs(tmp_path):
    found = names("--cache_strategy", "full", EVICT, "--max_cache_length", "0.5", "0.25")
    assert len(found) == 3  # full ignores the budget: one run
    for name, readable in zip(found, ["full", f"{EVICT}-0.5", f"{EVICT}-0.25"]):
        assert re.fullmatch(re.escape(readable) + HASHED, name)
    (name, (cfg, _)), = E.parse_configs(["--cache_strategy", EVICT, "--max_cache_length", "0.5,0.25"]).items()
    assert cfg.max_cache_length == ["0.5", "0.25"]  # a comma list is one per-layer budget, not a sweep
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"cache_strategy: {EVICT}\nmax_cache_length: 0.3\nrecent_window: 20\n")
    b.write_text(f"cache_strategy: {EVICT}\nmax_cache_length: 0.2\n")
    confs = list(E.parse_configs(["--cache_config", str(a), str(b)]).values())
    assert [c.max_cache_length for c, _ in confs] == [["0.3"], ["0.2"]]
    assert [c.recent_window for c, _ in confs] == [20, None]  # a's YAML does not leak into b's run (None: the paper's)
    (cfg, args), = E.parse_configs(["--cache_config", str(a), "--max_cache_length", "0.1", "--query_aware"]).values()
    assert cfg.max_cache_length == ["0.1"] and cfg.recent_window == 20  # the command line wins
    assert re.fullmatch(re.escape(f"{EVICT}-0.1-recent_window=20-qa") + HASHED, E.config_name(cfg, args))


# ---------------------------------------------------------------- every kind of task
@needs_evict
def test_every_task_kind_runs_and_records(tiny, tmp_path, data, capsys):
    sweep = ["--max_new_tokens", "4", "--cache_strategy", "full", EVICT, "--max_cache_length", "0.5"]
    run(tiny, tmp_path, "--data_dir", str(data), "--tasks", "passkey", "medqa_mc", "ppl", "fidelity",
        "--num_samples", "2", "--context_length", "450", "--ppl_prefill", "350",
        "--ppl_bin", "50", "--fidelity_task", "passkey", "--fidelity_tokens", "4", *sweep)
    res, (full, ev) = tmp_path / "tiny", names(*sweep)
    finish = capsys.readouterr().out.splitlines()
    tags = ("passkey-450", "medqa_mc", "ppl-pg19-450-p350-bin50", "fidelity-passkey-450-4")
    for task in tags:
        for conf in (full, ev):
            d = res / task / conf
            m, cfg = json.loads((d / "metrics.json").read_text()), json.loads((d / "config.json").read_text())
            assert m["n"] == 2 and len(rows(d / "predictions.jsonl")) == 2
            assert cfg["cache"]["strategy"] == conf.split("-")[0] and cfg["query_aware"] is False
            if conf == full:
                assert m["compression_ratio"] == 0.0
            else:  # protocol context: half the context (ppl: the prefill) kept, the rest appended
                assert 0.05 < m["compression_ratio"] < 0.5
            se = f" ± {m['score_stderr']:.2f}" if m["score_stderr"] is not None else ""
            assert f"{task} {conf}: {m['metric']} {m['score']:.2f}{se}" in "\n".join(finish)
    # the finish: one line per task and configuration, with n and the results folder
    assert len(finish) == 8 and all(re.fullmatch(rf"(\S+) (\S+): .* \(n=2\) -> {res}/\1/\2", ln) for ln in finish)
    assert len(rows(res / "medqa_mc" / full / "predictions.jsonl")[0]["option_loglik"]) == 4
    assert (res / tags[2] / full / "curve.png").exists()
    ppl = json.loads((res / tags[2] / full / "metrics.json").read_text())
    assert [p for p, _ in ppl["curve"]] == [0, 50, 100, 150, 200, 250, 300, 350, 400]  # bins of --ppl_bin
    E.report(tmp_path, tmp_path / "plots")
    assert (tmp_path / f"plots/curve-tiny-{tags[2]}.png").exists()  # one line per configuration
    got = {(t, c): json.loads((res / t / c / "metrics.json").read_text()) for t in tags for c in (full, ev)}
    vs = {t: got[t, ev]["vs_full"] for t in tags}  # the full cache ran first: metrics.json compares with it
    assert all(v["n"] == 2 for v in vs.values()) and {vs[t]["reference"] for t in tags[:3]} == {full}
    assert "mcnemar" in vs[tags[0]] and "vs_full" not in got[tags[0], full]
    assert vs[tags[2]]["mean"] == pytest.approx(got[tags[2], ev]["nll"] - got[tags[2], full]["nll"])  # NLL, nats
    assert vs[tags[3]]["reference"].startswith("built in")  # fidelity: the KL is already against the full cache
    assert vs[tags[3]]["mean"] == pytest.approx(got[tags[3], ev]["kl"])
    full = json.loads((res / tags[3] / full / "metrics.json").read_text())
    assert full["score"] == 100.0 and abs(full["kl"]) < 1e-4  # the full cache against itself


@needs_evict
def test_fidelity_shares_one_full_run_per_sample(tiny, tmp_path, data):
    """Configurations of one call share the full cache's run of each sample (the full cache against it:
    KL 0 on every sample), and each gets the KL and agreement it gets alone."""
    task = ["--data_dir", str(data), "--tasks", "fidelity", "--fidelity_task", "passkey", "--fidelity_tokens", "4",
            "--num_samples", "3", "--context_length", "450", "--max_cache_length"]
    run(tiny, tmp_path / "all", *task, "0.5", "0.25", "--cache_strategy", EVICT, "full")
    run(tiny, tmp_path / "alone", *task, "0.25", "--cache_strategy", EVICT)
    got = lambda d, *flags: rows(tmp_path / d / "tiny/fidelity-passkey-450-4" / names(*flags)[0] / "predictions.jsonl")  # noqa: E731
    assert all(r["kl"] == 0.0 and r["score"] == 1.0 for r in got("all", "--cache_strategy", "full"))  # its own run, exactly
    evict = ["--cache_strategy", EVICT, "--max_cache_length", "0.25"]
    assert got("all", *evict) == got("alone", *evict) and all(r["kl"] > 0 for r in got("all", *evict))


BATCHED = ("full", "streamingllm", "l2", "lsh", "h2o", "tova", "scissorhands", "quest", "lsh_retrieval")


@pytest.mark.parametrize("protocol", ["context", "stream"])
def test_batched_ppl_matches_one_window_at_a_time(tiny, tmp_path, protocol):
    """--batch_size runs ppl's windows together; each row's caches evict on their own, so every window's
    NLL, curve and cache bytes are the ones it gets alone (a row mixed into another would move them).
    stream: the 60 tokens after the prefill are prompt, evicted as they come (half of all 150 kept);
    context: the 120-token prefill is compressed once and the rest appended (60 + 30 of 150 kept)."""
    d = tmp_path / "data/wikitext2_raw"
    d.mkdir(parents=True)
    words = [f"w{(7 * i * i + 3 * i) % 97} " for i in range(900)]  # a varied byte stream: windows differ
    (d / "wiki.test.raw").write_text("".join(words), encoding="utf-8")
    common = ["--data_dir", str(tmp_path / "data"), "--tasks", "ppl", "--ppl_corpus", "wikitext2", "--num_samples", "4",
              "--context_length", "150", "--ppl_prefill", prefill := {"stream": "90", "context": "120"}[protocol],
              "--ppl_bin", "50", "--max_cache_length", "0.5", "--spotlight_prune", "0.5", "--protocol", protocol,
              "--cache_strategy", *BATCHED, *(["snapkv", "pyramid"] if protocol == "context" else [])]  # prefill-only:
    # the context protocol only (under stream the forced tokens overflow their budget)
    run(tiny, tmp_path / "one", *common)
    run(tiny, tmp_path / "batched", *common, "--batch_size", "3")  # a batch of 3, then 1
    for name in names(*common):
        one, batched = (rows(tmp_path / r / f"tiny/ppl-wikitext2-150-p{prefill}-bin50" / name / "predictions.jsonl")
                        for r in ("one", "batched"))
        assert [r["id"] for r in one] == [r["id"] for r in batched] and len(one) == 4
        assert len({round(r["score"], 6) for r in one}) == 4, name  # distinct windows
        for a, b in zip(one, batched):
            assert b["score"] == pytest.approx(a["score"], abs=1e-4), name
            assert [v for _, v in b["nll_bins"]] == pytest.approx([v for _, v in a["nll_bins"]], abs=1e-4), name
            assert b["cache_bytes"] == a["cache_bytes"] and b["compression_ratio"] == pytest.approx(a["compression_ratio"])
        cls = kv.REGISTRY[name.split("-")[0]]
        if cls.evicts or cls.prefill_only:
            kept = 0.5 if protocol == "stream" else (60 + 30) / 150
            assert one[0]["compression_ratio"] == pytest.approx(1 - kept, abs=0.03), name


@pytest.mark.parametrize("task", ["passkey", "fidelity"])
@pytest.mark.parametrize("mode", [[], ["--protocol", "stream"], ["--query_aware"]], ids=["context", "stream", "qa"])
def test_batched_generation_gives_each_sample_its_own_answer(tiny, tmp_path, mode, task, monkeypatch):
    """--batch_size left-pads samples of one question length into a batch: each keeps its own budget,
    caches and evictions, so its answer, score (fidelity: KL and agreement with the full cache's answer)
    and cache bytes are the ones it gets alone."""
    make = T.Passkey.make  # passkey prompts of different lengths (the task fits them all to one)
    monkeypatch.setattr(T.Passkey, "make", lambda self, tok, i: dataclasses.replace(
        make(self, tok, i), context=make(self, tok, i).context[:-1 - 13 * i]))
    common = ["--tasks", task, "--fidelity_task", "passkey", "--fidelity_tokens", "5", "--num_samples", "6",
              "--context_length", "450", "--max_new_tokens", "6", "--max_cache_length", "0.5", "--spotlight_prune",
              "0.5", *mode, "--cache_strategy", *[s for s in BATCHED if not kv.REGISTRY[s].prefill_only], "snapkv",
              "pyramid"]
    tag = {"passkey": "passkey-450", "fidelity": "fidelity-passkey-450-5"}[task]
    run(tiny, tmp_path / "one", *common)
    sizes, generate = [], gen.generate
    monkeypatch.setattr(gen, "generate", lambda model, prompts, *a, **k: sizes.append(len(prompts)) or generate(
        model, prompts, *a, **k))
    run(tiny, tmp_path / "batched", *common, "--batch_size", "4")
    assert max(sizes) == 4  # batches did run
    for name in names(*common):
        one, batched = (rows(tmp_path / r / "tiny" / tag / name / "predictions.jsonl") for r in ("one", "batched"))
        assert len({r["n_context"] for r in one}) > 1  # prompts of different lengths: padding is exercised
        assert sorted(r["id"] for r in one) == sorted(r["id"] for r in batched)
        by_id = {r["id"]: r for r in batched}
        for a in one:
            b = by_id[a["id"]]
            same = ("prediction", "score", "n_new", "cache_bytes", "n_prompt")
            assert [b.get(k) for k in same] == [a.get(k) for k in same], name
            assert b["compression_ratio"] == pytest.approx(a["compression_ratio"], abs=0.02), name
            if task == "fidelity":
                assert (b["prefix_match"], b["reference"]) == (a["prefix_match"], a["reference"]), name
                assert b["kl"] == pytest.approx(a["kl"], abs=1e-4), name
        cls = kv.REGISTRY[name.split("-")[0]]
        assert task == "passkey" or not (cls.evicts or cls.prefill_only) or any(r["kl"] > 0 for r in one), name


@needs_evict
def test_each_sample_budget_comes_from_its_own_length(tiny, tmp_path, data):
    conf = ["--max_new_tokens", "4", "--cache_strategy", EVICT, "--max_cache_length", "0.5", "--protocol", "stream"]
    run(tiny, tmp_path, "--data_dir", str(data), "--tasks", "medqa", *conf)
    short, long = rows(tmp_path / "tiny/medqa" / names(*conf)[0] / "predictions.jsonl")
    assert short["n_prompt"] < long["n_prompt"] and short["cache_bytes"] < long["cache_bytes"]
    for r in (short, long):  # measured, so a cache sized from the longest sample would show here: half
        seen = r["n_prompt"] + r["n_new"] - 1  # its own prompt kept, never counting the generated tokens
        assert r["compression_ratio"] == pytest.approx(1 - math.ceil(0.5 * r["n_prompt"]) / seen, abs=0.01)


@needs_evict
def test_compiled_eval_matches_eager_and_compiles_once_per_config(tiny, tmp_path, data, capsys):
    """--compile: the same predictions as eager; with a token budget, prompts of different lengths share
    one graph per configuration (full caches are allocated in ALLOC_STEP buckets, eviction buffers at
    the budget), the question tokens fed by decode steps included; with a fractional budget (each prompt
    its own sizes) one graph too, its slot counts symbolic; a quantized store still compiles per size."""
    from torch._dynamo.utils import counters
    common = ["--data_dir", str(data), "--tasks", "medqa", "medqa_mc", "passkey", "--num_samples", "2", "--context_length", "450",
              "--max_new_tokens", "5", "--cache_strategy", "full", EVICT, "--max_cache_length", "100"]
    run(tiny, tmp_path / "eager", *common)
    before = counters["stats"]["unique_graphs"]
    run(tiny, tmp_path / "compiled", *common, "--compile")
    assert counters["stats"]["unique_graphs"] - before == 2  # 5 prompt lengths x 2 configs: 2 graphs
    lengths = set()
    for task in ("medqa", "medqa_mc", "passkey-450"):
        for conf in names(*common[8:]):
            eager, compiled = (rows(tmp_path / d / f"tiny/{task}/{conf}/predictions.jsonl") for d in ("eager", "compiled"))
            assert [r["prediction"] for r in eager] == [r["prediction"] for r in compiled]
            if task == "medqa_mc":  # options teacher-forced by compiled steps vs Transformer.feed
                for a, b in zip(eager, compiled):
                    assert a["option_loglik"] == pytest.approx(b["option_loglik"], abs=1e-4)
            lengths |= {r["n_prompt"] for r in eager}
    assert len(lengths) == 5  # medqa 2, medqa_mc 2 (the options come after), passkey 1
    # a fractional budget: each prompt length its own cache sizes, slot counts symbolic, still one graph
    frac = ["--data_dir", str(data), "--tasks", "medqa", "--num_samples", "2", "--max_new_tokens", "3",
            "--cache_strategy", EVICT, "--max_cache_length", "0.5"]
    run(tiny, tmp_path / "frac_eager", *frac)
    before = counters["stats"]["unique_graphs"]
    run(tiny, tmp_path / "frac", *frac, "--compile")
    assert counters["stats"]["unique_graphs"] - before == 1
    eager, compiled = ([rows(p)[i]["prediction"] for i in range(2)] for p in
                       (next((tmp_path / d).rglob("predictions.jsonl")) for d in ("frac_eager", "frac")))
    assert compiled == eager and len({r["n_prompt"] for r in rows(next((tmp_path / "frac").rglob("predictions.jsonl")))}) == 2
    run(tiny, tmp_path / "frac4", "--tasks", "passkey", "--num_samples", "1", "--context_length", "450", "--max_new_tokens",
        "2", "--cache_strategy", EVICT, "--max_cache_length", "0.5", "--kv_bits", "4", "--kv_group", "8", "--kv_residual",
        "16", "--compile")
    assert re.search(f"a fractional budget over a quantized cache recompiles the decode step for every prompt length "
                     f"\\({EVICT}-0.5-.*{HASHED}\\)", capsys.readouterr().err)


# ---------------------------------------------------------------- resuming
@needs_evict
def test_rerun_after_a_failure_and_a_torn_line_matches_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    args = ["--tasks", "passkey", "--num_samples", "6", "--context_length", "450", "--max_new_tokens", "4",
            "--cache_strategy", EVICT, "--max_cache_length", "0.5"]
    run(tiny, tmp_path / "a", *args)
    conf = names(*args)[0]
    reference = rows(tmp_path / "a/tiny/passkey-450" / conf / "predictions.jsonl")

    real, calls = E.RUNNERS["generate"], []

    def flaky(*a):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return real(*a)
    monkeypatch.setitem(E.RUNNERS, "generate", flaky)
    with pytest.raises(RuntimeError):
        run(tiny, tmp_path / "b", *args)
    pred = tmp_path / "b/tiny/passkey-450" / conf / "predictions.jsonl"
    assert len(rows(pred)) == 3 and not (pred.parent / "metrics.json").exists()
    with open(pred, "ab") as f:  # a process killed in the middle of a write
        f.write(b'{"id": "3", "predic')
    calls.clear()
    run(tiny, tmp_path / "b", *args)
    assert len(calls) == 3  # the 3 finished samples were skipped
    assert rows(pred) == reference


@needs_evict
def test_rows_record_the_commit_that_made_them(tiny, tmp_path, monkeypatch):
    """A folder extended by a second run under other code: each row names its commit, metrics.json all of them;
    code_version is this checkout's HEAD (with "+dirty" when tracked files differ)."""
    args = ["--tasks", "passkey", "--context_length", "450", "--max_new_tokens", "4", "--cache_strategy", EVICT,
            "--max_cache_length", "0.5"]
    for code, n in (("c0ffee", "2"), ("beef00", "4")):
        monkeypatch.setattr(E, "code_version", lambda code=code: code)
        run(tiny, tmp_path, *args, "--num_samples", n)
    folder = tmp_path / "tiny/passkey-450" / names(*args)[0]
    assert [r["code"] for r in rows(folder / "predictions.jsonl")] == ["c0ffee"] * 2 + ["beef00"] * 2
    assert metrics(folder / "metrics.json")["code"] == ["beef00", "c0ffee"]
    monkeypatch.undo()
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert E.code_version().split("+")[0] == (head.stdout.strip() if head.returncode == 0 else "unknown")


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


def cli(*argv, cwd=ROOT, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_sigkilled_run_resumes_without_loss_or_duplicates(tiny, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny)
    args = ["--checkpoint_path", str(ckpt), "--device", "cpu", "--tasks", "passkey", "--num_samples", "30",
            "--context_length", "450", "--max_new_tokens", "24"]
    E.main(["--results_dir", str(tmp_path / "a"), *args], loaded=gen.load(ckpt, "cpu", torch.float32))
    reference = rows(tmp_path / "a/ckpt/passkey-450" / names(*args)[0] / "predictions.jsonl")
    pred = tmp_path / "b/ckpt/passkey-450" / names(*args)[0] / "predictions.jsonl"
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
    for conf in names(*args):
        one, two = tmp_path / "one/ckpt/passkey-450" / conf, tmp_path / "two/ckpt/passkey-450" / conf
        drop = {"run"}
        assert {k: v for k, v in metrics(one / "metrics.json").items() if k not in drop} == \
            {k: v for k, v in metrics(two / "metrics.json").items() if k not in drop}
        assert rows(one / "predictions.jsonl") == rows(two / "predictions.jsonl")
        assert not list(two.glob("predictions.rank*"))  # rank 0 merged the shards


# ---------------------------------------------------------------- report, refusals, absent data
@needs_data("paul_graham_essays")
@needs_evict
def test_report_table_matches_metrics(tiny, tmp_path):
    run(tiny, tmp_path, "--tasks", "passkey", "niah", "--num_samples", "2", "--context_length", "450",
        "--niah_lengths", "450", "--niah_depths", "0", "100", "--max_new_tokens", "4",
        "--cache_strategy", "full", EVICT, "--max_cache_length", "0.5", "0.25")
    found = {(m["task"], m["config"]): m for m in map(json.loads, map(Path.read_text, tmp_path.rglob("metrics.json")))}
    text = E.report(tmp_path, tmp_path / "plots")
    table = text.splitlines()[:text.splitlines().index("", 2)]  # "### tiny", "", header, rule, rows
    header = [c.strip() for c in table[2].strip("|").split("|")]
    assert header[:2] == ["task", "metric"] and header[2].startswith("full-")
    seen = 0
    for line in table[4:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for conf, cell in zip(header[2:], cells[2:]):
            if (cells[0], conf) in found:
                m = found[cells[0], conf]
                assert cell == f"{m['score']:.2f} ± {m['score_stderr']:.2f} (n={m['n']})"  # n = 2: a standard error
                seen += 1
    assert seen == len(found) >= 5
    assert (tmp_path / "plots/pareto-tiny-passkey-450.png").exists()


@needs_evict
def test_metrics_json_gets_the_paired_comparison_once_the_full_cache_is_there(tiny, tmp_path):
    """Written when a configuration finishes after the full cache (a rerun adds it without recomputing a
    sample); the same numbers as --report, which always recomputes them from predictions.jsonl."""
    sweep = ["--tasks", "passkey", "--num_samples", "3", "--context_length", "450", "--max_new_tokens", "3",
             "--max_cache_length", "0.25", "--bootstrap_samples", "500", "--cache_strategy", EVICT, "full"]
    run(tiny, tmp_path, *sweep)
    ev, full = (tmp_path / "tiny/passkey-450" / n for n in names(*sweep))
    assert "vs_full" not in json.loads((ev / "metrics.json").read_text())  # the full cache ran after it
    before = (ev / "predictions.jsonl").read_text()
    run(tiny, tmp_path, *sweep)
    assert (ev / "predictions.jsonl").read_text() == before
    m = json.loads((ev / "metrics.json").read_text())
    v = m["vs_full"]
    assert v["reference"] == full.name and v["n"] == 3 and v["unpaired"] == 0
    ours, theirs = (rows(d / "predictions.jsonl") for d in (ev, full))
    assert v["mean"] == pytest.approx(100 * sum(a["score"] - b["score"] for a, b in zip(ours, theirs)) / 3)
    assert v["bootstrap"]["resamples"] == 500 and set(v["mcnemar"]) == {"full_only", "this_only", "p"}
    assert E.compare_with_full(ev, m, E.finished_rows(ev), 500) == v


def test_the_full_cache_reference_is_the_one_of_the_same_protocol(tiny, tmp_path):
    """Full-cache runs of both protocols beside an h2o run (whose sinks and window are its paper's, not the
    full cache's): the paired reference is the full run of h2o's protocol, never 'several match'."""
    common = ["--tasks", "passkey", "--num_samples", "2", "--context_length", "450", "--max_new_tokens", "3"]
    for protocol in ("context", "stream"):
        run(tiny, tmp_path, *common, "--protocol", protocol, "--cache_strategy", "full")
    h2o = ["--protocol", "stream", "--cache_strategy", "h2o", "--max_cache_length", "0.5"]
    run(tiny, tmp_path, *common, *h2o)
    folder = tmp_path / "tiny/passkey-450"
    ref, why = E.full_reference(folder / names(*common, *h2o)[0])
    assert ref == folder / names(*common, "--protocol", "stream")[0], why


def test_rerun_into_a_folder_of_another_config_is_refused(tiny, tmp_path):
    """A folder whose config.json differs (written before names had a hash, or edited) is never mixed."""
    common = ["--tasks", "passkey", "--num_samples", "2", "--context_length", "450", "--max_new_tokens", "4"]
    run(tiny, tmp_path, *common)
    path = tmp_path / "tiny/passkey-450" / names(*common)[0] / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "seed": 7}))
    with pytest.raises(gen.UserError, match=r"another configuration \(differs in seed\)"):
        run(tiny, tmp_path, *common)
    run(tiny, tmp_path, *common, "--overwrite")
    assert json.loads(path.read_text())["seed"] == 0


def test_absent_data_is_one_line(tiny, tmp_path, capsys):
    run(tiny, tmp_path, "--tasks", "longbench_qasper", "passkey", "--num_samples", "1", "--context_length", "450",
        "--max_new_tokens", "2", "--data_dir", str(tmp_path))
    err = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.startswith("skip")]
    assert len(err) == 1 and err[0].startswith(f"skip longbench_qasper: no longbench/qasper.jsonl in {tmp_path}; "
                                               "fetch it with: python scripts/prepare_data.py --only longbench")
    assert len(list(tmp_path.glob("tiny/passkey-450/full-*/metrics.json"))) == 1
    with pytest.raises(gen.UserError, match="no task could run"):
        run(tiny, tmp_path, "--tasks", "medqa", "--data_dir", str(tmp_path))


# ---------------------------------------------------------------- a researcher's first hour (#14)
needs_random = pytest.mark.skipif("random" not in kv.REGISTRY, reason="no random strategy registered")


@needs_random
def test_config_names_differ_in_every_setting_that_changes_results(tmp_path):
    base = ["--cache_strategy", "random", "--max_cache_length", "0.5"]
    (name,) = names(*base)
    assert names(*base) == [name] and re.fullmatch(r"random-0\.5" + HASHED, name)  # the same flags, the same name
    yaml = tmp_path / "r.yaml"
    yaml.write_text("cache_strategy: random\nmax_cache_length: 0.5\n")
    assert names("--cache_config", str(yaml)) == [name]  # however the settings were given
    variants = [["--seed", "1"], ["--max_new_tokens", "8"], ["--dtype", "bfloat16"], ["--no_chat"], ["--query_aware"],
                ["--recent_window", "20"], ["--global_tokens", "2"], ["--random_seed", "1"],
                ["--prompt_compression", "h2o"], ["--budget_pattern", "pyramid"], ["--max_cache_length", "0.25"]]
    found = [names(*base, *v)[0] for v in variants]
    assert len(set(found) | {name}) == len(variants) + 1, found
    assert found[2] == "random-0.5-" + found[2][-6:]  # dtype is not in the readable part: the hash tells them apart
    assert names(*base, "--num_samples", "7", "--threads", "1", "--compile") == [name]  # how many and how: same folder


def scripted_step(script: bytes, calls: list):
    """A decode step that writes `script` one byte per call (logits one-hot on the next byte)."""
    def step(tok, ip):
        calls.append(int(ip))
        return torch.nn.functional.one_hot(torch.tensor([[script[len(calls)]]]), 256).float()
    return step


def test_decode_stops_at_a_stop_string_without_generating_on():
    script, calls = b"  abc Question: and then many more tokens " * 4, []
    ctx = E.Ctx(None, ByteTok(), None, "cpu", torch.float32, step=scripted_step(script, calls))
    first = torch.nn.functional.one_hot(torch.tensor([script[0]]), 256).float()
    stop = lambda text: T.cut_at_stop(text, ["Question:"])  # noqa: E731
    ids, text, n_out, steps, _ = E.decode(ctx, first, torch.tensor([100]), 128, stop)
    assert text == "  abc " and bytes(ids) == script[:n_out]
    end = script.index(b"Question:") + len("Question:")
    assert end <= n_out < end + E.STOP_EVERY and len(calls) == n_out - 1  # not the 128 tokens
    assert calls == list(range(100, 100 + len(calls)))  # one position per step
    calls.clear()
    ids, text, n_out, _, _ = E.decode(ctx, first, torch.tensor([0]), 128, lambda t: (t, False))
    assert n_out == 128 and text == script[:128].decode()  # without a stop: every token


@needs_evict
def test_decode_gives_generate_generate_tokens(tiny):
    """eval's decode loop (which can stop at text) takes the same steps as generate.generate."""
    ctx = E.Ctx(tiny, ByteTok(), argparse.Namespace(query_aware=False, no_chat=True), "cpu", torch.float32)
    prompt = list(range(40, 140)) * 2
    for strategy in ("full", EVICT):
        cfg = kv.CacheConfig(strategy=strategy, max_cache_length=["0.5"])
        want = gen.generate(tiny, [prompt[:150]], 30, cfg, suffixes=[prompt[150:]]).tokens[0]
        _, last, ip, _, _ = E.start(ctx, cfg, prompt[:150], prompt[150:], 30)
        ids, _, n_out, _, _ = E.decode(ctx, last, ip, 30, lambda t: (t, False))
        assert ids == want and n_out == 30


def test_a_run_stops_each_answer_at_the_task_stop(tiny, tmp_path, monkeypatch):
    args = ["--tasks", "passkey", "--num_samples", "3", "--context_length", "450", "--max_new_tokens", "24"]
    monkeypatch.setattr(T.Passkey, "stop", ())
    run(tiny, tmp_path / "a", *args)
    free = rows(tmp_path / "a/tiny/passkey-450" / names(*args)[0] / "predictions.jsonl")
    assert all(r["n_new"] == 24 for r in free)  # the tiny model has no stop id: 24 tokens each
    body = free[0]["prediction"].lstrip()
    stop = body[3]  # a character the first answer writes early
    monkeypatch.setattr(T.Passkey, "stop", (stop,))
    run(tiny, tmp_path / "b", *args)
    cut = rows(tmp_path / "b/tiny/passkey-450" / names(*args)[0] / "predictions.jsonl")
    assert [r["prediction"] for r in cut] == [T.cut_at_stop(r["prediction"], [stop])[0] for r in free]
    assert len(free[0]["prediction"]) - len(body) + 3 < cut[0]["n_new"] < 3 + 8 + E.STOP_EVERY < 24


def test_default_num_samples_is_said_and_all_extends_the_same_folder(tiny, tmp_path, data, capsys, monkeypatch):
    monkeypatch.setattr(T.MedQA, "default_samples", 1)
    args = ["--data_dir", str(data), "--tasks", "medqa", "--max_new_tokens", "2"]
    run(tiny, tmp_path, *args)
    err = capsys.readouterr().err
    assert "medqa: 1 of 2 samples (the default; --num_samples all runs all 2)" in err
    pred = tmp_path / "tiny/medqa" / names(*args)[0] / "predictions.jsonl"
    assert len(rows(pred)) == 1
    run(tiny, tmp_path, *args, "--num_samples", "all")
    err = capsys.readouterr().err
    frames = [ln for ln in err.replace("\r", "\n").splitlines() if "/2 [" in ln]
    assert "medqa: all 2 samples" in err and "| 1/2 [" in frames[0]  # the bar starts at the saved sample
    assert len(rows(pred)) == 2


def test_threads_go_through_generate_set_threads(tiny, tmp_path, monkeypatch):
    args = ["--tasks", "passkey", "--num_samples", "1", "--context_length", "450", "--max_new_tokens", "2"]
    asked = []
    monkeypatch.setattr(gen, "set_threads", asked.append)
    run(tiny, tmp_path, *args, "--threads", "3")
    E.main(["--results_dir", str(tmp_path), "--checkpoint_path", "tiny", "--device", "cpu", *args],
           loaded=(tiny, ByteTok()))
    assert asked == [3, None]  # None: generate's default, one thread per idle core


def test_paths_are_relative_to_the_repository_not_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert E.checkpoint_path("tests/conftest.py") == str(ROOT / "tests/conftest.py")
    assert E.cache_config_file("cache_configs/h2o.yaml") == ROOT / "cache_configs/h2o.yaml"
    assert E.cache_config_file("h2o") == ROOT / "cache_configs/h2o.yaml"
    (tmp_path / "cache_configs").mkdir()
    (tmp_path / "cache_configs/h2o.yaml").write_text("cache_strategy: full\n")
    assert E.cache_config_file("cache_configs/h2o.yaml") == tmp_path / "cache_configs/h2o.yaml"  # a local file wins
    assert all(r.is_absolute() for r in T.data_roots(None))


def test_report_shows_n_and_refuses_one_name_with_two_settings(tiny, tmp_path, capsys):
    args = ["--tasks", "passkey", "--context_length", "450", "--max_new_tokens", "2"]
    run(tiny, tmp_path / "a", *args, "--num_samples", "2")
    run(tiny, tmp_path / "b", *args, "--num_samples", "3")
    (name,) = names(*args)
    capsys.readouterr()
    table = E.report(tmp_path, tmp_path / "plots")
    err = capsys.readouterr().err
    a, b = (tmp_path / d / "tiny/passkey-450" / name for d in "ab")
    assert f"warning: {a} and {b} hold the same configuration; the report shows {b} (n=3)" in err
    assert re.search(r"\| passkey-450 \| accuracy \| \d+\.\d\d ± \d+\.\d\d \(n=3\) \|", table)
    config = b / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "seed": 7}))  # another setting, one name
    with pytest.raises(gen.UserError, match=f"{re.escape(str(a))} and {re.escape(str(b))} both hold passkey-450 "
                                            f"{name} with different settings \\(seed\\)"):
        E.report(tmp_path, tmp_path / "plots")


def test_pareto_lines_have_error_bars_and_stay_apart():
    m = lambda series, ratio, score, se: {"strategy": series.split("-")[0], "series": series,  # noqa: E731
                                          "compression_ratio": ratio, "score": score, "score_stderr": se}
    ms = [m("full", 0.0, 50, 5), m("h2o", 0.5, 40, 4), m("h2o", 0.25, 45, 3), m("l2", 0.5, 40, 4), m("l2", 0.25, 45, 3)]
    full, h2o, l2 = E.pareto_series(ms, "score")
    assert full["marker"] == "*" and len({full["marker"], h2o["marker"], l2["marker"]}) == 3
    assert h2o["y"] == l2["y"] == [45, 40] and h2o["yerr"] == l2["yerr"] == [3, 4]
    assert h2o["x"][0] != l2["x"][0] and abs(h2o["x"][0] - 0.25) < 0.02 and abs(l2["x"][0] - 0.25) < 0.02
    assert [round(b - a, 6) for a, b in zip(h2o["x"], l2["x"])] == [E.SHIFT] * 2
    assert E.pareto_series(ms, "score")[1]["x"] == h2o["x"]  # the same offsets each time


def test_pareto_by_bytes_sees_the_bits():
    """The bytes panel's x is the allocated cache per prompt token, unshifted: a 4-bit full cache (ratio
    0, like the 16-bit one) sits at a quarter-ish of the bytes, left of an eviction at half the tokens."""
    m = lambda series, ratio, nbytes, score: {"strategy": series.split("-")[0], "series": series,  # noqa: E731
                                              "compression_ratio": ratio, "cache_bytes": nbytes, "n_prompt": 1000,
                                              "score": score, "score_stderr": 1.0}
    ms = [m("full", 0.0, 4096000, 50), m("full-kv_bits=4", 0.0, 1228800, 49), m("h2o", 0.5, 2048000, 45)]
    by = {s["label"]: s["x"] for s in E.pareto_series(ms, "score", "bytes")}
    assert by == {"full": [4.0], "full-kv_bits=4": [1.2], "h2o": [2.0]}  # KiB per prompt token
    ratio = {s["label"]: s["x"] for s in E.pareto_series(ms, "score")}
    assert abs(ratio["full"][0] - ratio["full-kv_bits=4"][0]) < 3 * E.SHIFT  # the ratio cannot tell them apart


def test_bad_input_is_one_line(tiny, tmp_path, capsys):
    """Each bad input through eval.py's entry point (gen.cli(main), what `python eval.py` runs): exit status
    2, one line on stderr naming the flag or file and what is allowed, no traceback."""
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny)
    bad_yaml, list_yaml, corrupt, empty = (tmp_path / n for n in ("bad.yaml", "list.yaml", "rep", "empty"))
    bad_yaml.write_text("max_cache_length: [0.5\n")
    list_yaml.write_text("- cache_strategy: full\n")
    (corrupt / "m/t/c").mkdir(parents=True)
    (corrupt / "m/t/c/metrics.json").write_text('{"score": 1')
    empty.mkdir()
    cases = {("--device", "tpu"): "--device tpu: give cpu or cuda (cuda:N)",
             ("--max_cache_length", "abc", "--cache_strategy", EVICT or "full"): "--max_cache_length 'abc' is not a num",
             ("--max_cache_length", "0.5,x", "--cache_strategy", EVICT or "full"): "--max_cache_length 'x' is not a num",
             ("--cache_config", str(bad_yaml)): f"{bad_yaml} is not valid YAML",
             ("--cache_config", str(list_yaml)): f"{list_yaml} must be a YAML mapping of flag: value, not a list",
             ("--cache_config", "nope"): "--cache_config nope: no such file, nor a name in cache_configs/ (h2o,",
             ("--dtype", "int8"): "--dtype int8: give float32, bfloat16 or float16",
             ("--num_samples", "0"): "argument --num_samples: '0': give a number of samples (at least 1) or 'all'",
             ("--num_samples", "-1"): "argument --num_samples: '-1': give a number of samples",
             ("--tasks", "passkey", "gsm8kk"): "--tasks: unknown task 'gsm8kk'; known: gsm8k, gsm8k_mc,",
             ("--tasks", "passkey", "--num_samples", "all"): "--num_samples all: passkey generates its samples",
             ("--report", str(corrupt)): f"{corrupt}/m/t/c/metrics.json is not valid JSON",
             ("--tasks", "medqa", "--data_dir", str(empty)): "no task could run"}
    if not torch.cuda.is_available():
        cases["--device", "cuda"] = "--device cuda: this machine has no CUDA GPU"
    for argv, want in cases.items():
        with pytest.raises(SystemExit) as exit:
            gen.cli(E.main, ["--checkpoint_path", str(ckpt), "--results_dir", str(tmp_path / "r"), "--threads", "1",
                             *argv])
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert exit.value.code == 2 and lines[-1].startswith("error: ") and want in lines[-1], (argv, lines)
        if "--data_dir" in argv:  # the skipped task's line names the file and the command that fetches it
            assert lines[0] == (f"skip medqa: no medqa/test.jsonl in {empty}; fetch it with: "
                                f"python scripts/prepare_data.py --only medqa") and len(lines) == 2, lines
        else:
            assert len(lines) == 1, (argv, lines)


def test_the_cli_from_another_folder(tiny, tmp_path):
    """`python eval.py` run elsewhere: a bad flag is one line and status 2; the data are found beside the
    repository (its data/, then ../shared/data), whatever the current folder; --help shows the task table."""
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny)
    common = [str(ROOT / "eval.py"), "--checkpoint_path", str(ckpt), "--results_dir", str(tmp_path / "r")]
    bad = cli(*common, "--device", "tpu", cwd=tmp_path)
    helped = cli(str(ROOT / "eval.py"), "--help", cwd=tmp_path)
    found = any((root / "gsm8k/test.jsonl").exists() for root in T.DATA_ROOTS)
    good = cli(*common, "--tasks", "gsm8k", "--num_fewshot", "0", "--num_samples", "1", "--max_new_tokens", "2",
               cwd=tmp_path) if found else None
    out, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and err.splitlines() == ["error: --device tpu: give cpu or cuda (cuda:N)"]
    out, _ = helped.communicate(timeout=120)
    assert helped.returncode == 0 and "| gsm8k " in out and '"Question:"' in out  # the task table, with stops
    if good:
        out, err = good.communicate(timeout=120)
        assert good.returncode == 0 and "gsm8k-0shot full-" in out and "(n=1) -> " in out, err
        assert "gsm8k-0shot: 1 of 1319 samples (--num_samples 1; --num_samples all runs all 1319)" in err


def test_ctrl_c_is_one_line_and_a_rerun_resumes_with_the_bar_counting_saved_samples(tiny, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny)
    args = [str(ROOT / "eval.py"), "--checkpoint_path", str(ckpt), "--device", "cpu", "--tasks", "passkey",
            "--num_samples", "30", "--context_length", "450", "--max_new_tokens", "24",
            "--results_dir", str(tmp_path / "r")]
    out_dir = tmp_path / "r/ckpt/passkey-450" / names(*args[1:])[0]
    pred = out_dir / "predictions.jsonl"
    proc = cli(*args)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (not pred.exists() or pred.read_text().count("\n") < 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    saved = len(rows(pred))
    assert proc.returncode == 130 and "Traceback" not in err and 3 <= saved < 30, err
    assert err.splitlines()[-1] == (f"interrupted: {saved} of 30 samples of passkey-450/{out_dir.name} are saved in "
                                    f"{out_dir}; run the same command again to resume")
    out, err = cli(*args).communicate(timeout=120)
    frames = [ln for ln in err.replace("\r", "\n").splitlines() if "/30 [" in ln]
    assert f"| {saved}/30 [" in frames[0]  # the bar starts at the saved samples ...
    assert re.search(r"\| \d+/30 \[\d\d:\d\d<\d\d:\d\d", frames[1])  # ... and shows an ETA
    m = json.loads((out_dir / "metrics.json").read_text())
    assert out.splitlines() == [f"passkey-450 {out_dir.name}: accuracy {m['score']:.2f} ± {m['score_stderr']:.2f} "
                                f"(n=30) -> {out_dir}"]
    assert len(rows(pred)) == 30
