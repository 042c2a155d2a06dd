"""`POST /v1/agent/chat`: the agent loop (tools + sandboxed code interpreter) behind the server.

The same `Agent` as `internlm2 agent` and evaluation, on the server's engine through
`agent.backends.EngineBackend`. The loop is synchronous, so each request runs it on a worker
thread and streams its `AgentEvent`s as server-sent events:

    data: {"type": "session", "session_id": "..."}
    data: {"type": "text", "step": 1, "text": "..."}                  (model words, streamed)
    data: {"type": "action", "step": 1, "name": "interpreter", "code": "..."}
    data: {"type": "result", "step": 1, "name": "interpreter", "text": "...", "stdout": "...",
           "stderr": "...", "value": "...", "error": null, "images": [{"name", "url"}]}
    data: {"type": "error", "step": 1, "text": "..."}                 (malformed action)
    data: {"type": "final", "step": 2, "text": "...", "reason": "answer" | "max_steps"}
    data: [DONE]

A failure after the stream started comes as `{"type": "error", "fatal": true, "error": {...}}`
(OpenAI's error object) before [DONE]. Figures come inline as data:image/png URLs (an <img>
cannot send the API key), and `GET /v1/agent/files/{session_id}/{name}` serves any file of
the session's working folder to API clients.

Sessions: one `Interpreter` per chat `session_id` (created by the server on the first turn and
announced in the "session" event), so variables persist across turns like a notebook. A
session belongs to the API key that created it, runs one request at a time, and is closed
after `idle_timeout_s` without use, on server shutdown, or never created past `max_sessions`
(429). A client that goes away stops the loop: the engine request is aborted at once and no
further step starts (a cell already running finishes within the interpreter's timeout).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import mimetypes
import os
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from . import protocol as P
from .protocol import APIError

__all__ = ["AgentChatRequest", "AgentSettings", "SessionStore", "add_agent_routes"]

log = logging.getLogger(__name__)
_SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_POLL_S = 0.25
_MAX_INLINE_IMAGE = 4 << 20
_NEVER_STARTED_S = 30.0


@dataclass
class AgentSettings:
    """What `internlm2 serve --interpreter` enables. tools: the built-in tool names a request may
    ask for (`agent.builtin.BUILTIN_NAMES`; "files" reads the session's working folder)."""

    interpreter: bool = True
    tools: Sequence[str] = ("calculator", "time")
    interpreter_timeout_s: float = 30.0
    interpreter_memory_mb: int = 1024
    max_sessions: int = 8
    idle_timeout_s: float = 900.0
    max_steps: int = 8
    docs: str | None = None  # a folder for the "search" tool

    def __post_init__(self) -> None:
        from ..agent.builtin import BUILTIN_NAMES
        self.tools = tuple(self.tools)
        bad = [t for t in self.tools if t not in BUILTIN_NAMES]
        if bad:
            raise ValueError(f"AgentSettings.tools: unknown built-in tool(s) {bad}; choose from "
                             f"{', '.join(BUILTIN_NAMES)}")
        if "search" in self.tools and not self.docs:
            raise ValueError("AgentSettings.tools: 'search' needs a document folder (docs)")
        for name in ("interpreter_timeout_s", "interpreter_memory_mb", "max_sessions",
                     "idle_timeout_s", "max_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"AgentSettings.{name}: must be a positive number, got {v!r}")


class AgentChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[dict[str, Any]] = Field(min_length=1)
    model: str | None = None
    interpreter: bool = True
    tools: list[str] = Field(default_factory=list)
    max_steps: int | None = Field(None, ge=1, le=32)
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(0.8, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    session_id: str | None = None


@dataclass(eq=False)
class _Session:
    id: str
    owner: str
    interpreter: Any
    workdir: str
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False
    worker: threading.Thread | None = None

    def in_use(self) -> bool:
        """Busy while its agent thread runs; a request whose stream never started (the client
        left before the first byte) frees it after a grace period."""
        if not self.busy:
            return False
        if self.worker is not None:
            return self.worker.is_alive()
        return time.monotonic() - self.last_used < _NEVER_STARTED_S


class SessionStore:
    """Interpreter sessions by id. All methods are called on the server's event loop; closing
    an interpreter blocks briefly, so it happens on a worker thread."""

    def __init__(self, settings: AgentSettings):
        self.settings = settings
        self.sessions: dict[str, _Session] = {}
        self._reaper: asyncio.Task | None = None

    def _new_interpreter(self) -> Any:
        from ..agent.interpreter import Interpreter
        return Interpreter(timeout=self.settings.interpreter_timeout_s,
                           memory_mb=self.settings.interpreter_memory_mb)

    async def acquire(self, session_id: str | None, owner: str,
                      interpreter: bool = True) -> _Session:
        """The session to run a request in, marked busy; created when new. Its interpreter
        starts on the first request that wants one."""
        await self.reap()
        self._start_reaper()
        s = None
        if session_id is not None:
            if not _SESSION_RE.match(session_id):
                raise APIError("session_id: 8 to 64 letters, digits, '-' or '_'",
                               param="session_id", code="invalid_value")
            s = self.sessions.get(session_id)
            if s is not None and not secrets.compare_digest(s.owner, owner):
                raise APIError(f"no agent session {session_id!r}", status=404,
                               param="session_id", code="session_not_found")
            if s is not None and s.in_use():
                raise APIError(f"agent session {session_id!r} is busy with another request",
                               status=409, param="session_id", code="session_busy")
        if s is None:
            if len(self.sessions) >= self.settings.max_sessions:
                raise APIError(f"too many agent sessions ({self.settings.max_sessions}); try "
                               "again later", status=429, type="rate_limit_error",
                               code="too_many_sessions")
            s = _Session(session_id or secrets.token_urlsafe(18), owner, None, "")
            self.sessions[s.id] = s
        s.busy, s.last_used, s.worker = True, time.monotonic(), None
        if interpreter and s.interpreter is None and self.settings.interpreter:
            try:
                s.interpreter = await asyncio.to_thread(self._new_interpreter)
            except BaseException:
                self.release(s)
                raise
            s.workdir = s.interpreter.workdir
        return s

    def release(self, s: _Session) -> None:
        s.busy, s.last_used = False, time.monotonic()

    async def reap(self) -> None:
        now = time.monotonic()
        old = [s for s in self.sessions.values()
               if not s.in_use() and now - s.last_used > self.settings.idle_timeout_s]
        for s in old:
            await self._close(s)

    async def _close(self, s: _Session) -> None:
        self.sessions.pop(s.id, None)
        await asyncio.to_thread(_close_interpreter, s)

    def _start_reaper(self) -> None:
        if self._reaper is not None and not self._reaper.done():
            return

        async def loop() -> None:
            while self.sessions:
                await asyncio.sleep(min(60.0, self.settings.idle_timeout_s / 2))
                await self.reap()

        self._reaper = asyncio.get_running_loop().create_task(loop())

    async def close_all(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for s in list(self.sessions.values()):
            await self._close(s)

    def close_all_sync(self) -> None:
        """For callers without the loop (tests, after uvicorn returned)."""
        for s in list(self.sessions.values()):
            self.sessions.pop(s.id, None)
            _close_interpreter(s)


def _close_interpreter(s: _Session) -> None:
    if s.interpreter is None:
        return
    try:
        s.interpreter.close()
    except OSError as e:  # a kernel already gone (broken pipe): nothing left to stop
        log.debug("closing agent session %s: %s", s.id, e)


def _owner(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return hashlib.sha256(auth.encode()).hexdigest()


def _messages(raw: list[dict[str, Any]]) -> list[dict]:
    """OpenAI-style text turns -> the agent's messages (the default system prompt when none)."""
    from ..chat_format import DEFAULT_SYSTEM_PROMPT
    out = []
    for i, m in enumerate(raw):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise APIError(f"messages[{i}].role: the agent takes system, user and assistant "
                           f"turns, got {role!r}", param=f"messages[{i}].role")
        if not isinstance(content, str):
            raise APIError(f"messages[{i}].content: must be a string", param=f"messages[{i}]."
                           "content")
        if role == "system" and i != 0:
            raise APIError(f"messages[{i}]: a system message must come first",
                           param=f"messages[{i}].role")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise APIError("messages: the last message must be the user's", param="messages")
    if out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": DEFAULT_SYSTEM_PROMPT})
    return out


def _image(path: str, session: _Session) -> dict:
    name = os.path.basename(path)
    item = {"name": name, "url": None}
    try:
        data = Path(path).read_bytes()
    except OSError:
        return item
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) <= _MAX_INLINE_IMAGE:
        item["url"] = "data:image/png;base64," + base64.b64encode(data).decode()
    item["path"] = f"/v1/agent/files/{session.id}/{name}"
    return item


def _event_json(ev: Any, session: _Session) -> dict:
    d: dict[str, Any] = {"type": ev.kind, "step": ev.step}
    if ev.kind in ("text", "error", "final"):
        d["text"] = ev.text
        if ev.reason:
            d["reason"] = ev.reason
    elif ev.kind == "action":
        d["name"] = ev.name
        if ev.code is not None:
            d["code"] = ev.code
        else:
            d["arguments"] = ev.arguments
    elif ev.kind == "result":
        d.update(name=ev.name, text=ev.text)
        res = ev.result
        if ev.name == "interpreter" and res is not None:
            d.update(stdout=res.stdout, stderr=res.stderr, value=res.value, error=res.error,
                     timed_out=res.timed_out, restarted=res.restarted,
                     duration_s=round(res.duration_s, 3))
            d["images"] = [_image(p, session) for p in ev.images]
        elif res is not None:
            d.update(ok=getattr(res, "ok", True), error=getattr(res, "error", None))
    return d


def add_agent_routes(app: FastAPI, async_engine: Any, tokenizer: Any, settings: AgentSettings,
                     *, authorize: Callable[[Request], None], check_model: Callable[[str], None],
                     stop_token_ids: Sequence[int], session_len: int | None,
                     max_tokens_limit: int) -> SessionStore:
    """Register /v1/agent/chat and /v1/agent/files on `app`; returns the session store (also
    `app.state.agent_sessions`), whose sessions close on the app's shutdown."""
    from ..agent.backends import EngineBackend, GenerationCancelled
    from ..agent.builtin import builtin_tools
    from ..agent.loop import Agent
    from ..engine import SamplingParams

    store = SessionStore(settings)
    app.state.agent_sessions = store
    app.router.on_shutdown.append(store.close_all)
    router = APIRouter(dependencies=[Depends(authorize)])

    @router.post("/v1/agent/chat")
    async def agent_chat(req: AgentChatRequest, request: Request) -> StreamingResponse:
        if req.model is not None:
            check_model(req.model)
        messages = _messages(req.messages)
        if req.interpreter and not settings.interpreter:
            raise APIError("this server runs no code interpreter", param="interpreter",
                           code="unsupported")
        bad = [t for t in req.tools if t not in settings.tools]
        if bad:
            raise APIError(f"tools: {bad} not enabled on this server (enabled: "
                           f"{', '.join(settings.tools) or 'none'})", param="tools")
        if req.max_tokens is not None and req.max_tokens > max_tokens_limit:
            raise APIError(f"max_tokens={req.max_tokens} is more than this server allows "
                           f"({max_tokens_limit})", param="max_tokens", code="max_tokens_exceeded")
        try:
            params = SamplingParams(max_tokens=req.max_tokens or min(1024, max_tokens_limit),
                                    temperature=req.temperature, top_p=req.top_p)
            params.validate()
        except ValueError as e:
            raise APIError(str(e), code="invalid_value") from None
        session = await store.acquire(req.session_id, _owner(request),
                                      interpreter=req.interpreter)
        try:
            tools = builtin_tools(list(req.tools), workdir=session.workdir or None,
                                  docs=settings.docs)
        except ValueError as e:
            store.release(session)
            raise APIError(str(e), param="tools") from None
        cancel = threading.Event()
        backend = EngineBackend(async_engine, tokenizer, asyncio.get_running_loop(), params,
                                stop_token_ids=stop_token_ids, session_len=session_len,
                                cancel=cancel, request_prefix=f"agent-{session.id[:8]}")
        agent = Agent(backend, tools=tools,
                      interpreter=session.interpreter if req.interpreter else False,
                      max_steps=req.max_steps or settings.max_steps)
        return StreamingResponse(_events(agent, messages, session, cancel, request),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(agent: Any, messages: list[dict], session: _Session,
                      cancel: threading.Event, request: Request) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        end = object()

        def work() -> None:  # the synchronous agent loop, on its own thread
            events = agent.stream(messages)
            try:
                for ev in events:
                    loop.call_soon_threadsafe(q.put_nowait, ev)
                    if cancel.is_set():
                        break
            except GenerationCancelled:
                pass
            except BaseException as e:  # noqa: BLE001 - reported to the client
                loop.call_soon_threadsafe(q.put_nowait, e)
            finally:
                events.close()  # aborts an engine request still running
                try:
                    loop.call_soon_threadsafe(q.put_nowait, end)
                    # Released here, not by the stream: the interpreter is only free once
                    # this thread is done with it, however the stream ended.
                    loop.call_soon_threadsafe(store.release, session)
                except RuntimeError:  # the loop is gone (server shutdown)
                    store.release(session)

        worker = threading.Thread(target=work, name=f"agent-{session.id[:8]}", daemon=True)
        session.worker = worker
        worker.start()
        try:
            yield _sse({"type": "session", "session_id": session.id})
            while True:
                try:
                    item = await asyncio.wait_for(q.get(), _POLL_S)
                except (asyncio.TimeoutError, TimeoutError):
                    if await request.is_disconnected():
                        return
                    continue
                if item is end:
                    break
                if isinstance(item, BaseException):
                    err = item if isinstance(item, APIError) else None
                    body = err.body() if err else P.error_body(
                        str(item) if isinstance(item, ValueError) else
                        f"internal error: {type(item).__name__}: {item}",
                        "invalid_request_error" if isinstance(item, ValueError) else
                        "server_error")
                    yield _sse({"type": "error", "fatal": True, "text": body["error"]["message"],
                                **body})
                    continue
                yield _sse(await asyncio.to_thread(_event_json, item, session)
                           if item.kind == "result" and item.images else _event_json(item, session))
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # the client went away or the stream ended: stop the loop

    @router.get("/v1/agent/files/{session_id}/{name}")
    async def agent_file(session_id: str, name: str, request: Request) -> FileResponse:
        s = store.sessions.get(session_id)
        if s is None or not s.workdir or not secrets.compare_digest(s.owner, _owner(request)):
            raise APIError(f"no agent session {session_id!r}", status=404,
                           code="session_not_found")
        root = os.path.realpath(s.workdir)
        path = os.path.realpath(os.path.join(root, name))
        if os.path.dirname(path) != root or not os.path.isfile(path):
            raise APIError(f"no file {name!r} in this session", status=404, code="file_not_found")
        media = mimetypes.guess_type(name)[0] or "application/octet-stream"
        # Never let a session file render as a page of this origin (it could hold script).
        if media not in ("image/png", "image/jpeg", "text/plain", "text/csv", "application/json"):
            media = "application/octet-stream"
        return FileResponse(path, media_type=media, headers={
            "X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"})

    app.include_router(router)
    return store


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

