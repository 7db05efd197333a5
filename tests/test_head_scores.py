"""head_scores.py: the metrics against plain-Python references written from their definitions, the
token-F1 gate, needle placement and location, the attention recorder against the prefill's own q and
k, and end-to-end runs on the tiny random model (JSON + heatmaps; nothing passes -> one line)."""
import json
import math
from functools import partial

import pytest
import torch

import cache as kv
import generate as gen
import head_scores as hs
from model import ModelArgs, Transformer
from test_tasks import ByteTok
from conftest import Capture, needs_data

ROW = [0.1, 0.4, 0.2, 0.05, 0.25]


# ---------------------------------------------------------------- references from the definitions
def ref_top(row, k):
    """The k largest positions (rows here have no ties)."""
    return set(sorted(range(len(row)), key=lambda i: -row[i])[:k])


def ref_dililazy(row, s, e, k):
    top, needle, every = ref_top(row, k), set(range(s, e)), set(range(len(row)))
    wtp = sum(row[i] for i in top & needle)
    wfp = sum(row[i] for i in top - needle)
    wfn = sum(row[i] for i in needle - top)
    p = wtp / (wtp + wfp) if wtp + wfp else 0.0
    r = wtp / (wtp + wfn) if wtp + wfn else 0.0
    return dict(infscore=2 * p * r / (p + r) if p + r else 0.0, diliscore=p, lazyscore=r,
                diligent=len(top & needle), subconscious=len(needle - top),
                distracted=len(top - needle), diffuse=len(every - top - needle))


def ref_headkv(row, s, e):
    return sum(row[i] for i in ref_top(row, e - s) if s <= i < e) / (e - s)


def check(row, s, e, k):
    got = {key: float(v) for key, v in hs.dililazy_scores(torch.tensor(row), s, e, k).items()}
    want = ref_dililazy(row, s, e, k)
    assert list(got) == list(want) == list(hs.STATS[:7])
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), (key, row, s, e, k)


def test_dililazy_by_hand():
    # top-2 = {1, 4}; needle {1, 2}: WTP 0.4, WFP 0.25, WFN 0.2 -> P 8/13, R 2/3, F 0.64
    assert ref_dililazy(ROW, 1, 3, 2) == pytest.approx(dict(
        infscore=0.64, diliscore=8 / 13, lazyscore=2 / 3, diligent=1, subconscious=1, distracted=1, diffuse=2))
    check(ROW, 1, 3, 2)


@pytest.mark.parametrize("s, e, k", [(0, 1, 1), (1, 3, 1), (1, 3, 3), (2, 5, 2), (0, 5, 2), (3, 4, 4), (1, 2, 5)])
def test_dililazy_against_reference(s, e, k):
    check(ROW, s, e, k)


def test_dililazy_edge_cases():
    check(ROW, 1, 3, 50)  # top-k larger than the row: everything is top-k, precision = needle mass
    row = [0.5, 0.3, 0.0, 0.0, 0.2]  # no attention on the needle: every score 0, never NaN
    check(row, 2, 4, 2)
    got = hs.dililazy_scores(torch.tensor(row), 2, 4, 2)
    assert all(not math.isnan(float(v)) for v in got.values()) and float(got["infscore"]) == 0


def test_rows_are_scored_independently():
    rows = torch.tensor([ROW, [0.3, 0.05, 0.1, 0.35, 0.2]])
    got = hs.dililazy_scores(rows, 1, 3, 2)
    for j, row in enumerate(rows.tolist()):
        want = ref_dililazy(row, 1, 3, 2)
        assert all(float(got[key][j]) == pytest.approx(want[key], abs=1e-6) for key in want)


@pytest.mark.parametrize("s, e, want", [(1, 3, 0.2), (2, 5, 0.15), (0, 1, 0.0), (0, 5, 0.2)])
def test_headkv_score(s, e, want):
    # top-k = needle length: [1, 3) -> top-2 {1, 4}, 0.4 in the needle, / 2; [2, 5) -> top-3 {1, 4, 2}: 0.45 / 3
    assert ref_headkv(ROW, s, e) == pytest.approx(want)
    assert float(hs.headkv_score(torch.tensor(ROW), s, e)) == pytest.approx(want)


def test_step_stats_columns():
    stats = hs.step_stats(torch.tensor([ROW]), 1, 3, 2)
    assert stats.shape == (1, len(hs.STATS))
    assert stats[0, hs.STATS.index("infscore")] == pytest.approx(0.64)
    assert stats[0, hs.STATS.index("headkv")] == pytest.approx(0.2)


# ---------------------------------------------------------------- the gate: token F1, and the reference's numbers
@pytest.mark.parametrize("answer, ref, f1, ok", [
    ("Relax and do nothing.", "Relax and do nothing.", 1.0, True),
    ("The good ways to spend time in campus include relax and do nothing.", "Relax and do nothing.", 0.5, True),
    ("Exercise, healthy diet.", "Exercise and healthy diet.", 6 / 7, True),
    ("The year was 2020.", "Tom started high school in 2020.", 2 / 9, False),
    ("", "Relax and do nothing.", 0.0, False),
    ("Tom started high school in 2020", "Tom started high school in 2020.", 1.0, True),
    ("The year 2010 was the year when Tom started high school.", "Tom started high school in 2020.", 8 / 15, False),
])
def test_gate(answer, ref, f1, ok):
    assert hs.gate(answer, ref, 0.5) == (pytest.approx(f1), ok)


# ---------------------------------------------------------------- needle placement
def haystack(tmp_path):
    d = tmp_path / "essays"
    d.mkdir()
    (d / "b.txt").write_text("Zebras graze on the plain. " * 20)
    (d / "a.txt").write_text("Apples fall from the tree. Birds sing in the morning. " * 10)
    return d


def test_needle_goes_at_a_sentence_end_and_is_found(tmp_path):
    tok = ByteTok()
    hay = tok.encode("".join(p.read_text() for p in sorted(haystack(tmp_path).glob("*.txt"))))
    question, needle, _ = hs.NEEDLES[0]
    for depth in (0, 37, 50, 100):
        ids, (s, e) = hs.build_prompt(tok, hay, needle, question, 600, depth, True)
        assert tok.decode(ids[s:e]) == " " + needle and abs(len(ids) - 600) <= 2
        before = tok.decode(ids[:s])
        assert before.endswith("Text:") if depth == 0 else before.endswith(".")  # the span has the space
        text = tok.decode(ids)
        assert text.startswith("<u>Read the text") and text.count(question) == 2
    assert hs.find_span([1, 2, 3, 4], [4, 3, 9]) == (1, 4)  # no exact match: the most tokens in common


@needs_data("paul_graham_essays")
def test_needle_located_with_the_real_tokenizer(default_checkpoint):
    from tokenizer import load_tokenizer
    tok = load_tokenizer(default_checkpoint)
    d = hs.haystack_dir(None)
    hay = tok.encode("".join(p.read_text() for p in sorted(d.glob("*.txt"))[:2]), bos=False)
    for question, needle, _ in hs.NEEDLES:
        for depth in (0, 50, 100):
            ids, (s, e) = hs.build_prompt(tok, hay, needle, question, 500, depth, True)
            assert tok.decode(ids[s:e]) == " " + needle and abs(len(ids) - 500) <= 2


def test_grid():
    args = hs.parse_args(["--min_len", "100", "--max_len", "400", "--context_intervals", "4", "--depths", "50,10",
                          "--needles", "3,1"])
    assert hs.grid(args) == [(j, L, d) for j in (0, 2) for L in (100, 200, 300, 400) for d in (10, 50)]


# ---------------------------------------------------------------- the recorder and end to end
@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield Transformer(ModelArgs.from_name("tiny")).eval().requires_grad_(False)
    torch.set_num_threads(threads)


def test_recorder_rows_are_the_prompt_attention(tiny):
    """The recorder's first row (the last prompt token through a decode step) equals softmax(q k^T /
    sqrt(D)) of that token's query in a prefill of the whole prompt, per query head (h -> KV head h // G)."""
    ids = list(range(3, 40))
    _, rows = hs.answer(tiny, ByteTok(), ids, lambda r: r.clone(), 1, "cpu")
    caps = [Capture(c) for c in kv.make_caches(tiny.args, kv.CacheConfig(), 1, len(ids), 0, "cpu", torch.float32)]
    tiny.setup_caches(caps)
    tiny.prefill(torch.tensor([ids]), torch.arange(len(ids))[None])
    H, H_kv, D = tiny.args.n_head, tiny.args.n_local_heads, tiny.args.head_dim
    for layer, c in enumerate(caps):
        for h in range(H):
            want = (c.q[0, h, -1] @ c.k[0, h // (H // H_kv)].T / math.sqrt(D)).softmax(-1)
            torch.testing.assert_close(rows[0, layer, h], want, atol=1e-5, rtol=1e-4)


def test_end_to_end_writes_every_head(tiny, tmp_path):
    out = tmp_path / "out"
    hs.main(["--haystack_dir", str(haystack(tmp_path)), "--out", str(out), "--min_len", "360", "--max_len", "420",
             "--context_intervals", "2", "--depths", "0,50,100", "--needles", "1", "--max_new_tokens", "5",
             "--min_f1", "0", "--score", "dililazy", "headkv"], loaded=(tiny, ByteTok()))
    keys = {f"{layer}-{h}" for layer in range(tiny.args.n_layer) for h in range(tiny.args.n_head)}
    needle_len = len(" " + hs.NEEDLES[0][1])
    for kind, fields in hs.FIELDS.items():
        data = json.loads((out / f"{kind}.json").read_text())
        assert (out / f"{kind}.png").stat().st_size > 0
        meta, scores = data["meta"], data["scores"]
        assert meta["score"] == kind and meta["tests_run"] == meta["tests_accepted"] == 6 and len(meta["tests"]) == 6
        assert set(scores) == keys and all(set(v) == set(fields) for v in scores.values())
        if kind == "dililazy":
            for v in scores.values():
                assert 0 <= v["diliscore"] <= 1 and 0 <= v["lazyscore"] <= 1 and 0 <= v["infscore"] <= 1
                assert v["diligent"] + v["distracted"] == pytest.approx(10)  # top-k positions
                assert v["diligent"] + v["subconscious"] == pytest.approx(needle_len)
        else:
            assert all(0 <= v["headkv"] <= 5 for v in scores.values())  # <= 1 per step, <= 5 steps


def test_nothing_passes_the_gate_is_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        gen.cli(partial(hs.main, loaded=(tiny, ByteTok())),
                ["--haystack_dir", str(haystack(tmp_path)), "--out", str(out), "--min_len", "360", "--max_len", "360",
                 "--context_intervals", "1", "--depths", "50", "--needles", "2", "--max_new_tokens", "3"])
    assert exit_.value.code == 2 and not out.exists()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "no test passed the gate (token F1 >= 0.5" in err[0]


# ---------------------------------------------------------------- bad flags
def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        gen.cli(hs.main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("argv, says", [
    (["--min_len", "900", "--max_len", "800"], "--min_len 900 > --max_len 800"),
    (["--depths", "10,101"], "--depths 10,101: give values in 0..100"),
    (["--depths", "ten"], "comma-separated integers"),
    (["--top_k_infscore", "0"], "--top_k_infscore 0: give at least 1"),
    (["--needles", "4"], "--needles 4: give values in 1..3"),
    (["--min_f1", "2"], "--min_f1 2: give a value in 0..1"),
    (["--score", "snapkv"], "invalid choice"),
])
def test_bad_flags(argv, says, capsys):
    assert says in one_line_error(argv, capsys)


def test_missing_checkpoint_and_haystack(tmp_path, capsys, monkeypatch):
    err = one_line_error(["--checkpoint_path", str(tmp_path / "none"), "--haystack_dir", str(haystack(tmp_path))],
                         capsys)
    assert "no checkpoint at" in err and "prepare" in err
    err = one_line_error(["--haystack_dir", str(tmp_path / "empty")], capsys)
    assert "python scripts/prepare_data.py" in err
    monkeypatch.setattr(hs, "ROOT", tmp_path / "repo")  # neither data/ nor ../shared/data
    err = one_line_error([], capsys)
    assert str(tmp_path / "repo/data") in err and str(tmp_path / "shared/data") in err
