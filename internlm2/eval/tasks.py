"""A small OpenCompass-like task harness on local jsonl files (`internlm2 eval tasks`).

Task kinds and their record formats (one JSON object per line):

- "mc", multiple choice by log-likelihood:
  `{"question": str, "choices": [str, ...], "answer": index or letter, "subject"?: str}`.
  The prompt is "Question: ...\\nA. ...\\nB. ...\\nAnswer:" after `shots` solved examples
  (same format, each followed by " <letter>\\n\\n") from the dev split. Each choice is scored
  by the summed log-prob of its continuation " A", " B", ... (the letter, not the choice
  text; `choice_text=True` scores " <choice text>" instead). The score is accuracy by summed
  log-prob; "acc_norm" (log-prob per character of the continuation) is reported beside it.
  The prompt's KV cache is computed once per question and copied to every choice row.
- "gen", generative with answer extraction (GSM8K style): `{"question": str, "answer": str}`.
  Greedy generation after "Question: ...\\nAnswer:"; the answer is the text after the last
  "answer is" / "####" if present, else the last number; exact match (numbers compared as
  numbers, text case-insensitively). The reference goes through the same extraction.
- "tool", tool-call accuracy: `{"messages": [...], "tools": [...], "expected": {"name",
  "arguments"}}`. Greedy generation in the chat format, `parse_output`; the score is the share
  whose first call has the expected name and every expected argument equal ("name_acc" too).
- "code", HumanEval style: `{"prompt": str, "test": str, "entry_point": str}`, where `test`
  defines `check(candidate)`. The completion is generated greedily from the prompt, then
  prompt + completion + test + `check(entry_point)` runs in `python -I` in a temporary folder
  with a timeout; pass@1. NOTE: this is a plain subprocess, NOT a sandbox: generated code runs
  with this user's rights. Run it only on models and tasks you trust (a sandbox comes with
  the agents work).

Few-shot examples come from `<stem>.dev.jsonl` next to the task file when it exists, else
from the task file itself (never the item being asked). `generate_task_files` writes the
project's own small tasks; `load_task_files` finds tasks in folders (kind guessed from keys).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "KINDS",
    "add_cli",
    "answers_match",
    "extract_answer",
    "generate_task_files",
    "load_task_files",
    "mc_prompt",
    "run_code",
    "run_tasks",
    "score_continuations",
    "score_tool_call",
]

KINDS = ("mc", "gen", "tool", "code")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def _read_jsonl(path: str | Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object")
                out.append(rec)
    return out


def _write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


# -- log-likelihood scoring ------------------------------------------------------------------

@torch.inference_mode()
def score_continuations(model: Any, requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                        *, batch_size: int = 8, prefix_cache: bool = True) -> list[list[float]]:
    """Summed log-prob of each continuation given its prefix.

    requests: [(prefix ids, [continuation ids, ...]), ...]; returns one list of floats per
    request. With `prefix_cache` the prefixes of `batch_size` requests are run once (left
    padded) into a KVCache, whose rows are then repeated for every continuation and the
    continuations (right padded) run on top; without it each prefix + continuation is one
    right-padded row of a plain forward."""
    out: list[list[float]] = []
    for s in range(0, len(requests), batch_size):
        chunk = requests[s:s + batch_size]
        for _, conts in chunk:
            if not conts or any(len(c) == 0 for c in conts):
                raise ValueError("every request needs at least one non-empty continuation")
        fn = _score_cached if prefix_cache else _score_direct
        out.extend(fn(model, [list(p) for p, _ in chunk], [[list(c) for c in cs] for _, cs in chunk]))
    return out


def _split_rows(values: torch.Tensor, conts: list[list[list[int]]]) -> list[list[float]]:
    flat = values.tolist()
    out, k = [], 0
    for cs in conts:
        out.append(flat[k:k + len(cs)])
        k += len(cs)
    return out


def _score_direct(model: Any, prefixes: list[list[int]], conts: list[list[list[int]]]) -> list[list[float]]:
    device = next(model.parameters()).device
    rows = [(p, c) for p, cs in zip(prefixes, conts) for c in cs]
    t = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    keep = torch.zeros(len(rows), t - 1, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        keep[i, len(p) - 1:len(p) + len(c) - 1] = True
    ids, keep = ids.to(device), keep.to(device)
    lp = torch.log_softmax(model(ids)[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return _split_rows((lp * keep).sum(-1), conts)


def _score_cached(model: Any, prefixes: list[list[int]], conts: list[list[list[int]]]) -> list[list[float]]:
    device = next(model.parameters()).device
    b = len(prefixes)
    p_max = max(len(p) for p in prefixes)
    c_max = max(len(c) for cs in conts for c in cs)
    ids = torch.zeros(b, p_max, dtype=torch.long)
    mask = torch.zeros(b, p_max, dtype=torch.bool)
    for i, p in enumerate(prefixes):  # left padding: every prefix ends at the last column
        ids[i, p_max - len(p):] = torch.tensor(p)
        mask[i, p_max - len(p):] = True
    cache = model.new_cache(b, p_max + c_max)
    last = model(ids.to(device), attention_mask=mask.to(device), cache=cache, logits_to_keep=1)
    first_lp = torch.log_softmax(last[:, -1].float(), -1)  # [b, V]: predicts continuation[0]

    # One cache row per continuation (index_select copies the prefix's keys and values).
    owner = [i for i, cs in enumerate(conts) for _ in cs]
    cache.select(torch.tensor(owner, dtype=torch.long, device=device))
    rows = [c for cs in conts for c in cs]
    cids = torch.zeros(len(rows), c_max, dtype=torch.long)
    cmask = torch.zeros(len(rows), c_max, dtype=torch.bool)
    for j, c in enumerate(rows):
        cids[j, :len(c)] = torch.tensor(c)
        cmask[j, :len(c)] = True
    cids, cmask = cids.to(device), cmask.to(device)
    total = first_lp[torch.tensor(owner, device=device), cids[:, 0]]
    if c_max > 1:
        # Only the first c_max - 1 tokens need a forward (the last one is only a target).
        logits = model(cids[:, :-1], attention_mask=cmask[:, :-1], cache=cache)
        lp = torch.log_softmax(logits.float(), -1).gather(-1, cids[:, 1:, None])[..., 0]
        total = total + (lp * cmask[:, 1:]).sum(-1)
    return _split_rows(total, conts)


# -- prompts and answers -----------------------------------------------------------------------

def _answer_index(rec: dict) -> int:
    a = rec["answer"]
    if isinstance(a, str):
        a = a.strip().upper()
        if len(a) != 1 or a not in LETTERS:
            raise ValueError(f"answer {rec['answer']!r} is neither an index nor a letter")
        return LETTERS.index(a)
    a = int(a)
    if not 0 <= a < len(rec["choices"]):
        raise ValueError(f"answer index {a} out of range for {len(rec['choices'])} choices")
    return a


def mc_prompt(rec: dict, shots: Sequence[dict] = ()) -> str:
    """The few-shot examples, then "Question: ...\\nA. ...\\n...\\nAnswer:"."""
    def body(r: dict) -> str:
        opts = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(r["choices"]))
        return f"Question: {r['question']}{opts}\nAnswer:"
    return "".join(f"{body(r)} {LETTERS[_answer_index(r)]}\n\n" for r in shots) + body(rec)


def gen_prompt(rec: dict, shots: Sequence[dict] = ()) -> str:
    return "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in shots) + \
        f"Question: {rec['question']}\nAnswer:"


_NUM_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str:
    """The answer in a generated (or reference) solution: the text after the last
    "answer is" or "####" (its first number if it has one), else the last number, else the
    stripped text."""
    low = text.lower()
    cut = max(low.rfind("answer is"), low.rfind("####"))
    if cut >= 0:
        marker = "####" if low.startswith("####", cut) else "answer is"
        rest = text[cut + len(marker):].strip().lstrip(":").strip()
        m = _NUM_RE.search(rest)
        if m:
            return _clean_number(m.group())
        return rest.split("\n")[0].strip().rstrip(".").strip()
    nums = _NUM_RE.findall(text)
    if nums:
        return _clean_number(nums[-1])
    return text.strip().rstrip(".").strip()


def _clean_number(s: str) -> str:
    return s.replace(",", "").rstrip(".")


def answers_match(pred: str, gold: str) -> bool:
    """Exact match after extraction: numerically for numbers, else case-insensitively."""
    a, b = extract_answer(pred), extract_answer(gold)
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return a.strip().lower() == b.strip().lower()


def score_tool_call(text_or_parsed: Any, expected: dict) -> dict[str, bool]:
    """{"name": first call's name is expected, "arguments": ... and every expected argument
    is present and equal (extra arguments are allowed)}."""
    from ..chat_format import parse_output
    parsed = parse_output(text_or_parsed) if isinstance(text_or_parsed, str) else text_or_parsed
    if not parsed.tool_calls:
        return {"name": False, "arguments": False}
    call = parsed.tool_calls[0]
    name_ok = call.name == expected["name"]
    want = expected.get("arguments") or {}
    args_ok = name_ok and isinstance(call.arguments, dict) and all(
        k in call.arguments and call.arguments[k] == v for k, v in want.items())
    return {"name": name_ok, "arguments": bool(args_ok)}


# -- code execution ------------------------------------------------------------------------------

def run_code(program: str, timeout: float = 5.0) -> dict:
    """Run `program` with `python -I` in a fresh temporary folder; {"passed", "status"
    ("passed" | "failed" | "timeout"), "error"}. A plain subprocess, NOT a sandbox."""
    with tempfile.TemporaryDirectory(prefix="internlm2-code-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-I", str(path)], cwd=tmp,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: children too
            except ProcessLookupError:
                pass
            proc.communicate()
            return {"passed": False, "status": "timeout", "error": f"timed out after {timeout}s"}
    err_text = err.decode("utf-8", "replace").strip()
    ok = proc.returncode == 0
    return {"passed": ok, "status": "passed" if ok else "failed",
            "error": "" if ok else err_text[-500:]}


def code_program(rec: dict, completion: str) -> str:
    return f"{rec['prompt']}{completion}\n\n{rec['test']}\n\ncheck({rec['entry_point']})\n"


# -- the task runners ----------------------------------------------------------------------------

def _shots_for(i: int, dev: list[dict], same_file: bool, k: int) -> list[dict]:
    if k <= 0:
        return []
    pool = [r for j, r in enumerate(dev) if not (same_file and j == i)]
    return pool[:k]


def _dev_records(path: Path, records: list[dict]) -> tuple[list[dict], bool]:
    dev = path.with_name(path.name[:-len(".jsonl")] + ".dev.jsonl") if path.name.endswith(".jsonl") else None
    if dev is not None and dev.is_file():
        return _read_jsonl(dev), False
    return records, True


def _run_mc(model, tokenizer, records, dev, same, shots, batch_size, choice_text=False):
    requests, golds, conts_text = [], [], []
    for i, rec in enumerate(records):
        prompt = mc_prompt(rec, _shots_for(i, dev, same, shots))
        p_ids = list(tokenizer.encode(prompt))
        texts = [" " + (str(c) if choice_text else LETTERS[j]) for j, c in enumerate(rec["choices"])]
        conts = []
        for t in texts:
            full = list(tokenizer.encode(prompt + t))
            c = full[len(p_ids):] if full[:len(p_ids)] == p_ids and len(full) > len(p_ids) \
                else list(tokenizer.encode(t, add_bos=False))
            conts.append(c)
        requests.append((p_ids, conts))
        golds.append(_answer_index(rec))
        conts_text.append(texts)
    scores = score_continuations(model, requests, batch_size=batch_size)
    correct = correct_norm = 0
    per_subject: dict[str, list[int]] = {}
    samples = []
    for rec, sc, gold, texts in zip(records, scores, golds, conts_text):
        pred = max(range(len(sc)), key=lambda j: sc[j])
        norm = [s / max(len(t), 1) for s, t in zip(sc, texts)]
        pred_n = max(range(len(norm)), key=lambda j: norm[j])
        correct += pred == gold
        correct_norm += pred_n == gold
        if "subject" in rec:
            per_subject.setdefault(str(rec["subject"]), []).append(int(pred == gold))
        if len(samples) < 3:
            samples.append({"question": rec["question"], "logprobs": sc, "pred": pred, "gold": gold})
    n = len(records)
    metrics = {"acc": correct / n if n else 0.0, "acc_norm": correct_norm / n if n else 0.0}
    if per_subject:
        metrics["subjects"] = {k: sum(v) / len(v) for k, v in sorted(per_subject.items())}
    return metrics["acc"], metrics, samples


def _greedy(model, tokenizer, prompts: list[list[int]], batch_size: int, **cfg) -> list[str]:
    from ..generate import GenerationConfig, collect, generate
    config = GenerationConfig(temperature=0.0, **cfg)
    texts: list[str] = []
    for s in range(0, len(prompts), batch_size):
        done = collect(generate(model, prompts[s:s + batch_size], config, tokenizer=tokenizer))
        texts.extend(c.text for c in done)
    return texts


def _run_gen(model, tokenizer, records, dev, same, shots, batch_size, max_new_tokens=64):
    prompts = [list(tokenizer.encode(gen_prompt(r, _shots_for(i, dev, same, shots))))
               for i, r in enumerate(records)]
    outs = _greedy(model, tokenizer, prompts, batch_size, max_new_tokens=max_new_tokens,
                   stop_strings=("\nQuestion:", "\n\n"))
    hits = [answers_match(o, str(r["answer"])) for o, r in zip(outs, records)]
    samples = [{"question": r["question"], "output": o, "extracted": extract_answer(o),
                "gold": extract_answer(str(r["answer"])), "correct": h}
               for r, o, h in list(zip(records, outs, hits))[:3]]
    acc = sum(hits) / len(hits) if hits else 0.0
    return acc, {"exact_match": acc}, samples


def _run_tool(model, tokenizer, records, dev, same, shots, batch_size, max_new_tokens=96):
    from ..chat_format import render_chat_ids
    prompts = [render_chat_ids(r["messages"], tokenizer, tools=r.get("tools"),
                               add_generation_prompt=True)[0] for r in records]
    outs = _greedy(model, tokenizer, prompts, batch_size, max_new_tokens=max_new_tokens,
                   stop_ids=tuple(tokenizer.stop_ids))
    scored = [score_tool_call(o, r["expected"]) for o, r in zip(outs, records)]
    n = len(records)
    acc = sum(s["arguments"] for s in scored) / n if n else 0.0
    name_acc = sum(s["name"] for s in scored) / n if n else 0.0
    samples = [{"expected": r["expected"], "output": o, **s}
               for r, o, s in list(zip(records, outs, scored))[:3]]
    return acc, {"call_acc": acc, "name_acc": name_acc}, samples


def _run_code(model, tokenizer, records, dev, same, shots, batch_size, max_new_tokens=128,
              timeout=5.0):
    prompts = [list(tokenizer.encode(r["prompt"])) for r in records]
    outs = _greedy(model, tokenizer, prompts, batch_size, max_new_tokens=max_new_tokens,
                   stop_strings=CODE_STOPS)
    results = [run_code(code_program(r, o), timeout) for r, o in zip(records, outs)]
    n = len(records)
    acc = sum(x["passed"] for x in results) / n if n else 0.0
    samples = [{"entry_point": r["entry_point"], "completion": o, "status": x["status"]}
               for r, o, x in list(zip(records, outs, results))[:3]]
    return acc, {"pass@1": acc}, samples


_RUNNERS = {"mc": _run_mc, "gen": _run_gen, "tool": _run_tool, "code": _run_code}


def guess_kind(rec: dict) -> str:
    if "choices" in rec:
        return "mc"
    if "expected" in rec and "messages" in rec:
        return "tool"
    if "test" in rec and "entry_point" in rec:
        return "code"
    if "question" in rec and "answer" in rec:
        return "gen"
    raise ValueError(f"cannot tell the task kind of a record with keys {sorted(rec)}")


def load_task_files(paths: Iterable[str | Path]) -> dict[str, tuple[str, Path]]:
    """{name: (kind, path)} for task .jsonl files and folders of them (`*.dev.jsonl` are
    few-shot splits, not tasks); the kind is guessed from the first record's keys."""
    out: dict[str, tuple[str, Path]] = {}
    for p in map(Path, paths):
        files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
        for f in files:
            if f.name.endswith(".dev.jsonl"):
                continue
            if not f.is_file():
                raise FileNotFoundError(f"{f}: no such task file")
            recs = _read_jsonl(f)
            if recs:
                out[f.name[:-len(".jsonl")] if f.name.endswith(".jsonl") else f.stem] = \
                    (guess_kind(recs[0]), f)
    return out


def run_tasks(model: Any, tokenizer: Any, task_files: dict[str, tuple[str, str | Path]], *,
              shots: int = 0, batch_size: int = 8, limit: int | None = None) -> dict[str, dict]:
    """Run every task: {name: {"kind", "score" (in [0, 1]), "count", "metrics", "samples"}}."""
    results: dict[str, dict] = {}
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for name, (kind, path) in task_files.items():
            if kind not in _RUNNERS:
                raise ValueError(f"task {name}: unknown kind {kind!r}; expected one of {KINDS}")
            path = Path(path)
            records = _read_jsonl(path)
            dev, same = _dev_records(path, records)
            if limit is not None:
                records = records[:limit]
            if not records:
                results[name] = {"kind": kind, "score": 0.0, "count": 0, "metrics": {}, "samples": []}
                continue
            score, metrics, samples = _RUNNERS[kind](model, tokenizer, records, dev, same, shots,
                                                     batch_size)
            results[name] = {"kind": kind, "score": float(score), "count": len(records),
                             "metrics": metrics, "samples": samples}
    finally:
        model.train(was_training)
    return results


# -- the project's own tasks ---------------------------------------------------------------------

_CODE_TASKS = [
    {"prompt": 'def add(a, b):\n    """Return the sum of a and b."""\n',
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
     "entry_point": "add"},
    {"prompt": 'def reverse_string(s):\n    """Return s reversed."""\n',
     "test": "def check(candidate):\n    assert candidate('abc') == 'cba'\n    assert candidate('') == ''\n",
     "entry_point": "reverse_string"},
    {"prompt": 'def largest(xs):\n    """Return the largest number in the non-empty list xs."""\n',
     "test": "def check(candidate):\n    assert candidate([1, 5, 2]) == 5\n    assert candidate([-3, -7]) == -3\n",
     "entry_point": "largest"},
]


def _arith(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    r = a + b if op == "+" else a - b if op == "-" else a * b
    return f"What is {a} {op} {b}?", r


def _arith_mc(rng: random.Random) -> dict:
    q, r = _arith(rng)
    wrong: set[int] = set()
    while len(wrong) < 3:
        w = r + rng.choice([-10, -2, -1, 1, 2, 10, rng.randint(-20, 20)])
        if w != r:
            wrong.add(w)
    choices = [r, *sorted(wrong)]
    rng.shuffle(choices)
    return {"question": q, "choices": [str(c) for c in choices], "answer": choices.index(r),
            "subject": "arithmetic"}


def _arith_gen(rng: random.Random) -> dict:
    q, r = _arith(rng)
    return {"question": q, "answer": str(r)}


def _kv_mc(rng: random.Random) -> dict:
    from ..data.builtin import kv_facts
    facts, qa = kv_facts(rng, "en", rng.randint(4, 6))
    k = rng.randrange(len(qa))
    q, a = qa[k]
    others = [v for j, (_, v) in enumerate(qa) if j != k and v != a]
    choices = [a, *rng.sample(others, 3)]
    rng.shuffle(choices)
    return {"question": " ".join(facts) + " " + q, "choices": choices,
            "answer": LETTERS[choices.index(a)], "subject": "retrieval"}


def _tool(rng: random.Random) -> dict:
    from ..align.synth import TOOLS, _tool_subset, _tool_task
    name = rng.choice([t["function"]["name"] for t in TOOLS])
    question, _, args, _, _ = _tool_task(rng, False, name)
    return {"messages": [{"role": "user", "content": question}],
            "tools": _tool_subset(rng, name), "expected": {"name": name, "arguments": args}}


def generate_task_files(out_dir: str | Path, seed: int = 0, n: int = 50,
                        n_dev: int = 5) -> dict[str, tuple[str, Path]]:
    """Write the project's small tasks (n items each, plus `<name>.dev.jsonl` few-shot splits
    of n_dev for the mc and gen tasks) and return {name: (kind, path)} for `run_tasks`:
    arith_mc (4 choices), arith_gen, kv_mc (key-value retrieval), tool_calls (synth's TOOLS)
    and code (3 fixed tiny functions)."""
    out = Path(out_dir)
    rng = random.Random(seed)
    makers = {"arith_mc": ("mc", _arith_mc), "arith_gen": ("gen", _arith_gen),
              "kv_mc": ("mc", _kv_mc), "tool_calls": ("tool", _tool)}
    paths: dict[str, tuple[str, Path]] = {}
    for name, (kind, make) in makers.items():
        paths[name] = (kind, _write_jsonl(out / f"{name}.jsonl", [make(rng) for _ in range(n)]))
        if kind in ("mc", "gen"):
            _write_jsonl(out / f"{name}.dev.jsonl", [make(rng) for _ in range(n_dev)])
    paths["code"] = ("code", _write_jsonl(out / "code.jsonl", _CODE_TASKS))
    return paths


# -- CLI ----------------------------------------------------------------------------------------

def format_table(results: dict[str, dict]) -> str:
    head = f"{'task':<24} {'kind':<5} {'count':>6} {'score':>7}  metrics"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        extra = ", ".join(f"{k}={v:.3f}" for k, v in r["metrics"].items() if isinstance(v, float))
        lines.append(f"{name[:24]:<24} {r['kind']:<5} {r['count']:>6} {r['score']:>7.3f}  {extra}")
    return "\n".join(lines)


def _cli_tasks(args: argparse.Namespace) -> int:
    from ..chat import load_for_inference
    tasks: dict[str, tuple[str, Path]] = {}
    if args.generate_builtin:
        tasks.update(generate_task_files(args.generate_builtin, seed=args.seed))
    if args.tasks:
        tasks.update(load_task_files(args.tasks))
    if not tasks:
        raise ValueError("no tasks: give --tasks DIR/FILE... and/or --generate-builtin DIR")
    model, tokenizer = load_for_inference(args.model, args.device, args.dtype)
    results = run_tasks(model, tokenizer, tasks, shots=args.shots, batch_size=args.batch_size,
                        limit=args.limit)
    print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0


def add_cli(eval_subparsers: Any) -> None:
    p = eval_subparsers.add_parser("tasks", help="multiple-choice, generative, tool-call and code tasks")
    p.add_argument("--model", required=True, help="checkpoint folder (with its tokenizer)")
    p.add_argument("--tasks", nargs="+", default=None, help="task .jsonl files or folders of them")
    p.add_argument("--generate-builtin", default=None, metavar="DIR",
                   help="write the project's own task files here and run them")
    p.add_argument("--seed", type=int, default=0, help="seed of --generate-builtin")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most N items per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=_cli_tasks)
