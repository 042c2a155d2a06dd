"""`internlm2 sft`: supervised fine-tuning on ChatML conversations (report 4.1).

Data: OpenAI `messages` jsonl (see `internlm2.align.data`), validated up front (every
problem named with file, line and field). Each conversation is rendered with the official
chat format; the loss covers exactly what the assistant says (content, tool-call and
interpreter blocks, the closing <|im_end|>), never the system, user or tool turns, nor an
assistant turn marked `"loss": false`. Several conversations are packed per row (first-fit
decreasing) with positions restarting and attention kept inside each one; conversations
longer than `--seq-len` are cut to it (long-context samples stay in the mix: raise
--seq-len). The loss is the mean over every assistant token of the global batch.

Full fine-tuning or LoRA (`--lora-r 16`; the result is merged into a plain folder and the
adapter kept in OUT/adapter). Report recipe: AdamW lr 4e-5, one epoch.

    internlm2 sft --model runs/x/internlm2 --data sft.jsonl --val-data sft_val.jsonl --out runs/x/sft
    torchrun --nproc-per-node 2 -m internlm2 sft ...     # data parallel + FSDP2
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..train import loop
from . import data as D
from .trainer import (
    FinetuneArgs,
    Stage,
    add_finetune_args,
    args_from,
    log,
    run_finetune,
    setup_env,
)


def load_conversations(paths: Sequence[str | Path]) -> list[dict]:
    """Every record of the SFT files, validated together (one error lists all problems)."""
    problems, records = [], []
    for p in paths:
        _, probs = D.check_file(p, "sft")
        problems += probs
    if problems:
        raise D.DataFormatError(problems)
    for p in paths:
        records += [rec for _, rec, _ in D.iter_lines(p)]
    return records


def pack_file(paths: Sequence[str | Path], tokenizer: Any, seq_len: int, seed: int,
              ) -> tuple[list[dict], dict]:
    records = load_conversations(paths)
    encoded, stats = D.encode_all(records, tokenizer, seq_len)
    rows = D.pack_conversations(encoded, seq_len, seed=seed, pad_id=tokenizer.pad_id)
    stats["rows"] = len(rows)
    stats["fill"] = stats["tokens"] / max(1, len(rows) * seq_len)
    return rows, stats


def rank_batches(rows: Sequence[dict], rank: int, world: int, micro: int) -> list[dict]:
    """This rank's share of `rows` as micro-batches; every rank gets the same number of
    batches (short shares are topped up with rows that have no targets), so sharded models
    run the same collectives everywhere."""
    mine = list(rows[rank::world])
    per_rank = math.ceil(len(rows) / world)
    if mine or per_rank:
        blank = {**(mine or list(rows))[0]}
        blank["labels"] = np.full_like(blank["labels"], D.IGNORE_INDEX)
        mine += [blank] * (per_rank - len(mine))
    return [D.collate(mine[i:i + micro]) for i in range(0, len(mine), micro)]


def sft_stage(args: FinetuneArgs, data: Sequence[str], val_data: Sequence[str] | None,
              seq_len: int, tokenizer: Any, env) -> Stage:
    from ..hf import load_model
    rows, stats = pack_file(data, tokenizer, seq_len, args.seed)
    log(f"sft: {stats['conversations']} conversations ({stats['truncated']} cut to "
        f"{seq_len} tokens) -> {stats['rows']} rows of {seq_len}, {stats['fill']:.0%} full, "
        f"{stats['target_tokens']} assistant tokens", env)
    val_batches: list[dict] = []
    if val_data:
        vrows, _ = pack_file(val_data, tokenizer, seq_len, args.seed)
        val_batches = rank_batches(vrows, env.rank, env.world, args.micro_batch_size)
        stats["val_rows"] = len(vrows)

    def build(device: torch.device):
        return load_model(args.model, device=device)

    def eval_fn(model) -> dict:
        res = loop.evaluate(model, val_batches, group=env.group, device=env.device)
        return {"loss": res["loss"]}

    return Stage("sft", rows, D.collate, loop.causal_lm_loss, loop.count_targets, build,
                 tokenizer=tokenizer, eval_fn=eval_fn if val_data else None, info=stats)


def chat_checks(model: Any, tokenizer: Any, records: Sequence[dict], *, max_new_tokens: int = 96,
                batch_size: int = 16) -> dict:
    """Does the model follow the chat format? For each record, generate the first assistant
    turn (greedy) and check it the way a client would parse it: the turn ends with <|im_end|>;
    where the reference turn calls a tool, the reply holds a call whose JSON parses, names a
    tool of the prompt and has its required arguments; where it does not, the reply holds no
    action block. An empty reply counts as a failure everywhere. Returns shares and a few
    samples."""
    from ..chat_format import IM_END, parse_output, render_chat_ids
    from ..generate import GenerationConfig, collect, generate
    prompts, wants = [], []
    for rec in records:
        msgs = rec["messages"]
        i = next((k for k, m in enumerate(msgs) if m["role"] == "assistant"), None)
        if i is None or any(m.get("code") is not None for m in msgs):
            continue
        ids, _ = render_chat_ids(msgs[:i], tokenizer, tools=rec.get("tools"),
                                 add_generation_prompt=True)
        prompts.append(ids)
        tools = {}
        for t in rec.get("tools") or []:
            fn = t.get("function", t)
            tools[fn["name"]] = set((fn.get("parameters") or {}).get("required", []))
        wants.append((bool(msgs[i].get("tool_calls")), tools))
    stop = [i for i in (tokenizer.token_to_id(IM_END), tokenizer.eos_id) if i is not None]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=stop)
    was = model.training
    model.eval()
    outs = []
    for j in range(0, len(prompts), batch_size):
        outs += collect(generate(model, prompts[j:j + batch_size], cfg))
    model.train(was)
    stopped = tool_ok = tool_n = plain_ok = plain_n = 0
    samples = []
    for (want_call, tools), c in zip(wants, outs):
        text = tokenizer.decode(c.output_ids)
        stopped += c.finish_reason == "stop" and bool(text.strip())  # a real turn, ended
        parsed = parse_output(text)
        if want_call:
            tool_n += 1
            tool_ok += any(call.name in tools and tools[call.name] <= set(call.arguments)
                           for call in parsed.tool_calls)
        else:
            plain_n += 1
            plain_ok += (not parsed.tool_calls and "<|action_start|>" not in text
                         and bool(text.strip()))
        if len(samples) < 6:
            samples.append(text[:300])
    n = max(1, len(outs))
    return {"prompts": len(outs), "ends_turn": stopped / n,
            "tool_call_valid": tool_ok / tool_n if tool_n else None, "tool_prompts": tool_n,
            "plain_without_action": plain_ok / plain_n if plain_n else None,
            "samples": samples}


def main(ns: argparse.Namespace) -> int:
    from .trainer import load_tokenizer_of
    args = args_from(ns)
    args.validate()
    env = setup_env()
    tokenizer = load_tokenizer_of(args.model, ns.tokenizer)
    stage = sft_stage(args, ns.data, ns.val_data, ns.seq_len, tokenizer, env)
    run_finetune(args, stage, env)
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sft", help="supervised fine-tuning on chat conversations (full or LoRA)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="SFT jsonl file(s)")
    p.add_argument("--val-data", nargs="+", default=None, help="held-out SFT jsonl file(s)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per packed row")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model folder's)")
    add_finetune_args(p, lr=4e-5, epochs=1.0, batch_size=16, micro_batch_size=2)
    p.set_defaults(func=main)
    return p


__all__ = ["add_cli", "chat_checks", "load_conversations", "main", "pack_file", "rank_batches", "sft_stage"]
