"""InternLM2 in one package: the model exactly as released, its formats, and its tools."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names, imported lazily so `import internlm2` and the CLI start fast.
_EXPORTS = {
    "ModelConfig": "internlm2.config",
    "InternLM2ForCausalLM": "internlm2.model",
    "KVCache": "internlm2.model",
    "build_model": "internlm2.model",
    "load_model": "internlm2.hf",
    "save_model": "internlm2.hf",
    "convert_checkpoint": "internlm2.hf",
    "load_tokenizer": "internlm2.tokenizer",
    "train_tokenizer": "internlm2.tokenizer",
    "render_chat": "internlm2.chat_format",
    "render_chat_ids": "internlm2.chat_format",
    "parse_output": "internlm2.chat_format",
    "generate": "internlm2.generate",
    "generate_text": "internlm2.generate",
    "GenerationConfig": "internlm2.generate",
    "pipeline": "internlm2.pipeline",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'internlm2' has no attribute {name!r}")
