"""Task prompts, answer extraction and metrics against hand-computed examples (no model needed).

A byte-level fake tokenizer (one token per UTF-8 byte) stands in for the real one; its chat template
wraps the user turn in <u>...</u><a>, so prompt splits are checked to the character."""
import argparse
import json
import random
from decimal import Decimal
from pathlib import Path

import pytest

import metrics as M
import tasks as T

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class ByteTok:
    bos_id, add_bos, stop_ids = None, False, []

    def encode(self, text, bos=None):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode("utf-8", "replace")

    def apply_chat(self, text, system=None):
        return f"<u>{text}</u><a>"

    def encode_prompt(self, text, chat=True):
        return self.encode(self.apply_chat(text) if chat else text)


def make_args(data_dir=DATA, **kw):
    base = dict(data_dir=str(data_dir), num_samples=None, seed=0, context_length=600, num_fewshot=2,
                longbench_dir=None, niah_lengths=None, niah_depths=[0, 50, 100], ppl_corpus="pg19", ppl_prefill=64,
                ppl_bin=32, fidelity_task="gsm8k", fidelity_tokens=16, no_chat=False)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def shared():
    if not DATA.is_dir():
        pytest.skip(f"no shared data at {DATA}")
    return DATA


# ---------------------------------------------------------------- metrics
def test_qa_f1_normalises_like_squad():
    assert M.normalize_answer("The  Cat, sat!") == "cat sat"
    assert M.qa_f1("The cat sat", "cat sat down") == pytest.approx(0.8)  # p = 1, r = 2/3
    assert M.qa_f1("a dog", "the cat") == 0.0


def test_rouge_l_summary_level_by_hand():
    # one sentence each: LCS words {the, cat, on, mat} over 5 distinct words a side
    assert M.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(0.8, abs=1e-6)
    # two sentences: union of per-pair LCS words = {a, c} + {e} (the tie-break keeps "e", not "d"):
    # r = 3/5, p = 3/4, f = 2/3
    assert M.rouge_l("a c. e d", "a b c. d e") == pytest.approx(2 / 3, abs=1e-6)
    assert M.rouge_l("", "a b") == 0.0
    assert M.rouge_l("x y z", "a b c") == 0.0


def test_longbench_small_metrics():
    classes = ["Entity", "Description", "Location"]
    assert M.classification("Entity", "Entity", all_classes=classes) == 1.0
    assert M.classification("Entity or Description", "Entity", all_classes=classes) == 0.5
    assert M.classification("Location", "Entity", all_classes=classes) == 0.0
    assert M.retrieval("Paragraph 3", "Paragraph 3") == 1.0
    assert M.retrieval("Paragraph 3 or 5", "Paragraph 3") == 0.5
    assert M.count("There are 12 unique paragraphs", 12) == 1.0
    assert M.count("13", 12) == 0.0
    assert M.code_sim("```\n# comment\nx = 1\n", "x = 1") == 1.0
    assert M.code_sim("y = 2", "x = 1") == 0.6  # " = " matches: 2 * 3 / (5 + 5)
    # the first-line rule: only "Entity" is scored for trec
    assert M.longbench_score("trec", "\nEntity\nDescription", ["Entity"], classes) == 1.0


def test_ruler_string_match():
    assert M.string_match_all("the numbers are 123 and 456", ["123", "789"]) == 0.5
    assert M.string_match_all("ABC", ["abc"]) == 1.0
    assert M.string_match_part("only 789", ["123", "789"]) == 1.0
    assert M.string_match_part("none", ["123"]) == 0.0


# ---------------------------------------------------------------- prompt building
def test_build_ids_splits_at_the_end_of_the_context():
    tok = ByteTok()
    s = T.Sample("0", "CONTEXT. ", "Question?", answer_prefix="Answer:")
    ids, n = T.build_ids(tok, s, chat=True)
    assert tok.decode(ids) == "<u>CONTEXT. Question?</u><a>Answer:"
    assert tok.decode(ids[:n]) == "<u>CONTEXT. "
    ids, n = T.build_ids(tok, s, chat=False)
    assert tok.decode(ids) == "CONTEXT. Question?Answer:" and tok.decode(ids[:n]) == "CONTEXT. "
    assert T.prompt_length(tok, s) == len("<u>CONTEXT. Question?</u><a>Answer:")


def test_split_sentences_regex():
    text = 'Mr. Smith went to Washington. He said "Hi." Then 3 dogs ran! Done'
    assert T.split_sentences(text) == ["Mr. Smith went to Washington.", 'He said "Hi."', "Then 3 dogs ran!", "Done"]


def test_groups_expand():
    assert T.expand(["rulerniah", "passkey", "rulerniah_single"]) == ["rulerniah_single", "rulerniah_multikey", "passkey"]
    assert len(T.expand(["longbench"])) == 16
    with pytest.raises(T.Unavailable):
        T.make_task("nope", make_args())


# ---------------------------------------------------------------- GSM8K
def test_gsm8k_extract_and_score():
    assert T.gsm8k_extract("... so 3 + 4 = 7. The answer is 1,234.") == Decimal(1234)
    assert T.gsm8k_extract("She has 5 apples and 7 pears, 12") == Decimal(12)
    assert T.gsm8k_extract("The answer is 5.\n\nQuestion: more? The answer is 9") == Decimal(5)
    assert T.gsm8k_extract("no number here") is None
    task = T.GSM8K(make_args())
    s = T.Sample("0", "", "", "18")
    assert task.score("The answer is $18.00", s) == 1.0
    assert task.score("The answer is 17.", s) == 0.0  # a wrong answer scores 0
    assert task.score("I cannot tell.", s) == 0.0


def write_gsm8k(root: Path):
    (root / "gsm8k").mkdir(parents=True)
    train = [{"question": f"Q{i}?", "answer": f"Step <<2+{i}={2 + i}>>{2 + i}.\n#### {2 + i}"} for i in range(4)]
    (root / "gsm8k/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    test = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"}]
    (root / "gsm8k/test.jsonl").write_text(json.dumps(test[0]) + "\n")


def test_gsm8k_prompt_from_train_exemplars(tmp_path):
    write_gsm8k(tmp_path)
    task = T.GSM8K(make_args(tmp_path, num_fewshot=2))
    (s,) = task.samples(ByteTok())
    picks = random.Random(0).sample(range(4), 2)
    assert s.context == "".join(f"Question: Q{i}?\nAnswer: Step {2 + i}.\nThe answer is {2 + i}.\n\n" for i in picks)
    assert s.question == "Question: Tom has 3 apples and buys 4. How many?\nAnswer:" and s.reference == "7"
    assert task.tag == "gsm8k-2shot"


def test_gsm8k_mc_options_are_deterministic(tmp_path):
    write_gsm8k(tmp_path)
    opts, k = T.gsm8k_options("Tom has 3 apples and buys 4. How many?", "7", random.Random("x"))
    assert opts[k] == "7" and len(set(opts)) == 4
    assert all(int(o) >= 0 for o in opts)
    assert (opts, k) == T.gsm8k_options("Tom has 3 apples and buys 4. How many?", "7", random.Random("x"))
    (s,) = T.GSM8KMC(make_args(tmp_path)).samples(ByteTok())
    assert s.options[s.reference] == " 7" and s.chat is False
    picks = random.Random(0).sample(range(4), 2)  # the same exemplars as gsm8k, answered by the number only
    assert s.context == "".join(f"Question: Q{i}?\nAnswer: {2 + i}\n\n" for i in picks)
    task = T.GSM8KMC(make_args(tmp_path))
    assert task.score(s.reference, s) == 1.0 and task.score((s.reference + 1) % 4, s) == 0.0


# ---------------------------------------------------------------- MedQA
REC = {"question": "A 30-year-old man has a cough. He smokes. Which drug is best?", "answer_idx": "C",
       "options": {"A": "Aspirin", "B": "Beta blocker", "C": "Cough syrup", "D": "Digoxin"}}


def test_medqa_letter_parsing():
    o = REC["options"]
    assert T.medqa_letter("The answer is (C).", o) == "C"
    assert T.medqa_letter("Answer: B, the beta blocker", o) == "B"
    assert T.medqa_letter("B. Beta blocker", o) == "B"
    assert T.medqa_letter("Option D is correct", o) == "D"
    assert T.medqa_letter("I would give cough syrup here", o) == "C"  # the one option quoted
    assert T.medqa_letter("A patient like this needs rest", o) is None  # "A" is an article here
    assert T.medqa_letter("nothing useful", o) is None


def test_medqa_prompt_and_score(tmp_path):
    (tmp_path / "medqa").mkdir()
    (tmp_path / "medqa/test.jsonl").write_text(json.dumps(REC) + "\n")
    task = T.MedQA(make_args(tmp_path))
    (s,) = task.samples(ByteTok())
    assert s.context == "A 30-year-old man has a cough. He smokes."
    assert s.question.startswith(" Which drug is best?\n\nA. Aspirin\nB. Beta blocker\nC. Cough syrup\nD. Digoxin")
    assert task.score("The correct answer is C.", s) == 1.0
    assert task.score("The correct answer is A.", s) == 0.0
    (m,) = T.MedQAMC(make_args(tmp_path)).samples(ByteTok())
    assert m.options == [" A", " B", " C", " D"] and m.reference == 2 and m.question.endswith("\nAnswer:")


# ---------------------------------------------------------------- synthetic tasks
def test_passkey_prompt_fits_and_scores_whole_key():
    task = T.Passkey(make_args(num_samples=3, context_length=800))
    ss = task.samples(ByteTok())
    for s in ss:
        key = s.reference[0]
        assert len(key) == 5 and s.context.count(f"The pass key is {key}. Remember it.") == 1
        assert T.prompt_length(ByteTok(), s) + task.max_new_tokens <= 800
    assert [s.reference for s in ss] == [s.reference for s in task.samples(ByteTok())]  # seeded
    s = ss[0]
    assert task.score(f" {s.reference[0]}.", s) == 1.0
    assert task.score(f" {s.reference[0][:4]}", s) == 0.0  # four right digits are still wrong


def test_ruler_niah_single_and_multikey(shared):
    tok = ByteTok()
    for name, k in T.RULER_NIAH.items():
        task = T.make_task(name, make_args(num_samples=2, context_length=3000))
        for s in task.samples(tok):
            value = s.reference[0]
            assert len(value) == 7 and s.context.count("One of the special magic numbers for") == k
            key = s.question.split("number for ")[1].split(" mentioned")[0]
            assert f"One of the special magic numbers for {key} is: {value}." in s.context
            assert s.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
            assert T.prompt_length(tok, s) + 128 <= 3000
            assert task.score(f" {value}.", s) == 1.0 and task.score(" 1234567", s) == 0.0


def test_ruler_vt_chain(shared):
    task = T.RulerVT(make_args(num_samples=1, context_length=2000))
    (s,) = task.samples(ByteTok())
    names, value = s.reference, s.question.split("value ")[1].split(" ")[0]
    assert f"VAR {names[0]} = {value}" in s.context
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a} " in s.context
    assert s.context.count("Question: Find all variables") == 1  # the answered in-context example
    assert task.score(" ".join(names), s) == 1.0 and task.score(" ".join(names[:2]), s) == 0.4


def test_ruler_cwe_counts(shared):
    task = T.RulerCWE(make_args(num_samples=1, context_length=3000))
    (s,) = task.samples(ByteTok())
    main = s.context.split("\n")[-1]  # the numbered list to answer on (below 4k: 6 and 1 repeats)
    words = [w for w in main.split() if not w.endswith(".")]
    for w in s.reference:
        assert words.count(w) == 6
    assert max(words.count(w) for w in set(words) - set(s.reference)) == 1
    assert task.score(", ".join(s.reference), s) == 1.0


def test_niah_grid_and_score(shared):
    task = T.NIAH(make_args(context_length=800, niah_lengths=[400, 800], niah_depths=[0, 100]))
    ss = task.samples(ByteTok())
    assert [s.id for s in ss] == ["L400-D0", "L400-D100", "L800-D0", "L800-D100"]
    assert ss[0].context.startswith(" " + task.needle) and ss[1].context.rstrip().endswith(task.needle)
    assert all(T.prompt_length(ByteTok(), s) + task.max_new_tokens <= s.meta["length"] for s in ss)
    assert task.score("Eat a sandwich in Dolores Park.", ss[0]) == pytest.approx(4 / 7)
    assert task.score("Go to the beach.", ss[0]) == 0.0


def test_ppl_pg19_body(tmp_path):
    d = tmp_path / "pg19_test_gutenberg"
    d.mkdir()
    body = "word " * 300
    (d / "1.txt").write_text(f"License junk\r\n*** START OF THIS BOOK ***\r\n{body}\r\n*** END OF THIS BOOK ***\r\nmore junk")
    task = T.PPL(make_args(tmp_path, context_length=200))
    (s,) = task.samples(ByteTok())
    assert ByteTok().decode(s.reference) == body.strip()[:200]
    agg = task.aggregate([{"score": 0.0}, {"score": 2.0}])
    assert agg["score"] == pytest.approx(2.718281828)
    assert agg["score_stderr"] == pytest.approx(2.718281828)  # e^1 x sqrt(((0-1)^2 + (2-1)^2) / 1 / 2)


def test_longbench_prompt_truncation_and_chat(tmp_path, shared):
    lb = tmp_path / "lb"
    lb.mkdir()
    ctx = "BEGIN " + "filler " * 400 + "END"
    recs = [{"_id": "a", "context": ctx, "input": "What is it?", "answers": ["Entity"], "all_classes": ["Entity", "Location"],
             "length": 100}]
    (lb / "trec.jsonl").write_text(json.dumps(recs[0]) + "\n")
    (lb / "qasper.jsonl").write_text(json.dumps(recs[0]) + "\n")
    args = make_args(longbench_dir=str(lb), context_length=1000)
    trec = T.LongBench(args, "trec")
    (s,) = trec.samples(ByteTok())
    assert not s.chat and s.max_new_tokens == 64  # LongBench runs trec without the chat template
    assert s.context.startswith("Please determine the type of the question below.") and "BEGIN" in s.context
    assert s.context.endswith("END") and T.prompt_length(ByteTok(), s) + 64 <= 1000  # cut in the middle
    assert trec.score("Entity\nLocation", s) == 1.0 and trec.score("Location", s) == 0.0
    (q,) = T.LongBench(args, "qasper").samples(ByteTok())
    assert q.chat and q.question.endswith("Question: What is it?\n\nAnswer:")
    with pytest.raises(T.Unavailable, match="no data"):
        T.LongBench(make_args(longbench_dir=str(tmp_path / "none")), "hotpotqa").samples(ByteTok())


def test_longbench_multi_news_official_prompt(shared):
    task = T.LongBench(make_args(context_length=2000, num_samples=1), "multi_news")
    (s,) = task.samples(ByteTok())
    assert s.max_new_tokens == 512 and s.context.startswith("You are given several news passages.")
    assert s.question == "\n\nNow, write a one-page summary of all the news.\n\nSummary:"
    assert task.score(s.reference[0], s) == pytest.approx(1.0, abs=1e-6)
    assert task.score("Completely unrelated words.", s) < 0.05


def test_fidelity_needs_a_generation_task():
    with pytest.raises(T.Unavailable):
        T.Fidelity(make_args(fidelity_task="medqa_mc"))
    assert T.Fidelity(make_args(fidelity_task="passkey")).tag == "fidelity-passkey-600-16"


def test_standard_error_of_a_mean_score():
    """metrics.json's score_stderr: sqrt(sample variance / n), by hand for 1, 0, 1, 1 (x 100)."""
    from tasks import Task
    agg = Task.aggregate(None, [{"score": v} for v in (1.0, 0.0, 1.0, 1.0)])
    # mean 0.75; variance (3 x 0.25^2 + 0.75^2) / 3 = 0.25; sqrt(0.25 / 4) = 0.25
    assert agg["score"] == pytest.approx(75.0) and agg["score_stderr"] == pytest.approx(25.0)
    assert Task.aggregate(None, [{"score": 1.0}])["score_stderr"] is None
