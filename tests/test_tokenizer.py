"""Our tiktoken SmolLM2 tokenizer against transformers' tokenizer built independently from the same GGUF."""
import json
import random
import shutil
from pathlib import Path

import pytest

from tokenizer import load_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

HANDWRITTEN = [
    "", " ", "a", "Hello, world!", "1234567890", "3.14159 + 2.71828 = 5.85987", "x  1", "x \t 12 3", " 1",
    "In 1998,  2000 and   30000 people", "hello  \n\n 2", "I'm, you're, he's, we'll, they'd, DON'T, I've",
    "trailing spaces   ", "   leading", "\n\n\n", "a\r\nb\r\n", "\t\tindented\n    code", "tabs\tand\u00a0nbsp",
    "naïve café résumé", "e\u0301 (combining)", "中文字符和标点。", "日本語のテキスト", "한국어", "Привет, мир",
    "مرحبا بالعالم ٣٤٥", "emoji 🙂👍🏽 family 👨‍👩‍👧", "math ∑ ∫ √ ≤ ≥ ≠ ∞", "ﬁ ligature, ½ fraction, Ⅻ",
    "def f(x):\n    return x ** 2  # square\n", '{"key": [1, 2, {"nested": null}]}', "if (a && b || !c) { i++; }",
    r"regex: ^\s*(\d+)\.(\d{2,})$", "<html><body class='x'>hi</body></html>", "https://example.com/a?b=c&d=e#f",
    "<|im_start|>user\nhi<|im_end|>", "text <|endoftext|> more", "<|im_end|><|im_end|>", "<repo_name>x<file_sep>",
]


def _texts() -> list[str]:
    """A few hundred strings: handwritten edge cases, the shared eval data, and seeded random mixtures."""
    if not DATA.is_dir():
        pytest.skip(f"no shared data at {DATA}")
    texts = list(HANDWRITTEN)
    for line in (DATA / "gsm8k/test.jsonl").read_text().splitlines()[:60]:
        rec = json.loads(line)
        texts += [rec["question"], rec["answer"]]
    for line in (DATA / "medqa/test.jsonl").read_text().splitlines()[:20]:
        texts.append(json.loads(line)["question"])
    essay = sorted((DATA / "paul_graham_essays/essays").glob("*.txt"))[0].read_text()
    texts += [essay[i:i + 1500] for i in range(0, 30000, 1500)]
    wiki = (DATA / "wikitext2_raw/wiki.test.raw").read_bytes().decode()  # keeps its " \r\n" line ends
    texts += [wiki[i:i + 1000] for i in range(0, 40000, 1000)]
    rng = random.Random(0)
    alphabet = [" ", "  ", "\n", "\t", "\r\n", "a", "B", "1", "23", "'s", "'", ".", "é", "e\u0301", "中文", "🙂",
                "the", "\u00a0", "-", "__", "{", "}", "=>", "٣", "<|im_end|>", "<|im_start|>"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    return texts


@pytest.fixture(scope="module")
def ours(default_checkpoint):
    return load_tokenizer(default_checkpoint)


@pytest.fixture(scope="module")
def ref(default_gguf, tmp_path_factory):
    """transformers builds its own tokenizer from the GGUF's vocabulary and merges. Its GGUF loader has no
    entry for the pre-tokenizer "smollm" and falls back to GPT-2's split, so give it the split of SmolLM2's
    hub tokenizer.json (digits isolated, then GPT-2's regex), which llama.cpp's "smollm" also implements."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers
    alone = tmp_path_factory.mktemp("gguf")  # not beside our config.json/tokenizer.model, which HF would read
    (alone / "model.gguf").symlink_to(default_gguf)
    tok = transformers.AutoTokenizer.from_pretrained(alone, gguf_file="model.gguf")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tok


def test_encode_matches_reference(ours, ref):
    texts = _texts()
    assert len(texts) > 400
    # split_special_tokens: text that spells "<|im_end|>" is text, as in ours.encode; templates differ (below).
    bad = [t for t in texts if ours.encode(t) != ref.encode(t, add_special_tokens=False, split_special_tokens=True)]
    assert not bad, f"{len(bad)} mismatches, first {bad[0]!r}"


def test_special_tokens_in_templates_match_reference(ours, ref):
    texts = [t for t in _texts() if "<|im_" in t]
    assert texts
    for t in texts:  # ref without split_special_tokens matches special strings, as a template encode must
        assert ours._encode(t, special=True) == ref.encode(t, add_special_tokens=False)


def test_decode_inverts_encode(ours):
    for t in _texts():
        assert ours.decode(ours.encode(t)) == t


def test_bytes_missing_from_vocab_are_dropped_like_hf(ours, ref):
    # SmolLM2 has no token for bytes 0x04, 0x06, 0x13, ...: HF drops them after splitting; tiktoken would panic.
    for t in ["a\x04b", "th\x04e", " \x04.", "x  \x04", "=\x04>", "\x1d\x1d 12", "<|im_end|>\x04"]:
        assert ours.encode(t) == ref.encode(t, add_special_tokens=False, split_special_tokens=True), repr(t)
        assert ours._encode(t, special=True) == ref.encode(t, add_special_tokens=False), repr(t)


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_chat_template_matches_reference(ours, ref, system):
    user = "What is 12 + 30?\nAnswer briefly."
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    want_text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want_ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ours.apply_chat(user, system=system) == want_text
    assert ours._encode(want_text, special=True) == want_ids
    if system is None:
        assert ours.encode_prompt(user) == want_ids
    assert ours.encode_prompt(user, chat=False) == ours.encode(user)
    assert "<|im_start|>system" not in ours.apply_chat(user, system="")  # "" means no system turn


def test_ids_and_config(ours):
    assert ours.stop_ids == [0, 2] and ours.decode([2]) == "<|im_end|>" and ours.decode([0]) == "<|endoftext|>"
    assert ours.bos_id == 1 and not ours.add_bos and ours.encode("hi")[0] != 1
    assert ours.encode("hi", bos=True)[0] == 1
    assert ours.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_missing_or_corrupt_tokenizer_is_one_clear_error(default_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare"):
        load_tokenizer(tmp_path)
    shutil.copy(default_checkpoint / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("not base64 at all\n")
    with pytest.raises(ValueError, match="cannot read tokenizer") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
