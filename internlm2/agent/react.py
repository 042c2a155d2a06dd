"""ReAct agent: the Thought / Action / Action Input / Observation / Final Answer text protocol.

For models that never learned the <|action_start|> tokens (base models, other fine-tunes):
tools are described in the system prompt, the model writes

    Thought: ...
    Action: calculator
    Action Input: {"expression": "2 + 2"}

and generation stops at "Observation:"; the agent runs the tool and appends
"Observation: {result}" to the same assistant turn, then lets the model continue, until it
writes "Final Answer: ...". Same interface, registry and interpreter as `Agent`; the
interpreter appears as a tool named "python" whose input is the code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from ..chat_format import IM_END, render_chat
from .loop import Agent, AgentEvent, format_interpreter_result
from .tools import ToolResult

__all__ = ["ReActAgent", "parse_react"]

OBSERVATION = "Observation:"

_ACTION_RE = re.compile(r"^\s*Action\s*:\s*(.+?)\s*$", re.MULTILINE)
_INPUT_RE = re.compile(r"^\s*Action\s*Input\s*:\s*", re.MULTILINE)
_FINAL_RE = re.compile(r"^\s*Final\s*Answer\s*:\s*", re.MULTILINE)
_FENCE_RE = re.compile(r"^\s*```[\w+-]*[ \t]*\n(.*?)\n?```\s*$", re.DOTALL)


def parse_react(text: str) -> tuple[str, Any]:
    """("final", answer) | ("action", (name, raw_input)) | ("none", text) for one model segment.

    An Action before a Final Answer wins (the model must see the observation first)."""
    a = _ACTION_RE.search(text)
    f = _FINAL_RE.search(text)
    if a and (f is None or a.start() < f.start()):
        name = a.group(1).strip().strip("`\"'[]")
        m = _INPUT_RE.search(text, a.end())
        raw = ""
        if m:
            raw = text[m.end():]
            stop = _FINAL_RE.search(raw)
            raw = (raw[:stop.start()] if stop else raw).strip()
        return "action", (name, raw)
    if f:
        return "final", text[f.end():].strip()
    return "none", text.strip()


def _arguments(raw: str, schema: dict | None) -> dict | str:
    """Action Input as arguments: a JSON object; or, for a tool with one string parameter
    (or one required), the plain text (quotes and code fences removed) as that parameter."""
    m = _FENCE_RE.match(raw)
    body = m.group(1) if m else raw
    try:
        obj = json.loads(body)
        if isinstance(obj, dict):
            return obj
    except json.JSONDecodeError:
        obj = None
    props = (schema or {}).get("properties") or {}
    required = (schema or {}).get("required") or []
    target = required[0] if len(required) == 1 else (next(iter(props)) if len(props) == 1 else None)
    if target is None:
        return f"Action Input must be a JSON object with the arguments {list(props)}"
    value = obj if obj is not None else body.strip().strip('"').strip("'")
    return {target: value}


class ReActAgent(Agent):
    """`Agent`'s interface over the ReAct text protocol (see the module docstring)."""

    REACT_PROMPT = (
        "Answer the question as well as you can. You have access to these tools:\n\n{tools}\n\n"
        "Use this format:\n\nQuestion: the question to answer\nThought: think about what to do\n"
        "Action: the tool to use, one of [{names}]\nAction Input: the tool's input as a JSON "
        "object\nObservation: the tool's result\n... (Thought/Action/Action Input/Observation "
        "may repeat)\nThought: I now know the final answer\nFinal Answer: the answer to the "
        "question\n\nBegin!")

    def _tool_lines(self) -> tuple[str, list[str]]:
        lines, names = [], []
        for t in self.registry:
            lines.append(f"{t.name}: {t.description} Arguments: "
                         f"{json.dumps(t.parameters.get('properties', {}), ensure_ascii=False)}")
            names.append(t.name)
        if self.interpreter is not None:
            lines.append("python: run Python code in a stateful Jupyter-like session and see its "
                         "output. Action Input: the code.")
            names.append("python")
        return "\n".join(lines), names

    def _fresh(self) -> list[dict]:
        tools, names = self._tool_lines()
        text = self.REACT_PROMPT.format(tools=tools or "(none)", names=", ".join(names))
        if self.system:
            text = self.system + "\n\n" + text
        return [{"role": "system", "content": text}]

    def render(self, messages: Sequence[dict]) -> str:
        return render_chat(messages)  # tools live in the system text; no special turns

    def _start(self, prompt: str | Sequence[dict]) -> list[dict]:
        if isinstance(prompt, str):
            return self._fresh() + [{"role": "user", "content": f"Question: {prompt}"}]
        messages = super()._start(prompt)
        if messages[0].get("role") != "system":  # the tools are described in the system turn
            messages = self._fresh() + messages
        return messages

    def chat_stream(self, message: str) -> Iterator[AgentEvent]:
        self.messages.append({"role": "user", "content": f"Question: {message}"})
        return self._loop(self.messages)

    def _run_action(self, name: str, raw: str) -> tuple[str, Any, list[str]]:
        if name == "python" and self.interpreter is not None:
            m = _FENCE_RE.match(raw)
            code = m.group(1) if m else raw
            try:
                obj = json.loads(code)
                code = obj.get("code", code) if isinstance(obj, dict) else code
            except json.JSONDecodeError:
                pass
            res = self.interpreter.run(code)
            return format_interpreter_result(res), res, list(res.images or [])
        t = self.registry.get(name)
        if t is None:  # the registry's message lists the tools that exist
            res = self.registry.call(name, {})
            return res.content, res, []
        args = _arguments(raw, t.parameters)
        if isinstance(args, str):
            res = ToolResult(name, f"Error: {args}", ok=False, error="validation")
        else:
            res = self.registry.call(name, args)
        return res.content, res, []

    def _loop(self, messages: list[dict]) -> Iterator[AgentEvent]:
        scratch = ""
        prefix = self.render(messages)
        for step in range(1, self.max_steps + 1):
            text = ""
            for delta in self.backend.generate_stream(prefix + scratch, [OBSERVATION, IM_END]):
                text += delta
                yield AgentEvent("text", delta, step)
            kind, got = parse_react(text)
            if kind == "action":
                name, raw = got
                cut = _INPUT_RE.search(text)
                text = text if cut is None else text[:cut.end()] + raw
                t = self.registry.get(name)
                args = _arguments(raw, t.parameters if t else None)
                is_code = name == "python" and self.interpreter is not None
                yield AgentEvent("action", step=step, name=name, code=raw if is_code else None,
                                 arguments=args if isinstance(args, dict) and not is_code else None)
                content, res, images = self._run_action(name, raw)
                scratch += text.rstrip() + f"\n{OBSERVATION} {content}\n"
                yield AgentEvent("result", content, step, name=name, result=res, images=images)
                continue
            scratch += text
            answer = got
            messages.append({"role": "assistant", "content": scratch.strip()})
            yield AgentEvent("final", answer, step, reason="answer")
            return
        messages.append({"role": "assistant", "content": scratch.strip()})
        yield AgentEvent("final", f"Stopped: the step limit ({self.max_steps}) was reached before "
                         "a final answer.", self.max_steps, reason="max_steps")
