"""The `internlm2` commands, run as a user would (subprocess, real files)."""

import json
import subprocess
import sys

import pytest
import torch

from internlm2.config import ModelConfig
from internlm2.hf import load_model, save_model
from internlm2.model import build_model
from internlm2.tokenizer import train_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. " * 20 +
        "def add(a, b):\n    return a + b\n" * 10 + "今天天气很好，我们去公园散步。" * 20)


def run_cli(*args, stdin=None, check=True):
    r = subprocess.run([sys.executable, "-m", "internlm2", *args], input=stdin,
                       capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = train_tokenizer([TEXT], vocab_size=512, output_dir=root / "tok")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    save_model(build_model(cfg, seed=0), root / "m", tokenizer=tok)
    return root / "m"


def test_generate_command_is_greedy_and_deterministic(model_dir):
    a = run_cli("generate", "--model", str(model_dir), "--prompt", "The quick",
                "--max-new-tokens", "6")
    b = run_cli("generate", "--model", str(model_dir), "--prompt", "The quick",
                "--max-new-tokens", "6")
    assert a.stdout == b.stdout and a.stdout.strip()
    assert "finish: length" in a.stderr


def test_chat_is_multi_turn_resets_and_exits_on_eof(model_dir):
    r = run_cli("chat", "--model", str(model_dir), "--max-new-tokens", "4", "--seed", "0",
                stdin="hello\n/reset\nsecond question\n")
    out = r.stdout.splitlines()
    assert "(conversation cleared)" in out
    assert len([line for line in out if line != "(conversation cleared)"]) >= 2
    # EOF with no input at all is a clean exit too
    assert run_cli("chat", "--model", str(model_dir), stdin="").returncode == 0


def test_info_and_convert_round_trip(model_dir, tmp_path):
    info = json.loads(run_cli("info", "--model", str(model_dir), "--json").stdout)
    assert info["num_params"] == load_model(model_dir).num_params()
    run_cli("convert", str(model_dir), str(tmp_path / "llama"), "--to", "llama")
    run_cli("convert", str(tmp_path / "llama"), str(tmp_path / "back"), "--to", "internlm2")
    a, b = load_model(model_dir).state_dict(), load_model(tmp_path / "back").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_encode_command(model_dir):
    r = run_cli("tokenizer", "encode", "--tokenizer", str(model_dir), "--text",
                "<|im_start|>user", "--ids-only")
    ids = [int(x) for x in r.stdout.split()]
    assert ids[:2] == [1, 511]  # BOS, then <|im_start|> is the last id of a 512 vocabulary


def test_bad_input_is_one_clear_line(tmp_path):
    r = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x", check=False)
    assert r.returncode == 1
    assert "nope" in r.stderr and "Traceback" not in r.stderr
