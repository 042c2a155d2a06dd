"""Fused, chunked LM head + cross entropy (the Liger-kernel idea, written from scratch).

The plain path `F.cross_entropy(h @ W.T)` materialises fp32 logits [N, V] (4096 x 8192 is
134 MB), then streams them and their gradient through memory several more times: softmax,
the loss, the gradient of the logits, and two backward matmuls. Here the rows are walked in
chunks: each chunk's logits, its log-sum-exp, its loss and, at once, its logits gradient
(softmax - onehot) are computed in place in one reused fp32 buffer, and the gradient is pushed
straight into grad_hidden (g @ W) and grad_weight (g^T @ h). With more rows than one chunk no
[N, V] tensor exists; backward only scales the two saved gradients by the scalar grad_output.
The saved grad_weight costs one fp32 copy of the head weight from forward to backward.

The forward therefore does the backward's work; it is meant for training (`loss.backward()`
follows). Under `torch.no_grad()`, or when neither input requires grad, only the loss is
computed and no gradient buffer is allocated.
"""

from __future__ import annotations

import torch

# Rows per chunk. Measured on CPU (2 threads, hidden 384, vocab 8192, 4096 rows: bench/train.py's
# shape): bigger chunks were faster all the way up (512: ~1.45-1.65 s, 1024: ~1.35 s, 2048:
# ~1.2 s, 4096: ~1.13 s for fwd+bwd, vs ~1.4-1.5 s for matmul + F.cross_entropy): the GEMMs
# lose efficiency and the [V, H] grad_weight accumulator is read and written once per chunk,
# which costs more than keeping the chunk in cache wins. So the budget bounds memory, not cache.
_CHUNK_LOGIT_BYTES = 64 * 2**20  # fp32 chunk logits budget
_MIN_CHUNK_ROWS = 1024


def default_chunk_rows(num_rows: int, vocab: int) -> int:
    """Rows per chunk: a 64 MiB fp32 logits chunk (2048 rows at vocab 8192), at least 1024 rows
    (few passes over the [V, H] grad_weight accumulator), never more than the input has."""
    rows = max(_MIN_CHUNK_ROWS, _CHUNK_LOGIT_BYTES // (4 * max(1, vocab)))
    return max(1, min(num_rows, rows))


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [rows, hidden_size], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[1]}] (hidden_size of `hidden`), "
                         f"got shape {tuple(weight.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be [{hidden.shape[0]}] (one per row of `hidden`), "
                         f"got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(f"hidden, weight and labels must share a device, got {hidden.device}, "
                         f"{weight.device}, {labels.device}")


def _chunked(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
             ignore_index: int, chunk_rows: int, want_h: bool, want_w: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """loss_sum (fp32), grad_hidden (hidden's dtype) or None, grad_weight (fp32) or None."""
    n = hidden.shape[0]
    dtype = hidden.dtype
    w = weight if weight.dtype == dtype else weight.to(dtype)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
        if want_w else None
    buf = torch.empty(min(n, chunk_rows), weight.shape[0], dtype=torch.float32,
                      device=hidden.device) if dtype == torch.float32 else None
    for s in range(0, n, chunk_rows):
        e = min(n, s + chunk_rows)
        hc = hidden[s:e]
        lab = labels[s:e]
        valid = lab != ignore_index
        tgt = torch.where(valid, lab, 0).long()[:, None]
        # Everything below is in place on the chunk's fp32 logits: a fresh [c, V] buffer per
        # step (log_softmax, then exp) measured ~1.6x slower on CPU than these passes.
        if buf is not None:  # fp32: one logits buffer for every chunk (no page faults)
            x = torch.mm(hc, w.T, out=buf[: e - s])
        else:
            x = (hc @ w.T).float()
        target_logit = x.gather(1, tgt).squeeze(1)
        m = x.amax(dim=-1)
        x.sub_(m[:, None]).exp_()
        total = x.sum(dim=-1)
        lse = m + total.log()
        loss += torch.where(valid, lse - target_logit, 0.0).sum()
        if not (want_h or want_w):
            continue
        # softmax - onehot, zero on ignored rows: scaling by valid / total does both the
        # normalisation and the masking in one pass.
        vf = valid.to(torch.float32)
        x.mul_((vf / total)[:, None])
        x.scatter_add_(1, tgt, -vf[:, None])
        g = x.to(dtype)
        if grad_h is not None:
            torch.mm(g, w, out=grad_h[s:e])
        if grad_w is not None:
            if dtype == torch.float32:
                grad_w.addmm_(g.T, hc)
            else:
                grad_w += (g.T @ hc).float()
    return loss, grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None)


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_rows):  # type: ignore[override]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_h, grad_w = _chunked(hidden, weight, labels, ignore_index, chunk_rows,
                                        want_h, want_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(labels)
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        # grad_out is a scalar (1/num_targets in train_step); scaling here is O(N*H + V*H).
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_out.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None


# Dynamo cannot trace this Function (a Python loop doing the backward's work in forward);
# under torch.compile(loss_fn) it runs eagerly between graphs: it is all GEMMs anyway.
@torch.compiler.disable
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum over rows of cross_entropy(hidden @ weight.T, labels), without the [N, V] logits.

    hidden [N, H], weight [V, H] (an `nn.Linear` weight without bias; may be tied to an
    embedding), labels [N] with `ignore_index` for rows that do not count. Returns
    (loss_sum, count): the fp32 summed loss (0 when every row is ignored) and the number of
    counted rows. Logits are computed in the inputs' dtype and soft-maxed in fp32; gradients
    come back in the inputs' dtypes (grad_weight accumulated in fp32). Under an enabled
    autocast both operands are cast to its dtype first, as `nn.Linear` would be.
    chunk_rows: rows per chunk, default `default_chunk_rows(N, V)`.
    """
    _check(hidden, weight, labels)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(hidden.shape[0], weight.shape[0])
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    count = (labels != ignore_index).sum()
    dev_type = hidden.device.type
    if torch.is_autocast_enabled(dev_type):
        low = torch.get_autocast_dtype(dev_type)
        hidden, weight = hidden.to(low), weight.to(low)  # differentiable casts
    elif hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ "
                         "outside autocast")
    with torch.autocast(dev_type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            loss = _FusedLinearCE.apply(hidden, weight, labels, ignore_index, chunk_rows)
        else:
            loss, _, _ = _chunked(hidden, weight, labels, ignore_index, chunk_rows, False, False)
    return loss, count


__all__ = ["default_chunk_rows", "fused_linear_cross_entropy"]
