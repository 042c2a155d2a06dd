"""The OpenAI-compatible HTTP server and the web chat, as one FastAPI app over an AsyncEngine.

    app = create_app(async_engine, tokenizer, model_name="internlm2-chat")
    uvicorn.run(app, host="127.0.0.1", port=23333)

Every request becomes one engine request per choice (n > 1 shares the prompt, so the prefix
cache serves it once). Answers stream as server-sent events ending with `data: [DONE]`.
A client that goes away cancels its requests: the engine's async generators are closed, which
aborts them and frees their KV blocks at once.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat_format import ContentDelta, StreamParser, ToolCallDelta, ToolCallStart, \
    parse_output, to_openai_message
from . import protocol as P
from .protocol import APIError

STATIC = Path(__file__).resolve().parent / "static"
_DISCONNECT_POLL_S = 0.25


class _BodyLimit:
    """ASGI middleware: 413 for request bodies over `limit` bytes, announced or streamed."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = APIError(f"request body is larger than {self.limit} bytes", status=413,
                           code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, too_big)
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        async def tracking_send(msg: dict) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, tracking_send)
        except _TooLarge:
            if not started:
                await _send_error(send, too_big)


class _TooLarge(Exception):
    pass


async def _send_error(send: Any, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _choices(aengine: Any, jobs: Sequence[tuple[list[int], Any]], request: Request | None,
                   rid: str) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, RequestOutput) from all `jobs` as they come; cancels all on exit.

    Each job runs in its own task over the engine's async generator; leaving this iterator
    early (client gone, error, consumer closed) cancels the tasks, which closes the generators
    and so aborts the engine requests.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def run(i: int, ids: list[int], params: Any) -> None:
        agen = aengine.generate(ids, params, request_id=f"{rid}-{i}")
        try:
            async for out in agen:
                queue.put_nowait((i, out, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, e))
        finally:
            await agen.aclose()

    tasks = [asyncio.create_task(run(i, ids, p)) for i, (ids, p) in enumerate(jobs)]
    remaining = len(tasks)
    last_check = time.monotonic()
    try:
        while remaining:
            try:
                i, out, err = await asyncio.wait_for(queue.get(), _DISCONNECT_POLL_S)
            except (asyncio.TimeoutError, TimeoutError):
                i = out = err = None
            if request is not None and (out is None or time.monotonic() - last_check
                                        > _DISCONNECT_POLL_S):
                last_check = time.monotonic()
                if await request.is_disconnected():
                    return
            if err is not None:
                if isinstance(err, ValueError):
                    raise APIError(str(err)) from err
                raise err
            if out is None:
                continue
            if out.finished:
                remaining -= 1
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _ChatStream:
    """One choice of a streamed chat answer: text deltas -> OpenAI chunk deltas.

    Tool calls are announced (id + name) only when the call's JSON is complete and valid, then
    its arguments follow in the next delta; so a malformed call never shows as a half tool call
    and comes back as plain content instead.
    """

    def __init__(self, plan: P.ToolPlan):
        self.parser = StreamParser() if plan.active else None
        self.prefix = plan.prefix
        self.held: dict[int, ToolCallStart] = {}
        self.n_tokens = 0
        self.logprobs: list = []

    def deltas(self, text: str, finished: bool) -> list[dict]:
        if self.parser is None:
            return [{"content": text}] if text else []
        if self.prefix:
            text, self.prefix = self.prefix + text, ""
        events = self.parser.feed(text)
        if finished:
            events += self.parser.flush()
        out: list[dict] = []
        for ev in events:
            if isinstance(ev, ContentDelta):
                if out and "content" in out[-1]:
                    out[-1]["content"] += ev.text
                else:
                    out.append({"content": ev.text})
            elif isinstance(ev, ToolCallStart):
                self.held[ev.index] = ev
            elif isinstance(ev, ToolCallDelta):
                start = self.held.pop(ev.index)
                out.append({"tool_calls": [{"index": ev.index, "id": start.id, "type": "function",
                                            "function": {"name": start.name, "arguments": ""}}]})
                out.append({"tool_calls": [{"index": ev.index,
                                            "function": {"arguments": ev.arguments}}]})
        return out

    def finish_reason(self, engine_reason: str | None) -> str | None:
        if self.parser is not None:
            parsed = self.parser.finish()
            if parsed.tool_calls and not parsed.error:
                return "tool_calls"
        return engine_reason


def create_app(async_engine: Any, tokenizer: Any, *, model_name: str,
               api_keys: Sequence[str] | None = None, cors_origins: Sequence[str] | None = None,
               max_request_bytes: int = 4 << 20, max_tokens_limit: int = 4096,
               session_len: int | None = None, features: dict | None = None,
               agent: Any = None) -> FastAPI:
    """The server app. `async_engine` must be started (and is shut down) by the caller.

    api_keys: when given, every /v1 route needs `Authorization: Bearer <one of them>` (the page,
    its files and /health stay open, so the page can ask for a key). session_len defaults to
    the engine's. `features` is reported by /health and /v1/models (the page reads it, e.g.
    {"interpreter": True} shows the interpreter toggle). agent: an `agent_routes.AgentSettings`
    adds /v1/agent/chat (the agent loop with tools and the sandboxed code interpreter).
    """
    engine = async_engine.engine
    session_len = session_len or getattr(engine, "session_len", None)
    keys = [k for k in (api_keys or []) if k]
    feats = {"tools": True, "interpreter": False, "embeddings": hasattr(engine, "embed"),
             "logprobs": True, **(features or {})}
    if agent is not None:
        feats.update(agent=True, interpreter=bool(agent.interpreter), agent_tools=list(agent.tools))
    im_end = getattr(tokenizer, "im_end_id", None)
    action_end = getattr(tokenizer, "action_end_id", None)
    # Explicit stop ids: the engine's defaults know only the official <|im_end|> id, and a
    # trained tokenizer puts it elsewhere. <|action_end|> ends a tool call (when tools are on).
    base_stops = list(dict.fromkeys([*(getattr(tokenizer, "stop_ids", None) or []),
                                     *(getattr(engine, "eos_token_ids", None) or []),
                                     *([im_end] if im_end is not None else [])]))
    tool_stops = base_stops + ([action_end] if action_end is not None else [])
    created = P.now()

    from ..engine import SamplingParams  # here: importing this module needs no torch

    app = FastAPI(title="InternLM2 OpenAI-compatible server", docs_url="/docs", redoc_url=None)
    app.add_middleware(_BodyLimit, limit=max_request_bytes)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = P.validation_error(e.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        if isinstance(e.__cause__, _TooLarge):  # FastAPI wraps body read errors in a 400
            err = APIError(f"request body is larger than {max_request_bytes} bytes",
                           status=413, code="request_too_large")
            return JSONResponse(err.body(), status_code=413)
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.error_body(str(e.detail), kind), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse(P.error_body(f"internal error: {type(e).__name__}: {e}",
                                         "server_error"), status_code=500)

    def authorize(request: Request) -> None:
        if not keys:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not token:
            raise APIError("missing API key: send 'Authorization: Bearer <key>'", status=401,
                           code="invalid_api_key")
        if not any(secrets.compare_digest(token, k) for k in keys):
            raise APIError("invalid API key", status=401, code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name != model_name:
            raise APIError(f"the model {name!r} does not exist; this server serves "
                           f"{model_name!r}", status=404, param="model", code="model_not_found")

    def params_for(req: Any, prompt_len: int, choice: int, *, stops: list[int],
                   logprobs: int | None) -> Any:
        if req.ignore_eos:
            stops = []  # ignore_eos: only max_tokens and stop strings end the answer
        requested = getattr(req, "max_completion_tokens", None) or req.max_tokens
        budget = P.resolve_max_tokens(requested, prompt_len, session_len, max_tokens_limit)
        try:
            params = SamplingParams(**P.sampling_kwargs(req, budget, choice=choice,
                                                        stop_token_ids=stops, logprobs=logprobs))
            params.validate()
        except (ValueError, TypeError) as e:
            raise APIError(str(e), code="invalid_value") from None
        return params

    v1 = [Depends(authorize)]

    # -- pages and status ------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "features": feats,
                "session_len": session_len, "max_tokens_limit": max_tokens_limit,
                "auth": bool(keys),
                **{k: getattr(engine, k) for k in ("num_running", "num_waiting",
                                                   "num_free_blocks", "num_total_blocks")
                   if hasattr(engine, k)}}

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "internlm2",
             "max_model_len": session_len, "features": feats}]}

    # -- chat ------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(req: P.ChatCompletionRequest, request: Request) -> Any:
        check_model(req.model)
        plan = P.plan_tools(req.tools, req.tool_choice)
        ids = P.chat_prompt_ids(req.messages, tokenizer, plan)
        top = (req.top_logprobs or 0) if req.logprobs else None
        stops = tool_stops if plan.stop_action_end else base_stops
        jobs = [(ids, params_for(req, len(ids), i, stops=stops, logprobs=top))
                for i in range(req.n)]
        rid = P.new_id("chatcmpl")
        if req.stream:
            return _stream(_chat_events(req, plan, jobs, request, rid, top))
        finals: dict[int, Any] = {}
        lps: dict[int, list] = {i: [] for i in range(req.n)}
        async for i, out in _choices(async_engine, jobs, request, rid):
            if out.logprobs:
                lps[i].extend(out.logprobs)
            if out.finished:
                finals[i] = out
        if len(finals) < req.n:  # the client went away
            return JSONResponse(P.error_body("client disconnected"), status_code=499)
        choices = []
        for i in range(req.n):
            out = finals[i]
            reason = out.finish_reason
            if plan.active:
                parsed = parse_output(plan.prefix + out.text)
                if parsed.error or not parsed.tool_calls:
                    message = {"role": "assistant", "content": parsed.content}
                else:
                    message = to_openai_message(parsed)
                    message.pop("code", None)
                    reason = "tool_calls"
            else:
                message = {"role": "assistant", "content": out.text}
            choice = {"index": i, "message": message, "logprobs": None, "finish_reason": reason}
            if top is not None:
                choice["logprobs"] = {"content": P.chat_logprobs(lps[i], tokenizer, top)}
            choices.append(choice)
        return P.chat_response(rid, model_name, choices, _usage(finals))

    async def _chat_events(req: P.ChatCompletionRequest, plan: P.ToolPlan, jobs: list,
                           request: Request, rid: str, top: int | None) -> AsyncIterator[str]:
        t0 = P.now()
        with_usage = req.include_usage()
        states = [_ChatStream(plan) for _ in jobs]
        for i in range(len(jobs)):
            yield _sse(P.chat_chunk(rid, model_name, t0, [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}], with_usage=with_usage))
        finals: dict[int, Any] = {}
        async for i, out in _guarded(_choices(async_engine, jobs, request, rid)):
            if isinstance(out, str):  # an error after the headers went out
                yield out
                return
            st = states[i]
            deltas = st.deltas(out.new_text, out.finished)
            lp = None
            if top is not None and out.logprobs:
                lp = {"content": P.chat_logprobs(out.logprobs, tokenizer, top)}
                if not deltas:
                    deltas = [{"content": ""}]
            for d in deltas:
                yield _sse(P.chat_chunk(rid, model_name, t0, [
                    {"index": i, "delta": d, "logprobs": lp, "finish_reason": None}],
                    with_usage=with_usage))
                lp = None
            if out.finished:
                finals[i] = out
                yield _sse(P.chat_chunk(rid, model_name, t0, [
                    {"index": i, "delta": {}, "logprobs": None,
                     "finish_reason": st.finish_reason(out.finish_reason)}],
                    with_usage=with_usage))
        if len(finals) < len(jobs):
            return  # the client went away: nobody to send the rest to
        if with_usage:
            yield _sse(P.chat_chunk(rid, model_name, t0, [], _usage(finals), with_usage=True))
        yield "data: [DONE]\n\n"

    # -- completions -----------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=v1)
    async def completions(req: P.CompletionRequest, request: Request) -> Any:
        check_model(req.model)
        prompts = P.completion_prompts(req.prompt, tokenizer)
        jobs = [(ids, params_for(req, len(ids), c, stops=base_stops, logprobs=req.logprobs))
                for ids in prompts for c in range(req.n)]
        rid = P.new_id("cmpl")
        echo = [tokenizer.decode([t for t in ids if t != tokenizer.bos_id]) if req.echo else ""
                for ids in prompts for _ in range(req.n)]
        if req.stream:
            return _stream(_completion_events(req, jobs, echo, request, rid))
        finals: dict[int, Any] = {}
        lps: dict[int, list] = {i: [] for i in range(len(jobs))}
        async for i, out in _choices(async_engine, jobs, request, rid):
            if out.logprobs:
                lps[i].extend(out.logprobs)
            if out.finished:
                finals[i] = out
        if len(finals) < len(jobs):
            return JSONResponse(P.error_body("client disconnected"), status_code=499)
        choices = []
        for i in range(len(jobs)):
            out = finals[i]
            choices.append({"index": i, "text": echo[i] + out.text,
                            "logprobs": None if req.logprobs is None else
                            P.completion_logprobs(lps[i], tokenizer, req.logprobs, len(echo[i])),
                            "finish_reason": out.finish_reason})
        return P.completion_response(rid, model_name, choices, _usage(finals, per_prompt=req.n))

    async def _completion_events(req: P.CompletionRequest, jobs: list, echo: list[str],
                                 request: Request, rid: str) -> AsyncIterator[str]:
        t0 = P.now()
        with_usage = req.include_usage()
        finals: dict[int, Any] = {}
        offsets = [len(e) for e in echo]
        for i, e in enumerate(echo):
            if e:
                yield _sse(P.completion_chunk(rid, model_name, t0, [
                    {"index": i, "text": e, "logprobs": None, "finish_reason": None}],
                    with_usage=with_usage))
        async for i, out in _guarded(_choices(async_engine, jobs, request, rid)):
            if isinstance(out, str):
                yield out
                return
            lp = None
            if req.logprobs is not None and out.logprobs:
                lp = P.completion_logprobs(out.logprobs, tokenizer, req.logprobs, offsets[i])
            offsets[i] += len(out.new_text)
            if out.new_text or lp:
                yield _sse(P.completion_chunk(rid, model_name, t0, [
                    {"index": i, "text": out.new_text, "logprobs": lp, "finish_reason": None}],
                    with_usage=with_usage))
            if out.finished:
                finals[i] = out
                yield _sse(P.completion_chunk(rid, model_name, t0, [
                    {"index": i, "text": "", "logprobs": None,
                     "finish_reason": out.finish_reason}], with_usage=with_usage))
        if len(finals) < len(jobs):
            return
        if with_usage:
            yield _sse(P.completion_chunk(rid, model_name, t0, [],
                                          _usage(finals, per_prompt=req.n), with_usage=True))
        yield "data: [DONE]\n\n"

    # -- embeddings and tokenize -----------------------------------------------------------
    @app.post("/v1/embeddings", dependencies=v1)
    async def embeddings(req: P.EmbeddingRequest) -> dict:
        check_model(req.model)
        if not hasattr(engine, "embed"):
            raise APIError("this engine has no embed()", status=501, code="unsupported")
        inputs = P.embedding_inputs(req.input, tokenizer)
        if session_len is not None:
            long = max(len(x) for x in inputs)
            if long > session_len:
                raise APIError(f"an input has {long} tokens, more than the session length "
                               f"({session_len})", param="input",
                               code="context_length_exceeded")
        vectors = await async_engine.call(engine.embed, inputs)
        data = [{"object": "embedding", "index": i,
                 "embedding": P.encode_embedding(v.tolist(), req.encoding_format)}
                for i, v in enumerate(vectors)]
        n = sum(len(x) for x in inputs)
        return {"object": "list", "data": data, "model": model_name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/v1/tokenize", dependencies=v1)
    async def tokenize(req: P.TokenizeRequest) -> dict:
        if req.model is not None:
            check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError("send exactly one of 'prompt' (text) or 'messages' (a chat)",
                           param="prompt")
        if req.messages is not None:
            ids = P.chat_prompt_ids(req.messages, tokenizer, P.ToolPlan(req.tools or None))
        else:
            ids = tokenizer.encode(req.prompt, add_bos=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": session_len}

    if agent is not None:
        from .agent_routes import add_agent_routes
        add_agent_routes(app, async_engine, tokenizer, agent, authorize=authorize,
                         check_model=check_model, stop_token_ids=base_stops,
                         session_len=session_len, max_tokens_limit=max_tokens_limit)
    return app


def _usage(finals: dict[int, Any], per_prompt: int | None = None) -> dict:
    """Usage over all choices. Choices come in groups of `per_prompt` (all of them when None)
    sharing one prompt, which is counted once, with the best cache hit of its group."""
    outs = [finals[i] for i in sorted(finals)]
    size = per_prompt or len(outs)
    groups = [outs[k:k + size] for k in range(0, len(outs), size)]
    prompt = sum(g[0].prompt_tokens for g in groups)
    cached = sum(max(getattr(o, "cached_tokens", 0) or 0 for o in g) for g in groups)
    completion = sum(len(o.token_ids) for o in outs)
    return P.usage(prompt, completion, min(cached, prompt))


async def _guarded(items: AsyncIterator[tuple[int, Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Pass items through; an error becomes a final (-1, SSE error event + [DONE]) item, since
    the status line has already been sent once a stream has started."""
    try:
        async for item in items:
            yield item
    except APIError as e:
        yield -1, _sse(e.body()) + "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - reported to the client, the server keeps going
        yield -1, _sse(P.error_body(f"internal error: {type(e).__name__}: {e}",
                                    "server_error")) + "data: [DONE]\n\n"
    finally:
        await items.aclose()


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
