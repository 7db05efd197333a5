"""Tokenizers of converted checkpoints: tiktoken (byte-level BPE) or sentencepiece, plus chat templates.

config.json["tokenizer"] says which, and the converters in scripts/ write it. Every byte-level BPE
vocabulary (GGUF, HF tokenizer.json, Llama-3) is stored as one tiktoken file, so the run time needs no
`tokenizers`/`transformers`; `byte_level_bpe_ranks` below is the one place that conversion lives.
Chat prompts come from the checkpoint's own Jinja template (config.json["tokenizer"]["chat_template"],
copied by the converters), rendered as transformers' apply_chat_template does; the hand-written
`chat_text` is the fallback for checkpoints that carry none (converted before templates were kept).
"""
import base64
import json
import re
import unicodedata
from datetime import datetime
from pathlib import Path

# Split regexes. SMOLLM is GPT-2's with digits isolated; `(?![^\s\p{N}])` instead of GPT-2's `(?!\S)`
# makes a whitespace run that ends at a digit act as if the text ended there, which is what the hub
# tokenizer.json (Digits, then ByteLevel) and llama.cpp (two regexes in turn) do: "x  1" -> x, "  ", 1.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2/3: digits one by one


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


def jinja_chat(template: str, **special_tokens):
    """render(messages, add_generation_prompt) -> text, for an HF-style chat template.

    The template arrives with downloaded weights, so it runs in jinja2's immutable sandbox (no dunder
    attributes, no mutating methods). Settings and globals are the ones HF templates are written for:
    trim_blocks/lstrip_blocks, loop controls, raise_exception, strftime_now, a tojson that keeps non-ASCII.
    Any template error becomes a one-line ValueError."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def fail(e: Exception):
        return ValueError(f"chat template: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals |= dict(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateError as e:
        raise fail(e) from None
    special_tokens = {k: v for k, v in special_tokens.items() if v is not None}  # as HF's special_tokens_map

    def render(messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)
        except jinja2.TemplateError as e:  # SecurityError (sandbox), raise_exception, undefined names
            raise fail(e) from None
    return render


def chat_text(fmt: str, user: str, system: str | None) -> str:
    """Fallback, for checkpoints without a template: the prompt text of one user turn, ending where the
    assistant's reply starts. No BOS: encode_chat adds it."""
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
            self._special = {self._sp.id_to_piece(i): i  # <s>, </s>: what templates write as bos/eos_token
                             for i in range(self._sp.get_piece_size()) if self._sp.is_control(i)}
            # tokenizer.json's added tokens (Phi-3's <|user|>.. live only there, past the vocabulary), and
            # which of them eat the whitespace on their left/right ("l", "r"), as HF's AddedToken does
            self._special |= spec.get("special_tokens", {})
            self._strip, self._added = spec.get("strip", {}), {i: t for t, i in self._special.items()}
            longest_first = sorted(self._special, key=len, reverse=True)
            self._special_re = f"({'|'.join(map(re.escape, longest_first))})"
        else:
            raise ValueError(f"unknown tokenizer kind {self.kind!r}")
        self._render = None
        if spec.get("chat_template"):
            self._render = jinja_chat(spec["chat_template"], bos_token=spec.get("bos_token"),
                                      eos_token=spec.get("eos_token"))
            self._render([{"role": "user", "content": "hi"}])  # a broken or unsafe template fails at load

    def _encode(self, text: str, special: bool) -> list[int]:
        if self.normalize:
            text = unicodedata.normalize(self.normalize, text)
        if self.kind == "sentencepiece":
            if not special or not self._special:
                return self._sp.encode(text)
            # A rendered template spells BOS/EOS as "<s>", "</s>". HF's (legacy) Llama-2/Mistral tokenizer.json
            # encodes each piece between them alone, with sentencepiece's leading "▁": "<s>[INST]" -> <s> ▁[ INST ].
            parts, ids = re.split(self._special_re, text), []  # text, special, text, ...
            for j, part in enumerate(parts):
                if j % 2:
                    ids.append(self._special[part])
                    continue
                if j and "r" in self._strip.get(parts[j - 1], ""):
                    part = part.lstrip()
                if j + 1 < len(parts) and "l" in self._strip.get(parts[j + 1], ""):
                    part = part.rstrip()
                ids += self._sp.encode(part) if part else []
            return ids
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
        if self.kind != "sentencepiece":
            return self._tt.decode(ids)
        n, text, run = self._sp.get_piece_size(), "", []  # added tokens past the vocabulary: their text
        for i in ids + [None]:
            if i is not None and i < n:
                run.append(i)
                continue
            text, run = text + self._sp.decode(run) + (self._added.get(i, "") if i is not None else ""), []
        return text

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """messages as for HF's apply_chat_template ([{"role": ..., "content": ...}, ...])."""
        if self._render:
            return self._render(messages, add_generation_prompt)
        roles = [m["role"] for m in messages]
        if roles not in (["user"], ["system", "user"]) or not add_generation_prompt:
            raise ValueError(f"the checkpoint has no chat template, and the built-in {self.chat_format!r} one "
                             "renders only [system,] user + generation prompt; re-convert the checkpoint")
        system = messages[0]["content"] if len(roles) == 2 else self.default_system
        return chat_text(self.chat_format, messages[-1]["content"], system)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """As HF's apply_chat_template(tokenize=True): special-token strings in the text are special, and
        no BOS is added (a template writes {{ bos_token }} itself; the hand-written ones do not)."""
        text = self.render_chat(messages, add_generation_prompt)
        bos = [self.bos_id] if not self._render and self.add_bos and self.bos_id is not None else []
        return bos + self._encode(text, special=True)

    @staticmethod
    def _turn(user_text: str, system: str | None) -> list[dict]:
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]

    def apply_chat(self, user_text: str, system: str | None = None) -> str:
        """The prompt text of one user turn; no system (None or "") means the template's default one."""
        return self.render_chat(self._turn(user_text, system))

    def encode_prompt(self, text: str, chat: bool = True) -> list[int]:
        if not chat or (not self._render and self.chat_format == "none"):
            return self.encode(text)
        return self.encode_chat(self._turn(text, None))


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
