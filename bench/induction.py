"""How many training steps before a tiny InternLM2 learns to copy from its context?

    python bench/induction.py [--steps 400] [--seq 128] [--batch 16] [--symbols 64] [--lr 3e-3]

Why this exists: needle-in-a-haystack retrieval needs an induction circuit (attend to the
earlier occurrence of the current context, copy what followed it). This bench measures when
that circuit forms on the cleanest task there is, so the speedrun's NIAH figure can be read
against it: every sequence is one random span of 10-59 tokens (drawn from `--symbols` ids)
repeated to fill `--seq` tokens (the same `--symbols` ids in every batch), so after the
first copy every token is predictable by copying and by nothing else. The "copy loss" is the
mean cross entropy on those positions: a model that only learned which ids occur sits at
ln(symbols); it falls towards 0 once an induction head exists.

Both sides train from the same weights on the same batches: ours (`internlm2.model`, the
tiny preset's shape: hidden 256, 4 layers, 4 heads, 2 KV heads, FFN 704, vocabulary 8192,
RoPE theta 50,000) and transformers' LlamaForCausalLM (sdpa) built with the production
converter (`llama_config_dict`, `to_llama_state_dict`). AdamW (betas 0.9 / 0.95, weight
decay 0.1), 10 warmup steps then a constant lr, grad clip 1.0, fp32, one step of each side
in turn. The step-0 losses must agree (checked to 1e-4).

A side "has copied" at the first logged step where its copy loss is below half of
ln(symbols). Printed: the copy loss of both sides every `--log-every` steps, then one JSON
line (also written to bench/results/induction.json): the curves, the step each side
learned to copy (null: not within --steps), and `ratio` = ours' step over theirs (null
unless both learned). Run time: about 1.5 s per step for both sides on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from internlm2.config import ModelConfig  # noqa: E402
from internlm2.hf import llama_config_dict  # noqa: E402
from internlm2.model import build_model  # noqa: E402

from _common import emit_results, load_llama_weights  # noqa: E402


FIRST_ID = 300  # the symbols are ids FIRST_ID .. FIRST_ID + symbols - 1 (past the specials)


def copy_batch(gen: torch.Generator, batch: int, seq: int, symbols: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [batch, seq], mask [batch, seq - 1]): one random span per batch repeated; the mask
    marks the next-token targets that lie in a repeat (predictable by copying)."""
    span = int(torch.randint(10, 60, (1,), generator=gen))
    ids = torch.randint(FIRST_ID, FIRST_ID + symbols, (batch, span), generator=gen)
    ids = ids.repeat(1, seq // span + 1)[:, :seq]
    mask = torch.zeros(batch, seq - 1, dtype=torch.bool)
    mask[:, span - 1:] = True  # target positions >= span
    return ids, mask


def losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
        reduction="none").view_as(mask)
    return ce.mean(), ce[mask].mean()


def build_pair(config: ModelConfig):
    import transformers

    transformers.logging.set_verbosity_error()
    ours = build_model(config, seed=0)
    hf_cfg = transformers.LlamaConfig.from_dict(llama_config_dict(config))
    hf_cfg._attn_implementation = "sdpa"
    theirs = transformers.LlamaForCausalLM(hf_cfg)
    load_llama_weights(theirs, ours, config)
    return ours.train(), theirs.train()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--symbols", type=int, default=64, help="distinct ids the spans draw from")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "induction.json"))
    args = ap.parse_args(argv)
    for name in ("steps", "seq", "batch", "symbols", "log_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.seq < 120:
        ap.error("--seq must be at least 120 (two copies of the longest span)")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig.preset("tiny", rope_theta=50_000.0)
    if args.symbols > config.vocab_size - FIRST_ID:
        ap.error(f"--symbols must be below the vocabulary ({config.vocab_size})")
    ours, theirs = build_pair(config)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                 weight_decay=0.1) for k, m in (("ours", ours), ("theirs", theirs))}
    gen = torch.Generator().manual_seed(args.seed)
    threshold = 0.5 * math.log(args.symbols)
    curves: dict[str, list] = {"ours": [], "theirs": []}
    learned: dict[str, int | None] = {"ours": None, "theirs": None}
    seconds = {"ours": 0.0, "theirs": 0.0}
    print(f"copy task: spans of 10-59 ids from {args.symbols} symbols repeated to {args.seq} "
          f"tokens, batch {args.batch}, lr {args.lr}; 'copied' = copy loss < {threshold:.2f}")
    print("| step | ours: loss | ours: copy loss | transformers: loss | transformers: copy loss |")
    print("|---|---|---|---|---|")
    for step in range(args.steps):
        ids, mask = copy_batch(gen, args.batch, args.seq, args.symbols)
        row = {}
        for side, model in (("ours", ours), ("theirs", theirs)):
            t0 = time.perf_counter()
            for g in opts[side].param_groups:
                g["lr"] = args.lr * min(1.0, (step + 1) / 10)
            out = model(ids) if side == "ours" else model(input_ids=ids)
            logits = out.logits if hasattr(out, "logits") else out
            loss, copy = losses(logits, ids, mask)
            opts[side].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[side].step()
            seconds[side] += time.perf_counter() - t0
            row[side] = (loss.item(), copy.item())
        if step == 0 and abs(row["ours"][0] - row["theirs"][0]) > 1e-4:
            raise RuntimeError(f"step-0 losses differ: ours {row['ours'][0]:.6f}, "
                               f"transformers {row['theirs'][0]:.6f}")
        if step % args.log_every == 0 or step == args.steps - 1:
            for side in curves:
                curves[side].append([step, round(row[side][0], 4), round(row[side][1], 4)])
                if learned[side] is None and row[side][1] < threshold:
                    learned[side] = step
            print(f"| {step} | {row['ours'][0]:.3f} | {row['ours'][1]:.3f} | "
                  f"{row['theirs'][0]:.3f} | {row['theirs'][1]:.3f} |", flush=True)
    ratio = (learned["ours"] / learned["theirs"]
             if learned["ours"] is not None and learned["theirs"] else None)
    print(f"learned to copy at step: ours {learned['ours']}, transformers {learned['theirs']} "
          f"(None: not within {args.steps} steps, {args.steps * args.batch * args.seq:,} tokens)")
    return emit_results({
        "bench": "induction", "steps": args.steps, "seq": args.seq, "batch": args.batch,
        "symbols": args.symbols, "lr": args.lr, "threshold": round(threshold, 4),
        "tokens": args.steps * args.batch * args.seq, "threads": torch.get_num_threads(),
        "learned_step": learned, "curves": curves,
        "seconds": {k: round(v, 1) for k, v in seconds.items()}, "ratio": ratio}, args.out)


if __name__ == "__main__":
    main()
