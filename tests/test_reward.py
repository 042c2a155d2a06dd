"""Reward model (COOL RLHF): the focal ranking loss and the log barrier against hand
computations, the head read at the last real token with either padding, the saved folder,
a tiny model learning an arithmetic preference (and being patched again, as the PPO Fast
Path does), the domain system prompt flipping a preference, the CLI and bad data."""

import argparse
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from internlm2.align import reward
from internlm2.align.data import DataFormatError, domain_prompt, encode_reward
from internlm2.align.losses import (
    focal_ranking_loss,
    log_barrier_penalty,
    reward_model_loss,
)
from internlm2.align.trainer import setup_env
from internlm2.chat_format import render_chat
from internlm2.config import ModelConfig
from internlm2.hf import load_model, model_class, save_model
from internlm2.model import InternLM2ForRewardModel, build_model
from internlm2.tokenizer import train_tokenizer

CFG = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
OFFSETS = (-3, -2, -1, 1, 2, 3)
TRIPLES = [(a, b, k) for a in range(1, 6) for b in range(1, 6) for k in OFFSETS]
# 30 of the 150 (a, b, wrong answer) pairs are never trained on: validation only.
HELD = set(random.Random(7).sample(TRIPLES, 30))
COLORS = ("red", "blue", "green", "yellow", "black", "white", "small", "big")
THINGS = ("apple", "river", "garden", "train", "violin", "castle", "forest", "kitten", "rocket",
          "bridge", "island", "teapot")
TOPICS = [f"{c} {t}" for c in COLORS for t in THINGS]  # 96

pytestmark = pytest.mark.usefixtures("one_thread")


def arith_pair(a, b, k):
    return {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
            "chosen": f"{a} + {b} = {a + b}", "rejected": f"{a} + {b} = {a + b + k}",
            "domain": "math"}


def arith_pairs(n, seed, held):
    """n pairs (correct sum chosen, wrong sum rejected) drawn from the held / not held ones."""
    pool = [t for t in TRIPLES if (t in HELD) == held]
    rng = random.Random(seed)
    return [arith_pair(*rng.choice(pool)) for _ in range(n)]


def short_long(topic):
    return (f"The {topic} is nice.",
            f"The {topic} is nice because many people enjoy the {topic} every day and it makes "
            + "them happy.")


def style_pair(topic, domain):
    """domain "concise" prefers the short reply, "detailed" the long one, same prompt."""
    short, long = short_long(topic)
    good, bad = (short, long) if domain == "concise" else (long, short)
    return {"prompt": [{"role": "user", "content": f"Tell me about the {topic}."}],
            "chosen": good, "rejected": bad, "domain": domain}


@pytest.fixture(scope="module")
def env():
    return setup_env()  # once per process; train_reward gets it passed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    recs = [arith_pair(*t) for t in TRIPLES] + [style_pair(t, d) for t in TOPICS
                                                 for d in ("concise", "detailed")]
    texts = [render_chat([{"role": "system", "content": domain_prompt(r["domain"])},
                          *r["prompt"], {"role": "assistant", "content": r[side]}])
             for r in recs for side in ("chosen", "rejected")]
    tok = train_tokenizer(texts * 2, vocab_size=512, output_dir=root / "tok")
    save_model(build_model(CFG, seed=0), root / "sft", tokenizer=tok)
    return {"root": root, "tok": tok, "sft": root / "sft"}


def ft_args(model, out, **kw):
    base = {"model": str(model), "out": str(out), "lr": 2e-3, "min_lr": 2e-4, "batch_size": 32,
            "micro_batch_size": 32, "progress": False, "warmup_ratio": 0.05}
    return reward.reward_args(**{**base, **kw})


@pytest.fixture(scope="module")
def arith_rm(setup, env):
    """A reward model trained on 800 arithmetic pairs (4 epochs, no domain prompt)."""
    out = setup["root"] / "rm_arith"
    summary = reward.train_reward(ft_args(setup["sft"], out, epochs=4),
                                  arith_pairs(800, 0, held=False), arith_pairs(100, 1, held=True),
                                  tokenizer=setup["tok"], max_len=128, use_domain=False, env=env)
    return out / "model", summary


# -- losses ------------------------------------------------------------------------------------

def test_focal_ranking_loss_by_hand():
    diffs = [-1.0, 0.0, 0.5, 2.0]
    rc = torch.tensor(diffs) + 0.3
    rr = torch.full((4,), 0.3)
    plain = focal_ranking_loss(rc, rr, gamma=0.0)
    focal = focal_ranking_loss(rc, rr, gamma=2.0)
    # -log sigmoid(d); weight (1 - 2 max(0, P - 1/2))^2 with P = sigmoid(d)
    torch.testing.assert_close(plain, torch.tensor([1.313262, 0.693147, 0.474077, 0.126928]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(focal, torch.tensor([1.313262, 0.693147, 0.270293, 0.0072143]),
                               atol=1e-5, rtol=0)
    for d, got in zip(diffs, focal.tolist()):
        p = 1 / (1 + math.exp(-d))
        assert got == pytest.approx(-(1 - 2 * max(0.0, p - 0.5)) ** 2 * math.log(p), abs=1e-6)
    # pairs ranked wrong or tied keep the full weight; easy pairs fade
    assert focal[0] == plain[0] and focal[1] == plain[1] and focal[3] < plain[3] / 10


def test_log_barrier_by_hand_and_gradient_points_inward():
    r = torch.tensor([0.0, 4.9, -4.9, 6.0, -6.0, 3.0, -3.0], requires_grad=True)
    b = log_barrier_penalty(r)
    edge = -(math.log(9.999) + math.log(0.001))  # at +-(5 - 1e-3), slope 1/0.001 - 1/9.999
    want = [-2 * math.log(5), -(math.log(9.9) + math.log(0.1)), -(math.log(9.9) + math.log(0.1)),
            edge + 1.001 * (1000 - 1 / 9.999), edge + 1.001 * (1000 - 1 / 9.999),
            -(math.log(8) + math.log(2)), -(math.log(8) + math.log(2))]
    assert b.tolist() == pytest.approx(want, rel=1e-4, abs=1e-5)  # fp32 near the edge
    assert b[1].item() == pytest.approx(0.0100503, abs=1e-5)
    assert b[0].item() == pytest.approx(-3.2188758, abs=1e-6) and b.min() == b[0]
    b.sum().backward()
    g = r.grad.tolist()
    assert g[0] == 0.0
    # gradient descent moves every score toward 0: positive gradient above, negative below
    assert all(g[i] > 0 for i in (1, 3, 5)) and all(g[i] < 0 for i in (2, 4, 6))
    assert g[3] == pytest.approx(1000 - 1 / 9.999, rel=1e-4)  # the linear continuation's slope
    assert torch.isfinite(log_barrier_penalty(torch.tensor([1e6, -1e6]))).all()


def test_reward_model_loss_combines_both():
    rc, rr = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    got = reward_model_loss(rc, rr, gamma=2.0, barrier_weight=0.02)
    want = focal_ranking_loss(rc, rr, 2.0) + 0.02 * (log_barrier_penalty(rc) + log_barrier_penalty(rr))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(reward_model_loss(rc, rr, barrier_weight=0), focal_ranking_loss(rc, rr))


# -- the head ----------------------------------------------------------------------------------

def test_score_reads_last_real_token_left_or_right_padding(setup):
    model = reward.init_reward_model(setup["sft"], setup["tok"], seed=3).eval()
    rt = model.config.extra["reward_token_id"]
    rec = style_pair("red apple", "concise")
    long_ids = encode_reward(rec["prompt"], rec["rejected"], setup["tok"], reward_token=rt,
                             domain="concise")
    ids = encode_reward(rec["prompt"], rec["chosen"], setup["tok"], reward_token=rt)
    assert ids[-1] == rt and len(long_ids) > len(ids) + 5
    with torch.no_grad():
        alone = model.score(torch.tensor([ids]))
        out = {}
        for left in (False, True):
            for pad in (2, 7):
                x = torch.full((2, len(long_ids)), pad)
                mask = torch.zeros_like(x)
                x[0] = torch.tensor(long_ids)
                mask[0] = 1
                sl = slice(len(long_ids) - len(ids), None) if left else slice(0, len(ids))
                x[1, sl] = torch.tensor(ids)
                mask[1, sl] = 1
                out[left, pad] = model.score(x, attention_mask=mask)
    for s in out.values():
        torch.testing.assert_close(s[1:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[False, 2], out[False, 7], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[True, 2], out[True, 7], atol=1e-6, rtol=0)
    assert abs(out[False, 2][0] - out[False, 2][1]) > 1e-4  # two different sequences


def test_init_save_and_reload(setup, tmp_path):
    model = reward.init_reward_model(setup["sft"], setup["tok"], seed=0)
    assert isinstance(model, InternLM2ForRewardModel) and not hasattr(model, "output")
    std = model.v_head.weight.std().item()
    assert 0.5 / math.sqrt(65) < std < 1.6 / math.sqrt(65)
    again = reward.init_reward_model(setup["sft"], setup["tok"], seed=0)
    other = reward.init_reward_model(setup["sft"], setup["tok"], seed=1)
    assert torch.equal(model.v_head.weight, again.v_head.weight)
    assert not torch.equal(model.v_head.weight, other.v_head.weight)
    sft = load_model(setup["sft"])
    assert torch.equal(model.model.layers[1].attention.wqkv.weight,
                       sft.model.layers[1].attention.wqkv.weight)

    save_model(model, tmp_path / "rm", tokenizer=setup["tok"])
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"] == ["InternLM2ForRewardModel"]
    assert cfg["reward_token_id"] == setup["tok"].token_to_id("[UNUSED_TOKEN_0]")
    weights = load_file(tmp_path / "rm" / "model.safetensors")
    assert weights["v_head.weight"].shape == (1, 64) and "output.weight" not in weights
    assert model_class(tmp_path / "rm") is InternLM2ForRewardModel
    back = reward.init_reward_model(tmp_path / "rm", setup["tok"], seed=5)  # loaded, not re-headed
    items = [{"messages": [*style_pair(t, "detailed")["prompt"],
                           {"role": "assistant", "content": short_long(t)[1]}],
              "domain": "detailed"} for t in TOPICS[:5]]
    s1 = reward.RewardScorer(model.eval(), setup["tok"]).score(items, batch_size=2)
    s2 = reward.RewardScorer(back, setup["tok"]).score(items)
    s3 = reward.RewardScorer(tmp_path / "rm").score(items)
    assert s2 == s3 and s1 == pytest.approx(s2, abs=1e-5) and len(set(s1)) == 5
    with pytest.raises(ValueError, match="not a reward model"):
        reward.RewardScorer(setup["sft"])


# -- training ------------------------------------------------------------------------------------

def test_learns_arithmetic_preference(arith_rm, setup):
    path, summary = arith_rm
    assert summary["val_pairs"] == 100 and summary["steps"] == 100
    assert summary["val_acc"] >= 0.8, summary
    assert summary["val_acc"] == summary["val_acc_math"]
    assert summary["val_chosen"] > summary["val_rejected"] and summary["val_abs"] < 5
    log = [json.loads(x) for x in (path.parent / "metrics.jsonl").read_text().splitlines()]
    assert {"train_acc", "train_chosen", "train_rejected"} <= set(log[-1])
    assert sum(r["train_acc"] for r in log[-10:]) / 10 > sum(r["train_acc"] for r in log[:10]) / 10
    # the saved model gives the same accuracy through the scorer (no domain prompt either)
    scorer = reward.RewardScorer(path, use_domain=False)
    pairs = scorer.score_pairs(arith_pairs(100, 1, held=True), batch_size=16)
    assert sum(c > r for c, r in pairs) / 100 == pytest.approx(summary["val_acc"])
    assert all(-5 < s < 5 for p in pairs for s in p)


def test_fast_path_patches_a_reward_model_with_a_few_pairs(arith_rm, setup, env, tmp_path):
    path, _ = arith_rm
    before = reward.RewardScorer(path, use_domain=False).score_pairs([arith_pair(1, 1, 3)])[0]
    few = [arith_pair(1, 1, 3)] * 4 + [arith_pair(2, 3, -1)] * 2
    for i in range(2):  # twice in one process, each into its own folder
        s = reward.train_reward(ft_args(path, tmp_path / f"patch{i}", lr=1e-3, epochs=3),
                                few, few[:2], tokenizer=setup["tok"], max_len=128,
                                use_domain=False, env=env)
        assert s["steps"] == 3 and s["val_pairs"] == 2
        assert model_class(s["model"]) is InternLM2ForRewardModel
        path = s["model"]
    after = reward.RewardScorer(path, use_domain=False).score_pairs([arith_pair(1, 1, 3)])[0]
    assert after[0] - after[1] > before[0] - before[1]


def test_domain_prompt_flips_the_preference(setup, env, tmp_path):
    train, held = TOPICS[:76], TOPICS[76:]
    recs = [style_pair(t, d) for t in train for d in ("concise", "detailed")]
    val = [style_pair(t, d) for t in held for d in ("concise", "detailed")]
    s = reward.train_reward(ft_args(setup["sft"], tmp_path / "rm", epochs=6), recs, val,
                            tokenizer=setup["tok"], max_len=128, env=env)
    assert s["val_acc_concise"] >= 0.8 and s["val_acc_detailed"] >= 0.8, s
    scorer = reward.RewardScorer(s["model"])
    items = [{"messages": [*style_pair(t, "concise")["prompt"],
                           {"role": "assistant", "content": reply}]}
             for t in held for reply in short_long(t)]
    for domain, sign in (("concise", 1), ("detailed", -1)):
        sc = scorer.score(items, batch_size=8, domain=domain)
        ok = [sign * (sc[i] - sc[i + 1]) > 0 for i in range(0, len(sc), 2)]
        assert sum(ok) / len(ok) >= 0.8, (domain, sc)


# -- CLI and data ----------------------------------------------------------------------------------

def cli(argv):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    reward.add_cli(sub)
    args = p.parse_args(argv)
    return args.func(args)


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return path


def test_cli_score_writes_scores(arith_rm, tmp_path, capsys):
    path, _ = arith_rm
    pairs = arith_pairs(20, 3, held=True)
    try:
        from internlm2.align.synth import preference_records
        pairs += preference_records(8, seed=0)
    except (ImportError, AttributeError, TypeError):  # written by another engineer
        pairs += [style_pair(t, "helpful") for t in TOPICS[:8]]
    src = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert cli(["reward", "score", "--model", str(path), "--input", str(src), "--output",
                str(tmp_path / "out.jsonl"), "--batch-size", "4", "--no-domain"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == len(pairs) and rows[0]["prompt"] == pairs[0]["prompt"]
    assert all(set(r) >= {"chosen_score", "rejected_score", "correct"} for r in rows)
    assert all(r["correct"] == (r["chosen_score"] > r["rejected_score"]) for r in rows)
    acc = sum(r["correct"] for r in rows[:20]) / 20
    assert acc >= 0.7
    text = capsys.readouterr().out
    assert "accuracy" in text and "  math:" in text and "mean score" in text

    convo = [{"messages": [*p["prompt"], {"role": "assistant", "content": p["chosen"]}],
              "domain": "math"} for p in pairs[:5]]
    src = write_jsonl(tmp_path / "convo.jsonl", convo)
    assert cli(["reward", "score", "--model", str(path), "--input", str(src)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "convo.scores.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(isinstance(r["score"], float) for r in rows)
    scorer = reward.RewardScorer(path)
    assert [r["score"] for r in rows] == pytest.approx(scorer.score(convo), abs=1e-5)


def test_cli_train_and_bad_data(setup, tmp_path):
    good = [style_pair(t, "concise") for t in TOPICS[:6]]
    bad = dict(good[1], prompt=[{"role": "assistant", "content": "hi"}])
    src = write_jsonl(tmp_path / "bad.jsonl", [good[0], bad, good[2]])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: prompt\[0\]\.role"):
        reward.load_pairs([src])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2"):
        cli(["reward", "train", "--model", str(setup["sft"]), "--data", str(src), "--out",
             str(tmp_path / "x")])
    with pytest.raises(DataFormatError, match=r"records:3: rejected: is identical"):
        reward.check_records(good[:2] + [dict(good[0], rejected=good[0]["chosen"])])

    data = write_jsonl(tmp_path / "good.jsonl", good)
    out = tmp_path / "rm"
    assert cli(["reward", "train", "--model", str(setup["sft"]), "--data", str(data),
                "--val-data", str(data), "--out", str(out), "--batch-size", "4",
                "--max-steps", "2", "--no-progress", "--max-len", "64"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["stage"] == "reward" and "val_acc_concise" in summary
    args = json.loads((out / "args.json").read_text())
    assert (args["lr"], args["min_lr"], args["weight_decay"]) == (1e-5, 5e-6, 0.01)
    assert summary["gamma"] == 2.0 and summary["barrier_weight"] == 0.02
    assert json.loads((out / "model" / "config.json").read_text())["architectures"] == \
        ["InternLM2ForRewardModel"]
