"""`internlm2 reward`: the COOL RLHF conditional reward model (InternLM2 report 4.2).

Data: preference jsonl (`internlm2.align.data`, kind "pref"), one pair a line:
    {"prompt": [messages ending with a user turn], "chosen": reply, "rejected": reply,
     "domain": "helpful" | "harmless" | "code" | "math" | any other name, "tools": [...]?}
One model serves every domain: the domain's system prompt (`data.domain_prompt`, a generic
one for new names; "helpful" when the record has none) goes before the conversation, which
is rendered in the chat format, and the reward token is appended (config.json
`reward_token_id`; by default the spare token [UNUSED_TOKEN_130]). The score is the scalar
head's value at that token. `--no-domain` leaves the system prompt out.

Model: from an SFT folder, its decoder with the vocabulary head replaced by a fresh `v_head`
[1, hidden] (normal, std 1/sqrt(hidden + 1), seeded); or from a reward-model folder, trained
further (the PPO Fast Path patches a reward model with a few new pairs).

Loss per pair, r_c / r_r the chosen / rejected scores: focal ranking
-(1 - 2 max(0, P - 1/2))^gamma log P with P = sigmoid(r_c - r_r) (gamma 2), plus 0.02 x the
log barrier -(log(r + 5) + log(5 - r)) on both scores, keeping them in (-5, 5); averaged over
the pairs of a global batch. Report recipe: cosine lr 1e-5 -> 5e-6, weight decay 0.01, one
epoch. Logged per step: train_acc (pairs ranked right), train_chosen / train_rejected (mean
scores); on --val-data: val_acc overall and per domain (val_acc_math ...), val_chosen,
val_rejected, val_abs (mean |score|).

Saved: OUT/model, a Hugging Face folder with architectures ["InternLM2ForRewardModel"],
`reward_token_id` in config.json, the decoder weights, `v_head.weight` and the tokenizer;
`internlm2.hf.load_model` loads it back as a reward model.

    internlm2 reward train --model runs/x/sft/model --data pref.jsonl --val-data pref_val.jsonl --out runs/x/rm
    internlm2 reward score --model runs/x/rm/model --input pref_val.jsonl --output scores.jsonl

`reward score` reads pref records (and writes chosen_score, rejected_score, correct) or
conversations {"messages": [..., the assistant reply], "domain": ...} (and writes score), one
line per record, and prints the mean score and the pairwise accuracy, overall and per domain.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model import InternLM2ForRewardModel
from ..train import loop
from . import data as D
from .losses import reward_model_loss
from .trainer import (
    Env,
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

DEFAULT_DOMAIN = "helpful"
# The report's recipe (FinetuneArgs fields); the CLI defaults.
REWARD_DEFAULTS: dict[str, Any] = {"lr": 1e-5, "min_lr": 5e-6, "weight_decay": 0.01, "epochs": 1.0,
                                   "batch_size": 16, "micro_batch_size": 4}


def reward_args(**overrides: Any) -> FinetuneArgs:
    """FinetuneArgs with the report's reward-model defaults (and `overrides`)."""
    return FinetuneArgs(**{**REWARD_DEFAULTS, **overrides})


# -- model -----------------------------------------------------------------------------------

def init_reward_model(path: str | os.PathLike, tokenizer: Any, device: str | torch.device = "cpu",
                      seed: int = 0, dtype: torch.dtype = torch.float32) -> InternLM2ForRewardModel:
    """A reward-model folder loaded as is, or an SFT (causal LM) folder's decoder with a fresh
    seeded `v_head`. Either way config.extra["reward_token_id"] is set (so config.json has it)."""
    from ..hf import load_model, model_class
    if model_class(path) is InternLM2ForRewardModel:
        model = load_model(path, device=device, dtype=dtype)
    else:
        lm = load_model(path, device=device, dtype=dtype)
        config = lm.config
        with torch.device("meta"):
            model = InternLM2ForRewardModel(config)
        model.model = lm.model  # the vocabulary head (lm.output) is dropped
        h = config.hidden_size
        w = torch.randn(1, h, generator=torch.Generator().manual_seed(seed)) / math.sqrt(h + 1)
        model.v_head = nn.Linear(h, 1, bias=False, device=device, dtype=dtype)
        model.v_head.weight.data.copy_(w)
    rt = D.reward_token_id(tokenizer, model.config)
    if not 0 <= rt < model.config.vocab_size:
        raise ValueError(f"reward token id {rt} is outside the model's vocabulary "
                         f"({model.config.vocab_size})")
    model.config.extra["reward_token_id"] = rt
    return model


# -- pairs -----------------------------------------------------------------------------------

def check_records(records: Sequence[Any], name: str = "records") -> None:
    """Validate in-memory pref records; DataFormatError naming record numbers (1-based)."""
    problems = [D.Problem(name, i, f, m) for i, rec in enumerate(records, 1)
                for f, m in D.validate_record(rec, "pref")]
    if problems:
        raise D.DataFormatError(problems)


def load_pairs(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """Every record of the pref files, validated together (one error lists every problem)."""
    problems: list[D.Problem] = []
    for p in paths:
        problems += D.check_file(p, "pref")[1]
    if problems:
        raise D.DataFormatError(problems)
    return [rec for p in paths for _, rec, _ in D.iter_lines(p)]


def record_domain(rec: Mapping, override: str | None = None) -> str:
    return override or rec.get("domain") or DEFAULT_DOMAIN


def encode_pair(rec: Mapping, tokenizer: Any, reward_token: int, *, max_len: int | None = None,
                use_domain: bool = True) -> dict:
    """{"chosen": ids, "rejected": ids, "domain": name} of one pref record."""
    domain = record_domain(rec)
    out: dict[str, Any] = {"domain": domain}
    for side in ("chosen", "rejected"):
        out[side] = D.encode_reward(rec["prompt"], rec[side], tokenizer, reward_token=reward_token,
                                    domain=domain if use_domain else None,
                                    tools=rec.get("tools"), max_len=max_len)
    return out


def collate_pairs(pairs: Sequence[Mapping], pad_id: int = 0) -> dict[str, Any]:
    """B pairs -> input_ids / attention_mask [2B, T] (chosen rows, then rejected rows), right
    padded, and the domains."""
    ids, mask = D.pad_batch([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "domains": [p["domain"] for p in pairs]}


def pair_scores(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores [B], rejected scores [B]) of a collated batch, fp32."""
    scores = model.score(batch["input_ids"], attention_mask=batch["attention_mask"]).float()
    b = scores.shape[0] // 2
    return scores[:b], scores[b:]


def count_pairs(batch: Mapping[str, Any]) -> torch.Tensor:
    return torch.tensor(batch["input_ids"].shape[0] // 2, dtype=torch.float64)


def make_loss_fn(gamma: float = 2.0, barrier_weight: float = 0.02,
                 stats: dict[str, torch.Tensor] | None = None) -> loop.LossFn:
    """loss_fn(model, batch) -> (summed pair loss, pairs); adds the sums of acc (pairs ranked
    right), chosen and rejected scores to `stats`."""
    def loss_fn(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        rc, rr = pair_scores(model, batch)
        loss = reward_model_loss(rc, rr, gamma=gamma, barrier_weight=barrier_weight)
        if stats is not None:
            with torch.no_grad():
                for k, v in (("acc", (rc > rr).double().sum()), ("chosen", rc.double().sum()),
                             ("rejected", rr.double().sum())):
                    stats[k] = stats[k] + v if k in stats else v
        return loss.sum(), torch.tensor(rc.numel(), device=rc.device)
    return loss_fn


@torch.no_grad()
def evaluate_pairs(model: nn.Module, pairs: Sequence[Mapping], *, pad_id: int = 0,
                   batch_size: int = 8, env: Env | None = None,
                   autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Pairwise accuracy (overall and acc_<domain>), mean chosen / rejected scores and mean
    |score| over encoded pairs, split over the ranks of env and summed. Every rank runs the
    same number of forwards (FSDP gathers weights in them)."""
    if not pairs:
        return {}
    rank, world = (env.rank, env.world) if env is not None else (0, 1)
    dev = env.device if env is not None else next(model.parameters()).device
    domains = sorted({p["domain"] for p in pairs})
    index = {d: i for i, d in enumerate(domains)}
    k = len(domains)
    mine = list(pairs[rank::world])
    steps = math.ceil(math.ceil(len(pairs) / world) / batch_size)
    sums = torch.zeros(5 + 2 * k, dtype=torch.float64, device=dev)
    was_training = model.training
    model.eval()
    for s in range(steps):
        chunk = mine[s * batch_size:(s + 1) * batch_size]
        real = len(chunk)
        batch = loop.to_device(collate_pairs(chunk or list(pairs[:1]), pad_id), dev)
        with loop.autocast_context(dev, autocast_dtype):
            rc, rr = pair_scores(model, batch)
        rc, rr = rc[:real].double(), rr[:real].double()
        ok = (rc > rr).double()
        sums[:5] += torch.stack([torch.tensor(float(real), dtype=torch.float64, device=dev),
                                 ok.sum(), rc.sum(), rr.sum(), rc.abs().sum() + rr.abs().sum()])
        d = torch.tensor([index[p["domain"]] for p in chunk], dtype=torch.long, device=dev)
        sums[5:5 + k] += torch.bincount(d, minlength=k).double()
        sums[5 + k:] += torch.zeros(k, dtype=torch.float64, device=dev).index_add_(0, d, ok)
    loop.all_reduce_sum(sums, env.group if env is not None else None)
    model.train(was_training)
    v = sums.tolist()
    n = max(v[0], 1.0)
    out = {"acc": v[1] / n, "chosen": v[2] / n, "rejected": v[3] / n, "abs": v[4] / (2 * n),
           "pairs": int(v[0])}
    for d, i in index.items():
        out[f"acc_{d}"] = v[5 + k + i] / max(v[5 + i], 1.0)
    return out


# -- training --------------------------------------------------------------------------------

def reward_stage(args: FinetuneArgs, records: Sequence[Mapping], val_records: Sequence[Mapping] | None,
                 tokenizer: Any, env: Env, *, max_len: int = 1024, gamma: float = 2.0,
                 barrier_weight: float = 0.02, use_domain: bool = True) -> Stage:
    from ..hf import load_config
    check_records(records, "records")
    if val_records:
        check_records(val_records, "val_records")
    rt = D.reward_token_id(tokenizer, load_config(args.model))
    enc = partial(encode_pair, tokenizer=tokenizer, reward_token=rt, max_len=max_len,
                  use_domain=use_domain)
    pairs = [enc(r) for r in records]
    val_pairs = [enc(r) for r in val_records or ()]
    pad = tokenizer.pad_id
    stats: dict[str, torch.Tensor] = {}
    longest = max((len(p[s]) for p in pairs for s in ("chosen", "rejected")), default=0)
    info = {"pairs": len(pairs), "val_pairs": len(val_pairs), "reward_token_id": rt,
            "use_domain": use_domain, "gamma": gamma, "barrier_weight": barrier_weight,
            "max_len": max_len, "longest": longest,
            "domains": dict(sorted(Counter(p["domain"] for p in pairs).items()))}
    log(f"reward: {len(pairs)} pairs ({', '.join(f'{d} {c}' for d, c in info['domains'].items())})"
        f", {len(val_pairs)} held out; longest {longest} tokens (max {max_len}); reward token "
        f"{rt}; {'domain system prompts' if use_domain else 'no domain prompt'}", env)

    def build(device: torch.device) -> nn.Module:
        model = init_reward_model(args.model, tokenizer, device, seed=args.seed)
        # recorded in config.json, so scoring renders inputs the way training did
        model.config.extra["reward_use_domain"] = use_domain
        return model

    def eval_fn(model: nn.Module) -> dict[str, float]:
        return evaluate_pairs(model, val_pairs, pad_id=pad, batch_size=args.micro_batch_size,
                              env=env, autocast_dtype=compute_dtype(args, env.device))

    return Stage("reward", pairs, partial(collate_pairs, pad_id=pad),
                 make_loss_fn(gamma, barrier_weight, stats), count_pairs, build,
                 tokenizer=tokenizer, eval_fn=eval_fn if val_pairs else None, stats=stats,
                 info=info)


def train_reward(args: FinetuneArgs, records: list[dict], val_records: list[dict] | None = None,
                 *, tokenizer: Any = None, max_len: int = 1024, gamma: float = 2.0,
                 barrier_weight: float = 0.02, use_domain: bool = True,
                 env: Env | None = None) -> dict:
    """Train (or fine-tune further) a reward model on pref records; returns the runner's
    summary (with val_acc, val_acc_<domain> ... when val_records are given). args.model: an
    SFT or a reward-model folder; each call needs its own args.out (or resume="auto").
    Pass `env` when calling more than once in a process (setup_env runs once)."""
    args.validate()
    env = env if env is not None else setup_env()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer_of(args.model)
    stage = reward_stage(args, records, val_records, tokenizer, env, max_len=max_len, gamma=gamma,
                         barrier_weight=barrier_weight, use_domain=use_domain)
    return run_finetune(args, stage, env)


# -- scoring ---------------------------------------------------------------------------------

class RewardScorer:
    """Scores conversations or preference pairs with a reward model (a folder, or a model in
    memory with its tokenizer). An item is {"messages": [... reply], "domain"?, "tools"?}
    (one score, for the whole conversation) or a pref record (chosen and rejected scores)."""

    def __init__(self, model: str | os.PathLike | nn.Module, tokenizer: Any = None, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_len: int | None = None, use_domain: bool | None = None):
        if isinstance(model, (str, os.PathLike)):
            from ..hf import load_model, model_class
            if model_class(model) is not InternLM2ForRewardModel:
                raise ValueError(f"{model}: not a reward model (config.json architectures is not "
                                 "InternLM2ForRewardModel); train one with `internlm2 reward train`")
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer_of(model)
            model = load_model(model, device=device, dtype=dtype)
        elif tokenizer is None:
            raise ValueError("RewardScorer: a model in memory needs its tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.reward_token = D.reward_token_id(tokenizer, model.config)
        self.max_len = max_len or model.config.max_position_embeddings
        # None: as the model was trained (config.json `reward_use_domain`, default True)
        self.use_domain = (model.config.extra.get("reward_use_domain", True)
                           if use_domain is None else use_domain)

    def encode(self, item: Mapping, domain: str | None = None) -> list[list[int]]:
        """Token ids of an item: one sequence (messages) or two (chosen, rejected)."""
        d = record_domain(item, domain) if self.use_domain else None
        kw = {"reward_token": self.reward_token, "domain": d, "tools": item.get("tools"),
              "max_len": self.max_len}
        if "messages" in item:
            return [D.encode_reward(item["messages"], [], self.tokenizer, **kw)]
        return [D.encode_reward(item["prompt"], item[s], self.tokenizer, **kw)
                for s in ("chosen", "rejected")]

    @torch.no_grad()
    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
        """Scores of token-id sequences (each ending with the reward token), batched by length."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        for j in range(0, len(order), batch_size):
            idx = order[j:j + batch_size]
            ids, mask = D.pad_batch([seqs[i] for i in idx], self.tokenizer.pad_id)
            s = self.model.score(ids.to(self.device), attention_mask=mask.to(self.device))
            for i, v in zip(idx, s.float().tolist()):
                out[i] = v
        return out

    def score(self, items: Sequence[Mapping], batch_size: int = 8, domain: str | None = None,
              ) -> list[Any]:
        """A float per conversation item, a (chosen, rejected) tuple per pref record; `domain`
        overrides the items' domains."""
        encoded = [self.encode(it, domain) for it in items]
        it = iter(self.score_ids([s for e in encoded for s in e], batch_size))
        return [next(it) if len(e) == 1 else (next(it), next(it)) for e in encoded]

    def score_pairs(self, records: Sequence[Mapping], batch_size: int = 8,
                    domain: str | None = None) -> list[tuple[float, float]]:
        """(chosen score, rejected score) of every pref record."""
        if any("messages" in r for r in records):
            raise ValueError("score_pairs takes pref records (prompt / chosen / rejected)")
        return self.score(records, batch_size, domain)


def score_summary(items: Sequence[Mapping], results: Sequence[Any], domain: str | None = None,
                  ) -> dict[str, Any]:
    """Mean score (and chosen / rejected means and accuracy for pairs), overall and per domain."""
    def agg(rows: list[tuple[Mapping, Any]]) -> dict[str, Any]:
        singles = [r for _, r in rows if not isinstance(r, tuple)]
        pairs = [r for _, r in rows if isinstance(r, tuple)]
        scores = singles + [s for p in pairs for s in p]
        out: dict[str, Any] = {"records": len(rows),
                               "mean_score": sum(scores) / len(scores) if scores else None}
        if pairs:
            out.update(pairs=len(pairs), accuracy=sum(c > r for c, r in pairs) / len(pairs),
                       mean_chosen=sum(c for c, _ in pairs) / len(pairs),
                       mean_rejected=sum(r for _, r in pairs) / len(pairs))
        return out
    rows = list(zip(items, results))
    by: dict[str, list] = {}
    for row in rows:
        by.setdefault(record_domain(row[0], domain), []).append(row)
    return {**agg(rows), "domains": {d: agg(by[d]) for d in sorted(by)}}


def load_score_input(path: str | os.PathLike) -> list[dict]:
    """Records to score: pref records, or conversations ({"messages": [...]}), validated."""
    first = next((rec for _, rec, _ in D.iter_lines(path) if isinstance(rec, Mapping)), None) \
        if Path(path).is_file() else None
    kind = "pref" if isinstance(first, Mapping) and "prompt" in first else "sft"
    return D.load_records(path, kind)


# -- CLI ---------------------------------------------------------------------------------------

def _train_main(ns: argparse.Namespace) -> int:
    args = args_from(ns)
    args.validate()
    env = setup_env()
    tokenizer = load_tokenizer_of(args.model, ns.tokenizer)
    records = load_pairs(ns.data)
    val = load_pairs(ns.val_data) if ns.val_data else None
    summary = train_reward(args, records, val, tokenizer=tokenizer, max_len=ns.max_len,
                           gamma=ns.gamma, barrier_weight=ns.barrier_weight,
                           use_domain=not ns.no_domain, env=env)
    if "val_acc" in summary:
        log(f"reward: held-out pairwise accuracy {summary['val_acc']:.3f}", env)
    return 0


def _fmt(s: Mapping[str, Any]) -> str:
    parts = [f"{s['records']} records"]
    if s.get("mean_score") is not None:
        parts.append(f"mean score {s['mean_score']:+.3f}")
    if "pairs" in s:
        parts.append(f"accuracy {s['accuracy']:.3f} (chosen {s['mean_chosen']:+.3f}, "
                     f"rejected {s['mean_rejected']:+.3f})")
    return ", ".join(parts)


def _score_main(ns: argparse.Namespace) -> int:
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorer = RewardScorer(ns.model, load_tokenizer_of(ns.model, ns.tokenizer), device=device,
                          max_len=ns.max_len, use_domain=False if ns.no_domain else None)
    records = load_score_input(ns.input)
    results = scorer.score(records, ns.batch_size, domain=ns.domain)
    src = Path(ns.input)
    out = Path(ns.output) if ns.output else src.with_name(src.name.split(".")[0] + ".scores.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for rec, r in zip(records, results):
            extra = ({"chosen_score": r[0], "rejected_score": r[1], "correct": r[0] > r[1]}
                     if isinstance(r, tuple) else {"score": r})
            f.write(json.dumps({**rec, **extra}, ensure_ascii=False) + "\n")
    summary = score_summary(records, results, ns.domain)
    print(f"reward score: {_fmt(summary)}; scores in {out}")
    for d, s in summary["domains"].items():
        print(f"  {d}: {_fmt(s)}")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "reward", help="conditional reward model (COOL RLHF): train, score",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="reward_command", metavar="{train,score}")
    p.set_defaults(func=lambda ns: p.print_help() or 2)

    t = sub.add_parser("train", help="train a reward model on preference pairs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--data", nargs="+", required=True, help="pref jsonl file(s)")
    t.add_argument("--val-data", nargs="+", default=None, help="held-out pref jsonl file(s)")
    t.add_argument("--max-len", type=int, default=1024,
                   help="tokens per sequence; longer ones lose their oldest tokens (default 1024)")
    t.add_argument("--gamma", type=float, default=2.0, help="focal ranking gamma (default 2)")
    t.add_argument("--barrier-weight", type=float, default=0.02,
                   help="weight of the log barrier keeping scores in (-5, 5) (default 0.02)")
    t.add_argument("--no-domain", action="store_true",
                   help="no domain system prompt (an unconditional reward model)")
    t.add_argument("--tokenizer", default=None, help="tokenizer (default: the model folder's)")
    add_finetune_args(t, **REWARD_DEFAULTS)
    t.set_defaults(func=_train_main)

    s = sub.add_parser("score", help="score pref records or conversations with a reward model")
    s.add_argument("--model", required=True, help="reward-model folder")
    s.add_argument("--input", required=True, help="pref jsonl, or conversations {'messages'}")
    s.add_argument("--output", default=None,
                   help="scores jsonl (default: INPUT's name with .scores.jsonl)")
    s.add_argument("--domain", default=None, help="score every record under this domain")
    s.add_argument("--no-domain", action="store_true", help="no domain system prompt")
    s.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    s.add_argument("--max-len", type=int, default=None,
                   help="tokens per sequence (default: the model's max_position_embeddings)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--tokenizer", default=None, help="tokenizer (default: the model folder's)")
    s.set_defaults(func=_score_main)
    return p


__all__ = ["DEFAULT_DOMAIN", "REWARD_DEFAULTS", "RewardScorer", "add_cli", "check_records",
           "collate_pairs", "count_pairs", "encode_pair", "evaluate_pairs", "init_reward_model",
           "load_pairs", "load_score_input", "make_loss_fn", "pair_scores", "reward_args",
           "reward_stage", "score_summary", "train_reward"]
