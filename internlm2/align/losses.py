"""The alignment losses, as plain tensor functions (tested against hand computations).

Reward model (InternLM2 report 4.2, COOL RLHF):
  focal ranking   -(1 - 2 max(0, P - 1/2))^gamma log P,  P = sigmoid(r_chosen - r_rejected)
  log barrier     -(log(r + b) + log(b - r)), b = 5: keeps scores inside (-5, 5)
PPO: per-token log-probs, the KL penalty against the reference, GAE, the clipped policy
loss, the (optionally clipped) value loss, entropy.
DPO: the sigmoid loss on policy / reference log-ratio margins (Rafailov et al. 2023), with
optional label smoothing (conservative DPO) and the implicit rewards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# -- reward model ----------------------------------------------------------------------------

def focal_ranking_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       gamma: float = 2.0) -> torch.Tensor:
    """Per-pair focal ranking loss. Pairs already ranked with P > 1/2 are down-weighted by
    (2 - 2P)^gamma, so easy pairs stop dominating; gamma 0 is the plain ranking loss
    -log sigmoid(r_c - r_r)."""
    diff = (r_chosen - r_rejected).float()
    p = torch.sigmoid(diff)
    weight = (1.0 - 2.0 * torch.clamp(p - 0.5, min=0.0)) ** gamma
    return -weight * F.logsigmoid(diff)


def log_barrier_penalty(r: torch.Tensor, bound: float = 5.0, eps: float = 1e-3) -> torch.Tensor:
    """-(log(r + b) + log(b - r)) per score; 2 * -log(b) at 0 (its minimum).

    Outside [-b + eps, b - eps] the barrier is continued linearly with the slope it has at
    the edge, so a score that escaped the interval (an early, untrained head) gets a finite
    loss whose gradient pushes it back in, instead of NaN."""
    r = r.float()
    lo, hi = -bound + eps, bound - eps
    x = r.clamp(lo, hi)
    inner = -(torch.log(x + bound) + torch.log(bound - x))
    slope = -1.0 / (x + bound) + 1.0 / (bound - x)
    return inner + (r - x) * slope


def reward_model_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, *, gamma: float = 2.0,
                      barrier_weight: float = 0.02, bound: float = 5.0) -> torch.Tensor:
    """Per-pair COOL loss: focal ranking + weight * (barrier(chosen) + barrier(rejected))."""
    rank = focal_ranking_loss(r_chosen, r_rejected, gamma)
    if barrier_weight == 0:
        return rank
    bar = log_barrier_penalty(r_chosen, bound) + log_barrier_penalty(r_rejected, bound)
    return rank + barrier_weight * bar


# -- token log-probs -----------------------------------------------------------------------

def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) per position in fp32 (0 where the label is IGNORE_INDEX).
    logits [B, T, V], labels [B, T] (already the next tokens)."""
    safe = labels.clamp_min(0)
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(labels == IGNORE_INDEX, 0.0)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of every position's distribution, fp32 [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (mean kept when shift_mean is False)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# -- PPO ---------------------------------------------------------------------------------

def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference at the sampled tokens:
    k1 = log p - log q (unbiased, the usual RLHF penalty), k2 = (log p - log q)^2 / 2,
    k3 = exp(log q - log p) - 1 - (log q - log p) (non-negative, low variance)."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(-d) - 1.0 + d
    raise ValueError(f"kl kind must be k1, k2 or k3, got {kind!r}")


def shaped_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                   mask: torch.Tensor, kl_coef: float, kind: str = "k1",
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL at every response token, plus the sequence score at
    its last token. scores [B], logp/ref_logp/mask [B, T]. Returns (rewards, kl) [B, T]."""
    mask = mask.to(logp.dtype)
    kl = kl_penalty(logp, ref_logp, kind) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    rewards = rewards + last.to(rewards.dtype) * scores.to(rewards.dtype)[:, None]
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *,
        gamma: float = 1.0, lam: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    rewards, values, mask: [B, T] (mask 1 on response tokens, which are contiguous). The value
    after the last response token is 0 (the episode ends). delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = delta_t + gamma lam A_{t+1}; returns = A + V. Both are 0 off the mask."""
    mask = mask.to(values.dtype)
    b, t = values.shape
    adv = torch.zeros_like(values)
    last = torch.zeros(b, dtype=values.dtype, device=values.device)
    next_v = torch.zeros(b, dtype=values.dtype, device=values.device)
    for i in range(t - 1, -1, -1):
        m = mask[:, i]
        delta = rewards[:, i] + gamma * next_v - values[:, i]
        last = (delta + gamma * lam * last) * m
        adv[:, i] = last
        # Off-mask positions (padding after the response) leave the carried values untouched.
        next_v = torch.where(m > 0, values[:, i], next_v)
    return adv, (adv + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, summed over masked tokens (the caller divides by the global token
    count). Returns (loss_sum, stats: clip_frac, approx_kl, ratio as masked sums)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    m = mask.to(per_token.dtype)
    with torch.no_grad():
        stats = {"clip_frac": ((clipped > unclipped).to(m.dtype) * m).sum(),
                 "approx_kl": (0.5 * (logp - old_logp) ** 2 * m).sum(),
                 "ratio": (ratio * m).sum()}
    return (per_token * m).sum(), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """0.5 (V - R)^2 summed over masked tokens; with `clip`, the max of the clipped and
    unclipped errors (value clipping, off by default as in the report)."""
    err = (values - returns) ** 2
    if clip is not None:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (v_clip - returns) ** 2)
    return 0.5 * (err * mask.to(err.dtype)).sum()


# -- DPO ---------------------------------------------------------------------------------

def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss from summed sequence log-probs [B].

    margin = beta * ((pi_c - ref_c) - (pi_r - ref_r));
    loss = -(1 - eps) log sigmoid(margin) - eps log sigmoid(-margin).
    Returns (loss, chosen_reward, rejected_reward) with reward = beta * (pi - ref), detached."""
    c = policy_chosen.float() - ref_chosen.float()
    r = policy_rejected.float() - ref_rejected.float()
    margin = beta * (c - r)
    loss = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return loss, (beta * c).detach(), (beta * r).detach()


__all__ = ["dpo_loss", "focal_ranking_loss", "gae", "kl_penalty", "log_barrier_penalty",
           "masked_mean", "masked_whiten", "policy_loss", "reward_model_loss", "shaped_rewards",
           "token_entropy", "token_logprobs", "value_loss"]
