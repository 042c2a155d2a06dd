"""Alignment data: the three jsonl formats, their validation, and turning them into batches.

Formats (one JSON object per line; `.jsonl`, optionally `.gz`):

  sft     {"messages": [...], "tools": [...]?}
          OpenAI chat messages: roles system / user / assistant / tool (also environment);
          assistant messages may carry `tool_calls` (OpenAI shape, `arguments` a JSON string
          or object) or `code` (an interpreter call); `"loss": false` on an assistant message
          keeps it out of the loss. At least one assistant message must be trained.
  pref    {"prompt": [...], "chosen": [...], "rejected": [...], "domain": "helpful"}
          prompt: messages ending with a user (or tool) turn; chosen / rejected: the
          assistant reply (a list of messages, or one message, or a plain string); domain
          picks the reward model's condition (system prompt), default "helpful".
  prompt  {"messages": [...], "domain": "math", "reference": "42"?}
          PPO prompts: messages ending with a user (or tool) turn.

`check_file(path, kind)` returns every problem at once as `Problem(path, line, field,
message)` ("data/sft.jsonl:12: messages[3].tool_calls[0].function.arguments: not valid
JSON"); `load_records` raises `DataFormatError` with them. `internlm2 data check FILE
--kind sft|pref|prompt` prints them.

Batches: `encode_sft` renders a conversation with the official chat format and returns token
ids with a loss mask that is 1 exactly on assistant output (content, action blocks and the
closing <|im_end|>); `pack_conversations` packs several conversations into fixed-length rows
(first-fit decreasing) with `doc_ids`, so positions restart and attention stays inside each
conversation; `collate` stacks rows into a micro-batch.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..chat_format import ChatFormatError, _call_arguments, _turns, render_chat_ids

IGNORE_INDEX = -100
KINDS = ("sft", "pref", "prompt")
ROLES = ("system", "user", "assistant", "tool", "environment", "function")


class DataFormatError(ValueError):
    """A data file with problems; `problems` lists them all."""

    def __init__(self, problems: Sequence[Problem], limit: int = 20):
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:limit])
        more = len(self.problems) - limit
        tail = f"\n  ... and {more} more (run `internlm2 data check` for all)" if more > 0 else ""
        super().__init__(f"{len(self.problems)} problem(s) in the data:\n{shown}{tail}")


@dataclass(frozen=True)
class Problem:
    path: str
    line: int  # 1-based; 0 for the file as a whole
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


# -- validation --------------------------------------------------------------------------------

def _check_messages(msgs: Any, field: str, *, final: str | None = None,
                    roles: Sequence[str] = ROLES) -> list[tuple[str, str]]:
    """Problems of a message list as (field, message). final: "prompt" = must end with a user /
    tool turn; "reply" = only assistant messages."""
    out: list[tuple[str, str]] = []
    if not isinstance(msgs, list) or not msgs:
        return [(field, "must be a non-empty list of messages")]
    pending_calls: set[str] = set()
    for i, m in enumerate(msgs):
        w = f"{field}[{i}]"
        if not isinstance(m, Mapping):
            out.append((w, f"must be an object, got {type(m).__name__}"))
            continue
        role = m.get("role")
        if role not in roles:
            out.append((f"{w}.role", f"{role!r} is not one of {', '.join(roles)}"))
            continue
        content = m.get("content")
        has_action = role == "assistant" and (m.get("tool_calls") or m.get("code") is not None)
        if content is None and not has_action:
            out.append((f"{w}.content", "missing"))
        elif content is not None and not isinstance(content, (str, list)):
            out.append((f"{w}.content", f"must be a string, got {type(content).__name__}"))
        if "loss" in m and not isinstance(m["loss"], bool):
            out.append((f"{w}.loss", f"must be true or false, got {m['loss']!r}"))
        if "loss" in m and role != "assistant":
            out.append((f"{w}.loss", "only assistant messages are trained; drop it here"))
        if role == "assistant":
            calls = m.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list):
                    out.append((f"{w}.tool_calls", "must be a list"))
                    calls = []
                for j, c in enumerate(calls):
                    cw = f"{w}.tool_calls[{j}]"
                    fn = c.get("function") if isinstance(c, Mapping) else None
                    if not isinstance(fn, Mapping):
                        out.append((f"{cw}.function", "missing; expected {'name', 'arguments'}"))
                        continue
                    if not isinstance(fn.get("name"), str) or not fn.get("name"):
                        out.append((f"{cw}.function.name", "must be a non-empty string"))
                    _, problem = _call_arguments(fn.get("arguments", fn.get("parameters")))
                    if problem:
                        out.append((f"{cw}.function.arguments", problem))
                    if isinstance(c.get("id"), str):
                        pending_calls.add(c["id"])
            code = m.get("code")
            if code is not None and not isinstance(code, str):
                out.append((f"{w}.code", f"must be a string, got {type(code).__name__}"))
        if role == "tool":
            cid = m.get("tool_call_id")
            if cid is not None and pending_calls and cid not in pending_calls:
                out.append((f"{w}.tool_call_id", f"{cid!r} answers no earlier tool call"))
    if out:
        return out
    if final == "prompt" and msgs[-1].get("role") not in ("user", "tool", "environment",
                                                           "function"):
        out.append((f"{field}[{len(msgs) - 1}].role",
                    f"a prompt must end with a user or tool turn, not {msgs[-1].get('role')!r}"))
    if final == "reply":
        for i, m in enumerate(msgs):
            if m.get("role") not in ("assistant", "tool", "environment"):
                out.append((f"{field}[{i}].role", "a reply holds assistant (and tool) turns only"))
    return out


def _check_tools(tools: Any) -> list[tuple[str, str]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        return [("tools", "must be a list of tools")]
    return []


def _render_problem(messages: list, tools: Any, field: str) -> list[tuple[str, str]]:
    """What the chat format itself objects to (after the structural checks passed)."""
    try:
        _turns(messages, tools, None)
    except ChatFormatError as e:
        text = str(e)
        return [(field, text.replace("messages", field, 1) if text.startswith("messages")
                 else text)]
    return []


def as_reply(value: Any) -> Any:
    """chosen / rejected given as a string or one message -> a list of assistant messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, Mapping):
        return [dict(value)]
    return value


def validate_record(rec: Any, kind: str) -> list[tuple[str, str]]:
    """Every problem of one record as (field, message); [] when it is fine."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(rec, Mapping):
        return [("", f"a record must be a JSON object, got {type(rec).__name__}")]
    out: list[tuple[str, str]] = []
    if kind == "sft":
        msgs = rec.get("messages", rec.get("conversations"))
        out += _check_messages(msgs, "messages")
        out += _check_tools(rec.get("tools"))
        if not out:
            out += _render_problem(msgs, rec.get("tools"), "messages")
        if not out and not any(m.get("role") == "assistant" and m.get("loss", True)
                               for m in msgs):
            out.append(("messages", "no assistant message to train on (all absent or loss: false)"))
    elif kind == "pref":
        out += _check_messages(rec.get("prompt"), "prompt", final="prompt")
        for side in ("chosen", "rejected"):
            out += _check_messages(as_reply(rec.get(side)), side, final="reply")
        out += _check_tools(rec.get("tools"))
        if not out and as_reply(rec["chosen"]) == as_reply(rec["rejected"]):
            out.append(("rejected", "is identical to chosen"))
        if not out:
            for side in ("chosen", "rejected"):
                out += _render_problem(rec["prompt"] + as_reply(rec[side]), rec.get("tools"), side)
    else:
        out += _check_messages(rec.get("messages"), "messages", final="prompt")
        out += _check_tools(rec.get("tools"))
        if not out:
            out += _render_problem(rec["messages"], rec.get("tools"), "messages")
    if kind in ("pref", "prompt"):
        d = rec.get("domain", "helpful")
        if not isinstance(d, str) or not d.strip():
            out.append(("domain", f"must be a non-empty string, got {d!r}"))
    return out


# -- reading -------------------------------------------------------------------------------

def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object or None, problem or None) for every non-blank line."""
    p = Path(path)
    with _open_text(p) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line), None
            except json.JSONDecodeError as e:
                yield n, None, f"not valid JSON ({e.msg} at column {e.colno})"


def iter_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; ValueError naming the file and line
    at the first line that is not a JSON object."""
    for n, obj, bad in iter_lines(path):
        if bad:
            raise ValueError(f"{path}:{n}: {bad}")
        if not isinstance(obj, dict):
            raise ValueError(  # noqa: TRY004 - bad file content, not a bad argument
                f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def check_file(path: str | os.PathLike, kind: str) -> tuple[int, list[Problem]]:
    """(number of records, every problem) of a jsonl file of `kind`."""
    p = Path(path)
    if not p.is_file():
        return 0, [Problem(str(p), 0, "", "no such file")]
    problems: list[Problem] = []
    count = 0
    try:
        for n, rec, bad in iter_lines(p):
            count += 1
            if bad:
                problems.append(Problem(str(p), n, "", bad))
                continue
            problems += [Problem(str(p), n, f, m) for f, m in validate_record(rec, kind)]
    except UnicodeDecodeError as e:
        problems.append(Problem(str(p), 0, "", f"not UTF-8 text ({e.reason})"))
    if count == 0 and not problems:
        problems.append(Problem(str(p), 0, "", "no records"))
    return count, problems


def load_records(path: str | os.PathLike, kind: str) -> list[dict]:
    """All records of a jsonl file, validated; DataFormatError listing every problem."""
    _, problems = check_file(path, kind)
    if problems:
        raise DataFormatError(problems)
    return [rec for _, rec, _ in iter_lines(path)]


# -- SFT encoding and packing --------------------------------------------------------------

@dataclass
class Encoded:
    ids: list[int]
    mask: list[int]  # 1 = the model is trained to produce this token

    def __len__(self) -> int:
        return len(self.ids)


def encode_sft(rec: Mapping, tokenizer: Any) -> Encoded:
    """A validated SFT record -> token ids and the assistant-only loss mask."""
    msgs = rec.get("messages", rec.get("conversations"))
    ids, mask = render_chat_ids(msgs, tokenizer, tools=rec.get("tools"))
    return Encoded(ids, mask)


def encode_all(records: Iterable[Mapping], tokenizer: Any, max_len: int) -> tuple[list[Encoded], dict]:
    """Encode every record; conversations longer than max_len + 1 tokens are cut to it (their
    targets past the cut are lost) and counted. Returns (encoded, stats)."""
    out, cut, targets = [], 0, 0
    for rec in records:
        e = encode_sft(rec, tokenizer)
        if len(e) > max_len + 1:
            e = Encoded(e.ids[:max_len + 1], e.mask[:max_len + 1])
            cut += 1
        if sum(e.mask[1:]) == 0:
            continue  # nothing to learn left after the cut
        targets += sum(e.mask[1:])
        out.append(e)
    return out, {"conversations": len(out), "truncated": cut, "target_tokens": targets,
                 "tokens": sum(len(e) - 1 for e in out)}


def pack_conversations(encoded: Sequence[Encoded], seq_len: int, *, seed: int = 0,
                       pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """Pack conversations into rows of seq_len positions (first-fit decreasing, so rows are
    full; order shuffled by seed). A conversation of n tokens takes n - 1 positions: inputs
    ids[:-1], targets ids[1:] where the mask is 1. Each row: input_ids, labels (-100 off the
    mask and on padding), doc_ids (one per conversation; padding is its own segment)."""
    lengths = [len(e) - 1 for e in encoded]
    if any(n > seq_len for n in lengths):
        raise ValueError(f"a conversation has {max(lengths)} positions, more than seq_len "
                         f"{seq_len}; encode with encode_all(max_len=seq_len)")
    order = sorted(range(len(encoded)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:  # first fit: the first row with room
        n = lengths[i]
        for r, room in enumerate(free):
            if room >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
    rng = random.Random(seed)
    rng.shuffle(rows)
    out = []
    for members in rows:
        rng.shuffle(members)
        ids = np.full(seq_len, pad_id, dtype=np.int64)
        labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
        docs = np.zeros(seq_len, dtype=np.int64)
        at = 0
        for d, i in enumerate(members):
            e = encoded[i]
            n = len(e) - 1
            ids[at:at + n] = e.ids[:-1]
            tgt = np.asarray(e.ids[1:], dtype=np.int64)
            keep = np.asarray(e.mask[1:], dtype=bool)
            labels[at:at + n] = np.where(keep, tgt, IGNORE_INDEX)
            docs[at:at + n] = d
            at += n
        docs[at:] = len(members)
        out.append({"input_ids": ids, "labels": labels, "doc_ids": docs})
    return out


def collate(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack rows (dicts of equal-length arrays) into one micro-batch of tensors."""
    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0, *, left: bool = False,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists -> (ids [B, T], attention_mask [B, T]) padded right (or left)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, t - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, t - len(s):] = 1
        else:
            ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, :len(s)] = 1
    return ids, mask


# -- reward model inputs (COOL RLHF: one model, the domain chosen by a system prompt) -------------

DOMAIN_PROMPTS: dict[str, str] = {
    "helpful": ("You judge helpfulness. Prefer the reply that answers the user's request "
                "directly, correctly and usefully, in the user's language."),
    "harmless": ("You judge harmlessness. Prefer the reply that declines dangerous, illegal or "
                 "unethical requests politely and never gives harmful content."),
    "code": ("You judge code. Prefer the reply whose code is correct, runnable and does exactly "
             "what was asked."),
    "math": ("You judge mathematics. Prefer the reply whose reasoning and final answer are "
             "correct."),
}
# The spare token the released InternLM2 reward models append ("[UNUSED_TOKEN_130]", id 92527).
REWARD_TOKEN = "[UNUSED_TOKEN_130]"


def domain_prompt(domain: str | None) -> str | None:
    """The conditional system prompt of a preference domain (a generic one for new domains)."""
    if domain is None:
        return None
    if domain in DOMAIN_PROMPTS:
        return DOMAIN_PROMPTS[domain]
    return f"You judge {domain}. Prefer the reply that is better with respect to {domain}."


def reward_token_id(tokenizer: Any, config: Any = None) -> int:
    """The reward token: config.json's `reward_token_id` when set, else the official spare
    token [UNUSED_TOKEN_130] when the vocabulary has it, else the first spare token."""
    extra = getattr(config, "extra", None) or {}
    if extra.get("reward_token_id") is not None:
        return int(extra["reward_token_id"])
    for name in (REWARD_TOKEN, "[UNUSED_TOKEN_0]"):
        i = tokenizer.token_to_id(name)
        if i is not None and i != getattr(tokenizer, "unk_id", None):
            return int(i)
    raise ValueError("the tokenizer has no spare [UNUSED_TOKEN_k] token to use as the reward "
                     "token; set reward_token_id in the model's config.json")


def encode_reward(prompt: Sequence[Mapping], reply: Any, tokenizer: Any, *, reward_token: int,
                  domain: str | None = None, tools: Any = None, max_len: int | None = None,
                  ) -> list[int]:
    """Ids the reward model scores: [domain system prompt] + prompt + reply, rendered in the
    chat format, then the reward token. Longer than max_len: the oldest tokens after <s> go
    (the reply and the reward token are kept)."""
    msgs = list(prompt) + list(as_reply(reply))
    sys_prompt = domain_prompt(domain)
    if sys_prompt is not None:
        msgs = [{"role": "system", "content": sys_prompt}] + msgs
    ids, _ = render_chat_ids(msgs, tokenizer, tools=tools, add_generation_prompt=False)
    ids.append(reward_token)
    if max_len is not None and len(ids) > max_len:
        ids = ids[:1] + ids[len(ids) - max_len + 1:]
    return ids


__all__ = [
    "DOMAIN_PROMPTS",
    "IGNORE_INDEX",
    "KINDS",
    "REWARD_TOKEN",
    "DataFormatError",
    "Encoded",
    "Problem",
    "as_reply",
    "check_file",
    "collate",
    "domain_prompt",
    "encode_all",
    "encode_reward",
    "encode_sft",
    "iter_lines",
    "iter_objects",
    "load_records",
    "pack_conversations",
    "pad_batch",
    "reward_token_id",
    "validate_record",
]
