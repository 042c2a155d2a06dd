"""DPO: the losses against hand computations, the reply-only label mask against a manual sum
over the model's logits, truncation, the precomputed reference (loss = log 2 at step 0,
LoRA, --reference), and a tiny model learning an arithmetic preference through the CLI."""

import argparse
import json
import math
import random

import pytest
import torch

from internlm2.align import dpo
from internlm2.align.data import IGNORE_INDEX, DataFormatError
from internlm2.align.losses import dpo_loss
from internlm2.align.trainer import FinetuneArgs
from internlm2.chat_format import render_chat, render_chat_ids
from internlm2.config import ModelConfig
from internlm2.hf import load_model, save_model
from internlm2.model import build_model
from internlm2.tokenizer import train_tokenizer

CFG = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
STORY = ("Tell me a story about the quick brown fox.",
         "The quick brown fox jumps over the lazy dog and runs home.")

pytestmark = pytest.mark.usefixtures("one_thread")


def arith_pairs(n, seed):
    """Correct vs wrong sums of two digits 0-4 (25 prompts: learnable by a tiny model)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        wrong = rng.choice([k for k in range(10) if k != a + b])
        out.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                    "chosen": f"{a} plus {b} is {a + b}.",
                    "rejected": [{"role": "assistant", "content": f"{a} plus {b} is {wrong}."}],
                    "domain": "math"})
    return out


def story_pair():
    """A multi-turn prompt (its assistant turn must not count) and two replies."""
    return {"prompt": [{"role": "user", "content": "Hello there."},
                       {"role": "assistant", "content": "Hello! How can I help you today?"},
                       {"role": "user", "content": STORY[0]}],
            "chosen": STORY[1], "rejected": "I am not sure."}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    recs = arith_pairs(240, seed=0)
    texts = [render_chat(r["prompt"] + [{"role": "assistant", "content": r["chosen"]}])
             for r in recs] + [render_chat(story_pair()["prompt"]), *STORY, "I am not sure."]
    tok = train_tokenizer(texts * 3, vocab_size=512, output_dir=root / "tok")
    save_model(build_model(CFG, seed=0), root / "m", tokenizer=tok)
    save_model(build_model(CFG, seed=1), root / "other", tokenizer=tok)
    return {"root": root, "tok": tok, "model": root / "m", "other": root / "other",
            "train": recs[:200], "val": recs[200:]}


def ft_args(setup, out, **kw):
    base = {"model": str(setup["model"]), "out": str(out), "lr": 1e-3, "batch_size": 8,
            "micro_batch_size": 4, "progress": False, "warmup_ratio": 0.0}
    return FinetuneArgs(**{**base, **kw})


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- losses ----------------------------------------------------------------------------------

def test_sigmoid_loss_label_smoothing_and_rewards_by_hand():
    t = torch.tensor
    pi_c, pi_r = t([-5.0, -3.0]), t([-6.0, -2.0])
    ref_c, ref_r = t([-5.5, -3.0]), t([-5.0, -2.5])
    # log-ratios: chosen 0.5, 0.0; rejected -1.0, 0.5 -> margins 0.1 * 1.5, 0.1 * -0.5
    margins = [0.15, -0.05]
    for eps in (0.0, 0.2):
        want = [(1 - eps) * math.log(1 + math.exp(-m)) + eps * math.log(1 + math.exp(m))
                for m in margins]
        for fn in (dpo_loss, dpo.preference_loss):
            loss, cr, rr = fn(pi_c, pi_r, ref_c, ref_r, beta=0.1, label_smoothing=eps)
            torch.testing.assert_close(loss, t(want), atol=1e-6, rtol=0)
            torch.testing.assert_close(cr, t([0.05, 0.0]), atol=1e-6, rtol=0)
            torch.testing.assert_close(rr, t([-0.1, 0.05]), atol=1e-6, rtol=0)
    # equal log-ratios: log 2 whatever the smoothing
    loss, _, _ = dpo_loss(pi_c, pi_c, ref_c, ref_c, beta=0.3, label_smoothing=0.1)
    torch.testing.assert_close(loss, t([math.log(2)] * 2), atol=1e-6, rtol=0)


def test_ipo_loss_by_hand():
    t = torch.tensor
    loss, cr, rr = dpo.preference_loss(
        t([-5.0, -3.0]), t([-6.0, -2.0]), t([-5.5, -3.0]), t([-5.0, -2.5]), beta=0.1,
        loss="ipo", n_c=t([2, 4]), n_r=t([5, 1]))
    # per-token log-ratios: chosen 0.5/2, 0/4; rejected -1/5, 0.5/1; target 1 / (2 * 0.1) = 5
    want = [(0.25 - (-0.2) - 5.0) ** 2, (0.0 - 0.5 - 5.0) ** 2]  # 20.7025, 30.25
    torch.testing.assert_close(loss, t(want), atol=1e-5, rtol=0)
    torch.testing.assert_close(cr, t([0.025, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rr, t([-0.02, 0.05]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="token counts"):
        dpo.preference_loss(t([0.0]), t([0.0]), t([0.0]), t([0.0]), loss="ipo")
    with pytest.raises(ValueError, match="sigmoid, ipo"):
        dpo.preference_loss(t([0.0]), t([0.0]), t([0.0]), t([0.0]), loss="hinge")


# -- encoding ------------------------------------------------------------------------------

def manual_reply_logp(model, prompt_ids, reply_ids):
    """Sum of log p(reply token | everything before it), from the logits directly."""
    full = torch.tensor([prompt_ids + reply_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(full)[0].double(), -1)
    return sum(float(logp[j - 1, full[0, j]]) for j in range(len(prompt_ids), full.shape[1]))


def test_summed_logprobs_cover_exactly_the_reply(setup):
    tok = setup["tok"]
    rec = story_pair()
    ex, status = dpo.encode_pair(rec, tok, max_len=1024)
    assert status == "ok"
    head, _ = render_chat_ids(rec["prompt"], tok, add_generation_prompt=True)
    model = load_model(setup["model"])
    want = {}
    for side in ("chosen", "rejected"):
        reply = tok.encode(rec[side] + "<|im_end|>", add_bos=False)
        full = head + reply
        assert ex[f"{side}_ids"].tolist() == full[:-1]
        labels = ex[f"{side}_labels"].tolist()
        trained = [i for i, v in enumerate(labels) if v != IGNORE_INDEX]
        # positions predicting the reply tokens, and nothing else (not the prompt's assistant turn)
        assert trained == list(range(len(head) - 1, len(full) - 1))
        assert [labels[i] for i in trained] == reply
        assert tok.decode([reply[-1]]) == "<|im_end|>"
        want[side] = manual_reply_logp(model, head, reply)
    # a second, shorter pair in the batch: right padding must not change anything
    short, _ = dpo.encode_pair(arith_pairs(1, seed=5)[0], tok)
    batch = dpo.collate([ex, short], pad_id=tok.pad_id)
    assert batch["input_ids"].shape[0] == 4
    with torch.no_grad():
        lp, n = dpo.sequence_logps(model, batch)
    assert abs(float(lp[0]) - want["chosen"]) < 1e-4
    assert abs(float(lp[2]) - want["rejected"]) < 1e-4
    assert n[0] == len(tok.encode(rec["chosen"] + "<|im_end|>", add_bos=False))


def test_truncation_keeps_the_reply_and_drops_what_cannot_fit(setup):
    tok = setup["tok"]
    rec = story_pair()
    rec["prompt"][0]["content"] = " ".join(["Hello there."] * 40)
    full, _ = dpo.encode_pair(rec, tok, max_len=1024)
    ex, status = dpo.encode_pair(rec, tok, max_len=48)
    assert status == "truncated"
    for side in ("chosen", "rejected"):
        ids, labels = ex[f"{side}_ids"].tolist(), ex[f"{side}_labels"].tolist()
        assert len(ids) + 1 <= 48 and ids[0] == tok.bos_id
        n = len(full[f"{side}_ids"])
        keep = len(ids) - 1  # everything after <s>: the prompt's newest tokens and the reply
        assert ids[1:] == full[f"{side}_ids"].tolist()[n - keep:]
        assert labels == full[f"{side}_labels"].tolist()[n - keep - 1:]
    # the longer side fills max_len; both keep the same prompt tokens
    assert max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) + 1 == 48
    pc = (ex["chosen_labels"] != IGNORE_INDEX).argmax()
    pr = (ex["rejected_labels"] != IGNORE_INDEX).argmax()
    assert ex["chosen_ids"][:pc].tolist() == ex["rejected_ids"][:pr].tolist()
    assert dpo.encode_pair(rec, tok, max_len=8) == (None, "too_long")
    long = story_pair()
    long["chosen"] = " ".join([STORY[1]] * 5)
    exs, info = dpo.encode_pairs([long, rec, arith_pairs(1, seed=3)[0]], tok, max_len=48)
    assert len(exs) == 2 and info["pairs"] == 2
    assert info["dropped_too_long"] == 1 and info["truncated"] == 1


def test_invalid_records_are_reported(setup, tmp_path):
    bad = arith_pairs(2, seed=1)
    bad[1]["rejected"] = bad[1]["chosen"]
    with pytest.raises(DataFormatError, match="data:2: rejected: is identical to chosen"):
        dpo.train_dpo(ft_args(setup, tmp_path / "x"), bad, tokenizer=setup["tok"])
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(arith_pairs(1, seed=1)[0]) + "\n{oops\n")
    with pytest.raises(DataFormatError, match="p.jsonl:2: not valid JSON"):
        dpo.load_pairs([f])


def test_synth_preference_pairs_encode(setup):
    synth = pytest.importorskip("internlm2.align.synth")
    recs = synth.preference_records(40, seed=0)
    exs, info = dpo.encode_pairs(recs, setup["tok"], max_len=1024)
    assert info["pairs"] == 40 and info["truncated"] == 0
    assert all((e[f"{s}_labels"] != IGNORE_INDEX).any() for e in exs for s in ("chosen", "rejected"))


# -- the reference ---------------------------------------------------------------------------

def test_policy_equals_precomputed_reference_at_step_0(setup):
    tok = setup["tok"]
    recs = setup["train"][:12] + [story_pair()]
    exs, _ = dpo.encode_pairs(recs, tok, max_len=1024)
    model = load_model(setup["model"])
    dpo.compute_reference(model, exs, batch_size=5, pad_id=tok.pad_id)
    # the stored values are the model's own, whatever the batching
    for e in exs[:3] + exs[-1:]:
        with torch.no_grad():
            lp, _ = dpo.sequence_logps(model, dpo.collate([e], tok.pad_id))
        assert abs(float(lp[0]) - e["ref_chosen"]) < 1e-4
        assert abs(float(lp[1]) - e["ref_rejected"]) < 1e-4
    stats = {}
    loss_fn = dpo.make_loss_fn(beta=0.1, label_smoothing=0.1, stats=stats)
    batch = dpo.collate(exs, tok.pad_id)
    with torch.no_grad():
        loss, count = loss_fn(model, batch)
        once = {k: float(v) for k, v in stats.items()}
        loss_fn(model, batch)  # stats accumulate over micro-batches
    assert int(count) == len(exs) and int(dpo.count_pairs(batch)) == len(exs)
    assert abs(float(loss) / len(exs) - math.log(2)) < 1e-5
    assert float(stats["margin"]) == pytest.approx(0.0, abs=1e-4)
    assert float(stats["chosen_reward"]) == pytest.approx(2 * once["chosen_reward"], abs=1e-6)
    assert set(stats) == {"reward_accuracy", "chosen_reward", "rejected_reward", "margin"}
    ev = dpo.evaluate_pairs(model, exs, batch_size=4, pad_id=tok.pad_id)
    assert abs(ev["loss"] - math.log(2)) < 1e-5 and abs(ev["margin"]) < 1e-5
    assert abs(ev["chosen_logp_change"]) < 1e-4 and abs(ev["rejected_logp_change"]) < 1e-4

    # the RPO term: weight * mean NLL of each chosen reply, added per pair
    sft_stats = {}
    with torch.no_grad():
        with_sft, _ = dpo.make_loss_fn(sft_weight=0.5, stats=sft_stats)(model, batch)
        plain, _ = dpo.make_loss_fn()(model, batch)
        lp, n = dpo.sequence_logps(model, batch)
    b = len(exs)
    nll = (-lp[:b] / n[:b]).sum()
    assert float(with_sft - plain) == pytest.approx(0.5 * float(nll), rel=1e-5)
    assert float(sft_stats["chosen_nll"]) == pytest.approx(float(nll), rel=1e-5)


def test_training_starts_at_log2_full_lora_and_other_reference(setup, tmp_path):
    tok = setup["tok"]
    long = story_pair()
    long["chosen"] = " ".join([STORY[1]] * 80)  # does not fit in max_len 256
    recs = setup["train"][:15] + [long]
    s = dpo.train_dpo(ft_args(setup, tmp_path / "full", max_steps=2), recs, setup["val"][:6],
                      tokenizer=tok, beta=0.1, label_smoothing=0.1, max_len=256)
    first = metrics(tmp_path / "full")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-5 and abs(first["train_margin"]) < 1e-5
    assert s["pairs"] == 15 and s["dropped_too_long"] == 1 and s["steps"] == 2
    assert {"val_reward_accuracy", "val_margin", "val_chosen_logp_change"} <= set(s)

    s = dpo.train_dpo(ft_args(setup, tmp_path / "lora", max_steps=2, lora_r=4), recs,
                      tokenizer=tok, loss="ipo", sft_weight=0.1)
    first = metrics(tmp_path / "lora")[0]
    # ipo at step 0: (0 - 1/(2 beta))^2 = 25; the RPO term adds 0.1 * the chosen NLL
    assert first["loss"] == pytest.approx(25.0 + 0.1 * first["train_chosen_nll"], abs=1e-4)
    assert (tmp_path / "lora" / "adapter").is_dir()
    load_model(s["model"])

    s = dpo.train_dpo(ft_args(setup, tmp_path / "ref", max_steps=1), recs[:8], tokenizer=tok,
                      reference=setup["other"])
    assert s["reference"] == str(setup["other"])
    assert abs(metrics(tmp_path / "ref")[0]["loss"] - math.log(2)) > 1e-3


# -- learning, through the CLI ----------------------------------------------------------------

def test_cli_learns_an_arithmetic_preference(setup, tmp_path):
    for name in ("train", "val"):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in setup[name]))
    out = tmp_path / "out"
    p = argparse.ArgumentParser()
    dpo.add_cli(p.add_subparsers())
    args = p.parse_args([
        "dpo", "--model", str(setup["model"]), "--data", str(tmp_path / "train.jsonl"),
        "--val-data", str(tmp_path / "val.jsonl"), "--out", str(out), "--lr", "1e-3",
        "--epochs", "8", "--batch-size", "16", "--micro-batch-size", "8", "--beta", "0.1",
        "--warmup-ratio", "0", "--no-progress"])
    assert args.func(args) == 0
    s = json.loads((out / "summary.json").read_text())
    m = metrics(out)
    assert len(m) == s["steps"] == 8 * 13
    assert abs(m[0]["loss"] - math.log(2)) < 1e-5
    late = sum(r["train_margin"] for r in m[-13:]) / 13
    assert abs(m[0]["train_margin"]) < 1e-5 and late > 0.5
    assert s["val_reward_accuracy"] >= 0.8 and s["val_margin"] > 0.5
    trained = load_model(out / "model")
    assert trained.config.vocab_size == 512
    # the saved model scores the held-out pairs as the run's last evaluation did
    exs, _ = dpo.encode_pairs(setup["val"], setup["tok"], max_len=1024)
    dpo.compute_reference(load_model(setup["model"]), exs, pad_id=setup["tok"].pad_id)
    ev = dpo.evaluate_pairs(trained, exs, pad_id=setup["tok"].pad_id)
    assert ev["reward_accuracy"] == pytest.approx(s["val_reward_accuracy"])
    assert ev["margin"] == pytest.approx(s["val_margin"], abs=1e-4)


def test_cli_defaults():
    p = argparse.ArgumentParser()
    dpo.add_cli(p.add_subparsers())
    a = p.parse_args(["dpo", "--model", "m", "--data", "d.jsonl", "--out", "o"])
    assert (a.lr, a.epochs, a.batch_size, a.micro_batch_size) == (5e-7, 1.0, 16, 2)
    assert (a.beta, a.label_smoothing, a.max_len, a.reference, a.loss, a.sft_weight) == \
        (0.1, 0.0, 1024, None, "sigmoid", 0.0)
    assert a.func is dpo.main
