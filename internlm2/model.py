"""The InternLM2 decoder, exactly as released (see REFERENCE.md section 1).

Single-device code: parallelism is applied from outside (internlm2/train/parallel.py).
Parameter names equal the official Hugging Face state-dict names, so loading and saving
needs no renaming.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

try:  # flash varlen attention (CUDA kernels) for packed training; absent in older torch
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except Exception:  # pragma: no cover - depends on the torch build
    _varlen_attn = None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype, then scaled by the weight."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written out rather than F.rms_norm: on CPU that is a composite of more ops.
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


# -- rotary embedding ----------------------------------------------------------------------

@lru_cache(maxsize=64)
def _inv_freq_cpu(head_dim: int, theta: float) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta ** exponent)


def rope_theta(config: ModelConfig, seq_len: int) -> float:
    """The rotary base used for a sequence of `seq_len` tokens (dynamic NTK aware)."""
    rs = config.rope_scaling
    theta = float(config.rope_theta)
    if rs and rs["type"] == "dynamic" and seq_len > config.max_position_embeddings:
        f, d = rs["factor"], config.head_dim
        theta = theta * ((f * seq_len / config.max_position_embeddings) - (f - 1)) ** (d / (d - 2))
    return theta


class RotaryTable:
    """cos and sign-folded sin tables indexed by position, built once per rotary base.

    `apply_rotary(x, cos, sin)` is then `x * cos + roll(x, D/2) * sin` (rotate-half with the
    minus sign folded into the first half of `sin`): four elementwise ops per call.
    """

    def __init__(self) -> None:
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # Kept out of compiled graphs: filling the dict inside one would make guards fail and
    # recompile on the next call.
    @torch.compiler.disable
    def get(self, config: ModelConfig, theta: float, length: int, device, dtype):
        key = (theta, str(device), dtype)
        hit = self._tables.get(key)
        if hit is not None and hit[0].shape[0] >= length:
            return hit
        if len(self._tables) > 8:  # dynamic NTK makes a new base per length past max_pos
            self._tables.clear()
        n = max(length, 2 * hit[0].shape[0] if hit is not None else 0, 4096)
        inv_freq = _inv_freq_cpu(config.head_dim, theta).to(device)
        pos = torch.arange(n, device=device, dtype=torch.float32)
        rs = config.rope_scaling
        if rs and rs["type"] == "linear":
            pos = pos / rs["factor"]
        freqs = pos[:, None] * inv_freq  # [n, D/2] in fp32
        cos = torch.cat((freqs, freqs), dim=-1).cos()
        sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
        table = (cos.to(dtype), sin.to(dtype))
        self._tables[key] = table
        return table


def rotary_cos_sin(config: ModelConfig, position_ids: torch.Tensor, seq_len: int,
                   dtype: torch.dtype, table: RotaryTable | None = None,
                   max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin of shape [B, T, 1, head_dim] for `apply_rotary`.

    `max_position` bounds the positions when the caller knows it (no device read)."""
    theta = rope_theta(config, seq_len)
    table = table or RotaryTable()
    if max_position is None:
        max_position = int(position_ids.max()) if position_ids.numel() else 0
    cos, sin = table.get(config, theta, max_position + 1, position_ids.device, dtype)
    return cos[position_ids][:, :, None], sin[position_ids][:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding; `sin` carries the sign (see RotaryTable)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# -- KV cache ------------------------------------------------------------------------------

class KVCache:
    """Contiguous per-layer key/value cache for generation.

    Keys are stored after rotation. Rows may hold left padding: `key_mask` marks the
    valid slots and `seen` counts the valid tokens per row (for position ids).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len,
                 config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.batch_size = batch_size
        self.length = 0
        self.key_mask: torch.Tensor | None = None  # [B, max_len] bool, only once padding is seen
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        end = self.length + t
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def check_room(self, t: int) -> None:
        if self.length + t > self.max_len:
            raise ValueError(
                f"KV cache full: {self.length} cached + {t} new tokens > max_len {self.max_len}")

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only the given batch rows (e.g. drop finished sequences)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.k.device)
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        self.seen = self.seen.index_select(0, rows)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, rows)
        self.batch_size = len(rows)


# -- attention -----------------------------------------------------------------------------

def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          causal: bool) -> torch.Tensor:
    """q [B, nH, T, D], k/v [B, nKV, S, D] -> [B, nH, T, D] with grouped-query attention."""
    b, nh, t, d = q.shape
    nkv = k.shape[1]
    g = nh // nkv
    if t == 1 and g > 1:
        # Decode: fold the query heads of a KV group into the sequence axis so K/V are
        # read once per group, with no copy (the grouped wqkv layout makes this a view).
        out = F.scaled_dot_product_attention(q.view(b, nkv, g, d), k, v, attn_mask=mask)
        return out.view(b, nh, 1, d)
    use_causal = causal and mask is None and t > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=use_causal,
                                          enable_gqa=g > 1)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
            max_len: int) -> torch.Tensor:
    """Packed causal attention with the flash varlen kernel over the flattened batch.

    q [B, nH, T, D], k/v [B, nKV, T, D]; cu_seqlens indexes the B*T flattened tokens."""
    b, nh, t, d = q.shape
    qv, kv, vv = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v))
    out = _varlen_attn(qv, kv, vv, cu_seqlens, cu_seqlens, max_len, max_len,
                       window_size=(-1, 0), enable_gqa=nh != k.shape[1])
    return out.view(b, t, nh, d).transpose(1, 2)


_cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _sdpa_after(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """A chunk of T queries after `past` cached keys (no padding): every cached key is
    visible, the chunk's own keys causally. Chunked prefill of a long prompt lands here.

    An explicit [T, past + T] mask would grow with the context (CPU SDPA turns it into a float
    tensor: 8 MB per 1k cached tokens at T = 2048), so on CPU the two parts run as two maskless
    flash calls (the cached part with the query heads of a KV group folded into the sequence
    axis, the chunk itself causal) merged by their log-sum-exps: memory stays flat."""
    b, nh, t, d = q.shape
    nkv = k.shape[1]
    g = nh // nkv
    if _cpu_flash is None or q.device.type != "cpu" or q.dtype != torch.float32:
        q_pos = past + torch.arange(t, device=q.device)
        mask = torch.arange(past + t, device=q.device)[None, :] <= q_pos[:, None]
        return _sdpa(q, k, v, mask, causal=False)
    qa = q.reshape(b, nkv, g * t, d)
    a, lse_a = _cpu_flash(qa, k[:, :, :past], v[:, :, :past], 0.0, False)
    kn, vn = k[:, :, past:], v[:, :, past:]
    if g > 1:
        kn, vn = kn.repeat_interleave(g, dim=1), vn.repeat_interleave(g, dim=1)
    c, lse_c = _cpu_flash(q, kn, vn, 0.0, True)
    a, lse_a = a.reshape(b, nh, t, d), lse_a.reshape(b, nh, t)
    m = torch.maximum(lse_a, lse_c)
    wa, wc = (lse_a - m).exp_().unsqueeze(-1), (lse_c - m).exp_().unsqueeze(-1)
    return (a * wa + c * wc) / (wa + wc)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.head_dim = config.head_dim
        self.q_per_kv = config.q_per_kv
        nh, nkv, h = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
        kw = dict(device=device, dtype=dtype)
        self.wqkv = nn.Linear(h, (nh + 2 * nkv) * self.head_dim, bias=config.bias, **kw)
        self.wo = nn.Linear(nh * self.head_dim, h, bias=config.bias, **kw)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: "_AttnContext",
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        g, d = self.q_per_kv, self.head_dim
        # Rows of wqkv are grouped per KV head: [q_0 .. q_{g-1}, k, v] for each group.
        # The number of local groups is read from the tensor so a tensor-parallel shard works.
        qkv = self.wqkv(x).view(b, t, -1, g + 2, d)
        # Queries and key of each group sit side by side: rotate them in one op.
        qk = apply_rotary(qkv[..., : g + 1, :], cos[:, :, :, None], sin[:, :, :, None])
        q = qk[..., :g, :].reshape(b, t, -1, d).transpose(1, 2)
        k = qk[..., g, :].transpose(1, 2)
        v = qkv[..., g + 1, :].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if ctx.cu_seqlens is not None:
            out = _varlen(q, k, v, ctx.cu_seqlens, ctx.max_len)
        elif ctx.past:
            out = _sdpa_after(q, k, v, ctx.past)
        else:
            out = _sdpa(q, k, v, ctx.mask, causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        kw = dict(device=device, dtype=dtype, bias=False)
        self.w1 = nn.Linear(h, i, **kw)  # gate
        self.w3 = nn.Linear(h, i, **kw)  # up
        self.w2 = nn.Linear(i, h, **kw)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.attention = Attention(config, device, dtype)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.feed_forward = FeedForward(config, device, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: "_AttnContext",
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, ctx, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class _AttnContext:
    """What every layer needs to know about the attention pattern of one forward."""

    __slots__ = ("mask", "cu_seqlens", "max_len", "past")

    def __init__(self, mask=None, cu_seqlens=None, max_len=0, past=0):
        self.mask, self.cu_seqlens, self.max_len = mask, cu_seqlens, max_len
        self.past = past  # > 0: a chunk after `past` cached keys, no padding (_sdpa_after)


class InternLM2Model(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                           device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, device, dtype) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[0, 3, 5] -> [0, 0, 0, 1, 1] (a document index for each packed token)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if int(lengths.sum()) != total:
        raise ValueError(f"cu_seqlens covers {int(lengths.sum())} tokens, the input has {total}")
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at each document start. doc_ids [B, T]."""
    t = doc_ids.shape[-1]
    idx = torch.arange(t, device=doc_ids.device).expand_as(doc_ids)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - first


def _cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    b, t = doc_ids.shape
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.nonzero(start.reshape(-1)).flatten()
    cu = torch.cat([starts, torch.tensor([b * t], device=doc_ids.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


class InternLM2ForCausalLM(nn.Module):
    """InternLM2 causal LM. `model(input_ids)` returns fp32 logits [B, T, V]."""

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.model = InternLM2Model(config, device, dtype)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False,
                                device=device, dtype=dtype)
        self.rotary = RotaryTable()  # not a buffer: rebuilt on demand, never saved

    # -- construction ----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """normal(0, initializer_range) for linear and embedding weights, ones for norms."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.reset_parameters()

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= sum(m.weight.numel() for m in (self.model.tok_embeddings,
                                                getattr(self, "output", None)) if m is not None)
        return n

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.model.tok_embeddings.weight
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        rope_seq_len: int | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Run the decoder.

        input_ids: [B, T]. attention_mask: [B, T] (1 = token, 0 = padding) for the new
        tokens (with a cache, earlier rows' padding is remembered). doc_ids [B, T] or
        cu_seqlens (flash-attn style over the flattened batch) pack several documents in
        a row: positions restart per document and attention never crosses documents.
        logits_to_keep > 0 computes logits for the last positions only. rope_seq_len fixes
        the length used by dynamic NTK scaling (chunked prefill passes the full length so
        every chunk uses one rotary base). return_hidden returns the final normed hidden
        states [B, T, H] instead of logits.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        dev = input_ids.device
        past = cache.length if cache is not None else 0
        if cache is not None:
            cache.check_room(t)
        if cu_seqlens is not None:
            if doc_ids is not None:
                raise ValueError("pass doc_ids or cu_seqlens, not both")
            doc_ids = doc_ids_from_cu_seqlens(cu_seqlens.to(dev), b * t).view(b, t)
        if doc_ids is not None and cache is not None:
            raise ValueError("packed documents (doc_ids/cu_seqlens) are for training, not with a KV cache")

        if attention_mask is not None:
            attention_mask = attention_mask.to(dev).bool()
            if attention_mask.shape == (b, past + t):
                attention_mask = attention_mask[:, past:]
            if attention_mask.shape != (b, t):
                raise ValueError(f"attention_mask must be [batch, seq] = {(b, t)}, "
                                 f"got {tuple(attention_mask.shape)}")
            if bool(attention_mask.all()):
                attention_mask = None if cache is None or cache.key_mask is None else attention_mask

        # An upper bound of the positions, known on the host (None: read it from the tensor).
        max_position = None if position_ids is not None else past + t - 1
        if position_ids is None:
            if doc_ids is not None:
                position_ids = positions_from_doc_ids(doc_ids)
            elif attention_mask is not None:
                base = cache.seen[:, None] if cache is not None else 0
                position_ids = (base + attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            else:
                base = cache.seen[:, None] if cache is not None and cache.key_mask is not None else past
                position_ids = base + torch.arange(t, device=dev)[None, :]
                position_ids = position_ids.expand(b, t)
        if cache is not None:
            cache.seen += attention_mask.long().sum(-1) if attention_mask is not None else t

        ctx = self._attn_context(b, t, past, attention_mask, doc_ids, cache, dev)
        h = self.model.tok_embeddings(input_ids)
        if rope_seq_len is None and self.config.rope_scaling and \
                self.config.rope_scaling["type"] == "dynamic":
            rope_seq_len = int(position_ids.max()) + 1
        cos, sin = rotary_cos_sin(self.config, position_ids, rope_seq_len or 0, h.dtype,
                                  self.rotary, max_position)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, ctx, cache, i)
        if cache is not None:
            cache.length += t
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        h = self.model.norm(h)
        if return_hidden:
            return h
        return self.output(h).float()

    def _attn_context(self, b, t, past, attention_mask, doc_ids, cache, dev) -> _AttnContext:
        s = past + t
        key_mask = None
        if attention_mask is not None or (cache is not None and cache.key_mask is not None):
            if cache is not None:
                if cache.key_mask is None:
                    cache.key_mask = torch.ones(b, cache.max_len, dtype=torch.bool, device=dev)
                if attention_mask is not None:
                    cache.key_mask[:, past:s] = attention_mask
                key_mask = cache.key_mask[:, :s]
            else:
                key_mask = attention_mask
        if doc_ids is not None and _varlen_attn is not None and doc_ids.is_cuda \
                and self.model.tok_embeddings.weight.dtype in (torch.float16, torch.bfloat16):
            cu, max_len = _cu_seqlens_from_doc_ids(doc_ids)
            return _AttnContext(cu_seqlens=cu, max_len=max_len)
        if key_mask is None and doc_ids is None and (past == 0 or t == 1):
            return _AttnContext()  # plain causal (or a decode step that sees every key)
        if key_mask is None and doc_ids is None:
            return _AttnContext(past=past)  # a chunk after cached keys
        q_pos = past + torch.arange(t, device=dev)
        k_pos = torch.arange(s, device=dev)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None]  # [1, T, S]
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, :]
        if doc_ids is not None:
            allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
        # A padding query sees no valid key; let it see itself so no row is all -inf.
        allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None]
        return _AttnContext(mask=allowed[:, None])


class InternLM2ForRewardModel(InternLM2ForCausalLM):
    """The InternLM2 reward model (as the released internlm2-*-reward checkpoints): the same
    decoder with the vocabulary head replaced by a scalar head `v_head` [1, hidden].

    `model(input_ids, ...)` returns one fp32 value per position [B, T] (PPO's critic uses
    them all); `score()` reads the value at each row's last real token, which for reward
    scoring is the appended reward token (`config.extra["reward_token_id"]`)."""

    hf_architecture = "InternLM2ForRewardModel"

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        nn.Module.__init__(self)
        self.config = config
        self.model = InternLM2Model(config, device, dtype)
        self.v_head = nn.Linear(config.hidden_size, 1, bias=False, device=device, dtype=dtype)
        self.rotary = RotaryTable()

    @property
    def reward_token_id(self) -> int | None:
        return self.config.extra.get("reward_token_id")

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:  # type: ignore[override]
        kwargs.pop("return_hidden", None)
        kwargs.pop("logits_to_keep", None)
        h = super().forward(input_ids, return_hidden=True, **kwargs)
        out = self.v_head(h).squeeze(-1)
        # a fresh tensor, not a view (FSDP2 warns about modules returning views)
        return out.float() if out.dtype != torch.float32 else out.clone()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              **kwargs) -> torch.Tensor:
        """One score per row [B]: the value at the last real token (left or right padding)."""
        values = self(input_ids, attention_mask=attention_mask, **kwargs)
        return gather_last(values, attention_mask)


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """values [B, T] at each row's last position where attention_mask is 1 (the last column
    without a mask)."""
    if attention_mask is None:
        return values[:, -1]
    m = attention_mask.to(values.device).long()
    t = m.shape[1]
    idx = (m * torch.arange(1, t + 1, device=m.device)).argmax(-1)
    return values.gather(1, idx[:, None]).squeeze(1)


def build_model(config: ModelConfig, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, seed: int | None = None,
                init: bool = True) -> InternLM2ForCausalLM:
    """Build on the meta device, materialise on `device`, then run `init_weights()`."""
    with torch.device("meta"):
        model = InternLM2ForCausalLM(config, dtype=dtype)
    model.to_empty(device=device)
    if init:
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(gen)
    return model


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N (non-embedding matmuls + output) + causal attention."""
    n = config.num_params(embeddings=False) + config.vocab_size * config.hidden_size
    attn = 6 * config.num_hidden_layers * config.hidden_size * seq_len  # 12*L*H*T/2 (causal)
    return 6.0 * n + attn


__all__ = ["RMSNorm", "KVCache", "InternLM2ForCausalLM", "InternLM2ForRewardModel", "gather_last", "build_model", "rope_theta",
           "RotaryTable", "rotary_cos_sin", "apply_rotary", "positions_from_doc_ids", "flops_per_token",
           "doc_ids_from_cu_seqlens"]
