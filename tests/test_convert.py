"""Converters against transformers: exact weight round trips, RoPE layout by attention scores, configs,
tokenizers of tiny random models, the real SmolLM2 GGUF, and one-line errors on bad files."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import convert_gguf
import convert_hf
import families
import tokenizer as tk
from convert_hf import ours_to_hf
from model import ModelArgs

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
CORPUS = families.CORPUS
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
    families.write_llama3_tokenizer(d, LLAMA3_TEMPLATE)
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=64)
    cfg = transformers.LlamaConfig(vocab_size=520, head_dim=32, rope_parameters=rope, tie_word_embeddings=False,
                                   bos_token_id=261, eos_token_id=[262, 270], **SMALL)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def _qwen2(d: Path):
    """Qwen2 style: q/k/v biases, tied embeddings, tokenizer.json trained here with Qwen2's split and NFC."""
    tok = families.write_qwen2_tokenizer(d, QWEN2_TEMPLATE)
    eos = tok.token_to_id("<|endoftext|>")
    cfg = transformers.Qwen2Config(vocab_size=tok.get_vocab_size() + 5, tie_word_embeddings=True,
                                   eos_token_id=eos, **SMALL)
    return transformers.Qwen2ForCausalLM(cfg)


def _mistral(d: Path):
    """Mistral style: sentencepiece tokenizer.model (trained here, as Llama-2/Mistral's), [INST] chat, fp16."""
    d.mkdir(parents=True)
    (d / "tokenizer.model").write_bytes(families.train_spm(vocab_size=400))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": MISTRAL_TEMPLATE}))
    cfg = transformers.MistralConfig(vocab_size=400, sliding_window=None, bos_token_id=1, eos_token_id=2, **SMALL)
    return transformers.MistralForCausalLM(cfg).to(torch.float16)


MAKERS = {"llama3": _llama3, "qwen2": _qwen2, "mistral": _mistral, **families.FAMILIES}
FIRST = ("llama3", "qwen2", "mistral")  # q_proj/k_proj and the plain rotary module; the others: test_families.py


@pytest.fixture(scope="module", params=list(MAKERS))
def tiny(request, tmp_path_factory):
    """(kind, hf_dir, out_dir, config) for one tiny random model, saved by transformers and converted."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(request.param)
    MAKERS[request.param](root / "hf").save_pretrained(root / "hf")
    cfg = convert_hf.convert(root / "hf", root / "out", name=request.param)
    return request.param, root / "hf", root / "out", cfg


def test_weights_round_trip_exactly(tiny):
    """Exactly, but for Gemma's folded norms ((1 + w) s in fp32, then back: rounding)."""
    kind, hf_dir, out_dir, cfg = tiny
    hf = load_file(hf_dir / "model.safetensors")
    if cfg["tie_embeddings"]:
        hf.pop("lm_head.weight", None)
    back = ours_to_hf(load_file(out_dir / "model.safetensors"), cfg, json.loads((hf_dir / "config.json").read_text()))
    assert back.keys() == hf.keys()
    for k, v in hf.items():
        same = torch.allclose(back[k], v, atol=1e-6, rtol=0) if kind == "gemma3" and "norm" in k else torch.equal(back[k], v)
        assert back[k].dtype == v.dtype and same, k


@torch.no_grad()
def test_rope_layout_by_attention_scores(tiny):
    """q.k after RoPE: HF's module and rotate_half on HF weights == interleaved pairs (2j, 2j+1) on ours.
    This is what pins the permutation's direction; the round trip alone would pass for any bijection."""
    kind, hf_dir, out_dir, cfg = tiny
    if kind not in FIRST:
        pytest.skip("fused or normed q/k, or per-layer-type rotary modules: test_families.py compares logits")
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
    assert ModelArgs.from_json(out_dir / "config.json")  # every field, format 2
    if kind not in FIRST:
        return new_family_fields(kind, cfg)
    common = dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96, block_size=128, name=kind)
    assert {k: cfg[k] for k in common} == common
    t = cfg["tokenizer"]
    assert (t["bos_token"], t["eos_token"]) == {"llama3": ("<|begin_of_text|>", "<|eot_id|>"), "qwen2": (None, None),
                                                "mistral": ("<s>", "</s>")}[kind]
    if kind == "llama3":
        assert cfg["head_dim"] == 32 and cfg["rope_base"] == 500000.0 and cfg["vocab_size"] == 520
        assert cfg["rope_scaling"] == dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
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


def new_family_fields(kind, cfg):
    plain = dict(qk_norm=False, post_norms=False, mlp_act="silu", embed_scale=1.0, sliding_window=0, local_layers=[],
                 local_rope_base=0.0, rope_scaling=None, qkv_bias=False)
    t = cfg["tokenizer"]
    want = {"qwen3": plain | dict(qk_norm=True, head_dim=32, tie_embeddings=False),
            "gemma3": dict(qk_norm=True, post_norms=True, mlp_act="gelu_tanh", embed_scale=8.0, sliding_window=16,
                           local_layers=[0, 1], local_rope_base=10000.0, rope_base=1e6, tie_embeddings=True, head_dim=32,
                           rope_scaling=dict(rope_type="linear", factor=8.0), n_layer=3, qkv_bias=False),
            "llama32": plain | dict(tie_embeddings=True, rope_base=500000.0, rope_scaling=dict(
                rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=64)),
            "phi3": plain | dict(sliding_window=16, local_layers=[0, 1], tie_embeddings=False, head_dim=16),
            "phi3_longrope": plain | dict(sliding_window=0, rope_scaling=dict(
                rope_type="longrope", short_factor=pytest.approx([1.0 + 0.1 * i for i in range(8)]),
                long_factor=pytest.approx([1.5 + 0.7 * i for i in range(8)]), original_max_position_embeddings=64,
                attention_factor=pytest.approx((1 + math.log(4) / math.log(64)) ** 0.5)))}[kind]
    assert {k: cfg[k] for k in want} == want
    if kind == "qwen3":
        assert (t["kind"], t["chat_format"], t["stop_ids"]) == ("tiktoken", "chatml", sorted(
            t["special_tokens"][s] for s in ("<|im_end|>", "<|endoftext|>")))
    if kind == "gemma3":  # its turn markers are pieces and tokenizer.json's special tokens
        assert (t["kind"], t["bos_id"], t["bos_token"], t["stop_ids"]) == ("sentencepiece", 2, "<bos>", [1])
        assert t["special_tokens"]["<end_of_turn>"] == 5 and t["strip"] == {}
    if kind.startswith("phi3"):  # the chat tokens exist only in tokenizer.json, past the 400 pieces
        assert {k: t["special_tokens"][k] for k in families.PHI3_ADDED} == dict(zip(families.PHI3_ADDED, range(400, 405)))
        assert t["strip"] == {k: "r" for k in families.PHI3_ADDED[1:]} and t["stop_ids"] == [2, 400]


def test_tokenizer_matches_source(tiny):
    kind, hf_dir, out_dir, cfg = tiny
    ours = tk.load_tokenizer(out_dir)
    if kind in ("qwen3", "gemma3"):  # transformers' tokenizer on the tokenizer.json we converted beside
        ref = transformers.AutoTokenizer.from_pretrained(hf_dir)
        for t in TEXTS + ["a<|im_end|>b", "x<end_of_turn>y"]:
            if kind == "gemma3" or t == tk.unicodedata.normalize("NFC", t):
                assert ours._encode(t, special=True) == ref.encode(t, add_special_tokens=False), repr(t)
    if kind.startswith("phi3"):  # the pieces: sentencepiece's own; the added tokens and their rstrip: transformers'
        import sentencepiece as spm
        sp, ref = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model")), \
            transformers.AutoTokenizer.from_pretrained(hf_dir)
        for t in TEXTS:
            assert ours.encode(t, bos=False) == sp.encode(t), repr(t)
        for t in ("<|user|>\nthe cat<|end|>\n<|assistant|>\n", "a <|end|>  b<|endoftext|>c"):
            assert ours._encode(t, special=True) == ref.encode(t, add_special_tokens=False), repr(t)
        assert ours.decode(ours._encode("<|user|>\nthe cat<|end|>", special=True)) == "<|user|>the cat<|end|>"
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
        if kind not in ("qwen2", "qwen3") or t == tk.unicodedata.normalize("NFC", t):
            assert ours.decode(ours.encode(t, bos=False)) == t


def _hf_chat_tokenizer(kind: str, hf_dir: Path, cfg: dict):
    """transformers' own tokenizer for each tiny model, built from the files we converted from."""
    tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    if kind in ("qwen2", "qwen3", "gemma3", "phi3", "phi3_longrope"):  # their tokenizer.json, as the hub's
        return transformers.AutoTokenizer.from_pretrained(hf_dir)
    if kind in ("llama3", "llama32"):  # transformers' converter of Meta's tiktoken file, special tokens appended in id order
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
    tcfg, jinja = json.loads((hf_dir / "tokenizer_config.json").read_text()), hf_dir / "chat_template.jinja"
    assert cfg["tokenizer"]["chat_template"] == (tcfg.get("chat_template") or jinja.read_text())  # v5 writes .jinja
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


def test_hub_configs_of_the_new_families():
    """The hub's config.json styles (pre-transformers-5 keys), as remembered from google/gemma-3-4b-it (a
    multimodal config whose text_config lists only what differs from Gemma3TextConfig's defaults; weights
    under language_model.model.*), microsoft/Phi-3-mini-4k-instruct (a 2047-token window on every layer)
    and Phi-3-mini-128k-instruct (LongRoPE, first named "su"), and Qwen3-8B (a window it does not use)."""
    gemma = dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"], text_config=dict(
        hidden_size=2560, intermediate_size=10240, model_type="gemma3_text", num_hidden_layers=34,
        rope_scaling=dict(factor=8.0, rope_type="linear"), sliding_window=1024), vision_config={})
    weights = {"language_model.model.embed_tokens.weight": torch.empty(262208, 2560),
               "language_model.model.layers.0.self_attn.q_norm.weight": torch.empty(256),
               "vision_tower.vision_model.embeddings.patch_embedding.weight": torch.empty(1),
               "multi_modal_projector.mm_input_projection_weight": torch.empty(1)}
    c, w = convert_hf.text_model(gemma, weights)
    assert sorted(w) == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight"]
    cfg = convert_hf.hf_config(c, w, "gemma-3-4b")
    assert cfg == ModelArgs.from_name("gemma-3-4b").__dict__ | dict(name="gemma-3-4b", format=2)
    assert cfg["local_layers"] == [i for i in range(34) if i % 6 != 5] and cfg["sliding_window"] == 1024
    assert convert_hf.gemma_norm_scales(c) == (1.0, 1.0)  # 4B: query_pre_attn_scalar = head_dim = 256
    assert convert_hf.text_model(gemma, {"model.language_model.norm.weight": 1})[1] == {"model.norm.weight": 1}

    phi = dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
               original_max_position_embeddings=4096, rms_norm_eps=1e-05, rope_scaling=None, rope_theta=10000.0,
               sliding_window=2047, tie_word_embeddings=False, hidden_act="silu")
    emb = {"model.embed_tokens.weight": torch.empty(32064, 3072), "lm_head.weight": torch.empty(1)}
    cfg = convert_hf.hf_config(phi, emb, "phi-3-mini-4k")
    assert cfg == ModelArgs.from_name("phi-3-mini-4k").__dict__ | dict(name="phi-3-mini-4k", format=2)
    short, long = [1.0 + i / 48 for i in range(48)], [1.0 + i for i in range(48)]
    phi |= dict(max_position_embeddings=131072, sliding_window=262144,
                rope_scaling=dict(type="su", short_factor=short, long_factor=long))
    s = convert_hf.hf_config(phi, emb, "x")["rope_scaling"]
    assert s == dict(rope_type="longrope", short_factor=short, long_factor=long, original_max_position_embeddings=4096,
                     attention_factor=pytest.approx(1.1902380714238083))  # sqrt(1 + ln 32 / ln 4096)
    assert convert_hf.hf_config(phi, emb, "x")["sliding_window"] == 0  # 262144: past the context, no window

    qwen = dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000, sliding_window=None,
                use_sliding_window=False, max_window_layers=36, tie_word_embeddings=False)
    w = {"model.embed_tokens.weight": torch.empty(151936, 4096), "model.layers.0.self_attn.q_norm.weight": 0}
    assert convert_hf.hf_config(qwen, w, "qwen3-8b") == ModelArgs.from_name("qwen3-8b").__dict__ | dict(
        name="qwen3-8b", format=2)


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
    # the checkpoint may predate config.json's format 2: it must read as what the converter writes now
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ModelArgs.from_json(default_checkpoint / "config.json") == ModelArgs.from_json(tmp_path / "config.json")
    on_disk = load_file(default_checkpoint / "model.safetensors")
    assert on_disk.keys() == ours.keys() and all(torch.equal(on_disk[k], v) for k, v in ours.items())


GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(path: Path, arch: str, model, tokens: list, types: list, merges: list, eos: int, template: str,
               extra: dict | None = None):
    """A float32 GGUF of `model` laid out as llama.cpp's convert_hf_to_gguf.py does (as remembered): llama.cpp
    names; q/k rows permuted to interleaved pairs for "llama" only (the others keep HF's rotate-half rows)."""
    import gguf
    from convert_hf import hf_to_interleaved
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    for add, v in ((w.add_context_length, c.max_position_embeddings), (w.add_embedding_length, c.hidden_size),
                   (w.add_block_count, c.num_hidden_layers), (w.add_feed_forward_length, c.intermediate_size),
                   (w.add_head_count, c.num_attention_heads), (w.add_head_count_kv, c.num_key_value_heads),
                   (w.add_key_length, c.head_dim), (w.add_value_length, c.head_dim),
                   (w.add_rope_freq_base, c.rope_parameters["rope_theta"]), (w.add_layer_norm_rms_eps, c.rms_norm_eps),
                   (w.add_tokenizer_model, "gpt2"), (w.add_tokenizer_pre, "qwen2" if arch == "qwen3" else "llama-bpe"),
                   (w.add_token_list, tokens), (w.add_token_types, types), (w.add_token_merges, merges),
                   (w.add_eos_token_id, eos), (w.add_chat_template, template)):
        add(v)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue
        parts = k.split(".")  # model.layers.N.<module path>.weight
        name = top.get(k) or f"blk.{parts[2]}.{GGUF_LAYER['.'.join(parts[3:-1])]}.weight"
        heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}.get(name.split(".")[-2])
        w.add_tensor(name, (hf_to_interleaved(v, heads) if arch == "llama" and heads else v).float().numpy())
    for name, v in (extra or {}).items():
        w.add_tensor(name, v.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@torch.no_grad()
def gguf_logits_diff(gguf_path: Path, out: Path, model) -> float:
    import cache as kv
    from model import load_model
    convert_gguf.convert(gguf_path, out, name="x")
    ours = load_model(out, dtype=torch.float32)
    ours.setup_caches(kv.make_caches(ours.args, kv.CacheConfig(), 1, 100, 0, "cpu", torch.float32))
    x = torch.randint(3, 250, (1, 100), generator=torch.Generator().manual_seed(0))
    return float((ours.prefill(x, torch.arange(100)[None], all_logits=True) - model(x).logits).abs().max())


def test_qwen3_gguf(tmp_path):
    """A Qwen3 GGUF (llama.cpp keeps its q/k rows in rotate-half order) read by transformers' GGUF loader
    gives the model it was written from (so it is laid out as transformers expects llama.cpp's); ours
    converts it to the same logits, and its qwen2 pre-tokenizer to the source tokenizer.json's tokens.
    head_dim 128: transformers' qwen3 GGUF reader assumes it (every Qwen3 has it)."""
    pytest.importorskip("gguf")  # a requirement; absent on the GPU image
    torch.manual_seed(0)
    tok = families.write_qwen2_tokenizer(tmp_path / "hf", families.QWEN3_TEMPLATE)
    model = families.randomised(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=tok.get_vocab_size(), head_dim=128, num_hidden_layers=2, tie_word_embeddings=False, **families.TINY)))
    tj = json.loads((tmp_path / "hf/tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tj["added_tokens"]}
    tokens = sorted({**tj["model"]["vocab"], **added}.items(), key=lambda kv: kv[1])
    (tmp_path / "alone").mkdir()  # alone: transformers must not see our files
    write_gguf(tmp_path / "alone/q.gguf", "qwen3", model, [t for t, _ in tokens], [3 if t in added else 1 for t, _ in tokens],
               [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]], added["<|im_end|>"],
               families.QWEN3_TEMPLATE)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "alone", gguf_file="q.gguf", dtype=torch.float32)
    assert all(torch.equal(ref.state_dict()[k], v) for k, v in model.state_dict().items())
    assert gguf_logits_diff(tmp_path / "alone/q.gguf", tmp_path / "out", model.eval()) < 1e-5  # measured 2e-6
    ours, src = tk.load_tokenizer(tmp_path / "out"), transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for t in TEXTS + ["a<|im_end|>b"]:
        if t == tk.unicodedata.normalize("NFC", t):
            assert ours._encode(t, special=True) == src.encode(t, add_special_tokens=False), repr(t)
    assert ours.encode_chat(CHATS[1]) == src.apply_chat_template(CHATS[1], add_generation_prompt=True)["input_ids"]


def test_llama32_gguf_rope_freqs(tmp_path):
    """A Llama 3.2 GGUF: tied, q/k permuted by llama.cpp, its Llama-3.1 scaling stored as llama.cpp's
    per-dimension divisors (rope_freqs, computed here by the rule its converter applies). Ours must give
    transformers' logits of the model it came from; without the divisors they differ."""
    pytest.importorskip("gguf")  # a requirement; absent on the GPU image
    torch.manual_seed(0)
    model = families.llama32(tmp_path / "hf").eval()
    c, s = model.config, model.config.rope_parameters
    inv = 1.0 / (s["rope_theta"] ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
    lo, hi, old = s["original_max_position_embeddings"] / s["low_freq_factor"], \
        s["original_max_position_embeddings"] / s["high_freq_factor"], s["original_max_position_embeddings"]
    divisors = []
    for f in inv.tolist():
        wl, smooth = 2 * math.pi / f, (old * f / (2 * math.pi) - s["low_freq_factor"]) / (
            s["high_freq_factor"] - s["low_freq_factor"])
        divisors.append(1.0 if wl < hi else s["factor"] if wl > lo else 1 / ((1 - smooth) / s["factor"] + smooth))
    b2u = tk.bytes_to_unicode()
    ranks = tk.read_tiktoken_file(tmp_path / "hf/original/tokenizer.model")
    tokens = ["".join(b2u[b] for b in t) for t in sorted(ranks, key=ranks.get)] + ["<|begin_of_text|>", "<|eot_id|>"]
    merges = ["t h", "h e", "th e", "Ġ t", "Ġt he"]
    write_gguf(tmp_path / "l.gguf", "llama", model, tokens, [1] * len(ranks) + [3, 3], merges, len(ranks) + 1,
               families.LLAMA32_TEMPLATE, extra={"rope_freqs.weight": torch.tensor(divisors)})
    assert gguf_logits_diff(tmp_path / "l.gguf", tmp_path / "out", model) < 1e-5  # measured 2e-6
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert cfg["tie_embeddings"] and cfg["rope_scaling"]["rope_type"] == "factors"
    write_gguf(tmp_path / "plain.gguf", "llama", model, tokens, [1] * len(ranks) + [3, 3], merges, len(ranks) + 1, "")
    assert gguf_logits_diff(tmp_path / "plain.gguf", tmp_path / "plain", model) > 0.01  # positions past 64 scale


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
    pytest.importorskip("gguf")  # a requirement; absent on the GPU image
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
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-llm"}
    with pytest.raises(ValueError, match="pre-tokenizer 'deepseek-llm' is not supported"):
        convert_gguf.gguf_tokenizer(meta, tmp_path)
