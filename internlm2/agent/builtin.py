"""Built-in tools: calculator, current time, a file reader and BM25 search over local documents.

Each is safe to hand to a model: the calculator evaluates an allowlisted arithmetic AST (no
names, attributes or calls outside it, bounded exponents), the file tools never leave their
folder (`..` and symlinks that point outside are refused) and cap what they read.
"""

from __future__ import annotations

import ast
import datetime as _dt
import math
import operator
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from .tools import Tool, ToolError, tool

__all__ = [
    "BM25",
    "BUILTIN_NAMES",
    "builtin_tools",
    "calculator",
    "current_time",
    "document_search",
    "file_reader",
    "safe_eval",
    "tokenize",
]

# ----------------------------------------------------------------------------- calculator

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {name: getattr(math, name) for name in (
    "sqrt", "log", "log2", "log10", "exp", "sin", "cos", "tan", "asin", "acos", "atan", "atan2",
    "sinh", "cosh", "tanh", "floor", "ceil", "factorial", "gcd", "hypot", "degrees", "radians")}
_FUNCS.update(abs=abs, round=round, min=min, max=max)
_CONSTS = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}
_MAX_EXPONENT = 10_000
_MAX_FACTORIAL = 1_000
_MAX_DIGITS = 10_000


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in _CONSTS:
            return _CONSTS[node.id]
        raise ToolError(f"unknown name {node.id!r}; allowed constants: {', '.join(_CONSTS)}")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > _MAX_EXPONENT or (abs(left) > 1 and isinstance(right, int)
                                              and abs(right) * math.log10(abs(left)) > _MAX_DIGITS):
                raise ToolError(f"exponent too large ({left!r} ** {right!r})")
        try:
            return _BINOPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("result too large") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        return _UNOPS[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCS or node.keywords:
            what = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise ToolError(f"function {what!r} is not allowed; allowed: {', '.join(_FUNCS)}")
        args = [_eval(a) for a in node.args]
        if node.func.id == "factorial" and args and args[0] > _MAX_FACTORIAL:
            raise ToolError(f"factorial argument too large (max {_MAX_FACTORIAL})")
        try:
            return _FUNCS[node.func.id](*args)
        except (ValueError, TypeError, OverflowError) as e:
            raise ToolError(f"{node.func.id}: {e}") from None
    raise ToolError(f"{type(node).__name__} is not allowed: only numbers, + - * / // % **, "
                    "parentheses, math functions and constants")


def safe_eval(expression: str) -> int | float:
    """Evaluate arithmetic without exec/eval: parse to an AST and walk an allowlist."""
    if len(expression) > 1000:
        raise ToolError("expression longer than 1000 characters")
    try:
        tree = ast.parse(expression.strip().replace("^", "**"), mode="eval")
    except SyntaxError as e:
        raise ToolError(f"not an arithmetic expression ({e.msg})") from None
    value = _eval(tree)
    if isinstance(value, complex):  # e.g. (-8) ** 0.5
        raise ToolError("the result is a complex number; only real arithmetic is supported")
    return value


@tool(name="calculator", timeout=5)
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly as Python would, e.g. "sqrt(2) * (3 + 4) ** 2".

    Args:
        expression: numbers, + - * / // % ** (or ^), parentheses, pi, e and functions such as
            sqrt, log, exp, sin, cos, tan, floor, ceil, factorial, abs, round, min, max.
    """
    value = safe_eval(expression)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value)) if "." not in expression and "/" not in expression else repr(value)
    return repr(value)


# ----------------------------------------------------------------------------- time


@tool(name="current_time", timeout=5)
def current_time(timezone: str = "UTC") -> str:
    """The current date and time (ISO 8601) with the weekday in a time zone.

    Args:
        timezone: an IANA time zone name such as "UTC", "Asia/Shanghai" or "Europe/Paris".
    """
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(f"unknown time zone {timezone!r}; use an IANA name like 'Asia/Shanghai'") \
            from None
    now = _dt.datetime.now(tz)
    return f"{now.isoformat(timespec='seconds')} ({now.strftime('%A')}, {timezone})"


# ----------------------------------------------------------------------------- files


def _inside(root: Path, rel: str) -> Path:
    """`rel` resolved under `root` (symlinks followed), or ToolError when it leaves root."""
    if not isinstance(rel, str) or not rel.strip():
        raise ToolError("path must be a non-empty relative path")
    if os.path.isabs(rel):
        raise ToolError(f"{rel!r}: use a path relative to the working folder")
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise ToolError(f"{rel!r} is outside the working folder")
    return target


def file_reader(workdir: str | os.PathLike, max_bytes: int = 100_000) -> Tool:
    """A `read_file` tool confined to `workdir` that returns at most `max_bytes` of text."""
    root = Path(workdir).resolve()
    if not root.is_dir():
        raise ValueError(f"file_reader: workdir {str(workdir)!r} is not a folder")

    def read_file(path: str, offset: int = 0) -> str:
        """Read a text file from the working folder.

        Args:
            path: the file's path relative to the working folder.
            offset: byte offset to start reading from (to page through large files).
        """
        target = _inside(root, path)
        if not target.is_file():
            listing = sorted(p.name for p in root.iterdir())[:50]
            raise ToolError(f"{path!r} is not a file; the folder holds: {', '.join(listing)}")
        size = target.stat().st_size
        if offset < 0 or offset > size:
            raise ToolError(f"offset {offset} outside the file (size {size} bytes)")
        with open(target, "rb") as f:
            f.seek(offset)
            data = f.read(max_bytes)
        text = data.decode("utf-8", errors="replace")
        if offset + len(data) < size:
            text += (f"\n[... truncated: showed bytes {offset}-{offset + len(data)} of {size}; "
                     f"call again with offset={offset + len(data)}]")
        return text

    return Tool.from_function(read_file, timeout=10)


# ----------------------------------------------------------------------------- BM25 search

_TOKEN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)
_CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words; each CJK character is a token of its own (no segmenter needed)."""
    out = []
    for m in _TOKEN_RE.finditer(text.lower()):
        tok = m.group()
        if len(tok) > 1 and _CJK_RE.search(tok):  # mixed run: split CJK characters out
            out.extend(t for t in re.split(f"({_CJK_RE.pattern})", tok) if t)
        else:
            out.append(tok)
    return out


class BM25:
    """Okapi BM25 with Lucene's non-negative idf: idf = ln(1 + (N - n + 0.5) / (n + 0.5)),
    score = sum idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avglen))."""

    def __init__(self, docs: list[list[str]], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.tf = [Counter(d) for d in docs]
        self.lengths = [len(d) for d in docs]
        self.avglen = (sum(self.lengths) / len(docs)) if docs else 0.0
        df: Counter = Counter()
        for c in self.tf:
            df.update(c.keys())
        n = len(docs)
        self.idf = {t: math.log(1 + (n - k + 0.5) / (k + 0.5)) for t, k in df.items()}

    def scores(self, query: list[str]) -> list[float]:
        out = []
        for tf, length in zip(self.tf, self.lengths):
            s = 0.0
            norm = self.k1 * (1 - self.b + self.b * length / (self.avglen or 1))
            for q in query:
                f = tf.get(q, 0)
                if f:
                    s += self.idf[q] * f * (self.k1 + 1) / (f + norm)
            out.append(s)
        return out


_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".html", ".tex", ".yaml",
                  ".yml", ".toml", ""}


def _chunks(text: str, size: int) -> list[str]:
    """Paragraphs merged up to about `size` characters: small files stay one passage."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        if cur and len(cur) + len(para) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
        while len(cur) > 2 * size:
            out.append(cur[:size])
            cur = cur[size:]
    if cur.strip():
        out.append(cur)
    return out


def document_search(docs_dir: str | os.PathLike, chunk_chars: int = 800,
                    max_file_bytes: int = 2_000_000) -> Tool:
    """A `search_documents` tool: BM25 over the text files under `docs_dir` (indexed once)."""
    root = Path(docs_dir).resolve()
    if not root.is_dir():
        raise ValueError(f"document_search: docs_dir {str(docs_dir)!r} is not a folder")
    passages: list[tuple[str, str]] = []
    for p in sorted(root.rglob("*")):
        if (p.is_file() and not p.is_symlink() and root in p.resolve().parents
                and p.suffix.lower() in _TEXT_SUFFIXES
                and p.stat().st_size <= max_file_bytes):
            text = p.read_text(encoding="utf-8", errors="replace")
            passages += [(str(p.relative_to(root)), c) for c in _chunks(text, chunk_chars)]
    index = BM25([tokenize(c) for _, c in passages])

    def search_documents(query: str, top_k: int = 3) -> list[dict]:
        """Search the local document collection and return the best matching passages.

        Args:
            query: keywords or a question, in any language.
            top_k: how many passages to return (1-10).
        """
        if not 1 <= top_k <= 10:
            raise ToolError("top_k must be between 1 and 10")
        scores = index.scores(tokenize(query))
        ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        hits = [{"file": passages[i][0], "score": round(scores[i], 4),
                 "snippet": passages[i][1].strip()[:chunk_chars]}
                for i in ranked[:top_k] if scores[i] > 0]
        if not hits:
            return [{"file": None, "snippet": "no matching document"}]
        return hits

    t = Tool.from_function(search_documents, timeout=30)
    t.index, t.passages = index, passages  # type: ignore[attr-defined]  # for inspection/tests
    return t


BUILTIN_NAMES = ("calculator", "time", "files", "search")


def builtin_tools(names: list[str] | str, workdir: str | os.PathLike | None = None,
                  docs: str | os.PathLike | None = None) -> list[Tool]:
    """Tools by short name (calculator, time, files, search), as the CLI's --tools takes them."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for n in names:
        if n == "calculator":
            out.append(calculator)
        elif n == "time":
            out.append(current_time)
        elif n == "files":
            if workdir is None:
                raise ValueError("tool 'files' needs a working folder (--workdir)")
            out.append(file_reader(workdir))
        elif n == "search":
            if docs is None:
                raise ValueError("tool 'search' needs a document folder (--docs)")
            out.append(document_search(docs))
        else:
            raise ValueError(f"unknown built-in tool {n!r}; choose from {', '.join(BUILTIN_NAMES)}")
    return out
