"""Continuous-batching inference engine with a paged KV cache (the core of `internlm2 serve`).

Why not `generate.generate()`: that loop runs one fixed batch to the end, so a server would
either make clients wait for each other or run them one at a time. Here requests join and
leave the running batch at every step:

* KV cache: per layer a pool of fixed-size blocks [num_blocks, block_size, kv_heads, head_dim];
  each sequence owns a block table. Attention gathers only the blocks each running sequence
  uses into a padded batch and calls SDPA with a key mask.
* Scheduler (one `step()`): decode every running sequence (one token each), then spend up to
  `prefill_token_budget` tokens on prompts (long prompts are prefilled in chunks across steps).
  All of it runs as ONE forward over the flattened tokens: the linear layers see [1, N, H].
* When blocks run out, the newest sequence is preempted by recompute: its blocks are freed and
  it goes back to the front of the queue with its generated tokens to be recomputed; its output
  stream continues where it was.
* Prefix caching: full blocks are hashed (chained with the previous block's hash) and shared by
  reference count; freed hashed blocks stay reusable until evicted (LRU).

`Engine` is synchronous (one thread calls `step()`); `AsyncEngine` (async_engine.py, re-exported
here) runs it on a background thread for asyncio servers; block bookkeeping is kv_blocks.py. The model's own modules run in an engine-side forward, so
`model.py` needs no paged-attention code.
"""

from __future__ import annotations

import itertools
import math
import operator
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .generate import (
    IncrementalDecoder,
    _draw,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    warp_logits,
)
from .kv_blocks import BlockPool
from .model import apply_rotary, rope_theta, rotary_cos_sin

__all__ = ["AsyncEngine", "Engine", "RequestOutput", "SamplingParams", "TokenLogprob"]

IM_END_ID = 92542


@dataclass
class SamplingParams:
    """Per-request sampling and stopping. `temperature == 0` means greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            bad("temperature", "must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 = off)")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0 (1 = off)")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20):
            bad("logprobs", "must be None or an integer in [0, 20]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer or None")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not isinstance(s, str) for s in self.stop):
            bad("stop", "must be a list of strings")
        self.stop = tuple(s for s in self.stop if s)
        if self.stop_token_ids is not None:
            if any(isinstance(i, bool) or not isinstance(i, int) for i in self.stop_token_ids):
                bad("stop_token_ids", "must be a list of integers")
            self.stop_token_ids = tuple(self.stop_token_ids)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    request_id: str
    prompt_tokens: int
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None
    cached_tokens: int = 0


@dataclass(eq=False)
class _Seq:
    """One request. `tokens` = prompt + generated; KV exists for tokens[:num_computed]."""

    rid: str
    prompt_len: int
    params: SamplingParams
    tokens: list[int]
    stop_ids: frozenset[int]
    decoder: IncrementalDecoder | None
    generator: torch.Generator | None
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_hashed: int = 0  # leading blocks already registered in the prefix cache
    last_hash: int | None = None
    cached_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len:]


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil  # type: ignore
        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 4 << 30


class Engine:
    """Synchronous continuous-batching core; exactly one thread calls `step()`.

    block_size: tokens per KV block. num_blocks: pool size; None sizes it from
    `memory_fraction` of free memory (CUDA: mem_get_info; CPU: available RAM), capped at what
    `max_batch_size` sequences of `session_len` tokens can use. session_len: most tokens
    (prompt + max_tokens) one request may hold; None = max_position_embeddings; always capped
    at the pool's capacity so any accepted request can run alone. prefill_token_budget:
    prompt tokens computed per step beside the decodes (longer prompts are chunked).
    eos_token_ids: the default stop ids (None: the tokenizer's `stop_ids` (eos and <|im_end|>),
        else the model's eos and <|im_end|> 92542 when in vocab).
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, block_size: int = 16,
                 num_blocks: int | None = None, memory_fraction: float = 0.3,
                 max_batch_size: int = 32, session_len: int | None = None,
                 prefill_token_budget: int = 512, prefix_caching: bool = True,
                 eos_token_ids: Sequence[int] | None = None):
        cfg = model.config
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: must be >= 1")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: must be >= 1")
        if prefill_token_budget < 1:
            raise ValueError(f"prefill_token_budget={prefill_token_budget}: must be >= 1")
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction={memory_fraction}: must be in (0, 1]")
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, cfg
        p = model.model.tok_embeddings.weight
        self.device, self.dtype = p.device, p.dtype
        self.block_size, self.max_batch_size = block_size, max_batch_size
        self.prefill_token_budget, self.prefix_caching = prefill_token_budget, prefix_caching
        nkv, d, L = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
        want_len = session_len or cfg.max_position_embeddings
        if num_blocks is None:
            per_block = 2 * L * block_size * nkv * d * p.element_size()
            by_mem = int(_available_memory(self.device) * memory_fraction) // per_block
            # Never more than every slot of a full batch at full length can use.
            num_blocks = max(1, min(by_mem, max_batch_size * math.ceil(want_len / block_size)))
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: must be >= 1")
        self.session_len = min(want_len, num_blocks * block_size)
        shape = (num_blocks + 1, block_size, nkv, d)
        # torch.empty: pages are committed only as blocks are first used (zeroed then), so a
        # large pool costs nothing up front; block 0 (padding) is zeroed now.
        self.k_cache = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in range(L)]
        self.v_cache = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in range(L)]
        self.pool = BlockPool(num_blocks)
        self._zero_block(0)
        if eos_token_ids is None:
            # The tokenizer knows its own <|im_end|> (92542 only in the official vocabulary).
            tok_stops = getattr(tokenizer, "stop_ids", None)
            eos_token_ids = list(tok_stops) if tok_stops else \
                [cfg.eos_token_id] + ([IM_END_ID] if cfg.vocab_size > IM_END_ID else [])
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self._seqs: dict[str, _Seq] = {}
        self._aborted: list[_Seq] = []
        self._ids = itertools.count()

    # -- public properties ----------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_total_blocks(self) -> int:
        return self.pool.total

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting or self._aborted)

    # -- requests -------------------------------------------------------------------------
    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError if the request can never run (no state is touched)."""
        prompt_ids = _as_ids(prompt_ids)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        if len(prompt_ids) == 0:
            raise ValueError("prompt is empty; give at least one token (e.g. BOS)")
        vocab = self.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt has token id(s) outside [0, {vocab}): {bad[:5]}")
        if len(prompt_ids) + params.max_tokens > self.session_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens + max_tokens {params.max_tokens} "
                             f"> session_len {self.session_len}")
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop (stop strings) needs an engine tokenizer")

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        """Queue a request; it joins the running batch at the next step with room."""
        prompt_ids = _as_ids(prompt_ids)
        self.check_request(prompt_ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        if rid in self._seqs:
            raise ValueError(f"request_id {rid!r} is already in use")
        stops = set(params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids)
        if params.ignore_eos:
            stops -= set(self.eos_token_ids)
        dec = IncrementalDecoder(self.tokenizer, params.stop, prompt_ids) if self.tokenizer else None
        gen = None
        if params.seed is not None and params.temperature > 0:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = _Seq(rid, len(prompt_ids), params, list(prompt_ids), frozenset(stops), dec, gen)
        self._seqs[rid] = seq
        self.waiting.append(seq)
        return rid

    def abort(self, request_id: str) -> None:
        """Free the request's blocks now; its final output ("abort") comes with the next step."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._free(seq)
        seq.finish_reason = "abort"
        self._aborted.append(seq)

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[RequestOutput]:
        """Run the prompts to completion; the final outputs in prompt order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        for p, sp in zip(prompts, plist):
            self.check_request(p, sp)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(rids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[r] for r in rids]

    # -- blocks ---------------------------------------------------------------------------
    def _zero_block(self, b: int) -> None:
        for kc, vc in zip(self.k_cache, self.v_cache):
            kc[b].zero_()
            vc[b].zero_()

    def _free(self, seq: _Seq) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.num_hashed, seq.last_hash = [], 0, 0, None

    def _grow(self, seq: _Seq, n_tokens: int) -> bool:
        """Make room for KV of tokens[:n_tokens]; False (nothing taken) if blocks are short."""
        need = math.ceil(n_tokens / self.block_size) - len(seq.blocks)
        if need > self.pool.num_free:
            return False
        for _ in range(max(0, need)):
            b, fresh = self.pool.allocate()
            if fresh:
                self._zero_block(b)
            seq.blocks.append(b)
        return True

    def _match_prefix(self, seq: _Seq) -> None:
        """Reuse cached full blocks; at least one token stays uncomputed (its logits are needed)."""
        if not self.prefix_caching or seq.num_computed:
            return
        bs = self.block_size
        for i in range((len(seq.tokens) - 1) // bs):
            toks = tuple(seq.tokens[i * bs:(i + 1) * bs])
            h = hash((seq.last_hash, toks))
            b = self.pool.lookup(h, toks)
            if b is None:
                break
            seq.blocks.append(b)
            seq.last_hash, seq.num_hashed, seq.num_computed = h, i + 1, (i + 1) * bs
        seq.cached_tokens = max(seq.cached_tokens, min(seq.num_computed, seq.prompt_len))

    def _register_full_blocks(self, seq: _Seq) -> None:
        if not self.prefix_caching:
            return
        bs = self.block_size
        while (seq.num_hashed + 1) * bs <= seq.num_computed:
            i = seq.num_hashed
            toks = tuple(seq.tokens[i * bs:(i + 1) * bs])
            h = hash((seq.last_hash, toks))
            self.pool.register(seq.blocks[i], h, toks)
            seq.last_hash, seq.num_hashed = h, i + 1

    def _preempt(self, seq: _Seq) -> None:
        self.running.remove(seq)
        self._free(seq)
        self.waiting.appendleft(seq)

    # -- scheduling -----------------------------------------------------------------------
    def _schedule(self) -> list[tuple[_Seq, int, int]]:
        """(seq, start, n): compute tokens[start:start+n] for each scheduled sequence."""
        budget = self.prefill_token_budget
        plan: list[tuple[_Seq, int, int]] = []
        preempted = False
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            left = len(seq.tokens) - seq.num_computed
            n = 1 if left == 1 else min(left, budget)
            if n == 0:
                i += 1
                continue
            while not self._grow(seq, seq.num_computed + n):
                victim = self.running[-1]  # newest first: recompute costs it the least
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                if left > 1:
                    budget -= n
                plan.append((seq, seq.num_computed, n))
                i += 1
        # No admissions in a step that had to preempt: the victim would just thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            self._match_prefix(seq)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + n):
                self._free(seq)  # give matched prefix blocks back; retry next step
                break
            self.waiting.popleft()
            self.running.append(seq)
            plan.append((seq, seq.num_computed, n))
            budget -= n
        return plan

    # -- the forward ----------------------------------------------------------------------
    def _rotary(self, plan: list[tuple[_Seq, int, int]], pos: torch.Tensor, dtype: torch.dtype):
        cfg = self.model.config
        # rope_seq_len as generate() uses it: the whole prompt while prefilling, then the length.
        lens = [max(s.prompt_len, st + n) for s, st, n in plan]
        if not (cfg.rope_scaling and cfg.rope_scaling["type"] == "dynamic") or \
                len({rope_theta(cfg, x) for x in lens}) == 1:
            return rotary_cos_sin(cfg, pos[None], lens[0], dtype, self.model.rotary,
                                  max(st + n for _, st, n in plan) - 1)
        parts, off = [], 0
        for (s, st, n), ln in zip(plan, lens):
            parts.append(rotary_cos_sin(cfg, pos[None, off:off + n], ln, dtype, self.model.rotary,
                                        st + n - 1))
            off += n
        return torch.cat([c for c, _ in parts], 1), torch.cat([s for _, s in parts], 1)

    @torch.inference_mode()
    def _forward(self, plan: list[tuple[_Seq, int, int]], want: list[int]) -> torch.Tensor | None:
        """One forward over all scheduled tokens (writes their KV); logits [len(want), V]
        (fp32) at the flattened token indices `want`, None if `want` is empty."""
        cfg, dev, bs = self.model.config, self.device, self.block_size
        ids, pos, slots = [], [], []
        for seq, st, n in plan:
            ids.extend(seq.tokens[st:st + n])
            for p in range(st, st + n):
                pos.append(p)
                slots.append(seq.blocks[p // bs] * bs + p % bs)
        ids_t = torch.tensor(ids, device=dev)
        pos_t = torch.tensor(pos, device=dev)
        slots_t = torch.tensor(slots, device=dev)
        # Single-token rows (decodes) share one batched attention call; chunks go one by one.
        dec = [j for j, (_, _, n) in enumerate(plan) if n == 1]
        offs = list(itertools.accumulate([n for _, _, n in plan], initial=0))
        if dec:
            dec_rows = torch.tensor([offs[j] for j in dec], device=dev)
            nblk = max(len(plan[j][0].blocks) for j in dec)
            table = torch.zeros(len(dec), nblk, dtype=torch.long)
            for r, j in enumerate(dec):
                blocks = plan[j][0].blocks
                table[r, :len(blocks)] = torch.tensor(blocks)
            table = table.to(dev).flatten()
            klen = torch.tensor([plan[j][1] + 1 for j in dec], device=dev)
            dmask = (torch.arange(nblk * bs, device=dev)[None, :] < klen[:, None])[:, None, None, :]
        nkv, d, g = cfg.num_key_value_heads, cfg.head_dim, cfg.q_per_kv
        h = self.model.model.tok_embeddings(ids_t)[None]  # [1, N, H]
        cos, sin = self._rotary(plan, pos_t, h.dtype)
        cos, sin = cos[:, :, :, None], sin[:, :, :, None]
        N = len(ids)
        for li, layer in enumerate(self.model.model.layers):
            attn = layer.attention
            qkv = attn.wqkv(layer.attention_norm(h)).view(N, nkv, g + 2, d)
            qk = apply_rotary(qkv[None, :, :, :g + 1], cos, sin)[0]
            q, k, v = qk[:, :, :g], qk[:, :, g], qkv[:, :, g + 1]
            kc, vc = self.k_cache[li], self.v_cache[li]
            kc.view(-1, nkv, d).index_copy_(0, slots_t, k)
            vc.view(-1, nkv, d).index_copy_(0, slots_t, v)
            out = torch.empty(N, nkv, g, d, device=dev, dtype=h.dtype)
            if dec:
                kd = kc.index_select(0, table).view(len(dec), -1, nkv, d).transpose(1, 2)
                vd = vc.index_select(0, table).view(len(dec), -1, nkv, d).transpose(1, 2)
                # Query heads of a KV group ride the sequence axis: K/V read once per group.
                out[dec_rows] = F.scaled_dot_product_attention(q[dec_rows], kd, vd, attn_mask=dmask)
            for j, (seq, st, n) in enumerate(plan):
                if n == 1:
                    continue
                a = offs[j]
                qj = q[a:a + n].reshape(n, nkv * g, d).transpose(0, 1)[None]
                if st == 0:
                    kj, vj = k[a:a + n].transpose(0, 1)[None], v[a:a + n].transpose(0, 1)[None]
                    o = F.scaled_dot_product_attention(qj, kj, vj, is_causal=True, enable_gqa=g > 1)
                else:
                    blk = torch.tensor(seq.blocks[:math.ceil((st + n) / bs)], device=dev)
                    kj = kc.index_select(0, blk).view(-1, nkv, d)[:st + n].transpose(0, 1)[None]
                    vj = vc.index_select(0, blk).view(-1, nkv, d)[:st + n].transpose(0, 1)[None]
                    m = torch.arange(st + n, device=dev)[None, :] <= torch.arange(st, st + n, device=dev)[:, None]
                    o = F.scaled_dot_product_attention(qj, kj, vj, attn_mask=m, enable_gqa=g > 1)
                out[a:a + n] = o[0].transpose(0, 1).reshape(n, nkv, g, d)
            h = h + attn.wo(out.view(1, N, -1))
            h = h + layer.feed_forward(layer.ffn_norm(h))
        if not want:
            return None
        h = self.model.model.norm(h[0, want])
        return self.model.output(h).float()

    # -- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, sample, and report what each request produced."""
        outputs = [self._make_output(s, [], "", None) for s in self._aborted]
        self._aborted = []
        plan = self._schedule()
        if not plan:
            if self.waiting and not self.running:
                raise RuntimeError("no KV blocks for the next waiting request (pool too small)")
            return outputs
        offs = list(itertools.accumulate([n for _, _, n in plan], initial=0))
        samplers = [(seq, offs[j + 1] - 1) for j, (seq, st, n) in enumerate(plan)
                    if st + n == len(seq.tokens)]
        logits = self._forward(plan, [i for _, i in samplers])
        for seq, st, n in plan:
            seq.num_computed = st + n
            self._register_full_blocks(seq)
        if not samplers:
            return outputs
        toks, lps = self._sample(logits, [s for s, _ in samplers])
        for r, (seq, _) in enumerate(samplers):
            outputs.append(self._advance(seq, toks[r], lps[r] if lps else None))
        return outputs

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]):
        toks = logits.argmax(-1)
        proc_rows = [r for r, s in enumerate(seqs) if s.params.temperature > 0 or _penalized(s.params)]
        for r in proc_rows:
            s, p = seqs[r], seqs[r].params
            row = logits[r:r + 1]
            if _penalized(p):
                out = torch.tensor(s.output, dtype=torch.long, device=row.device)
                if p.repetition_penalty != 1.0:
                    seen = torch.zeros_like(row, dtype=torch.bool)
                    seen[0, torch.tensor(s.tokens, device=row.device)] = True
                    row = apply_repetition_penalty(row, seen, p.repetition_penalty)
                if p.presence_penalty or p.frequency_penalty:
                    counts = torch.bincount(out, minlength=row.shape[-1]).to(row.dtype)[None]
                    row = apply_presence_frequency_penalty(row, counts, p.presence_penalty,
                                                           p.frequency_penalty)
            if p.temperature > 0:
                toks[r] = _draw(warp_logits(row, p.temperature, p.top_k, p.top_p), s.generator)[0]
            else:
                toks[r] = row.argmax(-1)[0]
        tok_list = toks.tolist()
        lps = None
        rows = [r for r, s in enumerate(seqs) if s.params.logprobs is not None]
        if rows:
            lps = [None] * len(seqs)
            ls = torch.log_softmax(logits[rows], -1)
            chosen = ls.gather(1, toks[rows][:, None])[:, 0].tolist()
            k = max(seqs[r].params.logprobs for r in rows)
            tv, ti = ls.topk(k, -1) if k else (ls[:, :0], ls[:, :0].long())
            tv, ti = tv.tolist(), ti.tolist()
            for i, r in enumerate(rows):
                kk = seqs[r].params.logprobs
                lps[r] = TokenLogprob(tok_list[r], chosen[i], list(zip(ti[i][:kk], tv[i][:kk])))
        return tok_list, lps

    def _advance(self, seq: _Seq, tok: int, lp: TokenLogprob | None) -> RequestOutput:
        p = seq.params
        new, delta, reason = [tok], "", None
        if tok in seq.stop_ids:
            new, reason = [], "stop"
            delta = seq.decoder.flush() if seq.decoder else ""
        else:
            seq.tokens.append(tok)
            if seq.decoder is not None:
                delta = seq.decoder.push(tok)
                if seq.decoder.stopped is not None:
                    reason = "stop"
            if reason is None and len(seq.output) >= p.max_tokens:
                reason = "length"
                delta += seq.decoder.flush() if seq.decoder else ""
        seq.text += delta
        if reason is not None:
            seq.finish_reason = reason
            self.running.remove(seq)
            self._free(seq)
            del self._seqs[seq.rid]
        return self._make_output(seq, new, delta, [lp] if lp is not None and new else None)

    def _make_output(self, seq: _Seq, new: list[int], delta: str, lps) -> RequestOutput:
        if lps is None and seq.params.logprobs is not None:
            lps = []
        return RequestOutput(seq.rid, seq.prompt_len, new, delta, list(seq.output), seq.text, lps,
                             seq.finish_reason is not None, seq.finish_reason, seq.cached_tokens)

    # -- embeddings -----------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, prompts: list[list[int]]) -> torch.Tensor:
        """Mean-pooled final (normed) hidden states [N, hidden] in fp32."""
        if not prompts:
            raise ValueError("embed: no prompts given")
        rows = []
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"embed: prompt {i} is empty")
            if min(p) < 0 or max(p) >= self.config.vocab_size:
                raise ValueError(f"embed: prompt {i} has a token id outside [0, {self.config.vocab_size})")
            if len(p) > self.session_len:
                raise ValueError(f"embed: prompt {i} has {len(p)} tokens > session_len {self.session_len}")
            ids = torch.tensor([p], device=self.device)
            rows.append(self.model(ids, return_hidden=True)[0].float().mean(0))
        return torch.stack(rows)


def _as_ids(prompt_ids: Any) -> list[int]:
    if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__iter__"):
        raise ValueError(f"prompt must be a list of token ids, got {type(prompt_ids).__name__}")
    try:
        return [operator.index(t) for t in prompt_ids]
    except TypeError as e:
        raise ValueError(f"prompt must be a list of integer token ids ({e})") from None


def _penalized(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


from .async_engine import AsyncEngine
