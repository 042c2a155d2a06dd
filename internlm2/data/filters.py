"""Rule filters (Gopher / C4 / RefinedWeb style) and the safety filter.

Every rule is a small function `rule(stats, thresholds) -> None | reason` where the reason
names the rule, the measure and the threshold, e.g.
`"gopher_repetition: dup_line_frac=0.42 > 0.30"`, so the pipeline can file each removed
document under its stage and reason. `RuleFilter.check(doc)` runs the rules for the
document's language in order and returns the first reason (or None to keep).

Chinese is not space-separated: the tokenizer below makes every CJK character a "word" and
every run of other non-space characters a word, so the same rules measure English words and
Chinese characters (Chinese n-gram rules are character n-grams). Thresholds are per language
(`DEFAULT_THRESHOLDS`); the table in the report/README lists them with their sources:

- Gopher (Rae et al. 2021, appendix A1.1 and table A1): 50..100k words, mean word length
  3..10, symbol (#, ellipsis) to word ratio 0.1, bullet lines 0.9, ellipsis lines 0.3,
  alphabetic words 0.8, >= 2 stop words; duplicate line / paragraph fractions 0.30 (by
  count) and 0.20 (by characters); top 2/3/4-gram character coverage 0.20/0.18/0.16;
  duplicated 5..10-gram character fractions 0.15 .. 0.10.
- C4 (Raffel et al. 2020): "lorem ipsum" removes the page; JavaScript notices and
  cookie/policy lines are boilerplate; curly braces mark code in prose (C4 drops any "{";
  we use a density, since LaTeX in prose uses braces).
- FineWeb / RefinedWeb-style line rules (datatrove defaults): at least 12% of lines end in
  terminal punctuation, at most 67% of lines of <= 30 characters.
- Chinese: our own choices, scaled from the above (a Chinese character carries about
  0.6-0.7 English words) and loosened for character n-grams, which repeat more than word
  n-grams (FineWeb-2's cmn_Hani word-level settings loosen Gopher's by 0.03-0.05).

Code (`lang == "code"`) skips the prose rules; only `abnormal_chars` applies to it.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit

import numpy as np

# -- tokenisation and statistics --------------------------------------------------------------

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_HAN_RE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# A word: one CJK character, or a run of other non-space characters that starts and ends
# with a letter or digit.
_WORD_RE = re.compile(f"[{_CJK}]|[^\\W_{_CJK}](?:[^\\s{_CJK}]*[^\\W_{_CJK}])?")
_ALPHA_RE = re.compile(r"[^\W\d_]")
_BULLETS = ("•", "●", "○", "◦", "▪", "▫", "■", "□", "►", "▶", "‣", "⁃", "∙", "·", "➤", "✓",
            "✔", "★", "☆", "→", "- ", "* ", "– ", "— ", "+ ")
_ELLIPSES = ("...", "…", "。。。")
_TERMINAL = tuple(".!?。！？…\"'”’」』)）")
_ZH_SENTENCE_END_RE = re.compile("[。！？!?]")


# Punctuation and symbols: anything that is neither a letter/digit nor whitespace.
_PUNCT_RE = re.compile(r"[^\w\s]|_")
_REPLACEMENT = "\ufffd"
_PRIVATE_USE_RE = re.compile("[\ue000-\uf8ff\U000f0000-\U000ffffd\U00100000-\U0010fffd]")
# Controls (except \t \n), zero-width characters, lone surrogates: unprintable in a document.
_NONPRINT_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff\ud800-\udfff]")
# UTF-8 read as Latin-1/cp1252 (Ã© Â  â€™ ï»¿) and the classic GBK/UTF-8 mix-ups
# (锟斤拷 from U+FFFD bytes read as GBK, 烫烫/屯屯 from uninitialised MSVC buffers).
_MOJIBAKE_RE = re.compile("[ÃÂ][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e"
                          "\u0192\u02c6\u02dc\u2013-\u2026\u2030\u2039\u203a\u20ac\u2122]"
                          "|â€|ï»¿|锟斤拷|烫烫烫|屯屯屯")
# C4's line-level boilerplate: JavaScript notices (not every line that names JavaScript),
# cookie and policy notices, copyright footers.
_BOILERPLATE_RE = re.compile(
    r"\b(?:enable|turn on|activate|allow)\s+(?:your\s+)?javascript\b|\brequires?\s+javascript\b|"
    r"\bjavascript\s+(?:is\s+|must be\s+|has been\s+)?(?:disabled|required|not enabled|"
    r"enabled to|turned off)|(?:doesn't|does not|don't|do not)\s+support\s+javascript|"
    r"cookie policy|uses cookies|use of cookies|we use cookies|accept cookies|privacy policy|"
    r"terms of use|terms of service|all rights reserved|版权所有|隐私政策|使用条款|用户协议|"
    r"启用\s*javascript", re.I)


class TextStats:
    """Measures of one text, each computed on first use and shared by the rules."""

    def __init__(self, text: str):
        self.text = text

    @cached_property
    def lines(self) -> list[str]:
        """Non-empty lines, stripped."""
        return [ln.strip() for ln in self.text.split("\n") if ln.strip()]

    @cached_property
    def paragraphs(self) -> list[str]:
        return [p.strip() for p in re.split(r"\n[ \t\u3000]*\n", self.text) if p.strip()]

    @cached_property
    def words(self) -> list[str]:
        """Single CJK characters, and other tokens with leading/trailing punctuation removed
        (pure punctuation dropped): "(3.5)," -> "3.5", "#tag" -> "tag"."""
        return _WORD_RE.findall(self.text)

    @cached_property
    def n_chars(self) -> int:
        """Non-whitespace characters."""
        return sum(map(len, self.text.split()))

    @cached_property
    def n_han(self) -> int:
        return len(_HAN_RE.findall(self.text))


def _fmt(x) -> str:
    if not isinstance(x, float):
        return str(x)
    return f"{x:.4f}" if 0 < abs(x) < 0.01 else f"{x:.2f}"


def _cmp(rule: str, metric: str, value, op: str, limit) -> str:
    v, lim = _fmt(value), _fmt(limit)
    if v == lim:  # 0.1526 > 0.15 must not print as "0.15 > 0.15"
        v, lim = f"{value:.4f}", f"{float(limit):.4f}" if isinstance(limit, float) else lim
    return f"{rule}: {metric}={v} {op} {lim}"


def _too_high(rule: str, metric: str, value, limit) -> str | None:
    if limit is not None and value > limit:
        return _cmp(rule, metric, value, ">", limit)
    return None


def _too_low(rule: str, metric: str, value, limit) -> str | None:
    if limit is not None and value < limit:
        return _cmp(rule, metric, value, "<", limit)
    return None


def _first(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r), None)


# -- thresholds ----------------------------------------------------------------------------

EN_GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
# Frequent Chinese function characters (particles, pronouns, prepositions, conjunctions).
ZH_STOP_WORDS = tuple("的了是在和也就不这那我你他她它们与及为对都而被把从但之以其或所并着过吗呢吧")


@dataclass
class Thresholds:
    """Limits for one language; None disables a check. Fractions are of lines, words or chars."""
    min_words: int | None = None            # en/other: words; zh uses min_chars
    max_words: int | None = None
    min_chars: int | None = None            # non-whitespace characters
    max_chars: int | None = None
    min_mean_word_len: float | None = None
    max_mean_word_len: float | None = None
    max_symbol_word_ratio: float | None = 0.1
    max_ellipsis_line_frac: float | None = 0.3
    max_bullet_line_frac: float | None = 0.9
    min_alpha_word_frac: float | None = None
    min_cjk_frac: float | None = None       # Han characters / non-whitespace characters
    stop_words: tuple[str, ...] = ()
    min_stop_words: int | None = None       # occurrences of stop_words
    min_stop_word_frac: float | None = None  # those occurrences / words
    min_terminal_line_frac: float | None = None
    min_sentence_ends: int | None = None    # 。！？ (zh)
    max_punct_frac: float | None = None     # punctuation+symbol chars / non-whitespace chars
    max_replacement_frac: float | None = 0.001
    max_private_use_frac: float | None = 0.001
    max_nonprintable_frac: float | None = 0.001
    max_mojibake_frac: float | None = 0.001
    max_dup_line_frac: float | None = 0.30
    max_dup_para_frac: float | None = 0.30
    max_dup_line_char_frac: float | None = 0.20
    max_dup_para_char_frac: float | None = 0.20
    top_ngram_fracs: tuple = ((2, 0.20), (3, 0.18), (4, 0.16))
    dup_ngram_fracs: tuple = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    short_line_chars: int = 30
    max_short_line_frac: float | None = 0.67
    min_lines_for_short_rule: int = 3
    min_mean_line_chars: float | None = 10.0
    max_line_chars: int | None = 10_000
    lorem_ipsum: bool = True
    max_boilerplate_line_frac: float | None = 0.25
    max_curly_frac: float | None = 0.01

    def replace(self, overrides: dict) -> "Thresholds":
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"unknown rule-filter threshold(s) {bad}; known: {sorted(names)}")
        fixed = {}
        for k, v in overrides.items():
            if k in ("top_ngram_fracs", "dup_ngram_fracs"):  # TOML gives lists of lists
                v = tuple((int(n), float(f)) for n, f in v)
            elif k == "stop_words":
                v = tuple(v)
            fixed[k] = v
        return dataclasses.replace(self, **fixed)


DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "en": Thresholds(
        min_words=50, max_words=100_000, min_mean_word_len=3, max_mean_word_len=10,
        min_alpha_word_frac=0.8, stop_words=EN_GOPHER_STOP_WORDS, min_stop_words=2,
        min_terminal_line_frac=0.12, max_punct_frac=0.25),
    "zh": Thresholds(
        min_chars=80, max_chars=150_000, max_symbol_word_ratio=0.05, min_cjk_frac=0.4,
        stop_words=ZH_STOP_WORDS, min_stop_words=2, min_stop_word_frac=0.02,
        min_terminal_line_frac=0.10, min_sentence_ends=1, max_punct_frac=0.35,
        top_ngram_fracs=((2, 0.20), (3, 0.18), (4, 0.16)),
        dup_ngram_fracs=((5, 0.20), (6, 0.19), (7, 0.18), (8, 0.17), (9, 0.16), (10, 0.15)),
        short_line_chars=15, min_mean_line_chars=5.0, max_line_chars=5_000),
    # Unknown languages: only language-independent rules (no stop words, word shape, punctuation).
    "other": Thresholds(min_words=50, max_words=100_000),
}


# -- the rules ---------------------------------------------------------------------------------

def abnormal_chars(s: TextStats, t: Thresholds) -> str | None:
    n = max(1, len(s.text))
    return _first(
        _too_high("abnormal_chars", "replacement_frac", s.text.count(_REPLACEMENT) / n,
                  t.max_replacement_frac),
        _too_high("abnormal_chars", "private_use_frac", len(_PRIVATE_USE_RE.findall(s.text)) / n,
                  t.max_private_use_frac),
        _too_high("abnormal_chars", "nonprintable_frac", len(_NONPRINT_RE.findall(s.text)) / n,
                  t.max_nonprintable_frac),
        _too_high("abnormal_chars", "mojibake_frac",
                  sum(len(m) for m in _MOJIBAKE_RE.findall(s.text)) / n, t.max_mojibake_frac))


def c4_lorem_ipsum(s: TextStats, t: Thresholds) -> str | None:
    if t.lorem_ipsum and "lorem ipsum" in s.text.lower():
        return "c4_lorem_ipsum: contains 'lorem ipsum'"
    return None


def length(s: TextStats, t: Thresholds) -> str | None:
    nw = len(s.words)
    return _first(_too_low("length", "words", nw, t.min_words),
                  _too_high("length", "words", nw, t.max_words),
                  _too_low("length", "chars", s.n_chars, t.min_chars),
                  _too_high("length", "chars", s.n_chars, t.max_chars))


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(items equal to an earlier item, their characters)."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


def gopher_repetition(s: TextStats, t: Thresholds) -> str | None:
    out = []
    for unit, items, max_frac, max_char_frac in (
            ("para", s.paragraphs, t.max_dup_para_frac, t.max_dup_para_char_frac),
            ("line", s.lines, t.max_dup_line_frac, t.max_dup_line_char_frac)):
        if not items:
            continue
        n, chars = _duplicates(items)
        total = sum(len(x) for x in items) or 1
        out += [_too_high("gopher_repetition", f"dup_{unit}_frac", n / len(items), max_frac),
                _too_high("gopher_repetition", f"dup_{unit}_char_frac", chars / total,
                          max_char_frac)]
    return _first(*out)


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit polynomial hash of every window of n ids (wrapping arithmetic)."""
    m = len(ids) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * mult + ids[k:k + m]
    return h


class _NGramStats:
    def __init__(self, words: list[str]):
        vocab: dict[str, int] = {}
        low = [w.lower() for w in words]
        self.ids = np.array([vocab.setdefault(w, len(vocab)) for w in low], dtype=np.uint64) + 1
        self.lens = np.array([len(w) for w in low], dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(self.lens)])
        self.total = int(self.cum[-1]) or 1

    def top_frac(self, n: int) -> float:
        """Characters covered by the most frequent n-gram (count x its length) / all."""
        if len(self.ids) < n:
            return 0.0
        _, inv, counts = np.unique(_ngram_hashes(self.ids, n), return_inverse=True,
                                   return_counts=True)
        best = int(np.argmax(counts))
        if counts[best] < 2:
            return 0.0
        first = int(np.flatnonzero(inv == best)[0])
        gram_chars = int(self.cum[first + n] - self.cum[first])
        return min(1.0, gram_chars * int(counts[best]) / self.total)

    def dup_frac(self, n: int) -> float:
        """Characters inside any n-gram that occurs more than once (each counted once) / all."""
        if len(self.ids) < n:
            return 0.0
        _, inv, counts = np.unique(_ngram_hashes(self.ids, n), return_inverse=True,
                                   return_counts=True)
        starts = np.flatnonzero(counts[inv] > 1)
        if not len(starts):
            return 0.0
        cover = np.zeros(len(self.ids) + 1, dtype=np.int64)
        np.add.at(cover, starts, 1)
        np.add.at(cover, starts + n, -1)
        covered = np.cumsum(cover[:-1]) > 0
        return float(self.lens[covered].sum()) / self.total


def _ngrams(s: TextStats) -> _NGramStats:
    if "_ngram" not in s.__dict__:
        s.__dict__["_ngram"] = _NGramStats(s.words)
    return s.__dict__["_ngram"]


def gopher_top_ngram(s: TextStats, t: Thresholds) -> str | None:
    ng = _ngrams(s)
    for n, limit in t.top_ngram_fracs:
        r = _too_high("gopher_top_ngram", f"top_{n}gram_frac", ng.top_frac(n), limit)
        if r:
            return r
    return None


def gopher_dup_ngram(s: TextStats, t: Thresholds) -> str | None:
    ng = _ngrams(s)
    for n, limit in t.dup_ngram_fracs:
        r = _too_high("gopher_dup_ngram", f"dup_{n}gram_frac", ng.dup_frac(n), limit)
        if r:
            return r
    return None


def line_breaks(s: TextStats, t: Thresholds) -> str | None:
    """Too many very short lines (broken layout, menus), or one huge line (lost breaks)."""
    if not s.lines:
        return None
    short = None
    if len(s.lines) >= t.min_lines_for_short_rule:
        frac = sum(1 for ln in s.lines if len(ln) <= t.short_line_chars) / len(s.lines)
        short = _too_high("line_breaks", f"short_line_frac(<={t.short_line_chars})", frac,
                          t.max_short_line_frac)
    return _first(short, _too_high("line_breaks", "max_line_chars",
                                   max(len(ln) for ln in s.lines), t.max_line_chars))


def mean_line_length(s: TextStats, t: Thresholds) -> str | None:
    if not s.lines:
        return None
    return _too_low("mean_line_length", "mean_line_chars",
                    sum(len(ln) for ln in s.lines) / len(s.lines), t.min_mean_line_chars)


def mean_word_length(s: TextStats, t: Thresholds) -> str | None:
    if not s.words:
        return None
    mean = sum(len(w) for w in s.words) / len(s.words)
    return _first(_too_low("mean_word_length", "mean_word_len", mean, t.min_mean_word_len),
                  _too_high("mean_word_length", "mean_word_len", mean, t.max_mean_word_len))


def symbol_ratio(s: TextStats, t: Thresholds) -> str | None:
    n_sym = s.text.count("#") + sum(s.text.count(e) for e in ("...", "…"))
    return _too_high("symbol_ratio", "symbol_word_ratio", n_sym / max(1, len(s.words)),
                     t.max_symbol_word_ratio)


def ellipsis_lines(s: TextStats, t: Thresholds) -> str | None:
    if not s.lines:
        return None
    frac = sum(1 for ln in s.lines if ln.endswith(_ELLIPSES)) / len(s.lines)
    return _too_high("ellipsis_lines", "ellipsis_line_frac", frac, t.max_ellipsis_line_frac)


def bullet_lines(s: TextStats, t: Thresholds) -> str | None:
    if not s.lines:
        return None
    frac = sum(1 for ln in s.lines if ln.startswith(_BULLETS) or ln in ("-", "*", "•")) / len(s.lines)
    return _too_high("bullet_lines", "bullet_line_frac", frac, t.max_bullet_line_frac)


def alpha_words(s: TextStats, t: Thresholds) -> str | None:
    if t.min_alpha_word_frac is None or not s.words:
        return None
    frac = sum(1 for w in s.words if _ALPHA_RE.search(w)) / len(s.words)
    return _too_low("alpha_words", "alpha_word_frac", frac, t.min_alpha_word_frac)


def cjk_fraction(s: TextStats, t: Thresholds) -> str | None:
    if t.min_cjk_frac is None:
        return None
    return _too_low("cjk_fraction", "cjk_frac", s.n_han / max(1, s.n_chars), t.min_cjk_frac)


def stop_words(s: TextStats, t: Thresholds) -> str | None:
    if not t.stop_words or (t.min_stop_words is None and t.min_stop_word_frac is None):
        return None
    sw = set(t.stop_words)
    n = sum(1 for w in s.words if w.lower() in sw)
    return _first(_too_low("stop_words", "stop_words", n, t.min_stop_words),
                  _too_low("stop_words", "stop_word_frac", n / max(1, len(s.words)),
                           t.min_stop_word_frac))


def punctuation(s: TextStats, t: Thresholds) -> str | None:
    """Punctuation distribution: lines end in sentences; Chinese has 。！？; not all symbols."""
    out = []
    if s.lines and t.min_terminal_line_frac is not None:
        frac = sum(1 for ln in s.lines if ln.endswith(_TERMINAL)) / len(s.lines)
        out.append(_too_low("punctuation", "terminal_line_frac", frac, t.min_terminal_line_frac))
    if t.min_sentence_ends is not None:
        out.append(_too_low("punctuation", "sentence_ends",
                            len(_ZH_SENTENCE_END_RE.findall(s.text)), t.min_sentence_ends))
    if t.max_punct_frac is not None:
        out.append(_too_high("punctuation", "punct_frac",
                             len(_PUNCT_RE.findall(s.text)) / max(1, s.n_chars), t.max_punct_frac))
    return _first(*out)


def c4_boilerplate(s: TextStats, t: Thresholds) -> str | None:
    if not s.lines or t.max_boilerplate_line_frac is None or not _BOILERPLATE_RE.search(s.text):
        return None
    frac = sum(1 for ln in s.lines if _BOILERPLATE_RE.search(ln)) / len(s.lines)
    return _too_high("c4_boilerplate", "boilerplate_line_frac", frac, t.max_boilerplate_line_frac)


def c4_curly_braces(s: TextStats, t: Thresholds) -> str | None:
    frac = (s.text.count("{") + s.text.count("}")) / max(1, s.n_chars)
    return _too_high("c4_curly_braces", "curly_frac", frac, t.max_curly_frac)


def strip_boilerplate_lines(text: str) -> tuple[str, int]:
    """C4's line-level cleaning: drop JavaScript notices and cookie/policy lines.

    Returns the text without them and the number of lines dropped. `RuleFilter.check`
    does not modify documents; a pipeline that wants C4's behaviour calls this first.
    """
    kept, dropped = [], 0
    for ln in text.split("\n"):
        if ln.strip() and _BOILERPLATE_RE.search(ln) and len(ln) < 300:
            dropped += 1
        else:
            kept.append(ln)
    return "\n".join(kept), dropped


# The order is the order of reporting: cheap and specific rules first.
RULES: dict[str, Callable[[TextStats, Thresholds], str | None]] = {
    "abnormal_chars": abnormal_chars,
    "c4_lorem_ipsum": c4_lorem_ipsum,
    "length": length,
    "gopher_repetition": gopher_repetition,
    "gopher_top_ngram": gopher_top_ngram,
    "gopher_dup_ngram": gopher_dup_ngram,
    "line_breaks": line_breaks,
    "mean_line_length": mean_line_length,
    "mean_word_length": mean_word_length,
    "symbol_ratio": symbol_ratio,
    "ellipsis_lines": ellipsis_lines,
    "bullet_lines": bullet_lines,
    "alpha_words": alpha_words,
    "cjk_fraction": cjk_fraction,
    "stop_words": stop_words,
    "punctuation": punctuation,
    "c4_boilerplate": c4_boilerplate,
    "c4_curly_braces": c4_curly_braces,
}
CODE_RULES = ("abnormal_chars",)


class RuleFilter:
    """Apply the rules for a document's language; `check(doc)` -> first reason or None.

    `config` (e.g. the `[filters.rules]` table of a pipeline TOML) may hold:
      - `all`: threshold overrides applied to every language;
      - `en`, `zh`, `other`: threshold overrides for that language (field names of Thresholds);
      - `disable`: rule names to skip (see RULES);
      - `code_rules`: rules applied to code documents (default: abnormal_chars only);
      - `skip_sources`: `source` values kept without checks (e.g. the built-in synthetic
        text, which is templated on purpose and fails the repetition rules).
    Languages other than en/zh/code use the `other` thresholds.
    """

    def __init__(self, config: dict | None = None):
        config = dict(config or {})
        common = config.pop("all", {}) or {}
        disable = set(config.pop("disable", []) or [])
        code_rules = tuple(config.pop("code_rules", CODE_RULES))
        self.skip_sources = set(config.pop("skip_sources", []) or [])
        unknown = sorted((disable | set(code_rules)) - set(RULES))
        if unknown:
            raise ValueError(f"unknown rule name(s) {unknown}; known: {list(RULES)}")
        extra = sorted(set(config) - set(DEFAULT_THRESHOLDS))
        if extra:
            raise ValueError(f"unknown rule-filter config key(s) {extra}; expected all, disable, "
                             f"code_rules or a language in {sorted(DEFAULT_THRESHOLDS)}")
        self.thresholds = {lang: t.replace(common).replace(config.get(lang, {}) or {})
                           for lang, t in DEFAULT_THRESHOLDS.items()}
        self.rules = [(name, fn) for name, fn in RULES.items() if name not in disable]
        self.code_rules = [(name, RULES[name]) for name in code_rules if name not in disable]

    def check(self, doc: dict) -> str | None:
        if self.skip_sources and doc.get("source") in self.skip_sources:
            return None
        text = doc.get("text") or ""
        lang = doc.get("lang")
        if lang is None:
            from .format import detect_language
            lang = detect_language(text)[0]
        s = TextStats(text)
        if lang == "code":
            t = self.thresholds["other"]
            return _first(*(fn(s, t) for _, fn in self.code_rules))
        t = self.thresholds.get(lang, self.thresholds["other"])
        for _, fn in self.rules:
            reason = fn(s, t)
            if reason:
                return reason
        return None

    __call__ = check


# -- safety --------------------------------------------------------------------------------

# Minimal placeholders that show the format and catch only the most obvious cases. Replace
# them with maintained lists (e.g. the UT1 blacklist for domains, LDNOOBW for words) in real use.
DEFAULT_DOMAIN_BLOCKLIST = ("pornhub.com", "xvideos.com", "xhamster.com", "xnxx.com",
                            "spam-casino.example")
DEFAULT_WORD_BLOCKLIST = {
    "en": ["porn", "porno", "hentai", "viagra", "cialis", "online casino"],
    "zh": ["色情网站", "成人视频", "裸聊", "博彩网站", "六合彩"],
}
# Languages written without spaces: blocklist entries match as substrings.
SUBSTRING_LANGS = frozenset({"zh", "ja", "th"})
# A word character that is not CJK: the token boundary test for space-separated languages.
_WORD_CHAR = f"[^\\W{_CJK}]"


def _host(url: str) -> str:
    url = url.strip()
    if "//" not in url.split("?", 1)[0]:
        url = "//" + url
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return ""
    return host.rstrip(".").lower()


def _resolve(spec):
    """A callable from 'module:attr' (config files) or the callable itself."""
    if isinstance(spec, str):
        mod, _, attr = spec.partition(":")
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    return spec


def _read_list(spec) -> list[str]:
    """A list, or a file path with one entry per line (# comments, blank lines ignored)."""
    if isinstance(spec, (str, Path)):
        lines = Path(spec).read_text(encoding="utf-8").splitlines()
        return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return [str(x) for x in spec]


@dataclass
class _Scorer:
    name: str
    fn: Callable[[str], float]
    threshold: float


class SafetyFilter:
    """Domain blocklist, word blocklist and pluggable classifiers; `check(doc)` -> reason | None.

    - `domain_blocklist`: domains; a document is removed when its `url` host or any parent
      domain of it is listed ("example.com" blocks "a.b.example.com").
    - `word_blocklist`: {lang: [words or phrases]}. Every list is searched in every
      document; lists of space-separated languages match on token boundaries,
      case-insensitively ("ass" does not match "class"); zh/ja/th lists match as substrings.
      Code documents are not searched unless `check_code_words`.
    - `classifiers`: callables `scorer(text) -> probability of unsafe`, or
      (name, scorer, threshold) tuples, or {"name", "scorer", "threshold"} dicts (a scorer
      may be a "module:function" string); removed when probability >= its threshold
      (default `threshold`).
    None for a list means the small built-in placeholder list; [] means none.
    """

    def __init__(self, domain_blocklist: Iterable[str] | None = None,
                 word_blocklist: dict[str, Iterable[str]] | None = None,
                 classifiers: Iterable = (), threshold: float = 0.5,
                 check_code_words: bool = False):
        domains = DEFAULT_DOMAIN_BLOCKLIST if domain_blocklist is None else domain_blocklist
        self.domains = {d.strip().lower().lstrip("*.").rstrip(".") for d in domains if d.strip()}
        words = DEFAULT_WORD_BLOCKLIST if word_blocklist is None else word_blocklist
        self.word_patterns: list[tuple[str, re.Pattern, dict[str, str]]] = []
        for lang, entries in words.items():
            entries = sorted({e.strip() for e in entries if e.strip()}, key=len, reverse=True)
            if not entries:
                continue
            alts = "|".join(r"\s+".join(map(re.escape, e.split())) for e in entries)
            if lang in SUBSTRING_LANGS:
                pat = re.compile(alts, re.I)
            else:
                pat = re.compile(f"(?<!{_WORD_CHAR})(?:{alts})(?!{_WORD_CHAR})", re.I)
            self.word_patterns.append((lang, pat, {" ".join(e.lower().split()): e for e in entries}))
        self.scorers = [self._scorer(c, threshold) for c in classifiers]
        self.check_code_words = check_code_words

    @staticmethod
    def _scorer(c, threshold: float) -> _Scorer:
        if isinstance(c, dict):
            fn = _resolve(c["scorer"])
            return _Scorer(c.get("name") or getattr(fn, "__name__", "classifier"), fn,
                           float(c.get("threshold", threshold)))
        if isinstance(c, (tuple, list)):
            if len(c) == 3:
                return _Scorer(str(c[0]), _resolve(c[1]), float(c[2]))
            fn = _resolve(c[0])
            return _Scorer(getattr(fn, "__name__", "classifier"), fn, float(c[1]))
        fn = _resolve(c)
        return _Scorer(getattr(fn, "__name__", "classifier"), fn, float(threshold))

    @classmethod
    def from_config(cls, cfg: dict | None) -> "SafetyFilter":
        """From a `[filters.safety]` table: lists inline or as file paths; classifiers as dicts."""
        cfg = dict(cfg or {})
        domains = cfg.get("domain_blocklist")
        words = cfg.get("word_blocklist")
        return cls(domain_blocklist=None if domains is None else _read_list(domains),
                   word_blocklist=None if words is None else
                   {lang: _read_list(v) for lang, v in words.items()},
                   classifiers=cfg.get("classifiers", ()),
                   threshold=float(cfg.get("threshold", 0.5)),
                   check_code_words=bool(cfg.get("check_code_words", False)))

    def blocked_domain(self, url: str) -> str | None:
        host = _host(url or "")
        parts = host.split(".") if host else []
        for i in range(len(parts)):
            d = ".".join(parts[i:])
            if d in self.domains:
                return d
        return None

    def check(self, doc: dict) -> str | None:
        url = doc.get("url")
        if url:
            d = self.blocked_domain(str(url))
            if d:
                return f"safety_domain: '{d}' (host {_host(str(url))})"
        text = doc.get("text") or ""
        if doc.get("lang") != "code" or self.check_code_words:
            for lang, pat, entries in self.word_patterns:
                m = pat.search(text)
                if m:
                    key = " ".join(m.group(0).lower().split())
                    return f"safety_word: {lang} '{entries.get(key, m.group(0))}'"
        for sc in self.scorers:
            p = float(sc.fn(text))
            if p >= sc.threshold:
                return f"safety_classifier: {sc.name} p={p:.3f} >= {sc.threshold:.2f}"
        return None

    __call__ = check
