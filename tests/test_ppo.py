"""PPO and the Fast Path: GAE and the PPO loss pieces against hand computations, the
reward-hacking detectors on hand-made samples, and behaviour on tiny models (a 512-token BPE,
hidden 64, 2 layers) trained here: PPO raises the held-out reward with a bounded KL; a planted
length hack is found by the Fast Path and patched so the next round stops growing; 2 ranks
under torchrun.

The toy world: prompts ask for "some words about X"; the SFT answers are 1-8 words from a
12-word list (mostly short), e.g. "Tiger, river, stone.". Two reward models are trained from
the SFT model with `reward.train_reward`: one prefers answers that mention "tiger" (a
learnable reward), one prefers longer answers (the planted hack)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from internlm2.align import fastpath as FP
from internlm2.align import losses as L
from internlm2.align import ppo
from internlm2.config import ModelConfig

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]
ROOT = Path(__file__).resolve().parents[1]


# -- GAE and the PPO loss pieces --------------------------------------------------------------

def _hand_gae(r, v, m, gamma, lam):
    """Plain-python GAE over the masked (response) positions; the value after the last one is 0."""
    adv = [0.0] * len(r)
    nxt_v, run = 0.0, 0.0
    for i in reversed([i for i in range(len(r)) if m[i]]):
        delta = r[i] + gamma * nxt_v - v[i]
        run = delta + gamma * lam * run
        adv[i] = run
        nxt_v = v[i]
    return adv, [(a + x) if k else 0.0 for a, x, k in zip(adv, v, m)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.99), (0.9, 0.95), (1.0, 1.0)])
def test_gae_matches_hand_computation(gamma, lam):
    r = [[0.0, -0.01, 0.02, 1.5], [0.3, -0.02, 0.7, 9.0]]
    v = [[0.4, 0.1, -0.2, 0.8], [0.5, 0.25, -0.1, 7.0]]
    m = [[0, 1, 1, 1], [1, 1, 1, 0]]  # row 0: a prompt token first; row 1: padding last
    adv, ret = L.gae(torch.tensor(r), torch.tensor(v), torch.tensor(m), gamma=gamma, lam=lam)
    for i in range(2):
        want_a, want_r = _hand_gae(r[i], v[i], m[i], gamma, lam)
        torch.testing.assert_close(adv[i], torch.tensor(want_a), atol=1e-6, rtol=0)
        torch.testing.assert_close(ret[i], torch.tensor(want_r), atol=1e-6, rtol=0)
    # worked out on paper: r = (0, 0, 1), V = (0.5, 0.2, 0.1), gamma = lambda = 1:
    # deltas (-0.3, -0.1, 0.9) -> A = (0.5, 0.8, 0.9) = return - V
    a, _ = L.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.1]]),
                 torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(a, torch.tensor([[0.5, 0.8, 0.9]]))


def test_policy_loss_ratio_clip_and_gradients():
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.7, 3.0]])
    old = torch.zeros(1, 5)
    logp = ratio.log().requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is not a response token
    loss, st = L.policy_loss(logp, old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 1.1, 0.8 (clipped)
    assert float(loss.detach()) == pytest.approx(-1.2 - 0.5 + 1.1 + 0.8)
    assert float(st["clip_frac"]) == 2.0  # sums over the masked tokens
    assert float(st["ratio"]) == pytest.approx(1.5 + 0.5 + 1.1 + 0.7)
    assert float(st["approx_kl"]) == pytest.approx(0.5 * sum(math.log(x) ** 2 for x in (1.5, 0.5, 1.1, 0.7)))
    loss.backward()
    # clipped branch: no gradient; unclipped: d(-A r)/d logp = -A r
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5, 1.1, 0.0, 0.0]]))


def test_kl_estimators_and_shaped_rewards():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    d = math.log(2.0)
    assert float(L.kl_penalty(lp, ref, "k1")) == pytest.approx(d)
    assert float(L.kl_penalty(lp, ref, "k2")) == pytest.approx(d * d / 2)
    assert float(L.kl_penalty(lp, ref, "k3")) == pytest.approx(0.5 - 1 + d)
    logp = torch.tensor([[0.0, -1.0, -2.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    refp = torch.tensor([[0.0, -1.5, -1.0, 0.0], [-1.0, -2.0, -1.0, -0.5]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rewards, kl = L.shaped_rewards(torch.tensor([2.0, -1.0]), logp, refp, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.0, 0.5, -1.0, 0.0], [0.0, 1.0, 0.0, -0.5]]))
    want = -0.1 * kl
    want[0, 2] += 2.0  # the score sits on the last response token
    want[1, 3] += -1.0
    torch.testing.assert_close(rewards, want)
    v, old, ret = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.5, 2.0]]), torch.tensor([[2.0, 2.5]])
    assert float(L.value_loss(v, old, ret, torch.ones(1, 2))) == pytest.approx(0.5 * (1 + 0.25))
    # clipped to old +- 0.2: (0.7 - 2)^2 > (1 - 2)^2; (2.2 - 2.5)^2 < (3 - 2.5)^2
    assert float(L.value_loss(v, old, ret, torch.ones(1, 2), clip=0.2)) == \
        pytest.approx(0.5 * (1.3 ** 2 + 0.25))


def test_recomputed_logprobs_match_the_generator():
    """The response mask and labels line up: a forward over prompt + response gives the log-probs
    the generator reported for its own samples (raw, and at a temperature)."""
    from internlm2.generate import GenerationConfig, collect, generate
    from internlm2.model import build_model
    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = build_model(cfg, seed=0, init=True)
    with torch.no_grad():
        model.output.weight.mul_(40.0)  # a peaked distribution: stop ids get sampled sometimes
    prompts = [[1, 5, 9, 33], [1, 7], [1, 2 + 8, 11, 12, 13, 14]]
    for temp, raw in ((1.0, True), (0.7, False)):
        outs = collect(generate(model, prompts, GenerationConfig(
            max_new_tokens=6, temperature=temp, seed=3, logprobs=True, raw_logprobs=raw,
            stop_ids=[2, 4])))
        ids, attn, labels, mask = ppo.sequence_batch(prompts, [c.tokens for c in outs], 0)
        assert mask.sum(-1).tolist() == [len(c.tokens) for c in outs]
        with torch.no_grad():
            lp, _ = ppo.response_logprobs(model, ids, attn, labels, 1.0 if raw else temp)
        for i, c in enumerate(outs):
            got = lp[i][mask[i] > 0]
            torch.testing.assert_close(got, torch.tensor(c.logprobs), atol=1e-4, rtol=0)
            assert labels[i][mask[i] > 0].tolist() == c.tokens


def test_config_defaults_follow_the_report_and_cli_flags():
    c = ppo.PPOConfig()
    assert (c.kl_coef, c.kl_kind, c.gamma, c.lam, c.clip) == (0.01, "k1", 1.0, 0.99, 0.2)
    assert c.value_clip is None and c.whiten_advantages is False
    assert (c.actor_lr, c.critic_lr, c.ptx_weight, c.top_p) == (1e-6, 5e-6, 0.5, 0.9)
    p = argparse.ArgumentParser()
    ppo.add_cli(p.add_subparsers())
    ns = p.parse_args(["ppo", "--actor", "a", "--reward", "r", "--prompts", "p.jsonl", "--out",
                       "o", "--value-clip", "0.2", "--whiten-advantages", "--no-fastpath",
                       "--kl-kind", "k3", "--critic-warmup", "50"])
    assert (ns.value_clip, ns.whiten_advantages, ns.fastpath, ns.kl_kind, ns.critic_warmup) == \
        (0.2, True, False, "k3", 50)
    assert ppo.matches_reference("12 + 5 = 17.", "17") and not ppo.matches_reference("17 + 1 = 18", 17)
    assert ppo.matches_reference("The capital of France is Paris.", "paris")


# -- the Fast Path detectors -------------------------------------------------------------------

def _s(key, text, length=None, finish="stop", tools=None):
    return FP.Sample(prompt=[{"role": "user", "content": f"q{key}"}], response=text, key=key,
                     length=length, finish_reason=finish, tools=tools)


def test_length_explosion_found_and_pairs_prefer_early():
    early = [_s(i, f"short {i}", length=4 + i % 3) for i in range(30)]  # mean 5
    late = [_s(i, "long " * 12, length=12 + i % 2) for i in range(1, 31)]  # key 30: no early
    det = FP.LengthExplosion(factor=1.5, min_length=4)
    f = det.detect(early, late)
    assert f is not None and f.stats["early_mean_length"] == pytest.approx(5.0)
    assert f.stats["threshold"] == pytest.approx(7.5)
    pairs = FP.build_pairs(det, early, late)
    assert len(pairs) == 29  # the late sample of prompt 30 has no early sample: skipped
    for p in pairs:
        assert p["chosen"][0]["content"].startswith("short") and p["rejected"][0]["content"].startswith("long")
        assert p["chosen"][0]["content"] == f"short {p['prompt'][0]['content'][1:]}"  # same prompt
    calm = [_s(i, "x", length=6 + i % 2) for i in range(30)]  # mean 6.5 < 7.5
    assert FP.LengthExplosion(factor=1.5, min_length=4).detect(early, calm) is None
    rep = FP.run_fast_path(early, late, [det], min_pairs=20, max_pairs=25)
    assert [x.name for x in rep.findings] == ["length_explosion"] and len(rep.pairs) == 25
    few = FP.run_fast_path(early, late[:10], [FP.LengthExplosion(1.5, 4)], min_pairs=20)
    assert few.pairs == [] and "skipped" in few.findings[0].stats


def test_length_collapse_found_and_pairs_prefer_early():
    early = [_s(i, "a full answer here", length=8 + i % 3) for i in range(24)]  # mean 9
    late = [_s(i, "ok", length=1 + i % 2) for i in range(24)]  # mean 1.5
    det = FP.LengthCollapse(factor=2.0, max_length=4)
    f = det.detect(early, late)
    assert f is not None and f.stats["threshold"] == pytest.approx(4.0)  # min(4, 9 / 2)
    pairs = FP.build_pairs(det, early, late)
    assert len(pairs) == 24
    assert all(p["chosen"][0]["content"] == "a full answer here" and
               p["rejected"][0]["content"] == "ok" for p in pairs)
    steady = [_s(i, "fine", length=6 + i % 2) for i in range(24)]  # mean 6.5: not a collapse
    assert FP.LengthCollapse(factor=2.0, max_length=4).detect(early, steady) is None
    assert "length_collapse" in [d.name for d in FP.default_detectors()]


def test_repetition_and_format_gaming(tmp_path):
    text = ["The river runs past the old stone bridge.", "Apples grow on trees in the garden.",
            "Music and light fill the quiet room."]
    early = [_s(i, text[i % 3]) for i in range(24)]
    loop_text = "great answer great answer great answer great answer great answer"
    late = [_s(i, loop_text if i % 4 else text[i % 3]) for i in range(24)]
    rep = FP.Repetition(n=3, threshold=0.3)
    assert FP.repeated_ngram_share(loop_text) > 0.5 and FP.repeated_ngram_share(text[0]) == 0
    assert rep.detect(early, late) is not None and rep.detect(early, early) is None
    pairs = FP.build_pairs(rep, early, late)
    assert len(pairs) == 18 and all(p["rejected"][0]["content"] == loop_text for p in pairs)

    fmt = FP.FormatGaming(regex=r"(?i)as an ai")
    gamed = [_s(0, "Sure", finish="length"), _s(1, "ok <|action_start|><|plugin|>"),
             _s(2, "As an AI I think so."), _s(3, "[UNUSED_TOKEN_5] hi")]
    assert [fmt.reasons(s) for s in gamed] == [["unclosed"], ["special_token", "action_without_tool"],
                                               ["regex"], ["special_token"]]
    tool = [{"type": "function", "function": {"name": "f"}}]
    assert not fmt.is_hacked(_s(4, "<|action_start|> call", tools=tool))  # a tool was offered
    late_f = [_s(i, gamed[i % 4].response, finish=gamed[i % 4].finish_reason) if i % 2
              else dataclasses.replace(early[i]) for i in range(24)]
    f = fmt.detect(early, late_f)
    assert f is not None and f.stats["late_share"] == pytest.approx(0.5) and f.stats["early_share"] == 0
    report = FP.run_fast_path(early, late_f, [rep, fmt], min_pairs=5)
    assert report.findings[0].name == "format_gaming" and len(report.pairs) == 12
    FP.write_report(tmp_path, report, early, late_f)
    saved = json.loads((tmp_path / "fastpath.json").read_text())
    assert saved["pairs"] == 12 and saved["findings"][0]["pairs"] == 12
    assert len((tmp_path / "fastpath_pairs.jsonl").read_text().splitlines()) == 12
    assert isinstance(FP.LengthExplosion(), FP.Detector)


# -- behaviour on tiny models ------------------------------------------------------------------

WORDS = ["apple", "river", "tiger", "stone", "cloud", "green", "music", "light", "bread",
         "horse", "paper", "smile"]
TEMPLATES = ["List some words about {w}.", "Give me words for {w}.", "Say a few words on {w}.",
             "Name words like {w}.", "List some words about {w} and {v}."]


def _prompts() -> list[dict]:
    out = [{"messages": [{"role": "user", "content": t.format(w=w, v=v)}], "domain": "helpful"}
           for t in TEMPLATES for w in WORDS for v in (WORDS if "{v}" in t else [None]) if v != w]
    random.Random(0).shuffle(out)
    return out


def _answer(rng: random.Random, k: int, pool=WORDS) -> str:
    return ", ".join(rng.choice(pool) for _ in range(k)).capitalize() + "."


def _n_words(rng: random.Random) -> int:  # 1 + geometric: mean about 2.2, at most 8
    k = 1
    while k < 8 and rng.random() > 0.45:
        k += 1
    return k


def _pairs(n: int, seed: int, kind: str) -> list[dict]:
    rng, ps, out = random.Random(seed), _prompts(), []
    for _ in range(n):
        if kind == "tiger":  # same length, one word swapped for "tiger"
            k = rng.randint(1, 4)
            base = [rng.choice([w for w in WORDS if w != "tiger"]) for _ in range(k)]
            good = list(base)
            good[rng.randrange(k)] = "tiger"
            chosen, rejected = (", ".join(x).capitalize() + "." for x in (good, base))
        else:  # the planted hack: longer is better
            a = rng.randint(1, 6)
            chosen, rejected = _answer(rng, rng.randint(a + 1, 9)), _answer(rng, a)
        out.append({"prompt": ps[rng.randrange(len(ps))]["messages"], "chosen": chosen,
                    "rejected": rejected, "domain": "helpful"})
    return out


def _write(path: Path, recs: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer, SFT model (120 steps) and the two reward models: about 10 s."""
    from internlm2.align import data as D
    from internlm2.align.reward import reward_args, train_reward
    from internlm2.chat_format import render_chat
    from internlm2.hf import save_model
    from internlm2.model import build_model
    from internlm2.tokenizer import train_tokenizer
    from internlm2.train import loop
    root = tmp_path_factory.mktemp("ppo")
    rng, ps = random.Random(0), _prompts()
    sft = [{"messages": ps[rng.randrange(len(ps))]["messages"] +
            [{"role": "assistant", "content": _answer(rng, _n_words(rng))}]} for _ in range(1500)]
    tok = train_tokenizer([render_chat(r["messages"]) for r in sft], vocab_size=512,
                          output_dir=root / "tok")
    cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = build_model(cfg, seed=0)
    rows = D.pack_conversations(D.encode_all(sft, tok, 128)[0], 128, seed=0, pad_id=tok.pad_id)
    opt = loop.build_optimizer(model, lr=3e-3, weight_decay=0.0)
    for step in range(120):
        loop.set_lr(opt, loop.lr_at(step, peak=3e-3, warmup=20, total=120))
        res = loop.train_step(model, opt, [D.collate([rows[(step * 8 + i) % len(rows)]
                                                      for i in range(8)])])
    assert res.loss < 1.6
    save_model(model, root / "sft", tokenizer=tok)
    for name, seed in (("tiger", 1), ("length", 2)):
        pairs = _pairs(320, seed, name)
        s = train_reward(reward_args(model=str(root / "sft"), out=str(root / f"rm_{name}"),
                                     lr=2e-3, min_lr=2e-4, batch_size=16, micro_batch_size=16,
                                     warmup_ratio=0.05, progress=False, log_every=10),
                         pairs, _pairs(64, seed + 10, name))
        assert s["val_acc"] > 0.95, s
    _write(root / "prompts.jsonl", ps[:-32])
    _write(root / "val.jsonl", ps[-32:])
    _write(root / "sft.jsonl", sft[:200])
    return root


def _ppo(*args: str) -> dict:
    p = argparse.ArgumentParser()
    ppo.add_cli(p.add_subparsers())
    ns = p.parse_args(["ppo", *args])
    assert ns.func(ns) == 0
    return json.loads((Path(ns.out) / "summary.json").read_text())


def _common(world: Path, rm: str, out: Path, *extra: str) -> list[str]:
    return ["--actor", str(world / "sft"), "--reward", str(world / rm / "model"),
            "--prompts", str(world / "prompts.jsonl"), "--val-prompts", str(world / "val.jsonl"),
            "--out", str(out), "--rollout-batch", "32", "--micro-batch-size", "32",
            "--actor-lr", "3e-4", "--critic-lr", "2e-3", "--critic-warmup", "2", "--ppo-epochs", "2",
            "--max-new-tokens", "40", "--ptx-weight", "0", "--eval-temperature", "1.0", *extra]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ppo_raises_heldout_reward_with_bounded_kl(world, tmp_path):
    out = tmp_path / "ppo"
    _ppo(*_common(world, "rm_tiger", out, "--rounds", "1", "--iterations", "16", "--eval-every",
                  "4", "--eval-samples", "2", "--no-fastpath", "--no-progress"))
    recs = _metrics(out)
    val = [r["val_reward"] for r in recs if "val_reward" in r]
    assert recs[0]["step"] == 0 and len(val) == 5  # before training, then every 4 iterations
    assert val[-1] > val[0] + 0.5, val
    train = [r["reward"] for r in recs if r.get("phase") == "ppo"]
    assert sum(train[8:]) / 8 > sum(train[:8]) / 8
    # KL in nats per response (k1 against the reference). The SFT answer spreads each word
    # over 12 choices (ln 12 = 2.5 nats); collapsing onto one fixed answer would cost > 10
    # nats. Staying under 5 means the policy moved toward "tiger" without collapsing.
    kls = [r["kl"] for r in recs if r.get("phase") == "ppo"]
    assert max(kls) < 5.0, kls
    for k in ("entropy", "response_length", "value_loss", "clip_frac", "approx_kl", "policy_loss"):
        assert all(math.isfinite(r[k]) for r in recs if r.get("phase") == "ppo"), k
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()


@pytest.mark.slow
def test_reward_fn_hook_and_the_optional_pieces(world, tmp_path):
    """A reward function instead of a reward model (critic given), with value clipping,
    advantage whitening, k3 KL, two mini-batches and the ptx loss on SFT data."""
    seen = []

    def reward_fn(prompts, responses):
        seen.append(len(responses))
        return [float("tiger" in r.lower()) for r in responses]

    cfg = ppo.PPOConfig(rounds=1, iterations=2, critic_warmup=1, rollout_batch=8,
                        micro_batch_size=4, mini_batches=2, value_clip=0.2, whiten_advantages=True,
                        kl_kind="k3", actor_lr=1e-4, critic_lr=1e-4, ptx_batch=2, ptx_seq_len=128,
                        max_new_tokens=16, eval_temperature=0.0)
    s = ppo.run_ppo(cfg, actor=str(world / "sft"), reward=None, reward_fn=reward_fn,
                    critic=str(world / "rm_tiger" / "model"), prompts=str(world / "prompts.jsonl"),
                    val_prompts=str(world / "val.jsonl"), ptx_data=[str(world / "sft.jsonl")],
                    out=str(tmp_path / "hook"), progress=False)
    assert s["stopped"] is None and s["steps"] == 3 and s["reward_model"] is None
    assert seen[:2] == [32, 8]  # the held-out prompts (greedy), then a rollout batch
    recs = _metrics(tmp_path / "hook")
    assert recs[1]["phase"] == "critic_warmup" and "policy_loss" not in recs[1]
    for r in recs[2:]:
        assert r["kl"] >= 0  # k3 is non-negative
        assert all(math.isfinite(r[k]) for k in ("ptx_loss", "value_loss", "policy_loss", "entropy"))
    state = json.loads((tmp_path / "hook" / "round1" / "state.json").read_text())
    assert state["round"] == 1 and "pairs" in state  # fast path ran (report only: no model)
    with pytest.raises(ValueError, match="earlier run"):
        ppo.run_ppo(cfg, actor=str(world / "sft"), reward=None, reward_fn=reward_fn,
                    critic=str(world / "rm_tiger" / "model"), prompts=str(world / "prompts.jsonl"),
                    out=str(tmp_path / "hook"), progress=False)


def _tail_length(recs: list[dict], rnd: int, k: int = 3) -> float:
    xs = [r["response_length"] for r in recs if r.get("round") == rnd and "response_length" in r]
    return sum(xs[-k:]) / k


@pytest.mark.slow
def test_fast_path_finds_and_patches_a_length_hack(world, tmp_path):
    from internlm2.align.reward import RewardScorer
    out = tmp_path / "ppo"
    flags = ["--rounds", "2", "--iterations", "12", "--eval-every", "0", "--fastpath-prompts",
             "64", "--fastpath-min-pairs", "10", "--fastpath-lr", "1e-3", "--fastpath-epochs", "2",
             "--no-progress"]
    _ppo(*_common(world, "rm_length", out, *flags))
    r1 = json.loads((out / "round1" / "fastpath.json").read_text())
    found = {f["name"]: f for f in r1["findings"]}
    assert "length_explosion" in found, r1
    assert found["length_explosion"]["stats"]["ratio"] > 1.5 and found["length_explosion"]["pairs"] >= 10
    pairs = [json.loads(x) for x in (out / "round1" / "fastpath_pairs.jsonl").read_text().splitlines()]
    assert 10 <= len(pairs) <= 100
    assert all(len(p["chosen"][0]["content"]) < len(p["rejected"][0]["content"]) for p in pairs)
    state = json.loads((out / "round1" / "state.json").read_text())
    assert state["reward_model"] == str(out / "round1" / "rm" / "model")
    # patched: the new reward model prefers the early sample, the planted one did not
    new = RewardScorer(state["reward_model"]).score_pairs(pairs)
    old = RewardScorer(str(world / "rm_length" / "model")).score_pairs(pairs)
    assert sum(c > r for c, r in new) >= 0.9 * len(pairs)
    assert sum(c > r for c, r in old) <= 0.2 * len(pairs)
    # round 2 stops growing: no length explosion, and it ends no longer than round 1
    r2 = json.loads((out / "round2" / "fastpath.json").read_text())
    assert "length_explosion" not in {f["name"] for f in r2["findings"]}
    assert r2["late"]["mean_length"] <= r1["late"]["mean_length"]
    recs = _metrics(out)
    end1, end2 = _tail_length(recs, 1), _tail_length(recs, 2)
    assert end2 <= end1, (end1, end2)

    # control: round 2 again from the saved round 1, with the planted reward model kept
    ctrl = tmp_path / "control"
    shutil.copytree(out / "round1", ctrl / "round1")
    shutil.copy(out / "metrics.jsonl", ctrl / "metrics.jsonl")
    state["reward_model"] = str(world / "rm_length" / "model")
    (ctrl / "round1" / "state.json").write_text(json.dumps(state))
    _ppo(*_common(world, "rm_length", ctrl, *flags, "--no-fastpath", "--resume", "auto"))
    crecs = _metrics(ctrl)
    assert [r["step"] for r in crecs] == [r["step"] for r in recs]
    assert crecs[len(crecs) - 12]["response_length"] == recs[len(recs) - 12]["response_length"]
    ctrl_end = _tail_length(crecs, 2)
    assert ctrl_end > end1 and ctrl_end > 1.5 * end2, (end1, end2, ctrl_end)


@pytest.mark.slow
def test_two_ranks_under_torchrun(world, tmp_path):
    out = tmp_path / "ppo2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(29500 + os.getpid() % 1000), "-m", "internlm2.align.ppo",
           *_common(world, "rm_length", out), "--rounds", "2", "--iterations", "3",
           "--rollout-batch", "16", "--micro-batch-size", "4", "--critic-warmup", "1",
           "--actor-lr", "1e-3", "--ptx-data", str(world / "sft.jsonl"), "--ptx-weight", "0.5",
           "--ptx-batch", "2", "--ptx-seq-len", "128", "--eval-every", "2",
           "--fastpath-prompts", "16", "--fastpath-min-pairs", "2", "--length-factor", "1.01",
           "--length-min", "0", "--fastpath-lr", "1e-3", "--fastpath-batch", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = _metrics(out)
    assert [r["step"] for r in recs] == list(range(8))  # eval at 0, warm-up, 2 x 3 iterations
    ppo_recs = [r for r in recs if r.get("phase") == "ppo"]
    assert all("ptx_loss" in r and math.isfinite(r["ptx_loss"]) for r in ppo_recs)
    assert all(math.isfinite(r["kl"]) and math.isfinite(r["value_loss"]) for r in ppo_recs)
    assert (out / "model" / "config.json").exists() and (out / "round2" / "actor").is_dir()
    state = json.loads((out / "round1" / "state.json").read_text())
    assert state["pairs"] >= 2 and state["reward_model"].endswith("round1/rm/model"), state
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] is None and summary["steps"] == 7
