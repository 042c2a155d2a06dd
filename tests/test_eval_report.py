"""`internlm2 eval report`: the report card gathers what a run folder holds."""

import json

import pytest

from internlm2.cli import main
from internlm2.eval.report import build_report


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_card_collects_every_part(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    _jsonl(run / "pretrain" / "metrics.jsonl",
           [{"step": 0, "phase": 1, "val_loss": 9.0, "val_bpb": 4.0}]
           + [{"step": i, "phase": 1, "loss": 9.0 - i / 10} for i in range(1, 11)]
           + [{"step": 10, "phase": 1, "val_loss": 8.1, "val_bpb": 3.6}])
    _jsonl(run / "ppo" / "metrics.jsonl",
           [{"step": i, "reward": i / 10, "kl": 0.01 * i, "response_length": 10 + i}
            for i in range(1, 5)])
    (run / "ppo" / "round1").mkdir(parents=True)
    (run / "ppo" / "round1" / "fastpath.json").write_text(json.dumps(
        {"findings": [{"name": "length_explosion"}], "pairs": 35}))
    (run / "eval").mkdir()
    (run / "eval" / "tasks.json").write_text(json.dumps(
        {"arith_mc": {"score": 0.75, "count": 40}}))
    (run / "broken").mkdir()
    page = build_report(run)
    text = page.read_text()
    assert "Parts found: pretraining, PPO, tasks." in text
    assert "| 1 | 9.000 | 8.100 | 3.600 |" in text
    assert "length_explosion; pairs 35" in text and "| arith_mc | 0.750 | 40 |" in text
    for name in ("pretrain_loss", "ppo_reward", "ppo_kl_length"):
        png = run / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figures/{name}.png" in text
    assert "SFT" not in text  # absent parts are skipped, not faked


def test_report_cli_and_missing_folder(tmp_path, capsys):
    assert main(["eval", "report", str(tmp_path)]) == 0
    assert "Parts found: none." in (tmp_path / "report_card.md").read_text()
    assert main(["eval", "report", str(tmp_path / "nope")]) == 1
    assert "not a run folder" in capsys.readouterr().err
