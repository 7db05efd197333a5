"""Converters against transformers: exact weight round trips, RoPE layout by attention scores, configs,
tokenizers of tiny random models, the real SmolLM2 GGUF, and one-line errors on bad files."""
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import convert_gguf
import convert_hf
import tokenizer as tk
from convert_hf import ours_to_hf

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["the cat sat on the mat", "then the other one", "Hello world 12345, naïve café",
          "def f(x):\n    return x * 2\n", "  spaces   and\ttabs\n\n", "中文 text and émoji 🙂"] * 20
TEXTS = CORPUS[:6] + ["unseen words: zebra quartz 9876", "e\u0301 composed?", "x  1\r\n\r\n  y", ""]
QWEN2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                  "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role']"
                   " + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                   "{% endif %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
                    "{{ m['content'] + eos_token }}{% else %}{{ raise_exception('only user and assistant roles') }}"
                    "{% endif %}{% endfor %}")
SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             num_hidden_layers=2, max_position_embeddings=128)


def _llama3(d: Path):
    """Llama-3 style: untied, GQA, head_dim != hidden/heads, llama3 rope scaling, bf16, Meta tiktoken file."""
    ranks = {bytes([b]): b for b in range(256)} | {b"th": 256, b"he": 257, b"the": 258, b" t": 259, b" the": 260}
    (d / "original").mkdir(parents=True)
    tk.write_tiktoken_file(d / "original/tokenizer.model", ranks)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}))
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=64)
    cfg = transformers.LlamaConfig(vocab_size=520, head_dim=32, rope_parameters=rope, tie_word_embeddings=False,
                                   bos_token_id=261, eos_token_id=[262, 270], **SMALL)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def _qwen2(d: Path):
    """Qwen2 style: q/k/v biases, tied embeddings, tokenizer.json trained here with Qwen2's split and NFC."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=330, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])  # appended, as in Qwen2
    d.mkdir(parents=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "chat_template": QWEN2_TEMPLATE}))
    eos = tok.token_to_id("<|endoftext|>")
    cfg = transformers.Qwen2Config(vocab_size=tok.get_vocab_size() + 5, tie_word_embeddings=True,
                                   eos_token_id=eos, **SMALL)
    return transformers.Qwen2ForCausalLM(cfg)


def _mistral(d: Path):
    """Mistral style: sentencepiece tokenizer.model (trained here), [INST] chat, fp16."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)  # as Llama-2/Mistral's
    d.mkdir(parents=True)
    (d / "tokenizer.model").write_bytes(model.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": MISTRAL_TEMPLATE}))
    cfg = transformers.MistralConfig(vocab_size=400, sliding_window=None, bos_token_id=1, eos_token_id=2, **SMALL)
    return transformers.MistralForCausalLM(cfg).to(torch.float16)


MAKERS = {"llama3": _llama3, "qwen2": _qwen2, "mistral": _mistral}


@pytest.fixture(scope="module", params=list(MAKERS))
def tiny(request, tmp_path_factory):
    """(kind, hf_dir, out_dir, config) for one tiny random model, saved by transformers and converted."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(request.param)
    MAKERS[request.param](root / "hf").save_pretrained(root / "hf")
    cfg = convert_hf.convert(root / "hf", root / "out", name=request.param)
    return request.param, root / "hf", root / "out", cfg


def test_weights_round_trip_exactly(tiny):
    kind, hf_dir, out_dir, cfg = tiny
    hf = load_file(hf_dir / "model.safetensors")
    if cfg["tie_embeddings"]:
        hf.pop("lm_head.weight", None)
    back = ours_to_hf(load_file(out_dir / "model.safetensors"), cfg)
    assert back.keys() == hf.keys()
    for k, v in hf.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


@torch.no_grad()
def test_rope_layout_by_attention_scores(tiny):
    """q.k after RoPE: HF's module and rotate_half on HF weights == interleaved pairs (2j, 2j+1) on ours.
    This is what pins the permutation's direction; the round trip alone would pass for any bijection."""
    kind, hf_dir, out_dir, cfg = tiny
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    attn, rotary = model.model.layers[1].self_attn, model.model.rotary_emb
    apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    nh, nkv, hd, T = cfg["n_head"], cfg["n_local_heads"], cfg["head_dim"], 9
    x, pos = torch.randn(1, T, cfg["dim"]), torch.arange(T)[None]
    heads = lambda t, n: t.view(1, T, n, hd).transpose(1, 2)
    q, k = apply_rope(heads(attn.q_proj(x), nh), heads(attn.k_proj(x), nkv), *rotary(x, pos))
    want = q @ k.repeat_interleave(nh // nkv, 1).transpose(-1, -2)

    w = load_file(out_dir / "model.safetensors")
    qkv = x @ w["layers.1.attention.wqkv.weight"].float().T
    if cfg["qkv_bias"]:
        qkv = qkv + w["layers.1.attention.wqkv.bias"].float()
    angle = pos[0, :, None] * rotary.inv_freq[None, :]  # [T, hd/2]; the scaled llama3 frequencies

    def rope_interleaved(t, n):
        a, b = t.view(1, T, n, hd // 2, 2).unbind(-1)
        c, s = angle.cos()[:, None] * rotary.attention_scaling, angle.sin()[:, None] * rotary.attention_scaling
        return torch.stack([a * c - b * s, a * s + b * c], -1).view(1, T, n, hd).transpose(1, 2)

    q2, k2, _ = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
    k_t = rope_interleaved(k2, nkv).repeat_interleave(nh // nkv, 1).transpose(-1, -2)
    tol = dict(atol=1e-3, rtol=1e-3)  # the same bf16/fp16 weights, fp32 math on both sides
    assert torch.allclose(rope_interleaved(q2, nh) @ k_t, want, **tol)
    # Negative control: HF's q rows without our permutation give other scores, so the check has teeth.
    assert not torch.allclose(rope_interleaved(attn.q_proj(x), nh) @ k_t, want, **tol)


def test_config_fields(tiny):
    kind, hf_dir, out_dir, cfg = tiny
    assert json.loads((out_dir / "config.json").read_text()) == cfg
    common = dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96, block_size=128, name=kind)
    assert {k: cfg[k] for k in common} == common
    t = cfg["tokenizer"]
    assert (t["bos_token"], t["eos_token"]) == {"llama3": ("<|begin_of_text|>", "<|eot_id|>"), "qwen2": (None, None),
                                                "mistral": ("<s>", "</s>")}[kind]
    if kind == "llama3":
        assert cfg["head_dim"] == 32 and cfg["rope_base"] == 500000.0 and cfg["vocab_size"] == 520
        assert cfg["rope_scaling"] == dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=64)
        assert not cfg["tie_embeddings"] and not cfg["qkv_bias"]
        assert (t["kind"], t["bos_id"], t["add_bos"], t["chat_format"]) == ("tiktoken", 261, True, "llama3")
        assert t["stop_ids"] == [262, 270] and t["special_tokens"]["<|eot_id|>"] == 270
    if kind == "qwen2":
        assert cfg["head_dim"] == 16 and cfg["rope_scaling"] is None and cfg["tie_embeddings"] and cfg["qkv_bias"]
        assert (t["chat_format"], t["default_system"], t["bos_id"], t["normalize"]) == (
            "chatml", "You are a helpful assistant.", None, "NFC")
        assert t["stop_ids"] == sorted(t["special_tokens"][s] for s in ("<|im_end|>", "<|endoftext|>"))
    if kind == "mistral":
        assert not cfg["tie_embeddings"] and cfg["rope_scaling"] is None
        assert (t["kind"], t["bos_id"], t["add_bos"], t["chat_format"], t["stop_ids"]) == (
            "sentencepiece", 1, True, "mistral", [2])


def test_tokenizer_matches_source(tiny):
    kind, hf_dir, out_dir, cfg = tiny
    ours = tk.load_tokenizer(out_dir)
    if kind == "qwen2":  # the HF tokenizers library on the tokenizer.json we converted from
        from tokenizers import Tokenizer
        ref = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
        for t in TEXTS + ["a<|im_end|>b"]:
            assert ours._encode(t, special=True) == ref.encode(t).ids, repr(t)
        prompt = ours.apply_chat("hi")
        assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
        assert ours.encode_prompt("hi") == ref.encode(prompt).ids
    if kind == "mistral":
        import sentencepiece as spm
        ref = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
        assert ours.encode("the cat") == [1] + ref.encode("the cat")
        assert ours.encode_prompt("hi") == [1] + ref.encode("[INST] hi [/INST]")
    if kind == "llama3":
        assert ours.encode(" the") == [261, 260] and ours.encode("the", bos=False) == [258]
        assert ours.encode_prompt("hi")[:2] == [261, 261 + 6]  # BOS, <|start_header_id|>
    for t in TEXTS:
        if kind != "qwen2" or t == tk.unicodedata.normalize("NFC", t):
            assert ours.decode(ours.encode(t, bos=False)) == t


def _hf_chat_tokenizer(kind: str, hf_dir: Path, cfg: dict):
    """transformers' own tokenizer for each tiny model, built from the files we converted from."""
    tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    if kind == "qwen2":
        return transformers.AutoTokenizer.from_pretrained(hf_dir)
    if kind == "llama3":  # transformers' converter of Meta's tiktoken file, special tokens appended in id order
        from transformers.convert_slow_tokenizer import TikTokenConverter
        special = cfg["tokenizer"]["special_tokens"]
        tok = TikTokenConverter(vocab_file=str(hf_dir / "original/tokenizer.model"),
                                extra_special_tokens=sorted(special, key=special.get)).converted()
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **tcfg)
    # mistral: transformers' LlamaTokenizer in legacy mode (the hub's Llama-2/Mistral tokenizer.json) on the
    # sentencepiece vocabulary; transformers' own reader of tokenizer.model needs protobuf, not installed here.
    import sentencepiece
    from transformers.tokenization_utils_base import generate_merges
    sp = sentencepiece.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    return transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), legacy=True, **tcfg)


SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "the cat sat on the mat?\n  12345, naïve"}
REPLY = {"role": "assistant", "content": "then the other one 🙂"}
CHATS = [[USER], [SYSTEM, USER], [USER, REPLY, USER], [SYSTEM, USER, REPLY]]


def test_chat_template_matches_transformers(tiny):
    """The template from tokenizer_config.json, rendered and tokenized by us == transformers'
    apply_chat_template, for several conversations with and without the generation prompt."""
    kind, hf_dir, out_dir, cfg = tiny
    assert cfg["tokenizer"]["chat_template"] == json.loads((hf_dir / "tokenizer_config.json").read_text())[
        "chat_template"]
    ours, ref = tk.load_tokenizer(out_dir), _hf_chat_tokenizer(kind, hf_dir, cfg)
    for messages in CHATS:
        for gen in (True, False):
            try:
                want = ref.apply_chat_template(messages, add_generation_prompt=gen)["input_ids"]
            except Exception as e:  # mistral's template refuses a system turn: so must ours
                with pytest.raises(ValueError, match=f"^chat template: TemplateError: {e}$"):
                    ours.encode_chat(messages, gen)
                continue
            assert ours.encode_chat(messages, add_generation_prompt=gen) == want, (messages, gen)
    assert ours.encode_prompt(USER["content"]) == ref.apply_chat_template([USER], add_generation_prompt=True)[
        "input_ids"]


def test_chat_template_sources(tmp_path):
    """tokenizer_config.json's string or named list, else chat_template.jinja (transformers 5 writes that)."""
    assert convert_hf._chat_template(tmp_path) == ""
    (tmp_path / "chat_template.jinja").write_text("{{ a }}")
    assert convert_hf._chat_template(tmp_path) == "{{ a }}"
    named = [{"name": "tool_use", "template": "{{ t }}"}, {"name": "default", "template": "{{ d }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert convert_hf._chat_template(tmp_path) == "{{ d }}"


def test_hf_config_old_style_keys():
    """Hub configs written before transformers 5 keep rope_theta and rope_scaling at the top level."""
    c = dict(model_type="llama", num_attention_heads=32, hidden_size=4096, num_key_value_heads=8,
             intermediate_size=14336, num_hidden_layers=32, max_position_embeddings=131072, rms_norm_eps=1e-5,
             rope_theta=500000.0, tie_word_embeddings=False,
             rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192, rope_type="llama3"))
    cfg = convert_hf.hf_config(c, {"model.embed_tokens.weight": torch.empty(128256, 4096)}, "x")
    assert (cfg["head_dim"], cfg["rope_base"], cfg["rope_scaling"]["factor"], cfg["vocab_size"]) == (
        128, 500000.0, 8.0, 128256)
    with pytest.raises(ValueError, match="yarn"):
        convert_hf.hf_config(c | {"rope_scaling": {"rope_type": "yarn"}}, {}, "x")


def test_bpe_merges_out_of_id_order_fail_loudly():
    alphabet = tk.bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)} | {"ab": 300, "cd": 299}
    with pytest.raises(ValueError, match="out of order"):
        tk.byte_level_bpe_ranks(vocab, ["a b", "c d"])
    assert tk.byte_level_bpe_ranks(vocab, ["c d", "a b"])[b"ab"] == 300
    with pytest.raises(ValueError, match="continuation"):
        tk.byte_level_bpe_ranks({alphabet[b]: b for b in range(0x80)}, [])


def test_gguf_matches_transformers_gguf_loader(default_checkpoint, default_gguf, tmp_path):
    """transformers un-permutes llama.cpp's q/k itself; ours_to_hf of our (unpermuted) GGUF conversion must
    give exactly its tensors, which confirms GGUF q/k are already interleaved. Also: the checkpoint that
    prepare_default.sh wrote is what the converter makes now."""
    meta, tensors = convert_gguf.read_gguf(default_gguf)
    cfg = convert_gguf.gguf_config(meta, tensors, "smollm2-135m-instruct")
    ours = convert_gguf.gguf_weights(tensors, cfg)
    (tmp_path / "model.gguf").symlink_to(default_gguf)  # alone: HF must not see our config.json
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    hf = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    back = ours_to_hf(ours, cfg)
    assert back.keys() == hf.keys()
    for k, v in hf.items():
        assert torch.equal(back[k], v), k
    c = model.config
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_local_heads"], cfg["dim"], cfg["intermediate_size"]) == (
        c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.intermediate_size)
    assert (cfg["rope_base"], cfg["norm_eps"], cfg["block_size"], cfg["tie_embeddings"]) == (
        100000.0, 1e-5, 8192, True)
    saved = json.loads((default_checkpoint / "config.json").read_text())
    assert {k: v for k, v in saved.items() if k != "tokenizer"} == cfg
    on_disk = load_file(default_checkpoint / "model.safetensors")
    assert on_disk.keys() == ours.keys() and all(torch.equal(on_disk[k], v) for k, v in ours.items())


def _one_line_exit(script: str, *args) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


@pytest.mark.parametrize("tiny", ["llama3"], indirect=True)
def test_corrupt_safetensors_is_one_clear_error(tiny, tmp_path):
    kind, hf_dir, out_dir, cfg = tiny
    bad = tmp_path / "hf"
    bad.mkdir()
    for f in hf_dir.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    data = (hf_dir / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read .*model.safetensors"):
        convert_hf.convert(bad, tmp_path / "out")
    assert "convert_hf: cannot read" in _one_line_exit("convert_hf.py", bad, tmp_path / "out")


def test_corrupt_gguf_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="cannot read GGUF"):
        convert_gguf.convert(bad, tmp_path / "out")
    assert "convert_gguf: cannot read GGUF" in _one_line_exit("convert_gguf.py", bad, tmp_path / "out")
    assert "cannot read GGUF" in _one_line_exit("convert_gguf.py", tmp_path / "missing.gguf", tmp_path / "out")


def test_truncated_real_gguf_is_one_clear_error(default_gguf, tmp_path):
    with open(default_gguf, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(3_000_000))  # whole metadata, part of the tensors
    with pytest.raises(ValueError, match="cannot read GGUF"):
        convert_gguf.read_gguf(tmp_path / "cut.gguf")


def test_unsupported_gguf_tokenizer_refused(tmp_path):
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2"}
    with pytest.raises(ValueError, match="pre-tokenizer 'qwen2' is not supported"):
        convert_gguf.gguf_tokenizer(meta, tmp_path)
