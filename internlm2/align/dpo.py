"""`internlm2 dpo`: Direct Preference Optimization on preference pairs (Rafailov et al. 2023).

Data: `pref` jsonl (see `internlm2.align.data`), validated up front:
    {"prompt": [messages ending with a user/tool turn], "chosen": reply, "rejected": reply,
     "tools": [...]?}
Each side is rendered as prompt + reply with the official chat format; only the reply's
assistant output counts (content, action blocks, the closing <|im_end|>), never the prompt,
including any assistant turns inside it. A pair longer than `--max-len` tokens loses the
oldest prompt tokens (after <s>; both sides keep the same prompt); a pair whose reply alone
does not fit is dropped and counted.

Loss, from summed reply log-probs pi (policy) and ref (reference):
    margin = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    sigmoid  -(1 - eps) log sigmoid(margin) - eps log sigmoid(-margin)   (eps: --label-smoothing)
    ipo      ((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 beta))^2 on length-averaged log-probs
             (as TRL's loss_type="ipo")
  + --sft-weight * mean NLL of the chosen reply's tokens (RPO; off by default).
Implicit rewards: beta * (pi - ref); logged per step as train_reward_accuracy,
train_chosen_reward, train_rejected_reward, train_margin (reward difference).

The reference is the starting model, frozen: its log-probs of every reply (train and
validation) are computed once before training (each rank its share, then summed over ranks)
and stored with the pairs, so training runs the policy alone, one forward per micro-batch
on [chosen rows; rejected rows]. `--reference DIR` scores with another folder instead. With
`--lora-r` the reference is the base model. Evaluation on --val-data: loss, reward accuracy,
mean margin, chosen / rejected log-prob change against the reference.

    internlm2 dpo --model runs/x/sft/model --data pref.jsonl --val-data pref_val.jsonl \\
        --out runs/x/dpo --beta 0.1
    torchrun --nproc-per-node 2 -m internlm2 dpo ...     # data parallel + FSDP2

Defaults follow TRL (lr 5e-7, beta 0.1, one epoch, batch 16); the InternLM2 report itself
aligns with COOL RLHF (PPO), not DPO.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..chat_format import render_chat_ids
from ..train import loop
from . import data as D
from .losses import dpo_loss, token_logprobs
from .trainer import (
    FinetuneArgs,
    Stage,
    add_finetune_args,
    args_from,
    compute_dtype,
    load_tokenizer_of,
    log,
    run_finetune,
    setup_env,
)

IGNORE_INDEX = D.IGNORE_INDEX
LOSSES = ("sigmoid", "ipo")


# -- encoding ------------------------------------------------------------------------------

def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def encode_pair(rec: Mapping, tokenizer: Any, max_len: int = 1024) -> tuple[dict | None, str]:
    """A validated pref record -> (example, status); example None when the pair is dropped.

    example: chosen_ids / rejected_ids (inputs, ids[:-1]) and chosen_labels / rejected_labels
    (the next token on reply output, IGNORE_INDEX elsewhere) as int64 arrays. status: "ok",
    "truncated" (prompt cut from the left), "too_long" (a reply alone does not fit) or
    "empty" (a reply with nothing to train)."""
    tools = rec.get("tools")
    # Assistant turns of the prompt are context, never trained.
    prompt = [{**m, "loss": False} if m.get("role") == "assistant" else m for m in rec["prompt"]]
    head, _ = render_chat_ids(prompt, tokenizer, tools=tools, add_generation_prompt=True)
    sides = {}
    for side in ("chosen", "rejected"):
        ids, mask = render_chat_ids(prompt + list(D.as_reply(rec[side])), tokenizer, tools=tools)
        cut = max(1, _common_prefix(ids, head))  # the reply (with its header) starts here
        end = max((i + 1 for i, m in enumerate(mask) if m), default=cut)  # drop the tail "\n"
        sides[side] = (ids[:1], ids[1:cut], ids[cut:end], mask[cut:end])
    reply_len = max(len(s[2]) for s in sides.values())
    room = max_len - 1 - reply_len  # prompt tokens that fit after <s>
    if room < 0:
        return None, "too_long"
    status = "ok"
    out: dict[str, np.ndarray] = {}
    for side, (bos, p, reply, rmask) in sides.items():
        if len(p) > room:
            p = p[len(p) - room:] if room else []
            status = "truncated"
        ids = np.asarray(bos + p + reply, dtype=np.int64)
        mask = np.asarray([0] * (len(bos) + len(p)) + rmask, dtype=bool)
        labels = np.where(mask[1:], ids[1:], IGNORE_INDEX)
        if not (labels != IGNORE_INDEX).any():
            return None, "empty"
        out[f"{side}_ids"], out[f"{side}_labels"] = ids[:-1], labels
    return out, status


def encode_pairs(records: Sequence[Mapping], tokenizer: Any, max_len: int,
                 ) -> tuple[list[dict], dict]:
    """Encode every pair; returns (examples, counts of pairs / truncated / dropped)."""
    out, counts = [], {"ok": 0, "truncated": 0, "too_long": 0, "empty": 0}
    for rec in records:
        ex, status = encode_pair(rec, tokenizer, max_len)
        counts[status] += 1
        if ex is not None:
            out.append(ex)
    return out, {"pairs": len(out), "truncated": counts["truncated"],
                 "dropped_too_long": counts["too_long"], "dropped_empty": counts["empty"]}


def collate(pairs: Sequence[Mapping], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """B pairs -> rows [chosen_0..chosen_B-1, rejected_0..rejected_B-1], right-padded
    (causal attention: padding after a row never reaches its tokens), and the stored
    reference log-probs (0 when not yet computed)."""
    rows = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    labs = [p["chosen_labels"] for p in pairs] + [p["rejected_labels"] for p in pairs]
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), t), IGNORE_INDEX, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labs)):
        ids[i, :len(r)] = torch.from_numpy(np.asarray(r))
        labels[i, :len(lab)] = torch.from_numpy(np.asarray(lab))
    ref = torch.tensor([[p.get("ref_chosen", 0.0), p.get("ref_rejected", 0.0)] for p in pairs],
                       dtype=torch.float32)
    return {"input_ids": ids, "labels": labels, "ref_chosen": ref[:, 0],
            "ref_rejected": ref[:, 1]}


def count_pairs(batch: Mapping[str, Any]) -> torch.Tensor:
    return torch.tensor(batch["ref_chosen"].shape[0])


def sequence_logps(model: torch.nn.Module, batch: Mapping[str, Any],
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of every row's labelled tokens [rows] and their counts [rows]."""
    labels = batch["labels"]
    logits = model(batch["input_ids"])
    return token_logprobs(logits, labels).sum(-1), (labels != IGNORE_INDEX).sum(-1)


# -- loss ------------------------------------------------------------------------------------

def preference_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor,
                    ref_r: torch.Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0,
                    loss: str = "sigmoid", n_c: torch.Tensor | None = None,
                    n_r: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and implicit rewards (chosen, rejected) from summed log-probs [B].
    "ipo" divides every log-prob by its reply's token count (n_c, n_r) first."""
    if loss == "sigmoid":
        return dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=beta, label_smoothing=label_smoothing)
    if loss != "ipo":
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if n_c is None or n_r is None:
        raise ValueError("the ipo loss needs the token counts n_c, n_r")
    c = (pi_c.float() - ref_c.float()) / n_c.float()
    r = (pi_r.float() - ref_r.float()) / n_r.float()
    return (c - r - 1.0 / (2.0 * beta)) ** 2, (beta * c).detach(), (beta * r).detach()


def _pair_terms(model, batch, *, beta, label_smoothing, loss, sft_weight):
    """(per-pair loss, chosen reward, rejected reward, pi_c, pi_r) of one batch."""
    lp, n = sequence_logps(model, batch)
    b = batch["ref_chosen"].shape[0]
    pi_c, pi_r = lp[:b], lp[b:]
    losses, cr, rr = preference_loss(
        pi_c, pi_r, batch["ref_chosen"].to(lp), batch["ref_rejected"].to(lp), beta=beta,
        label_smoothing=label_smoothing, loss=loss, n_c=n[:b], n_r=n[b:])
    if sft_weight:
        losses = losses + sft_weight * (-pi_c / n[:b].clamp_min(1))
    return losses, cr, rr, pi_c, pi_r


def make_loss_fn(*, beta: float = 0.1, label_smoothing: float = 0.0, loss: str = "sigmoid",
                 sft_weight: float = 0.0, stats: dict[str, torch.Tensor] | None = None):
    """The runner's `loss_fn(model, batch) -> (sum over pairs, pairs)`; adds the sums of
    reward accuracy, chosen / rejected reward and margin of each micro-batch to `stats`."""
    def loss_fn(model, batch):
        losses, cr, rr, pi_c, _ = _pair_terms(model, batch, beta=beta, loss=loss,
                                              label_smoothing=label_smoothing,
                                              sft_weight=sft_weight)
        if stats is not None:
            n = (batch["labels"][:cr.shape[0]] != IGNORE_INDEX).sum(-1).clamp_min(1)
            new = {"reward_accuracy": (cr > rr).float().sum(), "chosen_reward": cr.sum(),
                   "rejected_reward": rr.sum(), "margin": (cr - rr).sum()}
            if sft_weight:
                new["chosen_nll"] = (-pi_c.detach() / n).sum()
            for k, v in new.items():
                stats[k] = stats[k] + v.detach() if k in stats else v.detach()
        return losses.sum(), count_pairs(batch)
    return loss_fn


# -- reference and evaluation ------------------------------------------------------------------

@torch.no_grad()
def compute_reference(model: torch.nn.Module, examples: Sequence[dict], *, batch_size: int = 8,
                      pad_id: int = 0, device: torch.device | str = "cpu",
                      autocast_dtype: torch.dtype | None = None, group=None, rank: int = 0,
                      world: int = 1) -> None:
    """Store the model's summed reply log-probs in every example (`ref_chosen`,
    `ref_rejected`). Each rank scores examples[rank::world] (longest first, to pad little);
    the results are summed over `group` (a plain, unsharded model: no collectives inside)."""
    model.eval()
    out = torch.zeros(len(examples), 2, dtype=torch.float64, device=device)
    mine = sorted(range(rank, len(examples), world),
                  key=lambda i: -max(len(examples[i]["chosen_ids"]), len(examples[i]["rejected_ids"])))
    for idx in (mine[i:i + batch_size] for i in range(0, len(mine), batch_size)):
        batch = loop.to_device(collate([examples[i] for i in idx], pad_id), device)
        with loop.autocast_context(device, autocast_dtype):
            lp, _ = sequence_logps(model, batch)
        out[idx, 0] = lp[:len(idx)].double()
        out[idx, 1] = lp[len(idx):].double()
    loop.all_reduce_sum(out, group)
    for ex, (c, r) in zip(examples, out.tolist()):
        ex["ref_chosen"], ex["ref_rejected"] = c, r


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, examples: Sequence[dict], *, beta: float = 0.1,
                   label_smoothing: float = 0.0, loss: str = "sigmoid", batch_size: int = 8,
                   pad_id: int = 0, device: torch.device | str = "cpu",
                   autocast_dtype: torch.dtype | None = None, group=None, rank: int = 0,
                   world: int = 1) -> dict[str, float]:
    """Means over the pairs: loss, reward_accuracy, margin, chosen/rejected reward and
    chosen/rejected_logp_change (summed reply log-prob minus the reference's). Every rank
    runs the same number of forwards (FSDP), padding its share with weight-0 pairs."""
    was = model.training
    model.eval()
    mine = list(range(rank, len(examples), world))
    per_rank = math.ceil(len(examples) / world)
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    sums = torch.zeros(8, dtype=torch.float64, device=device)
    for j in range(0, per_rank, batch_size):
        batch = loop.to_device(collate([examples[i] for i in mine[j:j + batch_size]], pad_id),
                               device)
        w = torch.tensor(weights[j:j + batch_size], dtype=torch.float64, device=device)
        with loop.autocast_context(device, autocast_dtype):
            losses, cr, rr, pi_c, pi_r = _pair_terms(model, batch, beta=beta, loss=loss,
                                                     label_smoothing=label_smoothing,
                                                     sft_weight=0.0)
        cols = [torch.ones_like(cr), losses, (cr > rr).float(), cr - rr, cr, rr,
                pi_c - batch["ref_chosen"], pi_r - batch["ref_rejected"]]
        sums += torch.stack([(c.double() * w).sum() for c in cols])
    loop.all_reduce_sum(sums, group)
    model.train(was)
    n, *rest = sums.tolist()
    names = ("loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward",
             "chosen_logp_change", "rejected_logp_change")
    return {k: v / n if n else float("nan") for k, v in zip(names, rest)}


# -- the stage -------------------------------------------------------------------------------

def load_pairs(paths: Sequence[str | Path]) -> list[dict]:
    """Every record of the pref files, validated together (one error lists all problems)."""
    problems, records = [], []
    for p in paths:
        problems += D.check_file(p, "pref")[1]
    if problems:
        raise D.DataFormatError(problems)
    for p in paths:
        records += [rec for _, rec, _ in D.iter_lines(p)]
    return records


def _check_records(records: Sequence[Any], where: str) -> None:
    problems = [D.Problem(where, i, f, m) for i, rec in enumerate(records, 1)
                for f, m in D.validate_record(rec, "pref")]
    if problems:
        raise D.DataFormatError(problems)


def _load_causal_lm(path: str | Path, device: torch.device, what: str):
    from ..hf import load_model, model_class
    from ..model import InternLM2ForCausalLM
    if model_class(path) is not InternLM2ForCausalLM:
        raise ValueError(f"{what} {path} is a {model_class(path).__name__}; DPO needs a "
                         "causal LM")
    return load_model(path, device=device)


def train_dpo(args: FinetuneArgs, records: Sequence[Mapping],
              val_records: Sequence[Mapping] | None = None, *, tokenizer: Any = None,
              beta: float = 0.1, label_smoothing: float = 0.0, max_len: int = 1024,
              reference: str | Path | None = None, env=None, loss: str = "sigmoid",
              sft_weight: float = 0.0) -> dict:
    """DPO from `args.model` on pref records; returns the runner's summary (OUT/summary.json)."""
    args.validate()
    if beta <= 0:
        raise ValueError(f"--beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss not in LOSSES:
        raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if loss == "ipo" and label_smoothing:
        raise ValueError("--label-smoothing applies to the sigmoid loss only")
    if sft_weight < 0:
        raise ValueError(f"--sft-weight must be >= 0, got {sft_weight}")
    if max_len < 2:
        raise ValueError(f"--max-len must be >= 2, got {max_len}")
    _check_records(records, "data")
    _check_records(val_records or [], "val-data")
    env = env or setup_env()
    tokenizer = tokenizer or load_tokenizer_of(args.model)
    pad_id = tokenizer.pad_id
    examples, info = encode_pairs(records, tokenizer, max_len)
    log(f"dpo: {info['pairs']} pairs ({info['truncated']} with the prompt cut to {max_len} "
        f"tokens; dropped: {info['dropped_too_long']} whose reply does not fit, "
        f"{info['dropped_empty']} with nothing to train)", env)
    val: list[dict] = []
    if val_records:
        val, vinfo = encode_pairs(val_records, tokenizer, max_len)
        info.update({f"val_{k}": v for k, v in vinfo.items()})
    if not examples:
        raise ValueError("dpo: no training pairs left (all dropped; raise --max-len?)")

    autocast = compute_dtype(args, env.device)
    ref_path = reference or args.model
    t0 = time.perf_counter()
    ref_model = _load_causal_lm(ref_path, env.device, "--reference" if reference else "--model")
    for p in ref_model.parameters():
        p.requires_grad_(False)
    compute_reference(ref_model, examples + val, batch_size=args.micro_batch_size, pad_id=pad_id,
                      device=env.device, autocast_dtype=autocast, group=env.group,
                      rank=env.rank, world=env.world)
    del ref_model
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    info.update(beta=beta, label_smoothing=label_smoothing, loss=loss, sft_weight=sft_weight,
                max_len=max_len, reference=str(ref_path),
                reference_seconds=round(time.perf_counter() - t0, 3))
    log(f"dpo: reference log-probs of {len(examples) + len(val)} pairs from {ref_path} in "
        f"{info['reference_seconds']:.1f}s", env)

    stats: dict[str, torch.Tensor] = {}
    opts = {"beta": beta, "label_smoothing": label_smoothing, "loss": loss}

    def build(device: torch.device):
        return _load_causal_lm(args.model, device, "--model")

    def eval_fn(model) -> dict:
        return evaluate_pairs(model, val, batch_size=args.micro_batch_size, pad_id=pad_id,
                              device=env.device, autocast_dtype=autocast, group=env.group,
                              rank=env.rank, world=env.world, **opts)

    stage = Stage("dpo", examples, lambda b: collate(b, pad_id),
                  make_loss_fn(sft_weight=sft_weight, stats=stats, **opts), count_pairs, build,
                  tokenizer=tokenizer, eval_fn=eval_fn if val else None, stats=stats, info=info)
    return run_finetune(args, stage, env)


def main(ns: argparse.Namespace) -> int:
    args = args_from(ns)
    args.validate()
    records = load_pairs(ns.data)
    val = load_pairs(ns.val_data) if ns.val_data else None
    tokenizer = load_tokenizer_of(args.model, ns.tokenizer)
    train_dpo(args, records, val, tokenizer=tokenizer, beta=ns.beta,
              label_smoothing=ns.label_smoothing, max_len=ns.max_len, reference=ns.reference,
              loss=ns.loss, sft_weight=ns.sft_weight)
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "dpo", help="direct preference optimization on preference pairs (full or LoRA)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="pref jsonl file(s)")
    p.add_argument("--val-data", nargs="+", default=None, help="held-out pref jsonl file(s)")
    p.add_argument("--beta", type=float, default=0.1, help="KL strength (default 0.1)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="assumed share of flipped labels, conservative DPO (default 0)")
    p.add_argument("--loss", choices=LOSSES, default="sigmoid", help="loss (default sigmoid)")
    p.add_argument("--sft-weight", type=float, default=0.0,
                   help="weight of the chosen replies' NLL added to the loss (RPO; default 0)")
    p.add_argument("--max-len", type=int, default=1024,
                   help="tokens per side; longer prompts are cut from the left (default 1024)")
    p.add_argument("--reference", default=None,
                   help="reference model folder (default: the starting model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model folder's)")
    add_finetune_args(p, lr=5e-7, epochs=1.0, batch_size=16, micro_batch_size=2)
    p.set_defaults(func=main)
    return p


__all__ = ["LOSSES", "add_cli", "collate", "compute_reference", "count_pairs", "encode_pair",
           "encode_pairs", "evaluate_pairs", "load_pairs", "main", "make_loss_fn",
           "preference_loss", "sequence_logps", "train_dpo"]
