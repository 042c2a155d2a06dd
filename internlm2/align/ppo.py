"""`internlm2 ppo`: online PPO with the COOL RLHF recipe (InternLM2 report 4.3).

Models: the actor and the frozen reference start from the SFT folder; the critic starts from
the reward-model folder (its own copy and value head, trained; per-token values); the reward
model is a second, frozen copy. The reward model sees the domain system prompt of each prompt
(`data.encode_reward`); the actor and the critic never do.

One iteration: `rollout_batch` prompts (global; every rank samples its share with the
foundation's generator, top-p 0.9, stopping at </s> or <|im_end|>); the behaviour log-probs
are recomputed with a forward of the actor, as are the reference log-probs and the critic's
values on the response positions; the reward model scores prompt + decoded response (cut
responses are scored too, minus `truncation_penalty`). Per-token rewards: -kl_coef x KL (k1)
against the reference plus the score at the last response token; GAE (gamma 1, lambda 0.99).
Then `ppo_epochs` passes: actor loss = clipped surrogate (mean over the response tokens of
the global batch) + ptx_weight x the LM loss on an SFT micro-batch (`--ptx-data`); critic
loss = 0.5 (V - R)^2 (no value clipping and no advantage whitening by default, as the report;
`--value-clip`, `--whiten-advantages` turn them on). Before round 1, `critic_warmup`
iterations train the critic with the actor frozen (report: 50; default 10 here, for CPU runs).

Several rounds; between rounds the Fast Path (`fastpath.py`) compares early and late samples
of the round on fixed probe prompts, finds reward-hacking patterns (length explosion,
repetition, format gaming; pluggable), builds preference pairs preferring the early sample and
fine-tunes the reward model on them (`reward.train_reward`) into OUT/round{k}/rm: the frozen
reward model of the next round (the critic carries on).

Torchrun: every rank holds full replicas (tiny to mid-size models), generates its share and
gradients are summed over ranks (losses normalised by global token counts) before each step.

Written: OUT/metrics.jsonl (per iteration: reward, kl, entropy, response_length, value_loss,
policy_loss, clip_frac, approx_kl, ptx_loss, time; val_* on --val-prompts), OUT/round{k}/
(actor, critic, fastpath.json, fastpath_pairs.jsonl, samples, rm/, state.json), OUT/model
(the final actor with its tokenizer), OUT/summary.json. `--resume auto` restarts after the
last finished round.

    internlm2 ppo --actor runs/x/sft/model --reward runs/x/rm/model --prompts prompts.jsonl \\
        --val-prompts prompts_val.jsonl --out runs/x/ppo --rounds 3 --iterations 10
    torchrun --nproc-per-node 2 -m internlm2.align.ppo --actor ... (same flags)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..chat_format import render_chat_ids
from ..train import loop
from . import data as D
from . import fastpath as FP
from . import losses as L
from .trainer import Env, load_tokenizer_of, log

RewardFn = Callable[[list[list[dict]], list[str]], Sequence[float]]


@dataclass
class PPOConfig:
    kl_coef: float = 0.01
    kl_kind: str = "k1"
    gamma: float = 1.0
    lam: float = 0.99
    clip: float = 0.2
    value_clip: float | None = None  # report: no value clipping
    whiten_advantages: bool = False  # report: no advantage normalisation
    actor_lr: float = 1e-6
    critic_lr: float = 5e-6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    critic_warmup: int = 10  # iterations before round 1, actor frozen (report: 50)
    ptx_weight: float = 0.5
    ptx_batch: int = 4  # SFT rows per actor step on each rank
    ptx_seq_len: int = 1024
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int = 128
    max_prompt_len: int = 1024
    rollout_batch: int = 32  # prompts per iteration, all ranks together
    ppo_epochs: int = 1
    mini_batches: int = 1  # optimizer steps per epoch
    micro_batch_size: int = 8
    iterations: int = 10  # per round
    rounds: int = 3
    seed: int = 0
    truncation_penalty: float = 0.0  # subtracted from the score of responses cut at max_new_tokens
    rm_max_len: int = 1024
    rm_use_domain: bool | None = None  # None: as the reward model was trained (config.json)
    eval_every: int = 5  # iterations; 0 = at round ends only
    eval_temperature: float = 0.0  # 0 = greedy held-out evaluation
    eval_samples: int = 1
    max_eval_prompts: int = 256
    fastpath: bool = True
    fastpath_prompts: int = 64
    fastpath_min_pairs: int = 20
    fastpath_max_pairs: int = 100
    fastpath_lr: float = 1e-5
    fastpath_epochs: float = 1.0
    fastpath_batch: int = 8
    length_factor: float = 1.5
    length_min: float = 8.0
    repetition_threshold: float = 0.3
    format_regex: str | None = None

    def validate(self, world: int = 1) -> None:
        if self.kl_kind not in ("k1", "k2", "k3"):
            raise ValueError(f"--kl-kind must be k1, k2 or k3, got {self.kl_kind!r}")
        for name in ("rollout_batch", "ppo_epochs", "mini_batches", "micro_batch_size",
                     "iterations", "rounds", "max_new_tokens", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.rollout_batch < world:
            raise ValueError(f"--rollout-batch {self.rollout_batch} < {world} ranks")
        if not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise ValueError("--top-p must be in (0, 1] and --temperature > 0")
        if self.actor_lr <= 0 or self.critic_lr <= 0:
            raise ValueError("learning rates must be > 0")


# -- rollouts ----------------------------------------------------------------------------------

@dataclass
class Rollout:
    records: list[dict]
    texts: list[str]
    finish: list[str]
    lengths: list[int]  # response tokens incl. a final stop id
    ids: torch.Tensor  # [B, T] prompt + response, right padded
    attn: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T-1] the response tokens, IGNORE_INDEX elsewhere
    mask: torch.Tensor  # [B, T-1] float, 1 on response tokens
    scores: torch.Tensor  # [B]
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None  # [B, T-1] of the sampling policy
    kl: torch.Tensor | None = None
    adv: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def rows(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows `idx`, cut to their longest sequence."""
        sel = torch.as_tensor(list(idx), dtype=torch.long)
        t = int(self.attn[sel].sum(-1).max())
        out = {"ids": self.ids[sel, :t], "attn": self.attn[sel, :t]}
        for k in ("labels", "mask", "old_logp", "values", "adv", "returns"):
            out[k] = getattr(self, k)[sel, :t - 1]
        return out


def encode_prompt(rec: dict, tokenizer: Any, max_len: int) -> list[int]:
    """The actor's prompt: the conversation and the assistant header (no domain prompt)."""
    ids, _ = render_chat_ids(rec["messages"], tokenizer, tools=rec.get("tools"),
                               add_generation_prompt=True)
    return ids if len(ids) <= max_len else ids[:1] + ids[len(ids) - max_len + 1:]


def sequence_batch(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int):
    """(ids, attention mask, labels [B, T-1], response mask [B, T-1]) of prompt + response."""
    ids, attn = D.pad_batch([p + r for p, r in zip(prompts, responses)], pad_id)
    labels = torch.full((ids.shape[0], ids.shape[1] - 1), L.IGNORE_INDEX, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        labels[i, len(p) - 1:len(p) - 1 + len(r)] = torch.as_tensor(r, dtype=torch.long)
    return ids, attn, labels, (labels != L.IGNORE_INDEX).float()


def response_logprobs(model: nn.Module, ids, attn, labels, temperature: float = 1.0):
    """(log-probs of the labels [B, T-1], logits [B, T-1, V]) of a causal LM at `temperature`."""
    logits = model(ids, attention_mask=attn)[:, :-1]
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return L.token_logprobs(logits, labels), logits


def matches_reference(text: str, ref: Any) -> bool:
    """The last number of `text` equals a numeric reference; else the reference appears."""
    ref = str(ref).strip()
    if re.fullmatch(r"-?\d+(\.\d+)?", ref):
        nums = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
        return bool(nums) and float(nums[-1]) == float(ref)
    return ref.lower() in text.lower()


# -- the trainer -------------------------------------------------------------------------------

class PPOTrainer:
    """The four models, their optimizers and the prompts; `run()` does the rounds."""

    def __init__(self, cfg: PPOConfig, *, actor: str, reward: str | None, prompts: list[dict],
                 out: str, val_prompts: list[dict] | None = None, critic: str | None = None,
                 ptx_data: Sequence[str] | None = None, tokenizer: Any = None,
                 reward_fn: RewardFn | None = None, detectors: Sequence[FP.Detector] | None = None,
                 env: Env | None = None, progress: bool = True):
        from ..hf import load_model, model_class
        from ..model import InternLM2ForRewardModel
        self.env = env or _setup_env()
        cfg.validate(self.env.world)
        critic = critic or reward
        if critic is None or (reward is None and reward_fn is None) or not prompts:
            raise ValueError("PPO needs prompts, a reward model folder (or a reward_fn) and a "
                             "critic folder (default: the reward model)")
        if model_class(critic) is not InternLM2ForRewardModel:
            raise ValueError(f"{critic}: the critic must be a reward-model folder "
                             "(architectures InternLM2ForRewardModel)")
        self.cfg, self.out, self.progress, self.reward_fn = cfg, Path(out), progress, reward_fn
        self.prompts = list(prompts)
        self.val_prompts = list(val_prompts or [])[:cfg.max_eval_prompts]
        self.detectors = list(detectors) if detectors is not None else FP.default_detectors(
            length_factor=cfg.length_factor, length_min=cfg.length_min,
            repetition_threshold=cfg.repetition_threshold, format_regex=cfg.format_regex)
        dev = self.env.device
        self.tok = tokenizer or load_tokenizer_of(actor)
        self.actor = load_model(actor, device=dev)
        self.ref = _frozen(load_model(actor, device=dev))
        self.critic = load_model(critic, device=dev)
        if self.critic.config.vocab_size != self.actor.config.vocab_size:
            raise ValueError("the critic and the actor must share the vocabulary")
        self.scorer, self.rm_dir = None, None
        if reward is not None:
            self._load_rm(reward)
        self.stop_ids = sorted({self.tok.eos_id, self.tok.im_end_id})
        self.actor_opt, self.critic_opt = (
            loop.build_optimizer(m, lr=lr, weight_decay=cfg.weight_decay)
            for m, lr in ((self.actor, cfg.actor_lr), (self.critic, cfg.critic_lr)))
        self.ptx_rows: list[dict] = []
        self.ptx_at = self.step = 0
        if ptx_data and cfg.ptx_weight > 0:
            from .sft import pack_file
            self.ptx_rows, st = pack_file(list(ptx_data), self.tok, cfg.ptx_seq_len, cfg.seed)
            log(f"ppo: ptx data: {st['conversations']} conversations in {st['rows']} rows", self.env)
        self.probe = random.Random(f"probe:{cfg.seed}").sample(
            range(len(self.prompts)), min(cfg.fastpath_prompts, len(self.prompts)))

    def _load_rm(self, path: str) -> None:
        from ..hf import load_model
        from .reward import RewardScorer
        try:
            tok = load_tokenizer_of(path)
        except FileNotFoundError:
            tok = self.tok
        self.scorer = RewardScorer(_frozen(load_model(path, device=self.env.device)), tok,
                                   max_len=self.cfg.rm_max_len, use_domain=self.cfg.rm_use_domain)
        self.rm_dir = str(path)

    # -- pieces ----------------------------------------------------------------------------
    def sample(self, recs: list[dict], seed: int, temperature: float | None = None):
        """One response per record: (prompt ids, completions, texts, finish reasons)."""
        from ..generate import GenerationConfig, collect, generate
        cfg = self.cfg
        t = cfg.temperature if temperature is None else temperature
        prompts = [encode_prompt(r, self.tok, cfg.max_prompt_len) for r in recs]
        gcfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=t, seed=seed,
                                top_p=cfg.top_p if t > 0 else 1.0, stop_ids=self.stop_ids)
        self.actor.eval()
        outs = collect(generate(self.actor, prompts, gcfg)) if recs else []
        return (prompts, outs, [self.tok.decode(c.output_ids) for c in outs],
                [c.finish_reason or "length" for c in outs])

    @torch.no_grad()
    def score(self, recs: list[dict], texts: list[str], finish: list[str]) -> torch.Tensor:
        """Reward-model scores (the domain prompt is added here, and only here), minus the
        truncation penalty for responses cut at max_new_tokens."""
        if self.reward_fn is not None:
            s = [float(x) for x in self.reward_fn([r["messages"] for r in recs], texts)]
        else:
            s = self.scorer.score([{"messages": [*r["messages"], {"role": "assistant", "content": t}],
                                    "domain": r.get("domain"), "tools": r.get("tools")}
                                   for r, t in zip(recs, texts)], self.cfg.micro_batch_size)
        cut = torch.tensor([f == "length" for f in finish], dtype=torch.float32)
        return torch.tensor(s, dtype=torch.float32) - self.cfg.truncation_penalty * cut

    @torch.no_grad()
    def rollout(self, recs: list[dict], seed: int) -> Rollout:
        cfg, dev = self.cfg, self.env.device
        prompts, outs, texts, finish = self.sample(recs, seed)
        responses = [list(c.tokens) for c in outs]  # with the stop id: the policy learns to stop
        ids, attn, labels, mask = sequence_batch(prompts, responses, self.tok.pad_id)
        ro = Rollout(recs, texts, finish, [len(r) for r in responses], ids, attn, labels, mask,
                     self.score(recs, texts, finish))
        parts: list[list[torch.Tensor]] = [[], [], [], []]
        self.critic.eval()
        for j in range(0, len(recs), cfg.micro_batch_size):
            rows = list(range(j, min(len(recs), j + cfg.micro_batch_size)))
            t = int(attn[rows].sum(-1).max())
            a = (ids[rows, :t].to(dev), attn[rows, :t].to(dev), labels[rows, :t - 1].to(dev))
            lp, logits = response_logprobs(self.actor, *a, temperature=cfg.temperature)
            rlp, _ = response_logprobs(self.ref, *a, temperature=cfg.temperature)
            v = self.critic(a[0], attention_mask=a[1])[:, :-1].float()
            for lst, x in zip(parts, (lp, rlp, v, L.token_entropy(logits))):
                lst.append(nn.functional.pad(x.cpu(), (0, ids.shape[1] - t)))
        ro.old_logp, ro.ref_logp, values, ro.entropy = (torch.cat(x) for x in parts)
        rewards, ro.kl = L.shaped_rewards(ro.scores, ro.old_logp, ro.ref_logp, mask, cfg.kl_coef,
                                          cfg.kl_kind)
        ro.values = values * mask
        ro.adv, ro.returns = L.gae(rewards, ro.values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:  # over the global batch
            s = loop.all_reduce_sum(torch.stack([(ro.adv * mask).sum(), mask.sum(),
                                                 (ro.adv ** 2 * mask).sum()]).double(), self.env.group)
            mean = s[0] / s[1].clamp_min(1)
            var = s[2] / s[1].clamp_min(1) - mean ** 2
            ro.adv = ((ro.adv - mean) * torch.rsqrt(var.clamp_min(0) + 1e-8)).float() * mask
        return ro

    def _sync_step(self, model: nn.Module, opt: torch.optim.Optimizer) -> float:
        """Sum the gradients over the ranks, clip, step; the gradient norm."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.env.world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                loop.all_reduce_sum(p.grad, self.env.group)
        norm = float(torch.nn.utils.clip_grad_norm_(
            [p for p in params if p.grad is not None],
            self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")))
        if math.isfinite(norm):
            opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    def _ptx_backward(self, sums: dict) -> None:
        """ptx_weight x the mean LM loss over a global SFT batch (ptx_batch rows per rank)."""
        cfg, env, n = self.cfg, self.env, len(self.ptx_rows)
        rows = [self.ptx_rows[(self.ptx_at + env.rank * cfg.ptx_batch + k) % n]
                for k in range(cfg.ptx_batch)]
        self.ptx_at = (self.ptx_at + env.world * cfg.ptx_batch) % n
        batch = loop.to_device(D.collate(rows), env.device)
        count = loop.all_reduce_sum(loop.count_targets(batch).double().clone(), env.group)
        loss_sum, _ = loop.causal_lm_loss(self.actor, batch)
        (cfg.ptx_weight * loss_sum / count.clamp_min(1)).backward()
        sums["ptx_loss"] += float(loss_sum.detach()) / max(1.0, float(count))
        sums["ptx_steps"] += 1.0 / env.world  # summed over the ranks later

    def update(self, ro: Rollout, train_actor: bool, seed: int) -> dict[str, float]:
        """ppo_epochs x mini_batches optimizer steps on a rollout; summed statistics."""
        cfg, env, dev = self.cfg, self.env, self.env.device
        sums = dict.fromkeys(("policy_loss", "clip_frac", "approx_kl", "ratio", "value_loss",
                              "tokens", "ptx_loss", "ptx_steps", "actor_grad_norm",
                              "critic_grad_norm", "steps"), 0.0)
        rng, order = random.Random(seed), list(range(len(ro.records)))
        self.actor.train()
        self.critic.train()
        for _ in range(cfg.ppo_epochs):
            rng.shuffle(order)
            for m in range(cfg.mini_batches):
                mb = order[m::cfg.mini_batches]
                count = loop.all_reduce_sum(torch.tensor(float(ro.mask[mb].sum()) if mb else 0.0,
                                                         dtype=torch.float64), env.group)
                count = max(float(count), 1.0)  # response tokens of the global mini-batch
                for j in range(0, len(mb), cfg.micro_batch_size):
                    b = loop.to_device(ro.rows(mb[j:j + cfg.micro_batch_size]), dev)
                    if train_actor:
                        lp, _ = response_logprobs(self.actor, b["ids"], b["attn"], b["labels"],
                                                  cfg.temperature)
                        pl, st = L.policy_loss(lp, b["old_logp"], b["adv"], b["mask"], cfg.clip)
                        (pl / count).backward()
                        sums["policy_loss"] += float(pl.detach())
                        for k in ("clip_frac", "approx_kl", "ratio"):
                            sums[k] += float(st[k])
                    v = self.critic(b["ids"], attention_mask=b["attn"])[:, :-1].float()
                    vl = L.value_loss(v, b["values"], b["returns"], b["mask"], cfg.value_clip)
                    (vl / count).backward()
                    sums["value_loss"] += float(vl.detach())
                    sums["tokens"] += float(b["mask"].sum())
                if train_actor:
                    if self.ptx_rows:
                        self._ptx_backward(sums)
                    sums["actor_grad_norm"] += self._sync_step(self.actor, self.actor_opt)
                sums["critic_grad_norm"] += self._sync_step(self.critic, self.critic_opt)
                sums["steps"] += 1
        return sums

    # -- one iteration -----------------------------------------------------------------------
    def _batch(self, it: int) -> list[dict]:
        """This rank's share of the prompts of iteration `it` (epochs over seeded permutations)."""
        cfg, n, env = self.cfg, len(self.prompts), self.env
        idx, perms = [], {}
        for k in range(it * cfg.rollout_batch, (it + 1) * cfg.rollout_batch):
            e, i = divmod(k, n)
            if e not in perms:
                perms[e] = list(range(n))
                random.Random(cfg.seed * 1_000_003 + e).shuffle(perms[e])
            idx.append(perms[e][i])
        idx = idx[:len(idx) // env.world * env.world]
        return [self.prompts[i] for i in idx[env.rank::env.world]]

    def iteration(self, rnd: int, it: int, train_actor: bool) -> dict[str, Any]:
        """Rollouts, scores, GAE, updates; the metrics record (summed over ranks)."""
        cfg, env = self.cfg, self.env
        t0 = time.perf_counter()
        seed = cfg.seed * 7919 + self.step * 104_729 + env.rank
        ro = self.rollout(self._batch(self.step), seed)
        t_roll = time.perf_counter() - t0
        sums = self.update(ro, train_actor, seed)
        mask = ro.mask
        local = torch.tensor([len(ro.records), float(ro.scores.sum()), float(ro.kl.sum()),
                              float((ro.entropy * mask).sum()), float(mask.sum()),
                              float(sum(ro.lengths)), float(sum(f == "length" for f in ro.finish)),
                              *sums.values()], dtype=torch.float64)
        g = loop.all_reduce_sum(local, env.group).tolist()
        n, tok, s = max(g[0], 1.0), max(g[4], 1.0), dict(zip(sums, g[7:]))
        rec = {"step": self.step + 1, "round": rnd, "iteration": it,
               "phase": "ppo" if train_actor else "critic_warmup",
               "reward": g[1] / n, "kl": g[2] / n, "entropy": g[3] / tok,
               "response_length": g[5] / n, "truncated": g[6] / n}
        per_token = ("value_loss", "policy_loss", "clip_frac", "approx_kl", "ratio")
        per_step = ("critic_grad_norm", "actor_grad_norm")
        for k in per_token[:None if train_actor else 1] + per_step[:2 if train_actor else 1]:
            rec[k] = s[k] / max(s["tokens" if k in per_token else "steps"], 1.0)
        if train_actor and self.ptx_rows:
            rec["ptx_loss"] = s["ptx_loss"] / max(s["ptx_steps"], 1.0)
        rec.update(rollout_time=t_roll, time=time.perf_counter() - t0)
        self.step += 1
        return rec

    # -- evaluation and probes ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward, accuracy against "reference" and length on the held-out prompts
        (greedy, or sampled with a fixed seed: comparable across iterations)."""
        cfg, env = self.cfg, self.env
        if not self.val_prompts:
            return {}
        recs = [r for r in self.val_prompts for _ in range(cfg.eval_samples)][env.rank::env.world]
        _, outs, texts, finish = self.sample(recs, cfg.seed + 12_345 + env.rank, cfg.eval_temperature)
        scores = self.score(recs, texts, finish)
        refs = [(t, r["reference"]) for t, r in zip(texts, recs) if r.get("reference") is not None]
        local = torch.tensor([len(recs), float(scores.sum()), len(refs),
                              sum(matches_reference(t, ref) for t, ref in refs),
                              sum(len(c.output_ids) for c in outs)], dtype=torch.float64)
        g = loop.all_reduce_sum(local, env.group).tolist()
        out = {"val_reward": g[1] / max(g[0], 1), "val_length": g[4] / max(g[0], 1)}
        if g[2]:
            out["val_accuracy"] = g[3] / g[2]
        return out

    def probe_samples(self, seed: int) -> list[FP.Sample]:
        """The current policy's samples on the fixed probe prompts, gathered on every rank."""
        env = self.env
        mine = self.probe[env.rank::env.world]
        recs = [self.prompts[i] for i in mine]
        _, outs, texts, finish = self.sample(recs, seed + env.rank)
        local = [FP.Sample(prompt=r["messages"], response=t, key=k, score=s,
                           length=len(c.output_ids), finish_reason=f,
                           domain=r.get("domain", "helpful"), tools=r.get("tools"))
                 for k, r, t, c, f, s in zip(mine, recs, texts, outs, finish,
                                             self.score(recs, texts, finish).tolist())]
        if env.world == 1:
            return local
        parts: list = [None] * env.world
        torch.distributed.all_gather_object(parts, local, group=env.group)
        return [s for p in parts for s in p]

    # -- rounds ----------------------------------------------------------------------------
    def fast_path(self, rnd: int, early: list[FP.Sample], late: list[FP.Sample],
                  patch: bool) -> dict[str, Any]:
        """Detect, write OUT/round{k}/fastpath*, and (patch) fine-tune the reward model on the
        pairs into OUT/round{k}/rm. Every rank runs the (deterministic) detection."""
        cfg, env = self.cfg, self.env
        folder = self.out / f"round{rnd}"
        report = FP.run_fast_path(early, late, self.detectors, max_pairs=cfg.fastpath_max_pairs,
                                  min_pairs=cfg.fastpath_min_pairs, seed=cfg.seed + rnd)
        if env.main:
            FP.write_report(folder, report, early, late)
        for f in report.findings:
            log(f"ppo: round {rnd} fast path: {f.name}: {f.description}; {f.flagged} flagged, "
                f"{f.pairs} pairs", env)
        info: dict[str, Any] = {"findings": [f.name for f in report.findings],
                                "pairs": len(report.pairs)}
        if patch and self.rm_dir and len(report.pairs) >= env.world:
            if env.main and (folder / "rm").exists():  # left by an unfinished earlier attempt
                shutil.rmtree(folder / "rm")
            _barrier(env)
            self._load_rm(FP.patch_reward_model(
                self.rm_dir, report.pairs, folder / "rm", tokenizer=self.scorer.tokenizer,
                lr=cfg.fastpath_lr, epochs=cfg.fastpath_epochs, batch_size=cfg.fastpath_batch,
                micro_batch_size=min(cfg.micro_batch_size, cfg.fastpath_batch),
                max_len=cfg.rm_max_len, use_domain=self.scorer.use_domain, seed=cfg.seed + rnd,
                env=env))
            info["reward_model"] = self.rm_dir
            log(f"ppo: round {rnd} fast path: reward model patched with {len(report.pairs)} "
                f"pairs -> {self.rm_dir}", env)
        return info

    def save_round(self, rnd: int, info: dict) -> None:
        from ..hf import save_model
        folder = self.out / f"round{rnd}"
        if self.env.main:
            save_model(self.actor, folder / "actor", tokenizer=self.tok)
            save_model(self.critic, folder / "critic", tokenizer=self.tok)
            torch.save({"actor": self.actor_opt.state_dict(), "critic": self.critic_opt.state_dict(),
                        "ptx_at": self.ptx_at}, folder / "optim.pt")
            state = {"round": rnd, "step": self.step, "reward_model": self.rm_dir, **info}
            (folder / "state.json").write_text(json.dumps(state, indent=2) + "\n")  # written last
        _barrier(self.env)

    def resume(self) -> int:
        """Load the last finished round; its number (0: none)."""
        from ..hf import load_model
        done = sorted(int(p.parent.name[5:]) for p in self.out.glob("round*/state.json")
                      if p.parent.name[5:].isdigit())
        if not done:
            return 0
        folder = self.out / f"round{done[-1]}"
        state = json.loads((folder / "state.json").read_text())
        dev = self.env.device
        self.actor.load_state_dict(load_model(folder / "actor", device=dev).state_dict())
        self.critic.load_state_dict(load_model(folder / "critic", device=dev).state_dict())
        opt = torch.load(folder / "optim.pt", map_location=dev, weights_only=False)
        self.actor_opt.load_state_dict(opt["actor"])
        self.critic_opt.load_state_dict(opt["critic"])
        self.ptx_at, self.step = opt.get("ptx_at", 0), int(state["step"])
        if state.get("reward_model"):
            self._load_rm(state["reward_model"])
        log(f"ppo: resumed after round {done[-1]} (step {self.step})", self.env)
        return done[-1]

    def run(self, resume: str | None = None) -> dict[str, Any]:
        cfg, env, out = self.cfg, self.env, self.out
        loop.seed_everything(cfg.seed)
        done = self.resume() if resume == "auto" else 0
        if resume != "auto" and any(out.glob("round*/state.json")):
            raise ValueError(f"{out} holds rounds of an earlier run: continue it with --resume "
                             "auto, or write to a new --out")
        if env.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "ppo_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
            if not done:
                (out / "metrics.jsonl").unlink(missing_ok=True)
        metrics = loop.Metrics(out / "metrics.jsonl", enabled=env.main)
        metrics.truncate(self.step)
        log(f"ppo: {len(self.prompts)} prompts, {len(self.val_prompts)} held out; "
            f"{cfg.rounds} rounds x {cfg.iterations} iterations of {cfg.rollout_batch} rollouts "
            f"on {env.world} rank(s); critic warm-up {cfg.critic_warmup}", env)
        t_start, last, stopped, rounds = time.perf_counter(), {}, None, []
        stop = loop.StopSignal()

        def record(rec: dict) -> bool:  # log; True when some rank was asked to stop
            nonlocal last, stopped
            metrics.log(rec)
            last = rec
            if self.progress and "phase" in rec:
                keys = ("reward", "kl", "entropy", "response_length", "value_loss", "clip_frac",
                        "val_reward")
                log(f"ppo r{rec['round']} it{rec['iteration']} ({rec['phase']}) step "
                    f"{rec['step']}: " + " ".join(f"{k} {rec[k]:.4g}" for k in keys if k in rec)
                    + f" [{rec['time']:.1f}s]", env)
            if stop.agreed(env.group, env.device) if env.world > 1 else stop.requested:
                stopped = stop.requested or "a signal on another rank"
            return stopped is not None

        with stop:
            if not done:
                record({"step": 0, "round": 0, **self.evaluate()})
                for w in range(cfg.critic_warmup):
                    if stopped or record(self.iteration(0, w + 1, train_actor=False)):
                        break
            early = self.probe_samples(cfg.seed + 1_000 * (done + 1)) \
                if cfg.fastpath and done < cfg.rounds and not stopped else []
            for rnd in range(done + 1, cfg.rounds + 1):
                for it in range(1, cfg.iterations + 1):
                    if stopped:
                        break
                    rec = self.iteration(rnd, it, train_actor=True)
                    if (cfg.eval_every and it % cfg.eval_every == 0) or it == cfg.iterations:
                        rec.update(self.evaluate())
                    record(rec)
                if stopped:
                    log(f"ppo: stopped ({stopped}) in round {rnd}; --resume auto restarts it", env)
                    break
                _broadcast_params(self.actor, env)
                _broadcast_params(self.critic, env)
                info: dict[str, Any] = {}
                if cfg.fastpath:
                    late = self.probe_samples(cfg.seed + 1_000 * (rnd + 1))
                    info = self.fast_path(rnd, early, late, patch=rnd < cfg.rounds)
                    early = late
                self.save_round(rnd, info)
                rounds.append({"round": rnd, **info})
        metrics.close()
        summary = {"steps": self.step, "stopped": stopped, "reward_model": self.rm_dir,
                   "time": time.perf_counter() - t_start, "rounds": rounds,
                   **{k: v for k, v in last.items()
                      if k.startswith(("val_", "reward", "kl", "response_length"))}}
        if stopped is None:
            from ..hf import save_model
            if env.main:
                save_model(self.actor, out / "model", tokenizer=self.tok)
            summary["model"] = str(out / "model")
        if env.main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _barrier(env)
        return summary


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _setup_env() -> Env:
    from .trainer import setup_env
    return setup_env()


def _barrier(env: Env) -> None:
    if env.world > 1:
        torch.distributed.barrier()


def _broadcast_params(model: nn.Module, env: Env) -> None:
    """Keep the replicas bit-identical (rank 0's weights) at round ends."""
    if env.world > 1:
        with torch.no_grad():
            for t in model.state_dict().values():
                torch.distributed.broadcast(t, src=0, group=env.group)


def run_ppo(cfg: PPOConfig, *, actor: str, reward: str | None, prompts: str | list[dict],
            out: str, val_prompts: str | list[dict] | None = None, critic: str | None = None,
            ptx_data: Sequence[str] | None = None, tokenizer: Any = None,
            reward_fn: RewardFn | None = None, detectors: Sequence[FP.Detector] | None = None,
            resume: str | None = None, env: Env | None = None, progress: bool = True) -> dict:
    """Run PPO per `cfg` (prompt files are validated: kind "prompt"); returns the summary."""
    def load(x):
        return D.load_records(x, "prompt") if isinstance(x, (str, Path)) else x
    trainer = PPOTrainer(cfg, actor=actor, reward=reward, prompts=load(prompts), out=out,
                         val_prompts=load(val_prompts) if val_prompts else None, critic=critic,
                         ptx_data=ptx_data, tokenizer=tokenizer, reward_fn=reward_fn,
                         detectors=detectors, env=env, progress=progress)
    return trainer.run(resume)


# -- CLI ---------------------------------------------------------------------------------------

def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--actor", required=True, help="SFT folder: the actor and the reference")
    p.add_argument("--reward", required=True, help="reward-model folder (frozen; the critic's start)")
    p.add_argument("--critic", default=None, help="critic folder (default: the reward model)")
    p.add_argument("--prompts", nargs="+", required=True, help="PPO prompt jsonl file(s)")
    p.add_argument("--val-prompts", nargs="+", default=None, help="held-out prompt jsonl file(s)")
    p.add_argument("--ptx-data", nargs="+", default=None, help="SFT jsonl for the ptx loss")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", default=None, help="'auto': continue after the last finished round")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress lines")
    base = PPOConfig()
    for f in fields(PPOConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(base, f.name)
        if isinstance(default, bool) or f.name == "rm_use_domain":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=default, help=f"(default {default})")
        else:
            typ = {"value_clip": float, "format_regex": str}.get(f.name, type(default))
            p.add_argument(flag, dest=f.name, type=typ, default=default, help=f"(default {default})")


def main(ns: argparse.Namespace) -> int:
    cfg = PPOConfig(**{f.name: getattr(ns, f.name) for f in fields(PPOConfig)})
    prompts = [r for path in ns.prompts for r in D.load_records(path, "prompt")]
    val = [r for path in ns.val_prompts or () for r in D.load_records(path, "prompt")] or None
    summary = run_ppo(cfg, actor=ns.actor, reward=ns.reward, critic=ns.critic, prompts=prompts,
                      val_prompts=val, out=ns.out, ptx_data=ns.ptx_data, resume=ns.resume,
                      progress=ns.progress)
    return 0 if summary.get("stopped") is None else 1


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ppo", help="online PPO with the COOL RLHF Fast Path",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=main)
    return p


__all__ = ["PPOConfig", "PPOTrainer", "Rollout", "add_cli", "encode_prompt", "main",
           "matches_reference", "response_logprobs", "run_ppo", "sequence_batch"]


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m internlm2.align.ppo", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(_parser)
    _code = main(_parser.parse_args(sys.argv[1:]))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(_code)
