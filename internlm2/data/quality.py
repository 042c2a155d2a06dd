"""Quality: a trainable advertisement / low-fluency classifier and a rule-based fallback.

The report's quality stage (section 3.1) scores web text for advertisements and fluency.
`QualityClassifier` is a hashed n-gram logistic regression (word unigrams + bigrams for
space-separated text, character 1-3 grams for CJK runs, 2^18 buckets by default) trained with
sparse (lazy) Adam in numpy: no sklearn, no pickle. Files: `model.npz` (weights, bias) and
`config.json` (feature settings, label meaning, held-out metrics).

`QualityFilter` applies a trained model with a threshold on P(good); without a model it uses
rules: advertisement cues per line (URLs, phone numbers, e-mails, prices, "buy now"/"点击"/
"优惠"...), and low-fluency cues (few stop words, shouting capitals, keyword stuffing).

CLI: `internlm2 data train-classifier --input labelled.jsonl --output model_dir`, where each
line is {"text": ..., "label": 1|0|"good"|"bad"|"ad"|...}; it prints held-out accuracy.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .filters import ZH_STOP_WORDS, TextStats
from .format import EN_STOP_WORDS

FORMAT_NAME = "internlm2-quality-classifier"
_CJK_RUN_RE = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")
_URL_RE = re.compile(r"(?:https?://|www\.)[^\s<>\"'，。）)]+", re.I)
_EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# Phone numbers: international (+..), (area) local, groups joined by - or ., Chinese mobiles.
# Plain space-separated digit groups are not counted (tables of numbers look the same).
_PHONE_RE = re.compile(r"(?<![\w.+-])(?:\+\d{1,3}[\s.-]?\(?\d{1,4}\)?(?:[\s.-]?\d{2,4}){2,3}"
                       r"|\(\d{2,4}\)\s?\d{3,4}[-.\s]\d{4}|\d{3,4}[-.]\d{3,4}[-.]\d{4}"
                       r"|1[3-9]\d{9})(?![\w.-]*\d)")
_PRICE_RE = re.compile(r"[$¥￥€£]\s?\d|\d+(?:\.\d+)?\s?(?:元|块钱|美元|折)"
                       r"|\d+\s?%\s?off\b", re.I)
AD_PHRASES_EN = ("buy now", "order now", "shop now", "click here", "call now", "limited time",
                 "free shipping", "best price", "lowest price", "discount", "special offer",
                 "act now", "sign up now", "subscribe now", "money back", "100% free", "cheap",
                 "deal of the day", "add to cart", "coupon", "promo code", "hot sale")
AD_PHRASES_ZH = ("点击", "优惠", "抢购", "包邮", "限时", "折扣", "特价", "加微信", "微信号",
                 "免费领取", "立即购买", "咨询电话", "热线", "代理加盟", "下单", "秒杀", "促销",
                 "低价", "购买", "扫码", "客服", "QQ群", "返现", "红包")
_AD_PHRASE_RE = re.compile("|".join(re.escape(p) for p in AD_PHRASES_EN + AD_PHRASES_ZH), re.I)
_TOKEN_RE = re.compile(r"[a-z\u00c0-\u024f]+(?:'[a-z]+)?|\d+|[^\sa-z0-9\u00c0-\u024f]")


# -- features ------------------------------------------------------------------------------

def _stable_hash(s: str) -> int:
    return zlib.crc32(s.encode("utf-8", "surrogatepass"))


def text_features(text: str) -> list[str]:
    """Feature strings: word uni+bigrams (digits by length, URLs/e-mails as markers, symbols
    as tokens) and character 1..3-grams of CJK runs."""
    t = _URL_RE.sub(" \x01url ", text.lower())
    t = _EMAIL_RE.sub(" \x01email ", t)
    feats: list[str] = []
    for run in _CJK_RUN_RE.findall(t):
        n = len(run)
        feats += [run[i:i + k] for k in (1, 2, 3) for i in range(n - k + 1)]
    t = _CJK_RUN_RE.sub(" \x02 ", t)
    words = []
    for tok in _TOKEN_RE.findall(t):
        if tok[0].isdigit():
            tok = f"#d{min(len(tok), 6)}"
        words.append(tok)
    feats += ["w " + w for w in words if w != "\x02"]
    feats += ["b " + a + " " + b for a, b in zip(words, words[1:])]
    return feats


def _featurize(texts: Sequence[str], n_buckets: int):
    """CSR rows (indptr, indices, values): log(1+count) per bucket, each row L2-normalised."""
    indptr = [0]
    idx_parts, val_parts = [], []
    for text in texts:
        buckets = np.fromiter((_stable_hash(f) for f in text_features(text)), dtype=np.int64)
        if len(buckets):
            u, c = np.unique(buckets % n_buckets, return_counts=True)
            v = np.log1p(c.astype(np.float32))
            v /= np.sqrt(np.sum(v * v))
        else:
            u, v = np.zeros(0, np.int64), np.zeros(0, np.float32)
        idx_parts.append(u.astype(np.int32))
        val_parts.append(v.astype(np.float32))
        indptr.append(indptr[-1] + len(u))
    indices = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int32)
    values = np.concatenate(val_parts) if val_parts else np.zeros(0, np.float32)
    return np.asarray(indptr, dtype=np.int64), indices, values


def _logits(w: np.ndarray, b: float, indptr, indices, values) -> np.ndarray:
    n = len(indptr) - 1
    rows = np.repeat(np.arange(n), np.diff(indptr))
    return np.bincount(rows, weights=(w[indices] * values).astype(np.float64), minlength=n) + b


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


# -- the classifier ------------------------------------------------------------------------

class QualityClassifier:
    """Hashed n-gram logistic regression; `predict_proba` gives P(good) per text."""

    def __init__(self, n_buckets: int = 1 << 18):
        self.n_buckets = int(n_buckets)
        self.w = np.zeros(self.n_buckets, dtype=np.float32)
        self.b = np.float32(0.0)
        self.metrics: dict = {}

    def train(self, texts: Sequence[str], labels: Sequence[int], epochs: int = 10,
              lr: float = 0.1, batch_size: int = 32, l2: float = 1e-6, seed: int = 0,
              balance: bool = True, verbose: bool = False) -> "QualityClassifier":
        """Fit on (text, label) with label 1 = good, 0 = bad; returns self."""
        y = np.asarray(labels, dtype=np.float64)
        if len(texts) != len(y) or not len(y):
            raise ValueError("train needs as many labels as texts, and at least one")
        if not set(np.unique(y)) <= {0.0, 1.0}:
            raise ValueError("labels must be 0 (bad) or 1 (good)")
        indptr, indices, values = _featurize(texts, self.n_buckets)
        n = len(y)
        pos = float(y.mean())
        sw = np.ones(n)
        if balance and 0 < pos < 1:
            sw = np.where(y == 1, 0.5 / pos, 0.5 / (1 - pos))
        m = np.zeros(self.n_buckets, np.float64)
        v = np.zeros(self.n_buckets, np.float64)
        w = self.w.astype(np.float64)
        b, mb, vb = float(self.b), 0.0, 0.0
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        rng = np.random.default_rng(seed)
        step = 0
        for epoch in range(epochs):
            order = rng.permutation(n)
            total = 0.0
            for s in range(0, n, batch_size):
                batch = order[s:s + batch_size]
                lo, hi = indptr[batch], indptr[batch + 1]
                lens = hi - lo
                starts = np.repeat(lo - (np.cumsum(lens) - lens), lens)
                pos_idx = starts + np.arange(int(lens.sum()))
                bi = indices[pos_idx].astype(np.int64)
                bv = values[pos_idx].astype(np.float64)
                rows = np.repeat(np.arange(len(batch)), lens)
                z = np.bincount(rows, weights=w[bi] * bv, minlength=len(batch)) + b
                p = _sigmoid(z)
                err = (p - y[batch]) * sw[batch] / len(batch)  # dLoss/dz, mean over the batch
                total += float(np.sum(sw[batch] * -(y[batch] * np.log(p + 1e-12)
                                                    + (1 - y[batch]) * np.log(1 - p + 1e-12))))
                uniq, inv = np.unique(bi, return_inverse=True)
                g = np.bincount(inv, weights=bv * err[rows], minlength=len(uniq)) + l2 * w[uniq]
                gb = float(err.sum())
                step += 1
                # Lazy Adam: moments of untouched buckets are left as they are.
                m[uniq] = beta1 * m[uniq] + (1 - beta1) * g
                v[uniq] = beta2 * v[uniq] + (1 - beta2) * g * g
                c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
                w[uniq] -= lr * (m[uniq] / c1) / (np.sqrt(v[uniq] / c2) + eps)
                mb = beta1 * mb + (1 - beta1) * gb
                vb = beta2 * vb + (1 - beta2) * gb * gb
                b -= lr * (mb / c1) / (np.sqrt(vb / c2) + eps)
            if verbose:
                print(f"epoch {epoch + 1}/{epochs}: loss {total / n:.4f}", file=sys.stderr)
        self.w = w.astype(np.float32)
        self.b = np.float32(b)
        return self

    def predict_proba(self, texts: Sequence[str] | str) -> np.ndarray:
        """P(good) for each text (a float64 array)."""
        if isinstance(texts, str):
            texts = [texts]
        indptr, indices, values = _featurize(texts, self.n_buckets)
        return _sigmoid(_logits(self.w, float(self.b), indptr, indices, values))

    def accuracy(self, texts: Sequence[str], labels: Sequence[int], threshold: float = 0.5) -> float:
        pred = self.predict_proba(texts) >= threshold
        return float(np.mean(pred == (np.asarray(labels) == 1))) if len(labels) else float("nan")

    def save(self, path: str | Path) -> Path:
        """Write `path/model.npz` and `path/config.json` (temp names, then rename)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "model.tmp.npz"
        np.savez_compressed(tmp, weights=self.w, bias=np.array([self.b], dtype=np.float32))
        os.replace(tmp, out / "model.npz")
        cfg = {"format": FORMAT_NAME, "version": 1, "n_buckets": self.n_buckets,
               "features": "word 1-2 grams + CJK char 1-3 grams, crc32 hashed, log1p, L2",
               "labels": {"1": "good", "0": "bad (advertisement / low fluency)"},
               "metrics": self.metrics}
        (out / "config.tmp.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
        os.replace(out / "config.tmp.json", out / "config.json")
        return out

    @classmethod
    def load(cls, path: str | Path) -> "QualityClassifier":
        p = Path(path)
        cfg_path, npz_path = p / "config.json", p / "model.npz"
        if not cfg_path.is_file() or not npz_path.is_file():
            raise FileNotFoundError(f"{p}: not a quality classifier folder (needs config.json "
                                    f"and model.npz)")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("format") != FORMAT_NAME:
            raise ValueError(f"{cfg_path}: format {cfg.get('format')!r} is not {FORMAT_NAME!r}")
        model = cls(cfg["n_buckets"])
        with np.load(npz_path, allow_pickle=False) as z:
            w, b = z["weights"], z["bias"]
        if w.shape != (model.n_buckets,):
            raise ValueError(f"{npz_path}: weights have shape {w.shape}, config says "
                             f"{model.n_buckets} buckets")
        model.w = w.astype(np.float32)
        model.b = np.float32(b[0])
        model.metrics = cfg.get("metrics", {})
        return model


# -- rule-based fallback and the filter ----------------------------------------------------

@dataclass
class QualityRules:
    """Thresholds of the rule-based fallback (our choices; see the module docstring)."""
    max_ad_per_unit: float = 0.5   # ad cues per line (a line of over 20 words counts as several)
    min_ad_cues: float = 3.0       # fewer cues than this never make an advert
    min_stop_ratio_en: float = 0.10   # English stop words / words (prose: 0.35-0.5)
    min_stop_ratio_zh: float = 0.03   # Chinese function characters / Han characters (prose: 0.08-0.15)
    max_upper_frac: float = 0.30   # capitals / ASCII letters (prose: ~0.03-0.05)
    max_top_word_frac: float = 0.12   # the most frequent non-stop word / words (keyword stuffing)
    max_top_bigram_frac_zh: float = 0.08  # the most frequent Han bigram / Han bigrams
    min_words: int = 20            # fluency rules skip texts shorter than this


def ad_score(text: str, stats: TextStats | None = None) -> tuple[float, float]:
    """(weighted advert cues, cues per line unit): URLs, e-mails, phones, phrases weigh 1,
    prices 0.5; a line of more than 20 words (or CJK characters) counts as several units."""
    cues = (len(_URL_RE.findall(text)) + len(_EMAIL_RE.findall(text))
            + len(_PHONE_RE.findall(text)) + len(_AD_PHRASE_RE.findall(text))
            + 0.5 * len(_PRICE_RE.findall(text)))
    s = stats or TextStats(text)
    units = max(len(s.lines), len(s.words) / 20.0, 1.0)
    return cues, cues / units


def rule_quality(text: str, lang: str, r: QualityRules) -> str | None:
    """The first advert / fluency reason, or None."""
    s = TextStats(text)
    cues, per_unit = ad_score(text, s)
    if cues >= r.min_ad_cues and per_unit > r.max_ad_per_unit:
        return f"quality_ad: ad_cues_per_line={per_unit:.2f} > {r.max_ad_per_unit:.2f}"
    if lang == "zh":
        han = [w for w in s.words if len(w) == 1 and "\u3400" <= w <= "\u9fff"]
        if len(han) < r.min_words:
            return None
        stop = sum(1 for c in han if c in _ZH_STOP) / len(han)
        if stop < r.min_stop_ratio_zh:
            return f"quality_fluency: stop_char_ratio={stop:.3f} < {r.min_stop_ratio_zh:.3f}"
        bigrams = Counter(a + b for a, b in zip(han, han[1:]) if a not in _ZH_STOP and b not in _ZH_STOP)
        if bigrams and len(han) > 40:
            gram, c = bigrams.most_common(1)[0]
            if c / (len(han) - 1) > r.max_top_bigram_frac_zh:
                return (f"quality_stuffing: top_bigram_frac={c / (len(han) - 1):.3f} "
                        f"('{gram}') > {r.max_top_bigram_frac_zh:.2f}")
        return None
    words = [w.lower() for w in s.words if w.isalpha()]
    if len(words) < r.min_words:
        return None
    if lang == "en":
        stop = sum(1 for w in words if w in EN_STOP_WORDS) / len(words)
        if stop < r.min_stop_ratio_en:
            return f"quality_fluency: stop_word_ratio={stop:.3f} < {r.min_stop_ratio_en:.2f}"
    letters = [c for c in text if c.isascii() and c.isalpha()]
    if len(letters) >= 50:
        upper = sum(1 for c in letters if c.isupper()) / len(letters)
        if upper > r.max_upper_frac:
            return f"quality_fluency: upper_frac={upper:.2f} > {r.max_upper_frac:.2f}"
    content = Counter(w for w in words if w not in EN_STOP_WORDS and len(w) > 1)
    if content and len(words) >= 30:
        word, c = content.most_common(1)[0]
        if c / len(words) > r.max_top_word_frac:
            return (f"quality_stuffing: top_word_frac={c / len(words):.2f} ('{word}') "
                    f"> {r.max_top_word_frac:.2f}")
    return None


_ZH_STOP = frozenset(ZH_STOP_WORDS)


class QualityFilter:
    """`check(doc)` -> reason | None. With a model (a QualityClassifier or its folder), removes
    documents whose P(good) < threshold; without one, applies the rule-based fallback
    (`rules`: a QualityRules or a dict of its fields). Code documents and documents whose
    `source` is in `skip_sources` are kept unchecked (the code stage scores code)."""

    def __init__(self, model: QualityClassifier | str | Path | None = None, threshold: float = 0.5,
                 rules: QualityRules | dict | None = None, rules_with_model: bool = False,
                 skip_sources: Sequence[str] = ()):
        if isinstance(model, (str, Path)):
            model = QualityClassifier.load(model)
        self.model = model
        self.threshold = float(threshold)
        self.rules = rules if isinstance(rules, QualityRules) else QualityRules(**(rules or {}))
        self.rules_with_model = rules_with_model
        self.skip_sources = set(skip_sources)

    @classmethod
    def from_config(cls, cfg: dict | None) -> "QualityFilter":
        """From a `[filters.quality]` table: model (folder or absent), threshold, rules,
        rules_with_model, skip_sources."""
        cfg = dict(cfg or {})
        unknown = set(cfg) - {"model", "threshold", "rules", "rules_with_model", "skip_sources"}
        if unknown:
            raise ValueError(f"unknown quality-filter config key(s) {sorted(unknown)}")
        return cls(model=cfg.get("model") or None, threshold=float(cfg.get("threshold", 0.5)),
                   rules=cfg.get("rules"), rules_with_model=bool(cfg.get("rules_with_model", False)),
                   skip_sources=cfg.get("skip_sources", ()))

    def check(self, doc: dict) -> str | None:
        lang = doc.get("lang")
        if lang == "code" or doc.get("source") in self.skip_sources:
            return None
        text = doc.get("text") or ""
        if lang is None:
            from .format import detect_language
            lang = detect_language(text)[0]
        if self.model is not None:
            p = float(self.model.predict_proba([text])[0])
            if p < self.threshold:
                return f"quality_model: p_good={p:.3f} < {self.threshold:.2f}"
            if not self.rules_with_model:
                return None
        return rule_quality(text, lang, self.rules)

    __call__ = check


# -- CLI -------------------------------------------------------------------------------------

_GOOD = {"1", "good", "high", "keep", "clean", "pos", "positive", "true", "fluent"}
_BAD = {"0", "bad", "ad", "ads", "advert", "advertisement", "spam", "low", "drop", "neg",
        "negative", "false", "disfluent", "noise"}


def parse_label(value) -> int:
    """1 (good) or 0 (bad) from 1/0, booleans or strings like "good", "bad", "ad", "spam"."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    key = str(value).strip().lower()
    if key in _GOOD:
        return 1
    if key in _BAD:
        return 0
    raise ValueError(f"unknown label {value!r} (use 1/0, good/bad, ad, spam)")


def read_labelled(path: str | Path) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, problems) from a jsonl file; bad lines are reported as 'file:line: why'."""
    texts, labels, problems = [], [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj["text"]
                if not isinstance(text, str):
                    raise ValueError("text is not a string")
                label = parse_label(obj["label"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                problems.append(f"{path}:{i}: {type(e).__name__}: {e}")
                continue
            texts.append(text)
            labels.append(label)
    return texts, labels, problems


def train_classifier_main(args) -> int:
    """`internlm2 data train-classifier`: train, report held-out accuracy, save."""
    texts, labels = [], []
    for path in args.input:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
        t, l, problems = read_labelled(path)
        for p in problems[:10]:
            print(f"skipped {p}", file=sys.stderr)
        if len(problems) > 10:
            print(f"... and {len(problems) - 10} more malformed lines in {path}", file=sys.stderr)
        texts += t
        labels += l
    if len(set(labels)) < 2:
        raise ValueError(f"need labelled examples of both classes, got {Counter(labels)}")
    order = list(range(len(texts)))
    random.Random(args.seed).shuffle(order)
    n_val = int(round(len(order) * args.val_frac)) if len(order) >= 10 else 0
    val, tr = order[:n_val], order[n_val:]
    model = QualityClassifier(args.buckets)
    model.train([texts[i] for i in tr], [labels[i] for i in tr], epochs=args.epochs, lr=args.lr,
                batch_size=args.batch_size, l2=args.l2, seed=args.seed, verbose=True)
    train_acc = model.accuracy([texts[i] for i in tr], [labels[i] for i in tr])
    model.metrics = {"n_train": len(tr), "n_heldout": len(val), "train_accuracy": train_acc,
                     "good_fraction": sum(labels) / len(labels)}
    if val:
        acc = model.accuracy([texts[i] for i in val], [labels[i] for i in val])
        model.metrics["heldout_accuracy"] = acc
        print(f"held-out accuracy: {acc:.4f} ({len(val)} examples; train {train_acc:.4f} "
              f"on {len(tr)})")
    else:
        print(f"too few examples for a held-out split; train accuracy: {train_acc:.4f}")
    out = model.save(args.output)
    print(f"saved {out}/model.npz and config.json")
    return 0


def add_cli(data_subparsers) -> None:
    """Add `train-classifier` to the `internlm2 data` subcommand group."""
    p = data_subparsers.add_parser(
        "train-classifier", help="train the advertisement / fluency quality classifier",
        description="Train a hashed n-gram logistic-regression quality classifier from jsonl "
                    'lines {"text": ..., "label": 1|0|"good"|"bad"|"ad"}; prints held-out accuracy.')
    p.add_argument("--input", required=True, action="append",
                   help="labelled jsonl file (repeat for several)")
    p.add_argument("--output", required=True, help="model folder to write")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--l2", type=float, default=1e-6)
    p.add_argument("--buckets", type=int, default=1 << 18, help="hashed feature buckets")
    p.add_argument("--val-frac", type=float, default=0.1, help="held-out fraction")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=train_classifier_main)
