"""`internlm2 pretrain`: the three-phase pretraining recipe on torch.distributed.

    internlm2 pretrain --config configs/tiny-cpu.toml --out runs/tiny [--max-steps N]
        [--checkpoint-every N] [--resume auto|DIR] [--optimizer.lr 1e-3 | --set KEY=VALUE ...]
    torchrun --nproc-per-node 8 -m internlm2.cli pretrain --config configs/7b.toml --out runs/7b

Under OUT: metrics.jsonl (one line per step: step, phase, seq_len, rope_theta, loss, lr,
grad_norm, tokens, tokens_per_s, mfu, ...; val_loss / val_bpb on evaluation steps, on the
held-out documents in the phase's own mixture),
tensorboard/ (when installed), checkpoints/step_N/ (checkpoint.py), model/ (the final model
as a Hugging Face folder), phaseN-NAME/ (the model at the end of each phase), recipe.json, summary.json, and data/ (the built-in corpus, its
tokenizer and token shards, prepared when the recipe uses "builtin:" sources).

Data: every optimizer step takes `accum * micro_batch * dp` packed samples from one global
stream per phase; data-parallel rank r gets samples r, r + dp, ... of each micro-step. The
stream position is a count of samples, so a run resumed on a different number of ranks sees
the same data. At a phase boundary the sequence length, rope theta (also written into the
saved config.json), batch, learning-rate scale and mixture change; every step records its
phase.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import loop
from .checkpoint import CheckpointManager, ModelAndOptimizer, resolve_resume, save_hf
from .recipe import PhasePlan, Recipe, RecipeError

_BUILTIN_PARTS = ("code", "prose_en", "synthetic", "retrieval")


def _log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)


# -- data ------------------------------------------------------------------------------------

def prepare_builtin(recipe: Recipe, data_dir: Path, vocab_size: int) -> tuple[Path, dict[str, Path]]:
    """The built-in corpus -> a byte-level BPE of `vocab_size` -> token shards per part
    (each step skipped when its output exists). Returns (tokenizer dir, {part: shard dir})."""
    from ..data.builtin import build_builtin_corpus
    from ..data.shards import read_manifest, write_token_shards
    from ..tokenizer import load_tokenizer, train_tokenizer

    d = recipe.data
    root = data_dir / (f"builtin-c{d.builtin_code_files}-s{d.builtin_synthetic_docs}"
                       + (f"-r{d.builtin_retrieval_docs}" if d.builtin_retrieval_docs else "")
                       + f"-seed{recipe.train.seed}")
    corpus = root / "corpus"
    if not (corpus / "stats.json").is_file():
        build_builtin_corpus(corpus, seed=recipe.train.seed,
                             code_files=d.builtin_code_files or None,
                             synthetic=d.builtin_synthetic_docs,
                             retrieval=d.builtin_retrieval_docs)
    parts = [p for p in _BUILTIN_PARTS if p != "retrieval" or d.builtin_retrieval_docs]
    tok_dir = root / f"tokenizer-{vocab_size}"
    if not (tok_dir / "tokenizer.json").is_file():
        # the retrieval part repeats the prose as filler: not for the vocabulary
        train_tokenizer([str(corpus / f"{p}.jsonl") for p in parts if p != "retrieval"],
                        vocab_size=vocab_size, output_dir=tok_dir)
    tok = None
    shards = {}
    for part in parts:
        out = root / f"shards-{vocab_size}-val{d.val_fraction:g}" / part
        try:
            done = read_manifest(out).get("complete", False)
        except (FileNotFoundError, ValueError):
            done = False
        if not done:
            tok = tok or load_tokenizer(tok_dir)
            write_token_shards(str(corpus / f"{part}.jsonl"), tok, out,
                               val_fraction=d.val_fraction, seed=recipe.train.seed)
        shards[part] = out
    return tok_dir, shards


class _Subset:
    """Some documents of a TokenShards (the interface MixtureSampler / PackedDataset use)."""

    def __init__(self, shards, index: np.ndarray):
        self._s, self._index = shards, index.astype(np.int64)
        self.lengths = shards.lengths[self._index]
        self.num_tokens = int(self.lengths.sum())
        self.pad_id = shards.pad_id

    def __len__(self) -> int:
        return len(self._index)

    def doc_slice(self, i: int, start: int, stop: int):
        return self._s.doc_slice(int(self._index[i]), start, stop)


def phase_dataset(plan: PhasePlan, sources: dict, recipe: Recipe, long_min: int):
    """The packed sample stream of one phase: its mixture (token shares) of the sources,
    optionally with `long_share` of the tokens from documents of >= long_min tokens."""
    from ..data.shards import MixtureSampler, PackedDataset

    p = plan.phase
    weights = p.mixture or recipe.data.mixture or {n: s.num_tokens for n, s in sources.items()}
    weights = {n: float(w) for n, w in weights.items() if w > 0 and sources[n].num_tokens > 0}
    if not weights:
        raise RecipeError(f"phase {plan.number}: no source with documents and weight > 0")
    parts: dict[str, tuple[Any, float]] = {}
    if p.long_share is not None:
        long_w = {n: w for n, w in weights.items() if (sources[n].lengths >= long_min).any()}
        short_w = {n: w for n, w in weights.items() if (sources[n].lengths < long_min).any()}
        if not long_w or not short_w:
            _log(f"phase {plan.number}: long_share ignored (no documents "
                 f"{'>=' if not long_w else '<'} {long_min} tokens)")
        else:
            for n in weights:
                lens = sources[n].lengths
                if n in long_w:
                    parts[f"{n}:long"] = (_Subset(sources[n], np.flatnonzero(lens >= long_min)),
                                          p.long_share * long_w[n] / sum(long_w.values()))
                if n in short_w:
                    parts[f"{n}:short"] = (_Subset(sources[n], np.flatnonzero(lens < long_min)),
                                           (1 - p.long_share) * short_w[n] / sum(short_w.values()))
            parts = {k: v for k, v in parts.items() if v[1] > 0}
    if not parts:
        parts = {n: (sources[n], w) for n, w in weights.items()}
    mixture = MixtureSampler(parts, seed=recipe.train.seed + 1000 * (plan.index + 1))
    return PackedDataset(mixture, p.seq_len, seed=recipe.train.seed + plan.index)


def val_dataset(plan: PhasePlan, val_src: dict, recipe: Recipe):
    """A phase's validation samples: the held-out documents of its sources in the phase's own
    mixture (token shares) at its sequence length, so `val_loss` measures what the phase
    trains for (a code-heavy phase 1 and a synthetic-heavy enhancement phase are each judged
    on their own data). Fixed order: the same samples at every evaluation of the phase.
    Without mixture weights (or none that match a val source): all val documents alike."""
    from ..data.shards import MixtureSampler, PackedDataset

    p = plan.phase
    weights = p.mixture or recipe.data.mixture or {}
    parts = {n: (val_src[n], float(w)) for n, w in weights.items() if w > 0 and n in val_src}
    if not parts:
        return PackedDataset(list(val_src.values()), p.seq_len, seed=recipe.train.seed,
                             shuffle=True)
    mixture = MixtureSampler(parts, seed=recipe.train.seed + 17 * (plan.index + 1))
    return PackedDataset(mixture, p.seq_len, seed=recipe.train.seed)


class SampleStream:
    """A phase's global sample stream: `next_step(n)` reserves the next n samples (moving to
    the next epoch when fewer are left), `state_dict()` is the packed dataset's position.

    `index(k)` maps stream position k to a packed sample through a seeded permutation of the
    epoch, so one step's samples come from all over the stream: consecutive samples are cuts
    of the same few documents (a long source file spans dozens), and a batch of them would
    see one document instead of the mixture."""

    def __init__(self, dataset, seed: int = 0):
        self.ds = dataset
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def index(self, k: int) -> int:
        epoch = self.ds.epoch
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.ds)))
        return int(self._perm[1][k])

    def next_step(self, n: int) -> tuple[int, int]:
        if n > len(self.ds):
            raise RecipeError(f"a step needs {n} samples but an epoch has only {len(self.ds)}: "
                              "use more data or a smaller batch")
        if self.ds.position + n > len(self.ds):
            self.ds.set_epoch(self.ds.epoch + 1)
        start = self.ds.position
        self.ds.position += n
        return start, n

    def state_dict(self) -> dict:
        return self.ds.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ds.load_state_dict(state)


def _batches(ds, indices: list[int], mb: int) -> list[dict]:
    from ..data.shards import collate
    return [collate([ds[i] for i in indices[k:k + mb]]) for k in range(0, len(indices), mb)]


def eval_batches(ds, n: int, dp: int, dp_rank: int, mb: int) -> list[dict]:
    """This rank's share of the first n samples, as micro-batches; every rank gets the same
    number of batches (a missing sample repeats sample 0 with every label ignored)."""
    from ..data.shards import collate
    per_rank = math.ceil(n / dp)
    nb = math.ceil(per_rank / mb)
    out = []
    for b in range(nb):
        samples = []
        for k in range(mb):
            i = (b * mb + k) * dp + dp_rank
            s = ds[i] if i < n else {**ds[0], "labels": np.full(ds.seq_len, loop.IGNORE_INDEX)}
            samples.append(s)
        out.append(collate(samples))
    return out


def load_data(recipe: Recipe, out: Path, vocab_size: int, env: "_Env"):
    """({name: train TokenShards}, {name: val TokenShards with documents}, tokenizer or None);
    "builtin:" sources are prepared first by rank 0 (cached under data.dir or OUT/data)."""
    from ..data.shards import TokenShards
    from ..tokenizer import load_tokenizer

    data_dir = Path(recipe.data.dir) if recipe.data.dir else out / "data"
    builtin = any(v.startswith("builtin:") for v in recipe.data.sources.values())
    if builtin and env.rank == 0:
        _log(f"preparing the built-in corpus under {data_dir} (cached) ...")
        prepare_builtin(recipe, data_dir, vocab_size)
    if env.world > 1:
        torch.distributed.barrier()
    tok_path = recipe.data.tokenizer or None
    bshards: dict[str, Path] = {}
    if builtin:
        btok, bshards = prepare_builtin(recipe, data_dir, vocab_size)  # cached: no work
        tok_path = tok_path or str(btok)
    paths: dict[str, Path] = {}
    for name, src in recipe.data.sources.items():
        if src.startswith("builtin:"):
            part = src.split(":", 1)[1]
            if part not in bshards:
                hint = (" (builtin:retrieval needs data.builtin_retrieval_docs > 0)"
                        if part == "retrieval" else "")
                raise RecipeError(f"data.sources.{name} = {src!r}: the built-in corpus has "
                                  f"{', '.join('builtin:' + p for p in bshards)}{hint}")
            paths[name] = bshards[part]
        else:
            paths[name] = Path(src)
    train_src = {n: TokenShards(p, "train") for n, p in paths.items()}
    val_src = {n: v for n, v in ((n, TokenShards(p, "val")) for n, p in paths.items())
               if v.num_tokens > 0}
    for n, s in train_src.items():
        if s.vocab_size > vocab_size:
            raise RecipeError(f"data source {n!r} was tokenized with a vocabulary of "
                              f"{s.vocab_size} > model.vocab_size {vocab_size}")
    return train_src, val_src, (load_tokenizer(tok_path) if tok_path else None)


# -- the run ---------------------------------------------------------------------------------

def _digest(obj) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class _Env:
    rank: int
    world: int
    device: torch.device
    dims: Any = None
    dp: int = 1
    dp_rank: int = 0
    loss_group: Any = None


def _setup_parallel(recipe: Recipe) -> _Env:
    from .parallel import ParallelDims, init_distributed
    par = recipe.parallel
    rank, world, _, device = init_distributed()
    env = _Env(rank, world, device)
    if par.cp > 1:
        raise RecipeError("parallel.cp > 1: context parallel needs plain causal attention; packed "
                          "pretraining samples (documents kept apart) do not support it yet")
    if world > 1 or par.tp > 1 or par.dp_replicate > 1 or par.dp_shard > 1:
        dims = ParallelDims(par.dp_replicate, par.dp_shard, par.tp, par.cp, world_size=world)
        dims.build_mesh(device.type)
        env.dims, env.dp, env.dp_rank = dims, dims.dp_size, dims.dp_rank
        if world > 1:
            env.loss_group = dims.get_mesh("dp_cp").get_group()
    return env


def _build_model(recipe: Recipe, config, env: _Env):
    from ..model import build_model
    par = recipe.parallel
    if recipe.model.init_from:
        from ..hf import load_model
        model = load_model(recipe.model.init_from, device=env.device)
        model.config = config
    else:
        big = env.world > 1 and config.num_params() > 2e9
        model = build_model(config, device="meta" if big else env.device,
                            seed=recipe.train.seed, init=not big)
    if env.dims is not None:
        from .parallel import parallelize
        parallelize(model, env.dims, ac_ratio=par.ac_ratio, compile=par.compile,
                    mixed_precision=_fsdp_mixed_precision(recipe, env))
    else:
        if par.ac_ratio:
            from .parallel import apply_ac
            apply_ac(model, par.ac_ratio)
        if par.compile:
            from .parallel import apply_compile
            apply_compile(model)
    if any(p.is_meta for p in model.parameters()):  # large models: initialise after sharding
        torch.manual_seed(recipe.train.seed)
        model.to_empty(device=env.device)
        model.init_weights()
    return model


def _fsdp_mixed_precision(recipe: Recipe, env: _Env) -> str | None:
    """"bf16" when FSDP casts the weights itself (then the loop must not autocast)."""
    d = env.dims
    if d is None or not (d.fsdp_enabled or d.dp_replicate_enabled):
        return None
    return "bf16" if recipe.train.dtype == "bfloat16" and env.device.type == "cuda" else None


def run(recipe: Recipe, out: str | Path, resume: str | None = None) -> dict:
    """Train per `recipe` into `out`; returns the summary (also written to summary.json)."""
    from ..model import flops_per_token

    out = Path(out)
    env = _setup_parallel(recipe)
    rank, dev = env.rank, env.device
    tr, opt_cfg, ck = recipe.train, recipe.optimizer, recipe.checkpoint
    loop.seed_everything(tr.seed, tr.deterministic)
    config = recipe.model.build_config()
    plans = [p for p in recipe.phase_plan() if p.steps > 0]
    total = plans[-1].end

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    train_src, val_src, tokenizer = load_data(recipe, out, config.vocab_size, env)
    byte_lengths = loop.token_byte_lengths(tokenizer) if tokenizer is not None else None
    long_min = recipe.data.long_min_tokens or plans[0].phase.seq_len

    # model, optimizer, checkpoints
    model = _build_model(recipe, config, env)
    optimizer = loop.build_optimizer(
        model, lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay, decay_embeddings=opt_cfg.decay_embeddings,
        decay_norms=opt_cfg.decay_norms, fused=True)
    compute_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(tr.dtype, torch.float32)
    autocast = None if compute_dtype == torch.float32 or _fsdp_mixed_precision(recipe, env) \
        else compute_dtype
    clip_fn = None
    if env.dims is not None:
        from .parallel import clip_grad_norm_
        clip_fn = clip_grad_norm_
    manager = CheckpointManager(out / "checkpoints", keep=ck.keep, async_save=ck.async_save)
    manager.cleanup_partial()
    metrics = loop.Metrics(out / "metrics.jsonl", enabled=rank == 0)

    step, data_state = 0, None
    start_path = resolve_resume(resume, manager)
    if start_path is None and resume != "auto" and manager.checkpoints():
        raise RecipeError(f"{manager.root} holds checkpoints of an earlier run: continue it with "
                          "--resume auto, or train into a new --out")
    recipe_hash = _digest(recipe.to_dict())
    app = {"app": ModelAndOptimizer(model, optimizer), "trainer": "", "rng": loop.rng_state()}
    if start_path is not None:
        meta = manager.load(start_path, app)
        t = json.loads(app["trainer"])
        loop.set_rng_state(app["rng"])
        step, data_state = int(t["step"]), t.get("data")
        saved_phase = int(t.get("phase", 0))
        if t.get("recipe") not in (None, recipe_hash):
            _log("note: the recipe differs from the one the checkpoint was written with", rank)
        _log(f"resumed from {start_path} (step {step}, phase {saved_phase + 1}, "
             f"saved by {meta.get('world_size', '?')} rank(s))", rank)
        metrics.truncate(step)
        if data_state is not None:
            data_state = (saved_phase, data_state)
    elif rank == 0 and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()

    peak = tr.peak_tflops * 1e12 if tr.peak_tflops > 0 else loop.measure_peak_flops(
        dev, compute_dtype if dev.type == "cuda" else torch.float32)
    _log(f"model: {config.num_params() / 1e6:.2f}M parameters; "
         f"world {env.world} (dp {env.dp}); device {dev}; peak {peak / 1e12:.2f} TFLOP/s/device",
         rank)

    def mb_size(plan: PhasePlan) -> int:
        return plan.micro_batch_size

    def accum_of(plan: PhasePlan) -> int:
        per = mb_size(plan) * plan.phase.seq_len * env.dp
        return max(1, round(plan.batch_tokens / per))

    for p in plans:
        got = accum_of(p) * mb_size(p) * env.dp * p.phase.seq_len
        if got != p.batch_tokens:
            _log(f"note: phase {p.number} asks for {p.batch_tokens} tokens per step; micro-batch "
                 f"x seq_len x dp gives {got} (set batch_tokens or micro_batch_size to match)",
                 rank)
        _log(f"phase {p.number} {p.phase.name or ''}: steps {p.start}-{p.end - 1}, seq_len "
             f"{p.phase.seq_len}, rope_theta {p.phase.rope_theta:g}, batch "
             f"{accum_of(p) * mb_size(p) * env.dp} x {p.phase.seq_len} tokens "
             f"(micro-batch {mb_size(p)} x accumulation {accum_of(p)} x dp {env.dp}), "
             f"lr x{p.phase.lr_scale:g}", rank)

    def save(at_step: int, plan: PhasePlan, stream: SampleStream) -> None:
        trainer = {"step": at_step, "phase": plan.index, "data": stream.state_dict(),
                   "world_size": env.world, "recipe": recipe_hash, "time": time.time()}
        app["trainer"] = json.dumps(trainer)
        app["rng"] = loop.rng_state()
        hf_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(ck.hf_dtype)

        def write_hf(path: Path) -> None:
            save_hf(model, path, tokenizer=tokenizer, dtype=hf_dtype)
        path = manager.save(at_step, app, meta=trainer, hf_writer=write_hf if ck.hf else None)
        _log(f"checkpoint: {path}", rank)

    stop = loop.StopSignal()
    bar = None
    if rank == 0 and tr.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, unit="step", desc="pretrain", dynamic_ncols=True)
    plan = stream = None
    val_cache: dict[int, Any] = {}
    last_eval: dict = {}
    stopped = None
    rec: dict = {}

    def run_eval(at_step: int) -> dict:
        if not val_src:
            return {}
        L = plan.phase.seq_len
        if plan.index not in val_cache:
            vds = val_dataset(plan, val_src, recipe)
            n = min(len(vds), max(1, math.ceil(tr.eval_tokens / L)))
            val_cache[plan.index] = eval_batches(vds, n, env.dp, env.dp_rank, mb_size(plan))
        res = loop.evaluate(model, val_cache[plan.index], byte_lengths=byte_lengths,
                            group=env.loss_group, autocast_dtype=autocast, device=dev)
        out_ = {"val_loss": res["loss"]}
        if "bpb" in res:
            out_["val_bpb"] = res["bpb"]
        return out_

    with stop:
        while step < total:
            new_plan = next(p for p in plans if p.start <= step < p.end)
            if new_plan is not plan:  # phase switch (or start)
                plan = new_plan
                stream = SampleStream(phase_dataset(plan, train_src, recipe, long_min),
                                      seed=tr.seed + 7919 * (plan.index + 1))
                if data_state is not None and data_state[0] == plan.index:
                    stream.load_state_dict(data_state[1])
                data_state = None
                root = getattr(model, "_orig_mod", model)
                root.config.rope_theta = float(plan.phase.rope_theta)
                root.config.max_position_embeddings = max(root.config.max_position_embeddings,
                                                          plan.phase.seq_len)
                accum, mb = accum_of(plan), mb_size(plan)
                fpt = flops_per_token(root.config, plan.phase.seq_len)
                _log(f"step {step}: phase {plan.number} (seq_len {plan.phase.seq_len}, "
                     f"rope_theta {plan.phase.rope_theta:g})", rank)
                if step == plan.start and tr.eval_every > 0:
                    # At the start of every phase (at its sequence length and rope theta),
                    # so each phase's curve has a starting point.
                    ev = run_eval(step)
                    if ev:
                        metrics.log({"step": step, "phase": plan.number, "phase_start": True, **ev})
                        last_eval = ev
            t0 = time.perf_counter()
            lr = loop.lr_at(step, peak=opt_cfg.lr, warmup=recipe.warmup_steps, total=total,
                            min_ratio=recipe.schedule.min_lr_ratio, decay=recipe.schedule.decay,
                            scale=plan.phase.lr_scale)
            loop.set_lr(optimizer, lr)
            start, n = stream.next_step(accum * mb * env.dp)
            mine = [stream.index(start + (m * env.dp + env.dp_rank) * mb + k)
                    for m in range(accum) for k in range(mb)]
            micro = _batches(stream.ds, mine, mb)
            res = loop.train_step(model, optimizer, micro, loop.fused_causal_lm_loss,
                                  max_norm=opt_cfg.grad_clip,
                                  group=env.loss_group, clip_fn=clip_fn,
                                  autocast_dtype=autocast, device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            step += 1
            step_tokens = n * plan.phase.seq_len
            tps = step_tokens / dt
            rec = {"step": step, "phase": plan.number, "phase_name": plan.phase.name,
                   "seq_len": plan.phase.seq_len, "rope_theta": plan.phase.rope_theta,
                   "loss": res.loss, "lr": lr, "grad_norm": res.grad_norm,
                   "targets": res.num_targets, "batch_tokens": step_tokens,
                   "tokens_per_s": tps, "mfu": loop.mfu(fpt, tps, peak, env.world),
                   "step_time": dt}
            if res.skipped:
                rec["skipped"] = True
            if tr.eval_every > 0 and (step % tr.eval_every == 0 or step == plan.end) or \
                    (tr.eval_every == 0 and step == total):
                ev = run_eval(step)
                rec.update(ev)
                last_eval = ev or last_eval
            if step % tr.log_every == 0 or step == total or "val_loss" in rec:
                metrics.log(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(phase=plan.number, loss=f"{res.loss:.3f}", lr=f"{lr:.2e}",
                                tok_s=f"{tps:.0f}", mfu=f"{rec['mfu']:.1%}", refresh=False)
            manager.poll()
            want_stop = stop.agreed(None, dev) if env.world > 1 else bool(stop.requested)
            if want_stop:
                stopped = stop.requested or "a signal on another rank"
            elif tr.stop_at and step >= tr.stop_at and step < total:
                stopped = want_stop = f"train.stop_at = {tr.stop_at}"
            if (ck.every and step % ck.every == 0) or step == total or want_stop:
                save(step, plan, stream)
            if step == plan.end and not want_stop:
                # The model as it leaves each phase (the report's model versions: the base
                # model after the long-context phase, the final one after enhancement).
                save_hf(model, out / f"phase{plan.number}" if not plan.phase.name else
                        out / f"phase{plan.number}-{plan.phase.name}", tokenizer=tokenizer)
            if want_stop:
                break
    manager.wait()
    if stopped is None and not ck.hf:  # no model folder in the checkpoints: write one now
        save_hf(model, out / "model", tokenizer=tokenizer,
                dtype={"bfloat16": torch.bfloat16, "float32": torch.float32}.get(ck.hf_dtype))
    if bar is not None:
        bar.close()
    metrics.close()

    summary = {"steps": step, "total_steps": total, "stopped": stopped,
               "final_loss": rec.get("loss"), **last_eval}
    last = manager.latest()
    if rank == 0:
        if not ck.hf and stopped is None:
            summary["model"] = str(out / "model")
        elif last is not None and (last / "model").is_dir() and stopped is None:
            dst = out / "model"
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(last / "model", dst)
            summary["model"] = str(dst)
        summary["checkpoint"] = str(last) if last else None
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _log(("stopped (" + stopped + "); continue with --resume auto") if stopped else
             f"done: {step} steps; model in {out / 'model'}", rank)
    if env.world > 1:
        torch.distributed.barrier()
    return summary


# -- command line ----------------------------------------------------------------------------

def _split_overrides(extras: list[str]) -> tuple[list[str], list[str]]:
    """`--a.b value` / `--a.b=value` pairs -> ["a.b=value"]; the rest is left as is."""
    over, rest, i = [], [], 0
    while i < len(extras):
        a = extras[i]
        key = a[2:].split("=", 1)[0] if a.startswith("--") else ""
        if "." in key:
            if "=" in a:
                over.append(a[2:])
                i += 1
                continue
            if i + 1 < len(extras):
                over.append(f"{key}={extras[i + 1]}")
                i += 2
                continue
        rest.append(a)
        i += 1
    return over, rest


def main(args: argparse.Namespace) -> int:
    overrides = list(getattr(args, "set", None) or []) + list(getattr(args, "overrides", None) or [])
    if args.max_steps is not None:
        overrides += [f"train.steps={args.max_steps}", "train.tokens=0"]
    if args.checkpoint_every is not None:
        overrides.append(f"checkpoint.every={args.checkpoint_every}")
    if getattr(args, "no_progress", False):
        overrides.append("train.progress=false")
    recipe = Recipe.load(args.config, overrides)
    try:
        summary = run(recipe, args.out, resume=args.resume)
    finally:
        from .parallel import destroy_distributed
        destroy_distributed()
    return 0 if summary.get("steps") else 1


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pretrain", help="pretrain a model (three-phase recipe, checkpoints, resume)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML recipe (configs/*.toml); omitted: the defaults")
    p.add_argument("--out", default="runs/pretrain", help="run folder (default runs/pretrain)")
    p.add_argument("--max-steps", type=int, help="total optimizer steps (train.steps; phases "
                   "and the schedule scale to it)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--resume", help="'auto': continue from the newest complete checkpoint "
                   "under OUT/checkpoints (fresh start when none); or a checkpoint folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set optimizer.lr=1e-3 (repeatable); "
                   "--optimizer.lr 1e-3 works too")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main, overrides=[])
    parse_known = p.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        # Dotted `--section.key value` options are recipe overrides, not argparse options.
        ns, extras = parse_known(args, namespace)
        over, rest = _split_overrides(extras)
        ns.overrides = list(getattr(ns, "overrides", None) or []) + over
        return ns, rest

    p.parse_known_args = types.MethodType(parse_known_args, p)
    return p


if __name__ == "__main__":  # python -m internlm2.train.pretrain ... (same as the subcommand)
    _parser = argparse.ArgumentParser(prog="internlm2")
    _sub = _parser.add_subparsers(dest="command")
    add_cli(_sub)
    _args = _parser.parse_args(["pretrain", *sys.argv[1:]])
    sys.exit(main(_args))
