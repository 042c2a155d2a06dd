"""Long-context data selection (report section 3.1, "long-context data").

Two stages, both with `check(doc) -> reason | None`:

1. `LongContextSelector`: documents of at least `min_bytes` (32 KB, the report's bar) that
   pass statistical filters with thresholds per language (`LangThresholds`):
   - line statistics over non-blank lines: mean length, fraction of very short lines,
     coefficient of variation (std / mean) of the lengths, which is ~0 for machine-made
     fixed-width dumps;
   - character statistics over non-whitespace characters: letters (CJK ideographs count as
     letters) and digits;
   - conjunction and discourse-word coverage: occurrences of the words of
     `EN_DISCOURSE` per 1000 words (English), or of `ZH_DISCOURSE` per 1000 CJK
     characters (Chinese), and how many distinct ones occur. Reasoned prose (books,
     papers, reports) uses them; lists, tables, logs and boilerplate do not.
2. `PerplexityDiffFilter`: with a causal LM, the last `tail` tokens of a chunk are scored
   with the whole chunk before them and with only `short_context` tokens before each;
   `perplexity_gain` is the mean negative log-likelihood (nats/token) with the short
   context minus with the long one. If the long context does not lower perplexity
   (gain <= `min_gain`) the document is a distractor for long-context training and is
   removed.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

# -- statistical filters ------------------------------------------------------------------

EN_DISCOURSE = (
    "however", "therefore", "because", "although", "moreover", "furthermore", "thus",
    "hence", "consequently", "nevertheless", "nonetheless", "meanwhile", "whereas", "while",
    "since", "unless", "despite", "instead", "otherwise", "but", "so", "yet", "then",
    "also", "finally", "indeed", "accordingly", "similarly", "likewise", "besides",
    "though", "if", "for example", "for instance", "in addition", "as a result",
    "on the other hand", "in contrast", "in fact", "that is", "in other words",
)
ZH_DISCOURSE = (
    "但是", "因此", "因为", "虽然", "而且", "所以", "然而", "不过", "如果", "于是", "并且",
    "此外", "另外", "同时", "尽管", "即使", "因而", "从而", "例如", "比如", "总之", "首先",
    "其次", "最后", "可是", "只是", "甚至", "况且", "然后", "接着", "否则", "既然", "由于",
    "以便", "只要", "只有", "不仅", "而是", "换句话说", "也就是说", "另一方面", "相反",
)
_CJK_RE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LETTERS_RE = re.compile(r"[^\W\d_]+")
_DIGITS_RE = re.compile(r"\d+")
_EN_WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_EN_DISCOURSE_RE = re.compile(
    r"\b(?:" + "|".join(sorted((re.escape(w).replace(r"\ ", r"\s+") for w in EN_DISCOURSE),
                               key=len, reverse=True)) + r")\b", re.I)
_ZH_DISCOURSE_RE = re.compile("|".join(sorted(ZH_DISCOURSE, key=len, reverse=True)))


@dataclass
class LangThresholds:
    """Thresholds for one language; None turns a check off. Line lengths are in characters."""

    min_mean_line_len: float | None = 30.0
    short_line_len: int = 20               # a line shorter than this is "very short"
    max_short_line_frac: float | None = 0.5
    min_line_cv: float | None = 0.02       # std/mean of line lengths, with >= 50 lines
    min_alpha_frac: float | None = 0.75    # letters (incl. CJK) / non-whitespace chars
    max_digit_frac: float | None = 0.1
    min_discourse_per_1k: float | None = 5.0   # per 1000 words (en) / CJK characters (zh)
    min_distinct_discourse: int | None = 5


def _default_thresholds() -> dict[str, LangThresholds]:
    return {
        "en": LangThresholds(),
        # Chinese lines carry ~3x the content per character; punctuation (，。“”) takes
        # ~15% of the characters; connectives are counted per 1000 characters.
        "zh": LangThresholds(min_mean_line_len=12.0, short_line_len=8, min_alpha_frac=0.65,
                             min_discourse_per_1k=2.0, min_distinct_discourse=4),
        # Repository concatenations: only size, line shape and characters.
        "code": LangThresholds(min_mean_line_len=None, max_short_line_frac=None,
                               min_line_cv=None, min_alpha_frac=0.3, max_digit_frac=0.3,
                               min_discourse_per_1k=None, min_distinct_discourse=None),
        # No discourse lists for other languages; isalpha covers their scripts.
        "other": LangThresholds(min_discourse_per_1k=None, min_distinct_discourse=None),
    }


@dataclass
class LongContextConfig:
    min_bytes: int = 32768
    thresholds: dict[str, LangThresholds] = field(default_factory=_default_thresholds)


def detect_lang(text: str) -> str:
    """"zh" when CJK ideographs are at least 30% of the letters, else "en"."""
    sample = text[:200_000]
    cjk = len(_CJK_RE.findall(sample))
    letters = len(sample) - len(_LETTERS_RE.sub("", sample))
    return "zh" if letters and cjk / letters >= 0.3 else "en"


def text_stats(text: str, lang: str) -> dict[str, float]:
    """The statistics `LongContextSelector` judges, for reports and for tuning thresholds."""
    lens = [len(ln.strip()) for ln in text.split("\n") if ln.strip()]
    n_lines = len(lens)
    mean = sum(lens) / n_lines if n_lines else 0.0
    std = math.sqrt(sum((x - mean) ** 2 for x in lens) / n_lines) if n_lines else 0.0
    nonws = "".join(text.split())
    n = max(len(nonws), 1)
    cjk = len(_CJK_RE.findall(nonws))
    alpha = len(nonws) - len(_LETTERS_RE.sub("", nonws))  # CJK ideographs are letters too
    digits = len(nonws) - len(_DIGITS_RE.sub("", nonws))
    stats = {
        "lines": n_lines, "mean_line_len": mean, "std_line_len": std,
        "line_cv": std / mean if mean else 0.0,
        "alpha_frac": alpha / n, "digit_frac": digits / n,
        "cjk_frac": cjk / n,
    }
    if lang == "zh":
        hits = _ZH_DISCOURSE_RE.findall(text)
        units = max(cjk, 1)
    else:
        hits = [h.lower() for h in _EN_DISCOURSE_RE.findall(text)]
        hits = [re.sub(r"\s+", " ", h) for h in hits]
        units = max(len(_EN_WORD_RE.findall(text)), 1)
    stats["discourse_per_1k"] = 1000.0 * len(hits) / units
    stats["distinct_discourse"] = len(set(hits))
    return stats


class LongContextSelector:
    """Keeps documents fit for long-context training; `check(doc)` gives the reason not to."""

    def __init__(self, config: LongContextConfig | None = None):
        self.config = config or LongContextConfig()

    def lang_of(self, doc: dict) -> str:
        lang = doc.get("lang")
        if lang in self.config.thresholds:
            return lang
        return detect_lang(doc.get("text") or "")

    def check(self, doc: dict) -> str | None:
        text = doc.get("text") or ""
        size = len(text.encode("utf-8"))
        if size < self.config.min_bytes:
            return f"too_short: {size} bytes < {self.config.min_bytes}"
        lang = self.lang_of(doc)
        th = self.config.thresholds.get(lang) or self.config.thresholds["en"]
        s = text_stats(text, lang)
        short = sum(1 for ln in text.split("\n")
                    if ln.strip() and len(ln.strip()) < th.short_line_len) / max(s["lines"], 1)
        if th.min_mean_line_len is not None and s["mean_line_len"] < th.min_mean_line_len:
            return f"short_lines: mean line {s['mean_line_len']:.1f} chars < {th.min_mean_line_len}"
        if th.max_short_line_frac is not None and short > th.max_short_line_frac:
            return (f"short_lines: {short:.2f} of lines under {th.short_line_len} chars "
                    f"> {th.max_short_line_frac}")
        if th.min_line_cv is not None and s["lines"] >= 50 and s["line_cv"] < th.min_line_cv:
            return f"uniform_lines: line length std/mean {s['line_cv']:.3f} < {th.min_line_cv}"
        if th.min_alpha_frac is not None and s["alpha_frac"] < th.min_alpha_frac:
            return f"low_alpha: {s['alpha_frac']:.2f} letters < {th.min_alpha_frac}"
        if th.max_digit_frac is not None and s["digit_frac"] > th.max_digit_frac:
            return f"high_digits: {s['digit_frac']:.2f} digits > {th.max_digit_frac}"
        if th.min_discourse_per_1k is not None and s["discourse_per_1k"] < th.min_discourse_per_1k:
            unit = "chars" if lang == "zh" else "words"
            return (f"low_discourse: {s['discourse_per_1k']:.2f} per 1000 {unit} "
                    f"< {th.min_discourse_per_1k}")
        if th.min_distinct_discourse is not None and \
                s["distinct_discourse"] < th.min_distinct_discourse:
            return (f"low_discourse: {s['distinct_discourse']} distinct connectives "
                    f"< {th.min_distinct_discourse}")
        return None


# -- perplexity difference ------------------------------------------------------------------

def _accepts_logits_to_keep(model) -> bool:
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        return "logits_to_keep" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _device(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of `targets` [B, n] under `logits` [B, n, V], in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def chunk_starts(n_tokens: int, chunk: int, min_len: int, max_chunks: int | None) -> list[int]:
    """Start offsets of the chunks that are scored: consecutive `chunk`-token pieces (the
    last may be shorter) of at least `min_len` tokens, at most `max_chunks` of them, spread
    evenly over the document."""
    starts = [s for s in range(0, n_tokens, chunk) if min(chunk, n_tokens - s) >= min_len]
    if max_chunks is not None and len(starts) > max_chunks:
        step = len(starts) / max_chunks
        starts = [starts[int(i * step)] for i in range(max_chunks)]
    return starts


@torch.no_grad()
def perplexity_gain(model: Callable[[torch.Tensor], torch.Tensor], token_ids,
                    tail: int = 256, short_context: int = 128, chunk: int = 4096,
                    stride: int = 1, max_chunks: int | None = 4, batch_size: int = 64,
                    return_details: bool = False):
    """How much the long context lowers the loss on the tail of each chunk (nats/token).

    The document is cut into chunks of `chunk` tokens (see `chunk_starts`; a chunk must hold
    at least tail + short_context + stride tokens, so the long context is longer than the
    short one). In a chunk of length L the scored tokens are positions L-tail .. L-1:
    - long: one forward over the whole chunk; token i is predicted from tokens 0 .. i-1;
    - short: token i is predicted from the `short_context` tokens before it only. Tokens are
      taken `stride` at a time: the block [b, b+stride) is scored by one window
      [b - short_context, b + stride), so token i sees between short_context and
      short_context + stride - 1 tokens (stride=1: exactly short_context). The windows all
      have one length and are run `batch_size` at a time.

    `model(input_ids [B, T]) -> logits [B, T, V]` is any causal LM (InternLM2ForCausalLM is
    called with logits_to_keep to skip unneeded logits). Returns mean(short NLL) - mean(long
    NLL) over all scored tokens: > 0 when the long context helps; nan when no chunk is long
    enough. With return_details, a dict with "gain", "long_nll", "short_nll", "tokens",
    "chunks".
    """
    if tail < 1 or short_context < 1 or stride < 1:
        raise ValueError("tail, short_context and stride must be >= 1")
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    dev = _device(model)
    keep = _accepts_logits_to_keep(model)
    starts = chunk_starts(len(ids), chunk, tail + short_context + stride, max_chunks)

    def logits_of(x: torch.Tensor, last: int) -> torch.Tensor:
        out = model(x.to(dev), logits_to_keep=last) if keep else model(x.to(dev))
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
            out = out.logits
        return out[:, -last:]

    long_sum = short_sum = 0.0
    count = 0
    for s in starts:
        piece = ids[s : s + chunk]
        L = len(piece)
        targets = piece[L - tail :]
        # logits at position j predict token j + 1: the tail needs logits L-tail-1 .. L-2.
        long_logits = logits_of(piece[None, : L - 1], tail)
        long_sum += float(_nll(long_logits, targets[None]).sum())

        blocks = list(range(L - tail, L, stride))
        width = short_context + stride
        windows, scored = [], []
        for b in blocks:
            e = min(b + stride, L)
            # Window ends at e; a short last block keeps the common width by reaching
            # further back, which only lengthens its context within the documented bound.
            windows.append(piece[e - width : e])
            scored.append(e - b)
        for i in range(0, len(windows), batch_size):
            batch = torch.stack(windows[i : i + batch_size])
            # window positions width-stride-1 .. width-2 predict the block's tokens
            logits = logits_of(batch[:, :-1], stride)
            nll = _nll(logits, batch[:, -stride:])
            for row, r in enumerate(scored[i : i + batch_size]):
                short_sum += float(nll[row, stride - r :].sum())
        count += tail
    if not count:
        gain = float("nan")
        details = {"gain": gain, "long_nll": float("nan"), "short_nll": float("nan"),
                   "tokens": 0, "chunks": 0}
    else:
        gain = (short_sum - long_sum) / count
        details = {"gain": gain, "long_nll": long_sum / count, "short_nll": short_sum / count,
                   "tokens": count, "chunks": len(starts)}
    return details if return_details else gain


def _encode(tokenizer, text: str) -> list[int]:
    if callable(tokenizer) and not hasattr(tokenizer, "encode"):
        return list(tokenizer(text))
    try:  # the project's tokenizers: no BOS, special-token strings kept as plain text
        return list(tokenizer.encode(text, add_bos=False, allow_special=False))
    except TypeError:
        return list(tokenizer.encode(text))


class PerplexityDiffFilter:
    """Removes documents whose long context does not lower perplexity (distractors).

    `min_gain` is in nats/token, one number or a dict by `lang` (with "default"); a real LM
    gains a little from any longer in-domain context, so the default asks for a small
    positive margin. `max_tokens` caps the tokens encoded per document.
    """

    def __init__(self, model, tokenizer, min_gain: float | dict[str, float] = 0.02,
                 tail: int = 256, short_context: int = 128, chunk: int = 4096,
                 stride: int = 1, max_chunks: int | None = 4, batch_size: int = 64,
                 max_tokens: int | None = None):
        self.model, self.tokenizer, self.min_gain = model, tokenizer, min_gain
        self.kw = dict(tail=tail, short_context=short_context, chunk=chunk, stride=stride,
                       max_chunks=max_chunks, batch_size=batch_size)
        self.max_tokens = max_tokens

    def threshold(self, doc: dict) -> float:
        if isinstance(self.min_gain, dict):
            return self.min_gain.get(doc.get("lang"), self.min_gain.get("default", 0.0))
        return float(self.min_gain)

    def score(self, doc: dict) -> float:
        ids = _encode(self.tokenizer, doc.get("text") or "")
        if self.max_tokens is not None:
            ids = ids[: self.max_tokens]
        return perplexity_gain(self.model, ids, **self.kw)

    def check(self, doc: dict) -> str | None:
        gain = self.score(doc)
        if math.isnan(gain):
            need = self.kw["tail"] + self.kw["short_context"] + self.kw["stride"]
            return f"ppl_too_short: fewer than {need} tokens in a chunk"
        th = self.threshold(doc)
        if gain <= th:
            return f"ppl_no_gain: long context gains {gain:.4f} nats/token <= {th}"
        return None
