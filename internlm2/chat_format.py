"""The InternLM2-Chat format: ChatML with the plugin (tool) and code-interpreter protocols.

One place knows the text of a conversation, its token ids and which tokens are trained on
(`render_chat_ids`); SFT, reward training, PPO, the CLI and the server all go through here.

Format (the released chat checkpoints were trained on it; one character off degrades them):

    <s><|im_start|>system\n{system}<|im_end|>\n
    <|im_start|>system name=<|interpreter|>\n{interpreter description}<|im_end|>\n
    <|im_start|>system name=<|plugin|>\n{json.dumps([function schemas], ensure_ascii=False)}<|im_end|>\n
    <|im_start|>user\n{question}<|im_end|>\n
    <|im_start|>assistant\n{text}<|action_start|><|plugin|>\n{"name": ..., "parameters": {...}}<|action_end|><|im_end|>\n
    <|im_start|>environment name=<|plugin|>\n{result}<|im_end|>\n
    <|im_start|>assistant\n{text}<|action_start|><|interpreter|>\n```python\n{code}\n```<|action_end|>\n<|im_end|>\n
    <|im_start|>environment name=<|interpreter|>\n{output}<|im_end|>\n
    <|im_start|>assistant\n

OpenAI mapping (as the official LMDeploy server does it): request `tools` become the plugin
system turn, inserted after the first message when that is a system message, else first; each
tool contributes its `function` object with the keys `description`, `name`, `parameters` in that
order (LMDeploy dumps its pydantic `Function` model, so a missing description is `null` and
other keys are dropped); role `tool` becomes `environment name=<|plugin|>`; assistant
`tool_calls` become one plugin action block each, written right after the content.
"""

from __future__ import annotations

import json
import random
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "BOS", "IM_START", "IM_END", "ACTION_START", "ACTION_END", "PLUGIN", "INTERPRETER",
    "DEFAULT_SYSTEM_PROMPT", "DEFAULT_INTERPRETER_PROMPT", "ChatFormatError",
    "render_chat", "render_chat_ids", "ToolCall", "ParsedOutput", "parse_output",
    "to_openai_message", "StreamParser", "ContentDelta", "ToolCallStart", "ToolCallDelta",
    "CodeDelta", "make_call_id",
]

BOS = "<s>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ACTION_START = "<|action_start|>"
ACTION_END = "<|action_end|>"
PLUGIN = "<|plugin|>"
INTERPRETER = "<|interpreter|>"

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, honest and harmless AI assistant. Answer accurately and concisely, "
    "say so when you are unsure, and reply in the language the user writes in."
)

DEFAULT_INTERPRETER_PROMPT = (
    "You can run Python code in a stateful, Jupyter-like environment: variables, imports and "
    "files persist between runs. Send code to run it there and you will receive its output. "
    "numpy, pandas and matplotlib are installed, and files the user uploads are in the current "
    "working folder, where you may also save files. Use it for:\n"
    "- calculations, mathematics and checking results\n"
    "- reading, cleaning and analysing data (CSV, JSON, Excel and similar)\n"
    "- drawing charts and figures\n"
    "- processing text and files"
)

_ROLES = ("system", "user", "assistant", "environment", "tool", "function")
_NAME_TOKENS = {"plugin": PLUGIN, "interpreter": INTERPRETER}


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered; the message names the index and field."""


# ----------------------------------------------------------------------------- rendering


def _text_of(content: Any, where: str, allow_none: bool) -> str:
    if content is None:
        if allow_none:
            return ""
        raise ChatFormatError(f"{where}: content is missing (None)")
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ChatFormatError(
                    f"{where}[{j}]: only text parts {{'type': 'text', 'text': str}} are "
                    f"supported, got {part!r:.80}")
            parts.append(part["text"])
        return "".join(parts)
    raise ChatFormatError(f"{where}: must be a string, None or a list of text parts, "
                          f"got {type(content).__name__}")


def _name_suffix(name: Any, where: str) -> str:
    if name is None:
        return ""
    if not isinstance(name, str) or not name or any(c in name for c in " \n"):
        raise ChatFormatError(f"{where}: must be a non-empty string without spaces or newlines, "
                              f"got {name!r}")
    return " name=" + _NAME_TOKENS.get(name, name)


def _function_schema(tool: Any, where: str) -> dict:
    """The dict LMDeploy dumps for one tool: its pydantic `Function` (description, name, parameters)."""
    if not isinstance(tool, Mapping):
        raise ChatFormatError(f"{where}: must be a dict, got {type(tool).__name__}")
    if "function" in tool or "type" in tool:
        if tool.get("type", "function") != "function":
            raise ChatFormatError(f"{where}.type: only 'function' tools are supported, "
                                  f"got {tool.get('type')!r}")
        fn = tool.get("function")
        where = where + ".function"
        if not isinstance(fn, Mapping):
            raise ChatFormatError(f"{where}: must be a dict with name/description/parameters")
    else:
        fn = tool
    name, desc, params = fn.get("name"), fn.get("description"), fn.get("parameters")
    if not isinstance(name, str) or not name:
        raise ChatFormatError(f"{where}.name: must be a non-empty string, got {name!r}")
    if desc is not None and not isinstance(desc, str):
        raise ChatFormatError(f"{where}.description: must be a string, got {type(desc).__name__}")
    if params is not None and not isinstance(params, Mapping):
        raise ChatFormatError(f"{where}.parameters: must be a JSON-schema object (dict), "
                              f"got {type(params).__name__}")
    return {"description": desc, "name": name, "parameters": params}


def _plugin_block(name: str, arguments: Any) -> str:
    # json.dumps default separators and ensure_ascii=False, key order name, parameters: the
    # text LMDeploy writes for an OpenAI tool call and the official chat_format.md example.
    call = json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)
    return f"{ACTION_START}{PLUGIN}\n{call}{ACTION_END}"


def _interpreter_block(code: str) -> str:
    body = code if code.lstrip().startswith("```") else f"```python\n{code}\n```"
    # The official chat_format.md example and lagent's interpreter protocol put a newline after
    # <|action_end|> for interpreter calls (plugin calls have none).
    return f"{ACTION_START}{INTERPRETER}\n{body}{ACTION_END}\n"


def _call_arguments(args: Any) -> tuple[dict, str | None]:
    """A tool call's arguments (a dict, a JSON string, empty or None) as a dict, or a problem."""
    if args is None or (isinstance(args, str) and not args.strip()):
        return {}, None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            return {}, f"not valid JSON ({e})"
    if not isinstance(args, Mapping):
        return {}, f"must be a JSON object, got {type(args).__name__}"
    return dict(args), None


def _tool_call_blocks(calls: Any, where: str) -> str:
    if not isinstance(calls, (list, tuple)):
        raise ChatFormatError(f"{where}: must be a list of tool calls")
    out = []
    for j, call in enumerate(calls):
        w = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping):
            raise ChatFormatError(f"{w}.function: missing; expected "
                                  "{'type': 'function', 'function': {'name', 'arguments'}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ChatFormatError(f"{w}.function.name: must be a non-empty string, got {name!r}")
        args, problem = _call_arguments(fn.get("arguments", fn.get("parameters", {})))
        if problem:
            raise ChatFormatError(f"{w}.function.arguments: {problem}")
        out.append(_plugin_block(name, args))
    return "".join(out)


def _interpreter_text(interpreter: Any) -> str | None:
    if interpreter is None or interpreter is False:
        return None
    if interpreter is True:
        return DEFAULT_INTERPRETER_PROMPT
    if isinstance(interpreter, str):
        return interpreter
    raise ChatFormatError(f"interpreter: must be None, a bool or a string, "
                          f"got {type(interpreter).__name__}")


def _turns(messages: Sequence[Mapping], tools: Sequence | None,
           interpreter: Any) -> list[tuple[str, str, bool]]:
    """Validate and lay out the conversation as (header, body, trainable) per turn.

    header is `<|im_start|>{role}[ name=..]\\n`; body is everything up to (not including)
    `<|im_end|>`; trainable is True for assistant turns unless the message says "loss": False.
    """
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError(f"messages: must be a list of dicts, got {type(messages).__name__}")
    turns: list[tuple[str, str, bool]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"{where}: must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if role not in _ROLES:
            raise ChatFormatError(f"{where}.role: unknown role {role!r}; expected one of "
                                  f"{', '.join(_ROLES)}")
        if role in ("tool", "function"):
            # OpenAI's `name` here is the function name, not a turn name.
            body = _text_of(m.get("content"), f"{where}.content", allow_none=False)
            turns.append((f"{IM_START}environment name={PLUGIN}\n", body, False))
            continue
        header = f"{IM_START}{role}{_name_suffix(m.get('name'), where + '.name')}\n"
        if role != "assistant":
            body = _text_of(m.get("content"), f"{where}.content", allow_none=False)
            turns.append((header, body, False))
            continue
        body = _text_of(m.get("content"), f"{where}.content", allow_none=True)
        code = m.get("code")
        if code is not None:
            if not isinstance(code, str):
                raise ChatFormatError(f"{where}.code: must be a string, got {type(code).__name__}")
            body += _interpreter_block(code)
        if m.get("tool_calls") is not None:
            body += _tool_call_blocks(m["tool_calls"], f"{where}.tool_calls")
        loss = m.get("loss", True)
        if not isinstance(loss, bool):
            raise ChatFormatError(f"{where}.loss: must be a bool, got {loss!r}")
        turns.append((header, body, loss))

    extra = []
    interp = _interpreter_text(interpreter)
    if interp is not None:
        extra.append((f"{IM_START}system name={INTERPRETER}\n", interp, False))
    if tools:
        if not isinstance(tools, (list, tuple)):
            raise ChatFormatError("tools: must be a list of tool dicts")
        schemas = [_function_schema(t, f"tools[{j}]") for j, t in enumerate(tools)]
        extra.append((f"{IM_START}system name={PLUGIN}\n",
                      json.dumps(schemas, ensure_ascii=False), False))
    if extra:
        at = 1 if messages and messages[0].get("role") == "system" else 0
        turns[at:at] = extra
    return turns


def render_chat(messages: Sequence[Mapping], tools: Sequence | None = None,
                interpreter: bool | str | None = None, add_generation_prompt: bool = True,
                bos: bool = True) -> str:
    """The conversation as the exact text the InternLM2 chat models expect."""
    out = [BOS] if bos else []
    for header, body, _ in _turns(messages, tools, interpreter):
        out.append(f"{header}{body}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def render_chat_ids(messages: Sequence[Mapping], tokenizer: Any, tools: Sequence | None = None,
                    interpreter: bool | str | None = None, add_generation_prompt: bool = False,
                    bos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and a loss mask of the same length.

    The mask is 1 exactly on what the model says in assistant turns: the content, action blocks
    (including <|action_start|> and <|action_end|>) and the closing <|im_end|>, so it learns to
    stop; 0 on the `<|im_start|>assistant\\n` header, the "\\n" after <|im_end|>, and every other
    turn. An assistant message with "loss": False is all 0.

    The assistant header is encoded apart from the reply, as generation sees it (the prompt ends
    with the header; the reply's tokens come after). Every other cut falls next to a special
    token, where the tokenizer splits anyway, so the ids equal
    `tokenizer.encode(render_chat(...))` except when a reply starts with characters that merge
    with the header's "\\n" (e.g. a reply starting with "\\n": "\\n\\n" is one piece).
    """
    ids: list[int] = [tokenizer.bos_id] if bos else []
    mask: list[int] = [0] * len(ids)
    pending = ""  # untrained text is joined up to the next trained piece: fewer encode calls

    def put(text: str, bit: int) -> None:
        if text:
            piece = tokenizer.encode(text, add_bos=False)
            ids.extend(piece)
            mask.extend([bit] * len(piece))

    for header, body, trainable in _turns(messages, tools, interpreter):
        if trainable:
            put(pending + header, 0)
            put(body + IM_END, 1)
            pending = "\n"
        elif header.startswith(f"{IM_START}assistant"):
            put(pending + header, 0)  # keep header/body apart here too: same ids either way
            put(body + IM_END + "\n", 0)
            pending = ""
        else:
            pending += f"{header}{body}{IM_END}\n"
    if add_generation_prompt:
        pending += f"{IM_START}assistant\n"
    put(pending, 0)
    return ids, mask


# ----------------------------------------------------------------------------- parsing


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict
    raw: str  # the JSON text of the action block as the model wrote it


@dataclass
class ParsedOutput:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    code: str | None = None  # interpreter code, from the ```python block of an interpreter action
    error: str | None = None  # set when an action block was malformed; content is then the text


def make_call_id(rng: random.Random | None = None) -> str:
    """`call_` and 24 hex digits; from `rng` when given (reproducible), else from `secrets`."""
    return "call_" + (f"{rng.getrandbits(96):024x}" if rng is not None else secrets.token_hex(12))


_KIND_RE = re.compile(r"[ \t]*(" + re.escape(PLUGIN) + "|" + re.escape(INTERPRETER) + ")")
_FENCE_RE = re.compile(r"^\s*```[\w+-]*[ \t]*\n(.*?)(?:\n?```|\Z)", re.S)


def _plugin_call(body: str) -> tuple[str, dict, str] | str:
    """(name, arguments, raw) of a plugin action body, or an error message."""
    raw = body.strip()
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return f"plugin call is not valid JSON ({e}): {raw[:200]!r}"
    if not isinstance(obj, dict):
        return f"plugin call must be a JSON object, got {type(obj).__name__}"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return f"plugin call has no string 'name': {raw[:200]!r}"
    args, problem = _call_arguments(obj.get("parameters", obj.get("arguments", {})))
    if problem:
        return f"plugin call parameters: {problem}"
    return name, args, raw


def _interpreter_code(body: str) -> str:
    m = _FENCE_RE.match(body)
    return m.group(1) if m else body.strip()


def _cut_at_end(text: str) -> str:
    k = text.find(IM_END)
    return text if k < 0 else text[:k]


def _parse(text: str, next_id: Callable[[int], str]) -> ParsedOutput:
    t = _cut_at_end(text)
    segments: list[str] = []
    calls: list[ToolCall] = []
    codes: list[str] = []
    pos, after_block = 0, False
    while True:
        j = t.find(ACTION_START, pos)
        seg = t[pos:] if j < 0 else t[pos:j]
        # Whitespace between or after action blocks (e.g. the "\n" after an interpreter's
        # <|action_end|>) is layout, not content.
        if not (after_block and not seg.strip()):
            segments.append(seg)
        if j < 0:
            break
        k = _KIND_RE.match(t, j + len(ACTION_START))
        if k is None:
            return ParsedOutput(t, error=f"<|action_start|> at char {j} is not followed by "
                                         f"{PLUGIN} or {INTERPRETER}")
        start = k.end()
        ends = [e for e in (t.find(ACTION_END, start), t.find(ACTION_START, start)) if e >= 0]
        end = min(ends) if ends else len(t)
        body = t[start:end]
        pos = end + len(ACTION_END) if t.startswith(ACTION_END, end) else end
        after_block = True
        if k.group(1) == PLUGIN:
            got = _plugin_call(body)
            if isinstance(got, str):
                return ParsedOutput(t, error=got)
            calls.append(ToolCall(next_id(len(calls)), *got))
        else:
            codes.append(_interpreter_code(body))
    return ParsedOutput("".join(segments), calls, "\n".join(codes) if codes else None)


def parse_output(text: str, *, rng: random.Random | None = None) -> ParsedOutput:
    """Split a generated assistant reply into content, tool calls and interpreter code.

    Accepts the text with or without the final <|im_end|> / <|action_end|>; a plugin call may use
    "parameters" or "arguments", as an object or a JSON string. Never raises: a malformed action
    block gives the whole text as content, no calls, and `error`. Pass `rng` for reproducible ids.
    """
    return _parse(text, lambda i: make_call_id(rng))


def to_openai_message(parsed: ParsedOutput) -> dict:
    """The OpenAI chat `message` for a parsed reply (content None when it is only tool calls).

    Interpreter code is kept in a non-standard "code" field, which `render_chat` understands.
    """
    msg: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.tool_calls:
        if not parsed.content:
            msg["content"] = None
        msg["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for c in parsed.tool_calls]
    if parsed.code is not None:
        msg["code"] = parsed.code
    return msg


# ----------------------------------------------------------------------------- streaming


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass
class ToolCallDelta:
    index: int
    arguments: str  # a piece of the OpenAI `arguments` JSON string


@dataclass
class CodeDelta:
    text: str


_NAME_RE = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")')


def _held_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


class StreamParser:
    """Incremental `parse_output` for servers.

    `feed(delta)` returns events: `ContentDelta` (text is held back only while it could be the
    start of <|action_start|> or <|im_end|>, or is whitespace after an action block),
    `ToolCallStart` as soon as a plugin call's name is readable, `ToolCallDelta` with the
    arguments (JSON, as `to_openai_message` writes them) when its block is complete, and
    `CodeDelta` when an interpreter block is complete. After the last delta, `flush()` returns
    the remaining events and `finish()` the final `ParsedOutput`, which equals
    `parse_output(all text)`. When a block turns out malformed no further events are sent; the
    final result then carries `error`, and `flush()` sends the rest of the text as content when
    what was streamed is a prefix of it.
    """

    def __init__(self, *, rng: random.Random | None = None):
        self._rng = rng
        self._ids: list[str] = []
        self._buf = ""
        self._pos = 0  # text before this is handled
        self._state = "text"  # text | kind | body | done | dead
        self._kind = ""
        self._after_block = False
        self._started = False  # ToolCallStart sent for the current plugin block
        self._n_calls = 0  # plugin calls completed
        self._n_code = 0
        self._flushed = False
        self.streamed_content = ""
        self.events: list = []

    def _id(self, i: int) -> str:
        while len(self._ids) <= i:
            self._ids.append(make_call_id(self._rng))
        return self._ids[i]

    def _content(self, out: list, text: str) -> bool:
        """Send content unless it is whitespace after a block (then hold it); True if sent."""
        if self._after_block and not text.strip():
            return False
        self._after_block = False
        if text:
            out.append(ContentDelta(text))
            self.streamed_content += text
        return True

    def _end_block(self, out: list, body: str) -> None:
        if self._kind == PLUGIN:
            got = _plugin_call(body)
            if isinstance(got, str):
                self._state = "dead"
                return
            index = self._n_calls
            if not self._started:
                out.append(ToolCallStart(index, self._id(index), got[0]))
            out.append(ToolCallDelta(index, json.dumps(got[1], ensure_ascii=False)))
            self._n_calls += 1
        else:
            code = _interpreter_code(body)
            out.append(CodeDelta(code if self._n_code == 0 else "\n" + code))
            self._n_code += 1
        self._after_block, self._started = True, False

    def _step(self, out: list, final: bool) -> bool:
        """Advance over the buffer once; False when more text is needed."""
        rest = self._buf[self._pos:]
        if self._state == "text":
            a, e = rest.find(ACTION_START), rest.find(IM_END)
            if e >= 0 and (a < 0 or e < a):
                self._content(out, rest[:e])
                self._state = "done"
                return False
            if a >= 0:
                self._content(out, rest[:a])
                self._pos += a + len(ACTION_START)
                self._state = "kind"
                return True
            safe = len(rest) if final else len(rest) - _held_suffix(rest, (ACTION_START, IM_END))
            if self._content(out, rest[:safe]) or final:
                self._pos += safe
            return False
        if self._state == "kind":
            m = _KIND_RE.match(rest)
            if m is not None:
                self._kind = m.group(1)
                self._pos += m.end()
                self._state = "body"
                return True
            head = rest.lstrip(" \t")
            if final or not (PLUGIN.startswith(head) or INTERPRETER.startswith(head)):
                self._state = "dead"
            return False
        if self._state == "body":
            ends = [x for x in (rest.find(ACTION_END), rest.find(ACTION_START), rest.find(IM_END))
                    if x >= 0]
            if ends or final:
                end = min(ends) if ends else len(rest)
                self._end_block(out, rest[:end])
                if self._state == "dead":
                    return False
                if rest.startswith(IM_END, end):
                    self._state = "done"
                    return False
                self._pos += end + (len(ACTION_END) if rest.startswith(ACTION_END, end) else 0)
                self._state = "text"
                return True
            if self._kind == PLUGIN and not self._started:
                m = _NAME_RE.match(rest)
                if m is not None:
                    name = json.loads(m.group(1))
                    out.append(ToolCallStart(self._n_calls, self._id(self._n_calls), name))
                    self._started = True
            return False
        return False

    def feed(self, delta: str) -> list:
        if self._flushed:
            raise RuntimeError("StreamParser.feed after flush/finish")
        self._buf += delta
        out: list = []
        while self._step(out, final=False):
            pass
        self.events.extend(out)
        return out

    def flush(self) -> list:
        """Events still held after the last delta (the text is complete)."""
        if self._flushed:
            return []
        self._flushed = True
        out: list = []
        while self._step(out, final=True):
            pass
        if self._state == "dead":
            final = self.finish()
            if final.error and final.content.startswith(self.streamed_content):
                rest = final.content[len(self.streamed_content):]
                if rest:
                    out.append(ContentDelta(rest))
                    self.streamed_content += rest
        self.events.extend(out)
        return out

    def finish(self) -> ParsedOutput:
        if not self._flushed:
            self.flush()
        return _parse(self._buf, self._id)
