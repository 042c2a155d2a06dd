"""Tokenizers: the official InternLM2 SentencePiece model and a project-trained byte-level BPE.

Both classes share one interface (`Tokenizer`): special-token strings are split out of the
text first and only the spans between them go through the subword model, exactly like the
released Hugging Face tokenizer, so ids match the official ones. Facts about the official
file (REFERENCE.md section 2): SentencePiece BPE, 92,544 pieces, identity normalizer without
dummy prefix or whitespace folding (`"Hello world"` -> `Hello`, `▁world`), byte fallback,
digits in chunks of at most 3, ids 0/1/2 = `<unk>`/`<s>`/`</s>`, the last 147 pieces spare,
the last six of them used as chat tokens.

`train_tokenizer` follows the report's recipe at small scale; see its docstring.
"""

from __future__ import annotations

import argparse
import gzip
import json
import contextlib
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<s>", "</s>", "<unk>"
PAD_TOKEN = EOS_TOKEN  # the official configs pad with </s>

CHAT_SPECIAL_TOKENS: dict[str, int] = {
    "<|plugin|>": 92538,
    "<|interpreter|>": 92539,
    "<|action_end|>": 92540,
    "<|action_start|>": 92541,
    "<|im_end|>": 92542,
    "<|im_start|>": 92543,
}
# Order of the six chat tokens at the end of the vocabulary (last = <|im_start|>).
CHAT_TOKEN_ORDER: tuple[str, ...] = tuple(CHAT_SPECIAL_TOKENS)

# `chat_template` of the released chat models' tokenizer_config.json, verbatim.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# GPT-4 (cl100k_base) pre-tokenization: contractions, letter runs with one leading non-letter,
# digits in groups of at most 3, punctuation runs, newlines, other whitespace.
def pretokenize_pattern(digit_group: int = 3) -> str:
    """The cl100k pre-tokenizer regex with digits in groups of at most `digit_group`."""
    return (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,%d}" % digit_group
            + r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


CL100K_PATTERN = pretokenize_pattern(3)

_CJK_RANGES = (
    (0x3000, 0x303F),  # CJK symbols and punctuation (、。「」…)
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # compatibility ideographs
    (0xFF00, 0xFFEF),  # full-width forms (，！？：；（）)
)


def is_cjk(ch: str) -> bool:
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in _CJK_RANGES)


def _byte_level_chars() -> list[str]:
    """The printable character standing for each byte in byte-level BPE (GPT-2's table):
    printable Latin-1 bytes stand for themselves, the rest take code points 256, 257, ..."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _as_id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):  # torch / numpy
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


@contextlib.contextmanager
def _quiet_stderr():
    """Redirect the process's fd 2 to /dev/null (C++ libraries log there directly)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. some embedded interpreters)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


class Tokenizer:
    """Common interface. Subclasses provide the subword model for text without special tokens."""

    vocab_size: int

    def __init__(self, special_tokens: dict[str, int], byte_ids: Sequence[int]):
        # special_tokens: every user-visible added token (<unk>, <s>, </s>, the six chat tokens).
        self.special_tokens = dict(special_tokens)
        self._special_by_id = {i: t for t, i in self.special_tokens.items()}
        self._special_ids = frozenset(self._special_by_id)
        # Longest first so that no special token is matched by a prefix of another.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in alternatives))
        self._byte_ids = list(byte_ids)  # id of the piece for each byte value 0..255
        st = self.special_tokens
        self.bos_id, self.eos_id, self.unk_id = st[BOS_TOKEN], st[EOS_TOKEN], st[UNK_TOKEN]
        self.pad_id = self.eos_id
        self.plugin_id = st["<|plugin|>"]
        self.interpreter_id = st["<|interpreter|>"]
        self.action_end_id = st["<|action_end|>"]
        self.action_start_id = st["<|action_start|>"]
        self.im_end_id = st["<|im_end|>"]
        self.im_start_id = st["<|im_start|>"]

    # -- subclass hooks -------------------------------------------------------------------
    def _encode_plain(self, spans: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _decode_plain(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _piece_text(self, i: int) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, i: int) -> str:
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        raise NotImplementedError

    # -- shared behaviour -------------------------------------------------------------------
    @property
    def stop_ids(self) -> list[int]:
        return [self.eos_id, self.im_end_id]

    @property
    def chat_token_ids(self) -> dict[str, int]:
        return {t: self.special_tokens[t] for t in CHAT_TOKEN_ORDER}

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"

    def _split(self, text: str, allow_special: bool) -> list[str | int]:
        if not allow_special or not text:
            return [text] if text else []
        parts: list[str | int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                parts.append(text[pos : m.start()])
            parts.append(self.special_tokens[m.group()])
            pos = m.end()
        if pos < len(text):
            parts.append(text[pos:])
        return parts

    def _strip_specials(self, ids: list[int]) -> list[int]:
        # With allow_special=False no special id may come out, even where the subword model
        # itself maps text to one (the official SP encodes "[UNUSED_TOKEN_146]" as 92543 =
        # <|im_start|>): such a piece is re-encoded as its first character and the rest.
        if not self._special_ids.intersection(ids):
            return ids
        out: list[int] = []
        for i in ids:
            if i not in self._special_ids:
                out.append(i)
                continue
            text = self._piece_text(i)
            if len(text) < 2:
                out.extend(self._byte_ids[b] for b in text.encode("utf-8"))
                continue
            for part in self._encode_plain([text[:1], text[1:]]):
                out.extend(self._strip_specials(part))
        return out

    def encode_batch(
        self,
        texts: Sequence[str],
        add_bos: bool = True,
        add_eos: bool = False,
        allow_special: bool = True,
    ) -> list[list[int]]:
        """Encode many texts at once (the subword model runs over all spans in one call)."""
        layouts = [self._split(t, allow_special) for t in texts]
        spans = [p for parts in layouts for p in parts if isinstance(p, str)]
        encoded = iter(self._encode_plain(spans) if spans else [])
        out = []
        for parts in layouts:
            ids = [self.bos_id] if add_bos else []
            for p in parts:
                if isinstance(p, int):
                    ids.append(p)
                else:
                    piece_ids = next(encoded)
                    ids.extend(piece_ids if allow_special else self._strip_specials(piece_ids))
            if add_eos:
                ids.append(self.eos_id)
            out.append(ids)
        return out

    def encode(
        self, text: str, add_bos: bool = True, add_eos: bool = False, allow_special: bool = True
    ) -> list[int]:
        """Token ids of `text`. allow_special=False encodes special-token strings as plain text."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self.encode_batch([text], add_bos, add_eos, allow_special)[0]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = _as_id_list(ids)
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            tok = self._special_by_id.get(i)
            if tok is None:
                run.append(i)
                continue
            if run:
                out.append(self._decode_plain(run))
                run = []
            if not skip_special_tokens:
                out.append(tok)
        if run:
            out.append(self._decode_plain(run))
        return "".join(out)

    def pieces(self, ids) -> list[str]:
        return [self.id_to_token(i) for i in _as_id_list(ids)]

    # -- Hugging Face files -------------------------------------------------------------------
    def _hf_config(self, tokenizer_class: str) -> tuple[dict, dict]:
        def entry(tok: str) -> dict:
            return {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                    "single_word": False}

        decoder = {str(i): {**entry(t), "special": True}
                   for i, t in sorted(self._special_by_id.items())}
        extra = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                 "<|interpreter|>", "<|plugin|>"]  # the official listing order
        config = {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": extra,
            "bos_token": BOS_TOKEN,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": EOS_TOKEN,
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": PAD_TOKEN,
            "tokenizer_class": tokenizer_class,
            "unk_token": UNK_TOKEN,
        }
        special_map = {
            "additional_special_tokens": extra,
            "bos_token": entry(BOS_TOKEN),
            "eos_token": entry(EOS_TOKEN),
            "pad_token": entry(PAD_TOKEN),
            "unk_token": entry(UNK_TOKEN),
        }
        return config, special_map

    def _write_hf_files(self, directory: Path, files: dict[str, bytes], config: dict,
                        special_map: dict) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        files = {**files, "tokenizer_config.json": _json_bytes(config),
                 "special_tokens_map.json": _json_bytes(special_map)}
        for name, data in files.items():
            _atomic_write(directory / name, data)
        return directory


class SentencePieceTokenizer(Tokenizer):
    """The official InternLM2 `tokenizer.model` (or any SentencePiece model laid out like it).

    Reproduces the released tokenizer's ids. The one lossy case is inherent to the official
    vocabulary: U+2581 ('▁') in the text gets the same ids as a space and decodes as one.
    """

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {self.path}")
        self._model_bytes = self.path.read_bytes()
        self._sp = spm.SentencePieceProcessor()
        try:
            # The official file marks piece 354 ("\\0") unused; sentencepiece's C++ logger says
            # so on stderr at every load. Silence that one known line.
            with _quiet_stderr():
                self._sp.LoadFromSerializedProto(self._model_bytes)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path} is not a valid SentencePiece model: {e}") from e
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        if sp.bos_id() < 0 or sp.eos_id() < 0:
            raise ValueError(f"{self.path}: SentencePiece model has no <s>/</s> control pieces")
        special = {UNK_TOKEN: sp.unk_id(), BOS_TOKEN: sp.bos_id(), EOS_TOKEN: sp.eos_id()}
        # Chat tokens: pieces renamed to the chat strings if the model has them, otherwise
        # the last six spare pieces in the official order (92538..92543 in the official file).
        renamed = all(sp.piece_to_id(t) != sp.unk_id() for t in CHAT_TOKEN_ORDER)
        for k, tok in enumerate(CHAT_TOKEN_ORDER):
            special[tok] = sp.piece_to_id(tok) if renamed else self.vocab_size - 6 + k
        # (<unk> for models without byte fallback; only used in a corner of allow_special=False)
        byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        super().__init__(special, byte_ids)

    def _encode_plain(self, spans: list[str]) -> list[list[int]]:
        return self._sp.encode(spans)

    def _decode_plain(self, ids: list[int]) -> str:
        # The model has no dummy prefix, so SentencePiece keeps a leading '▁' as a space.
        return self._sp.decode(ids)

    def _piece_text(self, i: int) -> str:
        return self._sp.id_to_piece(i).replace("\u2581", " ")

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        i = self._sp.piece_to_id(token)
        return None if i == self.unk_id else i

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self._special_by_id.get(i) or self._sp.id_to_piece(i)

    def to_hf_tokenizer(self):
        """The same tokenizer as a Hugging Face `tokenizers.Tokenizer` (BPE + byte fallback).

        Merges are ranked by the score of the merged piece, which is how SentencePiece BPE picks
        the next merge, so ids equal SentencePiece's. Pieces SentencePiece never emits for text
        (the NUL piece it marks unused; the spare pieces renamed to chat tokens) are renamed
        `<unused_ID>` / the chat string, so NUL goes to byte fallback as in SentencePiece.
        """
        from tokenizers import AddedToken, decoders, models, normalizers, processors
        from tokenizers import Tokenizer as HFTokenizer

        sp = self._sp
        names = [sp.id_to_piece(i) for i in range(self.vocab_size)]
        plain = [not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
                 for i in range(self.vocab_size)]
        for i in range(self.vocab_size):
            if sp.is_unused(i):
                names[i] = f"<unused_{i}>"
        for tok, i in self.chat_token_ids.items():
            names[i], plain[i] = tok, False
        vocab = {t: i for i, t in enumerate(names)}
        mergeable = {t: i for t, i in vocab.items() if plain[i]}
        ranked = []
        for piece, i in mergeable.items():
            for k in range(1, len(piece)):
                a, b = piece[:k], piece[k:]
                if a in mergeable and b in mergeable:
                    ranked.append((-sp.get_score(i), i, mergeable[a], a, b))
        ranked.sort()
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=[(r[3], r[4]) for r in ranked],
                                     unk_token=UNK_TOKEN, byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Replace(" ", "\u2581")  # no dummy prefix, like the model
        tok.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in self.special_tokens])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, self.bos_id)])
        return tok

    def save(self, directory: str | os.PathLike, tokenizer_json: bool = True) -> Path:
        """Write tokenizer.model, tokenizer_config.json, special_tokens_map.json (+ tokenizer.json).

        tokenizer_config.json carries the official fields; tokenizer_class is the official
        `InternLM2Tokenizer`, which Hugging Face resolves through a checkpoint's remote code
        (`auto_map` + tokenization_internlm2.py) when those are shipped. The extra
        tokenizer.json (`to_hf_tokenizer`) lets transformers load the folder without them.
        """
        config, special_map = self._hf_config("InternLM2Tokenizer")
        config["decode_with_prefix_space"] = False
        config["sp_model_kwargs"] = None
        files = {"tokenizer.model": self._model_bytes}
        if tokenizer_json:
            files["tokenizer.json"] = self.to_hf_tokenizer().to_str().encode("utf-8")
        return self._write_hf_files(Path(directory), files, config, special_map)


class BPETokenizer(Tokenizer):
    """A byte-level BPE tokenizer stored as a Hugging Face `tokenizer.json`."""

    def __init__(self, path_or_tokenizer):
        from tokenizers import Tokenizer as HFTokenizer

        if isinstance(path_or_tokenizer, HFTokenizer):
            self.path = None
            self._tok = path_or_tokenizer
        else:
            self.path = Path(path_or_tokenizer)
            if not self.path.is_file():
                raise FileNotFoundError(f"tokenizer.json not found: {self.path}")
            try:
                self._tok = HFTokenizer.from_file(str(self.path))
            except Exception as e:  # tokenizers raises a plain Exception
                raise ValueError(f"{self.path} is not a valid tokenizer.json: {e}") from e
        where = self.path or "tokenizer"
        spec = json.loads(self._tok.to_str())
        if spec.get("model", {}).get("type") != "BPE":
            raise ValueError(f"{where}: expected a BPE model in tokenizer.json")
        # The "plain" tokenizer has no added tokens and no BOS template: it sees only the
        # spans between special tokens, which the base class splits out itself.
        spec["added_tokens"] = []
        spec["post_processor"] = None
        self._plain = HFTokenizer.from_str(json.dumps(spec))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()
                   if t.special}
        missing = [t for t in (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, *CHAT_TOKEN_ORDER)
                   if t not in special]
        if missing:
            raise ValueError(f"{where}: special tokens missing from tokenizer.json: {missing}")
        byte_ids = []
        for b, piece in enumerate(_byte_level_chars()):
            i = self._plain.token_to_id(piece)
            if i is None:
                raise ValueError(f"{where}: byte {b} has no token; not a byte-level BPE")
            byte_ids.append(i)
        super().__init__(special, byte_ids)

    def _encode_plain(self, spans: list[str]) -> list[list[int]]:
        if len(spans) == 1:
            return [self._plain.encode(spans[0], add_special_tokens=False).ids]
        encs = self._plain.encode_batch(spans, add_special_tokens=False)
        return [e.ids for e in encs]

    def _decode_plain(self, ids: list[int]) -> str:
        return self._plain.decode(ids, skip_special_tokens=False)

    def _piece_text(self, i: int) -> str:
        return self._plain.decode([i], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        tok = self._tok.id_to_token(i)
        if tok is None:
            raise IndexError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return tok

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
        config, special_map = self._hf_config("PreTrainedTokenizerFast")
        files = {"tokenizer.json": self._tok.to_str(pretty=True).encode("utf-8")}
        return self._write_hf_files(Path(directory), files, config, special_map)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load from a folder (prefers tokenizer.model, else tokenizer.json) or a .model/.json file."""
    p = Path(path)
    if p.is_dir():
        for name, cls in (("tokenizer.model", SentencePieceTokenizer),
                          ("tokenizer.json", BPETokenizer)):
            if (p / name).is_file():
                return cls(p / name)
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in folder {p}")
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {p}")
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.suffix == ".json":
        return BPETokenizer(p)
    raise ValueError(f"{p}: expected a folder, a SentencePiece .model or a tokenizer .json file")


def compression(tokenizer: Tokenizer, texts: str | Iterable[str]) -> float:
    """Characters per token (no BOS), over all texts together."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts, add_bos=False))
    return sum(len(t) for t in texts) / max(n_tokens, 1)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def _iter_file(path: Path, chunk_chars: int = 1 << 20) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    stem = path.name[: -len(".gz")] if path.suffix == ".gz" else path.name
    with opener(path, "rt", encoding="utf-8") as f:
        if stem.endswith(".jsonl"):
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    text = e
                if isinstance(text, str):
                    yield text
                    continue
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a string "
                                 f"'text' field ({text!r})")
        else:  # plain text, in chunks that end at a line break
            buf: list[str] = []
            size = 0
            for line in f:
                buf.append(line)
                size += len(line)
                if size >= chunk_chars:
                    yield "".join(buf)
                    buf, size = [], 0
            if buf:
                yield "".join(buf)


def _looks_like_file(x) -> bool:
    if isinstance(x, os.PathLike):
        return True
    return (isinstance(x, str) and len(x) < 4096 and "\n" not in x
            and (x.endswith((".txt", ".jsonl", ".txt.gz", ".jsonl.gz")) or Path(x).is_file()))


def _training_texts(files_or_texts) -> Iterator[str]:
    """File paths or texts. A str/PathLike, or a list/tuple whose items all look like files
    (PathLike, existing files, or names ending .txt/.jsonl[.gz]) are files (missing ones raise
    FileNotFoundError); any other iterable yields texts (PathLike items are read as files)."""
    if isinstance(files_or_texts, (str, os.PathLike)):
        files_or_texts = [Path(files_or_texts)]
    if isinstance(files_or_texts, (list, tuple)) and files_or_texts and all(
            map(_looks_like_file, files_or_texts)):
        files_or_texts = [Path(x) for x in files_or_texts]
    for x in files_or_texts:
        if isinstance(x, os.PathLike):
            if not Path(x).is_file():
                raise FileNotFoundError(f"training file not found: {x}")
            yield from _iter_file(Path(x))
        elif isinstance(x, str):
            yield x
        else:
            raise TypeError(f"training input must be file paths or strings, got {type(x)}")


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(symbols) > 1:
        best = min(range(len(symbols) - 1),
                   key=lambda k: ranks.get((symbols[k], symbols[k + 1]), 1 << 62))
        if (symbols[best], symbols[best + 1]) not in ranks:
            break
        symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
    return symbols


def _cover_chars(vocab: dict[str, int], merges: list[tuple[str, str]], chars: list[str],
                 to_bytes) -> tuple[list[str], list[tuple[str, str]]]:
    """Merges (appended after `merges`) that make each of `chars` a single token."""
    ranks = {m: r for r, m in enumerate(merges)}
    new_tokens: list[str] = []
    new_merges: list[tuple[str, str]] = []
    have = set(vocab)
    for ch in chars:
        parts = _apply_bpe(list(to_bytes(ch)), ranks)
        cur = parts[0]
        for nxt in parts[1:]:
            pair = (cur, nxt)
            cur = cur + nxt
            if pair not in ranks:
                ranks[pair] = len(ranks)
                new_merges.append(pair)
            if cur not in have:
                have.add(cur)
                new_tokens.append(cur)
    return new_tokens, new_merges


def default_num_spare(vocab_size: int) -> int:
    """147 like the official vocabulary when there is room, else vocab_size/64 (at least 6)."""
    return max(6, min(147, vocab_size // 64))


def train_tokenizer(
    files_or_texts,
    vocab_size: int,
    output_dir: str | os.PathLike | None = None,
    *,
    num_spare: int | None = None,
    cjk_chars: int | None = None,
    min_frequency: int = 2,
    show_progress: bool = False,
    digit_group: int = 3,
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer with the report's recipe, at any scale.

    - Pre-tokenization: GPT-4's cl100k regex (so digits split in groups of at most
      `digit_group`, 3 as cl100k; 1 gives one token per digit as LLaMA's split_digits), then
      byte-level; no normalization, so decoding is lossless.
    - Ids 0, 1, 2 = `<unk>`, `<s>`, `</s>` (bos 1, eos 2, pad 2), then the 256 byte tokens,
      then the merges.
    - Chinese coverage: the `cjk_chars` most frequent CJK characters of the corpus (ideographs
      and CJK/full-width punctuation; default vocab_size // 8) seen at least `min_frequency`
      times are guaranteed a single token each. The trainer runs first; the missing characters
      then get merges appended after the learned ones, and just enough of the last learned
      merges are dropped to keep the size. (The report added 32,397 Chinese tokens to cl100k's
      top 60k; this is the small-scale analogue: a plain BPE run on a mostly-English corpus
      leaves many common characters as 2-3 byte tokens.)
    - Spare tokens `[UNUSED_TOKEN_k]` fill the vocabulary up to exactly `vocab_size` (at least
      `num_spare`, default `default_num_spare`); the last six are renamed to the chat tokens
      in the official order, so `<|im_start|>` is the last id.
    - `vocab_size` must be a multiple of 128 (as the official 92,544): ValueError otherwise.

    Input: paths of utf-8 text files (.txt, or .jsonl with a "text" field; .gz allowed), or
    an iterable of strings. Writes the Hugging Face files to `output_dir` when given.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size % 128 != 0:
        raise ValueError(f"vocab_size must be a multiple of 128 (got {vocab_size}); "
                         f"use {(vocab_size + 127) // 128 * 128}")
    num_spare = default_num_spare(vocab_size) if num_spare is None else num_spare
    if num_spare < 6:
        raise ValueError(f"num_spare must be at least 6 (the chat tokens), got {num_spare}")
    budget = vocab_size - num_spare  # regular tokens: specials + bytes + merges
    if budget < 3 + 256 + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small for 3 special tokens, 256 bytes "
                         f"and {num_spare} spare tokens")
    cjk_chars = vocab_size // 8 if cjk_chars is None else cjk_chars

    char_counts: Counter[str] = Counter()

    def counted(texts: Iterator[str]) -> Iterator[str]:
        for t in texts:
            char_counts.update(t)
            yield t

    if not isinstance(digit_group, int) or digit_group < 1:
        raise ValueError(f"digit_group must be a positive integer, got {digit_group!r}")
    pattern = pretokenize_pattern(digit_group)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok = HFTokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level])
    trainer = trainers.BpeTrainer(
        vocab_size=budget, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(counted(_training_texts(files_or_texts)), trainer=trainer)

    spec = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = spec["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in spec["merges"]]
    if len(vocab) <= 3 + 256:
        raise ValueError("the training input is empty or too small to learn any merge")

    top_cjk = [c for c, n in char_counts.most_common() if n >= min_frequency and is_cjk(c)]
    top_cjk = top_cjk[:cjk_chars]

    def to_bytes(ch: str) -> str:
        return byte_level.pre_tokenize_str(ch)[0][0]

    # Drop learned merges from the end until the appended character merges fit the budget.
    always = {UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, *_byte_level_chars()}
    keep = len(merges)
    while True:
        kept = merges[:keep]
        produced = {a + b for a, b in kept}
        base = {t: i for t, i in vocab.items() if t in always or t in produced}
        new_tokens, new_merges = _cover_chars(base, kept, top_cjk, to_bytes)
        excess = len(base) + len(new_tokens) - budget
        if excess <= 0:
            break
        keep -= excess
        if keep < 0:
            raise ValueError(f"vocab_size {vocab_size} is too small to hold the "
                             f"{len(top_cjk)} most frequent CJK characters; lower cjk_chars")

    ordered = sorted(base, key=base.__getitem__) + new_tokens
    n_spare = vocab_size - len(ordered)
    spare = [f"[UNUSED_TOKEN_{k}]" for k in range(n_spare)]
    spare[-6:] = CHAT_TOKEN_ORDER
    final_vocab = {t: i for i, t in enumerate(ordered + spare)}
    assert len(final_vocab) == vocab_size, "duplicate token in the assembled vocabulary"

    out = HFTokenizer(models.BPE(vocab=final_vocab, merges=kept + new_merges, unk_token=UNK_TOKEN))
    out.pre_tokenizer = tok.pre_tokenizer
    out.decoder = decoders.ByteLevel()
    out.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, *CHAT_TOKEN_ORDER)])
    bos = final_vocab[BOS_TOKEN]
    out.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos)])
    result = BPETokenizer(out)
    if output_dir is not None:
        result.save(output_dir)
        result.path = Path(output_dir) / "tokenizer.json"
    return result


# --------------------------------------------------------------------------------------------
# Samples, comparison and CLI
# --------------------------------------------------------------------------------------------

SAMPLE_TEXTS: dict[str, str] = {
    "english": (
        "The lighthouse keeper had kept a log for thirty-one years. Every evening he wrote the "
        "wind direction, the height of the swell and the names of the ships that passed, and "
        "every morning he read the previous day's entry aloud, as if someone were listening. "
        "When the coastal authority finally automated the light in 1987, they asked him for the "
        "logs. He gave them twelve notebooks and kept the thirteenth, which, he said, contained "
        "nothing of interest to anyone but the gulls."
    ),
    "chinese": (
        "清晨的小镇还笼罩在薄雾之中，街角的早点铺已经冒出了热气。老板一边揉面，一边和熟客聊着今年的"
        "收成。孩子们背着书包从石板路上跑过，笑声惊起了屋檐下的麻雀。到了中午，阳光穿过云层洒在河面"
        "上，渡船慢慢靠岸，人们提着篮子走向集市。这样平凡的日子，在许多人的记忆里，却是最难忘的风景。"
    ),
    "code": (
        "def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:\n"
        "    \"\"\"Merge overlapping closed intervals and return them sorted.\"\"\"\n"
        "    merged: list[tuple[int, int]] = []\n"
        "    for start, end in sorted(intervals):\n"
        "        if merged and start <= merged[-1][1]:\n"
        "            prev_start, prev_end = merged[-1]\n"
        "            merged[-1] = (prev_start, max(prev_end, end))\n"
        "        else:\n"
        "            merged.append((start, end))\n"
        "    return merged\n\n\n"
        "if __name__ == \"__main__\":\n"
        "    print(merge_intervals([(1, 3), (2, 6), (8, 10), (15, 18)]))\n"
    ),
}


_ZH_WORDS = {  # space-separated word lists
    "subj": "我们 他们 你们 老师 学生 医生 工程师 我的朋友 研究人员 这家公司 地方政府 孩子们 科学家 "
            "城市居民 农民 记者 这个团队 爷爷 妈妈 年轻人 志愿者 司机 作家 校长 邻居 服务员 警察 "
            "运动员 经理 大家",
    "time": "今天 昨天 明年 去年冬天 每天早上 晚上 周末 最近 上个月 春节期间 平时 刚才 将来 "
            "那时候 夏天的傍晚 这几年",
    "place": "在图书馆里 在会议上 在山区 在海边 在北京 在上海的工厂 在实验室 在农村 在医院 "
             "在市场上 在家里 在学校门口 在网上 在博物馆 在火车站 在公园里 在河边的小路上",
    "adv": "经常 认真地 已经 正在 终于 一直 很快 仔细地 突然 慢慢地 重新 主动 共同 按时 "
           "不断 首先 其实 也许 必须 常常 偶尔",
    "verb": "讨论了 研究 学习 建设 介绍了 发现了 参加 完成了 解决 提出了 改进 支持 关注 分析了 "
            "记录 准备 打扫 修理 购买 阅读 写完了 设计 组织 检查 保护 培养 推动 调查 欣赏 "
            "回忆起 表达 翻译 整理 参观 选择 使用 理解 管理 照顾 接受",
    "obj": "新的计划 这个问题 人工智能技术 中国的历史 环境保护 经济发展 数学课程 一篇文章 城市交通 "
           "健康的生活方式 传统文化 数据分析的方法 语言模型 农业生产 国际合作 教育改革 一本小说 "
           "旧房子 电脑程序 天气预报 音乐会 科学实验 新闻报道 公共卫生 交通安全 老人的需求 "
           "市场价格 气候变化 网络安全 手机应用 地图 饭菜 花园 法律条文 产品质量 能源问题 "
           "学术论文 工作经验 旅行路线 运动比赛",
    "tail": (
        "。 。 。 ！ ？ ，并且取得了很好的效果。 ，大家都非常满意。 ，这对社会很重要。 "
        "，但是还有很多困难。 ，因为这件事情关系到每个人。 ，所以进展比预想的更快。 "
        "，虽然天气不好，心情却很愉快。 ，同时也遇到了不少挑战。 ，结果让所有人都感到意外。 "
        "，希望明天会更好。 ；另外，还需要更多的时间。"
    ),
}


def synthetic_chinese(num_sentences: int, seed: int = 0) -> str:
    """Generated Chinese sentences from common words (test and benchmark corpora)."""
    import random

    rng = random.Random(seed)
    w = {k: v.split() for k, v in _ZH_WORDS.items()}
    out = []
    for _ in range(num_sentences):
        parts = [rng.choice(w["subj"])]
        for key, p in (("time", 0.5), ("place", 0.4), ("adv", 0.6)):
            if rng.random() < p:
                parts.append(rng.choice(w[key]))
        parts += [rng.choice(w["verb"]), rng.choice(w["obj"]), rng.choice(w["tail"])]
        if rng.random() < 0.12:
            parts.append("\n")
        out.append("".join(parts))
    return "".join(out)


def official_tokenizer_path() -> Path | None:
    """The official tokenizer.model if present: $INTERNLM2_OFFICIAL_TOKENIZER, else the
    shared folder beside the repository (../shared/data)."""
    env = os.environ.get("INTERNLM2_OFFICIAL_TOKENIZER")
    here = Path(__file__).resolve()
    cands = [Path(env)] if env else []
    cands += [base / "shared" / "data" / "internlm2_tokenizer.model"
              for base in (here.parents[2], Path.cwd().parent, Path.cwd())]
    return next((p for p in cands if p.is_file()), None)


def compression_table(tokenizers: dict[str, Tokenizer],
                      samples: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """{tokenizer name: {sample name: characters per token}}."""
    samples = SAMPLE_TEXTS if samples is None else samples
    return {name: {k: round(compression(tok, v), 3) for k, v in samples.items()}
            for name, tok in tokenizers.items()}


def format_table(table: dict[str, dict[str, float]]) -> str:
    cols = list(next(iter(table.values())))
    width = max(12, *(len(n) for n in table))
    lines = [f"{'chars/token':<{width}}" + "".join(f"{c:>10}" for c in cols)]
    for name, row in table.items():
        lines.append(f"{name:<{width}}" + "".join(f"{row[c]:>10.3f}" for c in cols))
    return "\n".join(lines)


def _cli_train(args: argparse.Namespace) -> int:
    tok = train_tokenizer([Path(p) for p in args.input], args.vocab_size, args.output,
                          num_spare=args.num_spare,
                          cjk_chars=args.cjk_chars, show_progress=not args.quiet,
                          digit_group=args.digit_group)
    print(f"saved {tok} to {args.output}")
    compare = Path(args.compare) if args.compare else official_tokenizer_path()
    tokenizers = {"trained": tok}
    if compare is not None:
        tokenizers["official"] = load_tokenizer(compare)
    print(format_table(compression_table(tokenizers)))
    return 0


def _cli_encode(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    text = args.text if args.text is not None else sys.stdin.read()
    ids = tok.encode(text, add_bos=not args.no_bos)
    if args.ids_only:
        print(" ".join(map(str, ids)))
        return 0
    print(json.dumps(ids))
    for i in ids:
        print(f"{i}\t{tok.id_to_token(i)}\t{tok.decode([i])!r}")
    print(f"{len(ids)} tokens, {len(text)} characters")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add `tokenizer {train,encode}` to an argparse subparsers object."""
    p = subparsers.add_parser("tokenizer", help="train a BPE tokenizer or inspect encodings")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="{train,encode}", required=True)

    t = sub.add_parser("train", help="train a byte-level BPE tokenizer (report recipe)")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="utf-8 .txt or .jsonl (field 'text') files")
    t.add_argument("--vocab-size", type=int, required=True, help="a multiple of 128")
    t.add_argument("--output", required=True, help="folder for the Hugging Face files")
    t.add_argument("--num-spare", type=int, default=None,
                   help="minimum spare tokens (default: 147, or vocab/64 for small vocabs)")
    t.add_argument("--cjk-chars", type=int, default=None,
                   help="most frequent CJK characters kept as single tokens (default vocab/8)")
    t.add_argument("--digit-group", type=int, default=3,
                   help="digits per pre-token at most (3 as cl100k; 1: one token per digit)")
    t.add_argument("--compare", default=None,
                   help="tokenizer to compare compression with (default: the official one "
                        "in ../shared/data when present)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cli_train)

    e = sub.add_parser("encode", help="print token ids and pieces")
    e.add_argument("--tokenizer", required=True, help="folder, .model or tokenizer .json")
    e.add_argument("--text", default=None, help="text to encode (default: stdin)")
    e.add_argument("--no-bos", action="store_true", help="do not prepend <s>")
    e.add_argument("--ids-only", action="store_true", help="print only the ids")
    e.set_defaults(func=_cli_encode)
    return p
