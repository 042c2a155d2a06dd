"""`AsyncEngine`: the synchronous `Engine` on a background thread, for asyncio servers.

Every engine mutation (add, abort, call) is queued and applied by the engine thread between
steps, so the engine itself needs no locks; outputs go back to each request's asyncio queue
with `loop.call_soon_threadsafe`. Import it from `internlm2.engine`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine, RequestOutput, SamplingParams

__all__ = ["AsyncEngine"]

log = logging.getLogger(__name__)


class AsyncEngine:
    """Runs `Engine.step()` on a background thread; asyncio callers get per-request queues.

    Every engine mutation (add, abort, call) is queued and applied by the engine thread
    between steps, so the engine itself needs no locks. The thread waits on a condition
    while there is nothing to do.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._cv = threading.Condition()
        self._commands: deque[Callable[[], None]] = deque()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._ids = itertools.count()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="internlm2-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _submit(self, fn: Callable[[], None]) -> None:
        with self._cv:
            self._commands.append(fn)
            self._cv.notify()

    def _deliver(self, rid: str, item: Any) -> None:
        entry = self._queues.get(rid)
        if entry is not None:
            loop, q = entry
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed
                self._queues.pop(rid, None)

    def _loop(self) -> None:
        eng = self.engine
        while True:
            with self._cv:
                while not self._stop and not self._commands and not eng.has_unfinished():
                    self._cv.wait()
                if self._stop:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for fn in commands:
                fn()
            if not eng.has_unfinished():
                continue
            try:
                outs = eng.step()
            except Exception as exc:
                log.exception("engine step failed; aborting %d request(s)", len(self._queues))
                for rid in list(self._queues):
                    eng.abort(rid)
                    self._deliver(rid, exc)
                try:
                    eng.step()  # drop the abort outputs (their consumers got the error)
                except Exception:
                    log.debug("engine step after failure also failed", exc_info=True)
                continue
            for out in outs:
                self._deliver(out.request_id, out)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Each step's output for this request. Stopping early aborts it (blocks freed)."""
        self.start()
        self.engine.check_request(prompt_ids, params)  # ValueError here, in the caller
        rid = request_id if request_id is not None else f"areq-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        if rid in self._queues:
            raise ValueError(f"request_id {rid!r} is already in use")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = (loop, q)
        added = loop.create_future()

        def add() -> None:
            try:
                self.engine.add_request(list(prompt_ids), params, rid)
                loop.call_soon_threadsafe(_set, added, None, None)
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller
                loop.call_soon_threadsafe(_set, added, None, exc)

        self._submit(add)
        finished = False
        try:
            await added
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self.engine.abort(request_id))

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run fn(*args, **kwargs) on the engine thread between steps; return its result."""
        self.start()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def run() -> None:
            try:
                res, exc = fn(*args, **kwargs), None
            except Exception as e:  # noqa: BLE001 - re-raised in the caller
                res, exc = None, e
            loop.call_soon_threadsafe(_set, fut, res, exc)

        self._submit(run)
        return await fut


def _set(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
