"""The training loop pieces shared by pretraining, SFT, reward-model training and PPO.

A stage supplies a loss function `loss_fn(model, batch) -> (loss_sum, num_targets)`: the
*sum* of its per-target losses over one micro-batch and how many targets it had. `train_step`
does the rest the same way for every stage: it counts the targets of all micro-batches on all
data-parallel ranks first (one all-reduce), then backpropagates each micro-batch's
`loss_sum / global_count`, so the gradient is that of the mean over every target token of the
global batch, whatever the packing, loss masks, gradient accumulation or number of ranks
(torchtitan's train step does the same). Then it clips the global gradient norm and steps.

Also here: the evaluation pass (loss and bits per byte), the learning-rate schedule, AdamW
parameter groups, MFU (with a cached GEMM benchmark for the device's peak), metrics (JSONL +
TensorBoard when installed) and SIGTERM/SIGINT handling.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

# (model, batch) -> (sum of the per-target losses, number of targets), both tensors
LossFn = Callable[[nn.Module, Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor]]
# batch -> number of targets (known before the forward, to normalise before any backward)
CountFn = Callable[[Mapping[str, Any]], torch.Tensor]


# -- losses ----------------------------------------------------------------------------------

def count_targets(batch: Mapping[str, Any]) -> torch.Tensor:
    """Targets of a batch: labels that are not IGNORE_INDEX."""
    return (batch["labels"] != IGNORE_INDEX).sum()


def token_losses(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Cross entropy (nats, fp32) of every position of a packed causal-LM batch, 0 where the
    label is IGNORE_INDEX. batch: input_ids, labels (already shifted: the next token),
    doc_ids / position_ids (packing: positions restart and attention stays in a document)."""
    logits = model(batch["input_ids"], doc_ids=batch.get("doc_ids"),
                   position_ids=batch.get("position_ids"))
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="none")
    return loss.view(labels.shape)


def _fused_head(model: nn.Module) -> nn.Linear | None:
    """The LM head when `fused_causal_lm_loss` may fuse it with the loss: the model is our causal
    LM (forward(return_hidden=True) gives the normed hidden states; also under torch.compile
    or FSDP's class swap) and `output` is a plain bias-free nn.Linear with a plain-tensor
    weight and no hooks. DTensor weights (FSDP2, tensor parallel), LoRA or other wrapped
    heads, reward models: None, and the loss takes the logits path."""
    from internlm2.model import InternLM2ForCausalLM

    base = getattr(model, "_orig_mod", model)  # torch.compile(model)
    if not isinstance(base, InternLM2ForCausalLM) or \
            type(base).forward is not InternLM2ForCausalLM.forward:
        return None
    head = getattr(base, "output", None)
    if type(head) is not nn.Linear or head.bias is not None or head._forward_hooks or \
            head._forward_pre_hooks or type(head.weight) is not nn.Parameter:
        return None
    return head


def causal_lm_loss(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The `LossFn` of next-token training: summed cross entropy and the target count."""
    return token_losses(model, batch).sum(), count_targets(batch)


def fused_causal_lm_loss(model: nn.Module, batch: Mapping[str, Any]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_lm_loss` with the head matmul and the loss fused and chunked when the head
    allows it (`_fused_head`; `fused_ce.py`): the same loss and gradients up to rounding,
    without the [tokens, vocab] fp32 logits. Pretraining's loss. The alignment trainers keep
    the plain one: their few-step runs at a high learning rate are compared across rank
    counts to 2e-5, and Adam's first steps turn gradient rounding in rarely-seen embedding
    rows into lr-sized differences."""
    head = _fused_head(model)
    if head is None:
        return causal_lm_loss(model, batch)
    from internlm2.train.fused_ce import fused_linear_cross_entropy

    h = model(batch["input_ids"], doc_ids=batch.get("doc_ids"),
              position_ids=batch.get("position_ids"), return_hidden=True)
    return fused_linear_cross_entropy(h.flatten(0, 1), head.weight, batch["labels"].flatten(),
                                      ignore_index=IGNORE_INDEX)


# -- distributed helpers ---------------------------------------------------------------------

def _dist_on(group) -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size(group) > 1


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the ranks of `group` (in place; a no-op in a single process)."""
    if _dist_on(group):
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)
    return t


def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def autocast_context(device: torch.device | str, dtype: torch.dtype | None):
    """bf16/fp16 autocast, or nothing for fp32 (or when parallelism casts the weights)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# -- the step --------------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float  # mean loss over every target of the global batch
    grad_norm: float  # before clipping
    num_targets: int  # global
    skipped: bool = False  # non-finite gradient: the optimizer step was not taken


def _set_grad_sync(model: nn.Module, on: bool) -> None:
    fn = getattr(model, "set_requires_gradient_sync", None)  # FSDP2: skip reduce-scatter
    if callable(fn):
        fn(on)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Mapping[str, Any]],
    loss_fn: LossFn = causal_lm_loss,
    *,
    count_fn: CountFn = count_targets,
    max_norm: float = 1.0,
    group=None,
    grad_scale: float = 1.0,
    clip_fn: Callable[[Iterable[torch.Tensor], float], torch.Tensor] | None = None,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation).

    group: the process group the data is split over (data parallel, and context parallel
    when it splits sequences); the target count and the logged loss are summed over it.
    grad_scale: multiplies every micro-batch loss; pass the data-parallel degree when the
    gradient reduction averages over ranks (FSDP / DDP default), so gradients are the sum
    over ranks of `loss_sum / global_count`. max_norm 0 disables clipping (the norm is still
    measured). clip_fn(params, max_norm) -> total norm (DTensor-aware for parallel models;
    default torch.nn.utils.clip_grad_norm_).
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    dev = device if device is not None else next(model.parameters()).device
    local = sum(count_fn(b).to(dev, torch.float64) for b in micro_batches)
    global_count = all_reduce_sum(torch.as_tensor(local, dtype=torch.float64, device=dev)
                                  .clone(), group)
    # A batch with no targets at all still runs (so every rank does the same collectives).
    denom = float(global_count.item()) or 1.0
    loss_total = torch.zeros((), dtype=torch.float64, device=dev)
    model.train()
    for i, batch in enumerate(micro_batches):
        _set_grad_sync(model, i == len(micro_batches) - 1)
        batch = to_device(batch, dev)
        with autocast_context(dev, autocast_dtype):
            loss_sum, _ = loss_fn(model, batch)
        (loss_sum * (grad_scale / denom)).backward()
        loss_total += loss_sum.detach().to(torch.float64)
    _set_grad_sync(model, True)
    all_reduce_sum(loss_total, group)
    params = [p for p in model.parameters() if p.grad is not None]
    clip = clip_fn or torch.nn.utils.clip_grad_norm_
    norm = clip(params, max_norm if max_norm > 0 else float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    skipped = not math.isfinite(norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(float(loss_total.item()) / denom, norm, int(global_count.item()), skipped)


# -- evaluation and bits per byte ------------------------------------------------------------

def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes of every vocabulary id (int64 [vocab_size]); special tokens count 0.

    Byte-level BPE pieces are mapped back through the byte alphabet and SentencePiece
    `<0xNN>` pieces count one byte, so pieces that are parts of a character count their own
    bytes (decoding them alone would give a replacement character)."""
    from ..tokenizer import BPETokenizer, SentencePieceTokenizer, _byte_level_chars

    n = int(tokenizer.vocab_size)
    out = np.zeros(n, dtype=np.int64)
    special = set(getattr(tokenizer, "special_tokens", {}).values())
    byte_of = {c: b for b, c in enumerate(_byte_level_chars())}
    for i in range(n):
        if i in special:
            continue
        if isinstance(tokenizer, BPETokenizer):
            piece = tokenizer.id_to_token(i)
            if piece.startswith("[UNUSED_TOKEN_"):
                continue  # spare tokens, never produced from text
            if all(c in byte_of for c in piece):
                out[i] = len(piece)
            else:
                out[i] = len(tokenizer.decode([i]).encode("utf-8"))
        elif isinstance(tokenizer, SentencePieceTokenizer):
            sp = tokenizer._sp
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            if sp.is_byte(i):
                out[i] = 1
                continue
            out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        else:
            out[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return torch.from_numpy(out)


def bits_per_byte(losses: torch.Tensor, labels: torch.Tensor,
                  byte_lengths: torch.Tensor) -> tuple[float, int, float]:
    """(bits per byte, bytes, nats) of per-position losses (nats) against their labels.

    Targets whose token has no bytes (special tokens, ignored labels) are left out of both
    sums, so the figure does not depend on the tokenizer's special tokens."""
    nbytes = byte_lengths.to(labels.device)[labels.clamp_min(0)]
    keep = (labels != IGNORE_INDEX) & (nbytes > 0)
    nats = float(losses[keep].double().sum())
    total = int(nbytes[keep].sum())
    return (nats / math.log(2) / total if total else float("nan")), total, nats


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] = token_losses,
    byte_lengths: torch.Tensor | None = None,
    group=None,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean loss over every target of `batches` (summed over `group`) and bits per byte.

    loss_fn(model, batch) -> per-position losses (0 where ignored), as `token_losses`."""
    dev = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # nats, targets, bpb nats, bytes
    for batch in batches:
        batch = to_device(batch, dev)
        with autocast_context(dev, autocast_dtype):
            losses = loss_fn(model, batch).float()
        labels = batch["labels"]
        sums[0] += losses.double().sum()
        sums[1] += (labels != IGNORE_INDEX).sum()
        if byte_lengths is not None:
            _, nbytes, nats = bits_per_byte(losses, labels, byte_lengths)
            sums[2] += nats
            sums[3] += nbytes
    all_reduce_sum(sums, group)
    model.train(was_training)
    nats, n, bnats, nbytes = (float(x) for x in sums.tolist())
    out = {"loss": nats / n if n else float("nan"), "targets": int(n)}
    if byte_lengths is not None:
        out["bpb"] = bnats / math.log(2) / nbytes if nbytes else float("nan")
        out["bytes"] = int(nbytes)
    return out


# -- optimizer and schedule ------------------------------------------------------------------

def param_groups(model: nn.Module, weight_decay: float, *, decay_embeddings: bool = False,
                 decay_norms: bool = False) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on the matrices; not on norm weights and biases (1-D
    parameters) unless decay_norms, and not on the embeddings unless decay_embeddings.

    "Embeddings" are both vocabulary-sized matrices: the input embedding (every nn.Embedding)
    and the output projection (a top-level `output` / `lm_head` weight), which are the same
    kind of per-token lookup table and get sparse, frequency-skewed gradients."""
    embed_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                 for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clean = name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
        is_embed = id(p) in embed_ids or clean in ("output.weight", "lm_head.weight")
        is_norm = p.ndim < 2
        if (is_embed and not decay_embeddings) or (is_norm and not decay_norms):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, *, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, weight_decay: float = 0.1, decay_embeddings: bool = False,
                    decay_norms: bool = False, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the decay / no-decay groups. `fused=True` (pretraining) takes the fused
    kernel (one pass over each tensor instead of a dozen foreach passes: ~8x faster on a CPU,
    where the optimizer step is a few percent of a small model's training step) when every
    parameter is a plain float tensor on the CPU or a GPU; sharded (DTensor) parameters keep
    the foreach implementation. Off by default: the alignment trainers' short fine-tunes
    (three steps in the reward Fast Path) came out differently with it on CPU and the cause is
    not pinned down yet."""
    groups = param_groups(model, weight_decay, decay_embeddings=decay_embeddings,
                          decay_norms=decay_norms)
    params = [p for g in groups for p in g["params"]]
    fused = fused and bool(params) and all(
        type(p.data) is torch.Tensor and p.is_floating_point()
        and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_at(step: int, *, peak: float, warmup: int, total: int, min_ratio: float = 0.1,
          decay: str = "cosine", scale: float = 1.0) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`.

    Linear warmup reaches `peak` at step warmup - 1; then cosine (or linear) decay to
    `min_ratio * peak` at the last step (total - 1), or constant. `scale` (a phase's
    lr_scale) multiplies the result."""
    if step < warmup:
        return scale * peak * (step + 1) / warmup
    if decay == "constant":
        return scale * peak
    span = max(1, total - 1 - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if decay == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "linear":
        f = 1.0 - progress
    else:
        raise ValueError(f"unknown decay {decay!r}")
    return scale * peak * (min_ratio + (1.0 - min_ratio) * f)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


# -- throughput and MFU ----------------------------------------------------------------------

def _cache_file() -> Path:
    root = os.environ.get("INTERNLM2_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "internlm2")
    return Path(root) / "peak_flops.json"


def _device_key(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import platform
        name = f"{platform.processor() or platform.machine()}-threads{torch.get_num_threads()}"
    return f"{device.type}|{name}|{dtype}"


def measure_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       seconds: float = 0.5, cache: bool = True) -> float:
    """Achievable matmul FLOP/s of one device: square GEMMs timed after a warmup, cached
    per device, thread count and dtype (in ~/.cache/internlm2/peak_flops.json)."""
    device = torch.device(device)
    key = _device_key(device, dtype)
    path = _cache_file()
    if cache and path.is_file():
        try:
            hit = json.loads(path.read_text()).get(key)
            if hit:
                return float(hit)
        except (OSError, ValueError):
            pass
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    sync()
    best, runs, t_end = 0.0, 0, time.perf_counter() + seconds
    while runs < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
        runs += 1
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = json.loads(path.read_text()) if path.is_file() else {}
            data[key] = best
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, path)
        except (OSError, ValueError):
            pass
    return best


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
    return flops_per_token * tokens_per_s / (peak_flops * devices) if peak_flops > 0 else 0.0


# -- metrics ---------------------------------------------------------------------------------

class Metrics:
    """One JSON line per record in `path` (and TensorBoard scalars when installed), on the
    writing rank only. `truncate(step)` drops records after `step` (a resumed run)."""

    def __init__(self, path: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
                except Exception:  # tensorboard not installed
                    self._tb = None

    def truncate(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if rec.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x]


# -- signals, seeds ----------------------------------------------------------------------------

class StopSignal:
    """Turns the first SIGTERM / SIGINT into a request to stop at the next step boundary
    (the caller saves a checkpoint and exits); a second SIGINT interrupts at once."""

    def __init__(self):
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name
        print(f"\n{name}: stopping after this step (a checkpoint is written); "
              "send SIGINT again to stop at once", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def agreed(self, group=None, device="cpu") -> bool:
        """True when any rank of `group` was asked to stop (all ranks stop together)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if _dist_on(group):
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        return bool(flag.item())


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


__all__ = ["IGNORE_INDEX", "LossFn", "CountFn", "StepResult", "Metrics", "StopSignal",
           "count_targets", "token_losses", "causal_lm_loss", "train_step", "evaluate",
           "fused_causal_lm_loss", "bits_per_byte", "token_byte_lengths", "param_groups",
           "build_optimizer", "lr_at",
           "set_lr", "measure_peak_flops", "mfu", "all_reduce_sum", "to_device",
           "autocast_context", "seed_everything", "rng_state", "set_rng_state", "read_metrics"]
