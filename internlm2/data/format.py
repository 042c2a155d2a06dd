"""Formatting: Unicode and whitespace normalisation, language identification, stable ids.

The first stage of the pipeline (report section 3.1, "format"): every document leaves it with
normalised text, an `id` and a `lang` in {"en", "zh", "code", "other"}.

Normalisation form. We use NFC, not NFKC, on purpose. NFKC folds compatibility characters,
which would rewrite Chinese full-width punctuation (，！？：；（） become , ! ? : ; ( )),
superscripts (x² -> x2) and ligatures; the Chinese rules downstream count full-width
sentence punctuation, and the model should learn Chinese as it is written. What NFKC gets
right for us, full-width ASCII letters and digits (Ｈｅｌｌｏ１２３, common in scraped Chinese
pages), is done here explicitly by `fold_width`, which leaves full-width punctuation alone.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Callable

LANGS = ("en", "zh", "code", "other")

# Characters with no visible width that only get in the way of matching and dedup: zero-width
# space / non-joiner / joiner, word joiner, BOM (zero-width no-break space), soft hyphen.
_ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
# Line separators other than \n: CRLF, CR, NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR, VT, FF.
_NEWLINES_RE = re.compile(r"\r\n|[\r\u0085\u2028\u2029\x0b\x0c]")
# C0/C1 controls except \t and \n, plus the zero-width set above.
_CONTROL_RE = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f" + _ZERO_WIDTH + "]")
# Horizontal spaces that are not the ASCII space or the ideographic space (U+3000 is the
# Chinese indentation character, kept as written).
_SPACES_RE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f]")
_TRAILING_WS_RE = re.compile(r"[ \t\u3000]+$", re.M)
# Full-width ASCII letters and digits (not punctuation): U+FF10-FF19, FF21-FF3A, FF41-FF5A.
_FULLWIDTH_ALNUM = {c: c - 0xFEE0 for r in ((0xFF10, 0xFF1A), (0xFF21, 0xFF3B), (0xFF41, 0xFF5B))
                    for c in range(*r)}


def normalize_text(text: str, form: str = "NFC", fold_width: bool = True,
                   max_blank_lines: int = 2) -> str:
    """Normalise one document's text.

    - Unicode `form` (NFC by default; see the module docstring for why not NFKC);
    - full-width ASCII letters/digits to ASCII when `fold_width` (full-width punctuation kept);
    - line endings to \\n; control characters (except \\n, \\t), zero-width characters and
      BOM removed; exotic horizontal spaces (NBSP, thin space, ...) to a plain space;
    - trailing whitespace of every line removed; runs of blank lines cut to `max_blank_lines`;
      leading blank lines and trailing whitespace of the document removed.
    """
    if form:
        text = unicodedata.normalize(form, text)
    text = _NEWLINES_RE.sub("\n", text)
    text = _CONTROL_RE.sub("", text)
    text = _SPACES_RE.sub(" ", text)
    if fold_width:
        text = text.translate(_FULLWIDTH_ALNUM)
    text = _TRAILING_WS_RE.sub("", text)
    if max_blank_lines >= 0:
        text = re.sub(r"\n{%d,}" % (max_blank_lines + 2), "\n" * (max_blank_lines + 1), text)
    return text.lstrip("\n").rstrip()


# -- language identification -------------------------------------------------------------

# Han ideographs (URO, ext A, compatibility); kana and hangul are told apart so that Japanese
# and Korean are not called Chinese.
_HAN_RE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_KANA_HANGUL_RE = re.compile("[\u3040-\u30ff\u31f0-\u31ff\uac00-\ud7af\u1100-\u11ff]")
_ASCII_WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
# The most frequent English function words: in running English prose they make up about
# 40-50% of the words; in other Latin-script languages and in word lists, far fewer.
EN_STOP_WORDS = frozenset("""
the be to of and a in that have i it for not on with he as you do at this but his by from
they we say her she or an will my one all would there their what so up out if about who get
which go me is are was were been has had its can no our your than then them these those
""".split())

_CODE_LINE_RE = re.compile(
    r"^\s*(?:def \w+\s*\(|class \w+\s*[(:{<]|class \w+ (?:extends|implements) |import [\w.{*]|"
    r"from [\w.]+ import |if\s*\(|for\s*\(|while\s*\(|elif |else\s*:|try\s*:|except\b.*:$|"
    r"#include|#define|#!/|(?:public|private|protected)\s+[\w<>\[\], ]+[({=;]|"
    r"function\s*\w*\s*\(|(?:var|let|const) \w+\s*=|package [\w.]+;?$|fn \w+|use [\w:]+;|"
    r"struct \w+|impl\b|func \w+|namespace \w+|template\s*<|@\w+(?:\(|$)|//|/\*|\*/|[{}]|"
    r"['\"][^'\"]*['\"]\s*:\s*.*,$|[A-Za-z_][\w.]*(?:\[[^\]]*\])?\s*[-+*/|&]?=\s*\S)"
    r"|[;{}]\s*$|\)\s*:\s*$|[\w)\]]\s*(?:==|!=|:=|=>)\s*[\w(\[\"']")
_CODE_SYMBOLS = frozenset("{}[]()<>=;:_*&|/\\#$@%^~`")


def _code_score(text: str) -> float:
    """0..1: how much `text` looks like source code (symbol density, code-like lines, indentation)."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if not lines:
        return 0.0
    nonspace = sum(1 for c in text if not c.isspace()) or 1
    sym = sum(1 for c in text if c in _CODE_SYMBOLS) / nonspace
    codey = sum(1 for ln in lines if _CODE_LINE_RE.search(ln)) / len(lines)
    indent = sum(1 for ln in lines if ln.startswith(("  ", "\t"))) / len(lines)
    # Prose: symbols ~1-3% of characters, few code-like lines; code: 8-20% and 30-90%.
    return (0.4 * min(1.0, max(0.0, sym - 0.02) / 0.06) + 0.45 * min(1.0, codey / 0.35)
            + 0.15 * min(1.0, indent / 0.3))


def detect_language(text: str, lid: Callable[[str], tuple[str, float]] | None = None,
                    sample_chars: int = 20000) -> tuple[str, float]:
    """Guess the language of `text`: ("en" | "zh" | "code" | "other", confidence in 0..1).

    The built-in detector looks at scripts (Han ratio; kana/hangul mean "other"), code cues
    (symbol density, code-like lines, indentation) and, for Latin script, the share of English
    stop words. `lid`, when given (e.g. `load_lid_model("lid.176.bin")`), replaces the
    natural-language decision; code detection stays built in (LID models have no code label).
    Only the first `sample_chars` characters are read.
    """
    s = text[:sample_chars]
    if not s.strip():
        return "other", 0.0
    code = _code_score(s)
    if code >= 0.5:
        return "code", round(min(1.0, code), 4)
    if lid is not None:
        return lid(s)
    han = len(_HAN_RE.findall(s))
    kana = len(_KANA_HANGUL_RE.findall(s))
    words = _ASCII_WORD_RE.findall(s)
    latin = sum(len(w) - w.count("'") for w in words)
    letters = sum(1 for c in s if c.isalpha()) or 1
    if han + kana >= 0.3 * letters and han + kana > 0:
        if kana > 0.1 * (han + kana):
            return "other", round(kana / (han + kana), 4)  # Japanese or Korean
        if han >= latin:
            return "zh", round(han / (han + latin), 4)
    if words and latin >= 0.8 * letters:
        stop = sum(1 for w in words if w.lower() in EN_STOP_WORDS) / len(words)
        if stop >= 0.15:
            # 0.15 stop words -> 0.6; >= 0.35 (typical prose) -> 1.0; scaled by Latin share.
            conf = min(1.0, 0.6 + 2 * (stop - 0.15)) * latin / letters
            return "en", round(min(1.0, conf), 4)
        # Latin script without English function words; short texts are weak evidence.
        return "other", round((1 - stop / 0.15) * min(1.0, len(words) / 20), 4)
    return "other", 0.5


_FASTTEXT_LANGS = {"en": "en", "zh": "zh", "wuu": "zh", "yue": "zh"}


def load_lid_model(path: str) -> Callable[[str], tuple[str, float]]:
    """A language identifier from a fastText LID model file (e.g. lid.176.bin).

    Needs the optional `fasttext` package (not a dependency); raises ImportError saying so.
    Labels map to our set: en -> "en", zh/wuu/yue -> "zh", anything else -> "other".
    """
    try:
        import fasttext  # type: ignore
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("a fastText LID model needs `pip install fasttext` "
                          "(or use the built-in detector: no model path)") from e
    model = fasttext.load_model(str(path))

    def identify(text: str) -> tuple[str, float]:
        labels, probs = model.predict(text.replace("\n", " "), k=1)
        label = labels[0].replace("__label__", "") if labels else ""
        return _FASTTEXT_LANGS.get(label, "other"), round(float(probs[0]) if probs else 0.0, 4)

    return identify


# -- ids and documents ----------------------------------------------------------------------

def doc_id(text: str, source: str | None = None) -> str:
    """A stable 24-hex-digit id: BLAKE2b of the source name (when given) and the text."""
    h = hashlib.blake2b(digest_size=12)
    if source:
        h.update(source.encode("utf-8", "surrogatepass") + b"\x1f")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def format_document(raw: dict, lid: Callable[[str], tuple[str, float]] | None = None,
                    **normalize_kwargs) -> dict:
    """Normalise `raw["text"]`, keep every metadata field, and fill `id` and `lang`.

    An existing `lang` is trusted (mapped to our four labels when it is a common alias);
    otherwise it is detected and `lang_score` is recorded. An existing `id` is kept (as a
    string); otherwise `doc_id(text, source)`. Code keeps its full-width characters (they
    may sit in string literals). Raises ValueError when there is no text field.
    """
    text = raw.get("text")
    if not isinstance(text, str):
        raise ValueError(f"document has no text field (keys: {sorted(raw)[:8]})")
    doc = dict(raw)
    lang = _canonical_lang(raw.get("lang"))
    kwargs = dict(normalize_kwargs)
    if lang == "code":
        kwargs.setdefault("fold_width", False)
    doc["text"] = normalize_text(text, **kwargs)
    if lang is None:
        lang, score = detect_language(doc["text"], lid=lid)
        if lang == "code" and kwargs.get("fold_width", True):
            doc["text"] = normalize_text(text, **{**kwargs, "fold_width": False})
        doc["lang_score"] = score
    doc["lang"] = lang
    if raw.get("id") in (None, ""):
        doc["id"] = doc_id(doc["text"], raw.get("source"))
    else:
        doc["id"] = str(raw["id"])
    return doc


_LANG_ALIASES = {"en": "en", "eng": "en", "english": "en", "zh": "zh", "zho": "zh", "cmn": "zh",
                 "chinese": "zh", "zh-cn": "zh", "zh-tw": "zh", "zh-hans": "zh", "zh-hant": "zh",
                 "code": "code", "other": "other"}


def _canonical_lang(lang) -> str | None:
    if not isinstance(lang, str) or not lang.strip():
        return None
    return _LANG_ALIASES.get(lang.strip().lower(), "other")
