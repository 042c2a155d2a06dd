"""Needle in a haystack (NIAH), as the original test and OpenCompass NeedleBench run it.

A short fact (the needle) is hidden at a given depth of a long filler text (the haystack);
the model is asked about it at the end. The grid is context length x needle depth.

    needles = DEFAULT_NEEDLES["en"]
    hay = load_haystack(None, "en")
    results = run_niah(model, tok, [1024, 2048], depths(5), needles, repeats=2,
                       out_jsonl="out/niah.jsonl", haystack=hay)
    print(markdown_table(results)); heatmap(results, "out/niah.png")

Conventions:
- `length` is the length of the whole prompt in the model's own tokens (BOS, template,
  haystack, needles and question): exactly `length` tokens go into the model before
  generation. Haystack tokens are cut to make room.
- The haystack is split into sentences (after . ! ? 。 ！ ？ or a newline) and tokenized
  per sentence, so every sentence start is a token boundary. A needle goes in at
  `depth_percent` of the haystack tokens, snapped back to the nearest preceding sentence
  start, as "\\n<needle>\\n" (NeedleBench's form). With `multi` > 1 the needles are spread
  evenly from the depth to the end (depth + i * (100 - depth) / multi) and every question
  is asked; the score is the mean over the answers.
- Scores (each in [0, 1]): `exact_score` is 1 if the normalised answer occurs in the
  normalised prediction; `levenshtein_score` is NeedleBench v1's 1 - edit distance / max
  length, taken at the best window of the prediction (window lengths 0.8x..1.2x the answer);
  `score = 0.5 * exact + 0.5 * levenshtein` (1.0 whenever the answer is found).
- Single-needle prompts end with the needle's answer lead-in by default ("...\nAnswer: The
  secret code of the blue door is"; `lead=False` / `--no-lead` stops at "Answer:"): the
  passkey-retrieval form for base models (LongLoRA, YaRN, Landmark Attention), so the score
  measures finding the value, not phrasing an answer. Each row records `lead`.
- "1k" is 1024 tokens (context-window convention): "1k,2k,4k" -> [1024, 2048, 4096].
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_NEEDLES",
    "Needle",
    "NiahPrompt",
    "add_cli",
    "build_context",
    "builtin_haystack",
    "depths",
    "exact_score",
    "heatmap",
    "levenshtein",
    "levenshtein_score",
    "load_haystack",
    "load_needles",
    "markdown_table",
    "normalize",
    "parse_lengths",
    "run_niah",
    "score_prediction",
    "split_sentences",
    "summarize",
]


# -- needles ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Needle:
    needle: str  # the fact inserted into the haystack
    question: str  # asked after the context
    answer: str  # what the prediction must contain
    lang: str = "en"
    # The answer's lead-in: the question restated as the start of the needle's statement
    # ("The secret code of the blue door is"). None: the needle up to its answer when the
    # needle ends with it (every built-in needle does), else no lead-in.
    lead: str | None = None

    @property
    def answer_lead(self) -> str | None:
        """The lead-in a base-model prompt ends with (`lead` or derived from the needle)."""
        if self.lead is not None:
            return self.lead.rstrip() or None
        body = self.needle.rstrip().rstrip(".。!！")
        if body.endswith(self.answer) and len(body) > len(self.answer):
            return body[: -len(self.answer)].rstrip() or None
        return None


DEFAULT_NEEDLES: dict[str, list[Needle]] = {
    "en": [
        Needle("The secret code of the blue door is 48213.",
               "What is the secret code of the blue door?", "48213", "en"),
        Needle("The room number of the old lighthouse is 7365.",
               "What is the room number of the old lighthouse?", "7365", "en"),
        Needle("The magic number of the silver owl is 90517.",
               "What is the magic number of the silver owl?", "90517", "en"),
        Needle("The password of the red garden gate is 2648.",
               "What is the password of the red garden gate?", "2648", "en"),
    ],
    "zh": [
        Needle("蓝色大门的密码是48213。", "蓝色大门的密码是多少？", "48213", "zh"),
        Needle("旧灯塔的房间号是7365。", "旧灯塔的房间号是多少？", "7365", "zh"),
        Needle("银色猫头鹰的神奇数字是90517。", "银色猫头鹰的神奇数字是多少？", "90517", "zh"),
        Needle("红色花园门的口令是2648。", "红色花园门的口令是多少？", "2648", "zh"),
    ],
}


def load_needles(path: str | os.PathLike) -> list[Needle]:
    """Needles from a jsonl file: one {"needle", "question", "answer"[, "lang", "lead"]} per
    line (blank lines skipped). ValueError naming the line and field on bad input."""
    from ..align.data import iter_objects
    out: list[Needle] = []
    for no, obj in iter_objects(path):
        for k in ("needle", "question", "answer"):
            v = obj.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k == "answer":
                obj[k] = v = str(v)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{path}:{no}: field {k!r} must be a non-empty string, "
                                 f"got {v!r}")
        lang = obj.get("lang", "en")
        if lang not in ("en", "zh"):
            raise ValueError(f"{path}:{no}: field 'lang' must be 'en' or 'zh', got {lang!r}")
        lead = obj.get("lead")
        if lead is not None and not isinstance(lead, str):
            raise ValueError(f"{path}:{no}: field 'lead' must be a string, got {lead!r}")
        out.append(Needle(obj["needle"], obj["question"], obj["answer"], lang, lead))
    if not out:
        raise ValueError(f"{path}: no needles in the file")
    return out


# -- haystack -----------------------------------------------------------------------------------

def builtin_haystack(lang: str = "en", min_chars: int = 200_000, seed: int = 0) -> str:
    """Deterministic filler prose from the built-in corpus generator.

    en: the docstrings and comments of the Python standard library (internlm2.data.builtin
    prose), topped up with the built-in explanations; zh: generated Chinese sentences
    (internlm2.tokenizer.synthetic_chinese) interleaved with the built-in explanations."""
    from ..data import builtin

    rng = random.Random(seed)
    parts: list[str] = []
    n = 0
    if lang == "en":
        try:
            for doc in builtin.prose_documents(builtin.stdlib_files()):
                parts.append(doc["text"])
                n += len(doc["text"])
                if n >= min_chars:
                    break
        except OSError:  # no stdlib sources (frozen install): explanations only
            pass
        explain, sep = builtin._EXPLAIN_EN, " "
    elif lang == "zh":
        from ..tokenizer import synthetic_chinese

        explain, sep = builtin._EXPLAIN_ZH, ""
        k = 0
        while n < min_chars:
            text = synthetic_chinese(200, seed=seed * 1000 + k)
            k += 1
            q, sents = explain[rng.randrange(len(explain))]
            parts += [text, q + sep.join(sents)]
            n += len(text) + len(parts[-1])
    else:
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    while n < min_chars:
        q, sents = explain[rng.randrange(len(explain))]
        parts.append(q + sep + sep.join(sents))
        n += len(parts[-1])
    return "\n\n".join(parts)


def load_haystack(paths: Sequence[str | os.PathLike] | str | None = None, lang: str = "en",
                  min_chars: int = 200_000) -> str:
    """The haystack text: the given files (.txt, or .jsonl with a "text" field) joined, or
    the built-in prose of `lang`. It is repeated as needed by `build_context`."""
    if paths is None or (not isinstance(paths, (str, os.PathLike)) and len(paths) == 0):
        return builtin_haystack(lang, min_chars)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    texts = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".md", ".jsonl"))
        else:
            files = [p]
        for f in files:
            if f.suffix == ".jsonl":
                with open(f, encoding="utf-8") as fh:
                    for no, line in enumerate(fh, 1):
                        if line.strip():
                            try:
                                texts.append(json.loads(line)["text"])
                            except (json.JSONDecodeError, KeyError, TypeError):
                                raise ValueError(f"{f}:{no}: expected a JSON object with a "
                                                 "'text' field") from None
            else:
                texts.append(f.read_text(encoding="utf-8"))
    text = "\n\n".join(t for t in texts if t.strip())
    if not text.strip():
        raise ValueError(f"haystack files {[str(p) for p in paths]} hold no text")
    return text


_SENT_END = re.compile(r"[.!?。！？]+[\"'”’)）」』]*|\n+")


def split_sentences(text: str) -> list[str]:
    """Cut after each sentence end (. ! ? 。 ！ ？, with closing quotes) and after newlines;
    whitespace after a cut stays with the next sentence. "".join(result) == text."""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        if m.end() > start:
            out.append(text[start:m.end()])
            start = m.end()
    if start < len(text):
        out.append(text[start:])
    return out


_HAY_CACHE: dict[tuple, tuple[list[int], list[int]]] = {}


def _hay_tokens(tokenizer: Any, haystack: str) -> tuple[list[int], list[int]]:
    """(tokens of the haystack, start index of each sentence), tokenized sentence by
    sentence so every sentence start is a token boundary. Cached per (tokenizer, text)."""
    key = (id(tokenizer), len(haystack), hash(haystack))
    hit = _HAY_CACHE.get(key)
    if hit is not None:
        return hit
    sents = split_sentences(haystack)
    enc = tokenizer.encode_batch(sents, add_bos=False, allow_special=False) \
        if hasattr(tokenizer, "encode_batch") else [tokenizer.encode(s, add_bos=False) for s in sents]
    ids: list[int] = []
    starts: list[int] = []
    for e in enc:
        if e:
            starts.append(len(ids))
            ids.extend(e)
    if not ids:
        raise ValueError("the haystack has no tokens")
    if len(_HAY_CACHE) > 8:
        _HAY_CACHE.clear()
    _HAY_CACHE[key] = (ids, starts)
    return ids, starts


# -- prompt building ------------------------------------------------------------------------------

@dataclass
class NiahPrompt:
    ids: list[int]  # the whole prompt, exactly `length` tokens
    needle_positions: list[int]  # index in `ids` of each needle's first token ("\n")
    needle_depths: list[float]  # the depth asked for each needle, percent of the haystack
    haystack_tokens: int  # haystack tokens kept

    def __len__(self) -> int:
        return len(self.ids)


def _templates(tokenizer: Any, questions: list[str], lang: str, chat: bool,
               lead: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids before and after the context; `lead` is appended after "Answer:" (the
    passkey-retrieval form for base models: "... Answer: The pass key is")."""
    if lead:
        lead = (" " if lang == "en" else "") + lead
    else:
        lead = ""
    if lang == "zh":
        q = "\n".join(questions)
        tail = f"\n\n问题：{q}\n答案：{lead}"
        instr = "\n\n请根据上文回答问题，只给出答案。"
    else:
        q = " ".join(questions)
        tail = f"\n\nQuestion: {q}\nAnswer:{lead}"
        instr = "\n\nAnswer the question using the document above. Give only the answer."
    if not chat:
        return [tokenizer.bos_id], tokenizer.encode(tail, add_bos=False, allow_special=False)
    from ..chat_format import render_chat

    mark = "\x00NIAH\x00"
    text = render_chat([{"role": "user", "content": mark}], add_generation_prompt=True, bos=True)
    head_t, tail_t = text.split(mark)
    if lang == "zh":
        body = f"{instr}\n问题：{q}"
    else:
        body = f"{instr}\nQuestion: {q}"
    head = tokenizer.encode(head_t, add_bos=False)
    return head, tokenizer.encode(body, add_bos=False, allow_special=False) + \
        tokenizer.encode(tail_t, add_bos=False) + \
        tokenizer.encode(lead.lstrip(), add_bos=False, allow_special=False)


def build_context(tokenizer: Any, haystack: str, needles: Needle | Sequence[Needle], length: int,
                  depth_percent: float, *, chat: bool = False, offset: int = 0,
                  lead: bool = False) -> NiahPrompt:
    """The prompt of exactly `length` tokens with the needle(s) hidden at `depth_percent`.

    `lead`: with one needle that has a lead-in (`Needle.answer_lead`), the prompt ends with it
    after "Answer:" (or after the assistant's start with `chat`), so the model continues with
    the value: the passkey-retrieval form ("What is the pass key? The pass key is"), which
    tests retrieval alone rather than retrieval plus answer phrasing.

    `offset`: haystack token where the (cyclically repeated) haystack starts, snapped back to a
    sentence start, so repeats can read different text. Returns a `NiahPrompt`."""
    if isinstance(needles, Needle):
        needles = [needles]
    needles = list(needles)
    if not needles:
        raise ValueError("give at least one needle")
    if not 0 <= depth_percent <= 100:
        raise ValueError(f"depth_percent must be in [0, 100], got {depth_percent}")
    lang = needles[0].lang
    head, tail = _templates(tokenizer, [n.question for n in needles], lang, chat,
                            needles[0].answer_lead if lead and len(needles) == 1 else None)
    needle_ids = [tokenizer.encode(f"\n{n.needle}\n", add_bos=False, allow_special=False)
                  for n in needles]
    n_hay = length - len(head) - len(tail) - sum(map(len, needle_ids))
    if n_hay < 1:
        raise ValueError(f"length {length} leaves no room for the haystack (template, question "
                         f"and needles take {length - n_hay} tokens)")
    ids, starts = _hay_tokens(tokenizer, haystack)
    # Start at a sentence start, then repeat the haystack until n_hay tokens.
    s0 = starts[_floor_index(starts, offset % len(ids))]
    hay: list[int] = []
    bounds: list[int] = []
    pos = s0
    while len(hay) < n_hay:
        i = _floor_index(starts, pos)
        bounds += [len(hay) + s - pos for s in starts[i:] if s >= pos]
        hay += ids[pos:]
        pos = 0
    hay = hay[:n_hay]
    bounds = [b for b in bounds if b < n_hay] or [0]
    if bounds[0] != 0:
        bounds.insert(0, 0)

    m = len(needles)
    step = (100.0 - depth_percent) / m
    asked = [depth_percent + i * step for i in range(m)]
    cuts = [bounds[_floor_index(bounds, round(d / 100.0 * n_hay))] for d in asked]
    out = list(head)
    positions = []
    prev = 0
    for cut, nid in zip(cuts, needle_ids):
        out += hay[prev:cut]
        positions.append(len(out))
        out += nid
        prev = cut
    out += hay[prev:]
    out += tail
    assert len(out) == length, (len(out), length)
    return NiahPrompt(out, positions, asked, n_hay)


def _floor_index(sorted_vals: list[int], x: int) -> int:
    """Index of the largest value <= x (0 if none)."""
    lo, hi = 0, len(sorted_vals)
    while lo < hi:
        mid = (lo + hi) // 2
        if sorted_vals[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return max(0, lo - 1)


# -- grids ----------------------------------------------------------------------------------------

def depths(n: int, kind: str = "linear") -> list[float]:
    """n depth percents from 0 to 100: evenly spaced ("linear"), or denser near both ends
    ("sigmoid": the original test's logistic spacing, L=100, x0=50, k=0.1)."""
    if n < 1:
        raise ValueError(f"need at least one depth, got {n}")
    if n == 1:
        return [50.0]
    xs = [100.0 * i / (n - 1) for i in range(n)]
    if kind == "linear":
        return [round(x, 3) for x in xs]
    if kind == "sigmoid":
        return [x if x in (0.0, 100.0) else round(100.0 / (1.0 + math.exp(-0.1 * (x - 50.0))), 3)
                for x in xs]
    raise ValueError(f"depth kind must be 'linear' or 'sigmoid', got {kind!r}")


def parse_lengths(spec: str | int | Iterable[int | str]) -> list[int]:
    """"1k,2k,4k" / "1000,1500" / [1024, "2k"] -> token counts (k = 1024, m = 1024**2)."""
    if isinstance(spec, int):
        items: list[Any] = [spec]
    elif isinstance(spec, str):
        items = [s for s in re.split(r"[,\s]+", spec) if s]
    else:
        items = list(spec)
    out = []
    for it in items:
        if isinstance(it, int) and not isinstance(it, bool):
            n = it
        else:
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", str(it))
            if not m:
                raise ValueError(f"cannot read length {it!r}; use e.g. 1k, 4k, 32k or 3000")
            mult = {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()]
            n = round(float(m.group(1)) * mult)
        if n < 1:
            raise ValueError(f"length must be positive, got {it!r}")
        out.append(n)
    if not out:
        raise ValueError(f"no lengths in {spec!r}")
    return out


# -- scoring --------------------------------------------------------------------------------------

def normalize(text: str) -> str:
    """NFKC, lower case, without whitespace and punctuation (letters, digits, CJK stay)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LN")


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def exact_score(pred: str, answer: str) -> float:
    """1.0 if the normalised answer occurs in the normalised prediction, else 0.0."""
    a = normalize(answer)
    return float(bool(a) and a in normalize(pred))


def levenshtein_score(pred: str, answer: str) -> float:
    """NeedleBench v1 similarity 1 - edit distance / max(len): the best over the windows of
    the normalised prediction with lengths 0.8x..1.2x the normalised answer (the whole
    prediction when it is shorter)."""
    p, a = normalize(pred), normalize(answer)
    if not a:
        return float(not p)
    if len(p) <= len(a):
        return 1.0 - levenshtein(p, a) / max(len(p), len(a))
    lo = max(1, int(len(a) * 0.8))
    hi = min(len(p), max(lo, math.ceil(len(a) * 1.2)))
    best = 0.0
    for w in range(lo, hi + 1):
        for s in range(len(p) - w + 1):
            best = max(best, 1.0 - levenshtein(p[s:s + w], a) / max(w, len(a)))
            if best == 1.0:
                return best
    return best


def score_prediction(pred: str, answers: Sequence[str]) -> dict[str, float]:
    """exact, levenshtein and score = 0.5 * exact + 0.5 * levenshtein, each the mean over
    the answers."""
    ex = sum(exact_score(pred, a) for a in answers) / len(answers)
    lev = sum(levenshtein_score(pred, a) for a in answers) / len(answers)
    return {"exact": ex, "levenshtein": lev, "score": 0.5 * ex + 0.5 * lev}


# -- running --------------------------------------------------------------------------------------

def _key(length: int, depth: float, repeat: int, needle: int, multi: int) -> tuple:
    return (int(length), round(float(depth), 6), int(repeat), int(needle), int(multi))


def _row_key(r: dict) -> tuple:
    return _key(r["length"], r["depth"], r["repeat"], r["needle_index"], r["multi"])


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a results file; a torn last line (killed mid-write) is dropped."""
    rows = []
    if not path.exists():
        return rows
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for line in lines:
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a write killed halfway) so appends stay clean."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def run_niah(model: Any, tokenizer: Any, lengths: Sequence[int] | str,
             depths: Sequence[float], needles: Sequence[Needle], repeats: int = 1,
             out_jsonl: str | os.PathLike | None = None, *, haystack: str | None = None,
             max_new_tokens: int = 16, prefill_chunk: int = 2048, chat: bool = False,
             seed: int = 0, multi: int = 1, progress: bool = False,
             lead: bool = True) -> list[dict]:
    """Run the grid lengths x depths x repeats with greedy decoding; return every row
    (those already in `out_jsonl` included).

    Repeat r asks needle (r % len(needles)) (with `multi`, that one and the next multi-1)
    over a haystack read from a seeded offset. Each finished cell is appended to
    `out_jsonl` at once; cells whose key (length, depth, repeat, needle index, multi) is
    already there are skipped, so an interrupted run resumes where it stopped. The prompt
    is prefilled in `prefill_chunk`-token chunks, so memory grows linearly with length.
    `lead`: single-needle prompts end with the needle's answer lead-in (`build_context`);
    a row records whether it had one."""
    import torch

    from ..generate import GenerationConfig, collect, generate

    lengths = parse_lengths(lengths)
    needles = list(needles)
    if not needles:
        raise ValueError("no needles")
    if multi < 1 or multi > len(needles):
        raise ValueError(f"multi must be in [1, {len(needles)}] (the number of needles), got {multi}")
    if haystack is None:
        haystack = load_haystack(None, needles[0].lang)
    path = Path(out_jsonl) if out_jsonl is not None else None
    rows = _read_jsonl(path) if path is not None else []
    def led(needle: Needle) -> bool:  # whether this run's prompt for `needle` has a lead-in
        return lead and multi == 1 and needle.answer_lead is not None

    for r in rows:
        if r.get("multi") == multi and r.get("needle_index", -1) < len(needles) and \
                bool(r.get("lead", False)) != led(needles[r["needle_index"]]):
            raise ValueError(f"{path}: rows were written with lead={bool(r.get('lead'))}; "
                             f"resume with the same setting or write to another file")
    done = {_row_key(r) for r in rows}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(path)
    n_hay = len(_hay_tokens(tokenizer, haystack)[0])
    stop_ids = [i for i in getattr(tokenizer, "stop_ids", [tokenizer.eos_id])
                if i < model.config.vocab_size]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens * multi, prefill_chunk=prefill_chunk,
                           stop_ids=stop_ids)
    was_training = model.training
    model.eval()
    try:
        for length in lengths:
            for depth in depths:
                for rep in range(repeats):
                    j = rep % len(needles)
                    key = _key(length, depth, rep, j, multi)
                    if key in done:
                        continue
                    used = [needles[(j + k) % len(needles)] for k in range(multi)]
                    offset = random.Random(f"{seed}/{length}/{depth}/{rep}").randrange(n_hay)
                    prompt = build_context(tokenizer, haystack, used, length, depth, chat=chat,
                                           offset=offset, lead=lead)
                    with torch.inference_mode():
                        comp = collect(generate(model, prompt.ids, cfg, tokenizer=tokenizer))[0]
                    pred = comp.text
                    row = {"length": length, "depth": key[1], "repeat": rep, "needle_index": j,
                           "multi": multi, "lang": used[0].lang, "chat": chat, "lead": led(used[0]),
                           "prompt_tokens": len(prompt.ids),
                           "needle_positions": prompt.needle_positions,
                           "answers": [n.answer for n in used], "prediction": pred,
                           **score_prediction(pred, [n.answer for n in used])}
                    rows.append(row)
                    done.add(key)
                    if path is not None:
                        with open(path, "a", encoding="utf-8") as f:
                            f.write(json.dumps(row, ensure_ascii=False) + "\n")
                            f.flush()
                    if progress:
                        print(f"niah length={length} depth={depth:g} repeat={rep}: "
                              f"score={row['score']:.2f} pred={pred!r}", file=sys.stderr)
    finally:
        model.train(was_training)
    return rows


# -- reporting ------------------------------------------------------------------------------------

def summarize(results: Sequence[dict]) -> dict:
    """Mean score per (length, depth) cell, per length, per depth and overall.

    {"overall": float, "by_length": {length: float}, "by_depth": {depth: float},
     "cells": {(length, depth): float}, "n": rows}"""
    cells: dict[tuple[int, float], list[float]] = {}
    for r in results:
        cells.setdefault((int(r["length"]), float(r["depth"])), []).append(float(r["score"]))
    mean = {k: sum(v) / len(v) for k, v in sorted(cells.items())}
    by_len: dict[int, list[float]] = {}
    by_depth: dict[float, list[float]] = {}
    for (length, depth), v in cells.items():
        by_len.setdefault(length, []).extend(v)
        by_depth.setdefault(depth, []).extend(v)
    allv = [s for v in cells.values() for s in v]
    return {"overall": sum(allv) / len(allv) if allv else float("nan"),
            "by_length": {k: sum(v) / len(v) for k, v in sorted(by_len.items())},
            "by_depth": {k: sum(v) / len(v) for k, v in sorted(by_depth.items())},
            "cells": mean, "n": len(allv)}


def _fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def markdown_table(results: Sequence[dict]) -> str:
    """Rows: one per depth and a final "avg" row; columns: one per length and "avg".
    Scores in percent."""
    s = summarize(results)
    lens = list(s["by_length"])
    deps = list(s["by_depth"])
    lines = ["| depth \\ length | " + " | ".join(_fmt_len(n) for n in lens) + " | avg |",
             "|---" * (len(lens) + 2) + "|"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    for d in deps:
        vals = [s["cells"].get((n, d)) for n in lens]
        lines.append(f"| {d:g}% | " + " | ".join(pct(v) for v in vals)
                     + f" | {pct(s['by_depth'][d])} |")
    lines.append("| avg | " + " | ".join(pct(s["by_length"][n]) for n in lens)
                 + f" | {pct(s['overall'])} |")
    return "\n".join(lines)


def heatmap(results: Sequence[dict], path_png: str | os.PathLike, title: str = "NIAH") -> bool:
    """Depth (y) x length (x) heatmap of the score, overall score in the title. Returns
    False (with a message on stderr) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap
    except ImportError:
        print("niah: matplotlib is not installed; skipping the heatmap "
              "(pip install matplotlib)", file=sys.stderr)
        return False
    s = summarize(results)
    lens = list(s["by_length"])
    deps = list(s["by_depth"])
    grid = [[s["cells"].get((n, d), float("nan")) for n in lens] for d in deps]
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.8 * len(lens)), max(3.0, 0.9 + 0.4 * len(deps))))
    im = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lens)), [_fmt_len(n) for n in lens])
    ax.set_yticks(range(len(deps)), [f"{d:g}" for d in deps])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    for i, row in enumerate(grid):
        for k, v in enumerate(row):
            if not math.isnan(v):
                ax.text(k, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{title} (overall {100 * s['overall']:.1f})")
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    Path(path_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path_png, dpi=120)
    plt.close(fig)
    return True


# -- command line ---------------------------------------------------------------------------------

def _cli_niah(args: argparse.Namespace) -> int:
    import torch

    from ..config import normalize_rope_scaling
    from ..hf import load_model
    from ..tokenizer import load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, device=device, dtype=dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if args.rope_scaling:
        if args.factor is None:
            raise ValueError("--rope-scaling needs --factor")
        model.config.rope_scaling = normalize_rope_scaling(
            {"type": args.rope_scaling, "factor": args.factor})
    needles = load_needles(args.needles) if args.needles else DEFAULT_NEEDLES[args.lang]
    haystack = load_haystack(args.haystack or None, args.lang)
    lengths = parse_lengths(args.lengths)
    deps = depths(args.depths, args.depth_kind)
    longest = max(lengths) + args.max_new_tokens * args.multi
    if longest > model.config.max_position_embeddings and not model.config.rope_scaling:
        print(f"niah: note: lengths up to {longest} exceed max_position_embeddings="
              f"{model.config.max_position_embeddings} and no rope scaling is set",
              file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_niah(model, tokenizer, lengths, deps, needles, args.repeats, out / "niah.jsonl",
                       haystack=haystack, max_new_tokens=args.max_new_tokens,
                       prefill_chunk=args.prefill_chunk, chat=args.chat, seed=args.seed,
                       lead=args.lead,
                       multi=args.multi, progress=True)
    wanted = {_key(n, d, r, r % len(needles), args.multi) for n in lengths for d in deps
              for r in range(args.repeats)}
    results = [r for r in results if _row_key(r) in wanted]
    table = markdown_table(results)
    (out / "niah.md").write_text(table + "\n", encoding="utf-8")
    title = f"NIAH {Path(args.model).name}" + (
        f" ({args.rope_scaling} x{args.factor:g})" if args.rope_scaling else "")
    heatmap(results, out / "niah.png", title)
    print(table)
    (out / "niah_summary.json").write_text(json.dumps(
        {k: (v if not isinstance(v, dict) else {str(kk): vv for kk, vv in v.items()})
         for k, v in summarize(results).items()}, indent=2), encoding="utf-8")
    return 0


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add `niah` to the `eval` group's subparsers."""
    p = subparsers.add_parser("niah", help="needle-in-a-haystack retrieval over length x depth",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder (HF layout, with tokenizer)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model folder)")
    p.add_argument("--lengths", default="1k,2k,4k", help="prompt lengths in tokens, e.g. 1k,2k,4k")
    p.add_argument("--depths", type=int, default=5, help="number of needle depths (0..100%%)")
    p.add_argument("--depth-kind", choices=("linear", "sigmoid"), default="linear")
    p.add_argument("--needles", default=None, help="jsonl of {needle, question, answer[, lang]}")
    p.add_argument("--haystack", nargs="*", default=None, help="haystack files (.txt / .jsonl)")
    p.add_argument("--lang", choices=("en", "zh"), default="en")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--multi", type=int, default=1, help="needles per prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat format")
    p.add_argument("--no-lead", dest="lead", action="store_false",
                   help="end single-needle prompts at 'Answer:' instead of the needle's "
                        "lead-in ('Answer: The secret code of the blue door is')")
    p.add_argument("--rope-scaling", choices=("dynamic", "linear"), default=None)
    p.add_argument("--factor", type=float, default=None)
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", required=True, help="output folder (niah.jsonl, niah.png, niah.md)")
    p.set_defaults(func=_cli_niah)
    return p

