"""The agent loop on the official InternLM2 protocol: generate, run tool / code actions, feed back.

Each step renders the conversation with `chat_format.render_chat` (tools in the
`system name=<|plugin|>` turn, the interpreter in `system name=<|interpreter|>`), generates until
<|im_end|> or <|action_end|>, parses the reply with `chat_format.StreamParser`, runs every
plugin call through a `ToolRegistry` and interpreter code through an `Interpreter`, and appends
the results as `environment name=<|plugin|>` / `environment name=<|interpreter|>` turns. It
stops at a reply without actions (the final answer) or after `max_steps` generations.

Model backends. `Agent` takes either an `InternLM2ForCausalLM` with its tokenizer, or any object
with the backend protocol

    generate_stream(prompt_text: str, stop: list[str]) -> Iterator[str]

which gets the full rendered prompt (starting with "<s>") and yields text deltas, ending before
any string of `stop` (stop strings themselves are not yielded). Scripted test doubles, remote
engines and the server's batched engine plug in through it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chat_format import (
    ACTION_END,
    DEFAULT_INTERPRETER_PROMPT,
    DEFAULT_SYSTEM_PROMPT,
    IM_END,
    ContentDelta,
    StreamParser,
    render_chat,
    to_openai_message,
)
from .tools import Tool, ToolRegistry

__all__ = ["Agent", "AgentEvent", "AgentResult", "ModelBackend", "format_interpreter_result",
           "tool_call_validity"]


@dataclass
class AgentEvent:
    """One thing that happened. kind: "text" (a delta of the model's words), "action" (a tool
    call: name + arguments, or interpreter code), "result" (its output: `result` holds the
    ToolResult / InterpreterResult, `text` the environment turn, `images` PNG paths), "error"
    (a malformed action; the model is told and may retry), "final" (the answer; `reason` is
    "answer" or "max_steps")."""

    kind: str
    text: str = ""
    step: int = 0
    name: str | None = None  # tool name, or "interpreter"
    arguments: dict | None = None
    code: str | None = None
    result: Any = None
    images: list[str] = field(default_factory=list)
    reason: str | None = None


@dataclass
class AgentResult:
    answer: str
    messages: list[dict]
    steps: int
    reason: str  # "answer" | "max_steps"
    events: list[AgentEvent] = field(default_factory=list)


def split_stops(tokenizer: Any, stop: Sequence[str]) -> tuple[list[int], list[str]]:
    """(stop ids, stop strings) for a backend: a stop string that is one special token
    (<|im_end|>, <|action_end|>) becomes its id, since generation never decodes it into text;
    anything else is matched on the text. The tokenizer's eos id is always a stop id."""
    ids: list[int] = []
    strings: list[str] = []
    for s in stop:
        tid = tokenizer.token_to_id(s) if hasattr(tokenizer, "token_to_id") else None
        (ids.append(tid) if tid is not None else strings.append(s))
    eos = getattr(tokenizer, "eos_id", None)
    if eos is not None:
        ids.append(eos)
    return ids, strings


class ModelBackend:
    """The backend protocol over an InternLM2ForCausalLM: stop strings that are single special
    tokens (<|im_end|>, <|action_end|>) become stop ids, others are matched on the text."""

    def __init__(self, model: Any, tokenizer: Any, config: Any = None, **overrides: Any):
        from ..generate import GenerationConfig
        self.model, self.tokenizer = model, tokenizer
        config = config or GenerationConfig.chat()  # the official chat sampling defaults
        self.config = config.replace(**overrides) if overrides else config

    def generate_stream(self, prompt_text: str, stop: list[str]) -> Iterator[str]:
        from ..generate import stream_text
        ids = self.tokenizer.encode(prompt_text, add_bos=False)
        stop_ids, stop_strings = split_stops(self.tokenizer, stop)
        cfg = self.config.replace(stop_ids=stop_ids,
                                  stop_strings=tuple(self.config.stop_strings) + tuple(stop_strings))
        was = self.model.training
        self.model.eval()
        try:
            yield from stream_text(self.model, self.tokenizer, ids, cfg)
        finally:
            self.model.train(was)


def as_backend(model: Any, tokenizer: Any = None, config: Any = None, **overrides: Any) -> Any:
    if hasattr(model, "generate_stream"):
        return model
    if tokenizer is None:
        raise ValueError("Agent: a model without generate_stream() needs its tokenizer")
    return ModelBackend(model, tokenizer, config, **overrides)


def format_interpreter_result(res: Any) -> str:
    """The environment turn for an interpreter run: the result's own `to_text()` (the real
    Interpreter's), else output, value, error, images and notes assembled here."""
    if callable(getattr(res, "to_text", None)):
        return res.to_text()
    parts = []
    if getattr(res, "stdout", ""):
        parts.append(res.stdout.rstrip("\n"))
    if getattr(res, "stderr", ""):
        parts.append(res.stderr.rstrip("\n"))
    if getattr(res, "value", None) not in (None, ""):
        parts.append(str(res.value))
    if getattr(res, "error", None):
        parts.append(str(res.error).rstrip("\n"))
    for p in getattr(res, "images", None) or []:
        parts.append(f"[image saved: {os.path.basename(str(p))}]")
    if getattr(res, "timed_out", False):
        parts.append("[execution timed out and was stopped]")
    if getattr(res, "restarted", False):
        parts.append("[the Python kernel was restarted; earlier variables are gone]")
    return "\n".join(parts) if parts else "[no output]"


def _file_size(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}".replace(".0", "")
        n /= 1024
    return f"{n}G"


class Agent:
    """Tool use and code interpretation with an InternLM2 chat model.

    `stream(question or messages)` yields `AgentEvent`s for one user turn on a fresh
    conversation; `run()` returns an `AgentResult`; `chat()` / `chat_stream()` keep a multi-turn
    history in `self.messages`; `upload(path)` puts a file into the interpreter's folder and
    announces it with the official `user name=file` turn.
    """

    def __init__(self, model: Any, tokenizer: Any = None, tools: Sequence[Tool | Callable] |
                 ToolRegistry = (), interpreter: Any = False, system: str | None = None, *,
                 max_steps: int = 8, interpreter_prompt: str | None = None,
                 workdir: str | os.PathLike | None = None, config: Any = None,
                 **generation: Any):
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"Agent.max_steps: must be an integer >= 1, got {max_steps!r}")
        self.backend = as_backend(model, tokenizer, config, **generation)
        self.registry = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools)
        self.max_steps = max_steps
        self.system = DEFAULT_SYSTEM_PROMPT if system is None else system
        self._own_interpreter = interpreter is True
        if interpreter is True:
            from .interpreter import (
                Interpreter,  # lazy: only agents that run code need it
            )
            interpreter = Interpreter(workdir=workdir)
        self.interpreter = interpreter or None
        self.interpreter_prompt = interpreter_prompt or DEFAULT_INTERPRETER_PROMPT
        self.messages: list[dict] = self._fresh()

    # -- conversation plumbing ----------------------------------------------------------------
    def _fresh(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def render(self, messages: Sequence[dict]) -> str:
        return render_chat(messages, tools=self.registry.schemas() or None,
                           interpreter=self.interpreter_prompt if self.interpreter else None)

    def _start(self, prompt: str | Sequence[dict]) -> list[dict]:
        if isinstance(prompt, str):
            return self._fresh() + [{"role": "user", "content": prompt}]
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("Agent: pass a user message (str) or a non-empty list of messages")
        return [dict(m) for m in prompt]

    def stream(self, prompt: str | Sequence[dict]) -> Iterator[AgentEvent]:
        """Events of one user turn on a fresh conversation (a str) or on `prompt` (messages)."""
        return self._loop(self._start(prompt))

    def run(self, prompt: str | Sequence[dict]) -> AgentResult:
        messages = self._start(prompt)
        return self._collect(self._loop(messages), messages)

    def chat_stream(self, message: str) -> Iterator[AgentEvent]:
        """Like `stream`, continuing `self.messages` (multi-turn)."""
        self.messages.append({"role": "user", "content": message})
        return self._loop(self.messages)

    def chat(self, message: str) -> AgentResult:
        return self._collect(self.chat_stream(message), self.messages)

    def reset(self) -> None:
        self.messages = self._fresh()

    @staticmethod
    def _collect(events: Iterator[AgentEvent], messages: list[dict]) -> AgentResult:
        got = list(events)
        final = got[-1]
        return AgentResult(final.text, messages, final.step, final.reason or "answer", got)

    def upload(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Copy a file into the interpreter's working folder; the model is told with a
        `user name=file` turn ([{"path", "size"}], the official format). Returns the name."""
        if self.interpreter is None:
            raise ValueError("Agent.upload: needs an interpreter (interpreter=True)")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"Agent.upload: {str(path)!r} is not a file")
        name = name or p.name
        self.interpreter.upload(str(p), name)
        info = [{"path": name, "size": _file_size(p.stat().st_size)}]
        self.messages.append({"role": "user", "name": "file",
                              "content": json.dumps(info, ensure_ascii=False)})
        return name

    def close(self) -> None:
        if self._own_interpreter and self.interpreter is not None:
            self.interpreter.close()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop ------------------------------------------------------------------------------
    def _generate(self, messages: list[dict], step: int,
                  out: list[AgentEvent]) -> Iterator[AgentEvent]:
        parser = StreamParser()
        for delta in self.backend.generate_stream(self.render(messages), [IM_END, ACTION_END]):
            for ev in parser.feed(delta):
                if isinstance(ev, ContentDelta) and ev.text:
                    yield AgentEvent("text", ev.text, step)
        for ev in parser.flush():
            if isinstance(ev, ContentDelta) and ev.text:
                yield AgentEvent("text", ev.text, step)
        out.append(parser.finish())  # type: ignore[arg-type]

    def _loop(self, messages: list[dict]) -> Iterator[AgentEvent]:
        for step in range(1, self.max_steps + 1):
            box: list = []
            yield from self._generate(messages, step, box)
            parsed = box[0]
            if parsed.error:
                messages.append({"role": "assistant", "content": parsed.content})
                why = (f"Your action could not be run: {parsed.error}. Write a tool call as "
                       '<|action_start|><|plugin|>\n{"name": "TOOL", "parameters": {...}}'
                       "<|action_end|> with valid JSON, or answer directly.")
                yield AgentEvent("error", why, step)
                messages.append({"role": "environment", "name": "plugin", "content": why})
                continue
            msg = to_openai_message(parsed)
            messages.append(msg)
            if not parsed.tool_calls and parsed.code is None:
                yield AgentEvent("final", parsed.content, step, reason="answer")
                return
            for call in parsed.tool_calls:
                yield AgentEvent("action", step=step, name=call.name, arguments=call.arguments)
                res = self.registry.call(call.name, call.arguments)
                messages.append({"role": "environment", "name": "plugin", "content": res.content})
                yield AgentEvent("result", res.content, step, name=call.name, result=res)
            if parsed.code is not None:
                yield AgentEvent("action", step=step, name="interpreter", code=parsed.code)
                if self.interpreter is None:
                    text, res, images = ("Error: the code interpreter is not enabled in this "
                                         "conversation; use the listed tools or answer directly."), \
                        None, []
                else:
                    res = self.interpreter.run(parsed.code)
                    text, images = format_interpreter_result(res), list(res.images or [])
                messages.append({"role": "environment", "name": "interpreter", "content": text})
                yield AgentEvent("result", text, step, name="interpreter", result=res,
                                 images=images)
        note = (f"Stopped: the step limit ({self.max_steps}) was reached before a final answer.")
        yield AgentEvent("final", note, self.max_steps, reason="max_steps")


# ----------------------------------------------------------------------------- evaluation


def tool_call_validity(model: Any, tokenizer: Any, prompts: Sequence[dict], *,
                       max_new_tokens: int = 96) -> dict:
    """How well a model calls tools: per prompt, generate the first reply greedily and check it.

    prompts: records `{"messages": [...], "tools": [OpenAI tool dicts], "expected": {"name",
    "arguments"}?}` (the eval `tool` task format). `valid` is the share of prompts whose reply
    holds a parseable call to a listed tool with schema-valid arguments (the stricter form of
    `align.sft.chat_checks`' `tool_call_valid`, which checks required names only);
    `right_tool` the share of valid calls naming `expected.name` (scored with
    `eval.tasks.score_tool_call`); `arguments` the share of prompts scored fully right by it."""
    from ..chat_format import parse_output
    from ..eval.tasks import score_tool_call
    from ..generate import GenerationConfig
    backend = as_backend(model, tokenizer, GenerationConfig(max_new_tokens=max_new_tokens))
    n = valid = right = with_expected = args_ok = 0
    samples = []
    for rec in prompts:
        registry = ToolRegistry()
        for t in rec.get("tools") or []:
            registry.register(t)
        text = "".join(backend.generate_stream(
            render_chat(rec["messages"], tools=rec.get("tools") or None), [IM_END, ACTION_END]))
        parsed = parse_output(text)
        ok = bool(parsed.tool_calls) and all(
            registry.validate(c.name, c.arguments)[1] is None for c in parsed.tool_calls)
        n += 1
        valid += ok
        exp = rec.get("expected")
        if exp:
            with_expected += 1
            s = score_tool_call(parsed, exp)
            right += ok and s["name"]
            args_ok += s["arguments"]
        if len(samples) < 5:
            samples.append(text[:300])
    return {"prompts": n, "valid": valid / n if n else 0.0,
            "right_tool": right / valid if valid and with_expected else None,
            "arguments": args_ok / with_expected if with_expected else None, "samples": samples}
