"""Agent backends over the serving engine, so the server's web chat runs the same `Agent` loop.

The `Agent` loop is synchronous (it also drives the terminal agent and evaluation), while the
server's `AsyncEngine` lives on an asyncio event loop. `EngineBackend` bridges the two: the
agent runs on a worker thread, each `generate_stream` call submits one engine request to the
server's loop with `asyncio.run_coroutine_threadsafe`, and the text deltas come back through a
thread-safe queue. Closing the generator early (the client went away, the agent stopped)
cancels the coroutine, which closes the engine's async generator and so aborts the request and
frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from .loop import split_stops

__all__ = ["EngineBackend", "GenerationCancelled"]

_POLL_S = 0.1
_ids = itertools.count()


class GenerationCancelled(RuntimeError):
    """Raised inside the agent thread when its `cancel` event is set mid-generation."""


class EngineBackend:
    """The agent backend protocol (`generate_stream(prompt_text, stop) -> Iterator[str]`) on an
    `AsyncEngine` (or any object with its `async generate(prompt_ids, params, request_id)`).

    loop: the event loop the engine's consumers run on (the server's); generate_stream must be
        called from another thread, never from that loop (it would deadlock).
    params_defaults: `SamplingParams` (or a dict of its fields) for every step; its stop
        strings / ids are kept and the agent's stops added.
    stop_token_ids: extra ids that always end a step (the server's EOS / <|im_end|> set).
    session_len: when given, max_tokens is cut to what fits after the prompt, and a prompt that
        leaves no room is a ValueError naming the lengths.
    cancel: a `threading.Event`; once set, generation stops at the next delta with
        `GenerationCancelled` (the request is aborted on the engine).
    """

    def __init__(self, async_engine: Any, tokenizer: Any, loop: asyncio.AbstractEventLoop,
                 params_defaults: Any = None, *, stop_token_ids: Sequence[int] = (),
                 session_len: int | None = None, cancel: threading.Event | None = None,
                 request_prefix: str = "agent"):
        from ..engine import (
            SamplingParams,  # lazy: keeps `import internlm2.agent` torch-free
        )
        if params_defaults is None:
            params_defaults = SamplingParams(max_tokens=512, temperature=0.8, top_p=0.8)
        elif isinstance(params_defaults, dict):
            params_defaults = SamplingParams(**params_defaults)
        params_defaults.validate()
        self.aengine, self.tokenizer, self.loop = async_engine, tokenizer, loop
        self.defaults = params_defaults
        self.stop_token_ids = list(stop_token_ids)
        self.session_len = session_len
        self.cancel = cancel or threading.Event()
        self.request_prefix = request_prefix
        self.last_finish_reason: str | None = None
        self.prompt_tokens = self.completion_tokens = 0

    def _params(self, prompt_len: int, stop: Sequence[str]) -> Any:
        ids, strings = split_stops(self.tokenizer, stop)  # as loop.ModelBackend does
        stop_ids = list(self.defaults.stop_token_ids or []) + self.stop_token_ids + ids
        stop_strings = list(self.defaults.stop) + strings
        max_tokens = self.defaults.max_tokens
        if self.session_len is not None:
            room = self.session_len - prompt_len
            if room < 1:
                raise ValueError(f"the agent conversation has {prompt_len} tokens, which leaves no "
                                 f"room to generate within the session length of "
                                 f"{self.session_len}; start a new chat")
            max_tokens = min(max_tokens, room)
        params = dataclasses.replace(self.defaults, max_tokens=max_tokens,
                                     stop=tuple(dict.fromkeys(stop_strings)),
                                     stop_token_ids=tuple(dict.fromkeys(stop_ids)))
        params.validate()
        return params

    def generate_stream(self, prompt_text: str, stop: list[str]) -> Iterator[str]:
        """Text deltas of one engine request for the rendered prompt (it starts with "<s>",
        which the tokenizer encodes as BOS, so no BOS is added: as `ModelBackend` does)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            raise RuntimeError("EngineBackend.generate_stream: call it from a worker thread, "
                               "not from the event loop it submits to")
        ids = self.tokenizer.encode(prompt_text, add_bos=False)
        params = self._params(len(ids), stop)
        rid = f"{self.request_prefix}-{next(_ids)}-{uuid.uuid4().hex[:8]}"
        q: queue.Queue = queue.Queue()
        done = object()

        async def pump() -> None:
            agen = self.aengine.generate(ids, params, request_id=rid)
            try:
                async for out in agen:
                    q.put(out)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - re-raised in the agent thread
                q.put(e)
            finally:
                await agen.aclose()  # aborts the request unless it finished
                q.put(done)

        fut = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        self.last_finish_reason = None
        try:
            while True:
                if self.cancel.is_set():
                    raise GenerationCancelled("generation cancelled")
                try:
                    item = q.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                if item.new_text:
                    yield item.new_text
                if item.finished:
                    self.last_finish_reason = item.finish_reason
                    self.prompt_tokens += item.prompt_tokens
                    self.completion_tokens += len(item.token_ids)
                    return
        finally:
            if not fut.done():
                fut.cancel()  # cancels the task on the loop: its generator closes and aborts
