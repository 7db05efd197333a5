"""Evaluation tasks for eval.py: offline data, prompts, answer extraction and judge-free metrics.

One small class per task. A task turns its data into `Sample`s whose prompt has three parts:
`context` (prefilled, and compressed when it exceeds the budget), `question` (appended after it:
fed through decode steps by default, so the question sees only what the cache kept; inside the
prefill with --query_aware) and `answer_prefix` (after the chat template's assistant header, as RULER
places its answer prefix). Kinds: "generate" (greedy text scored against the reference), "choice"
(log-likelihood of each option, lm-eval-harness style), "ppl" (teacher-forced perplexity through the
cache), "fidelity" (compressed against full cache on another task's prompts).

Sources: GSM8K (Cobbe et al. 2021), MedQA (Jin et al. 2021), passkey retrieval (Mohtashami & Jaggi
2023), RULER (Hsieh et al. 2024; templates of NVIDIA/RULER scripts/data/synthetic), needle in a
haystack (G. Kamradt 2023), LongBench v1 (Bai et al. 2023; THUDM/LongBench prompts, lengths and
metrics), PG-19 (Rae et al. 2019), WikiText-2 (Merity et al. 2016).
"""
import itertools
import json
import random
import re
import string
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path

import metrics as M

REPO = Path(__file__).resolve().parent
DATA_ROOTS = (REPO / "data", REPO.parent / "shared" / "data")  # scripts/prepare_data.py writes the first
PREPARE_DATA = "python scripts/prepare_data.py"
NIAH_DEPTHS, PPL_PREFILL, PPL_BIN = [0, 25, 50, 75, 100], 512, 128  # eval.py's defaults (folder names omit them)


class Unavailable(Exception):
    """A task that cannot run here (its data is absent): reported in one line and skipped."""


def data_roots(data_dir) -> list[Path]:
    """Where data files are looked up: --data_dir alone when given (explicit wins), else the repository's
    data/, then ../shared/data beside the repository; never relative to the current folder."""
    return [Path(data_dir)] if data_dir else list(DATA_ROOTS)


def find_data(roots: list[Path], rel: str) -> Path:
    """The first root holding `rel` (a file or folder), else Unavailable naming it and the fetch command."""
    for root in roots:
        if (root / rel).exists():
            return root / rel
    raise Unavailable(f"no {rel} in {' or '.join(map(str, roots))}; fetch it with: {PREPARE_DATA} --only "
                      f"{rel.split('/')[0]}")


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """text cut before the first stop string, and whether one was found. Leading whitespace is never a
    stop (a "\n" stop must not end an answer that starts on a new line)."""
    start = len(text) - len(text.lstrip())
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


@dataclass
class Sample:
    id: str
    context: str                 # prefilled (and compressed) part of the user turn
    question: str = ""           # appended after the context
    reference: object = None
    answer_prefix: str = ""      # text after the assistant header (RULER's answer prefix)
    options: list | None = None  # choice tasks: continuations scored by log-likelihood
    chat: bool = True            # False: raw text, no chat template (LongBench few-shot tasks, choice tasks)
    max_new_tokens: int | None = None
    meta: dict = field(default_factory=dict)


def build_ids(tok, s: Sample, chat: bool = True, split: bool = True) -> tuple[list[int], int]:
    """Token ids of the whole prompt and how many of them are the context part (prefix).

    The prompt is tokenized once, whole, so both query modes see the same tokens; the split is the
    first token whose decoded text reaches the end of the context (a token straddling the boundary
    goes with the context)."""
    user = s.context + s.question
    if chat and s.chat:
        ids, full = tok.encode_prompt(user, chat=True), tok.apply_chat(user)
        lead = len(user) - len(user.lstrip())  # some templates strip the user text
        head = max(0, full.find(user.strip())) + max(0, len(s.context) - lead)
    else:
        ids, full, head = tok.encode(user), user, len(s.context)
    n_user = len(ids)
    ids = ids + (tok.encode(s.answer_prefix, bos=False) if s.answer_prefix else [])
    if not split:
        return ids, 0
    head += len(tok.decode(ids[:n_user])) - len(full)  # a BOS (or anything the encoder adds) in front
    lo, hi = 0, n_user  # smallest k with len(decode(ids[:k])) >= head
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if len(tok.decode(ids[:mid])) < head else (lo, mid)
    return ids, max(1, lo)


def prompt_length(tok, s: Sample, chat: bool = True) -> int:
    return len(build_ids(tok, s, chat, split=False)[0])


def split_sentences(text: str) -> list[str]:
    """Sentences by regex (RULER uses NLTK punkt, which cannot be fetched offline): split after . ! ?
    (and a closing quote or bracket) before whitespace and a capital, digit or opening quote;
    rejoin after common abbreviations and single initials."""
    parts = re.split(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|(?<=[.!?][\"')\]])\s+(?=[\"'(\[]?[A-Z0-9])", text.strip())
    out = []
    for p in parts:
        if out and re.search(r"(?:\b(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|e\.g|i\.e)|(?:^|\s)[A-Z])\.$", out[-1]):
            out[-1] += " " + p
        else:
            out.append(p)
    return [p for p in out if p]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def fit(make, lo: int, hi: int, budget: int, tok, chat: bool, max_new: int, strict=True) -> Sample:
    """The sample make(n) with the largest n in [lo, hi] whose prompt plus max_new tokens fits budget
    (binary search, as RULER sizes its haystacks); make(lo) if none fits and not strict."""
    best = None if strict else make(lo)
    while lo <= hi:
        mid = (lo + hi) // 2
        s = make(mid)
        if prompt_length(tok, s, chat) + max_new <= budget:
            best, lo = s, mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise Unavailable(f"its smallest prompt does not fit in {budget} tokens (raise --context_length)")
    return best


class Task:
    name = ""
    kind = "generate"
    metric = "accuracy"
    higher_is_better = True
    max_new_tokens = 32
    stop = ()             # stop strings: generation ends at the first (besides the tokenizer's stop ids)
    stop_also = ""        # any other stop of cut(), in words
    default_samples = 50  # --num_samples when not given: about 10 minutes per configuration on 2 CPU cores
    size = None           # samples in the whole task, set by limit() (None: generated, any number)

    def __init__(self, args):
        self.args = args
        self.roots = data_roots(args.data_dir)

    @property
    def tag(self) -> str:
        """Results directory name: the task plus every setting that changes its samples."""
        return self.name

    def find(self, rel: str) -> Path:
        return find_data(self.roots, rel)

    def cut(self, text: str) -> tuple[str, bool]:
        """A generated answer cut at a stop, and whether generation may end (eval.decode asks as it goes)."""
        return cut_at_stop(text, self.stop)

    def samples(self, tok) -> list[Sample]:
        raise NotImplementedError

    def score(self, prediction: str, s: Sample) -> float:
        raise NotImplementedError

    def aggregate(self, rows: list[dict]) -> dict:
        return {"score": 100 * sum(r["score"] for r in rows) / max(1, len(rows)),
                "score_stderr": stderr([r["score"] for r in rows], 100)}

    def plot(self, rows: list[dict], out_dir: Path):
        """Task-specific figures next to metrics.json (needle heatmap, perplexity curve)."""

    def count(self) -> int | None:
        """Samples to run: --num_samples, else the task's default; None for all ('all')."""
        n = self.args.num_samples
        return None if n == "all" else n or self.default_samples

    def limit(self, items):
        self.size, n = len(items), self.count()
        return items if n is None else items[:n]


def stderr(values: list[float], scale: float = 1.0):
    """scale x the standard error of the mean over samples, sqrt(sample variance / n); None below 2 samples."""
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    return scale * (sum((v - m) ** 2 for v in values) / (n - 1) / n) ** 0.5


# ---------------------------------------------------------------- GSM8K
def number(text: str):
    """'1,234.50' / '$18' / '18.' -> Decimal, or None."""
    try:
        return Decimal(text.replace(",", "").replace("$", "").rstrip("."))
    except (InvalidOperation, ValueError):
        return None


NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"
ANSWERED = re.compile(rf"answer is:?\s*{NUM}[^\n]*\n", re.IGNORECASE)  # the line gsm8k_extract reads, ended


def gsm8k_extract(text: str):
    """The final number: after 'The answer is' if the model says it (the exemplars end so), else the
    last number; text after a new 'Question:' (the model inventing the next exemplar) is ignored."""
    text = text.split("Question:")[0]
    m = re.search(rf"answer is:?\s*({NUM})", text, re.IGNORECASE)
    nums = [m.group(1)] if m else re.findall(NUM, text)
    return number(nums[-1]) if nums else None


class GSM8K(Task):
    """Few-shot chain of thought, exemplars drawn from train.jsonl with --seed (the same for every
    question), calculator annotations removed, each ending 'The answer is N.'; exact match on the number.
    The exemplars are the context, the test question is the question."""
    name = "gsm8k"
    max_new_tokens = 256
    stop = ("Question:",)  # lm-eval's `until`: the model starts the next exemplar
    stop_also = 'the end of the first "The answer is N" line'
    default_samples = 30   # ~20 s each on 2 CPU cores (5 s prompt, ~100 tokens at 10 tok/s)

    @property
    def tag(self):
        return f"{self.name}-{self.args.num_fewshot}shot"

    def exemplars(self, short=False):
        train = read_jsonl(self.find("gsm8k/train.jsonl"))
        picks = random.Random(self.args.seed).sample(range(len(train)), self.args.num_fewshot)
        out = []
        for i in picks:
            steps, gold = train[i]["answer"].split("####")
            steps = re.sub(r"<<.*?>>", "", steps).strip()
            answer = gold.strip() if short else f"{steps}\nThe answer is {gold.strip()}."
            out.append(f"Question: {train[i]['question']}\nAnswer: {answer}\n\n")
        return "".join(out)

    def rows(self):
        test = read_jsonl(self.find("gsm8k/test.jsonl"))
        return [(str(i), r["question"], r["answer"].split("####")[-1].strip()) for i, r in enumerate(test)]

    def samples(self, tok):
        shots = self.exemplars()
        return [Sample(i, shots, f"Question: {q}\nAnswer:", gold) for i, q, gold in self.limit(self.rows())]

    def cut(self, text):
        """Also ends once the first "answer is N" line is complete: gsm8k_extract reads nothing after it,
        so the score is the same as without this stop (a small model often repeats that line to the end)."""
        text, hit = super().cut(text)
        m = ANSWERED.search(text)
        return (text[:m.end()], True) if m else (text, hit)

    def score(self, prediction, s):
        pred = gsm8k_extract(prediction)
        return float(pred is not None and pred == number(s.reference))


def gsm8k_options(question: str, gold: str, rng: random.Random) -> tuple[list[str], int]:
    """Gold plus 3 distractors: drawn by rng from the question's own numbers and gold +-1, +-10, x2, /2,
    x10 (integers if the gold is one, non-negative if it is, never the gold), then shuffled."""
    g = number(gold)
    pool = [number(n) for n in re.findall(NUM, question)]
    pool += [g + 1, g - 1, g + 10, g - 10, g * 2, g / 2, g * 10]
    seen, cands = {g}, []
    for c in pool:
        if c is None or c in seen or (g >= 0 > c) or (g == g.to_integral_value() and c != c.to_integral_value()):
            continue
        seen.add(c)
        cands.append(c)
    opts = [g] + rng.sample(cands, 3)
    rng.shuffle(opts)
    fmt = [f"{o.normalize():f}" for o in opts]
    return fmt, opts.index(g)


class GSM8KMC(GSM8K):
    """GSM8K as multiple choice scored by log-likelihood (lm-eval style cloze): exemplars answer with the
    number only; each option is the continuation ' N' after 'Answer:'. Options: see gsm8k_options, with
    rng seeded by (--seed, question index). Metric: the option of highest summed log-probability."""
    name = "gsm8k_mc"
    kind = "choice"
    default_samples = 100  # ~5 s each: one prompt, four short options

    def samples(self, tok):
        shots, out = self.exemplars(short=True), []
        for i, q, gold in self.limit(self.rows()):
            opts, k = gsm8k_options(q, gold, random.Random(f"gsm8k_mc-{self.args.seed}-{i}"))
            out.append(Sample(i, shots, f"Question: {q}\nAnswer:", k, options=[" " + o for o in opts], chat=False))
        return out

    def score(self, choice, s):
        return float(choice == s.reference)


# ---------------------------------------------------------------- MedQA
def medqa_parts(rec) -> tuple[str, str, str]:
    """(vignette without its last sentence, last sentence, options block)."""
    sents = split_sentences(rec["question"])
    opts = "\n".join(f"{k}. {v}" for k, v in sorted(rec["options"].items()))
    return " ".join(sents[:-1]), sents[-1], opts


def medqa_letter(text: str, options: dict):
    """The chosen letter from free text: 'answer is (B)', a leading 'B.' / '(B)', 'option B', the one
    option whose text is quoted, else a lone capital A-D that is not an article; None if none."""
    pats = [r"(?i:answer(?:\s+is)?:?)\s*(?i:option\s*)?\(?([A-D])\b", r"^\s*\(?([A-D])(?:[).:,]|$|\s(?![a-z]))",
            r"(?i:option|choice)\s*\(?([A-D])\b", r"\(([A-D])\)"]
    for p in pats:
        m = re.search(p, text)
        if m:
            return m.group(1)
    hits = [k for k, v in options.items() if v.lower() in text.lower()]
    if len(hits) == 1:
        return hits[0]
    m = re.search(r"\b([B-D])\b|\bA\b(?!\s+[a-z])", text)
    return (m.group(1) or "A") if m else None


class MedQA(Task):
    """MedQA (US, 4 options), generated answer: the vignette is the context, its last sentence (the
    actual question), the options and the instruction are the question; up to 32 new tokens, letter
    parsed by medqa_letter."""
    name = "medqa"
    max_new_tokens = 32  # no stop string: the letter parser reads the whole (short) answer
    instruction = "\n\nAnswer with the letter of the correct option (A, B, C or D)."

    def records(self):
        return list(enumerate(self.limit(read_jsonl(self.find("medqa/test.jsonl")))))

    def samples(self, tok):
        out = []
        for i, r in self.records():
            ctx, last, opts = medqa_parts(r)
            out.append(Sample(str(i), ctx, f" {last}\n\n{opts}{self.instruction}", r["answer_idx"],
                              meta={"options": r["options"]}))
        return out

    def score(self, prediction, s):
        return float(medqa_letter(prediction, s.meta["options"]) == s.reference)


class MedQAMC(MedQA):
    """MedQA by log-likelihood of each option letter after 'Answer:' (lm-eval's medqa_4options
    format: question, 'A. ...' lines, 'Answer:', choices ' A'..' D'), no chat template."""
    name = "medqa_mc"
    kind = "choice"
    default_samples = 100  # ~3 s each

    def samples(self, tok):
        out = []
        for i, r in self.records():
            ctx, last, opts = medqa_parts(r)
            out.append(Sample(str(i), f"Question: {ctx}", f" {last}\n{opts}\nAnswer:", "ABCD".index(r["answer_idx"]),
                              options=[" A", " B", " C", " D"], chat=False))
        return out

    score = GSM8KMC.score


# ---------------------------------------------------------------- synthetic long-context tasks
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


class Synthetic(Task):
    """Generated at --context_length tokens (prompt + new tokens) of this model's tokenizer; sample i
    uses random.Random(f"{task}-{seed}-{i}"), so samples do not depend on --num_samples or sharding."""
    default_samples = 20  # ~30 s each at the default 4096 tokens on 2 CPU cores
    metric = "string_match_all"
    stop = ("\n",)  # the answer is one line after the answer prefix

    def __init__(self, args):
        super().__init__(args)
        if args.num_samples == "all":
            raise ValueError(f"--num_samples all: {self.name} generates its samples, so give a number "
                             f"(default {self.default_samples})")

    @property
    def tag(self):
        return f"{self.name}-{self.args.context_length}"

    def rng(self, i):
        return random.Random(f"{self.name}-{self.args.seed}-{i}")

    def samples(self, tok):
        return [self.make(tok, i) for i in range(self.count())]

    def fit(self, tok, make, hi):
        return fit(make, 1, hi, self.args.context_length, tok, not self.args.no_chat, self.max_new_tokens)

    def score(self, prediction, s):
        return M.string_match_all(prediction, s.reference)


class Passkey(Synthetic):
    """Passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key in repeated filler at a uniform random
    depth; scored by the whole key appearing in the answer (never digit by digit)."""
    name = "passkey"
    metric = "accuracy"
    max_new_tokens = 16

    def make(self, tok, i):
        rng = self.rng(i)
        key, depth = str(rng.randint(10000, 99999)), rng.random()
        intro = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                 "them. I will quiz you about the important information there.\n")
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."

        def make(n):
            hay = [NOISE] * n
            hay.insert(round(depth * n), needle)
            return Sample(str(i), intro + " ".join(hay), "\nWhat is the pass key?", [key],
                          answer_prefix="The pass key is", meta={"depth": depth})
        return self.fit(tok, make, self.args.context_length // 8)


WORDS = "ruler/wonderwords_v2.2.0"


@lru_cache(maxsize=2)
def ruler_words(d: Path, kind: str) -> tuple:
    """The wonderwords lists in folder d (WORDS)."""
    read = lambda f: [w for w in (d / f).read_text().splitlines() if w.strip()]
    if kind == "keys":  # niah keys: an adjective and a noun, uniform over the pairs as in RULER
        return tuple(sorted(set(read("adjectivelist.txt")))), tuple(sorted(set(read("nounlist.txt"))))
    return tuple(sorted(set(read("nounlist.txt") + read("adjectivelist.txt") + read("verblist.txt"))))


@lru_cache(maxsize=1)
def essay_words(path: Path) -> tuple:
    return tuple(re.sub(r"\s+", " ", json.loads(path.read_text())["text"]).split(" "))


RULER_DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40))


class RulerNIAH(Synthetic):
    """RULER niah_single_2 (num_keys 1) / niah_multikey_1 (4): essay haystack, adjective-noun keys,
    7-digit values, needles at depths drawn from RULER's 40 without replacement; singular template."""
    max_new_tokens = 128
    template = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the number afterwards.\n")
    question = "\nWhat is the special magic number for {query} mentioned in the provided text?"
    prefix = " The special magic number for {query} mentioned in the provided text is"

    def __init__(self, args, name, num_keys):
        self.name, self.num_keys = name, num_keys
        super().__init__(args)

    def make(self, tok, i):
        rng, hay, (adjs, nouns) = self.rng(i), essay_words(self.find("ruler/PaulGrahamEssays.json")), \
            ruler_words(self.find(WORDS), "keys")
        keys = []
        while len(keys) < self.num_keys:
            k = f"{rng.choice(adjs)}-{rng.choice(nouns)}"
            keys += [k] if k not in keys else []
        values = [str(rng.randint(10 ** 6, 10 ** 7 - 1)) for _ in keys]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
        rng.shuffle(needles)
        depths = rng.sample(RULER_DEPTHS, len(needles))
        q = rng.randrange(self.num_keys)

        def make(n):
            sents = split_sentences(" ".join((hay * (n // len(hay) + 1))[:n]))
            cuts = [0] + sorted(int(len(sents) * d / 100) for d in depths) + [len(sents)]
            parts = []
            for j in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[j - 1]:cuts[j]]))
                if j - 1 < len(needles):
                    parts.append(needles[j - 1])
            return Sample(str(i), self.template + " ".join(parts), self.question.format(query=keys[q]),
                          [values[q]], answer_prefix=self.prefix.format(query=keys[q]))
        return self.fit(tok, make, self.args.context_length)


class RulerVT(Synthetic):
    """RULER vt: one chain of 4 hops (5 variables, 5-letter names, 5-digit value) in the noise haystack,
    after one in-context example (3-letter names, at most 500 tokens, answered)."""
    name = "rulervt"
    max_new_tokens = 30
    template = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    question = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
    prefix = (" Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
              "assigned the value {value}, they are: ")

    def chain(self, rng, k, n):
        names = []
        while len(names) < 5:
            v = "".join(rng.choices(string.ascii_uppercase, k=k))
            names += [v] if v not in names else []
        value = str(rng.randint(10000, 99998))
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(4)]
        sents = [NOISE] * n
        for j, p in enumerate(sorted(rng.sample(range(n), 5))):
            sents.insert(p + j, chain[j])
        return names, value, "\n".join(sents).replace(". \n", ".\n")

    def make(self, tok, i):
        seed = f"{self.name}-{self.args.seed}-{i}"

        def icl(n):
            names, value, ctx = self.chain(random.Random(seed + "-icl"), 3, n)
            text = self.template + ctx + self.question.format(value=value) + self.prefix.format(value=value)
            return Sample("", text, reference=names)
        ex = fit(icl, 5, 200, 500, tok, False, 0, strict=False)  # RULER: the example fits 500 tokens
        example = ex.context + " " + " ".join(ex.reference) + "\n"

        def make(n):
            names, value, ctx = self.chain(random.Random(seed), 5, n)
            return Sample(str(i), example + "\n" + self.template + ctx, self.question.format(value=value), names,
                          answer_prefix=self.prefix.format(value=value))
        return self.fit(tok, make, self.args.context_length // 4)


class RulerCWE(Synthetic):
    """RULER cwe: numbered word list where 10 words appear 30 times and the rest 3 (6 and 1 below 4k
    tokens), after one answered example (40 words: 10 x 10, 3 x 30; 20 words below 4k). Departure: the
    example uses the plain task template, not the model's chat template nested inside."""
    name = "rulercwe"
    max_new_tokens = 120
    stop = ()  # the 10-word list may span lines
    template = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n")
    question = "\nQuestion: What are the 10 most common words in the above list?"
    prefix = " Answer: The top 10 words that appear most often in the list are:"

    def example(self, rng, words, n, common, uncommon):
        pick = rng.sample(words, n)
        lst = pick[:10] * common + pick[10:] * uncommon
        random.Random(self.args.seed).shuffle(lst)  # RULER shuffles with its fixed seed
        return " ".join(f"{j + 1}. {w}" for j, w in enumerate(lst)), pick[:10]

    def make(self, tok, i):
        words = list(ruler_words(self.find(WORDS), "all"))
        random.Random(self.args.seed).shuffle(words)
        short = self.args.context_length < 4096
        seed = f"{self.name}-{self.args.seed}-{i}"

        def make(n):
            rng = random.Random(seed)
            ex_ctx, ex_ans = self.example(rng, words, *((20, 3, 1) if short else (40, 10, 3)))
            ctx, ans = self.example(rng, words, n + 10, *((6, 1) if short else (30, 3)))
            shot = (self.template + ex_ctx + self.question + self.prefix + " "
                    + " ".join(f"{j + 1}. {w}" for j, w in enumerate(ex_ans)))
            return Sample(str(i), shot + "\n" + self.template + ctx, self.question, ans, answer_prefix=self.prefix)
        return self.fit(tok, make, min(len(words) - 10, self.args.context_length // 4))


class NIAH(Task):
    """Needle in a haystack (gkamradt/LLMTest_NeedleInAHaystack): the 49 Paul Graham essays in sorted
    order, cut to each length of --niah_lengths (tokens, prompt + new tokens), the needle inserted at
    each depth of --niah_depths (% of the haystack, moved back to the previous sentence end); the grid is
    the sample set (--num_samples does not cut it). Judge-free
    score: share of the needle's 7 content words found in the answer. Heatmap: heatmap.png."""
    name = "niah"
    metric = "needle words found"
    max_new_tokens = 48  # free text, no stop string
    needle = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
    words = ("eat", "sandwich", "sit", "dolores", "park", "sunny", "day")

    @property
    def tag(self):
        a = self.args
        if a.niah_lengths is None and a.niah_depths == NIAH_DEPTHS:
            return f"{self.name}-{max(self.lengths())}"
        return f"{self.name}-{'_'.join(map(str, self.lengths()))}-d{'_'.join(map(str, a.niah_depths))}"

    def lengths(self):
        L = self.args.context_length
        return self.args.niah_lengths or [L // 4, L // 2, L]

    def samples(self, tok):
        files = sorted(self.find("paul_graham_essays/essays").glob("*.txt"))
        if not files:
            raise Unavailable(f"no essays in {self.find('paul_graham_essays/essays')}; fetch them with: "
                              f"{PREPARE_DATA} --only paul_graham_essays")
        hay_ids = tok.encode("".join(f.read_text() for f in files), bos=False)
        self.size = len(self.lengths()) * len(self.args.niah_depths)
        return [self.cell(tok, hay_ids, L, d) for L in self.lengths() for d in self.args.niah_depths]

    def cell(self, tok, hay_ids, L, depth):
        def make(n):
            text = tok.decode(hay_ids[:n])
            cut = int(len(text) * depth / 100)
            cut = text.rfind(".", 0, cut) + 1 if 0 < cut < len(text) else cut
            ctx = text[:cut] + " " + self.needle + " " + text[cut:]
            return Sample(f"L{L}-D{depth}", ctx, "\n\nWhat is the best thing to do in San Francisco? Don't give "
                          "information outside the document or repeat your findings.", list(self.words),
                          meta={"length": L, "depth": depth})
        return fit(make, 1, min(L, len(hay_ids)), L, tok, not self.args.no_chat, self.max_new_tokens)

    def score(self, prediction, s):
        found = set(re.findall(r"[a-z]+", prediction.lower()))
        return sum(w in found for w in s.reference) / len(s.reference)

    def plot(self, rows, out_dir):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        lengths = sorted({r["meta"]["length"] for r in rows})
        depths = sorted({r["meta"]["depth"] for r in rows})
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for r in rows:
            grid[depths.index(r["meta"]["depth"])][lengths.index(r["meta"]["length"])] = 100 * r["score"]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1 + 0.45 * len(depths)))
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (%)")
        ax.set_title(out_dir.name)
        fig.colorbar(im, label="score")
        fig.tight_layout()
        fig.savefig(out_dir / "heatmap.png", dpi=120)
        plt.close(fig)


# ---------------------------------------------------------------- perplexity
class PPL(Task):
    """Perplexity of long text through the cache: windows of --context_length tokens (the start of each
    PG-19 test book body, or consecutive WikiText-2 test windows); the first --ppl_prefill tokens are
    prefilled, every later token is fed by a decode step (teacher forcing): under --protocol stream it is
    prompt and eviction goes on as it is read; under context the prefill alone is compressed.
    Per sample: mean NLL; reported: exp(mean NLL) and its curve over position (curve.png)."""
    name = "ppl"
    kind = "ppl"
    metric = "perplexity"
    higher_is_better = False
    default_samples = 5  # windows, ~2 minutes each at 4096 tokens on 2 CPU cores

    @property
    def tag(self):
        a = self.args
        extra = (f"-p{a.ppl_prefill}" if a.ppl_prefill != PPL_PREFILL else "") + (
            f"-bin{a.ppl_bin}" if a.ppl_bin != PPL_BIN else "")
        return f"{self.name}-{a.ppl_corpus}-{a.context_length}{extra}"

    def texts(self):
        if self.args.ppl_corpus == "wikitext2":
            path = self.find("wikitext2_raw/wiki.test.raw")
            return [path.read_text(encoding="utf-8").replace("\r\n", "\n")]
        books = sorted(self.find("pg19_test_gutenberg").glob("*.txt"))
        if not books:
            raise Unavailable(f"no PG-19 books in {self.find('pg19_test_gutenberg')}; fetch them with: "
                              f"{PREPARE_DATA} --only pg19_test_gutenberg")
        out = []
        for b in books:  # the body lies between the ***START OF / ***END OF lines
            t = b.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
            start = re.search(r"^\*\*\* ?START OF.*$", t, re.M)
            end = re.search(r"^\*\*\* ?END OF", t, re.M)
            out.append(t[start.end() if start else 0:end.start() if end else len(t)].strip())
        return out

    def samples(self, tok):
        """Consecutive windows of each text; PG-19's books taken in turn (each book's first window, then each
        one's second, ...), so the first n samples spread over every book."""
        L, per_text = self.args.context_length, []
        for k, text in enumerate(self.texts()):
            ids = tok.encode(text)
            per_text.append([Sample(f"{k}-{s}", "", reference=ids[s:s + L]) for s in range(0, len(ids) - L + 1, L)])
        return self.limit([x for rank in itertools.zip_longest(*per_text) for x in rank if x is not None])

    def aggregate(self, rows):
        import math
        nll = sum(r["score"] for r in rows) / max(1, len(rows))
        se = stderr([r["score"] for r in rows], math.exp(nll))  # over documents, delta method: d e^x = e^x dx
        return {"score": math.exp(nll), "score_stderr": se, "nll": nll,
                "curve": [[p, math.exp(v)] for p, v in ppl_curve(rows)]}

    def plot(self, rows, out_dir):
        import math
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        curve = ppl_curve(rows)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([c[0] for c in curve], [math.exp(c[1]) for c in curve])
        ax.set_xlabel("position (tokens)")
        ax.set_ylabel(f"perplexity (bins of {self.args.ppl_bin})")
        ax.set_title(out_dir.name)
        fig.tight_layout()
        fig.savefig(out_dir / "curve.png", dpi=120)
        plt.close(fig)


def ppl_curve(rows):
    """[(bin start position, mean NLL over samples)] from each row's `nll_bins`."""
    bins = {}
    for r in rows:
        for start, nll in r.get("nll_bins", ()):
            bins.setdefault(start, []).append(nll)
    return [(s, sum(v) / len(v)) for s, v in sorted(bins.items())]


# ---------------------------------------------------------------- LongBench v1
LONGBENCH_EN = list(M.LONGBENCH)
NO_CHAT = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}  # LongBench pred.py runs these raw


class LongBench(Task):
    """LongBench v1 with its official prompts (dataset2prompt.json), output lengths (dataset2maxlen.json)
    and metrics; the chat template is skipped for the few-shot and code tasks, as LongBench does.
    Prompts longer than --context_length minus the output length are cut in the middle of the context
    (LongBench cuts the middle of the prompt). Everything up to the end of {context} is the context.
    Stop strings as LongBench's pred.py: "\n" for samsum (else it writes the next dialogue), none else."""
    default_samples = 10  # up to 512 new tokens each (multi_news): ~1 minute each on 2 CPU cores

    def __init__(self, args, dataset):
        super().__init__(args)
        self.dataset, self.name = dataset, f"longbench_{dataset}"
        self.stop = ("\n",) if dataset == "samsum" else ()
        self.metric = {"qa_f1": "F1", "rouge_l": "ROUGE-L", "code_sim": "edit similarity"}.get(
            M.LONGBENCH[dataset].__name__, "accuracy")

    @property
    def tag(self):
        return f"{self.name}-{self.args.context_length}"

    def samples(self, tok):
        name = f"{self.dataset}.jsonl"
        path = Path(self.args.longbench_dir) / name if self.args.longbench_dir else self.longbench_file(name)
        if not path.exists():
            raise Unavailable(f"no {path} (unzip LongBench's data.zip and pass --longbench_dir)")
        template = json.loads(self.find("longbench/dataset2prompt.json").read_text())[self.dataset]
        max_new = json.loads(self.find("longbench/dataset2maxlen.json").read_text())[self.dataset]
        head, tail = template.split("{context}")
        out = []
        for r in self.limit(read_jsonl(path)):
            s = Sample(r["_id"], head + r["context"], tail.replace("{input}", r["input"]), r["answers"],
                       chat=self.dataset not in NO_CHAT, max_new_tokens=max_new,
                       meta={"all_classes": r.get("all_classes"), "length": r.get("length")})
            out.append(self.truncate(tok, s, head, r["context"]))
        return out

    def longbench_file(self, name):
        try:
            return self.find(f"longbench/{name}")
        except Unavailable as e:  # only multi_news is in the offline data
            raise Unavailable(f"{e} (multi_news only; for the other datasets unzip LongBench's data.zip and "
                              f"pass --longbench_dir)") from None

    def truncate(self, tok, s, head, ctx):
        budget = self.args.context_length - s.max_new_tokens
        chat = not self.args.no_chat
        for _ in range(4):  # re-encoding the cut text can shift a token or two
            over = prompt_length(tok, s, chat) - budget
            if over <= 0:
                return s
            ids = tok.encode(ctx, bos=False)
            keep = max(0, len(ids) - over - 2)
            ctx = tok.decode(ids[:keep // 2]) + tok.decode(ids[len(ids) - (keep - keep // 2):])
            s.context = head + ctx
        raise Unavailable(f"{s.id}: the prompt does not fit --context_length {self.args.context_length}")

    def score(self, prediction, s):
        return M.longbench_score(self.dataset, prediction, s.reference, s.meta["all_classes"])


# ---------------------------------------------------------------- fidelity
class Fidelity(Task):
    """How far a compressed cache strays from the full one on another task's prompts (--fidelity_task):
    greedy token agreement with the full cache's output (position by position over its length), ROUGE-L
    of the two texts, and the KL divergence KL(full || compressed) of next-token distributions with the
    full cache's output teacher-forced through both, averaged over positions."""
    name = "fidelity"
    kind = "fidelity"
    metric = "token agreement"
    default_samples = 10  # two generations and two teacher-forced passes per sample

    def __init__(self, args):
        super().__init__(args)
        self.inner = make_task(args.fidelity_task, args)
        if self.inner.kind != "generate":
            raise ValueError(f"--fidelity_task {args.fidelity_task}: not a generation task; "
                             f"one of {', '.join(n for n, c in SIMPLE.items() if c.kind == 'generate')}")
        self.inner.default_samples = self.default_samples
        self.max_new_tokens = args.fidelity_tokens

    @property
    def tag(self):
        return f"{self.name}-{self.inner.tag}-{self.max_new_tokens}"

    def samples(self, tok):
        out = self.inner.samples(tok)
        self.size = self.inner.size
        return out

    def aggregate(self, rows):
        n = max(1, len(rows))
        mean = lambda k: sum(r[k] for r in rows) / n
        return {"score": 100 * mean("score"), "score_stderr": stderr([r["score"] for r in rows], 100),
                "kl": mean("kl"), "rouge_l": 100 * mean("rouge_l"),
                "prefix_match": mean("prefix_match")}


# ---------------------------------------------------------------- registry
SIMPLE = {c.name: c for c in (GSM8K, GSM8KMC, MedQA, MedQAMC, Passkey, RulerVT, RulerCWE, NIAH, PPL, Fidelity)}
RULER_NIAH = {"rulerniah_single": 1, "rulerniah_multikey": 4}
GROUPS = {"rulerniah": list(RULER_NIAH), "ruler": [*RULER_NIAH, "rulervt", "rulercwe"],
          "longbench": [f"longbench_{d}" for d in LONGBENCH_EN]}
NAMES = [*SIMPLE, *RULER_NIAH, *GROUPS["longbench"]]


def expand(names: list[str]) -> list[str]:
    """Task names with groups (rulerniah, ruler, longbench) expanded, order kept, no repeats."""
    out = []
    for n in names:
        for m in GROUPS.get(n, [n]):
            if m not in out:
                out.append(m)
    return out


def make_task(name: str, args) -> Task:
    if name in SIMPLE:
        return SIMPLE[name](args)
    if name in RULER_NIAH:
        return RulerNIAH(args, name, RULER_NIAH[name])
    if name.startswith("longbench_") and name[10:] in LONGBENCH_EN:
        return LongBench(args, name[10:])
    raise ValueError(f"unknown task {name!r}; known: {', '.join([*NAMES, *GROUPS])}")


def task_table() -> str:
    """The task table of `eval.py --help` (markdown, aligned): samples run by default, output length and
    stop strings, read from the classes so that it cannot drift from them."""
    show = lambda c: "-" if c.kind != "generate" else ", ".join(
        [json.dumps(s) for s in c.stop] + ([f"or {c.stop_also}"] if c.stop_also else [])) or "none"
    gen = lambda c: str(c.max_new_tokens) if c.kind == "generate" else f"- ({c.kind})"
    rows = [("task", "samples by default (of all)", "new tokens", "stop strings (and the tokenizer's stop ids)")]
    for names, c, size in [("gsm8k", GSM8K, "1319"), ("gsm8k_mc", GSM8KMC, "1319"), ("medqa", MedQA, "1273"),
                           ("medqa_mc", MedQAMC, "1273"), ("passkey", Passkey, None),
                           ("rulerniah_single, rulerniah_multikey", RulerNIAH, None), ("rulervt", RulerVT, None),
                           ("rulercwe", RulerCWE, None)]:
        rows.append((names, f"{c.default_samples} of {size}" if size else f"{c.default_samples} (generated)",
                     gen(c), show(c)))
    rows += [("niah", "lengths x depths grid (15)", gen(NIAH), show(NIAH)),
             ("ppl", f"{PPL.default_samples} windows", gen(PPL), "-"),
             ("longbench_<dataset>", f"{LongBench.default_samples} of 200 (multi_news)", "dataset2maxlen.json",
              'samsum: "\\n" (as LongBench); others: none'),
             ("fidelity", f"{Fidelity.default_samples} of --fidelity_task's", "--fidelity_tokens", "none (raw tokens)")]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(rows[0]), line(["-" * w for w in widths]), *map(line, rows[1:])])
