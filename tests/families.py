"""Tiny random models of the families issue #16 added (Qwen3, Gemma 3, Llama 3.2, Phi-3 with and without
LongRoPE), made with transformers and saved with a tokenizer of each family's kind, for test_convert.py
(configs, tokenizers, chat templates) and test_families.py (logits, strategies, the sliding-window ring).
Every norm weight is randomised: a constant q/k norm would hide a missing permutation, a zero Gemma norm
a missing +1."""
import io
import json
from pathlib import Path

import torch

import tokenizer as tk

CORPUS = ["the cat sat on the mat", "then the other one", "Hello world 12345, naïve café",
          "def f(x):\n    return x * 2\n", "  spaces   and\ttabs\n\n", "中文 text and émoji 🙂"] * 20
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WINDOW = 16  # Gemma 3's sliding layers (1,024 at real sizes) and tiny Phi-3's (Phi-3-mini-4k: 2,047)
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            max_position_embeddings=256, initializer_range=0.1)

# In the style of each family's template (written for these tests, not copied from a hub repo).
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{%- if message.role == 'user' or (message.role == 'system' and not "
    "loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}{%- if '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and "
    "enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
LLAMA32_TEMPLATE = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- endif %}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + "
    "'\\n\\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")


def write_qwen2_tokenizer(d: Path, template: str):
    """Byte-level BPE tokenizer.json trained here with Qwen2's split and NFC (Qwen2, Qwen3)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=330, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])  # appended, as in Qwen2
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "chat_template": template}))
    return tok


def write_llama3_tokenizer(d: Path, template: str):
    """Meta's tiktoken file (original/tokenizer.model), a few merges; special tokens follow at 261.."""
    ranks = {bytes([b]): b for b in range(256)} | {b"th": 256, b"he": 257, b"the": 258, b" t": 259, b" the": 260}
    (d / "original").mkdir(parents=True, exist_ok=True)
    tk.write_tiktoken_file(d / "original/tokenizer.model", ranks)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template}))


def train_spm(**options) -> bytes:
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, model_type="bpe",
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2, **options)
    return model.getvalue()


def spm_vocab(path: Path) -> dict:
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    return {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}


def write_gemma_tokenizer(d: Path):
    """Gemma's kind of sentencepiece model: no dummy prefix, <pad> <eos> <bos> <unk> at 0-3, the turn
    markers as user-defined pieces; beside it the tokenizer.json of transformers' GemmaTokenizer on the
    same vocabulary, the turn markers special (as the hub's Gemma 3 files are)."""
    import transformers
    from transformers.tokenization_utils_base import generate_merges
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.model").write_bytes(train_spm(
        vocab_size=400, add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=["<start_of_turn>",
                                                                                       "<end_of_turn>"]))
    vocab = spm_vocab(d / "tokenizer.model")
    tok = transformers.GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab), chat_template=GEMMA3_TEMPLATE,
                                      add_bos_token=True, add_eos_token=False)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.save_pretrained(d)


PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]


def write_phi3_tokenizer(d: Path):
    """Phi-3's kind: a Llama-2 sentencepiece model (dummy prefix) whose chat tokens live only in
    tokenizer.json's added_tokens, after the sentencepiece vocabulary, rstrip=True as Phi-3's are
    (the newline after <|user|> is eaten). tokenizer.json and tokenizer_config.json come from
    transformers' own LlamaTokenizer (legacy, as Phi-3's tokenizer.json encodes)."""
    import transformers
    from transformers import AddedToken
    from transformers.tokenization_utils_base import generate_merges
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.model").write_bytes(train_spm(vocab_size=400))
    vocab = spm_vocab(d / "tokenizer.model")
    tok = transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), legacy=True, add_bos_token=False,
                                      chat_template=PHI3_TEMPLATE, eos_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, rstrip=t != "<|endoftext|>", lstrip=False,
                                                                     normalized=False) for t in PHI3_ADDED]})
    tok.save_pretrained(d)
    return tok


def randomised(model, gemma=False):
    """Norm weights away from their init (ones; Gemma's zeros), so folds and permutations show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def qwen3(d: Path):
    """Qwen3: q/k norms, head_dim 32 != hidden / heads, untied; Qwen2's tokenizer, a thinking template."""
    import transformers
    tok = write_qwen2_tokenizer(d, QWEN3_TEMPLATE)
    cfg = transformers.Qwen3Config(vocab_size=tok.get_vocab_size() + 5, head_dim=32, tie_word_embeddings=False,
                                   num_hidden_layers=2, eos_token_id=tok.token_to_id("<|im_end|>"), **TINY)
    return randomised(transformers.Qwen3ForCausalLM(cfg))


def gemma3(d: Path):
    """Gemma 3 text: two sliding layers of WINDOW tokens, then a global one with linear RoPE scaling;
    head_dim 32 with query_pre_attn_scalar 24 (their scale differs), tied; Gemma's kind of tokenizer."""
    import transformers
    write_gemma_tokenizer(d)
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
    cfg = transformers.Gemma3TextConfig(vocab_size=400, head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                        rope_parameters=rope, num_hidden_layers=3, pad_token_id=0, eos_token_id=1,
                                        bos_token_id=2, **TINY)
    return randomised(transformers.Gemma3ForCausalLM(cfg), gemma=True)


def llama32(d: Path):
    """Llama 3.2: tied embeddings, Llama-3.1 scaling with factor 32 active within the tests' positions;
    Meta's tiktoken file and a dated system header."""
    import transformers
    write_llama3_tokenizer(d, LLAMA32_TEMPLATE)
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=64)
    cfg = transformers.LlamaConfig(vocab_size=520, rope_parameters=rope, tie_word_embeddings=True,
                                   num_hidden_layers=2, bos_token_id=261, eos_token_id=[262, 270], **TINY)
    return randomised(transformers.LlamaForCausalLM(cfg))


def phi3(d: Path, longrope=False):
    """Phi-3: fused qkv and gate/up, untied. Like mini-4k, a sliding window on every layer (WINDOW); like
    mini-128k (longrope), none, and LongRoPE with its original context at 64 of 256 positions."""
    import transformers
    write_phi3_tokenizer(d)
    extra = dict(rope_scaling=dict(type="longrope", short_factor=[1.0 + 0.1 * i for i in range(8)],
                                   long_factor=[1.5 + 0.7 * i for i in range(8)]),
                 original_max_position_embeddings=64) if longrope else dict(sliding_window=WINDOW)
    cfg = transformers.Phi3Config(vocab_size=410, num_hidden_layers=2, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=400, **TINY, **extra)
    return randomised(transformers.Phi3ForCausalLM(cfg))


FAMILIES = {"qwen3": qwen3, "gemma3": gemma3, "llama32": llama32, "phi3": phi3,
            "phi3_longrope": lambda d: phi3(d, longrope=True)}
