"""The fine-tuning runner shared by `internlm2 sft`, `internlm2 reward train` and `internlm2 dpo`.

A stage hands over its examples (packed SFT rows, preference pairs, ...), a `collate` that
turns a list of them into a micro-batch, and a `loss_fn(model, batch) -> (loss_sum, count)`
with its `count_fn`; the runner does the rest the way pretraining does (it is built on
`internlm2.train.loop`):

- torchrun: every rank gets an equal slice of each global batch; with more than one rank
  the model is sharded with FSDP2 (`internlm2.train.parallel`), the loss is normalised by
  the global count (sum over micro-batches and ranks) and gradients are summed;
- AdamW (weight decay off on norms and embeddings), linear warmup then cosine to `min_lr`,
  gradient clipping, bf16 autocast on GPUs;
- epochs over a seeded permutation (a fresh one per epoch), `--max-steps` to cut short;
- LoRA (`--lora-r`): only adapters train; the result is saved merged as a plain folder and
  as an adapter (`adapter/`);
- checkpoints (DCP: model, optimizer, step) every `--save-every` steps, on SIGTERM/SIGINT
  and at the end; `--resume auto` continues from the newest one with the same data order;
- metrics to `metrics.jsonl` (loss, lr, grad norm, examples/s, the stage's own statistics)
  and an evaluation every `--eval-every` steps and at the end;
- the final model as a Hugging Face folder `OUT/model` (the stage's module class: causal LM
  or reward model), `summary.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..train import loop
from ..train.checkpoint import (
    CheckpointManager,
    ModelAndOptimizer,
    full_state_dict,
    resolve_resume,
)


@dataclass
class FinetuneArgs:
    model: str = ""  # Hugging Face folder to start from
    out: str = ""
    lr: float = 4e-5
    min_lr: float | None = None  # end of the cosine; None = lr / 10
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int = 0  # > 0: stop after this many optimizer steps
    batch_size: int = 16  # examples per optimizer step, over all ranks
    micro_batch_size: int = 4  # examples per forward on one rank
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; float32; bfloat16
    eval_every: int = 0  # steps; 0 = only at the end
    save_every: int = 0  # steps; 0 = only at the end (and on a stop signal)
    keep: int = 2
    resume: str | None = None  # "auto" or a checkpoint folder
    log_every: int = 1
    progress: bool = True
    lora_r: int = 0  # > 0: train LoRA adapters of this rank instead of every weight
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    activation_checkpointing: bool = False
    stop_at: int = 0  # > 0: stop after this step with a checkpoint, as if interrupted

    def validate(self) -> None:
        if not self.out:
            raise ValueError("--out: an output folder is required")
        for name in ("batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("--epochs must be > 0 (or give --max-steps)")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}")


def add_finetune_args(p: argparse.ArgumentParser, **defaults: Any) -> None:
    """The shared flags (--lr, --batch-size, ...) with stage-specific defaults."""
    base = FinetuneArgs(**defaults)
    helps = {
        "model": "Hugging Face folder to start from", "out": "output folder",
        "lr": "peak learning rate", "min_lr": "final learning rate of the cosine (default lr/10)",
        "warmup_ratio": "share of the steps spent warming up",
        "epochs": "passes over the data", "max_steps": "stop after this many steps (0 = off)",
        "batch_size": "examples per optimizer step (all ranks)",
        "micro_batch_size": "examples per forward pass on one rank",
        "weight_decay": "AdamW weight decay (not on norms and embeddings)",
        "grad_clip": "max global gradient norm (0 = off)", "seed": "seed (data order, init)",
        "dtype": "auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16",
        "eval_every": "evaluate every N steps (0 = at the end)",
        "save_every": "checkpoint every N steps (0 = at the end)",
        "keep": "checkpoints kept", "resume": "'auto' or a checkpoint folder",
        "log_every": "log every N steps", "lora_r": "LoRA rank (0 = full fine-tuning)",
        "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout",
        "activation_checkpointing": "recompute every layer in backward (saves memory)",
        "stop_at": "stop after step N with a checkpoint, as a signal would (0 = off)",
    }
    for f in fields(FinetuneArgs):
        if f.name == "progress":
            p.add_argument("--no-progress", dest="progress", action="store_false",
                           help="no progress bar")
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(base, f.name)
        required = f.name in ("model", "out") and not default
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action="store_true", default=default,
                           help=helps.get(f.name))
            continue
        typ = {"min_lr": float, "resume": str}.get(f.name, type(default))
        p.add_argument(flag, dest=f.name, type=typ, default=default, required=required,
                       help=helps.get(f.name) + ("" if required else f" (default {default})"))


def args_from(ns: argparse.Namespace) -> FinetuneArgs:
    return FinetuneArgs(**{f.name: getattr(ns, f.name) for f in fields(FinetuneArgs)
                           if hasattr(ns, f.name)})


@dataclass
class Stage:
    """What a stage supplies to `run_finetune`."""

    name: str
    examples: Sequence[Any]
    collate: Callable[[list[Any]], dict[str, Any]]
    loss_fn: loop.LossFn
    count_fn: loop.CountFn
    build_model: Callable[[torch.device], nn.Module]
    tokenizer: Any = None
    # model -> metrics, called on every rank (data split and summed by the stage)
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None
    # loss_fn may add tensors here (sums over its micro-batch); logged per step as
    # train_<key>, summed over ranks and divided by the step's global count.
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # written into summary.json


# -- distributed setup ---------------------------------------------------------------------

@dataclass
class Env:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dims: Any = None
    group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_env() -> Env:
    """torchrun's environment (one process without it); builds the data-parallel mesh."""
    from ..train.parallel import ParallelDims, init_distributed
    rank, world, _, device = init_distributed()
    env = Env(rank, world, device)
    if world > 1:
        env.dims = ParallelDims(dp_shard=world, world_size=world)
        env.dims.build_mesh(device.type)
        env.group = env.dims.get_mesh("dp_cp").get_group()
    return env


def wrap_model(model: nn.Module, env: Env, *, ac: bool = False) -> nn.Module:
    """FSDP2 over the ranks (several processes), activation checkpointing when asked."""
    if env.dims is not None:
        from ..train.parallel import parallelize
        parallelize(model, env.dims, ac_ratio=1.0 if ac else 0.0)
    elif ac:
        from ..train.parallel import apply_ac
        apply_ac(model, 1.0)
    return model


def compute_dtype(args: FinetuneArgs, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32)."""
    if args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def log(msg: str, env: Env | None = None) -> None:
    if env is None or env.main:
        print(msg, flush=True)


# -- saving ----------------------------------------------------------------------------------

def save_final(model: nn.Module, out: Path, *, tokenizer: Any, args: FinetuneArgs,
               lora_config: Any = None) -> Path:
    """Write OUT/model (and OUT/adapter with LoRA) from the full state dict (all ranks call)."""
    from ..hf import save_model
    sd = full_state_dict(model)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return out / "model"
    root = getattr(model, "_orig_mod", model)
    with torch.device("meta"):
        plain = type(root)(root.config)
    if lora_config is not None:
        from .lora import apply_lora, merge_lora, save_adapter
        apply_lora(plain, lora_config)
        plain.load_state_dict(sd, assign=True)
        save_adapter(plain, lora_config, out / "adapter", base_model=args.model)
        merge_lora(plain)
    else:
        plain.load_state_dict(sd, assign=True)
    save_model(plain, out / "model", tokenizer=tokenizer)
    return out / "model"


# -- the run ---------------------------------------------------------------------------------

def _step_indices(n: int, step: int, steps_per_epoch: int, batch: int, seed: int) -> list[int]:
    epoch, k = divmod(step, steps_per_epoch)
    perm = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(perm)
    return perm[k * batch:(k + 1) * batch]


def run_finetune(args: FinetuneArgs, stage: Stage, env: Env | None = None) -> dict:
    """Train `stage` per `args`; returns the summary (also OUT/summary.json)."""
    args.validate()
    env = env or setup_env()
    out = Path(args.out)
    dev = env.device
    loop.seed_everything(args.seed)
    n = len(stage.examples)
    if n == 0:
        raise ValueError(f"{stage.name}: no training examples")
    dp = env.world
    batch = min(args.batch_size, n)
    if batch < dp:
        raise ValueError(f"--batch-size {args.batch_size} (or the {n} examples) is smaller than "
                         f"the {dp} ranks")
    steps_per_epoch = math.ceil(n / batch)
    total = args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.epochs * steps_per_epoch))
    if args.max_steps > 0 and args.epochs > 0:
        total = min(total, max(1, math.ceil(args.epochs * steps_per_epoch)))
    warmup = int(args.warmup_ratio * total)
    min_ratio = (args.min_lr / args.lr) if args.min_lr is not None else 0.1

    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps({"stage": stage.name, **asdict(args)},
                                                  indent=2) + "\n")
    model = stage.build_model(dev)
    lora_config = None
    if args.lora_r > 0:
        from .lora import LoRAConfig, apply_lora, trainable_summary
        lora_config = LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
        apply_lora(model, lora_config)
        log(f"{stage.name}: LoRA r={args.lora_r} alpha={args.lora_alpha}: "
            f"{trainable_summary(model)}", env)
    wrap_model(model, env, ac=args.activation_checkpointing)
    optimizer = loop.build_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    autocast = compute_dtype(args, dev)
    clip_fn = None
    if env.dims is not None:
        from ..train.parallel import clip_grad_norm_
        clip_fn = clip_grad_norm_

    manager = CheckpointManager(out / "checkpoints", keep=args.keep)
    manager.cleanup_partial()
    metrics = loop.Metrics(out / "metrics.jsonl", enabled=env.main)
    app = {"app": ModelAndOptimizer(model, optimizer), "trainer": "", "rng": loop.rng_state()}
    step = 0
    start = resolve_resume(args.resume, manager)
    if start is None and args.resume != "auto" and manager.checkpoints():
        raise ValueError(f"{manager.root} holds checkpoints of an earlier run: continue it with "
                         "--resume auto, or write to a new --out")
    if start is not None:
        manager.load(start, app)
        step = int(json.loads(app["trainer"])["step"])
        loop.set_rng_state(app["rng"])
        metrics.truncate(step)
        log(f"{stage.name}: resumed from {start} (step {step})", env)
    elif env.main and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()

    log(f"{stage.name}: {n} examples, {total} steps of {batch} "
        f"({steps_per_epoch} per epoch), micro-batch {args.micro_batch_size} x {dp} rank(s), "
        f"lr {args.lr:g} -> {args.lr * min_ratio:g}", env)

    def save(at: int) -> None:
        app["trainer"] = json.dumps({"step": at, "stage": stage.name, "world_size": env.world})
        app["rng"] = loop.rng_state()
        manager.save(at, app, meta={"step": at, "stage": stage.name, "world_size": env.world})

    bar = None
    if env.main and args.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, unit="step", desc=stage.name, dynamic_ncols=True)
    stop = loop.StopSignal()
    stopped = None
    last: dict[str, Any] = {}
    evals: dict[str, float] = {}
    with stop:
        while step < total:
            t0 = time.perf_counter()
            idx = _step_indices(n, step, steps_per_epoch, batch, args.seed)
            if len(idx) % dp:  # every rank gets the same share: repeat a few examples
                short = dp - len(idx) % dp
                idx = idx + (idx * short)[:short]
            mine = idx[env.rank::dp]
            micro = [stage.collate([stage.examples[i] for i in mine[j:j + args.micro_batch_size]])
                     for j in range(0, len(mine), args.micro_batch_size)]
            lr = loop.lr_at(step, peak=args.lr, warmup=warmup, total=total, min_ratio=min_ratio)
            loop.set_lr(optimizer, lr)
            stage.stats.clear()
            res = loop.train_step(model, optimizer, micro, stage.loss_fn,
                                  count_fn=stage.count_fn, max_norm=args.grad_clip,
                                  group=env.group, clip_fn=clip_fn, autocast_dtype=autocast,
                                  device=dev)
            step += 1
            dt = time.perf_counter() - t0
            rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": res.loss,
                   "lr": lr, "grad_norm": res.grad_norm, "count": res.num_targets,
                   "examples_per_s": len(idx) / dt, "step_time": dt}
            if stage.stats:
                keys = sorted(stage.stats)
                vals = torch.stack([stage.stats[k].detach().double().to(dev).reshape(())
                                    for k in keys])
                loop.all_reduce_sum(vals, env.group)
                denom = max(1, res.num_targets)
                rec.update({f"train_{k}": float(v) / denom for k, v in zip(keys, vals.tolist())})
            if res.skipped:
                rec["skipped"] = True
            if stage.eval_fn is not None and ((args.eval_every and step % args.eval_every == 0)
                                              or step == total):
                evals = {f"val_{k}": v for k, v in stage.eval_fn(model).items()}
                rec.update(evals)
            if step % args.log_every == 0 or step == total or evals.keys() & rec.keys():
                metrics.log(rec)
            last = rec
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.3f}", lr=f"{lr:.1e}", refresh=False)
            want_stop = stop.agreed(env.group, dev) if env.world > 1 else bool(stop.requested)
            if want_stop:
                stopped = stop.requested or "a signal on another rank"
            elif args.stop_at and step >= args.stop_at and step < total:
                stopped = want_stop = f"--stop-at {args.stop_at}"
            if (args.save_every and step % args.save_every == 0) or want_stop or step == total:
                save(step)
            if want_stop:
                break
    manager.wait()
    if bar is not None:
        bar.close()
    metrics.close()
    summary: dict[str, Any] = {"stage": stage.name, "steps": step, "total_steps": total,
                               "examples": n, "stopped": stopped, "final_loss": last.get("loss"),
                               **{k: v for k, v in last.items() if k.startswith("train_")},
                               **evals, **stage.info}
    if stopped is None:
        path = save_final(model, out, tokenizer=stage.tokenizer, args=args, lora_config=lora_config)
        summary["model"] = str(path)
        if lora_config is not None:
            summary["adapter"] = str(out / "adapter")
    if env.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log(f"{stage.name}: stopped ({stopped}); continue with --resume auto" if stopped else
            f"{stage.name}: done, {step} steps; model in {out / 'model'}", env)
    if env.world > 1:
        torch.distributed.barrier()
    return summary


def load_tokenizer_of(model_dir: str | os.PathLike, override: str | None = None):
    """The tokenizer saved with a model folder (or the one given)."""
    from ..tokenizer import load_tokenizer
    path = Path(override or model_dir)
    try:
        return load_tokenizer(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise FileNotFoundError(f"{path}: no tokenizer found ({e}); pass --tokenizer") from None


__all__ = ["Env", "FinetuneArgs", "Stage", "add_finetune_args", "args_from", "compute_dtype",
           "load_tokenizer_of", "log", "run_finetune", "save_final", "setup_env", "wrap_model"]

