"""OpenAI wire format: request models and their checks, response shapes, the error shape.

Everything here is plain data work (no engine, no I/O), so the server's behaviour at the edges
(bad roles, bad numbers, tool choices, logprob layouts) is testable without a model.

Requests are validated twice on purpose: pydantic checks each field's type and range (FastAPI
turns its errors into 400s in OpenAI's shape, see `validation_error`), then the functions
below check what depends on the model (vocabulary, session length, the token budget).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..chat_format import ACTION_START, PLUGIN, ChatFormatError, render_chat_ids

__all__ = [
    "APIError", "error_body", "validation_error", "ChatCompletionRequest", "CompletionRequest",
    "EmbeddingRequest", "TokenizeRequest", "ToolPlan", "plan_tools", "check_messages",
    "chat_prompt_ids", "completion_prompts", "embedding_inputs", "resolve_max_tokens",
    "sampling_kwargs", "usage", "chat_logprobs", "completion_logprobs", "chat_response",
    "chat_chunk", "completion_response", "completion_chunk", "encode_embedding", "new_id", "now",
]

CHAT_ROLES = ("system", "user", "assistant", "tool", "function", "environment")


class APIError(Exception):
    """An error the client caused (or, with status 5xx, one it should retry), in OpenAI's shape."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = (
            message, status, type, param, code)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """`{"error": {"message", "type", "param", "code"}}`: what the official clients parse."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_error(errors: Sequence[Mapping]) -> APIError:
    """FastAPI/pydantic errors -> one 400 naming the first bad field (422 is not OpenAI's code)."""
    if not errors:
        return APIError("invalid request")
    e = errors[0]
    loc = [p for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        return APIError(f"request body is not valid JSON: {e.get('msg', '')}", code="invalid_json")
    if e.get("type") == "missing" and not loc:
        return APIError("request body is missing; send a JSON object", code="invalid_json")
    # Union members add their type name to the location (e.g. stop.str); keep the field path.
    loc = [p for p in loc if not (isinstance(p, str) and ("[" in p or p in
                                                          ("str", "int", "list", "dict")))]
    param = _loc(loc) or None
    msg = str(e.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    got = e.get("input")
    shown = "" if e.get("type") == "missing" else f", got {json.dumps(got, default=str)[:80]}"
    return APIError(f"{param or 'body'}: {msg}{shown}{more}", param=param,
                    code="invalid_value")


# ----------------------------------------------------------------------------- requests

_Stop = str | list[str] | None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=16)
    stop: _Stop = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: _Stop) -> _Stop:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(items)}")
        if any(not s for s in items):
            raise ValueError("stop strings must be non-empty")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ("none", "auto", "required"):
            raise ValueError("must be 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
        if isinstance(v, dict):
            fn = v.get("function")
            if v.get("type", "function") != "function" or not isinstance(fn, dict) \
                    or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ValueError("a named tool choice is {'type': 'function', "
                                 "'function': {'name': NAME}}")
        return v

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v: Any) -> Any:
        if v is not None and v.get("type") != "text":
            raise ValueError(f"only {{'type': 'text'}} is supported, got {v.get('type')!r}")
        return v


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True


# ----------------------------------------------------------------------------- prompts


def check_messages(messages: Sequence[Mapping]) -> None:
    """Roles and contents a chat request may carry; APIError naming the message otherwise."""
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise APIError(f"messages[{i}].role: unknown role {role!r}; expected one of "
                           f"{', '.join(CHAT_ROLES)}", param=f"messages[{i}].role",
                           code="invalid_value")
        if role != "assistant" and m.get("content") is None:
            raise APIError(f"messages[{i}].content: required for role {role!r}",
                           param=f"messages[{i}].content", code="invalid_value")


class ToolPlan:
    """How a request's `tools` / `tool_choice` shape the prompt and the parsing of the reply.

    `tools` go to the plugin system turn (None: no tools, plain text out). `prefix` is text the
    prompt ends with, already inside an action block, which forces a call: "required" opens a
    plugin block, a named choice also writes the name, as the model itself would. The reply is
    parsed as `prefix + generated text`. `stop_action_end`: stop at <|action_end|> too, so a
    call is returned as soon as it is complete.
    """

    def __init__(self, tools: list | None, prefix: str = ""):
        self.tools = tools
        self.prefix = prefix

    @property
    def active(self) -> bool:
        return bool(self.tools)

    @property
    def stop_action_end(self) -> bool:
        return self.active


def plan_tools(tools: list[dict] | None, tool_choice: Any) -> ToolPlan:
    """The ToolPlan for `tools` and `tool_choice` (OpenAI semantics; default auto with tools)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise APIError("tool_choice needs a non-empty 'tools' list", param="tool_choice")
        return ToolPlan(None)
    if tool_choice == "none":
        return ToolPlan(None)
    if tool_choice in (None, "auto"):
        return ToolPlan(tools)
    opening = f"{ACTION_START}{PLUGIN}\n"
    if tool_choice == "required":
        return ToolPlan(tools, opening)
    name = tool_choice["function"]["name"]
    names = [(t.get("function") or t).get("name") for t in tools if isinstance(t, Mapping)]
    if name not in names:
        raise APIError(f"tool_choice names function {name!r}, which is not in tools "
                       f"({', '.join(map(str, names))})", param="tool_choice")
    return ToolPlan(tools, opening + '{"name": ' + json.dumps(name, ensure_ascii=False)
                    + ', "parameters": ')


def chat_prompt_ids(messages: list[dict], tokenizer: Any, plan: ToolPlan) -> list[int]:
    """Prompt token ids of a chat request (template, tools, forced-call prefix)."""
    check_messages(messages)
    try:
        ids, _ = render_chat_ids(messages, tokenizer, tools=plan.tools, add_generation_prompt=True)
    except ChatFormatError as e:
        param = str(e).split(":", 1)[0] if ":" in str(e) else None
        raise APIError(str(e), param=param, code="invalid_value") from None
    if plan.prefix:
        ids = ids + tokenizer.encode(plan.prefix, add_bos=False)
    return ids


def _check_ids(ids: list[int], vocab: int, where: str) -> list[int]:
    if not ids:
        raise APIError(f"{where}: empty prompt", param=where)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab})",
                       param=where)
    return ids


def completion_prompts(prompt: Any, tokenizer: Any) -> list[list[int]]:
    """Token ids of each prompt of a completions request (text gets <s> first)."""
    vocab = tokenizer.vocab_size
    if isinstance(prompt, str):
        return [_check_ids(tokenizer.encode(prompt), vocab, "prompt")]
    if not prompt:
        raise APIError("prompt: empty list", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [_check_ids(list(prompt), vocab, "prompt")]
    if all(isinstance(p, str) for p in prompt):
        return [_check_ids(tokenizer.encode(p), vocab, f"prompt[{i}]") for i, p in enumerate(prompt)]
    if all(isinstance(p, list) for p in prompt):
        return [_check_ids(list(p), vocab, f"prompt[{i}]") for i, p in enumerate(prompt)]
    raise APIError("prompt: a string, a list of strings, a list of token ids or a list of "
                   "lists of token ids", param="prompt")


def embedding_inputs(inp: Any, tokenizer: Any) -> list[list[int]]:
    """Token ids of each input of an embeddings request (same forms as completion prompts)."""
    try:
        return completion_prompts(inp, tokenizer)
    except APIError as e:
        raise APIError(e.message.replace("prompt", "input"), param="input") from None


def resolve_max_tokens(requested: int | None, prompt_len: int, session_len: int | None,
                       limit: int) -> int:
    """The token budget of one request: what was asked (checked) or what fits (default)."""
    if requested is not None and requested > limit:
        raise APIError(f"max_tokens={requested} is more than this server allows ({limit})",
                       param="max_tokens", code="max_tokens_exceeded")
    if session_len is None:
        return requested if requested is not None else limit
    room = session_len - prompt_len
    if requested is None:
        if room < 1:
            raise APIError(f"the prompt has {prompt_len} tokens, which leaves no room to "
                           f"generate within the session length of {session_len}",
                           param="messages", code="context_length_exceeded")
        return min(limit, room)
    if prompt_len + requested > session_len:
        raise APIError(f"prompt ({prompt_len} tokens) + max_tokens ({requested}) = "
                       f"{prompt_len + requested} is more than the session length "
                       f"({session_len}); lower max_tokens to at most {max(room, 0)} or shorten "
                       "the prompt", param="max_tokens", code="context_length_exceeded")
    return requested


def sampling_kwargs(req: _Sampling, max_tokens: int, *, choice: int = 0,
                    stop_token_ids: list[int] | None = None, logprobs: int | None = None) -> dict:
    """Keyword arguments of the engine's SamplingParams for choice `choice` of a request.

    With n > 1 and a seed, choice i uses seed + i: the same request is reproducible and its
    choices still differ.
    """
    return dict(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                top_k=req.top_k, seed=None if req.seed is None else req.seed + choice,
                stop=tuple(req.stop_list()), stop_token_ids=stop_token_ids,
                ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty, logprobs=logprobs)


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(items: Sequence[Any], tokenizer: Any, top: int) -> list[dict]:
    """Engine TokenLogprobs -> the entries of OpenAI chat `logprobs.content`."""
    out = []
    for lp in items:
        text = _token_text(tokenizer, lp.token_id)
        alts = []
        for tid, val in list(lp.top)[:top]:
            t = _token_text(tokenizer, tid)
            alts.append({"token": t, "logprob": float(val), "bytes": list(t.encode("utf-8"))})
        out.append({"token": text, "logprob": float(lp.logprob),
                    "bytes": list(text.encode("utf-8")), "top_logprobs": alts})
    return out


def completion_logprobs(items: Sequence[Any], tokenizer: Any, top: int,
                        offset: int = 0) -> dict:
    """Engine TokenLogprobs -> OpenAI completions `logprobs` (tokens, token_logprobs, ...)."""
    tokens, values, tops, offsets = [], [], [], []
    pos = offset
    for lp in items:
        text = _token_text(tokenizer, lp.token_id)
        tokens.append(text)
        values.append(float(lp.logprob))
        alts: dict[str, float] = {}
        for tid, val in list(lp.top)[:top]:
            alts.setdefault(_token_text(tokenizer, tid), float(val))
        tops.append(alts)
        offsets.append(pos)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


def chat_response(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": now(), "model": model,
            "choices": choices, "usage": use}


def chat_chunk(rid: str, model: str, created: int, choices: list[dict],
               use: dict | None = None, with_usage: bool = False) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": choices}
    if with_usage:
        out["usage"] = use
    return out


def completion_response(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": now(), "model": model,
            "choices": choices, "usage": use}


def completion_chunk(rid: str, model: str, created: int, choices: list[dict],
                     use: dict | None = None, with_usage: bool = False) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created, "model": model,
           "choices": choices}
    if with_usage:
        out["usage"] = use
    return out


def encode_embedding(vector: Sequence[float], fmt: str) -> list[float] | str:
    """A vector as a JSON list, or as base64 of little-endian float32 (what the SDK asks for)."""
    if fmt == "base64":
        import numpy as np
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
