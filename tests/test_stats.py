"""Paired statistics against the full cache (metrics.paired_bootstrap, metrics.mcnemar_exact, eval's
vs_full and the report's Δ and lossless-budget tables), against references written here: an exact
binomial by a direct sum over outcomes, the bootstrap by plain Python on the same draws, a coverage
simulation, and small results trees written by hand."""
import json
import math
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import eval as E
import metrics as M


# ---------------------------------------------------------------- McNemar
def binomial_two_sided(k: int, n: int) -> Fraction:
    """Exact two-sided binomial test at p = 1/2: the probability of every outcome no likelier than k."""
    pmf = [Fraction(math.comb(n, j), 2 ** n) for j in range(n + 1)]
    return sum(q for q in pmf if q <= pmf[k])


@pytest.mark.parametrize("b, c", [(0, 0), (0, 6), (6, 0), (3, 7), (10, 10), (1, 12), (40, 25), (7, 8), (150, 120)])
def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs(b, c):
    assert M.mcnemar_exact(b, c) == pytest.approx(float(binomial_two_sided(b, b + c)), rel=1e-12)
    assert M.mcnemar_exact(b, c) == M.mcnemar_exact(c, b)


def test_mcnemar_known_values():
    assert M.mcnemar_exact(0, 6) == 2 / 64  # the only discordant pairs all one way
    assert M.mcnemar_exact(0, 0) == 1.0 and M.mcnemar_exact(5, 5) == 1.0
    assert M.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)


# ---------------------------------------------------------------- bootstrap
def percentile(sorted_x: list[float], q: float) -> float:
    """Linear interpolation between order statistics (Hyndman & Fan type 7)."""
    h = (len(sorted_x) - 1) * q
    lo = math.floor(h)
    return sorted_x[lo] + (h - lo) * (sorted_x[min(lo + 1, len(sorted_x) - 1)] - sorted_x[lo])


def test_bootstrap_matches_plain_python_resampling_on_the_same_draws():
    diffs = [1.0, 0.0, -1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, -0.25, 0.0, 2.0]
    B, seed = 1234, 7  # not a multiple of the chunk: the last draw is shorter
    rng, means = np.random.default_rng(seed), []
    for start in range(0, B, M.BOOT_CHUNK):
        for idx in rng.integers(0, len(diffs), (min(M.BOOT_CHUNK, B - start), len(diffs))).tolist():
            means.append(sum(diffs[i] for i in idx) / len(idx))
    means.sort()
    mean, lo, hi = M.paired_bootstrap(diffs, B, seed)
    assert mean == pytest.approx(sum(diffs) / len(diffs))
    assert (lo, hi) == pytest.approx((percentile(means, 0.025), percentile(means, 0.975)), abs=1e-12)
    assert M.paired_bootstrap(diffs, B, seed) == (mean, lo, hi)  # deterministic
    assert M.paired_bootstrap(diffs, B, seed + 1) != (mean, lo, hi)


def test_bootstrap_degenerate_and_shifted_data():
    assert M.paired_bootstrap([0.0] * 17) == (0.0, 0.0, 0.0)  # identical runs
    assert M.paired_bootstrap([-2.5] * 9) == pytest.approx((-2.5, -2.5, -2.5), abs=1e-12)  # a constant difference
    d = [0.3, -1.2, 0.8, 2.0, 0.0, -0.4]
    base, shifted = M.paired_bootstrap(d, 2000, 3), M.paired_bootstrap([x + 10 for x in d], 2000, 3)
    assert shifted == pytest.approx(tuple(x + 10 for x in base), abs=1e-9)  # same draws, shifted means
    assert base[1] < base[0] < base[2]


def test_bootstrap_interval_covers_a_normal_mean_about_95_percent():
    rnd, hits, trials = random.Random(0), 0, 300
    for t in range(trials):
        d = [rnd.gauss(1.0, 2.0) for _ in range(40)]
        _, lo, hi = M.paired_bootstrap(d, 1000, t)
        hits += lo <= 1.0 <= hi
    assert 0.89 <= hits / trials <= 0.985  # percentile intervals run a little short at n = 40


# ---------------------------------------------------------------- pairing and the full-cache reference
def acc_metrics(**kw):
    return {"metric": "accuracy", "higher_is_better": True, "strategy": "h2o", **kw}


def test_pairing_is_by_id_with_samples_missing_on_either_side():
    full = [{"id": i, "score": s} for i, s in zip("abcdef", [1, 1, 0, 1, 0, 1])]
    ours = [{"id": i, "score": s} for i, s in zip("fxdcab", [0, 1, 1, 1, 1, 1])]  # x: not in full; e: missing
    v = E.vs_full(acc_metrics(), ours, full, "full-0", 2000)
    # pairs by id: f 0-1, d 1-1, c 1-0, a 1-1, b 1-1 -> differences -100, 0, +100, 0, 0
    assert v["n"] == 5 and v["unpaired"] == 1 and v["mean"] == 0.0
    assert v["mcnemar"] == {"full_only": 1, "this_only": 1, "p": 1.0}
    assert v["difference"] == "this configuration - full cache" and v["lower_is_better"] is False
    assert E.vs_full(acc_metrics(), ours, ours, "self", 100)["ci95"] == [0.0, 0.0]
    assert E.vs_full(acc_metrics(), ours, [{"id": "z", "score": 1}], "full-0", 100)["missing"] == \
        "no sample in common with full-0"


def test_quantities_per_metric_ppl_and_kl():
    rows = lambda key, vals: [{"id": i, key: v} for i, v in enumerate(vals)]  # noqa: E731
    f1 = E.vs_full(acc_metrics(metric="F1"), rows("score", [0.5, 0.25]), rows("score", [0.25, 0.25]), "full", 500)
    assert f1["mean"] == 12.5 and "mcnemar" not in f1 and f1["unit"] == "points"  # shares: no McNemar
    ppl = E.vs_full({"metric": "perplexity", "higher_is_better": False, "strategy": "h2o"},
                    rows("score", [2.01, 3.01]), rows("score", [2.0, 3.0]), "full", 500)
    assert ppl["mean"] == pytest.approx(0.01) and ppl["unit"] == "nats" and ppl["lower_is_better"]
    assert ppl["perplexity_change_pct"]["mean"] == pytest.approx(100 * (math.exp(0.01) - 1))
    kl = E.compare_with_full(Path("/nonexistent"), {"metric": "token agreement", "kl": 0.1, "strategy": "h2o",
                                                    "higher_is_better": True}, rows("kl", [0.1, 0.3]), 500)
    assert kl["mean"] == pytest.approx(0.2) and kl["reference"].startswith("built in") and kl["lower_is_better"]


MODEL = "m"


def write_run(root, task, name, strategy, budget, rows, metric="accuracy", ratio=None, higher=True, **settings):
    """A results folder as eval.py writes one: config.json, predictions.jsonl, metrics.json."""
    d = root / MODEL / task / name
    d.mkdir(parents=True)
    cache = {"strategy": strategy, "max_cache_length": [str(budget)], "global_tokens": 4, "recent_window": 10,
             "prompt_compression": "own", "params": {}, "budget_pattern": "uniform"}
    cache.update(settings.pop("cache", {}))
    cfg = {"model": MODEL, "task": task, "config": name, "series": strategy, "cache": cache, "prompt_rule": "x",
           "query_aware": False, "chat": True, "seed": 0, "dtype": "float32", "max_new_tokens": None,
           "task_settings": {"context_length": 450}, "run": {"num_samples": len(rows)}, **settings}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    key = "kl" if rows and "kl" in rows[0] else "score"
    score = sum(r["score"] for r in rows) / len(rows)
    m = {"model": MODEL, "task": task, "config": name, "series": strategy, "strategy": strategy,
         "max_cache_length": [str(budget)], "metric": metric, "higher_is_better": higher, "n": len(rows),
         "score": math.exp(score) if metric == "perplexity" else 100 * score, "score_stderr": None,
         "compression_ratio": 0.0 if strategy == "full" else ratio if ratio is not None else 1 - float(budget)}
    if key == "kl":
        m["kl"] = sum(r["kl"] for r in rows) / len(rows)
    (d / "metrics.json").write_text(json.dumps(m))
    return d


def acc_rows(scores, ids=None):
    return [{"id": f"s{i}", "score": float(s)} for i, s in zip(ids or range(len(scores)), scores)]


def test_full_reference_matches_every_setting_but_the_cache(tmp_path):
    full = acc_rows([1, 0, 1])
    h2o = write_run(tmp_path, "t", "h2o-0.5-aaa", "h2o", 0.5, full)
    assert E.full_reference(h2o) == (None, "no full-cache run of t with the same settings (chat, dtype, "
                                           "max_new_tokens, model, query_aware, seed, task, task_settings)")
    write_run(tmp_path, "t", "full-seed=1-bbb", "full", 1.0, full, seed=1)  # another seed: never the reference
    write_run(tmp_path, "t", "full-qa-ccc", "full", 1.0, full, query_aware=True)
    assert E.full_reference(h2o)[0] is None
    ref = write_run(tmp_path, "t", "full-ddd", "full", 1.0, full)
    assert E.full_reference(h2o) == (ref, "")
    write_run(tmp_path, "t", "full-global_tokens=8-eee", "full", 1.0, full, cache={"global_tokens": 8})
    assert E.full_reference(h2o) == (ref, "")  # of two, the one whose sinks match too
    write_run(tmp_path, "t", "full-fff", "full", 1.0, full, cache={"params": {"x": 1}})  # only params differ
    assert E.full_reference(h2o) == (None, "several full-cache runs match: full-ddd, full-fff")


# ---------------------------------------------------------------- the report
def table(text: str, title: str) -> list[list[str]]:
    """The rows (header first, rule dropped) of the markdown table under the heading containing `title`."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("### ") and title in ln) + 2
    out = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        out.append([c.strip() for c in ln.strip("|").split("|")])
    return [out[0]] + out[2:]


def flips(base, k, value):
    """base with the first k samples whose score differs from `value` set to it."""
    out, left = list(base), k
    for i, s in enumerate(out):
        if left and s != value:
            out[i], left = value, left - 1
    return out


def l2_scores():
    """passkey at l2 0.5: 3 of full's right answers lost, 4 of its wrong ones won, 30 of 40 samples run."""
    out = [i % 3 != 0 for i in range(40)]
    for i in (1, 2, 4):
        out[i] = False
    for i in (0, 3, 6, 9):
        out[i] = True
    return out[:30]


def results_tree(root):
    """passkey: h2o loses nothing at 0.5, 2 of 40 at 0.25, 12 at 0.1; l2 flips both ways at 0.5; the
    ppl task: h2o +0.1% and +1.5% perplexity, l2 +5%; fidelity: KL only; niah: no full-cache run."""
    base = [i % 3 != 0 for i in range(40)]  # 26 right of 40
    write_run(root, "passkey", "full-f", "full", 1.0, acc_rows(base))
    write_run(root, "passkey", "h2o-0.5-a", "h2o", 0.5, acc_rows(base))
    write_run(root, "passkey", "h2o-0.25-b", "h2o", 0.25, acc_rows(flips(base, 2, False)))
    write_run(root, "passkey", "h2o-0.1-c", "h2o", 0.1, acc_rows(flips(base, 12, False)))
    write_run(root, "passkey", "l2-0.5-d", "l2", 0.5, acc_rows(l2_scores())[::-1])  # in another order
    nll = [2.0 + 0.1 * i for i in range(8)]
    ppl = lambda vals: [{"id": f"d{i}", "score": v} for i, v in enumerate(vals)]  # noqa: E731
    write_run(root, "ppl", "full-f", "full", 1.0, ppl(nll), metric="perplexity", higher=False)
    for name, budget, shift in (("h2o-0.5-a", 0.5, 0.001), ("h2o-0.25-b", 0.25, 0.015)):
        write_run(root, "ppl", name, "h2o", budget, ppl([x + shift for x in nll]), metric="perplexity", higher=False)
    write_run(root, "ppl", "l2-0.5-d", "l2", 0.5, ppl([x + 0.05 for x in nll]), metric="perplexity", higher=False)
    kl = [{"id": f"k{i}", "score": 1.0, "kl": 0.01 * i} for i in range(5)]
    write_run(root, "fidelity", "h2o-0.5-a", "h2o", 0.5, kl, metric="token agreement")
    write_run(root, "niah", "h2o-0.5-a", "h2o", 0.5, acc_rows([1, 1]), metric="needle words found")


def test_report_delta_columns_and_lossless_budget(tmp_path):
    results_tree(tmp_path)
    text = E.report(tmp_path, tmp_path / "plots")
    delta = {r[0]: dict(zip(table(text, "Δ vs full")[0][1:], r[1:])) for r in table(text, "Δ vs full")[1:]}
    assert list(delta["passkey"]) == ["Δ of", "h2o-0.5-a", "h2o-0.25-b", "h2o-0.1-c", "l2-0.5-d"]  # no full column
    assert delta["passkey"]["Δ of"] == "accuracy (points)"
    assert delta["passkey"]["h2o-0.5-a"] == "+0.00 [+0.00, +0.00] p=1"
    p2, p12 = M.mcnemar_exact(2, 0), M.mcnemar_exact(12, 0)
    assert delta["passkey"]["h2o-0.25-b"].startswith("-5.00 [") and delta["passkey"]["h2o-0.25-b"].endswith(
        f"p={p2:.2g}")
    assert delta["passkey"]["h2o-0.1-c"].startswith("-30.00 [") and f"p={p12:.2g}" in delta["passkey"]["h2o-0.1-c"]
    l2 = delta["passkey"]["l2-0.5-d"]  # 30 of the 40 samples, flips both ways
    v = E.vs_full({"metric": "accuracy", "higher_is_better": True, "strategy": "l2"},
                  acc_rows(l2_scores()),
                  acc_rows([i % 3 != 0 for i in range(40)]), "full-f", E.BOOTSTRAP)
    assert l2 == (f"{v['mean']:+.2f} [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}] p={v['mcnemar']['p']:.2g}")
    assert v["n"] == 30 and v["mcnemar"]["full_only"] == 3 and v["mcnemar"]["this_only"] == 4
    assert delta["ppl"]["Δ of"] == "perplexity (%)"
    assert delta["ppl"]["h2o-0.5-a"] == "+0.10% [+0.10%, +0.10%]"  # a constant difference: a point interval
    assert delta["ppl"]["l2-0.5-d"] == "+5.13% [+5.13%, +5.13%]"
    _, lo, hi = M.paired_bootstrap([0.01 * i for i in range(5)], E.BOOTSTRAP, E.BOOT_SEED)  # KL - 0, built in
    assert delta["fidelity"] == {"Δ of": "KL (nats)", "h2o-0.5-a": f"0.0200 [{lo:.4f}, {hi:.4f}]", "h2o-0.25-b": "",
                                 "h2o-0.1-c": "", "l2-0.5-d": ""}
    assert delta["niah"]["h2o-0.5-a"] == "n/a"
    assert ("- niah (h2o-0.5-a): no full-cache run of niah with the same settings (chat, dtype, max_new_tokens, "
            "model, query_aware, seed, task, task_settings)") in text.splitlines()
    lossless = {r[0]: r[1:] for r in table(text, "lossless budget")}
    assert lossless["task"] == ["margin", "h2o", "l2"]
    assert lossless["passkey"] == ["±2 points (accuracy)", "0.5 (ratio 0.500)", "none"]
    assert lossless["ppl"] == ["±2% (perplexity)", "0.25 (ratio 0.750)", "none"]
    assert lossless["fidelity"] == ["not defined (KL)", "n/a", ""]
    assert lossless["niah"] == ["±2 points (needle words found)", "n/a", ""]
    wide = {r[0]: r[1:] for r in table(E.report(tmp_path, tmp_path / "plots", margin=50), "lossless budget")}
    assert wide["passkey"] == ["±50 points (accuracy)", "0.1 (ratio 0.900)", "0.5 (ratio 0.500)"]
    assert wide["ppl"] == ["±50% (perplexity)", "0.25 (ratio 0.750)", "0.5 (ratio 0.500)"]


def test_report_flags_reach_the_tables(tmp_path, capsys):
    results_tree(tmp_path)
    E.main(["--report", str(tmp_path), "--report_out", str(tmp_path / "plots"), "--lossless_margin", "40",
            "--bootstrap_samples", "200"])
    out = capsys.readouterr().out
    assert {r[0]: r[1:] for r in table(out, "lossless budget")}["passkey"][0] == "±40 points (accuracy)"
    small = E.vs_full({"metric": "accuracy", "higher_is_better": True, "strategy": "h2o"},
                      acc_rows(flips([i % 3 != 0 for i in range(40)], 2, False)),
                      acc_rows([i % 3 != 0 for i in range(40)]), "f", 200)
    assert f"-5.00 [{small['ci95'][0]:+.2f}, {small['ci95'][1]:+.2f}]" in out
