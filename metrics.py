"""Judge-free metrics for eval.py: every score is a float in [0, 1] per sample (tasks report 100 x mean).

- LongBench v1 (Bai et al. 2023, THUDM/LongBench `metrics.py`), re-implemented without its
  dependencies: qa_f1 (SQuAD normalisation), rouge_l (the `rouge` package's summary-level ROUGE-L
  that LongBench calls, sentences split on ".", word sets), classification, retrieval, count and
  code similarity (difflib's ratio, which is what fuzzywuzzy falls back to without python-Levenshtein).
- RULER (Hsieh et al. 2024): string_match_all / string_match_part, per sample.
- Paired comparisons of two runs on the same samples (eval.py's `vs_full`): the mean difference with a
  percentile bootstrap interval over samples (Efron & Tibshirani 1993, ch. 13) and, for 0/1 scores,
  McNemar's exact test (the binomial test on the discordant pairs; McNemar 1947).
"""
import difflib
import math
import re
import string
from collections import Counter

PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD / LongBench)."""
    s = "".join(ch for ch in s.lower() if ch not in PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def f1_tokens(pred: list, ref: list) -> float:
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(ref)
    return 2 * p * r / (p + r)


def qa_f1(pred: str, ref: str, **_) -> float:
    return f1_tokens(normalize_answer(pred).split(), normalize_answer(ref).split())


def _sentences(text: str) -> list[str]:
    return [" ".join(s.split()) for s in text.split(".") if len(s) > 0]


def _lcs_words(x: list, y: list) -> list:
    """The words of x in one longest common subsequence of x and y (the `rouge` package's tie-break)."""
    t = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(t[i - 1][j], t[i][j - 1])
    out, i, j = [], len(x), len(y)
    while i and j:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif t[i - 1][j] > t[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def rouge_l(pred: str, ref: str, **_) -> float:
    """Summary-level ROUGE-L F as LongBench computes it (`rouge` 1.0.1, exclusive word sets): the
    union of LCS words over (reference sentence, candidate sentence) pairs, over the distinct words
    of each side. Case-sensitive, no stemming, as there. Empty text scores 0 (the package raises and
    LongBench catches it)."""
    hyp, refs = _sentences(pred), _sentences(ref)
    if not hyp or not refs:
        return 0.0
    m = len({w for s in refs for w in s.split(" ")})
    n = len({w for s in hyp for w in s.split(" ")})
    union = set()
    for r in refs:
        for h in hyp:
            union.update(_lcs_words(r.split(" "), h.split(" ")))
    rec, prec = len(union) / m, len(union) / n
    return 2 * prec * rec / (prec + rec + 1e-8)


def classification(pred: str, ref: str, all_classes=(), **_) -> float:
    """LongBench's classification_score as it behaves: 1/k if the reference is among the k class names
    found in the prediction (names contained in the reference are dropped), else 0. (Its difflib
    fallback sits behind `if em_match_list != 0`, which is always true, so it never runs.)"""
    found = [c for c in all_classes if c in pred]
    found = [c for c in found if not (c in ref and c != ref)]
    return 1.0 / len(found) if ref in found else 0.0


def retrieval(pred: str, ref: str, **_) -> float:
    """Share of the numbers in the prediction that equal the reference's paragraph number."""
    gold = re.findall(r"Paragraph (\d+)", ref)[0]
    nums = re.findall(r"\d+", pred)
    return sum(n == gold for n in nums) / len(nums) if nums else 0.0


def count(pred: str, ref: str, **_) -> float:
    nums = re.findall(r"\d+", pred)
    return sum(n == str(ref) for n in nums) / len(nums) if nums else 0.0


def code_sim(pred: str, ref: str, **_) -> float:
    """Similarity of the first line that is not a comment or a fence to the reference line."""
    line = next((ln for ln in pred.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return round(100 * difflib.SequenceMatcher(None, line, ref).ratio()) / 100  # fuzz.ratio rounds


def string_match_all(pred: str, refs: list[str]) -> float:
    """RULER: share of the references found (case-insensitive substrings) in the prediction."""
    return sum(r.lower() in pred.lower() for r in refs) / len(refs)


def string_match_part(pred: str, refs: list[str]) -> float:
    """RULER QA: 1 if any reference is found in the prediction."""
    return float(any(r.lower() in pred.lower() for r in refs))


LONGBENCH = {  # THUDM/LongBench eval.py dataset2metric, English tasks
    "narrativeqa": qa_f1, "qasper": qa_f1, "multifieldqa_en": qa_f1, "hotpotqa": qa_f1, "2wikimqa": qa_f1,
    "musique": qa_f1, "gov_report": rouge_l, "qmsum": rouge_l, "multi_news": rouge_l, "trec": classification,
    "triviaqa": qa_f1, "samsum": rouge_l, "passage_count": count, "passage_retrieval_en": retrieval,
    "lcc": code_sim, "repobench-p": code_sim,
}
FIRST_LINE = {"trec", "triviaqa", "samsum", "lsht"}  # LongBench scores only the first line of these


def longbench_score(dataset: str, pred: str, answers: list[str], all_classes=None) -> float:
    if dataset in FIRST_LINE:
        pred = pred.lstrip("\n").split("\n")[0]
    return max(LONGBENCH[dataset](pred, a, all_classes=all_classes or ()) for a in answers)


# ---------------------------------------------------------------- paired statistics
BOOT_CHUNK = 500  # resamples per draw of a [chunk, n] index array: bounded memory, and part of the seed scheme


def paired_bootstrap(diffs: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-sample paired differences and its percentile 95% interval.
    Resamples sample indices with replacement from numpy's default_rng(seed), BOOT_CHUNK resamples per
    draw of rng.integers(0, n, (chunk, n)); the interval is the 2.5th and 97.5th percentiles (linear
    interpolation) of the resampled means. Deterministic for a seed; resampling pairs, not the two runs
    apart, is what keeps their correlation (both runs see the same hard samples)."""
    import numpy as np
    d = np.asarray(diffs, dtype=np.float64)
    rng, means = np.random.default_rng(seed), []
    for i in range(0, resamples, BOOT_CHUNK):
        means.append(d[rng.integers(0, len(d), (min(BOOT_CHUNK, resamples - i), len(d)))].mean(1))
    lo, hi = np.percentile(np.concatenate(means), [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p for b and c discordant pairs (one run right where the other is wrong):
    twice the smaller tail of Binomial(b + c, 1/2) at min(b, c), at most 1; 1 without discordant pairs.
    Integer sums (math.comb) and one correctly rounded division: exact up to the last float bit."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n) if n else 1.0
