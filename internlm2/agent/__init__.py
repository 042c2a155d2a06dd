"""The agent layer: tools, built-in tools, the code interpreter and the agent loops.

Names load on first use (module `__getattr__`), so `import internlm2.agent` stays cheap and the
interpreter sandbox is only imported by code that runs code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "tool": "tools", "Tool": "tools", "ToolRegistry": "tools", "ToolError": "tools",
    "ToolResult": "tools", "validate_arguments": "tools",
    "Agent": "loop", "AgentEvent": "loop", "AgentResult": "loop", "ModelBackend": "loop",
    "tool_call_validity": "loop",
    "ReActAgent": "react", "EngineBackend": "backends",
    "Interpreter": "interpreter", "InterpreterResult": "interpreter",
    "calculator": "builtin", "current_time": "builtin", "file_reader": "builtin",
    "document_search": "builtin", "builtin_tools": "builtin", "BM25": "builtin",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'internlm2.agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
