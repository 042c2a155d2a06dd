"""The fused, chunked LM head + cross entropy: the same loss and gradients as
`F.cross_entropy(h @ W.T, reduction="sum")` (ignored rows, ragged chunks, tied and frozen
weights, low precision, autocast, eval), and `causal_lm_loss` unchanged by using it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from internlm2.config import ModelConfig
from internlm2.model import build_model
from internlm2.train import loop
from internlm2.train.fused_ce import default_chunk_rows, fused_linear_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")

N, H, V = 37, 16, 50


def _data(dtype=torch.float32, seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return h, w, labels


def _reference(h, w, labels, need_h=True, need_w=True):
    h = h.detach().clone().requires_grad_(need_h)
    w = w.detach().clone().requires_grad_(need_w)
    loss = F.cross_entropy((h @ w.T).float(), labels, ignore_index=-100, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _fused(h, w, labels, need_h=True, need_w=True, scale=1.0, **kw):
    h = h.detach().clone().requires_grad_(need_h)
    w = w.detach().clone().requires_grad_(need_w)
    loss, count = fused_linear_cross_entropy(h, w, labels, **kw)
    (loss * scale).backward()
    return loss.detach(), count, h.grad, w.grad


def _close(a, b, rtol=1e-5):
    assert a.dtype == b.dtype and a.shape == b.shape
    scale = b.abs().max().clamp_min(1e-12)
    assert float((a - b).abs().max() / scale) <= rtol


@pytest.mark.parametrize("chunk_rows", [1, 8, 10, 37, 64, None])
def test_matches_reference_fp32(chunk_rows):
    h, w, labels = _data()
    ref_loss, ref_gh, ref_gw = _reference(h, w, labels)
    loss, count, gh, gw = _fused(h, w, labels, chunk_rows=chunk_rows)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert int(count) == int((labels != -100).sum())
    _close(loss, ref_loss)
    _close(gh, ref_gh)
    _close(gw, ref_gw)
    assert gh[::4].abs().max() == 0  # ignored rows get no gradient


def test_grad_output_scales_gradients():
    h, w, labels = _data()
    _, ref_gh, ref_gw = _reference(h, w, labels)
    _, _, gh, gw = _fused(h, w, labels, scale=0.25, chunk_rows=8)
    _close(gh, ref_gh * 0.25)
    _close(gw, ref_gw * 0.25)


def test_all_ignored():
    h, w, _ = _data()
    labels = torch.full((N,), -100)
    loss, count, gh, gw = _fused(h, w, labels, chunk_rows=8)
    assert float(loss) == 0.0 and int(count) == 0
    assert gh.abs().max() == 0 and gw.abs().max() == 0


def test_frozen_weight_and_constant_hidden():
    h, w, labels = _data()
    ref_loss, ref_gh, ref_gw = _reference(h, w, labels)
    loss, _, gh, gw = _fused(h, w, labels, need_w=False, chunk_rows=10)
    assert gw is None
    _close(loss, ref_loss)
    _close(gh, ref_gh)
    loss, _, gh, gw = _fused(h, w, labels, need_h=False, chunk_rows=10)
    assert gh is None
    _close(gw, ref_gw)


def test_tied_weight_gets_both_gradients():
    """The head weight is the embedding table: its gradient sums both uses."""
    g = torch.Generator().manual_seed(1)
    table = torch.randn(V, H, generator=g) * 0.5
    ids = torch.randint(0, V, (N,), generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = -100
    proj = torch.randn(H, H, generator=g) * 0.3

    def run(fused: bool):
        e = nn.Embedding(V, H)
        with torch.no_grad():
            e.weight.copy_(table)
        hidden = torch.tanh(e(ids) @ proj)
        if fused:
            loss, _ = fused_linear_cross_entropy(hidden, e.weight, labels, chunk_rows=6)
        else:
            loss = F.cross_entropy(hidden @ e.weight.T, labels, reduction="sum")
        loss.backward()
        return loss.detach(), e.weight.grad

    ref_loss, ref_g = run(False)
    loss, grad = run(True)
    _close(loss, ref_loss)
    _close(grad, ref_g)


def test_eval_no_grad_keeps_no_graph():
    h, w, labels = _data()
    ref_loss, _, _ = _reference(h, w, labels)
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.no_grad():
        loss, count = fused_linear_cross_entropy(hg, wg, labels, chunk_rows=8)
    assert not loss.requires_grad and loss.grad_fn is None
    assert int(count) == int((labels != -100).sum())
    _close(loss, ref_loss)
    # Plain tensors (no requires_grad) take the same loss-only path.
    loss2, _ = fused_linear_cross_entropy(h, w, labels, chunk_rows=5)
    assert loss2.grad_fn is None
    _close(loss2, ref_loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtypes(dtype):
    h, w, labels = _data(dtype)
    ref_loss, ref_gh, ref_gw = _reference(h, w, labels)
    loss, _, gh, gw = _fused(h, w, labels, chunk_rows=8)
    assert loss.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    _close(loss, ref_loss, rtol=1e-2)
    _close(gh, ref_gh, rtol=2e-2)
    _close(gw, ref_gw, rtol=2e-2)


def test_autocast_matches_linear_under_autocast():
    h, w, labels = _data()
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(hr, wr).float(), labels, reduction="sum")
        loss, _ = fused_linear_cross_entropy(hf, wf, labels, chunk_rows=9)
    ref.backward()
    loss.backward()
    assert wf.grad.dtype == torch.float32 and hf.grad.dtype == torch.float32
    _close(loss.detach(), ref.detach(), rtol=1e-2)
    _close(hf.grad, hr.grad, rtol=2e-2)
    _close(wf.grad, wr.grad, rtol=2e-2)


def test_bad_input_raises():
    h, w, labels = _data()
    with pytest.raises(ValueError, match="weight"):
        fused_linear_cross_entropy(h, w[:, :-1], labels)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(h, w, labels[:-1])
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_cross_entropy(h, w, labels, chunk_rows=0)
    with pytest.raises(ValueError, match="dtypes differ"):
        fused_linear_cross_entropy(h, w.bfloat16(), labels)
    assert default_chunk_rows(10, 8192) == 10 and default_chunk_rows(10**6, 8192) >= 256


# -- causal_lm_loss ------------------------------------------------------------------------

def _tiny_model():
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    return build_model(cfg, seed=0)


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (2, 24), generator=g)
    labels = torch.randint(0, 96, (2, 24), generator=g)
    labels[0, :5] = -100
    labels[1, 17] = -100
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    return {"input_ids": ids, "labels": labels, "doc_ids": doc_ids}


def _loss_and_grads(model, batch, fn):
    model.zero_grad(set_to_none=True)
    loss, count = fn(model, batch)
    (loss / count).backward()
    return loss.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_causal_lm_loss_fused_equals_logits_path():
    model, batch = _tiny_model(), _batch()
    assert loop._fused_head(model) is model.output
    ref = _loss_and_grads(model, batch,
                          lambda m, b: (loop.token_losses(m, b).sum(), loop.count_targets(b)))
    got = _loss_and_grads(model, batch, loop.fused_causal_lm_loss)
    _close(got[0], ref[0])
    assert int(got[1]) == int(ref[1]) == 48 - 6
    assert ref[2].keys() == got[2].keys()
    for name in ref[2]:
        _close(got[2][name], ref[2][name])


def test_causal_lm_loss_falls_back_for_wrapped_heads():
    from internlm2.align.lora import LoRALinear

    model = _tiny_model()
    model.output = LoRALinear(model.output, r=2)
    assert loop._fused_head(model) is None
    loss, count = loop.fused_causal_lm_loss(model, _batch())  # the logits path still works
    assert torch.isfinite(loss) and int(count) == 42

    model = _tiny_model()
    model.output.register_forward_hook(lambda m, i, o: o)
    assert loop._fused_head(model) is None
    biased = _tiny_model()
    biased.output = nn.Linear(32, 96, bias=True)
    assert loop._fused_head(biased) is None
    assert loop._fused_head(nn.Linear(4, 4)) is None


@pytest.mark.slow
def test_compiled_loss_fn_runs_the_fused_head_eagerly():
    """torch.compile(causal_lm_loss) (bench/train.py's ours-compile-loss): dynamo cannot trace
    the Function, so it runs between graphs with the same result."""
    model, batch = _tiny_model(), _batch()
    ref = _loss_and_grads(model, batch, loop.fused_causal_lm_loss)
    got = _loss_and_grads(model, batch, torch.compile(loop.fused_causal_lm_loss))
    _close(got[0], ref[0], rtol=1e-4)
    for name in ref[2]:
        _close(got[2][name], ref[2][name], rtol=1e-4)
