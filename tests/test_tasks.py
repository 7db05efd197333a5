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
    base = dict(data_dir=data_dir and str(data_dir), num_samples=None, seed=0, context_length=600, num_fewshot=2,
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
    with pytest.raises(ValueError, match="unknown task 'nope'; known: gsm8k"):  # bad input, not absent data
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
    (d / "2.txt").write_text("*** START OF B ***\n" + "other " * 70 + "\n*** END OF B ***")
    task = T.PPL(make_args(tmp_path, context_length=200, num_samples=20))
    ss = task.samples(ByteTok())
    # consecutive windows of each body (7 of 1,499 bytes, 2 of 419), the books in turn
    assert [s.id for s in ss] == ["0-0", "1-0", "0-200", "1-200", "0-400", "0-600", "0-800", "0-1000", "0-1200"]
    assert ByteTok().decode(ss[0].reference) == body.strip()[:200]
    assert ByteTok().decode(ss[2].reference) == body.strip()[200:400]
    assert ByteTok().decode(ss[3].reference) == ("other " * 70).strip()[200:400]
    assert [s.id for s in T.PPL(make_args(tmp_path, context_length=200, num_samples=3)).samples(ByteTok())] == ["0-0", "1-0", "0-200"]
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
    with pytest.raises(T.Unavailable, match="hotpotqa.jsonl .*pass --longbench_dir"):
        T.LongBench(make_args(longbench_dir=str(tmp_path / "none")), "hotpotqa").samples(ByteTok())
    with pytest.raises(T.Unavailable, match=f"no longbench/hotpotqa.jsonl in {tmp_path}; fetch it with: "
                                            "python scripts/prepare_data.py --only longbench .multi_news only"):
        T.LongBench(make_args(tmp_path), "hotpotqa").samples(ByteTok())


def test_longbench_multi_news_official_prompt(shared):
    task = T.LongBench(make_args(context_length=2000, num_samples=1), "multi_news")
    (s,) = task.samples(ByteTok())
    assert s.max_new_tokens == 512 and s.context.startswith("You are given several news passages.")
    assert s.question == "\n\nNow, write a one-page summary of all the news.\n\nSummary:"
    assert task.score(s.reference[0], s) == pytest.approx(1.0, abs=1e-6)
    assert task.score("Completely unrelated words.", s) < 0.05


def test_fidelity_needs_a_generation_task():
    with pytest.raises(ValueError, match="--fidelity_task medqa_mc: not a generation task; one of gsm8k, medqa"):
        T.Fidelity(make_args(fidelity_task="medqa_mc"))
    assert T.Fidelity(make_args(fidelity_task="passkey")).tag == "fidelity-passkey-600-16"


def test_standard_error_of_a_mean_score():
    """metrics.json's score_stderr: sqrt(sample variance / n), by hand for 1, 0, 1, 1 (x 100)."""
    from tasks import Task
    agg = Task.aggregate(None, [{"score": v} for v in (1.0, 0.0, 1.0, 1.0)])
    # mean 0.75; variance (3 x 0.25^2 + 0.75^2) / 3 = 0.25; sqrt(0.25 / 4) = 0.25
    assert agg["score"] == pytest.approx(75.0) and agg["score_stderr"] == pytest.approx(25.0)
    assert Task.aggregate(None, [{"score": 1.0}])["score_stderr"] is None


# ---------------------------------------------------------------- stops, sample counts, data lookup (#14)
def test_stop_strings_cut_the_answer():
    assert T.cut_at_stop(" 12345.\nThe pass key", ["\n"]) == (" 12345.", True)
    assert T.cut_at_stop("\n\n 12345.\nmore", ["\n"]) == ("\n\n 12345.", True)  # leading whitespace is no stop
    assert T.cut_at_stop("a Q: b Question: c", ["Question:", "Q:"]) == ("a ", True)  # the first of any
    assert T.cut_at_stop("no stop here", ["\n"]) == ("no stop here", False)


def test_gsm8k_stops_keep_the_score():
    """gsm8k ends at the next "Question:" and once the first "The answer is N" line is complete: the
    extracted number, so the score, is the same as for the whole text."""
    task, s = T.GSM8K(make_args()), T.Sample("0", "", "", "7")
    assert task.cut("3 + 4 = 7.\nThe answer is 7.\n\nThe answer is 7.\n") == ("3 + 4 = 7.\nThe answer is 7.\n", True)
    assert task.cut("So\n\nQuestion: next? The answer is 9\n") == ("So\n\n", True)
    assert task.cut("The answer is 1,2") == ("The answer is 1,2", False)  # the number may go on
    assert task.cut("The answer is 12 apples") == ("The answer is 12 apples", False)  # its line may go on
    texts = ["3 + 4 = 7.\nThe answer is 7.\nThe answer is 8.\n", "The answer is $7.00 in all.\nso 9\n",
             "We get 7\nQuestion: The answer is 9.\n", "the answer is: 7\n12", "no answer\n7\n"]
    for text in texts:
        assert task.score(task.cut(text)[0], s) == task.score(text, s) == 1.0, text


def test_task_table_lists_default_samples_and_stops():
    table = T.task_table().splitlines()
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in table[2:]}
    assert rows["gsm8k"] == ["30 of 1319", "256", '"Question:", or the end of the first "The answer is N" line']
    assert rows["passkey"] == [f"{T.Passkey.default_samples} (generated)", "16", '"\\n"']
    assert rows["medqa_mc"] == ["100 of 1273", "- (choice)", "-"]
    named = " ".join(rows)
    assert all(name in named for name in [*T.SIMPLE, *T.RULER_NIAH])  # every task has a row


def test_num_samples_default_all_and_sizes(tmp_path):
    (tmp_path / "medqa").mkdir()
    (tmp_path / "medqa/test.jsonl").write_text((json.dumps(REC) + "\n") * 60)
    counts = [len(T.MedQA(make_args(tmp_path, num_samples=n)).samples(ByteTok())) for n in (None, "all", 3)]
    assert counts == [50, 60, 3]
    task = T.MedQA(make_args(tmp_path))
    task.samples(ByteTok())
    assert task.size == 60 and task.count() == T.MedQA.default_samples == 50
    assert len(T.Passkey(make_args(context_length=800)).samples(ByteTok())) == T.Passkey.default_samples
    with pytest.raises(ValueError, match="--num_samples all: passkey generates its samples, so give a number"):
        T.Passkey(make_args(num_samples="all"))


def test_data_lookup_data_dir_then_repository_then_shared(tmp_path, monkeypatch):
    assert T.data_roots(None) == [T.REPO / "data", T.REPO.parent / "shared" / "data"]
    assert T.REPO == Path(__file__).resolve().parents[1]
    repo, shared, mine = tmp_path / "repo", tmp_path / "shared", tmp_path / "mine"
    (shared / "medqa").mkdir(parents=True)
    (shared / "medqa/test.jsonl").write_text(json.dumps(REC) + "\n")
    monkeypatch.setattr(T, "DATA_ROOTS", (repo, shared))
    monkeypatch.chdir(tmp_path)  # never looked up from the current folder
    assert T.MedQA(make_args(None)).records()[0][1] == REC  # not in repo/data: the shared copy
    (repo / "medqa").mkdir(parents=True)
    (repo / "medqa/test.jsonl").write_text(json.dumps({**REC, "answer_idx": "A"}) + "\n")
    assert T.MedQA(make_args(None)).records()[0][1]["answer_idx"] == "A"  # the repository's data/ first
    with pytest.raises(T.Unavailable, match=f"^no medqa/test.jsonl in {mine}; fetch it with: "
                                            "python scripts/prepare_data.py --only medqa$"):
        T.MedQA(make_args(mine)).records()  # --data_dir alone when given
    with pytest.raises(T.Unavailable, match=f"^no gsm8k/train.jsonl in {repo} or {shared}; fetch"):
        T.GSM8K(make_args(None)).samples(ByteTok())


def test_task_folder_names_hold_every_task_setting():
    tag = lambda cls, **kw: cls(make_args(**kw)).tag  # noqa: E731
    assert tag(T.NIAH, context_length=800, niah_depths=T.NIAH_DEPTHS) == "niah-800"
    assert tag(T.NIAH, context_length=800, niah_depths=[0, 50]) == "niah-200_400_800-d0_50"
    assert tag(T.NIAH, context_length=800, niah_lengths=[400], niah_depths=T.NIAH_DEPTHS) == "niah-400-d0_25_50_75_100"
    assert tag(T.PPL, context_length=600, ppl_prefill=T.PPL_PREFILL, ppl_bin=T.PPL_BIN) == "ppl-pg19-600"
    assert tag(T.PPL, context_length=600, ppl_prefill=64, ppl_bin=32) == "ppl-pg19-600-p64-bin32"
