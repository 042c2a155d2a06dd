"""The one generation loop: KV-cached, batched, streaming.

Everything that samples from a model (chat CLI, server, agent, PPO rollouts) goes through
`generate()`, a generator that yields one `StepOutput` per decode step:

    for step in generate(model, [1, 333, 444], max_new_tokens=32, temperature=0.8, seed=0):
        step.tokens          # [token] (one entry per prompt; None for rows already finished)
        step.finish_reasons  # [None] until a row stops: "stop" (stop id / string) or "length"

`collect()` turns the steps into `Completion`s (tokens, log-probs, text, finish reason);
`stream_text()` / `generate_text()` are the text-in, text-out conveniences.

Batches of prompts of different lengths are left-padded internally; rows that finish are
dropped from the batch (`KVCache.select`) so the work shrinks with them. The prompt is
prefilled in one forward (or `prefill_chunk`-token chunks) that computes logits for the last
position only; then each step feeds one token per row. Per step there is one device->host
transfer (the sampled tokens, which the caller needs anyway); stop ids are checked on the
host, stop strings on incrementally decoded text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .decode_step import _call_freezing, _compile_step, _static_plan
from .model import rope_theta

__all__ = [
    "Completion",
    "GenerationConfig",
    "IncrementalDecoder",
    "StepOutput",
    "TextStream",
    "apply_presence_frequency_penalty",
    "apply_repetition_penalty",
    "collect",
    "generate",
    "generate_text",
    "sample_next",
    "stream_text",
    "top_k_filter",
    "top_p_filter",
    "warp_logits",
]

_PAD = 0  # id written into left padding; masked out, so any valid id works
_DECODE_CONTEXT = 5  # prompt tokens kept as left context for incremental detokenization


# -- configuration ----------------------------------------------------------------------------

@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop. `temperature == 0` means greedy."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0  # stop ids are suppressed and stop strings ignored before this
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    # HF semantics: for tokens already in prompt + output, positive logits are divided by the
    # penalty, negative ones multiplied. 1.0 = off.
    repetition_penalty: float = 1.0
    # OpenAI semantics over generated tokens: logit -= presence * [count > 0] + frequency * count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: draw from torch's global generator
    stop_ids: Sequence[int] | None = None  # None = [model.config.eos_token_id]; [] = never
    stop_strings: Sequence[str] = ()  # needs a tokenizer; text is cut before the match
    max_length: int | None = None  # cap on prompt + generated tokens per row
    prefill_chunk: int = 0  # > 0: prefill the prompt in chunks of this many tokens
    logprobs: bool = False  # report the log-prob of each sampled token
    top_logprobs: int = 0  # also report the k most likely tokens per step
    # True: log-probs of the model's own distribution (OpenAI/vLLM style). False: of the
    # distribution actually sampled from (after penalties, temperature, top-k/top-p), the
    # behaviour policy an RL update needs when sampling was warped.
    raw_logprobs: bool = True
    # True: decode a single prompt with a torch.compile'd single-token step over a fixed-size
    # KV cache (`decode_step.py`). The first call per model compiles (seconds); the weights
    # are frozen into the graph, so a later weight update triggers a fresh compile. Other
    # cases (batches, a rotary base that changes mid-run) silently use the eager step.
    compile: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    @classmethod
    def chat(cls, **overrides: Any) -> GenerationConfig:
        """The official chat helper's defaults (REFERENCE.md section 3)."""
        return cls(**{"temperature": 0.8, "top_p": 0.8, "max_new_tokens": 1024, **overrides})

    def replace(self, **changes: Any) -> GenerationConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"GenerationConfig.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if self.min_new_tokens < 0:
            bad("min_new_tokens", "must be >= 0")
        if not self.temperature >= 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            bad("top_k", "must be >= 0 (0 = off)")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0 (1 = off)")
        if self.max_length is not None and self.max_length < 2:
            bad("max_length", "must be >= 2")
        if self.prefill_chunk < 0:
            bad("prefill_chunk", "must be >= 0 (0 = whole prompt at once)")
        if not 0 <= self.top_logprobs <= 100:
            bad("top_logprobs", "must be in [0, 100]")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        if any(not isinstance(s, str) for s in self.stop_strings):
            bad("stop_strings", "must be a list of strings")
        self.stop_strings = tuple(s for s in self.stop_strings if s)
        if self.stop_ids is not None:
            if isinstance(self.stop_ids, int):
                self.stop_ids = (self.stop_ids,)
            self.stop_ids = tuple(int(i) for i in self.stop_ids)


def _resolve_config(config: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
    config = config or GenerationConfig()
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(GenerationConfig)}
        if unknown:
            raise TypeError(f"unknown generation option(s): {sorted(unknown)}")
        config = config.replace(**overrides)
    return config


# -- sampling helpers (pure functions on fp32 logits [B, V]) ------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF repetition penalty: where `seen` [B, V] is true, divide positive logits by
    `penalty` and multiply negative ones."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency_penalty(logits: torch.Tensor, counts: torch.Tensor,
                                     presence: float, frequency: float) -> torch.Tensor:
    """OpenAI penalties; `counts` [B, V] holds how often each token was generated."""
    if frequency:
        logits = logits - frequency * counts
    if presence:
        logits = logits - presence * (counts > 0).to(logits.dtype)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th kept too); -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass
    reaches `p` (always at least the most likely one); -inf elsewhere."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int = 0,
                top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order transformers uses)."""
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def _draw(warped: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Exponential race: argmax(p / E) with E ~ Exp(1) is a sample from p. No host sync,
    # unlike torch.multinomial on CUDA.
    probs = warped.softmax(-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of `logits` [B, V]: argmax when temperature is 0, else a sample
    from the warped distribution."""
    if temperature <= 0:
        return logits.argmax(-1)
    return _draw(warp_logits(logits, temperature, top_k, top_p), generator)


# -- outputs ----------------------------------------------------------------------------------

@dataclass(slots=True)
class StepOutput:
    """One decode step for every prompt of the call (lists are indexed like the prompts).

    tokens[i]: the token sampled for prompt i, or None if that row had already finished.
    When a row stops on a stop id, its last token is that stop id (kept so an RL update
    can score it; it is never part of `text`).
    finish_reasons[i]: "stop" or "length" on the step where row i finishes, else None.
    stops[i]: the stop id (int) or stop string (str) that ended row i at this step.
    text[i]: new text of row i (only with a tokenizer): never a split UTF-8 character, never
    part of a stop string; the step that finishes a row flushes whatever was held back.
    logprobs[i], top_logprobs[i] ([(token, logprob)], best first): with `logprobs=True`
    / `top_logprobs=k`.
    """

    tokens: list[int | None]
    finish_reasons: list[str | None]
    stops: list[int | str | None]
    text: list[str | None] | None = None
    logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]] | None] | None = None

    @property
    def token(self) -> int | None:
        """The token of the first (for a single prompt: the only) row."""
        return self.tokens[0]


@dataclass
class Completion:
    """The full output for one prompt."""

    tokens: list[int] = field(default_factory=list)  # every sampled token, incl. a final stop id
    finish_reason: str | None = None  # "stop" or "length"
    stop: int | str | None = None  # which stop id or string ended it
    text: str | None = None  # with a tokenizer: the text, cut before the stop string
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def output_ids(self) -> list[int]:
        """The tokens without a final stop id (what the text is decoded from)."""
        if self.finish_reason == "stop" and isinstance(self.stop, int):
            return self.tokens[:-1]
        return self.tokens


class _Accumulator:
    def __init__(self) -> None:
        self.rows: list[Completion] = []

    def add(self, step: StepOutput) -> None:
        if not self.rows:
            self.rows = [Completion(text="" if step.text is not None else None,
                                    logprobs=[] if step.logprobs is not None else None,
                                    top_logprobs=[] if step.top_logprobs is not None else None)
                         for _ in step.tokens]
        for i, tok in enumerate(step.tokens):
            if tok is None:
                continue
            c = self.rows[i]
            c.tokens.append(tok)
            if step.text is not None:
                c.text += step.text[i]
            if step.logprobs is not None:
                c.logprobs.append(step.logprobs[i])
            if step.top_logprobs is not None:
                c.top_logprobs.append(step.top_logprobs[i])
            if step.finish_reasons[i] is not None:
                c.finish_reason, c.stop = step.finish_reasons[i], step.stops[i]


def collect(steps: Iterable[StepOutput]) -> list[Completion]:
    """Run a `generate()` stream to the end; one `Completion` per prompt."""
    acc = _Accumulator()
    for step in steps:
        acc.add(step)
    return acc.rows


# -- incremental detokenization -----------------------------------------------------------------

class IncrementalDecoder:
    """Token ids in, safe text deltas out.

    Decodes a short window around the newest tokens and emits only the new characters, so
    tokenizers that merge across tokens (SentencePiece spaces, byte fallback) stream right.
    Text ending in U+FFFD (an incomplete UTF-8 sequence) is held until the next token; so is
    a tail that could be the start of a stop string. `push()` returns the text to emit now;
    `stopped` is the stop string once one matched (its text and anything after is dropped);
    `flush()` returns whatever was held back at the end.
    """

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str] = (),
                 context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.ids: list[int] = list(context[-_DECODE_CONTEXT:]) if context else []
        self._prefix = 0
        self._read = len(self.ids)
        self._pending = ""
        self.stopped: str | None = None

    def _advance(self, final: bool) -> None:
        prev = self.tokenizer.decode(self.ids[self._prefix:self._read])
        new = self.tokenizer.decode(self.ids[self._prefix:])
        if len(new) > len(prev) and (final or not new.endswith("\ufffd")):
            self._pending += new[len(prev):]
            self._prefix, self._read = self._read, len(self.ids)
        elif len(self.ids) - self._prefix > 4 * _DECODE_CONTEXT:
            # Many tokens without text (e.g. repeated control tokens): keep the window short.
            self._prefix = max(self._prefix, self._read - _DECODE_CONTEXT)

    def _release(self, final: bool, check: bool) -> str:
        text = self._pending
        if check and self.stop_strings:
            best = -1
            for s in self.stop_strings:
                i = text.find(s)
                if i >= 0 and (best < 0 or i < best):
                    best, self.stopped = i, s
            if best >= 0:
                self._pending = ""
                return text[:best]
        hold = 0
        if check and not final:
            for s in self.stop_strings:
                for k in range(min(len(s) - 1, len(text)), hold, -1):
                    if text.endswith(s[:k]):
                        hold = k
                        break
        self._pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def push(self, token: int, check_stops: bool = True) -> str:
        if self.stopped is not None:
            return ""
        self.ids.append(token)
        self._advance(final=False)
        return self._release(final=False, check=check_stops)

    def flush(self) -> str:
        if self.stopped is not None:
            return ""
        self._advance(final=True)
        return self._release(final=True, check=True)


# -- inputs -----------------------------------------------------------------------------------

def _prompt_lists(input_ids: Any, attention_mask: Any, tokenizer: Any) -> tuple[list[list[int]], bool]:
    """Normalise the accepted prompt forms to (list of token lists, single?)."""
    if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids
                                      and all(isinstance(p, str) for p in input_ids)):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer")
        if attention_mask is not None:
            raise ValueError("attention_mask only goes with a token-id tensor")
        single = isinstance(input_ids, str)
        texts = [input_ids] if single else list(input_ids)
        return [list(tokenizer.encode(t)) for t in texts], single
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() not in (1, 2):
            raise ValueError(f"input_ids must be [T] or [B, T], got shape {tuple(input_ids.shape)}")
        single = input_ids.dim() == 1
        ids = input_ids.reshape(1, -1) if single else input_ids
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask).reshape(ids.shape).bool().cpu()
            rows = [r[m].tolist() for r, m in zip(ids.cpu(), mask)]
        else:
            rows = ids.tolist()
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask only goes with a token-id tensor; "
                             "pass prompts of different lengths as a list of lists")
        if not isinstance(input_ids, (list, tuple)) or len(input_ids) == 0:
            raise ValueError("input_ids must be a non-empty list of ids, a list of such lists, "
                             "or a LongTensor")
        single = not isinstance(input_ids[0], (list, tuple, torch.Tensor))
        rows = [list(input_ids)] if single else [list(map(int, r)) for r in input_ids]
        rows = [[int(t) for t in r] for r in rows]
    if not rows:
        raise ValueError("no prompts given")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. BOS)")
    return rows, single


# -- the loop ---------------------------------------------------------------------------------

def generate(model: Any, input_ids: Any, config: GenerationConfig | None = None, *,
             attention_mask: torch.Tensor | None = None, tokenizer: Any = None,
             **overrides: Any) -> Iterator[StepOutput]:
    """Stream tokens from `model`, one `StepOutput` per decode step.

    input_ids: one prompt (list of ids, 1-D tensor, or str with a tokenizer), or a batch
    (list of id lists of any lengths, list of str, or a [B, T] LongTensor, optionally with
    `attention_mask` [B, T] marking the real tokens). `config` fields may be overridden by
    keyword (`generate(m, ids, max_new_tokens=8, temperature=0.7)`). A `tokenizer` (anything
    with `decode(list[int]) -> str`) adds text deltas and enables `stop_strings`.
    Arguments are checked now; the work starts on the first `next()`.
    """
    cfg = _resolve_config(config, overrides)
    if cfg.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    prompts, _ = _prompt_lists(input_ids, attention_mask, tokenizer)
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has a token id outside [0, {vocab})")
    budgets = [cfg.max_new_tokens] * len(prompts)
    if cfg.max_length is not None:
        for i, p in enumerate(prompts):
            if len(p) >= cfg.max_length:
                raise ValueError(f"prompt {i} has {len(p)} tokens, no room below "
                                 f"max_length={cfg.max_length}")
            budgets[i] = min(cfg.max_new_tokens, cfg.max_length - len(p))
    return _generate(model, prompts, budgets, cfg, tokenizer)


@torch.inference_mode()
def _generate(model: Any, prompts: list[list[int]], budgets: list[int], cfg: GenerationConfig,
              tokenizer: Any) -> Iterator[StepOutput]:
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    n = len(prompts)
    plens = [len(p) for p in prompts]
    t_max = max(plens)
    stop_ids = cfg.stop_ids if cfg.stop_ids is not None else (model.config.eos_token_id,)
    stop_set = frozenset(stop_ids)
    padded = min(plens) < t_max

    rows = torch.full((n, t_max), _PAD, dtype=torch.long)
    for i, p in enumerate(prompts):
        rows[i, t_max - len(p):] = torch.tensor(p, dtype=torch.long)
    ids = rows.to(device)
    mask = (torch.arange(t_max)[None, :] >= torch.tensor([t_max - l for l in plens])[:, None]) \
        .to(device) if padded else None

    static_len = _static_plan(model, cfg, n, t_max, max(budgets))
    cache = model.new_cache(n, static_len or t_max + max(budgets))
    step_fn = None
    if static_len is not None:
        # Masked slots are multiplied by zero attention weights: they must not hold NaNs.
        cache.k.zero_()
        cache.v.zero_()
        step_fn = _compile_step(model)
        theta = rope_theta(model.config, t_max + 1)
        cos_t, sin_t = model.rotary.get(model.config, theta, static_len, device, cache.k.dtype)
        pos = torch.tensor(t_max, dtype=torch.long, device=device)
    chunk = cfg.prefill_chunk or t_max
    for s in range(0, t_max, chunk):
        e = min(t_max, s + chunk)
        # rope_seq_len = the whole prompt, so every chunk uses one dynamic-NTK base.
        out = model(ids[:, s:e], attention_mask=None if mask is None else mask[:, s:e],
                    cache=cache, logits_to_keep=1, rope_seq_len=t_max, return_hidden=e < t_max)
    logits = out[:, -1]

    # Sampling state on the device, one row per active sequence.
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = ids.new_zeros((n, vocab), dtype=torch.bool)
        seen.scatter_(1, ids, True)
        if mask is not None:  # the pad id counts only where it is a real prompt token
            real_pad = ((ids == _PAD) & mask).any(-1)
            seen[:, _PAD] = real_pad
    counts = None
    if cfg.presence_penalty or cfg.frequency_penalty:
        counts = torch.zeros((n, vocab), dtype=torch.float32, device=device)
    suppress = None
    valid_stops = [i for i in stop_ids if 0 <= i < vocab]
    if cfg.min_new_tokens > 0 and valid_stops:
        suppress = torch.tensor(valid_stops, dtype=torch.long, device=device)
    want_lp = cfg.logprobs or cfg.top_logprobs > 0

    decoders = None
    if tokenizer is not None:
        decoders = [IncrementalDecoder(tokenizer, cfg.stop_strings, p) for p in prompts]

    active = list(range(n))  # prompt index of each row of the running batch
    max_plen = t_max
    step = 0
    while True:
        step += 1
        # -- pick the next token of every active row (device) --
        proc = logits
        if seen is not None:
            proc = apply_repetition_penalty(proc, seen, cfg.repetition_penalty)
        if counts is not None:
            proc = apply_presence_frequency_penalty(proc, counts, cfg.presence_penalty,
                                                    cfg.frequency_penalty)
        if suppress is not None and step <= cfg.min_new_tokens:
            proc = proc.index_fill(1, suppress, float("-inf"))
        if cfg.do_sample:
            proc = warp_logits(proc, cfg.temperature, cfg.top_k, cfg.top_p)
            tok = _draw(proc, gen)
        else:
            tok = proc.argmax(-1)
        lp_list = top_list = None
        if want_lp:
            lp = torch.log_softmax(logits if cfg.raw_logprobs else proc, -1)
            if cfg.logprobs:
                lp_list = lp.gather(1, tok[:, None])[:, 0].tolist()
            if cfg.top_logprobs:
                tv, ti = lp.topk(min(cfg.top_logprobs, vocab), dim=-1)
                top_list = [list(zip(a, b)) for a, b in zip(ti.tolist(), tv.tolist())]
        toks = tok.tolist()  # the one sync per step

        # -- host bookkeeping: stops, text, which rows continue --
        tokens: list[int | None] = [None] * n
        reasons: list[str | None] = [None] * n
        stops: list[int | str | None] = [None] * n
        texts = [None] * n if decoders is not None else None
        lps = [None] * n if lp_list is not None else None
        tops = [None] * n if top_list is not None else None
        keep: list[int] = []
        check = step > cfg.min_new_tokens
        for j, r in enumerate(active):
            t = toks[j]
            tokens[r] = t
            if lps is not None:
                lps[r] = lp_list[j]
            if tops is not None:
                tops[r] = top_list[j]
            reason = None
            if t in stop_set and check:
                reason, stops[r] = "stop", t
                if texts is not None:
                    texts[r] = decoders[r].flush()
            elif texts is not None:
                dec = decoders[r]
                texts[r] = dec.push(t, check)
                if dec.stopped is not None:
                    reason, stops[r] = "stop", dec.stopped
            if reason is None and step >= budgets[r]:
                reason = "length"
                if texts is not None:
                    texts[r] += decoders[r].flush()
            if reason is None:
                keep.append(j)
            else:
                reasons[r] = reason

        if keep:
            # Record this step's tokens, drop finished rows, and start the next forward
            # before handing the step out, so the device works while the caller does.
            if seen is not None:
                seen.scatter_(1, tok[:, None], True)
            if counts is not None:
                counts.scatter_add_(1, tok[:, None], torch.ones_like(tok[:, None], dtype=counts.dtype))
            if len(keep) < len(active):
                sel = torch.tensor(keep, dtype=torch.long, device=device)
                cache.select(sel)
                tok = tok.index_select(0, sel)
                if seen is not None:
                    seen = seen.index_select(0, sel)
                if counts is not None:
                    counts = counts.index_select(0, sel)
                active = [active[j] for j in keep]
                max_plen = max(plens[r] for r in active)
            # rope_seq_len: the longest active row's length (what dynamic NTK scales by),
            # known here without the model reading positions back from the device.
            if step_fn is not None:
                args = (model, tok[:, None], pos, cache.k, cache.v, cos_t, sin_t)
                logits = _call_freezing(step_fn, *args) if step == 1 else step_fn(*args)
                pos += 1
                cache.length += 1
            else:
                logits = model(tok[:, None], cache=cache, rope_seq_len=max_plen + step)[:, -1]

        yield StepOutput(tokens, reasons, stops, texts, lps, tops)
        if not keep:
            return


# -- text conveniences ------------------------------------------------------------------------

class TextStream:
    """Iterate to get text deltas: `str` for a single prompt, `(index, str)` for a batch.
    After the loop, `completions` (and for one prompt `text`, `finish_reason`) hold the
    results."""

    def __init__(self, steps: Iterator[StepOutput], single: bool):
        self._steps = steps
        self.single = single
        self._acc = _Accumulator()
        self.completions: list[Completion] | None = None

    def __iter__(self) -> Iterator[Any]:
        for step in self._steps:
            self._acc.add(step)
            for i, delta in enumerate(step.text):
                if delta:
                    yield delta if self.single else (i, delta)
        self.completions = self._acc.rows

    def _first(self) -> Completion:
        if self.completions is None:
            raise RuntimeError("iterate the stream to the end first")
        return self.completions[0]

    @property
    def text(self) -> str:
        return self._first().text

    @property
    def finish_reason(self) -> str:
        return self._first().finish_reason


def stream_text(model: Any, tokenizer: Any, prompt: Any, config: GenerationConfig | None = None,
                **overrides: Any) -> TextStream:
    """Text deltas as they are generated. `prompt`: a str, a list of str, token ids, or a
    list of token-id lists (a str is encoded with `tokenizer.encode`, BOS included)."""
    prompts, single = _prompt_lists(prompt, None, tokenizer)
    steps = generate(model, prompts[0] if single else prompts, config, tokenizer=tokenizer,
                     **overrides)
    return TextStream(steps, single)


def generate_text(model: Any, tokenizer: Any, prompt: Any, config: GenerationConfig | None = None,
                  **overrides: Any) -> str | list[str]:
    """The generated text (cut before any stop string); a list for a list of prompts."""
    stream = stream_text(model, tokenizer, prompt, config, **overrides)
    for _ in stream:
        pass
    texts = [c.text for c in stream.completions]
    return texts[0] if stream.single else texts
