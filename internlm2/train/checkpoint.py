"""Checkpoints that survive crashes: a Hugging Face model folder plus the full training state.

Layout of one checkpoint, `ROOT/step_{N:08d}/`:

    model/         the model as a Hugging Face folder (`internlm2.hf.save_model`: config.json
                   with the phase's rope_theta, safetensors, tokenizer files), written by rank 0
                   from the full state dict gathered over the ranks
    state/         `torch.distributed.checkpoint` (DCP) of model + optimizer (FQN-keyed, so a
                   different number of ranks or another sharding loads it: DCP reshards) and
                   the trainer's own state (step, phase, data position, RNG) in it
    trainer.json   the trainer state again, readable (step, phase, world size, time)
    COMPLETE       written last

Everything is written into `ROOT/.tmp-step_{N:08d}/`, the COMPLETE marker is written and
synced, then the folder is renamed to its final name: a checkpoint is either absent or
whole, and `latest()` only considers folders with the marker. A crash mid-write leaves a
`.tmp-*` folder that the next run deletes. The newest `keep` checkpoints are kept.

With `async_save` the DCP state is copied to CPU memory and written by a background
thread (`dcp.async_save`) while training goes on; the checkpoint is finalised (marker,
rename, pruning) when the write has finished (`poll()` each step, `wait()` at the end).

Test hook: the environment variable INTERNLM2_TEST_CKPT_SLEEP="STEP:SECONDS" makes the
writer of checkpoint STEP sleep after writing its state and before the COMPLETE marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

MARKER = "COMPLETE"
# DCP says so at every single-process save / load (also from the async writer's thread).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or "
                        "uninitialized")
_NAME = re.compile(r"^step_(\d{8,})$")


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist() and dist.get_world_size() > 1:
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class ModelAndOptimizer(Stateful):
    """Model + optimizer state keyed by parameter names (DTensor shards when parallel), for
    DCP: `get_state_dict` / `set_state_dict` make it independent of the sharding."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        m, o = get_state_dict(self.model, self.optimizer)
        return {"model": m, "optim": o}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_state_dict(self.model, (), model_state_dict=state["model"], optim_state_dict={})
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on CPU, gathered from every rank (a collective)."""
    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_hf(model: nn.Module, path: str | Path, *, tokenizer: Any = None,
            dtype: torch.dtype | None = None,
            module_factory: Callable[[Any], nn.Module] | None = None) -> None:
    """Write `model` (sharded or not) as a Hugging Face folder from rank 0 (all ranks call).

    The full state dict is gathered, assigned into a fresh unsharded module built by
    `module_factory(config)` (default InternLM2ForCausalLM) and saved with
    `internlm2.hf.save_model`, so config.json holds the live config (e.g. the phase's
    rope_theta)."""
    import copy

    from ..hf import save_model
    from ..model import InternLM2ForCausalLM

    sd = full_state_dict(model)
    if _rank() != 0:
        return
    root = getattr(model, "_orig_mod", model)
    config = copy.deepcopy(root.config)
    with torch.device("meta"):
        plain = (module_factory or InternLM2ForCausalLM)(config)
    plain.load_state_dict(sd, assign=True)
    save_model(plain, path, tokenizer=tokenizer, dtype=dtype)


def _test_sleep(step: int) -> None:
    spec = os.environ.get("INTERNLM2_TEST_CKPT_SLEEP", "")
    if not spec:
        return
    s, _, secs = spec.partition(":")
    if s.strip() and int(s) == step:
        time.sleep(float(secs or 60))


class CheckpointManager:
    """Save / find / load checkpoints under `root` (see the module docstring).

    All ranks call `save` and `load` (they are collectives); rank 0 owns the folders."""

    def __init__(self, root: str | Path, keep: int = 3, async_save: bool = False):
        self.root = Path(root)
        self.keep = max(1, int(keep))
        self.async_save = async_save
        self._pending: tuple | None = None  # (future, tmp, final, step)
        self._async_group = None
        if async_save and _dist() and dist.get_world_size() > 1:
            # The background write runs collectives; give it its own CPU group.
            self._async_group = dist.new_group(backend="gloo")
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    # -- finding ---------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        out = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                m = _NAME.match(p.name)
                if m and p.is_dir() and (p / MARKER).is_file():
                    out.append((int(m.group(1)), p))
        return sorted(out)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def cleanup_partial(self) -> list[Path]:
        """Delete folders a crashed write left behind (rank 0; call before training)."""
        removed = []
        if _rank() == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".tmp-step_") or (_NAME.match(p.name) and
                                                        not (p / MARKER).is_file()):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        _barrier()
        return removed

    # -- saving ----------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any], *, meta: dict[str, Any],
             hf_writer: Callable[[Path], None] | None = None) -> Path:
        """Write checkpoint `step`: `hf_writer(folder)` (all ranks; e.g. `save_hf`), the DCP
        `state` (all ranks) and `meta` as trainer.json. Returns the final path (for an
        async save it appears once the write finishes)."""
        self.wait()  # one checkpoint in flight at a time
        final = self.path_for(step)
        tmp = self.root / f".tmp-step_{step:08d}"
        if _rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        if hf_writer is not None:
            hf_writer(tmp / "model")
        with _quiet():
            if self.async_save:
                fut = dcp.async_save(state, checkpoint_id=str(tmp / "state"),
                                     process_group=self._async_group, no_dist=not _dist())
                fut = getattr(fut, "upload_completion", fut)
                self._pending = (fut, tmp, final, step, meta)
                return final
            dcp.save(state, checkpoint_id=str(tmp / "state"), no_dist=not _dist())
        self._finalize(tmp, final, step, meta)
        return final

    def _finalize(self, tmp: Path, final: Path, step: int, meta: dict[str, Any]) -> None:
        # DCP's coordinator (rank 0) writes the metadata after every rank's data, so once
        # rank 0's write is done the whole state is on disk.
        if _rank() == 0:
            _write_synced(tmp / "trainer.json", json.dumps(meta, indent=2) + "\n")
            _test_sleep(step)
            _write_synced(tmp / MARKER, f"step {step}\n")
            _fsync_dir(tmp)
            if final.exists():  # an older checkpoint of the same step (a rerun)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()

    def poll(self) -> None:
        """Finalise a finished async write (cheap; call every step)."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until an async write is written and finalised."""
        if self._pending is None:
            return
        fut, tmp, final, step, meta = self._pending
        self._pending = None
        fut.result()
        self._finalize(tmp, final, step, meta)

    def _prune(self) -> None:
        found = self.checkpoints()
        for _, p in found[:-self.keep]:
            shutil.rmtree(p, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------
    def load(self, path: str | Path, state: dict[str, Any]) -> dict[str, Any]:
        """Load checkpoint `path` into `state` in place (Stateful entries get their
        load_state_dict); returns its trainer.json."""
        path = Path(path)
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
        with _quiet():
            dcp.load(state, checkpoint_id=str(path / "state"), no_dist=not _dist())
        return json.loads((path / "trainer.json").read_text(encoding="utf-8"))


def resolve_resume(value: str | None, manager: CheckpointManager) -> Path | None:
    """--resume: None/"" (start fresh), "auto" (the newest complete checkpoint, if any),
    or a checkpoint folder."""
    if not value:
        return None
    if value == "auto":
        return manager.latest()
    p = Path(value)
    if not (p / MARKER).is_file():
        raise FileNotFoundError(f"--resume {value}: not a complete checkpoint folder")
    return p


__all__ = ["CheckpointManager", "ModelAndOptimizer", "save_hf", "full_state_dict",
           "resolve_resume", "MARKER"]
