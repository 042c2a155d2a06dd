"""The compiled single-token decode step behind `GenerationConfig(compile=True)`.

`generate` decodes one prompt with `torch.compile(_decode_step)` over a preallocated KV cache
of a fixed length (rounded up to 256), so every step has the same shapes and one graph is
traced once and reused. Inductor's freezing bakes the weights into the graph (prepacked
matmul weights: most of the CPU speed-up), so a compiled step belongs to one model and is
rebuilt whenever a parameter changes.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from .model import apply_rotary, rope_theta

_STATIC_BUCKET = 256  # the static cache length is rounded up to this, so calls share a graph


def _decode_step(model: Any, tok: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, cos_table: torch.Tensor,
                 sin_table: torch.Tensor) -> torch.Tensor:
    """One token per row (tok [B, 1]) at position `pos` (a 0-d long tensor, same for every
    row: no padding) over the whole preallocated cache k/v [L, B, nKV, S, D], with the keys
    past `pos` masked out. Every shape is fixed for a given cache, so a compiled version is
    traced once and reused for every step. Returns fp32 logits [B, V].

    The same arithmetic as `InternLM2ForCausalLM.forward` on a one-token decode step
    (modules are called, so wrappers such as LoRA layers still apply); only the K/V write
    (index_put_ at a tensor position) and the masked attention over the fixed length differ.
    """
    h = model.model.tok_embeddings(tok)
    b = tok.shape[0]
    where = pos.view(1)
    cos = cos_table.index_select(0, where).view(1, 1, 1, 1, -1)
    sin = sin_table.index_select(0, where).view(1, 1, 1, 1, -1)
    key_ok = (torch.arange(k_cache.shape[3], device=tok.device) <= pos).view(1, 1, 1, -1)
    for i, layer in enumerate(model.model.layers):
        att = layer.attention
        g, d = att.q_per_kv, att.head_dim
        qkv = att.wqkv(layer.attention_norm(h)).view(b, 1, -1, g + 2, d)
        qk = apply_rotary(qkv[..., : g + 1, :], cos, sin)
        nkv = qkv.shape[2]
        # One index_put_ on the whole cache tensor (indices: layer, slot): inductor turns it
        # into an in-place store of the new slot. Writing through a per-layer view instead
        # makes it copy the whole layer cache every step.
        layer_at = torch.full_like(where, i)
        k_cache[layer_at, :, :, where] = qk[..., g, :].transpose(0, 1)  # [1, B, nKV, D]
        v_cache[layer_at, :, :, where] = qkv[..., g + 1, :].transpose(0, 1)
        # The query heads of a KV group folded into the sequence axis (as model._sdpa does).
        out = F.scaled_dot_product_attention(qk[..., :g, :].reshape(b, nkv, g, d), k_cache[i],
                                             v_cache[i], attn_mask=key_ok)
        h = h + att.wo(out.reshape(b, 1, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.model.norm(h)).float()[:, -1]


# model -> (weights signature, compiled step). Weak keys: dropping a model drops its graph.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_N_COMPILED = 0


def _weights_signature(model: Any) -> tuple:
    return tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())


def _compile_step(model: Any) -> Any:
    """The compiled `_decode_step` for `model`, built on first use and again whenever a
    parameter changed (freezing bakes the weights into the graph and prepacks the matmul
    weights, which is where most of the CPU speed-up comes from)."""
    sig = _weights_signature(model)
    hit = _COMPILED.get(model)
    if hit is not None and hit[0] == sig:
        return hit[1]
    # A private copy of the function's code object: dynamo keeps compiled graphs per code
    # object and a frozen graph does not guard on weight values, so compiling
    # `_decode_step` itself would let this model reuse another model's (or its own stale)
    # weights. The copy dies with the entry, and its graphs with it.
    global _N_COMPILED
    _N_COMPILED += 1
    code = _decode_step.__code__.replace(co_name=f"_decode_step_{_N_COMPILED}")
    private = types.FunctionType(code, _decode_step.__globals__, code.co_name)
    fn = torch.compile(private, fullgraph=True, dynamic=False)
    _COMPILED[model] = (sig, fn)
    return fn


def _call_freezing(fn: Any, *args: Any) -> torch.Tensor:
    """Call a compiled step with inductor's freezing switched on. Freezing is read when the
    graph is traced (parameters become constants), so `options=` is not enough; the first
    step of every call goes through here (shapes are fixed within a call, so later steps
    never compile and skip the config patch)."""
    with torch._inductor.config.patch(freezing=True):
        return fn(*args)


def _static_plan(model: Any, cfg: Any, n: int, t_max: int, budget: int) -> int | None:
    """The static cache length if the compiled step applies to this call, else None."""
    if not cfg.compile or n != 1 or not (hasattr(model, "output") and hasattr(model, "rotary")):
        return None
    # Dynamic NTK: the eager loop uses the base of length (prompt + step); the compiled step
    # one table, so it only applies when that base is the same for the whole run.
    if rope_theta(model.config, t_max + 1) != rope_theta(model.config, t_max + budget):
        return None
    return -(-(t_max + budget) // _STATIC_BUCKET) * _STATIC_BUCKET
