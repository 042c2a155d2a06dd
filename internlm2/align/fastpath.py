"""The Fast Path of COOL RLHF (InternLM2 report 4.3): patch the reward model between PPO rounds.

Within a round the policy learns to exploit what the reward model over-rates. The Fast Path
compares samples of the *early* policy (start of the round) with samples of the *late* policy
(end of the round) on the same prompts, names the reward-hacking patterns that appeared, and
turns each into 20-100 preference pairs that prefer the early sample over the hacked late one
for the same prompt. Fine-tuning the reward model on them (`reward.train_reward`) closes the
loophole before the next round.

Detectors are pluggable: anything with a `name`, `detect(early, late) -> Finding | None` (the
pattern over the two sets) and `is_hacked(sample) -> bool` (one sample; called after `detect`,
which may calibrate it on the early samples). Built-ins:

- `LengthExplosion`: the late mean response length exceeds `factor` (1.5) x the early mean
  (and `min_length`); a sample is hacked when longer than that threshold.
- `LengthCollapse`: the mirror image: the late mean falls below 1/`factor` (2) of the early
  mean and under `max_length` (4) tokens (a policy that learned, often from a length patch,
  that saying almost nothing scores); a sample is hacked when shorter than that threshold.
- `Repetition`: the share of repeated n-grams in late responses rises above `threshold` (and
  `margin` over the early share); a sample is hacked when its own share is above `threshold`.
- `FormatGaming`: late responses that never close the turn (cut at max_new_tokens), carry
  stray special tokens (chat markers, spare tokens; action tokens when no tool was offered) or
  match a configurable regex, in a larger share than early ones.

    early = [Sample(prompt=msgs, response=text, key=i, length=n) ...]   # same keys in late
    report = run_fast_path(early, late, default_detectors())
    report.findings   # [Finding(name="length_explosion", stats={...}, flagged=37)]
    report.pairs      # [{"prompt", "chosen", "rejected", "domain", "pattern"}]
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

_WORD_RE = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]|\w+|[^\w\s]")
# Strings that never belong in a plain assistant reply once decoded.
SPECIAL_MARKERS = ("<|im_start|>", "<|im_end|>", "<|plugin|>", "<|interpreter|>",
                   "[UNUSED_TOKEN_", "<s>", "</s>", "<unk>")
ACTION_MARKERS = ("<|action_start|>", "<|action_end|>")


@dataclass
class Sample:
    """One policy sample: the prompt, the decoded response and what is known about it."""

    prompt: list[dict]
    response: str
    key: Any = None  # which prompt (early and late samples are matched by it)
    score: float | None = None
    length: int | None = None  # response tokens (without a final stop token)
    finish_reason: str | None = None  # "stop" or "length" (cut at max_new_tokens)
    domain: str = "helpful"
    tools: list | None = None

    @property
    def size(self) -> int:
        """The length in tokens when known, else in words."""
        return self.length if self.length is not None else len(words(self.response))

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Finding:
    """One reward-hacking pattern seen between the early and the late samples."""

    name: str
    description: str
    stats: dict[str, float] = field(default_factory=dict)
    flagged: int = 0  # late samples is_hacked() marks
    pairs: int = 0  # preference pairs built for it


@runtime_checkable
class Detector(Protocol):
    name: str

    def detect(self, early: Sequence[Sample], late: Sequence[Sample]) -> Finding | None: ...

    def is_hacked(self, sample: Sample) -> bool: ...


def words(text: str) -> list[str]:
    """Words, single CJK characters and punctuation marks of a text."""
    return _WORD_RE.findall(text)


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


# -- the built-in detectors ---------------------------------------------------------------------

class LengthExplosion:
    """Late responses much longer than early ones."""

    name = "length_explosion"

    def __init__(self, factor: float = 1.5, min_length: float = 8.0):
        if factor <= 1.0:
            raise ValueError(f"LengthExplosion factor must be > 1, got {factor}")
        self.factor, self.min_length = factor, min_length
        self.threshold: float | None = None

    def detect(self, early: Sequence[Sample], late: Sequence[Sample]) -> Finding | None:
        em, lm = _mean(s.size for s in early), _mean(s.size for s in late)
        self.threshold = max(self.min_length, self.factor * em)
        stats = {"early_mean_length": em, "late_mean_length": lm, "ratio": lm / max(em, 1e-9),
                 "factor": self.factor, "threshold": self.threshold}
        if not early or not late or lm <= self.threshold:
            return None
        return Finding(self.name, f"mean response length grew {em:.1f} -> {lm:.1f} "
                       f"(> {self.factor:g}x)", stats)

    def is_hacked(self, sample: Sample) -> bool:
        threshold = self.threshold if self.threshold is not None else self.min_length
        return sample.size > threshold


class LengthCollapse:
    """Late responses much shorter than early ones: a policy that learned the reward model
    punishes length (often right after a length patch) and answers in a word or nothing."""

    name = "length_collapse"

    def __init__(self, factor: float = 2.0, max_length: float = 4.0):
        if factor <= 1.0:
            raise ValueError(f"LengthCollapse factor must be > 1, got {factor}")
        self.factor, self.max_length = factor, max_length
        self.threshold: float | None = None

    def detect(self, early: Sequence[Sample], late: Sequence[Sample]) -> Finding | None:
        em, lm = _mean(s.size for s in early), _mean(s.size for s in late)
        self.threshold = min(self.max_length, em / self.factor)
        stats = {"early_mean_length": em, "late_mean_length": lm, "ratio": lm / max(em, 1e-9),
                 "factor": self.factor, "threshold": self.threshold}
        if not early or not late or lm >= self.threshold:
            return None
        return Finding(self.name, f"mean response length fell {em:.1f} -> {lm:.1f} "
                       f"(< 1/{self.factor:g} and under {self.max_length:g})", stats)

    def is_hacked(self, sample: Sample) -> bool:
        threshold = self.threshold if self.threshold is not None else self.max_length
        return sample.size < threshold


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of the n-grams of a text that repeat an earlier one (0 for fewer than n + 1 words)."""
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


class Repetition:
    """Late responses that loop: many repeated n-grams."""

    name = "repetition"

    def __init__(self, n: int = 3, threshold: float = 0.3, margin: float = 0.1):
        self.n, self.threshold, self.margin = n, threshold, margin

    def share(self, sample: Sample) -> float:
        return repeated_ngram_share(sample.response, self.n)

    def detect(self, early: Sequence[Sample], late: Sequence[Sample]) -> Finding | None:
        e, lt = _mean(map(self.share, early)), _mean(map(self.share, late))
        stats = {"early_repeated_share": e, "late_repeated_share": lt, "n": self.n,
                 "threshold": self.threshold}
        if not early or not late or lt <= self.threshold or lt <= e + self.margin:
            return None
        return Finding(self.name, f"repeated {self.n}-gram share rose {e:.2f} -> {lt:.2f}", stats)

    def is_hacked(self, sample: Sample) -> bool:
        return self.share(sample) > self.threshold


class FormatGaming:
    """Late responses that game the format: never closing the turn, stray special tokens,
    action tokens without a tool, or text matching `regex`."""

    name = "format_gaming"

    def __init__(self, regex: str | None = None, *, unclosed: bool = True,
                 markers: Sequence[str] = SPECIAL_MARKERS, min_share: float = 0.2,
                 margin: float = 0.1):
        self.regex = re.compile(regex) if regex else None
        self.unclosed, self.markers = unclosed, tuple(markers)
        self.min_share, self.margin = min_share, margin

    def reasons(self, sample: Sample) -> list[str]:
        out = []
        if self.unclosed and sample.finish_reason == "length":
            out.append("unclosed")
        text = sample.response
        if any(m in text for m in self.markers):
            out.append("special_token")
        if not sample.tools and any(m in text for m in ACTION_MARKERS):
            out.append("action_without_tool")
        if self.regex is not None and self.regex.search(text):
            out.append("regex")
        return out

    def is_hacked(self, sample: Sample) -> bool:
        return bool(self.reasons(sample))

    def detect(self, early: Sequence[Sample], late: Sequence[Sample]) -> Finding | None:
        e = _mean(float(self.is_hacked(s)) for s in early)
        lt = _mean(float(self.is_hacked(s)) for s in late)
        kinds: dict[str, int] = {}
        for s in late:
            for r in self.reasons(s):
                kinds[r] = kinds.get(r, 0) + 1
        stats = {"early_share": e, "late_share": lt,
                 **{f"late_{k}": v / max(1, len(late)) for k, v in kinds.items()}}
        if not early or not late or lt < self.min_share or lt <= e + self.margin:
            return None
        return Finding(self.name, f"share of malformed responses rose {e:.2f} -> {lt:.2f} "
                       f"({', '.join(sorted(kinds))})", stats)


def default_detectors(*, length_factor: float = 1.5, length_min: float = 8.0,
                      repetition_threshold: float = 0.3, format_regex: str | None = None,
                      ) -> list[Detector]:
    return [LengthExplosion(length_factor, length_min), LengthCollapse(),
            Repetition(threshold=repetition_threshold), FormatGaming(format_regex)]


# -- pairs and the report ---------------------------------------------------------------------

def build_pairs(detector: Detector, early: Sequence[Sample], late: Sequence[Sample], *,
                max_pairs: int = 100, seed: int = 0) -> list[dict]:
    """Preference pairs for one flagged pattern: for each late sample the detector marks
    hacked, the early sample of the same prompt (matched by `key`) that it does not mark is
    chosen and the late one rejected. Prompts without such an early sample are skipped."""
    by_key: dict[Any, list[Sample]] = {}
    for s in early:
        if s.key is not None and not detector.is_hacked(s):
            by_key.setdefault(s.key, []).append(s)
    rng = random.Random(f"{seed}:{detector.name}")
    pairs = []
    for s in late:
        cands = by_key.get(s.key)
        if s.key is None or not cands or not detector.is_hacked(s):
            continue
        good = rng.choice(cands)
        if good.response.strip() == s.response.strip() or not good.response.strip():
            continue
        rec = {"prompt": list(s.prompt),
               "chosen": [{"role": "assistant", "content": good.response}],
               "rejected": [{"role": "assistant", "content": s.response}],
               "domain": s.domain or "helpful", "pattern": detector.name}
        if s.tools:
            rec["tools"] = s.tools
        pairs.append(rec)
    rng.shuffle(pairs)
    return pairs[:max_pairs]


@dataclass
class FastPathReport:
    findings: list[Finding]
    pairs: list[dict]
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"findings": [asdict(f) for f in self.findings], "pairs": len(self.pairs),
                **self.stats}


def run_fast_path(early: Sequence[Sample], late: Sequence[Sample],
                  detectors: Sequence[Detector] | None = None, *, max_pairs: int = 100,
                  min_pairs: int = 20, seed: int = 0) -> FastPathReport:
    """Run every detector; for each pattern found build up to `max_pairs` pairs (a pattern
    with fewer than `min_pairs` is reported but gets none: too little evidence to patch the
    reward model with). A pair already built for an earlier pattern is not repeated."""
    detectors = list(default_detectors() if detectors is None else detectors)
    findings, pairs, seen = [], [], set()
    for det in detectors:
        f = det.detect(early, late)
        if f is None:
            continue
        f.flagged = sum(det.is_hacked(s) for s in late)
        built = build_pairs(det, early, late, max_pairs=max_pairs, seed=seed)
        if len(built) < min_pairs:
            f.stats["skipped"] = f"{len(built)} pairs < min_pairs {min_pairs}"
            built = []
        for p in built:
            ident = json.dumps([p["prompt"], p["chosen"], p["rejected"]], sort_keys=True)
            if ident not in seen:
                seen.add(ident)
                pairs.append(p)
                f.pairs += 1
        findings.append(f)
    stats = {"early": _summary(early), "late": _summary(late)}
    return FastPathReport(findings, pairs, stats)


def _summary(samples: Sequence[Sample]) -> dict[str, float]:
    scores = [s.score for s in samples if s.score is not None]
    return {"samples": len(samples), "mean_length": _mean(s.size for s in samples),
            "mean_score": _mean(scores) if scores else None,
            "unclosed": _mean(float(s.finish_reason == "length") for s in samples)}


def patch_reward_model(rm_dir: str | os.PathLike, pairs: Sequence[Mapping], out: str | os.PathLike,
                       *, tokenizer: Any = None, lr: float = 1e-5, epochs: float = 1.0,
                       batch_size: int = 8, micro_batch_size: int = 4, max_len: int = 1024,
                       use_domain: bool = True, seed: int = 0, env: Any = None) -> str:
    """Fine-tune the reward model `rm_dir` on the Fast Path pairs (`reward.train_reward`,
    cosine lr -> lr/2, weight decay 0.01) into out/model; its path. With several ranks (all
    call it) the pairs are padded by repetition to whole global batches."""
    from .reward import train_reward
    from .trainer import FinetuneArgs
    world = env.world if env is not None else 1
    recs = [{k: v for k, v in p.items() if k != "pattern"} for p in pairs]
    n = len(recs)
    if n < world:
        raise ValueError(f"{n} pairs for {world} ranks")
    batch = max(world, min(batch_size, n)) // world * world
    if world > 1:  # every rank needs a share of every step
        recs += recs[:-n % batch]
    args = FinetuneArgs(model=str(rm_dir), out=str(out), lr=lr, min_lr=lr / 2, weight_decay=0.01,
                        warmup_ratio=0.0, epochs=epochs, batch_size=batch, seed=seed,
                        micro_batch_size=max(1, micro_batch_size), progress=False)
    summary = train_reward(args, recs, tokenizer=tokenizer, max_len=max_len,
                           use_domain=use_domain, env=env)
    return str(summary.get("model") or Path(out) / "model")


def write_report(folder: str | os.PathLike, report: FastPathReport,
                 early: Sequence[Sample] = (), late: Sequence[Sample] = ()) -> Path:
    """folder/fastpath.json (findings with numbers), fastpath_pairs.jsonl and the samples."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    (d / "fastpath.json").write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False)
                                     + "\n", encoding="utf-8")
    _write_jsonl(d / "fastpath_pairs.jsonl", report.pairs)
    if early:
        _write_jsonl(d / "early_samples.jsonl", [s.to_json() for s in early])
    if late:
        _write_jsonl(d / "late_samples.jsonl", [s.to_json() for s in late])
    return d / "fastpath.json"


def _write_jsonl(path: Path, records: Iterable[Mapping]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)


__all__ = ["ACTION_MARKERS", "SPECIAL_MARKERS", "Detector", "FastPathReport", "Finding",
           "FormatGaming", "LengthCollapse", "LengthExplosion", "Repetition", "Sample", "build_pairs",
           "default_detectors", "patch_reward_model", "repeated_ngram_share", "run_fast_path", "words",
           "write_report"]
