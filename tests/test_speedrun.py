"""`internlm2 speedrun --quick` end to end: every stage's output is checked, not just the exit."""

import json
import math
import subprocess
import sys

import pytest

from internlm2.data.shards import TokenShards
from internlm2.hf import load_model
from internlm2.tokenizer import load_tokenizer


@pytest.mark.slow
def test_quick_speedrun_outputs_and_resume(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "internlm2", "speedrun", "--quick", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    corpus = json.loads((out / "stages" / "corpus.json").read_text())["figures"]
    assert all(corpus[p]["documents"] > 0 for p in ("code", "prose_en", "synthetic"))

    data = json.loads((out / "stages" / "data.json").read_text())["figures"]
    assert data["balance_ok"]
    assert data["stages"]["dedup"]["docs_out"] < data["stages"]["format"]["docs_in"]
    assert any((out / "data" / "removed").rglob("*.jsonl"))

    tok = load_tokenizer(out / "tokenizer")
    assert tok.vocab_size % 128 == 0 and tok.im_start_id == tok.vocab_size - 1
    assert tok.decode(tok.encode("def f(x):\n    return 12345", add_bos=False)) == \
        "def f(x):\n    return 12345"

    shards = {c: TokenShards(out / "shards" / c, "train") for c in ("code", "prose", "synthetic")}
    assert sum(s.num_tokens for s in shards.values()) > 100_000
    assert all(s.num_docs > 0 and int(s.doc(0).max()) < tok.vocab_size for s in shards.values())

    pre = json.loads((out / "stages" / "pretrain.json").read_text())["figures"]
    phases = pre["val_by_phase"]
    assert sorted(phases) == ["1", "2", "3"]
    assert phases["1"]["last"][1] < phases["1"]["first"][1] - 0.5  # phase 1 learns clearly
    for name, theta in (("base", 1e6), ("internlm2", 1e6)):
        model = load_model(out / name)
        assert model.config.rope_theta == theta and model.config.vocab_size == tok.vocab_size
        assert load_tokenizer(out / name).vocab_size == tok.vocab_size

    # alignment: generated data, SFT with its chat checks, the reward model, PPO rounds
    align = json.loads((out / "stages" / "align_data.json").read_text())["figures"]
    assert all(align[k]["records"] > 0 for k in ("sft", "pref", "prompts", "sft_val"))
    sft = json.loads((out / "stages" / "sft.json").read_text())["figures"]
    assert sft["steps"] > 0 and math.isfinite(sft["val_loss"])
    assert sft["checks"]["prompts"] > 0 and sft["checks"]["tool_prompts"] > 0
    rm_fig = json.loads((out / "stages" / "rm.json").read_text())["figures"]
    assert 0.0 <= rm_fig["val_acc"] <= 1.0 and any(k.startswith("val_acc_") for k in rm_fig)
    rm = load_model(out / "rm")
    assert type(rm).__name__ == "InternLM2ForRewardModel"
    assert 0 <= rm.config.extra["reward_token_id"] < tok.vocab_size
    ppo = json.loads((out / "stages" / "ppo.json").read_text())["figures"]
    phases = [r.get("phase") for r in ppo["curve"]]
    assert "critic_warmup" in phases and phases.count("ppo") >= 2
    assert all(math.isfinite(r["reward"]) and math.isfinite(r["kl"]) for r in ppo["curve"]
               if "reward" in r)
    assert len(ppo["fastpath"]) >= 1 and (out / "ppo" / "round1" / "fastpath.json").is_file()
    for name in ("chat-sft", "chat", "final"):
        model = load_model(out / name)
        assert type(model).__name__ == "InternLM2ForCausalLM"
    assert (out / "final").resolve() == (out / "chat").resolve()

    ev = json.loads((out / "stages" / "eval.json").read_text())["figures"]
    assert all(math.isfinite(v["bpb"]) and v["bpb"] > 0 for v in ev["ppl"].values())
    assert 0.0 <= ev["niah_overall"] <= 1.0 and set(ev["niah_by_length"]) == {"256", "512"}
    assert (out / "eval" / "niah.png").read_bytes()[:4] == b"\x89PNG"
    assert ev["tasks"] and all(0.0 <= v <= 1.0 for v in ev["tasks"].values())
    assert set(ev["agent_tools"]) == {"chat-sft", "chat"}
    assert all(v["prompts"] == 8 and 0.0 <= v["valid"] <= 1.0 for v in ev["agent_tools"].values())
    card = (out / "report_card.md").read_text()
    assert "![pretrain_loss](figures/pretrain_loss.png)" in card and "Needle in a haystack" in card

    report = (out / "report.md").read_text()
    for section in ("Data pipeline", "Tokenizer", "Token shards", "Pretraining", "## SFT",
                    "Conditional reward model", "Online PPO", "## Evaluation"):
        assert section in report

    # --publish copies the report with its plots; every image link points at a copied PNG
    import re
    r = subprocess.run(cmd + ["--publish", str(tmp_path / "docs")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    pub = (tmp_path / "docs" / "speedrun-report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", pub)
    assert len(links) >= 5 and "## Evaluation" in pub
    assert all((tmp_path / "docs" / x).read_bytes()[:4] == b"\x89PNG" for x in links)

    # a rerun skips finished stages; --force redoes one and those after it
    # (a redone stage starts afresh: it must not resume from its own earlier checkpoints)
    before = (out / "ppo" / "summary.json").stat().st_mtime_ns
    r = subprocess.run(cmd + ["--force", "ppo"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "corpus: done earlier, skipped" in r.stdout and "pretrain: done earlier" in r.stdout
    assert "rm: done earlier, skipped" in r.stdout
    assert "] ppo ..." in r.stdout and "] eval ..." in r.stdout and "] report ..." in r.stdout
    assert "resumed" not in r.stdout
    assert (out / "ppo" / "summary.json").stat().st_mtime_ns > before
    assert (out / "final").resolve() == (out / "chat").resolve()
