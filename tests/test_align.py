"""Alignment data and SFT: formats and their checks, loss masks, packing, the fine-tuning runner
(resume, LoRA), and SFT on generated conversations (chat format followed, valid tool JSON)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import mask_runs

from internlm2.align import data as D
from internlm2.align import losses as L
from internlm2.chat_format import render_chat
from internlm2.config import ModelConfig
from internlm2.hf import load_model, save_model
from internlm2.model import build_model
from internlm2.tokenizer import load_tokenizer, official_tokenizer_path, train_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
ROOT = Path(__file__).resolve().parents[1]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]

MULTI_TURN = {"messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And 3 + 5?"},
    {"role": "assistant", "content": "3 + 5 = 8."},
]}
TOOL_CONV = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
]}
# The assistant output each conversation must be trained on, written out by hand.
EXPECTED = {
    "multi": ["2 + 2 = 4.<|im_end|>", "3 + 5 = 8.<|im_end|>"],
    "tool": [("Let me check.<|action_start|><|plugin|>\n{\"name\": \"get_weather\", "
              "\"parameters\": {\"city\": \"Paris\"}}<|action_end|><|im_end|>"),
             "It is 21 degrees in Paris.<|im_end|>"],
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = official_tokenizer_path()
    if path is not None:
        return load_tokenizer(path)
    text = "\n".join(render_chat(c["messages"], tools=c.get("tools"))
                     for c in (MULTI_TURN, TOOL_CONV)) * 20
    return train_tokenizer([text], vocab_size=512)



@pytest.mark.parametrize("name,conv", [("multi", MULTI_TURN), ("tool", TOOL_CONV)])
def test_loss_mask_covers_exactly_the_assistant_output(tok, name, conv):
    e = D.encode_sft(conv, tok)
    runs = [tok.decode(r) for r in mask_runs(e.ids, e.mask)]
    assert runs == EXPECTED[name]
    # and the ids are the tokenization of the official rendering
    assert tok.decode(e.ids) == render_chat(conv["messages"], tools=conv.get("tools"),
                                            add_generation_prompt=False)


def test_loss_false_turn_is_not_trained(tok):
    conv = json.loads(json.dumps(MULTI_TURN))
    conv["messages"][2]["loss"] = False
    e = D.encode_sft(conv, tok)
    assert [tok.decode(r) for r in mask_runs(e.ids, e.mask)] == ["3 + 5 = 8.<|im_end|>"]


def test_validation_names_line_and_field(tmp_path):
    good = json.dumps(MULTI_TURN)
    bad_args = json.loads(json.dumps(TOOL_CONV))
    bad_args["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{city: Paris"
    lines = [good, "{not json", json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
             json.dumps(bad_args), "", json.dumps({"messages": [{"role": "user", "content": "hi"}]})]
    f = tmp_path / "sft.jsonl"
    f.write_text("\n".join(lines) + "\n")
    count, problems = D.check_file(f, "sft")
    assert count == 5
    got = {(p.line, p.field) for p in problems}
    assert (2, "") in got
    assert (3, "messages[0].role") in got
    assert (4, "messages[1].tool_calls[0].function.arguments") in got
    assert (6, "messages") in got  # no assistant turn to train on
    assert len(problems) == 4
    with pytest.raises(D.DataFormatError, match=r"sft.jsonl:4: messages\[1\]"):
        D.load_records(f, "sft")

    pref = tmp_path / "pref.jsonl"
    pref.write_text("\n".join([
        json.dumps({"prompt": [{"role": "user", "content": "1+1?"}], "chosen": "2",
                    "rejected": "3", "domain": "math"}),
        json.dumps({"prompt": [{"role": "user", "content": "1+1?"}], "chosen": "2",
                    "rejected": "2"}),
        json.dumps({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a",
                    "rejected": "b", "domain": 3}),
    ]) + "\n")
    _, problems = D.check_file(pref, "pref")
    assert {(p.line, p.field) for p in problems} == {(2, "rejected"), (3, "prompt[0].role"),
                                                     (3, "domain")}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                   "domain": "helpful"}) + "\n")
    assert D.check_file(prompts, "prompt") == (1, [])


def test_data_check_cli(tmp_path, capsys):
    from internlm2.cli import main
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps(MULTI_TURN) + "\n" + json.dumps({"messages": []}) + "\n")
    assert main(["data", "check", str(f), "--kind", "sft"]) == 1
    out = capsys.readouterr()
    assert f"{f}:2: messages: must be a non-empty list" in out.out
    f.write_text(json.dumps(MULTI_TURN) + "\n")
    assert main(["data", "check", str(f), "--kind", "sft"]) == 0


def test_packing_keeps_conversations_apart(tok):
    convs = [MULTI_TURN, TOOL_CONV] * 5
    enc, stats = D.encode_all(convs, tok, max_len=256)
    rows = D.pack_conversations(enc, 256, seed=1, pad_id=tok.pad_id)
    assert stats["conversations"] == 10
    # every target token appears exactly once, with its own next-token label
    total_targets = sum(int((r["labels"] != D.IGNORE_INDEX).sum()) for r in rows)
    assert total_targets == sum(sum(e.mask[1:]) for e in enc)
    assert len(rows) < len(enc)  # several conversations share a row
    for r in rows:
        docs = r["doc_ids"]
        # within a segment, input i+1 is the label of position i wherever that is trained
        for i in range(len(docs) - 1):
            if docs[i] == docs[i + 1] and r["labels"][i] != D.IGNORE_INDEX:
                assert r["labels"][i] == r["input_ids"][i + 1]
    # the model sees a packed row exactly as the conversations one by one
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = build_model(cfg, seed=0).eval()
    row = rows[0]
    batch = D.collate([row])
    with torch.no_grad():
        packed = model(batch["input_ids"], doc_ids=batch["doc_ids"])[0]
        for d in sorted(set(row["doc_ids"].tolist()))[:-1]:
            sel = torch.from_numpy(row["doc_ids"] == d)
            alone = model(batch["input_ids"][:, sel])[0]
            torch.testing.assert_close(packed[sel], alone, atol=2e-5, rtol=1e-4)


def test_cut_conversations_are_counted(tok):
    long = {"messages": [{"role": "user", "content": "word " * 200},
                         {"role": "assistant", "content": "ok " * 50}]}
    enc, stats = D.encode_all([long, MULTI_TURN], tok, max_len=64)
    assert stats["truncated"] >= 1 and all(len(e) <= 65 for e in enc)


# -- losses ---------------------------------------------------------------------------------

def test_token_logprobs_and_entropy_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [1.0, 1.0]]])
    labels = torch.tensor([[1, -100]])
    lp = L.token_logprobs(logits, labels)
    assert lp[0, 0].item() == pytest.approx(math.log(0.75))
    assert lp[0, 1].item() == 0.0
    ent = L.token_entropy(logits)
    assert ent[0, 1].item() == pytest.approx(math.log(2))
    assert ent[0, 0].item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    w = L.masked_whiten(x, m)
    assert w[0, 3] == 0
    assert L.masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)
    assert float((w[0, :3] ** 2).mean()) == pytest.approx(1.0, rel=1e-4)


# -- the runner: SFT end to end ---------------------------------------------------------------

def _conversations(n: int, seed: int = 0) -> list[dict]:
    from internlm2.align.synth import sft_records
    return sft_records(n, seed=seed)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base model with a tokenizer trained on the generated conversations."""
    root = tmp_path_factory.mktemp("align")
    recs = _conversations(1200)
    text = [render_chat(r["messages"], tools=r.get("tools")) for r in recs]
    tok = train_tokenizer(text, vocab_size=1024, output_dir=root / "tok")
    cfg = ModelConfig(vocab_size=1024, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024)
    save_model(build_model(cfg, seed=0), root / "base", tokenizer=tok)
    from internlm2.align.synth import write_jsonl
    write_jsonl(root / "sft.jsonl", recs[:1100])
    write_jsonl(root / "sft_val.jsonl", recs[1100:])
    return root


def _sft(args: list[str]) -> dict:
    from internlm2.align import sft
    p = argparse.ArgumentParser()
    sft.add_cli(p.add_subparsers())
    ns = p.parse_args(["sft", *args])
    assert ns.func(ns) == 0
    out = Path(ns.out)
    return json.loads((out / "summary.json").read_text())


WEATHER_TOOL = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CITIES = ["Paris", "Tokyo", "Berlin", "Rome", "Cairo", "Lima", "Oslo", "Seoul", "Delhi", "Quito",
          "Dakar", "Hanoi", "Sofia", "Riga", "Bern", "Doha", "Kyiv", "Baku", "Minsk", "Accra"]


def _narrow_conversations(n: int, seed: int) -> list[dict]:
    """Half arithmetic (answer in words, no tool), half weather questions answered with a
    get_weather call: small enough for a randomly initialised tiny model to learn in a test."""
    import random
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            c = rng.choice(CITIES)
            call = {"id": "call_0", "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": c})}}
            out.append({"tools": WEATHER_TOOL, "messages": [
                {"role": "user", "content": f"What is the weather in {c}?"},
                {"role": "assistant", "content": "", "tool_calls": [call]}]})
        else:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            out.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                     {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]})
    return out


@pytest.mark.slow
def test_sft_learns_the_chat_format_and_tool_calls(tmp_path):
    """From random weights: after SFT the model ends its turns, answers tool prompts with a
    call whose JSON parses and names the tool with its required argument, and answers the
    other prompts without an action block (the speedrun checks the same on the full
    generated data, starting from the pretrained model)."""
    from internlm2.align.sft import chat_checks
    from internlm2.align.synth import write_jsonl
    train = _narrow_conversations(300, seed=0)
    tok = train_tokenizer([render_chat(r["messages"], tools=r.get("tools")) for r in train] * 3,
                          vocab_size=512)
    cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = build_model(cfg, seed=0)
    before = chat_checks(model, tok, _narrow_conversations(40, seed=7), max_new_tokens=40)
    save_model(model, tmp_path / "base", tokenizer=tok)
    write_jsonl(tmp_path / "sft.jsonl", train)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is several times faster on busy cores
    try:
        _sft(["--model", str(tmp_path / "base"), "--data", str(tmp_path / "sft.jsonl"),
              "--out", str(tmp_path / "sft"), "--seq-len", "256", "--lr", "3e-3",
              "--epochs", "24", "--batch-size", "8", "--micro-batch-size", "8",
              "--no-progress", "--log-every", "1000"])
        after = chat_checks(load_model(tmp_path / "sft" / "model"), tok,
                            _narrow_conversations(40, seed=7), max_new_tokens=40)
    finally:
        torch.set_num_threads(threads)
    assert before["tool_call_valid"] == 0 and before["ends_turn"] < 0.5
    assert after["tool_prompts"] == 20
    assert after["tool_call_valid"] >= 0.8, after
    assert after["ends_turn"] >= 0.9, after
    assert after["plain_without_action"] >= 0.9, after


def test_runner_resumes_and_lora_merges(base, tmp_path):
    out = tmp_path / "run"
    common = ["--model", str(base / "base"), "--data", str(base / "sft_val.jsonl"),
              "--out", str(out), "--seq-len", "256", "--batch-size", "4",
              "--micro-batch-size", "2", "--lr", "1e-3", "--no-progress", "--max-steps", "6"]
    full = tmp_path / "full"
    ref = _sft([*common[:5], str(full), *common[6:]])
    # stop after 3 steps (a checkpoint), then resume to 6: same final weights as straight
    from internlm2.align import trainer
    p = argparse.ArgumentParser()
    from internlm2.align import sft
    sft.add_cli(p.add_subparsers())
    ns = p.parse_args(["sft", *common, "--stop-at", "3"])
    ns.func(ns)
    assert not (out / "model").exists()
    assert json.loads((out / "summary.json").read_text())["stopped"] == "--stop-at 3"
    s = _sft([*common, "--resume", "auto"])
    assert s["steps"] == 6 and ref["steps"] == 6
    a, b = load_model(full / "model"), load_model(out / "model")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=k)
    # a fresh run into a folder with checkpoints must not silently restart
    with pytest.raises(ValueError, match="--resume auto"):
        _sft(common)
    # LoRA: only adapters train; the merged folder equals base + adapter
    lo = tmp_path / "lora"
    s = _sft([*common[:5], str(lo), *common[6:], "--lora-r", "4"])
    assert (lo / "adapter" / "adapter_config.json").is_file()
    from internlm2.align.lora import merge_adapter_folder
    merge_adapter_folder(base / "base", lo / "adapter", tmp_path / "merged")
    x = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_model(lo / "model")(x),
                                   load_model(tmp_path / "merged")(x), atol=1e-5, rtol=1e-4)
    assert trainer.FinetuneArgs  # the runner is the shared one


@pytest.mark.slow
def test_sft_under_torchrun_two_ranks_matches_one(base, tmp_path):
    args = ["--model", str(base / "base"), "--data", str(base / "sft_val.jsonl"),
            "--seq-len", "256", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3",
            "--no-progress", "--max-steps", "3"]
    one = _sft([*args, "--out", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "-m", "internlm2", "sft", *args, "--out", str(tmp_path / "two")],
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    a, b = load_model(tmp_path / "one" / "model"), load_model(tmp_path / "two" / "model")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4, msg=k)
