"""Tools for the agent: declare them from typed Python functions, validate calls, run them safely.

A tool is a function plus the JSON Schema of its arguments, in the OpenAI function shape that
`internlm2.chat_format.render_chat(tools=...)` writes into the official plugin system turn:

    @tool(timeout=5)
    def weather(city: str, unit: Literal["C", "F"] = "C") -> str:
        '''Current weather of a city.

        Args:
            city: the city name, e.g. "Paris".
            unit: temperature unit.
        '''

`ToolRegistry.call(name, arguments)` never raises: a model's bad call (unknown tool, missing or
mistyped argument, a tool that crashes or runs too long) comes back as a `ToolResult` whose
`content` is an error text the model can read and correct itself from.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import threading
import time
import traceback
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Tool",
    "ToolError",
    "ToolRegistry",
    "ToolResult",
    "parse_docstring",
    "schema_for_type",
    "tool",
    "validate_arguments",
]

_MISSING = inspect.Parameter.empty


class ToolError(Exception):
    """Raise inside a tool to send the model a short error text without a traceback."""


@dataclass
class ToolResult:
    """What one call gave. `content` is the text fed back to the model (also for errors)."""

    name: str
    content: str
    ok: bool = True
    value: Any = None
    error: str | None = None  # "validation" | "unknown_tool" | "timeout" | "exception" | "tool_error"
    elapsed: float = 0.0


# ----------------------------------------------------------------------------- schemas


def _json_type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    raise TypeError(f"Literal/Enum value {value!r}: only str, int, float and bool are supported")


def schema_for_type(tp: Any, where: str = "type") -> dict:
    """JSON Schema of a Python annotation: str/int/float/bool, list[X], dict[str, X],
    Optional[X] (type [X, "null"]), Literal[...] and Enum (enum), Any/unannotated ({})."""
    if tp is _MISSING or tp is Any or tp is None:
        return {} if tp is not None else {"type": "null"}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return schema_for_type(args[0], where)
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp in (list, tuple, set, Sequence, Iterable) or origin in (list, set, Sequence, Iterable):
        out: dict = {"type": "array"}
        if args:
            out["items"] = schema_for_type(args[0], where + "[]")
        return out
    if origin is tuple:
        return {"type": "array", **({"items": schema_for_type(args[0], where + "[]")}
                                    if args and (len(args) == 1 or args[1] is Ellipsis) else {})}
    if tp in (dict, Mapping) or origin in (dict, Mapping):
        out = {"type": "object"}
        if len(args) == 2 and args[1] is not Any:
            out["additionalProperties"] = schema_for_type(args[1], where + "{}")
        return out
    if origin is Literal:
        types_ = sorted({_json_type_of(a) for a in args})
        return {"type": types_[0] if len(types_) == 1 else types_, "enum": list(args)}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        types_ = sorted({_json_type_of(v) for v in values})
        return {"type": types_[0] if len(types_) == 1 else types_, "enum": values}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:  # Optional[X]
            inner = schema_for_type(rest[0], where)
            t = inner.get("type")
            if isinstance(t, str):
                return {**inner, "type": [t, "null"]}
            return {"anyOf": [inner, {"type": "null"}]}
        return {"anyOf": [schema_for_type(a, where) for a in args]}
    raise TypeError(f"{where}: cannot express {tp!r} as JSON Schema; use str, int, float, bool, "
                    "list[X], dict, Optional[X], Literal[...] or an Enum")


_SECTION_RE = re.compile(r"^\s*(Args|Arguments|Parameters|Params|Returns?|Yields?|Raises|"
                         r"Examples?|Notes?|See Also|Attributes)\s*:?\s*$")
_GOOGLE_ARG_RE = re.compile(r"^(\*{0,2}\w+)\s*(?:\(([^)]*)\))?\s*:\s*(.*)$")
_NUMPY_ARG_RE = re.compile(r"^(\*{0,2}\w+)\s*(?::\s*(.*))?$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a Google- or NumPy-style docstring.

    The description is the text before the first section; parameter descriptions come from the
    `Args:`/`Parameters` section, continuation lines joined with single spaces."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    desc: list[str] = []
    params: dict[str, list[str]] = {}
    section = None
    numpy_style = False
    current = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _SECTION_RE.match(line)
        numpy_rule = i + 1 < len(lines) and re.fullmatch(r"\s*-{3,}\s*", lines[i + 1] or "")
        if m and (line.rstrip().endswith(":") or numpy_rule):
            section = m.group(1).lower()
            numpy_style = bool(numpy_rule)
            current = None
            i += 2 if numpy_rule else 1
            continue
        if section is None:
            desc.append(line)
        elif section in ("args", "arguments", "parameters", "params") and line.strip():
            indent = len(line) - len(line.lstrip())
            g = _GOOGLE_ARG_RE.match(line.strip())
            n = _NUMPY_ARG_RE.match(line.strip())
            if current is not None and indent > params[current][1]:
                params[current][0].append(line.strip())
            elif g and not numpy_style:
                current = g.group(1).lstrip("*")
                params[current] = [[g.group(3).strip()] if g.group(3).strip() else [], indent]
            elif n:
                current = n.group(1).lstrip("*")
                params[current] = [[], indent]
        i += 1
    text = "\n".join(desc).strip()
    return text, {k: " ".join(v[0]).strip() for k, v in params.items()}


def _signature_schema(fn: Callable, param_docs: Mapping[str, str], where: str) -> dict:
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as e:  # a forward reference that does not resolve
        raise TypeError(f"{where}: cannot resolve type hints ({e})") from e
    props: dict[str, dict] = {}
    required: list[str] = []
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        s = dict(schema_for_type(hints.get(name, _MISSING), f"{where}({name})"))
        if param_docs.get(name):
            s["description"] = param_docs[name]
        if p.default is _MISSING:
            required.append(name)
        else:
            d = p.default.value if isinstance(p.default, enum.Enum) else p.default
            try:
                json.dumps(d)
                s["default"] = d
            except (TypeError, ValueError):
                pass
        props[name] = s
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


# ----------------------------------------------------------------------------- validation


_PY_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
             "array": list, "object": dict, "null": type(None)}


def _check(schema: Mapping, value: Any, path: str) -> tuple[Any, str | None]:
    """(value, None) with integral floats turned into ints where an integer is wanted, or an error."""
    if "anyOf" in schema:
        problems = []
        for sub in schema["anyOf"]:
            v, err = _check(sub, value, path)
            if err is None:
                return v, None
            problems.append(err)
        return value, problems[0]
    t = schema.get("type")
    if t is not None:
        allowed = [t] if isinstance(t, str) else list(t)
        for name in allowed:
            py = _PY_TYPES.get(name)
            if py is None or (isinstance(value, bool) and name in ("integer", "number")):
                continue
            if isinstance(value, py):
                break
            if name == "integer" and isinstance(value, float) and value.is_integer():
                value = int(value)
                break
        else:
            got = "null" if value is None else type(value).__name__
            return value, f"{path}: expected {' or '.join(allowed)}, got {got} {json.dumps(value, default=str)[:60]}"
    if "enum" in schema and value not in schema["enum"]:
        return value, f"{path}: {json.dumps(value, default=str)[:60]} is not one of {json.dumps(schema['enum'], ensure_ascii=False)}"
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        out = []
        for j, item in enumerate(value):
            item, err = _check(schema["items"], item, f"{path}[{j}]")
            if err:
                return value, err
            out.append(item)
        value = out
    if isinstance(value, dict) and (schema.get("properties") is not None or
                                    isinstance(schema.get("additionalProperties"), Mapping)):
        value, err = _check_object(schema, value, path)
        if err:
            return value, err
    return value, None


def _check_object(schema: Mapping, value: dict, path: str) -> tuple[dict, str | None]:
    props = schema.get("properties") or {}
    missing = [k for k in schema.get("required", []) if k not in value]
    if missing:
        return value, f"{path}: missing required argument(s) {', '.join(missing)}"
    extra_schema = schema.get("additionalProperties", True)
    out = {}
    for k, v in value.items():
        sub = props.get(k)
        if sub is None:
            if extra_schema is False:
                known = ", ".join(props) or "none"
                return value, f"{path}: unknown argument {k!r} (known: {known})"
            sub = extra_schema if isinstance(extra_schema, Mapping) else {}
        v, err = _check(sub, v, f"{path}.{k}" if path != "arguments" else k)
        if err:
            return value, err
        out[k] = v
    return out, None


def validate_arguments(schema: Mapping | None, arguments: Any) -> tuple[dict, str | None]:
    """Check call arguments against a tool's `parameters` schema: (cleaned arguments, None) or
    (arguments, one readable problem) for missing required names, unknown names (when the schema
    sets additionalProperties false), wrong types and enum violations."""
    if not isinstance(arguments, dict):
        return {}, f"arguments must be a JSON object, got {type(arguments).__name__}"
    if not schema:
        return dict(arguments), None
    return _check_object(schema, arguments, "arguments")


# ----------------------------------------------------------------------------- tools


@dataclass
class Tool:
    """A callable tool: `fn(**arguments)` with the JSON Schema `parameters` of those arguments."""

    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any] | None = None
    timeout: float | None = 30.0  # seconds; None = no limit
    enums: dict = field(default_factory=dict, repr=False)  # argument -> Enum class to convert to

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z_][\w.-]{0,63}", self.name):
            raise ValueError(f"Tool.name: {self.name!r} must be a short identifier "
                             "(letters, digits, _ . -)")
        if not isinstance(self.parameters, dict):
            raise ValueError(f"Tool {self.name}: parameters must be a JSON Schema dict")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"Tool {self.name}: timeout must be > 0 or None, got {self.timeout}")

    @property
    def schema(self) -> dict:
        """The OpenAI tool shape that chat_format renders into the plugin system turn."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fn is None:
            raise ToolError(f"tool {self.name} has no implementation")
        return self.fn(*args, **kwargs)

    @classmethod
    def from_function(cls, fn: Callable, *, name: str | None = None,
                      description: str | None = None, timeout: float | None = 30.0) -> Tool:
        text, docs = parse_docstring(fn.__doc__)
        tname = name or fn.__name__
        params = _signature_schema(fn, docs, tname)
        hints = typing.get_type_hints(fn)
        enums = {k: h for k, h in hints.items()
                 if isinstance(h, type) and issubclass(h, enum.Enum) and k in params["properties"]}
        return cls(tname, description if description is not None else text, params, fn, timeout,
                   enums)


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
         timeout: float | None = 30.0) -> Any:
    """Declare a tool from a typed function (`@tool` or `@tool(name=..., timeout=...)`)."""
    def wrap(f: Callable) -> Tool:
        t = Tool.from_function(f, name=name, description=description, timeout=timeout)
        t.__doc__ = f.__doc__
        return t
    return wrap(fn) if fn is not None else wrap


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


class ToolRegistry:
    """Named tools; `call()` validates, runs with a timeout and turns every failure into text."""

    def __init__(self, tools: Iterable[Tool | Callable] = ()):
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.register(t)

    def register(self, t: Tool | Callable | Mapping, fn: Callable | None = None) -> Tool:
        """Add a Tool, a plain typed function (declared as with @tool), or an OpenAI tool dict
        (schema only, or with `fn`)."""
        if isinstance(t, Mapping):
            f = t.get("function", t)
            t = Tool(f["name"], f.get("description") or "", dict(f.get("parameters") or {}), fn)
        elif not isinstance(t, Tool):
            if not callable(t):
                raise ValueError(f"register: expected a Tool, function or tool dict, got {t!r:.80}")
            t = Tool.from_function(t)
        if t.name in self._tools:
            raise ValueError(f"register: a tool named {t.name!r} is already registered")
        self._tools[t.name] = t
        return t

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self):
        return iter(self._tools.values())

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def schemas(self) -> list[dict]:
        return [t.schema for t in self._tools.values()]

    def validate(self, name: str, arguments: Any) -> tuple[dict, str | None]:
        """(cleaned arguments, None) or (arguments, error text) without running anything."""
        t = self._tools.get(name)
        if t is None:
            return {}, (f"unknown tool {name!r}; available tools: {', '.join(self._tools) or 'none'}")
        return validate_arguments(t.parameters, arguments)

    def call(self, name: str, arguments: Any = None) -> ToolResult:
        """Run a tool for the model. `arguments`: a dict, a JSON object string, or None."""
        start = time.perf_counter()

        def fail(kind: str, text: str) -> ToolResult:
            return ToolResult(name, f"Error: {text}", ok=False, error=kind,
                              elapsed=time.perf_counter() - start)

        if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                return fail("validation", f"arguments of {name} are not valid JSON ({e})")
        t = self._tools.get(name)
        if t is None:
            return fail("unknown_tool", self.validate(name, arguments)[1])
        args, problem = validate_arguments(t.parameters, arguments)
        if problem:
            return fail("validation", f"invalid call to {name}: {problem}")
        for k, cls in t.enums.items():
            if k in args:
                args[k] = cls(args[k])
        if t.fn is None:
            return fail("exception", f"tool {name} has no implementation")

        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = t.fn(**args)
            except ToolError as e:
                box["tool_error"] = str(e)
            except BaseException as e:  # noqa: BLE001 - everything goes back to the model
                tb = traceback.format_exception_only(type(e), e)[-1].strip()
                box["exception"] = tb

        # A worker thread: the loop keeps going when a tool hangs. Python cannot kill a thread,
        # so an overrunning daemon thread runs on in the background until it returns.
        th = threading.Thread(target=work, name=f"tool-{name}", daemon=True)
        th.start()
        th.join(t.timeout)
        if th.is_alive():
            return fail("timeout", f"{name} did not finish within {t.timeout:g} s")
        if "tool_error" in box:
            return fail("tool_error", f"{name}: {box['tool_error']}")
        if "exception" in box:
            return fail("exception", f"{name} raised {box['exception']}")
        value = box.get("value")
        return ToolResult(name, _as_text(value), value=value, elapsed=time.perf_counter() - start)
