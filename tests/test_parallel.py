"""Parallelism on CPU with gloo at world size 2 against a single-process reference (fp32).

One spawn runs every world-2 case (FSDP, FSDP + AC with ZeRO-2-like resharding and meta
init, TP, TP + sequence parallel with meta init) so process start-up is paid once; one
more spawn at world size 4 checks FSDP x TP on a 2-D mesh.
"""

from __future__ import annotations

import multiprocessing
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from internlm2.config import ModelConfig
from internlm2.model import build_model
from internlm2.train.parallel import (
    ParallelDims,
    ac_layer_ids,
    apply_ac,
    apply_compile,
    clip_grad_norm_,
    global_token_mean_loss,
    init_weights_sharded,
    parallelize,
)

WORLD = 2
CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2)
LR = 1e-3
CASES = ("fsdp", "fsdp_ac_zero2", "tp", "tp_sp")
META_INIT = ("fsdp_ac_zero2", "tp_sp")  # built on the meta device, then init_weights_sharded
DIMS = {"fsdp": dict(dp_shard=2), "fsdp_ac_zero2": dict(dp_shard=2), "tp": dict(tp=2, dp_shard=1),
        "tp_sp": dict(tp=2, dp_shard=1), "fsdp_tp": dict(dp_shard=2, tp=2)}


def _model(meta=False):
    if meta:
        return build_model(ModelConfig(**CFG), device="meta", init=False)
    return build_model(ModelConfig(**CFG), seed=0)


def _batch():
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, CFG["vocab_size"], (4, 16), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :11] = -100  # uneven masks: rank 0's half has far fewer target tokens
    labels[1, 3:6] = -100
    return ids, labels


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8,
                             weight_decay=0.1)


def _full(t):
    from torch.distributed.tensor import DTensor
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _reference():
    torch.manual_seed(0)
    model = _model()
    ids, labels = _batch()
    logits = model(ids)
    loss = global_token_mean_loss(logits, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.nn.utils.get_total_norm(list(grads.values())).item()
    max_norm = norm / 2  # clipping really happens, and mildly (Adam is sign-sensitive near 0)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    _optimizer(model).step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return dict(logits=logits.detach(), loss=loss.item(), grads=grads, norm=norm,
                params=params, max_norm=max_norm)


def _run_case(case, max_norm):
    import torch.distributed as dist

    dims = ParallelDims(**DIMS[case])
    mesh = dims.build_mesh("cpu")
    model = _model(meta=case in META_INIT)
    names_before = list(model.state_dict())
    parallelize(model, dims, mesh, ac_ratio=0.5 if case == "fsdp_ac_zero2" else 0.0,
                reshard_after_forward=case != "fsdp_ac_zero2", sequence_parallel=case == "tp_sp")
    assert list(model.state_dict()) == names_before  # FQNs survive every wrapper
    if case in META_INIT:
        init_weights_sharded(model, seed=0, device="cpu")
    ids, labels = _batch()
    per = ids.shape[0] // dims.dp_size
    rows = slice(dims.dp_rank * per, (dims.dp_rank + 1) * per)
    ids, labels = ids[rows], labels[rows]
    logits = model(ids)
    loss = global_token_mean_loss(logits, labels, mesh=dims.get_mesh("dp_cp"))
    loss.backward()
    total = loss.detach().clone()
    if dims.dp_size > 1:
        dist.all_reduce(total, group=dims.get_mesh("dp").get_group())
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    norm = clip_grad_norm_(model.parameters(), max_norm)
    _optimizer(model).step()
    params = {n: _full(p) for n, p in model.named_parameters()}
    return dict(logits=logits.detach(), loss=total.item(), grads=grads, norm=norm, params=params,
                dp_rank=dims.dp_rank, dp_size=dims.dp_size)


def _worker(rank, world, port, out_dir, max_norm, cases):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from internlm2.train.parallel import destroy_distributed, init_distributed
    init_distributed()
    try:
        results = {case: _run_case(case, max_norm) for case in cases}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        destroy_distributed()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp_path, world, cases, ref):
    # A fork server imports torch once and forks the ranks from it (spawn would import it
    # in every rank: most of this test's time on a 2-core machine). It is fork-safe: it has
    # run no OpenMP region, unlike this process.
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch.distributed.tensor", "internlm2.train.parallel"])
    mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path), ref["max_norm"], cases),
                       nprocs=world, join=True, start_method="forkserver")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.fixture(scope="module")
def runs(reference, tmp_path_factory):
    return reference, _spawn(tmp_path_factory.mktemp("parallel"), WORLD, CASES, reference)


def _close(a, b, what, atol=1e-5):
    assert a.shape == b.shape, what
    err = (a - b).abs().max().item()
    assert err <= atol, f"{what}: max abs diff {err:.3g}"


def _check(ref, ranks, case):
    for r, res in enumerate(ranks):
        got = res[case]
        assert abs(got["loss"] - ref["loss"]) <= 1e-5, (r, got["loss"], ref["loss"])
        assert abs(got["norm"] - ref["norm"]) <= 1e-5 * max(1.0, ref["norm"]), (r, got["norm"])
        assert set(got["grads"]) == set(ref["grads"])
        for n in ref["grads"]:
            _close(got["grads"][n], ref["grads"][n], f"rank {r} {case} grad {n}")
            _close(got["params"][n], ref["params"][n], f"rank {r} {case} param {n}")
        per = 4 // got["dp_size"]  # each data-parallel rank holds its part of the batch
        i = got["dp_rank"]
        _close(got["logits"], ref["logits"][i * per:(i + 1) * per], f"rank {r} {case} logits")


@pytest.mark.parametrize("case", CASES)
def test_parallel_step_matches_single_process(runs, case):
    ref, ranks = runs
    _check(ref, ranks, case)


@pytest.mark.slow
def test_fsdp_x_tp_2d_mesh_world4(reference, tmp_path):
    """FSDP over TP on a (dp_shard=2, tp=2) mesh: norm weights live on the dp mesh and the
    linear weights on the 2-D one, which torch's own clip_grad_norm_ cannot combine."""
    _check(reference, _spawn(tmp_path, 4, ("fsdp_tp",), reference), "fsdp_tp")


# importing torch._dynamo (for Module.compile) triggers a torch-internal deprecation warning
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_activation_checkpointing_and_compile_keep_names_and_gradients():
    ids, labels = _batch()
    plain, ckpt = _model(), _model()
    assert apply_ac(ckpt, 1.0) == [0, 1]
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    compiled = apply_compile(_model())  # lazy: names only, compiling takes ~30 s on this CPU
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in plain.named_parameters()]
    for m in (plain, ckpt):
        global_token_mean_loss(m(ids), labels).backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.equal(a.grad, b.grad), n
    assert ac_layer_ids(4, 0.5) == [1, 3]
    assert ac_layer_ids(4, 0.0) == [] and ac_layer_ids(3, 1.0) == [0, 1, 2]
    with pytest.raises(ValueError):
        ac_layer_ids(4, 1.5)


def test_parallel_dims_validation():
    d = ParallelDims(dp_replicate=2, tp=2, world_size=8)
    assert d.dp_shard == 2 and d.dp_size == 4 and d.fsdp_enabled and d.tp_enabled
    assert not d.cp_enabled and d.loss_size == 4
    single = ParallelDims(world_size=1)
    assert single.dp_shard == 1 and not single.dp_enabled and single.build_mesh() is None
    assert single.get_mesh("dp_cp") is None and single.dp_rank == 0
    with pytest.raises(ValueError, match="does not equal the world size"):
        ParallelDims(dp_shard=2, tp=2, world_size=8)
    with pytest.raises(ValueError, match="not divisible"):
        ParallelDims(tp=3, world_size=8)
    with pytest.raises(ValueError, match="tp must be an integer >= 1"):
        ParallelDims(tp=0, world_size=2)
    with pytest.raises(ValueError, match="dp_shard must be"):
        ParallelDims(dp_shard=0, world_size=2)
    with pytest.raises(NotImplementedError, match="tensor parallel"):
        parallelize(_model(), ParallelDims(tp=2, world_size=2), compile=True)
    with pytest.raises(ValueError, match="build_mesh"):
        parallelize(_model(), ParallelDims(tp=2, world_size=2))


def test_clip_and_loss_helpers_single_process():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert clip_grad_norm_([p], 1.0) == pytest.approx(5.0)
    assert torch.allclose(p.grad, torch.tensor([0.6, 0.8, 0.0]), atol=1e-6)
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, -100, 2], [0, 4, -100]])
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1))
    assert global_token_mean_loss(logits, labels).item() == pytest.approx(ref.item(), abs=1e-6)
    assert global_token_mean_loss(logits, labels, num_tokens=8).item() == \
        pytest.approx(ref.item() * 4 / 8, abs=1e-6)


def test_context_parallel_guard():
    from internlm2.train.parallel import maybe_context_parallel
    with maybe_context_parallel(None):
        pass

    class FakeMesh:
        device_type = "cpu"

        def size(self):
            return 2

    with pytest.raises(NotImplementedError, match="CUDA"), maybe_context_parallel(FakeMesh()):
        pass
