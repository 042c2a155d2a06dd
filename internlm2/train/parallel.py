"""Parallelism applied from outside the model: mesh, TP, activation checkpointing, compile, FSDP.

The order is fixed (as in torchtitan's `parallelize.py`): tensor parallel first (it swaps
weights for DTensors sharded over the `tp` mesh), then activation checkpointing and
`torch.compile` per decoder layer, then FSDP2 `fully_shard` per layer and finally the root
(embeddings, final norm and output head are grouped with the root).

Gradient convention: FSDP here *sums* gradients over the data-parallel ranks (its divide
factor is set to 1), so each rank's loss must be its token-summed loss divided by the global
number of target tokens (`global_token_mean_loss`). The per-rank losses then add up to the
global token mean, and the summed gradients are exactly those of a single process.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

try:  # torch >= 2.6
    from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy,
                                        fully_shard)
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._composable.fsdp import (  # type: ignore[no-redef]
        CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


# -- process group -------------------------------------------------------------------------

def init_distributed(backend: str | None = None, device_type: str | None = None,
                     ) -> tuple[int, int, int, torch.device]:
    """Set up from torchrun's environment; returns (rank, world_size, local_rank, device).

    With WORLD_SIZE > 1 this joins the default process group (NCCL for CUDA tensors with
    gloo for CPU ones on GPU machines, gloo on CPU). A single process gets no process group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if world > 1 and not dist.is_initialized():
        if backend is None:
            # gloo beside NCCL serves CPU-side collectives (checkpoint planning, offload).
            backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kw)
    return rank, world, local_rank, device


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on global rank 0 (and in a single process)."""
    return get_rank() == 0


# -- parallel dimensions and mesh ----------------------------------------------------------

@dataclass
class ParallelDims:
    """Degrees of parallelism; their product must equal the world size.

    dp_shard=-1 means "whatever is left" after dp_replicate, tp and cp. The mesh is laid out
    (dp_replicate, dp_shard, cp, tp) with tp innermost, so tensor-parallel peers are
    neighbouring ranks (the same node on a GPU cluster).
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    cp: int = 1
    world_size: int | None = None  # None: from the process group, else WORLD_SIZE, else 1

    def __post_init__(self) -> None:
        if self.world_size is None:
            if dist.is_available() and dist.is_initialized():
                self.world_size = dist.get_world_size()
            else:
                self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.validate()

    def validate(self) -> None:
        w = self.world_size
        if not isinstance(w, int) or w < 1:
            raise ValueError(f"world_size must be a positive integer, got {w!r}")
        for name in ("dp_replicate", "tp", "cp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel degree {name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.dp_shard, int) or (self.dp_shard < 1 and self.dp_shard != -1):
            raise ValueError(
                f"dp_shard must be an integer >= 1 or -1 (the rest), got {self.dp_shard!r}")
        rest = self.dp_replicate * self.tp * self.cp
        if self.dp_shard == -1:
            if w % rest:
                raise ValueError(
                    f"world size {w} is not divisible by dp_replicate*tp*cp = "
                    f"{self.dp_replicate}*{self.tp}*{self.cp} = {rest}, "
                    "so dp_shard=-1 has no value")
            self.dp_shard = w // rest
        if rest * self.dp_shard != w:
            raise ValueError(
                f"dp_replicate*dp_shard*cp*tp = {self.dp_replicate}*{self.dp_shard}*{self.cp}*"
                f"{self.tp} = {rest * self.dp_shard} does not equal the world size {w}")

    # -- what is on ----------------------------------------------------------------------
    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp_size > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Parameters sharded over dp_shard x cp (cp ranks hold the same weights)."""
        return self.dp_shard > 1 or self.cp > 1

    @property
    def dp_size(self) -> int:
        """Ranks that see different batches (data loading splits the batch this many ways)."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        """This rank's index among the `dp_size` data-parallel ranks (from the mesh layout)."""
        return get_rank() // (self.cp * self.tp)

    @property
    def loss_size(self) -> int:
        """Ranks whose target tokens add up to the global batch (dp x cp)."""
        return self.dp_size * self.cp

    def build_mesh(self, device_type: str = "cpu") -> DeviceMesh | None:
        """Build the 4-D mesh named MESH_DIMS (returned) and its flattened views.

        Reach every view through `get_mesh(name)`: the dims above, and the flattened
        `dp` (data loading), `dp_shard_cp` (FSDP sharding), `dp_cp` (the global token count
        of the loss) and, with dp_replicate > 1, the 2-D `hsdp` (dp_replicate, dp_shard_cp).
        Returns None for a single process (nothing to shard).
        """
        if self.world_size == 1:
            return None
        if not dist.is_initialized():
            raise RuntimeError("build_mesh needs a process group: call init_distributed() first")
        mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.cp, self.tp),
                                mesh_dim_names=MESH_DIMS)
        # torch >= 2.11 deprecates slicing flattened dims from the root mesh: keep them here.
        meshes = {name: mesh[name] for name in MESH_DIMS}
        meshes["dp"] = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        meshes["dp_shard_cp"] = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        meshes["dp_cp"] = mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        if self.dp_replicate_enabled:
            meshes["hsdp"] = meshes["dp_cp"]._unflatten(
                0, (self.dp_replicate, self.dp_shard * self.cp), ("dp_replicate", "dp_shard_cp"))
        self._meshes = meshes
        return mesh

    def get_mesh(self, name: str) -> DeviceMesh | None:
        """A mesh built by `build_mesh`; None in a single process (so that
        `global_token_mean_loss(..., mesh=dims.get_mesh("dp_cp"))` works in both)."""
        meshes = getattr(self, "_meshes", None)
        if meshes is None:
            if self.world_size == 1:
                return None
            raise RuntimeError("no mesh yet: call ParallelDims.build_mesh() first")
        if name not in meshes:
            raise KeyError(f"no mesh named {name!r}; have {sorted(meshes)}")
        return meshes[name]


# -- tensor parallel -----------------------------------------------------------------------

def _layers(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *,
             sequence_parallel: bool = False) -> nn.Module:
    """Megatron-style tensor parallel over `tp_mesh`, in place.

    wqkv, w1, w3 column-wise; wo, w2 row-wise; embeddings row-wise (vocab-sharded); the
    output head column-wise with its logits gathered, so the model still returns full fp32
    logits. Norm weights stay replicated. wqkv rows are grouped per KV head
    ([q_0..q_{g-1}, k, v] per group), so the default Shard(0) split hands each rank whole
    KV groups exactly when num_key_value_heads % tp == 0; `Attention.forward` reads the
    local group count from the shard.

    sequence_parallel shards the residual stream and the norms on the sequence dim
    (activation memory / tp between the matmuls). It is for training: the sequence length
    should be a multiple of tp, and `logits_to_keep` / KV-cache decoding would see only the
    local sequence shard.

    Gradients: torch gives the vocab-sharded embedding a full-size Replicate gradient and
    SP norm weights Partial ones; a post-accumulate-grad hook puts each gradient back into
    its weight's layout (FSDP, when applied after, does this itself).
    """
    cfg = model.config
    tp = tp_mesh.size()
    if cfg.num_key_value_heads % tp:
        raise ValueError(
            f"tensor parallel degree {tp} must divide num_key_value_heads "
            f"{cfg.num_key_value_heads} (each rank holds whole KV groups of the fused wqkv)")
    rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    group_rows = (cfg.q_per_kv + 2) * cfg.head_dim
    assert rows % tp == 0 and (rows // tp) % group_rows == 0  # whole groups per shard
    seq = Shard(1) if sequence_parallel else Replicate()

    parallelize_module(model, tp_mesh, {
        "model.tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "output": ColwiseParallel(input_layouts=seq, output_layouts=Replicate(),
                                  use_local_output=True),
        **({"model.norm": SequenceParallel()} if sequence_parallel else {}),
    })
    for layer in _layers(model):
        plan = {
            "attention.wqkv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=seq),
        }
        if sequence_parallel:
            # attention(x, cos, sin, ctx, cache, layer): only x is gathered along the sequence.
            plan.update({
                "attention_norm": SequenceParallel(),
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None, None, None, None),
                    desired_input_layouts=(Replicate(), None, None, None, None, None),
                    use_local_output=True),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                    use_local_output=True),
            })
        parallelize_module(layer, tp_mesh, plan)
    for param in model.parameters():
        if isinstance(param, DTensor):  # (FSDP, applied later, swaps the params and drops these)
            param.register_post_accumulate_grad_hook(_match_grad_placements)
    return model


# -- activation checkpointing --------------------------------------------------------------

def ac_layer_ids(num_layers: int, ratio: float) -> list[int]:
    """Which layers to recompute: floor(ratio * L) of them, spread evenly (0.5 -> 1, 3, 5...)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"activation checkpointing ratio must be in [0, 1], got {ratio}")
    return [i for i in range(num_layers) if math.floor((i + 1) * ratio) > math.floor(i * ratio)]


def _checkpoint_forward(module: nn.Module) -> None:
    """Recompute `module`'s forward in backward, without renaming its parameters.

    `checkpoint_wrapper` would nest the layer under `_checkpoint_wrapped_module` (changing
    named_parameters(), which FSDP, optimizers and DCP see); wrapping the bound forward
    keeps every FQN equal to the official Hugging Face name.
    """
    if getattr(module, "_ac_wrapped", False):
        return
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward
    module._ac_wrapped = True


def apply_ac(model: nn.Module, ratio: float) -> list[int]:
    """Activation checkpointing of a fraction of decoder layers (InternEvo's `checkpoint`).

    Returns the recomputed layer indices. Non-reentrant `torch.utils.checkpoint`."""
    layers = _layers(model)
    ids = ac_layer_ids(len(layers), float(ratio))
    for i in ids:
        _checkpoint_forward(layers[i])
    return ids


# -- compile -------------------------------------------------------------------------------

def apply_compile(model: nn.Module, **compile_kwargs) -> nn.Module:
    """`torch.compile` each decoder layer in place. `Module.compile` keeps the FQNs (where
    `torch.compile(layer)` would nest them under `_orig_mod`); it composes with the AC
    wrapper above and with FSDP applied after it."""
    for layer in _layers(model):
        layer.compile(**compile_kwargs)
    return model


# -- FSDP2 ---------------------------------------------------------------------------------

def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True,
               cpu_offload: bool = False, sum_gradients: bool = True) -> nn.Module:
    """FSDP2 per decoder layer, then the root (embeddings, final norm, output head).

    Parameters stay fp32 (the master weights the optimizer updates); `param_dtype=bf16`
    computes in bf16 with gradients reduced in `reduce_dtype`. reshard_after_forward=True is
    ZeRO-3; False keeps the gathered weights from forward to backward (ZeRO-2-like: sharded
    grads and optimizer state, one all-gather per step). A 2-D `dp_mesh`
    (dp_replicate, dp_shard_cp) gives HSDP. sum_gradients: reduce by sum instead of mean
    (see the module docstring on loss normalisation).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw: dict = dict(mesh=dp_mesh, mp_policy=mp)
    if cpu_offload:
        if dp_mesh.device_type == "cpu":  # it pins host memory, which needs an accelerator
            raise ValueError("cpu_offload moves sharded weights from the GPU to host memory; "
                             "the mesh is already on the CPU")
        kw["offload_policy"] = CPUOffloadPolicy()
    layers = _layers(model)
    for i, layer in enumerate(layers):
        # The last layer's weights are needed again at once by backward: keep them gathered.
        fully_shard(layer, reshard_after_forward=reshard_after_forward and i < len(layers) - 1,
                    **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    if sum_gradients:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                # A plain SUM: gloo has no PREMUL_SUM, which a factor alone would select.
                if hasattr(m, "set_force_sum_reduction_for_comms"):
                    m.set_force_sum_reduction_for_comms(True)
    return model


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None = None, *,
                ac_ratio: float = 0.0, compile: bool = False, mixed_precision: str | None = None,
                reshard_after_forward: bool = True, sequence_parallel: bool = False,
                cpu_offload: bool = False) -> nn.Module:
    """Apply TP, activation checkpointing, compile and FSDP in that order; returns `model`.

    The sub-meshes come from `dims` (after `dims.build_mesh()`, whose result `mesh` is).
    With cp > 1 the weights are sharded over dp_shard x cp here; the sequence itself is
    split per step by `maybe_context_parallel`.

    mixed_precision="bf16" takes effect through FSDP (bf16 compute, fp32 master weights and
    fp32 gradient reduction); without data parallelism the loop should use `torch.autocast`.
    """
    if mixed_precision not in (None, "fp32", "bf16"):
        raise ValueError(f"mixed_precision must be None, 'fp32' or 'bf16', got {mixed_precision!r}")
    if compile and dims.tp_enabled:
        # Checked on torch 2.13 (CPU, gloo): the compiled block's backward hands a plain
        # tensor to DTensor's redistribute backward (AttributeError '_local_tensor'), and
        # with AC the forward fails in AOTAutograd. Compile with FSDP alone works.
        raise NotImplementedError(
            "compile=True with tensor parallel fails in backward on this torch; use compile "
            "with data parallelism only, or tp without compile")
    needs_mesh = dims.tp_enabled or dims.fsdp_enabled or dims.dp_replicate_enabled
    if needs_mesh and getattr(dims, "_meshes", None) is None:
        raise ValueError(f"{dims} needs its DeviceMesh: call dims.build_mesh() first")
    if dims.tp_enabled:
        apply_tp(model, dims.get_mesh("tp"), sequence_parallel=sequence_parallel)
    if ac_ratio:
        apply_ac(model, ac_ratio)
    if compile:
        apply_compile(model)
    if dims.fsdp_enabled or dims.dp_replicate_enabled:
        if dims.tp_enabled:
            # The gathered logits are a view (DTensor.to_local); FSDP warns that an in-place
            # op on them would skip its backward hook. The loss only reads them, and a copy
            # would cost a full [B, T, vocab] fp32 tensor.
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view")
        dp_mesh = dims.get_mesh("hsdp" if dims.dp_replicate_enabled else "dp_shard_cp")
        apply_fsdp(model, dp_mesh,
                   param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
                   reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload)
    return model


# -- initialisation of a parallelized model -------------------------------------------------

@torch.no_grad()
def init_weights_sharded(model: nn.Module, seed: int, device: str | torch.device | None = None,
                         ) -> nn.Module:
    """Materialise a model parallelized on the meta device and initialise it exactly as
    `build_model(config, device, seed=seed)` would on one device.

    Each weight is drawn in full, one at a time, in `init_weights`' order, and every rank
    keeps its own shard: the result does not depend on the mesh (a run on 8 ranks starts
    from the same weights as one on 1), and it sidesteps DTensor's random ops, which on a
    CPU mesh hand every shard the same numbers. Peak extra memory: one full parameter.
    """
    from internlm2.model import RMSNorm

    if device is not None:
        model.to_empty(device=device)
    first = next(model.parameters())
    dev = first.to_local().device if isinstance(first, DTensor) else first.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    std = model.config.initializer_range

    def fill(p: torch.Tensor, draw) -> None:
        if not isinstance(p, DTensor):
            draw(p)
            return
        full = torch.empty(p.shape, dtype=p.dtype, device=dev)
        draw(full)
        p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements,
                                             src_data_rank=None).to_local())

    # The same scheme and draw order as InternLM2ForCausalLM.init_weights (tested equal).
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            fill(m.weight, lambda t: t.normal_(0.0, std, generator=gen))
            if getattr(m, "bias", None) is not None:
                fill(m.bias, lambda t: t.zero_())
        elif isinstance(m, RMSNorm):
            fill(m.weight, lambda t: t.fill_(1.0))
    return model


# -- context parallel ----------------------------------------------------------------------

@contextlib.contextmanager
def maybe_context_parallel(cp_mesh: DeviceMesh | None, buffers: Iterable[torch.Tensor] = (),
                           seq_dims: Iterable[int] = (),
                           no_restore: Iterable[torch.Tensor] = ()) -> Iterator[None]:
    """Context parallel (ring attention inside SDPA) over `cp_mesh` for the enclosed step.

    `buffers` (input_ids, labels, position_ids, ...) are sharded in place along `seq_dims`.
    Pass position_ids explicitly: the model would otherwise number the local shard from 0.
    Only plain causal attention works (no padding mask, no packed doc_ids). A no-op when
    cp_mesh is None or of size 1.
    """
    if cp_mesh is None or cp_mesh.size() == 1:
        yield
        return
    if cp_mesh.device_type != "cuda":
        raise NotImplementedError(
            "context parallel needs CUDA SDPA kernels (flash / efficient attention); "
            f"the mesh is on {cp_mesh.device_type!r}. Use cp=1 on CPU.")
    try:
        from torch.distributed.tensor.experimental import context_parallel
    except ImportError:  # pragma: no cover - torch build without it
        raise NotImplementedError("this torch build has no torch.distributed.tensor."
                                  "experimental.context_parallel; use cp=1") from None
    with context_parallel(cp_mesh, buffers=list(buffers), buffer_seq_dims=list(seq_dims),
                          no_restore_buffers=set(no_restore)):
        yield


# -- loss and gradient clipping ------------------------------------------------------------

def global_token_mean_loss(logits: torch.Tensor, labels: torch.Tensor, *,
                           mesh: DeviceMesh | None = None,
                           num_tokens: torch.Tensor | int | None = None,
                           ignore_index: int = -100) -> torch.Tensor:
    """This rank's share of the global token-mean cross entropy.

    logits [..., V] and labels [...] are already aligned (labels shifted by the caller).
    The denominator is `num_tokens` if given (e.g. counted over all micro-batches of an
    accumulation step beforehand), else this batch's target tokens summed over `mesh`
    (a 1-D mesh such as `dims.get_mesh("dp_cp")`). Summing the returned values over ranks (and
    micro-batches) gives the global mean, and so do the FSDP-summed gradients.
    """
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=ignore_index, reduction="sum")
    if num_tokens is None:
        n = (labels != ignore_index).sum()
        if mesh is not None and mesh.size() > 1:
            dist.all_reduce(n, group=mesh.get_group())
        num_tokens = n
    if not isinstance(num_tokens, torch.Tensor):
        num_tokens = torch.tensor(num_tokens)
    return loss_sum / num_tokens.to(loss_sum.device).clamp_min(1)


def _match_grad_placements(param: torch.Tensor) -> None:
    """Give a DTensor gradient its parameter's placements, in place.

    Under TP, torch returns some gradients in another layout than their weight: the
    vocab-sharded embedding gets a Replicate (full-size) gradient, replicated norm weights
    used on sequence shards (SP) get Partial(sum) ones. Optimizers would then redistribute
    at every op that touches them (an all-reduce each for Partial). FSDP reduces its
    gradients itself; this is for TP without FSDP (a post-accumulate-grad hook) and clipping.
    """
    g = param.grad
    if not isinstance(g, DTensor):
        return
    if isinstance(param, DTensor):
        if tuple(g.placements) != tuple(param.placements) and g.device_mesh == param.device_mesh:
            param.grad = g.redistribute(param.device_mesh, param.placements)
    elif any(pl.is_partial() for pl in g.placements):
        param.grad = g.redistribute(g.device_mesh,
                                    [Replicate() if pl.is_partial() else pl for pl in g.placements])


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor] | torch.Tensor, max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False) -> float:
    """Clip gradients by their total norm over every shard; returns that norm.

    Works for plain tensors and DTensors (FSDP, TP, both, mixed meshes) with one scalar
    all-reduce over the world: each rank contributes sum(|local shard|^p), weighted by the
    share of the world that holds a copy of that shard (a DTensor is replicated over its
    Replicate dims and over every rank outside its mesh; a plain tensor over all ranks).
    torch's `clip_grad_norm_` stacks DTensor norms, which fails when meshes differ (TP +
    FSDP without SP puts norm weights on the dp mesh and linear weights on the 2-D mesh).
    """
    if isinstance(params, torch.Tensor):
        params = [params]
    params = [q for q in params if q.grad is not None]
    if not params:
        return 0.0
    for q in params:
        _match_grad_placements(q)
    p = float(norm_type)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    groups: dict[tuple, list[torch.Tensor]] = {}
    locals_ = []
    for q in params:
        g = q.grad
        shards = 1  # a plain tensor: the same on every rank
        if isinstance(g, DTensor):
            for dim, pl in enumerate(g.placements):
                if not pl.is_replicate():  # Shard or _StridedShard (FSDP over TP)
                    shards *= g.device_mesh.size(dim)
            g = g.to_local()
        locals_.append(g)
        if g.numel():
            groups.setdefault((g.device, g.dtype, shards / world), []).append(g)
    dev = locals_[0].device
    parts = []
    for (_, _, weight), gs in groups.items():
        norms = torch.stack(torch._foreach_norm(gs, p)).to(torch.float64)
        parts.append(norms.max() if math.isinf(p) else (norms ** p).sum() * weight)
    acc = torch.stack([x.to(dev) for x in parts]) if parts else torch.zeros(1, device=dev)
    acc = acc.max() if math.isinf(p) else acc.sum()
    if world > 1:
        dist.all_reduce(acc, op=dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM)
    total = float(acc) if math.isinf(p) else float(acc) ** (1.0 / p)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(f"the total gradient norm is {total}; not clipping")
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(locals_, coef)
    return total


__all__ = ["MESH_DIMS", "ParallelDims", "ac_layer_ids", "apply_ac", "apply_compile", "apply_fsdp",
           "apply_tp", "clip_grad_norm_", "destroy_distributed", "get_rank",
           "global_token_mean_loss", "init_distributed", "init_weights_sharded", "is_main",
           "maybe_context_parallel", "parallelize"]
