"""Serving: the OpenAI-compatible HTTP server (`create_app`) and the web chat page it hosts.

`internlm2 serve --model DIR` runs it; see `internlm2.serve.app` for the routes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package (e.g. for the CLI parser) must not pull in FastAPI.
    if name == "create_app":
        from .app import create_app
        return create_app
    raise AttributeError(f"module 'internlm2.serve' has no attribute {name!r}")
