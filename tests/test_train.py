"""Pretraining: loss normalisation, schedule, parameter groups, bits per byte, recipes, phase
switching, checkpoints that survive kill -9 (also mid-write), resuming on another number of
ranks, and a short real run that learns. Runs are tiny models on a small built-in corpus."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from internlm2.config import ModelConfig
from internlm2.model import build_model
from internlm2.train import loop, pretrain
from internlm2.train.checkpoint import CheckpointManager, ModelAndOptimizer
from internlm2.train.recipe import Recipe, RecipeError

# DCP warns at every single-process save (also from the async writer's thread)
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.toml"

# A small built-in corpus and a small model: every run below shares the prepared data.
DATA = ["data.builtin_code_files=16", "data.builtin_synthetic_docs=240", "data.val_fraction=0.1",
        "model.vocab_size=512"]
SMALL = DATA + [
    "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
    "train.batch_tokens=512", "train.micro_batch_size=2", "train.eval_every=10",
    "train.eval_tokens=1024", "train.peak_tflops=0.05", "train.progress=false",
    "schedule.warmup_steps=3", "schedule.warmup_fraction=0",
    "phases=[{name = \"short\", fraction = 0.5, seq_len = 64, rope_theta = 50000.0}, "
    "{name = \"long\", fraction = 0.5, seq_len = 128, rope_theta = 1000000.0, long_share = 0.5}]",
    "checkpoint.keep=2",
]
STEPS = 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train-data")
    recipe = Recipe.load(TINY, DATA)
    pretrain.prepare_builtin(recipe, d, 512)
    return d


def _cmd(out: Path, data_dir: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "internlm2.train.pretrain", "--config", str(TINY),
            "--out", str(out), "--max-steps", str(STEPS), "--checkpoint-every", "4",
            "--set", f"data.dir={data_dir}"]
    for s in SMALL:
        args += ["--set", s]
    return args + list(extra)


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("INTERNLM2_TEST_CKPT_SLEEP", None)
    env.update(extra)
    return env


def _run(out, data_dir, *extra, **env):
    r = subprocess.run(_cmd(out, data_dir, *extra), env=_env(**env), capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(out: Path) -> dict[int, tuple]:
    return {r["step"]: (r.get("loss"), r.get("val_loss")) for r in loop.read_metrics(out / "metrics.jsonl")}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run of STEPS steps (two phases, checkpoints every 4 steps)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    _run(out, data_dir)
    return out


# -- the loss normaliser ---------------------------------------------------------------------

class _Toy(nn.Module):
    def __init__(self, v: int = 7):
        super().__init__()
        self.emb = nn.Embedding(v, v)

    def forward(self, input_ids, doc_ids=None, position_ids=None):
        return self.emb(input_ids)


def test_loss_normaliser_uneven_masks_and_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (5, 6))
    labels = torch.randint(0, 7, (5, 6))
    labels[0, :5] = -100  # 1 target
    labels[1, 2:] = -100  # 2 targets
    labels[4, :] = -100  # none
    micro = [{"input_ids": ids[:2], "labels": labels[:2]},
             {"input_ids": ids[2:4], "labels": labels[2:4]},
             {"input_ids": ids[4:], "labels": labels[4:]}]
    model = _Toy()
    w0 = model.emb.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    res = loop.train_step(model, opt, micro, max_norm=0.0)

    # by hand: the mean over all 1 + 2 + 12 target tokens of -log p(target)
    w = w0.clone().requires_grad_()
    logp = torch.log_softmax(w[ids], -1)
    mask = labels != -100
    nll = -logp[mask, labels[mask]]
    assert mask.sum() == 15 == res.num_targets
    ref = nll.sum() / 15
    ref.backward()
    assert res.loss == pytest.approx(ref.item(), abs=1e-6)
    torch.testing.assert_close(model.emb.weight.detach(), w0 - w.grad, atol=1e-6, rtol=0)
    # averaging per micro-batch means would weight the single-target row 12x too much
    naive = sum(F.cross_entropy(w0[b["input_ids"]].flatten(0, 1), b["labels"].flatten(),
                                ignore_index=-100) for b in micro[:2]) / 2
    assert abs(naive.item() - ref.item()) > 1e-3


# -- schedule, parameter groups, bits per byte -------------------------------------------------

def test_lr_schedule_warmup_peak_end_and_phase_scale():
    kw = dict(peak=1.0, warmup=4, total=25, min_ratio=0.1)
    assert loop.lr_at(0, **kw) == pytest.approx(0.25)
    assert loop.lr_at(3, **kw) == pytest.approx(1.0)  # peak reached at the end of warmup
    assert loop.lr_at(4, **kw) == pytest.approx(1.0)
    assert loop.lr_at(14, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2)
    assert loop.lr_at(24, **kw) == pytest.approx(0.1)  # the last step: 10% of the peak
    assert loop.lr_at(14, **kw, decay="linear") == pytest.approx(0.55)
    assert loop.lr_at(9, **kw, scale=0.5) == pytest.approx(0.5 * loop.lr_at(9, **kw))
    assert loop.lr_at(20, **kw, decay="constant") == 1.0
    # phases on the step axis and their lr scale
    r = Recipe.load(TINY, ["train.steps=100"])
    plan = r.phase_plan()
    assert [(p.start, p.end) for p in plan] == [(0, 90), (90, 98), (98, 100)]
    assert [p.phase.lr_scale for p in plan] == [1.0, 1.0, 0.5]
    assert r.warmup_steps == 5


def test_weight_decay_groups_leave_out_norms_and_embeddings():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = build_model(cfg, seed=0)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = loop.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert nd == {"model.tok_embeddings.weight", "output.weight", "model.norm.weight",
                  *(f"model.layers.{i}.{k}.weight" for i in range(2)
                    for k in ("attention_norm", "ffn_norm"))}
    assert all(n.split(".")[-2] in ("wqkv", "wo", "w1", "w2", "w3") for n in d) and len(d) == 10
    groups = loop.param_groups(model, 0.1, decay_embeddings=True)
    assert "output.weight" in {names[id(p)] for p in groups[0]["params"]}
    opt = loop.build_optimizer(model, lr=3e-4)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_bits_per_byte_hand_case(data_dir):
    byte_len = torch.tensor([0, 1, 2, 3])
    labels = torch.tensor([[1, 2, -100, 0, 3]])
    losses = torch.tensor([[0.5, 1.0, 9.0, 7.0, 2.0]])
    bpb, nbytes, nats = loop.bits_per_byte(losses, labels, byte_len)
    # the ignored label and the zero-byte (special) token are left out of both sums
    assert nbytes == 6 and nats == pytest.approx(3.5)
    assert bpb == pytest.approx(3.5 / math.log(2) / 6)
    # the lookup table: the bytes of an encoded text add up to the text's UTF-8 length
    from internlm2.tokenizer import load_tokenizer
    tok_dir = next(data_dir.glob("builtin-*/tokenizer-512"))
    tok = load_tokenizer(tok_dir)
    table = loop.token_byte_lengths(tok)
    text = "def f(x):\n    return x ** 2  # 平方，你好！ naïve"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert int(table[ids].sum()) == len(text.encode("utf-8"))
    assert table[tok.bos_id] == 0 and table[tok.eos_id] == 0


# -- recipes and the command line --------------------------------------------------------------

def test_recipe_overrides_and_cli_parsing():
    parser = argparse.ArgumentParser()
    pretrain.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pretrain", "--config", str(TINY), "--optimizer.lr", "1e-3",
                              "--phases.1.seq_len=512", "--set", "train.seed=7",
                              "--max-steps", "50"])
    assert args.overrides == ["optimizer.lr=1e-3", "phases.1.seq_len=512"]
    r = Recipe.load(args.config, args.set + args.overrides)
    assert r.optimizer.lr == 1e-3 and r.phases[1].seq_len == 512 and r.train.seed == 7
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "--bogus"])
    with pytest.raises(RecipeError, match="optimizer"):
        Recipe.load(TINY, ["optimizer.learning_rate=1"])
    with pytest.raises(RecipeError, match="unknown source"):
        Recipe.load(TINY, ["data.mixture={web = 1.0}"])
    with pytest.raises(RecipeError, match="must be int"):
        Recipe.load(TINY, ["train.steps=many"])
    for name in ("tiny-cpu", "speedrun-cpu", "1_8b", "7b", "20b"):
        r = Recipe.load(ROOT / "configs" / f"{name}.toml")
        assert (r.optimizer.beta1, r.optimizer.beta2, r.optimizer.eps) == (0.9, 0.95, 1e-8)
        assert r.optimizer.weight_decay == 0.1 and r.optimizer.grad_clip == 1.0
        assert r.schedule.min_lr_ratio == 0.1 and len(r.phases) == 3
        assert [p.rope_theta for p in r.phases[:2]] == [50_000.0, 1_000_000.0]
        assert r.phases[1].seq_len == 8 * r.phases[0].seq_len and r.phases[1].long_share == 0.5
    assert Recipe.load(ROOT / "configs" / "7b.toml").phases[0].seq_len == 4096


# -- runs ------------------------------------------------------------------------------------------

def test_phase_switch_changes_seq_len_and_theta(reference):
    recs = [r for r in loop.read_metrics(reference / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    by_phase = {r["phase"]: (r["seq_len"], r["rope_theta"]) for r in recs}
    assert by_phase == {1: (64, 50_000.0), 2: (128, 1_000_000.0)}
    assert [r["phase"] for r in recs] == [1] * 12 + [2] * 12
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["grad_norm"] > 0 for r in recs)
    assert recs[0]["batch_tokens"] == 512 and recs[-1]["batch_tokens"] == 512
    cfg = json.loads((reference / "model" / "config.json").read_text())
    assert cfg["rope_theta"] == 1_000_000.0  # the final phase's theta
    ckpts = sorted((reference / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_00000020", "step_00000024"]  # keep = 2
    from internlm2.hf import load_model
    m = load_model(reference / "model")
    assert m.config.rope_theta == 1_000_000.0
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["val_bpb"] > 0


def test_kill9_during_training_then_resume_auto_reproduces_the_run(reference, data_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out, data_dir), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    marker = out / "checkpoints" / "step_00000008" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 8 <= done < STEPS and not (out / "checkpoints" / f"step_{STEPS:08d}").exists()
    r = _run(out, data_dir, "--resume", "auto")
    assert "resumed from" in r.stderr
    assert _losses(out) == _losses(reference)  # identical losses and validation losses


def test_kill9_during_checkpoint_write_keeps_the_previous_one(reference, data_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out, data_dir), env=_env(INTERNLM2_TEST_CKPT_SLEEP="8:120"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    tmp = out / "checkpoints" / ".tmp-step_00000008"
    deadline = time.time() + 240
    while not (tmp / "trainer.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None
    proc.kill()  # SIGKILL while checkpoint 8 is half written
    proc.wait()
    mgr = CheckpointManager(out / "checkpoints")
    assert mgr.latest().name == "step_00000004"
    assert (tmp / "state" / ".metadata").exists() and not (tmp / "COMPLETE").exists()
    # the previous checkpoint loads: HF model and the training state
    from internlm2.hf import load_model
    model = load_model(mgr.latest() / "model")
    opt = loop.build_optimizer(model, lr=1.0)
    state = {"app": ModelAndOptimizer(model, opt), "trainer": "", "rng": loop.rng_state()}
    meta = mgr.load(mgr.latest(), state)
    assert meta["step"] == 4 == json.loads(state["trainer"])["step"]
    r = _run(out, data_dir, "--resume", "auto")
    assert "step_00000004" in r.stderr
    assert not tmp.exists()
    assert _losses(out) == _losses(reference)


def test_checkpoint_from_two_ranks_resumes_in_one_process(reference, data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = _cmd(out, data_dir, "--set", "train.micro_batch_size=1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(29400 + os.getpid() % 1000)] + cmd[1:]
    cmd += ["--set", "train.stop_at=8"]  # the 24-step schedule, stopped after step 8
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = _losses(reference)
    two = _losses(out)
    for s in range(1, 9):  # FSDP over 2 ranks = one process (same data, fp32)
        assert two[s][0] == pytest.approx(ref[s][0], abs=1e-5)
    # continue the 2-rank run in one process to the end (DCP reshards the FSDP state)
    r = _run(out, data_dir, "--resume", "auto")
    assert "saved by 2 rank(s)" in r.stderr
    got = _losses(out)
    for s in range(9, STEPS + 1):
        assert got[s][0] == pytest.approx(ref[s][0], abs=1e-4)


def test_async_checkpoint_snapshot_and_pruning(tmp_path):
    model = nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    mgr = CheckpointManager(tmp_path / "ck", keep=2, async_save=True)
    snap = model.weight.detach().clone()
    for step in (1, 2, 3):
        state = {"app": ModelAndOptimizer(model, opt), "trainer": json.dumps({"step": step})}
        mgr.save(step, state, meta={"step": step})
        if step == 1:
            with torch.no_grad():
                model.weight.add_(1.0)  # after the snapshot: not in checkpoint 1
    mgr.wait()
    assert [s for s, _ in mgr.checkpoints()] == [2, 3]
    (tmp_path / "ck" / ".tmp-step_00000009").mkdir()
    mgr.cleanup_partial()
    assert not (tmp_path / "ck" / ".tmp-step_00000009").exists()
    fresh = nn.Linear(4, 4)
    state = {"app": ModelAndOptimizer(fresh, torch.optim.AdamW(fresh.parameters())), "trainer": ""}
    mgr.load(mgr.path_for(2), state)
    torch.testing.assert_close(fresh.weight, snap + 1.0)
    assert json.loads(state["trainer"]) == {"step": 2}


def test_tiny_preset_on_the_builtin_corpus_learns(data_dir, tmp_path):
    """The real thing, small: the tiny preset's shape (narrower) on the built-in corpus."""
    over = DATA + [f"data.dir={data_dir}", "model.hidden_size=128", "model.intermediate_size=352",
                   "model.num_hidden_layers=2", "train.steps=80", "train.batch_tokens=2048",
                   "train.micro_batch_size=16", "train.eval_every=40", "train.eval_tokens=2048",
                   "train.peak_tflops=0.05", "train.progress=false", "checkpoint.every=0",
                   "checkpoint.keep=1",
                   "phases=[{fraction = 0.9, seq_len = 128, rope_theta = 50000.0}, {fraction = "
                   "0.1, seq_len = 512, rope_theta = 1000000.0, long_share = 0.5, "
                   "micro_batch_size = 4}]"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on shared busy cores one thread is several times faster
    try:
        t0 = time.time()
        summary = pretrain.run(Recipe.load(TINY, over), tmp_path / "run")
        took = time.time() - t0
    finally:
        torch.set_num_threads(threads)
    evals = [r for r in loop.read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    # every eval_every steps, plus at the start and the end of each phase (72 ends phase 1;
    # phase 2 starts there at its own sequence length and theta)
    assert [(r["step"], r["phase"]) for r in evals] == [(0, 1), (40, 1), (72, 1), (72, 2), (80, 2)]
    assert evals[0]["val_loss"] - evals[-1]["val_loss"] > 1.0, evals
    assert summary["val_bpb"] < evals[0]["val_bpb"]
    assert took < 120  # about 20 s on 2 idle cores


def test_validation_set_follows_each_phases_mixture(data_dir):
    """val_loss of a phase is measured on the held-out documents of that phase's mixture."""
    recipe = Recipe.load(TINY, DATA + [
        "phases=[{name = \"a\", fraction = 0.5, seq_len = 64, rope_theta = 50000.0, "
        "mixture = {prose = 1.0, synthetic = 0.0}}, {name = \"b\", fraction = 0.5, seq_len = 64, "
        "rope_theta = 50000.0, mixture = {prose = 0.0, synthetic = 1.0}}]"])
    from internlm2.data.shards import TokenShards
    _, shards = pretrain.prepare_builtin(recipe, data_dir, 512)
    val = {n: TokenShards(shards[p], "val") for n, p in
           (("code", "code"), ("prose", "prose_en"), ("synthetic", "synthetic"))}
    val = {n: v for n, v in val.items() if v.num_tokens > 0}
    sets = {}
    assert {"prose", "synthetic"} <= set(val)
    for k, name in enumerate(("prose", "synthetic")):
        plan = argparse.Namespace(phase=recipe.phases[k], index=k)
        ds = pretrain.val_dataset(plan, val, recipe)
        src = {int(ds._src[i]) for i in range(len(ds._src))}
        assert [ds.sources[i] for i in src] == [val[name]]  # only this phase's source
        sets[name] = [ds[i]["input_ids"].tolist() for i in range(2)]
        assert sets[name] == [pretrain.val_dataset(plan, val, recipe)[i]["input_ids"].tolist()
                              for i in range(2)]  # the same samples at every evaluation
    assert sets["prose"] != sets["synthetic"]
    # no mixture anywhere: every val document alike
    bare = Recipe.load(TINY, DATA)
    bare.data.mixture = {}
    plan = argparse.Namespace(phase=bare.phases[0], index=0)
    ds = pretrain.val_dataset(plan, val, bare)
    assert ds.mixture is None and len(ds.sources) == len(val)
