"""Sliding-window perplexity and bits per byte, per source (`internlm2 eval ppl`).

`perplexity(model, tokenizer, {"web": [text, ...], "code": [...]})` scores every text with
the standard Hugging Face strided scheme: windows of `window` tokens start every `stride`
tokens; each window scores only the tokens no earlier window scored, so every token after
the first (BOS) is scored exactly once, with up to `window - 1` tokens of context. Per
source it reports nats per token, perplexity (exp of that) and bits per byte against the
UTF-8 bytes of the texts (nats_total / ln 2 / bytes), which compares across tokenizers.

Inputs (`read_texts`): `.txt` files (one text per file; source = the file stem), `.jsonl`
files (one record per line with a "text" field; source = the record's "source" if present,
else the file stem), and token shard folders written by `internlm2.data.shards` (source =
the folder name; the documents are scored as stored, and their bytes come from the decoded
text without special tokens). Items of `texts_by_source` may therefore be strings or token
id sequences.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["add_cli", "perplexity", "read_texts", "window_spans"]


def window_spans(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window over a sequence of n tokens.

    The window feeds tokens [begin, end) and scores the targets at positions
    [first_scored, end) (each predicted from the tokens before it in the window). Position 0
    is never a target; every other position is a target exactly once. This is the Hugging
    Face strided scheme, except that a window starts at most one token before the first
    target it scores (with stride == window HF leaves that token unscored)."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    spans: list[tuple[int, int, int]] = []
    prev_end = 0
    begin = 0
    while prev_end < n:
        if prev_end:  # stride == window would leave a window's first token without context
            begin = min(begin, prev_end - 1)
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if end > first:
            spans.append((begin, end, first))
        prev_end = end
        begin += stride
    return spans


def _as_ids(item: Any, tokenizer: Any) -> tuple[list[int], int]:
    """(token ids, UTF-8 bytes) of a text or a token id sequence."""
    if isinstance(item, str):
        return list(tokenizer.encode(item)), len(item.encode("utf-8"))
    ids = [int(t) for t in item]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return ids, len(text.encode("utf-8"))


@torch.inference_mode()
def _score_windows(model: Any, rows: list[tuple[list[int], int]], batch_size: int) -> tuple[float, int]:
    """Sum of target nats and target count over `rows` of (window tokens, first scored
    offset within the window)."""
    device = next(model.parameters()).device
    nats, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths together
    for s in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[s:s + batch_size]]
        t = max(len(r[0]) for r in batch)
        ids = torch.zeros(len(batch), t, dtype=torch.long)
        keep = torch.zeros(len(batch), t - 1, dtype=torch.bool)
        for j, (toks, first) in enumerate(batch):
            ids[j, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            keep[j, first - 1:len(toks) - 1] = True  # logits at p-1 predict position p
        ids = ids.to(device)
        # Right padding: causal attention never lets a real token see it, so no mask.
        logits = model(ids)[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = keep.to(device)
        nats -= float(lp[keep].double().sum())
        count += int(keep.sum())
    return nats, count


def perplexity(model: Any, tokenizer: Any, texts_by_source: dict[str, Sequence[Any]], *,
               window: int = 1024, stride: int = 512, batch_size: int = 4) -> dict[str, dict]:
    """{source: {"nats_per_token", "perplexity", "bits_per_byte", "tokens", "bytes", "texts"}}
    plus "all" over every source when there is more than one."""
    results: dict[str, dict] = {}
    tot_nats, tot_tokens, tot_bytes, tot_texts = 0.0, 0, 0, 0
    for source, items in texts_by_source.items():
        rows: list[tuple[list[int], int]] = []
        nbytes = 0
        for item in items:
            ids, b = _as_ids(item, tokenizer)
            nbytes += b
            for begin, end, first in window_spans(len(ids), window, stride):
                rows.append((ids[begin:end], first - begin))
        nats, count = _score_windows(model, rows, batch_size)
        results[source] = _summary(nats, count, nbytes, len(items))
        tot_nats, tot_tokens, tot_bytes = tot_nats + nats, tot_tokens + count, tot_bytes + nbytes
        tot_texts += len(items)
    if len(results) > 1:
        results["all"] = _summary(tot_nats, tot_tokens, tot_bytes, tot_texts)
    return results


def _summary(nats: float, tokens: int, nbytes: int, texts: int) -> dict:
    per_token = nats / tokens if tokens else float("nan")
    return {"nats_per_token": per_token,
            "perplexity": math.exp(per_token) if tokens else float("nan"),
            "bits_per_byte": nats / math.log(2) / nbytes if nbytes else float("nan"),
            "tokens": tokens, "bytes": nbytes, "texts": texts}


# -- inputs -------------------------------------------------------------------------------------

def read_texts(paths: Iterable[str | Path], split: str = "val") -> dict[str, list[Any]]:
    """{source: [text or token ids, ...]} from .txt / .jsonl files and token shard folders
    (see the module docstring). For shard folders `split` is read, falling back to "train"
    when that split holds no documents."""
    out: dict[str, list[Any]] = {}
    for p in map(Path, paths):
        if p.is_dir():
            from ..data.shards import MANIFEST, TokenShards
            if not (p / MANIFEST).is_file():
                raise ValueError(f"{p}: a folder must be a token shard folder ({MANIFEST} missing)")
            shards = TokenShards(p, split)
            if shards.num_docs == 0 and split != "train":
                shards = TokenShards(p, "train")
            out.setdefault(p.name, []).extend(doc.tolist() for doc in shards)
        elif p.suffix == ".jsonl":
            with open(p, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise ValueError(  # noqa: TRY004 (bad input: one clear line from the CLI)
                            f"{p}:{n}: expected an object with a \"text\" string")
                    out.setdefault(str(rec.get("source") or p.stem), []).append(rec["text"])
        elif p.is_file():
            out.setdefault(p.stem, []).append(p.read_text(encoding="utf-8"))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


# -- CLI ----------------------------------------------------------------------------------------

def format_table(results: dict[str, dict]) -> str:
    head = f"{'source':<24} {'texts':>6} {'tokens':>10} {'nats/tok':>9} {'ppl':>10} {'bpb':>7}"
    lines = [head, "-" * len(head)]
    for src, r in results.items():
        lines.append(f"{src[:24]:<24} {r['texts']:>6} {r['tokens']:>10} "
                     f"{r['nats_per_token']:>9.4f} {r['perplexity']:>10.3f} {r['bits_per_byte']:>7.4f}")
    return "\n".join(lines)


def _cli_ppl(args: argparse.Namespace) -> int:
    from ..chat import load_for_inference
    model, tokenizer = load_for_inference(args.model, args.device, args.dtype)
    texts = read_texts(args.input)
    results = perplexity(model, tokenizer, texts, window=args.window, stride=args.stride,
                         batch_size=args.batch_size)
    print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


def add_cli(eval_subparsers: Any) -> None:
    p = eval_subparsers.add_parser("ppl", help="sliding-window perplexity and bits per byte")
    p.add_argument("--model", required=True, help="checkpoint folder (with its tokenizer)")
    p.add_argument("--input", nargs="+", required=True,
                   help=".txt / .jsonl files or token shard folders")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=_cli_ppl)
