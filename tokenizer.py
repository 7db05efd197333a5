"""Tokenizers of converted checkpoints: tiktoken (byte-level BPE) or sentencepiece, plus chat templates.

config.json["tokenizer"] says which, and the converters in scripts/ write it. Every byte-level BPE
vocabulary (GGUF, HF tokenizer.json, Llama-3) is stored as one tiktoken file, so the run time needs no
`tokenizers`/`transformers`; `byte_level_bpe_ranks` below is the one place that conversion lives.
"""
import base64
import json
import re
import unicodedata
from pathlib import Path

# Split regexes. SMOLLM is GPT-2's with digits isolated; `(?![^\s\p{N}])` instead of GPT-2's `(?!\S)`
# makes a whitespace run that ends at a digit act as if the text ended there, which is what the hub
# tokenizer.json (Digits, then ByteLevel) and llama.cpp (two regexes in turn) do: "x  1" -> x, "  ", 1.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet byte-level BPE vocabularies are written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:] + [256 + n for n in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    return dict(zip(bs, map(chr, cs)))


def byte_level_bpe_ranks(vocab: dict[str, int], merges: list) -> dict[bytes, int]:
    """{GPT-2-alphabet token: id} and merges in rank order -> tiktoken's {bytes: rank}, rank = id.

    HF/llama.cpp BPE applies the listed merge of lowest merge rank; tiktoken merges the adjacent pair
    whose concatenation has the lowest rank. They agree when the id made by merge r never decreases
    with r (several merges may make one token), so check that rather than trust it."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    try:
        ranks = {bytes(byte_of[c] for c in tok): i for tok, i in vocab.items()}
    except KeyError as e:
        raise ValueError(f"token with character {e} outside the byte-level alphabet") from None
    if len(ranks) != len(vocab):
        raise ValueError("two tokens spell the same bytes")
    last = -1
    for r, m in enumerate(merges):
        a, b = m.split(" ") if isinstance(m, str) else m
        made = vocab.get(a + b)
        if made is None or made < last:
            raise ValueError(f"merge {r} ({a!r} {b!r}) makes {'no token' if made is None else 'an id out of order'}"
                             "; tiktoken would merge differently")
        last = made
    if missing := [hex(b) for b in range(0x80, 0xC0) if bytes([b]) not in ranks]:
        raise ValueError(f"vocabulary lacks UTF-8 continuation bytes {missing}")
    return ranks


def write_tiktoken_file(path, ranks: dict[bytes, int]):
    with open(path, "w") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")


def read_tiktoken_file(path) -> dict[bytes, int]:
    ranks = {}
    for line in Path(path).read_text().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _unencodable(ranks: dict[bytes, int]):
    """A regex of the characters whose bytes the vocabulary lacks (SmolLM2 has no 0x04, 0x06, ...), or None.
    HF's BPE silently drops such bytes, tiktoken would panic. Non-ASCII ones (unassigned code points,
    for SmolLM2 U+40000..U+BFFFF) are dropped whole, where HF keeps their continuation bytes."""
    ranges = []
    for b in range(0xF5):  # 0xC0, 0xC1, 0xF5.. never occur in UTF-8, continuation bytes are checked at conversion
        if bytes([b]) in ranks or 0x80 <= b < 0xC2:
            continue
        width = 1 if b < 0x80 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4  # code points led by byte b
        payload, shift = b & (0x7F, 0x1F, 0x0F, 0x07)[width - 1], 6 * (width - 1)
        lo = max(payload << shift, (0, 0x80, 0x800, 0x10000)[width - 1])
        hi = min(((payload + 1) << shift) - 1, 0x10FFFF)
        ranges.append(f"{re.escape(chr(lo))}-{re.escape(chr(hi))}")
    return re.compile(f"[{''.join(ranges)}]") if ranges else None


def chat_text(fmt: str, user: str, system: str | None) -> str:
    """The prompt text of one user turn, ending where the assistant's reply starts. No BOS: encode adds it."""
    if fmt == "chatml":
        sys_turn = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{sys_turn}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if fmt == "llama3":
        turn = lambda role, text: f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"
        return (turn("system", system) if system else "") + turn("user", user.strip()) + \
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
    if fmt == "llama2":
        sys_part = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
        return f"[INST] {sys_part}{user.strip()} [/INST]"
    if fmt == "mistral":  # Mistral has no system role; its templates prepend the system text
        user = f"{system}\n\n{user}" if system else user
        return f"[INST] {user} [/INST]"
    if fmt == "none":
        return user
    raise ValueError(f"unknown chat_format {fmt!r}")


class Tokenizer:
    def __init__(self, spec: dict, path: Path):
        self.kind, self.bos_id, self.add_bos = spec["kind"], spec.get("bos_id"), spec.get("add_bos", False)
        self.stop_ids = list(spec.get("stop_ids", []))
        self.chat_format, self.default_system = spec.get("chat_format", "none"), spec.get("default_system")
        self.normalize = spec.get("normalize")  # "NFC" for Qwen2, whose tokenizer.json normalizes
        if self.kind == "tiktoken":
            import tiktoken
            ranks = read_tiktoken_file(path)
            self._pattern, self._special = spec["pattern"], spec.get("special_tokens", {})
            self._drop = _unencodable(ranks)
            longest_first = sorted(self._special, key=len, reverse=True)
            self._special_re = f"({'|'.join(map(re.escape, longest_first))})" if self._special else None
            self._tt = tiktoken.Encoding(path.parent.name, pat_str=spec["pattern"], mergeable_ranks=ranks,
                                         special_tokens=self._special)
        elif self.kind == "sentencepiece":
            import sentencepiece
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        else:
            raise ValueError(f"unknown tokenizer kind {self.kind!r}")

    def _encode(self, text: str, special: bool) -> list[int]:
        if self.normalize:
            text = unicodedata.normalize(self.normalize, text)
        if self.kind == "sentencepiece":  # no special-token strings in sentencepiece prompts; BOS is an id
            return self._sp.encode(text)
        if self._drop is None or not self._drop.search(text):
            # Special-token strings inside user text are plain text; only templates may contain them.
            return self._tt.encode(text, allowed_special="all" if special else set(), disallowed_special=())
        # Rare: characters the vocabulary cannot spell. HF splits first (they still separate pieces),
        # then drops them and merges across the gap; do the same, piece by piece.
        import regex
        parts = regex.split(self._special_re, text) if special and self._special_re else [text]
        ids = []
        for part in parts:
            if special and part in self._special:
                ids.append(self._special[part])
            else:
                for piece in regex.findall(self._pattern, part):
                    ids += self._tt.encode_ordinary(self._drop.sub("", piece))
        return ids

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        bos = self.add_bos if bos is None else bos
        return ([self.bos_id] if bos and self.bos_id is not None else []) + self._encode(text, False)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self._sp.decode(ids) if self.kind == "sentencepiece" else self._tt.decode(ids)

    def apply_chat(self, user_text: str, system: str | None = None) -> str:
        """system=None takes the model's default system prompt; "" means none."""
        return chat_text(self.chat_format, user_text, self.default_system if system is None else system)

    def encode_prompt(self, text: str, chat: bool = True) -> list[int]:
        if not chat or self.chat_format == "none":
            return self.encode(text)
        bos = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        return bos + self._encode(self.apply_chat(text), special=True)


def load_tokenizer(checkpoint_dir) -> Tokenizer:
    """The tokenizer a converted checkpoint describes; a missing or bad file raises one clear line."""
    cfg_path = Path(checkpoint_dir) / "config.json"
    try:
        spec = json.loads(cfg_path.read_text())["tokenizer"]
    except FileNotFoundError:
        raise FileNotFoundError(f"no {cfg_path}; run scripts/prepare_default.sh or scripts/prepare.sh") from None
    except (ValueError, KeyError) as e:
        raise ValueError(f"{cfg_path} has no readable tokenizer entry ({e})") from None
    path = Path(checkpoint_dir) / spec.get("file", "tokenizer.model")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} not found; re-run the converter")
    try:
        return Tokenizer(spec, path)
    except Exception as e:  # tiktoken/sentencepiece errors are long and cryptic
        raise ValueError(f"cannot read tokenizer {path}: {type(e).__name__}: {str(e)[:200]}") from None
