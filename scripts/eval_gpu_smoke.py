"""Smoke test of eval.py's GPU paths with the tiny random model (no checkpoint, no data download):
every task kind eager on the device, --compile against eager, and two torchrun ranks against one process.

    python scripts/eval_gpu_smoke.py            # on a GPU machine (falls back to the CPU without one)

Exits non-zero on the first mismatch. CI covers the same paths on CPU (tests/test_eval.py)."""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import torch  # noqa: E402

import eval as E  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from test_eval import write_checkpoint  # noqa: E402


def predictions(path: Path) -> list:
    return [json.loads(line)["prediction"] for line in path.read_text().splitlines()]


def main():
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    ckpt = write_checkpoint(tmp / "ckpt", Transformer(ModelArgs.from_name("tiny")).eval())
    d = tmp / "data"
    (d / "medqa").mkdir(parents=True)
    recs = [{"question": "A man has a cough. " * k + "Which drug is best?", "answer_idx": "C",
             "options": {"A": "Aspirin", "B": "Beta blocker", "C": "Cough syrup", "D": "Digoxin"}} for k in (1, 4, 2)]
    (d / "medqa/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "pg19_test_gutenberg").mkdir()
    for k in (1, 2):
        (d / f"pg19_test_gutenberg/{k}.txt").write_text("*** START OF X ***\n" + "It was a dark night. " * 30 * k + "\n*** END")
    common = ["--checkpoint_path", str(ckpt), "--data_dir", str(d), "--context_length", "450", "--max_new_tokens", "8",
              "--ppl_prefill", "350", "--fidelity_task", "passkey", "--num_samples", "3"]
    t = time.time()
    E.main(["--results_dir", str(tmp / "eager"), *common, "--tasks", "passkey", "medqa", "medqa_mc", "ppl", "fidelity",
            "--cache_strategy", "full", "streamingllm", "h2o", "--max_cache_length", "200"])
    print(f"eager, every task kind: {time.time() - t:.0f} s", flush=True)
    t = time.time()
    E.main(["--results_dir", str(tmp / "compiled"), *common, "--tasks", "passkey", "medqa", "--compile",
            "--cache_strategy", "full", "h2o", "--max_cache_length", "200"])
    print(f"compiled: {time.time() - t:.0f} s", flush=True)
    ok = True
    names = lambda *sweep: list(E.parse_configs([*common, *sweep]))  # noqa: E731  (names carry a settings hash)
    for task in ("passkey-450", "medqa"):
        for conf in names("--cache_strategy", "full", "h2o", "--max_cache_length", "200"):
            a, b = (predictions(tmp / r / "ckpt" / task / conf / "predictions.jsonl") for r in ("eager", "compiled"))
            print(f"compiled == eager, {task} {conf}: {a == b}")
            ok &= a == b
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "eval.py"), "--results_dir", str(tmp / "ranks"), *common, "--tasks", "passkey",
                        "medqa_mc", "--cache_strategy", "full", "streamingllm", "--max_cache_length", "200"],
                       env=env, capture_output=True, text=True)
    print("torchrun x2 exit code", r.returncode, r.stderr[-2000:] if r.returncode else "")
    ok &= r.returncode == 0
    for task in ("passkey-450", "medqa_mc"):
        for conf in names("--cache_strategy", "full", "streamingllm", "--max_cache_length", "200"):
            one, two = (json.loads((tmp / r / "ckpt" / task / conf / "metrics.json").read_text()) for r in ("eager", "ranks"))
            same = (one["score"], one["compression_ratio"]) == (two["score"], two["compression_ratio"]) and \
                predictions(tmp / "eager/ckpt" / task / conf / "predictions.jsonl") == \
                predictions(tmp / "ranks/ckpt" / task / conf / "predictions.jsonl")
            print(f"one process == two ranks, {task} {conf}: {same} ({one['score']:.2f}, {two['score']:.2f})")
            ok &= same
    print(E.report(tmp / "eager", tmp / "plots"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
