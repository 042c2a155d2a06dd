"""`internlm2 speedrun --quick` end to end: every stage's output is checked, not just the exit."""

import json
import subprocess
import sys

import pytest

from internlm2.data.shards import TokenShards
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

    train = TokenShards(out / "data" / "shards", "train")
    assert train.num_tokens > 100_000 and int(train.doc(0).max()) < tok.vocab_size

    report = (out / "report.md").read_text()
    for section in ("Data pipeline", "Tokenizer", "Token shards"):
        assert section in report

    # a rerun skips finished stages; --force redoes one and those after it
    r = subprocess.run(cmd + ["--force", "shards"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "corpus: done earlier, skipped" in r.stdout and "tokenizer: done earlier" in r.stdout
    assert "] shards ..." in r.stdout
