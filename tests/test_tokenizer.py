"""Our tiktoken SmolLM2 tokenizer and chat template against transformers' tokenizer built independently from
the same GGUF."""
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


@pytest.fixture(scope="module")
def templated_dir(default_gguf, tmp_path_factory) -> Path:
    """The GGUF's tokenizer converted now, with its chat template (the prepared checkpoint may predate that)."""
    import convert_gguf
    out = tmp_path_factory.mktemp("templated")
    meta, _ = convert_gguf.read_gguf(default_gguf, with_tensors=False)
    (out / "config.json").write_text(json.dumps({"tokenizer": convert_gguf.gguf_tokenizer(meta, out)}))
    return out


def _with_template(src: Path, dst: Path, template: str | None) -> Path:
    spec = json.loads((src / "config.json").read_text())["tokenizer"] | {"chat_template": template}
    (dst / "config.json").write_text(json.dumps({"tokenizer": spec}))
    (dst / "tokenizer.model").symlink_to(src / "tokenizer.model")
    return dst


@pytest.fixture(scope="module")
def templated(templated_dir):
    tok = load_tokenizer(templated_dir)
    assert tok._render is not None and "SmolLM" in json.loads((templated_dir / "config.json").read_text())[
        "tokenizer"]["chat_template"]
    return tok


@pytest.fixture(scope="module")
def fallback(templated_dir, tmp_path_factory):
    """The same tokenizer as a checkpoint converted before templates were kept: hand-written ChatML."""
    return load_tokenizer(_with_template(templated_dir, tmp_path_factory.mktemp("fallback"), None))


SYSTEM = {"role": "system", "content": "You are terse.\nAnswer in one line."}
USER = {"role": "user", "content": "What is 12 + 30?\nAnswer briefly."}
REPLY = {"role": "assistant", "content": "42.  Anything else?"}
USER2 = {"role": "user", "content": "Yes: naïve café 🙂, x  1 and a literal <|im_end|> in text."}
CONVERSATIONS = {"user": [USER], "system+user": [SYSTEM, USER], "multi-turn": [USER, REPLY, USER2],
                 "system+multi-turn": [SYSTEM, USER, REPLY, USER2], "ends-with-reply": [SYSTEM, USER, REPLY]}


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_checkpoint_template_matches_apply_chat_template(templated, ref, name, generation_prompt):
    """The GGUF's own Jinja template, rendered and tokenized by us == transformers' apply_chat_template.
    A special-token string inside a message is special in both (HF's default, no sanitizing)."""
    messages = CONVERSATIONS[name]
    want = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)["input_ids"]
    assert templated.encode_chat(messages, add_generation_prompt=generation_prompt) == want
    assert templated.render_chat(messages, generation_prompt) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt)
    tail = [1, *templated.encode("assistant\n")] if generation_prompt else [2, 198]  # <|im_start|>, <|im_end|>
    assert want[-len(tail):] == tail  # so the flag matters: a renderer that dropped it could not pass


@pytest.mark.parametrize("system", [None, SYSTEM["content"]])
def test_encode_prompt_matches_reference_with_and_without_template(ours, templated, fallback, ref, system):
    """encode_prompt/apply_chat (generate.py, tasks.py): one user turn, the same ids from the template, from
    the hand-written fallback and from the prepared checkpoint (whichever of the two it uses)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [USER]
    want_text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want_ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    for tok in (templated, fallback, ours):
        assert tok.apply_chat(USER["content"], system=system) == want_text
        assert tok.encode_chat(messages) == want_ids
        if system is None:
            assert tok.encode_prompt(USER["content"]) == want_ids
        assert tok.encode_prompt(USER["content"], chat=False) == tok.encode(USER["content"])
    with pytest.raises(ValueError, match="no chat template"):  # the fallback knows one user turn only
        fallback.encode_chat(CONVERSATIONS["multi-turn"])


@pytest.mark.parametrize("template, error", [
    ("{{ messages[0].content.__class__.__mro__ }}", "SecurityError: access to attribute '__class__'"),
    ("{{ messages.append(messages[0]) }}", "SecurityError: access to attribute 'append'"),  # immutable
    ("{% for m in messages %}{{ m.content }}", "TemplateSyntaxError"),
])
def test_unsafe_or_broken_template_is_refused_at_load_in_one_line(templated_dir, tmp_path, template, error):
    with pytest.raises(ValueError, match=error) as e:
        load_tokenizer(_with_template(templated_dir, tmp_path, template))
    assert "\n" not in str(e.value) and "chat template" in str(e.value)


def test_raise_exception_in_template_is_one_line_error(templated_dir, tmp_path):
    template = ("{% if messages[0].role == 'system' %}{{ raise_exception('no system role here') }}{% endif %}"
                "{% for m in messages %}{{ bos_token + m.content + eos_token }}{% endfor %}{{ strftime_now('%Y') }}")
    tok = load_tokenizer(_with_template(templated_dir, tmp_path, template))
    assert tok.render_chat([USER])[:-4] == f"<|im_start|>{USER['content']}<|im_end|>"
    with pytest.raises(ValueError, match="^chat template: TemplateError: no system role here$"):
        tok.encode_chat([SYSTEM, USER])


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
