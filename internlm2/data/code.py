"""Code data (report section 3.1, "code"): one markdown format, whitespace-aware dedup text,
a rule-based quality score, and repositories concatenated in dependency order.

Markdown format
---------------
`to_markdown(path, text)` turns one file into::

    ## File: {path}
    <empty line>
    {fence}{lang}
    {body}
    {fence}

- `path` is written with "/" separators, as given;
- `lang` is `language_of(path)` (the fence's info string, e.g. "python", "cpp"; empty when
  the extension is unknown);
- `body` is the text with line endings turned to "\\n", leading empty lines and trailing
  whitespace removed (indentation of the first line is kept);
- `fence` is three backticks, or one more than the longest run of backticks in the body,
  so a file that itself contains fences (a markdown snippet in a docstring) stays intact;
- the block ends with one "\\n". An empty body gives the fence line followed by the closing
  fence.

Documentation files (markdown, rst, plain text, asciidoc) are not fenced: the header, an
empty line, the body, "\\n". `concat_repository` writes "# Repository: {name}\\n\\n" and then
the files' blocks joined by one empty line, in `order_repository` order.

Repository order
----------------
`order_repository(files)`:
1. imports of every code file are found by regex (`find_imports`) and resolved to files of
   the repository (`RepoIndex.resolve`); unresolvable ones (standard library, third party)
   are ignored. An edge "a imports b" means b is placed before a.
2. Strongly connected components (Tarjan) are the import cycles. Inside one component the
   files are ordered alphabetically (by path components): that is how cycles are broken.
3. Components are emitted in topological order (Kahn's algorithm); among the components
   that are ready at a step, the one whose first file sorts first goes first, so
   independent files keep alphabetical order and the result is deterministic.
4. Docs (markdown/rst/txt) are then inserted immediately before the first code file of
   their folder's subtree: a folder's README goes first, then its other docs
   alphabetically; a parent folder's docs come before a subfolder's. Docs of a folder that
   holds no code (e.g. docs/) go at the end, alphabetically.
"""

from __future__ import annotations

import heapq
import os
import posixpath
import re
from dataclasses import dataclass

# -- languages --------------------------------------------------------------------------

_EXTENSIONS = {
    "py": "python", "pyi": "python", "pyx": "cython",
    "js": "javascript", "mjs": "javascript", "cjs": "javascript", "jsx": "javascript",
    "ts": "typescript", "tsx": "typescript", "mts": "typescript", "cts": "typescript",
    "c": "c", "h": "c",
    "cc": "cpp", "cpp": "cpp", "cxx": "cpp", "c++": "cpp", "hpp": "cpp", "hh": "cpp",
    "hxx": "cpp", "h++": "cpp", "ipp": "cpp", "inl": "cpp", "cu": "cuda", "cuh": "cuda",
    "java": "java", "go": "go", "rs": "rust", "kt": "kotlin", "kts": "kotlin",
    "scala": "scala", "swift": "swift", "rb": "ruby", "php": "php", "cs": "csharp",
    "m": "objectivec", "mm": "objectivec", "lua": "lua", "pl": "perl", "pm": "perl",
    "r": "r", "jl": "julia", "hs": "haskell", "ml": "ocaml", "mli": "ocaml",
    "ex": "elixir", "exs": "elixir", "erl": "erlang", "clj": "clojure", "dart": "dart",
    "sh": "bash", "bash": "bash", "zsh": "bash", "fish": "fish", "ps1": "powershell",
    "bat": "batch", "cmd": "batch", "sql": "sql", "html": "html", "htm": "html",
    "css": "css", "scss": "scss", "sass": "sass", "less": "less", "vue": "vue",
    "svelte": "svelte", "xml": "xml", "json": "json", "yaml": "yaml", "yml": "yaml",
    "toml": "toml", "ini": "ini", "cfg": "ini", "proto": "protobuf", "cmake": "cmake",
    "mk": "makefile", "gradle": "groovy", "groovy": "groovy", "f90": "fortran",
    "f": "fortran", "asm": "asm", "s": "asm", "tex": "latex",
    "md": "markdown", "markdown": "markdown", "rst": "rst", "txt": "text", "adoc": "asciidoc",
}
_FILENAMES = {
    "makefile": "makefile", "gnumakefile": "makefile", "dockerfile": "dockerfile",
    "cmakelists.txt": "cmake", "readme": "text", "license": "text", "copying": "text",
    "authors": "text", "changelog": "text", "notice": "text", "contributing": "text",
}
DOC_LANGUAGES = frozenset({"markdown", "rst", "text", "asciidoc"})


def language_of(path: str) -> str | None:
    """The language of a file from its name ("python", "cpp", "markdown", ...), or None."""
    name = posixpath.basename(path.replace("\\", "/")).lower()
    if name in _FILENAMES:
        return _FILENAMES[name]
    if "." not in name.strip("."):
        return None
    return _EXTENSIONS.get(name.rsplit(".", 1)[1])


def is_doc(path: str) -> bool:
    return language_of(path) in DOC_LANGUAGES


# -- markdown ---------------------------------------------------------------------------

def _body(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.lstrip("\n").rstrip()


def to_markdown(path: str, text: str, lang: str | None = None) -> str:
    """One file in the unified markdown format (see the module docstring)."""
    path = path.replace("\\", "/")
    lang = language_of(path) if lang is None else lang
    body = _body(text)
    header = f"## File: {path}\n\n"
    if lang in DOC_LANGUAGES:
        return header + body + "\n"
    runs = re.findall(r"`+", body)
    fence = "`" * max(3, max((len(r) for r in runs), default=0) + 1)
    lang = lang or ""
    if not body:
        return f"{header}{fence}{lang}\n{fence}\n"
    return f"{header}{fence}{lang}\n{body}\n{fence}\n"


# -- dedup normalisation ----------------------------------------------------------------

_INLINE_WS_RE = re.compile(r"[ \t\f\v]+")


def normalize_for_dedup(code: str, tab_size: int = 8, collapse_inline: bool = True) -> str:
    """Code text where the indentation style no longer matters, for file-level dedup.

    Indentation is turned into levels the way Python's tokenizer does it (a stack of
    widths: a wider line opens a level, a narrower one closes levels down to the first
    width not wider than it), and each level is written as one tab. So 2 spaces, 4 spaces
    and tabs give the same text; tabs count `tab_size` columns only to compare widths of
    mixed lines. Trailing whitespace is removed, runs of blank lines become one empty
    line, leading/trailing blank lines go, and (with `collapse_inline`) runs of spaces
    inside a line become one space.
    """
    out: list[str] = []
    stack = [0]
    pending_blank = False
    for raw in code.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = raw.rstrip()
        content = line.lstrip(" \t\f\v")
        if not content:
            pending_blank = bool(out)
            continue
        width = len(line[: len(line) - len(content)].replace("\f", "").replace("\v", "")
                    .expandtabs(tab_size))
        while width < stack[-1]:
            stack.pop()
        if width > stack[-1]:
            stack.append(width)
        if collapse_inline:
            content = _INLINE_WS_RE.sub(" ", content)
        if pending_blank:
            out.append("")
            pending_blank = False
        out.append("\t" * (len(stack) - 1) + content)
    return "\n".join(out)


# -- quality ----------------------------------------------------------------------------

@dataclass
class CodeQualityConfig:
    """Thresholds of `quality_score`. Hard signals make a file low (score 0); soft ones
    subtract their weight from 1.0. high: score >= high_cutoff; low: score < low_cutoff.
    The report's split (16.8% high, 69.9% moderate, 13.3% low) comes from a corpus, not from
    fixed numbers: `calibrate_cutoffs` finds the cut-offs that reproduce it on yours."""

    high_cutoff: float = 0.9
    low_cutoff: float = 0.5
    # hard
    min_chars: int = 32                # non-whitespace characters ("too_small")
    max_bytes: int = 1_000_000         # ("too_large")
    header_lines: int = 12             # where auto-generated markers are looked for
    minified_line_len: int = 1000      # any longer line in a code file -> "minified"
    minified_mean_len: float = 150.0   # mean non-blank line length -> "minified"
    max_data_frac: float = 0.5         # numbers + base64/hex runs over non-ws chars
    min_alnum_frac: float = 0.25       # alphanumeric over non-ws chars
    # soft (weight in parentheses)
    very_short_lines: int = 5          # fewer non-blank lines (0.2)
    long_mean_len: float = 80.0        # mean line length above (0.15)
    long_line_len: int = 300           # any line longer (0.1)
    numeric_frac: float = 0.25         # data fraction above (0.3)
    low_alnum_frac: float = 0.45       # alphanumeric fraction below (0.2)
    repeated_frac: float = 0.3         # duplicate non-trivial lines above (0.2)
    min_comment_frac: float = 0.02     # comments below, in files of >= 20 lines (0.15)
    max_comment_frac: float = 0.8      # comments above (0.3)
    assert_frac: float = 0.4           # assertion lines above (0.15)
    # files of >= 20 non-blank lines in a language with a definition pattern and no
    # function/class definition (0.15)


# Markers of generated files, looked for in the first lines only: "Code generated by X.
# DO NOT EDIT.", "@generated", "# Generated by Django 4.2 on ...", "This file was
# automatically generated". A bare "generated by" in prose ("a tree can be generated by
# passing ...") does not count.
_AUTOGEN_RE = re.compile(
    r"auto[- ]?generated|automatically generated|generated automatically|do not (?:edit|modify)|"
    r"@generated|\b(?:file|code|this)\b[^\n]{0,30}\bgenerated (?:by|from)\b|"
    r"^\W*generated (?:by|from)\b", re.I | re.M)
_BASE64_RUN_RE = re.compile(r"[A-Za-z0-9+/=_-]{40,}")
_ALNUM_RE = re.compile(r"[^\W_]+")  # removes letters and digits of any script
_DIGIT_RE = re.compile(r"\d")
_NUMBER_RE = re.compile(r"\b(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\b")
_ASSERT_RE = re.compile(r"^\s*(?:assert\b|self\.assert\w*\(|expect\(|EXPECT_|ASSERT_|"
                        r"assert(?:_eq|_ne)?!|assert\w*\(|t\.(?:Error|Fatal))")
_C_LIKE = ("c", "cpp", "cuda", "java", "javascript", "typescript", "go", "rust", "kotlin",
           "scala", "swift", "csharp", "objectivec", "php", "dart", "groovy", "css", "scss",
           "less", "protobuf")
_HASH_LIKE = ("python", "cython", "bash", "ruby", "perl", "r", "julia", "elixir", "yaml",
              "toml", "makefile", "cmake", "dockerfile", "fish", "powershell", "ini")
_LINE_COMMENTS: dict[str, tuple[str, ...]] = {
    **{k: ("//",) for k in _C_LIKE}, **{k: ("#",) for k in _HASH_LIKE},
    "php": ("//", "#"), "sql": ("--",), "lua": ("--",), "haskell": ("--",),
    "erlang": ("%",), "latex": ("%",), "clojure": (";",), "asm": (";", "#"),
    "fortran": ("!",), "batch": ("rem ", "::"), "css": (), "ini": ("#", ";"),
}
_BLOCK_COMMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    **{k: (("/*", "*/"),) for k in _C_LIKE},
    "python": (('"""', '"""'), ("'''", "'''")), "cython": (('"""', '"""'), ("'''", "'''")),
    "html": (("<!--", "-->"),), "xml": (("<!--", "-->"),), "vue": (("<!--", "-->"),),
    "lua": (("--[[", "]]"),), "haskell": (("{-", "-}"),), "ocaml": (("(*", "*)"),),
    "sql": (("/*", "*/"),),
}
_DEFINITION_RE = {
    "python": r"^\s*(?:async\s+)?def\s+\w|^\s*class\s+\w",
    "javascript": r"\bfunction\b|=>|\bclass\s+\w", "typescript": r"\bfunction\b|=>|\bclass\s+\w",
    "c": r"\w+\s*\([^;{}]*\)\s*\{|\w+\s*\([^;{}]*\)\s*;|\bstruct\s+\w+\s*\{",
    "cpp": r"\w+\s*\([^;{}]*\)\s*(?:const\s*)?(?:noexcept\s*)?\{|\w+\s*\([^;{}]*\)\s*;|"
           r"\b(?:class|struct)\s+\w+",
    "java": r"\b(?:class|interface|enum|record)\s+\w+|\w+\s*\([^;{}]*\)\s*(?:throws [\w., ]+)?\{",
    "go": r"^\s*func\b|^\s*type\s+\w+", "rust": r"\bfn\s+\w+|\b(?:struct|enum|trait|impl)\b",
    "ruby": r"^\s*(?:def|class|module)\s", "php": r"\bfunction\b|\bclass\s+\w",
    "kotlin": r"\bfun\s|\bclass\s", "scala": r"\bdef\s|\b(?:class|object|trait)\s",
    "swift": r"\bfunc\s|\b(?:class|struct|protocol)\s", "csharp": r"\b(?:class|interface|struct)\s",
    "lua": r"\bfunction\b", "bash": r"^\s*(?:function\s+)?\w+\s*\(\)\s*\{|^\s*function\s+\w",
}


def _comment_lines(lines: list[str], lang: str | None) -> int:
    """Lines that are comments: start with a line-comment mark, start a block comment (or,
    in Python, a triple-quoted string), or lie inside one. Block delimiters are followed
    through each line so a block opened after code (`x = 1  /* ...`) is tracked too."""
    line_marks = _LINE_COMMENTS.get(lang or "", ())
    blocks = _BLOCK_COMMENTS.get(lang or "", ())
    count, closing = 0, None
    for line in lines:
        s = line.strip()
        counted = closing is not None
        if closing is None and any(s.lower().startswith(m) for m in line_marks):
            count += 1
            continue
        pos = 0
        while True:
            if closing is not None:
                j = s.find(closing, pos)
                if j < 0:
                    break
                pos, closing = j + len(closing), None
                continue
            hits = [(j, o, c) for o, c in blocks if (j := s.find(o, pos)) >= 0]
            if not hits:
                break
            j, open_, closing = min(hits)
            counted = counted or j == 0
            pos = j + len(open_)
        count += counted
    return count


def _data_chars(nonws: str) -> int:
    runs = sum(len(m) for m in _BASE64_RUN_RE.findall(nonws) if _DIGIT_RE.search(m))
    # Numbers are measured on the text without whitespace so "1, 2" and "1,2" count alike.
    return runs + sum(len(m) for m in _NUMBER_RE.findall(_BASE64_RUN_RE.sub(" ", nonws)))


def quality_score(path: str, text: str,
                  config: CodeQualityConfig | None = None) -> tuple[float, str, list[str]]:
    """Rule-based quality of one source file: (score in [0, 1], "high" | "moderate" | "low",
    the signals that fired). See `CodeQualityConfig` for every threshold and weight."""
    cfg = config or CodeQualityConfig()
    lang = language_of(path)
    doc = lang in DOC_LANGUAGES
    hard: list[str] = []
    nonws = "".join(text.split())
    n = len(nonws)
    lines = text.replace("\r\n", "\n").split("\n")
    nonblank = [ln for ln in lines if ln.strip()]
    lens = [len(ln) for ln in nonblank] or [0]
    mean_len = sum(lens) / len(lens)
    if len(text.encode("utf-8", "replace")) > cfg.max_bytes:
        hard.append(f"too_large: {len(text.encode('utf-8', 'replace'))} bytes")
    if n < cfg.min_chars:
        hard.append(f"too_small: {n} chars")
    if _AUTOGEN_RE.search("\n".join(nonblank[: cfg.header_lines])):
        hard.append("autogenerated")
    if not doc and (max(lens) > cfg.minified_line_len or mean_len > cfg.minified_mean_len):
        hard.append(f"minified: longest line {max(lens)}, mean {mean_len:.0f}")
    data_frac = _data_chars(nonws) / max(n, 1)
    if n and data_frac > cfg.max_data_frac:
        hard.append(f"data_like: {data_frac:.2f} numbers/encoded")
    alnum = (n - len(_ALNUM_RE.sub("", nonws))) / max(n, 1)
    if n and alnum < cfg.min_alnum_frac:
        hard.append(f"symbol_heavy: alnum {alnum:.2f}")
    if hard:
        return 0.0, "low", hard

    soft: list[tuple[str, float]] = []
    if len(nonblank) < cfg.very_short_lines:
        soft.append((f"very_short: {len(nonblank)} lines", 0.2))
    if data_frac > cfg.numeric_frac:
        soft.append((f"numeric_heavy: {data_frac:.2f}", 0.3))
    if alnum < cfg.low_alnum_frac:
        soft.append((f"low_alnum: {alnum:.2f}", 0.2))
    if not doc:
        if mean_len > cfg.long_mean_len:
            soft.append((f"long_lines: mean {mean_len:.0f}", 0.15))
        if max(lens) > cfg.long_line_len:
            soft.append((f"very_long_line: {max(lens)}", 0.1))
        trivial = [ln.strip() for ln in nonblank if len(ln.strip()) >= 10]
        if len(trivial) >= 10:
            rep = 1 - len(set(trivial)) / len(trivial)
            if rep > cfg.repeated_frac:
                soft.append((f"repetitive: {rep:.2f} duplicate lines", 0.2))
        if lang in _LINE_COMMENTS or lang in _BLOCK_COMMENTS:
            frac = _comment_lines(nonblank, lang) / max(len(nonblank), 1)
            if len(nonblank) >= 20 and frac < cfg.min_comment_frac:
                soft.append((f"no_comments: {frac:.2f}", 0.15))
            if frac > cfg.max_comment_frac:
                soft.append((f"mostly_comments: {frac:.2f}", 0.3))
        pattern = _DEFINITION_RE.get(lang or "")
        if pattern and len(nonblank) >= 20 and not re.search(pattern, text, re.M):
            soft.append(("no_definitions", 0.15))
        asserts = sum(bool(_ASSERT_RE.match(ln)) for ln in nonblank) / max(len(nonblank), 1)
        if asserts > cfg.assert_frac:
            soft.append((f"assert_heavy: {asserts:.2f}", 0.15))
    score = max(0.0, round(1.0 - sum(w for _, w in soft), 4))
    level = "high" if score >= cfg.high_cutoff else "moderate" if score >= cfg.low_cutoff else "low"
    return score, level, [r for r, _ in soft]


def calibrate_cutoffs(scores: list[float], high_frac: float = 0.168,
                      low_frac: float = 0.133) -> tuple[float, float]:
    """(high_cutoff, low_cutoff) that put about `high_frac` of `scores` in high and
    `low_frac` in low (the report's split by default). Ties move files to the better level."""
    s = sorted(scores)
    if not s:
        return CodeQualityConfig.high_cutoff, CodeQualityConfig.low_cutoff
    hi = s[min(len(s) - 1, max(0, int(round(len(s) * (1 - high_frac)))))]
    lo_idx = int(round(len(s) * low_frac))
    lo = s[lo_idx] if lo_idx < len(s) else s[-1] + 1e-9
    return hi, min(lo, hi)


class CodeQualityFilter:
    """Drops low-quality code files; `upsample_factor` says how often to repeat a kept one."""

    def __init__(self, config: CodeQualityConfig | None = None, high_repeat: int = 2):
        self.config = config or CodeQualityConfig()
        self.high_repeat = high_repeat

    def applies(self, doc: dict) -> bool:
        return doc.get("lang") == "code" or (language_of(doc.get("path") or "")
                                             not in (None, *DOC_LANGUAGES))

    def score(self, doc: dict) -> tuple[float, str, list[str]]:
        return quality_score(doc.get("path") or "", doc.get("text") or "", self.config)

    def check(self, doc: dict) -> str | None:
        """A reason when the document is low-quality code, else None (non-code: None)."""
        if not self.applies(doc):
            return None
        _, level, reasons = self.score(doc)
        return f"code_quality_low: {'; '.join(reasons)}" if level == "low" else None

    def annotate(self, doc: dict) -> dict:
        """The document with `code_quality` = {"score", "level", "signals"} added."""
        score, level, reasons = self.score(doc)
        return {**doc, "code_quality": {"score": score, "level": level, "signals": reasons}}

    def upsample_factor(self, level: str) -> int:
        return {"high": self.high_repeat, "moderate": 1, "low": 0}[level]


# -- imports ----------------------------------------------------------------------------

_PY_IMPORT_RE = re.compile(r"^[ \t]*import[ \t]+([^\n#;]+)", re.M)
_PY_FROM_RE = re.compile(
    r"^[ \t]*from[ \t]+(\.+[\w.]*|[\w.]+)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]*(?:\\\n[^\n#;]*)*)",
    re.M)
_JS_RES = [
    re.compile(r"""\bimport\s+(?:type\s+)?(?:[\w*${}\s,]+?\s+from\s+)?['"]([^'"\n]+)['"]"""),
    re.compile(r"""\bexport\s+(?:type\s+)?(?:\*(?:\s+as\s+\w+)?|\{[^}]*\})\s+from\s+['"]([^'"\n]+)['"]"""),
    re.compile(r"""\b(?:require|import)\s*\(\s*['"]([^'"\n]+)['"]\s*\)"""),
]
_C_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*[<"]([^>"\n]+)[>"]', re.M)
_JAVA_IMPORT_RE = re.compile(r"^[ \t]*import[ \t]+(?:static[ \t]+)?([\w.]+(?:\.\*)?)[ \t]*;", re.M)
_JAVA_PACKAGE_RE = re.compile(r"^[ \t]*package[ \t]+([\w.]+)[ \t]*;", re.M)
_GO_SINGLE_RE = re.compile(r'^[ \t]*import[ \t]+(?:[\w.]+[ \t]+)?"([^"\n]+)"', re.M)
_GO_BLOCK_RE = re.compile(r"^[ \t]*import[ \t]*\(([^)]*)\)", re.M)
_GO_MODULE_RE = re.compile(r"^module[ \t]+(\S+)", re.M)
_RUST_MOD_RE = re.compile(r"^[ \t]*(?:pub(?:\([^)]*\))?[ \t]+)?mod[ \t]+(\w+)[ \t]*;", re.M)
_RUST_USE_RE = re.compile(r"^[ \t]*(?:pub(?:\([^)]*\))?[ \t]+)?use[ \t]+([^;]+);", re.M)


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _rust_use_paths(tree: str, prefix: str = "") -> list[str]:
    out: list[str] = []
    for item in _split_top(tree):
        item = item.strip()
        if not item:
            continue
        if "{" in item:
            head, _, rest = item.partition("{")
            out += _rust_use_paths(rest[: rest.rfind("}")], prefix + re.sub(r"\s+", "", head))
            continue
        item = re.sub(r"\s+as\s+\w+$", "", item)
        full = re.sub(r"\s+", "", prefix + item).removeprefix("::")
        out.append(full.removesuffix("::self").removesuffix("::*"))
    return out


def find_imports(path: str, text: str) -> set[str]:
    """Import specifiers of one file, as written, per language (empty for others).

    python: `import a.b` -> "a.b"; `from X import n` -> "X.n" (relative X keeps its dots:
      `from . import b` -> ".b", `from ..x import y` -> "..x.y"; `*` -> "X"). The resolver
      takes the longest prefix that is a file, so a name that is not a module falls back to X.
    javascript/typescript: the string of `import ... from`, `import '...'`, `export ... from`,
      `require(...)`, `import(...)` ("./x", "react").
    c/cpp/cuda: the target of `#include "x.h"` and `#include <x.h>`.
    java: `import a.b.C;` -> "a.b.C", `import a.b.*;` -> "a.b.*", static imports alike.
    go: every path of `import "x"` and of import blocks.
    rust: `mod x;` -> "self::x"; `use` trees expanded (`use crate::a::{b, c}` ->
      "crate::a::b", "crate::a::c"; `as` aliases and `::*` dropped).
    """
    lang = language_of(path)
    found: set[str] = set()
    if lang in ("python", "cython"):
        for m in _PY_IMPORT_RE.finditer(text):
            for item in m.group(1).split(","):
                name = item.strip().split()
                if name and re.fullmatch(r"[\w.]+", name[0]):
                    found.add(name[0])
        for m in _PY_FROM_RE.finditer(text):
            module = m.group(1)
            names = re.sub(r"#[^\n]*", "", m.group(2)).replace("\\\n", " ").strip("() \t\n")
            for item in names.split(","):
                name = item.strip().split()
                if not name:
                    continue
                if name[0] == "*":
                    found.add(module)
                elif re.fullmatch(r"\w+", name[0]):
                    found.add(module + name[0] if module.endswith(".") else f"{module}.{name[0]}")
    elif lang in ("javascript", "typescript", "vue", "svelte"):
        for rx in _JS_RES:
            found.update(m.group(1) for m in rx.finditer(text))
    elif lang in ("c", "cpp", "cuda", "objectivec"):
        found.update(m.group(1).strip() for m in _C_INCLUDE_RE.finditer(text))
    elif lang == "java":
        found.update(m.group(1) for m in _JAVA_IMPORT_RE.finditer(text))
    elif lang == "go":
        found.update(m.group(1) for m in _GO_SINGLE_RE.finditer(text))
        for m in _GO_BLOCK_RE.finditer(text):
            for line in m.group(1).split("\n"):
                q = re.search(r'"([^"]+)"', line.split("//", 1)[0])
                if q:
                    found.add(q.group(1))
    elif lang == "rust":
        found.update(f"self::{m.group(1)}" for m in _RUST_MOD_RE.finditer(text))
        for m in _RUST_USE_RE.finditer(text):
            found.update(p for p in _rust_use_paths(m.group(1)) if p)
    return found


# -- resolution -------------------------------------------------------------------------

_JS_EXTS = ("", ".ts", ".tsx", ".d.ts", ".js", ".jsx", ".mjs", ".cjs", ".json", ".vue")


def _norm(p: str) -> str | None:
    p = posixpath.normpath(p)
    return None if p.startswith(("..", "/")) else ("" if p == "." else p)


def _key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/"))


class RepoIndex:
    """The files of one repository, indexed to resolve import specifiers to paths."""

    def __init__(self, files: dict[str, str]):
        self.files = {p.replace("\\", "/"): t for p, t in files.items()}
        self.paths = set(self.files)
        dirs = {posixpath.dirname(p) for p in self.paths}
        self.by_dir: dict[str, list[str]] = {}
        for p in sorted(self.paths, key=_key):
            self.by_dir.setdefault(posixpath.dirname(p), []).append(p)
        # Python: packages are dirs with __init__.py; import roots are the repo root, src/,
        # and the parent of every top-level package.
        self.py_packages = {posixpath.dirname(p) for p in self.paths
                            if posixpath.basename(p) == "__init__.py"}
        roots = {""} | ({"src"} & dirs) | {posixpath.dirname(d) for d in self.py_packages
                                          if posixpath.dirname(d) not in self.py_packages}
        self.py_roots = sorted(roots, key=lambda d: (d.count("/") + bool(d), d))
        self.java: dict[str, str] = {}
        self.java_pkgs: dict[str, list[str]] = {}
        self.go_modules: list[tuple[str, str]] = []
        for p in sorted(self.paths, key=_key):
            lang = language_of(p)
            if lang == "java":
                m = _JAVA_PACKAGE_RE.search(self.files[p])
                pkg = m.group(1) if m else ""
                stem = posixpath.basename(p)[:-5]
                self.java.setdefault(f"{pkg}.{stem}" if pkg else stem, p)
                self.java_pkgs.setdefault(pkg, []).append(p)
            elif posixpath.basename(p) == "go.mod":
                m = _GO_MODULE_RE.search(self.files[p])
                if m:
                    self.go_modules.append((posixpath.dirname(p), m.group(1)))
        self.go_modules.sort(key=lambda x: -len(x[1]))
        self._by_name: dict[str, list[str]] | None = None

    def resolve(self, path: str, spec: str) -> set[str]:
        """Files of this repository that `spec` (found in `path`) refers to."""
        lang = language_of(path)
        if lang in ("python", "cython"):
            out = self._python(path, spec)
        elif lang in ("javascript", "typescript", "vue", "svelte"):
            out = self._js(path, spec)
        elif lang in ("c", "cpp", "cuda", "objectivec"):
            out = self._include(path, spec)
        elif lang == "java":
            out = self._java(spec)
        elif lang == "go":
            out = self._go(spec)
        elif lang == "rust":
            out = self._rust(path, spec)
        else:
            out = set()
        out.discard(path)
        return out

    def _python(self, path: str, spec: str) -> set[str]:
        here = posixpath.dirname(path)
        if spec.startswith("."):
            dots = len(spec) - len(spec.lstrip("."))
            base = here
            for _ in range(dots - 1):
                base = posixpath.dirname(base)
            parts, bases = [p for p in spec[dots:].split(".") if p], [base]
            lowest = 0 if len(parts) <= 1 else 1  # `from . import name` may mean __init__
        else:
            # A script's own folder is on sys.path; a package module's folder is not.
            parts, lowest = spec.split("."), 1
            bases = ([here] if here not in self.py_packages else []) + self.py_roots
        for k in range(len(parts), lowest - 1, -1):
            for base in bases:
                stem = posixpath.join(base, *parts[:k]) if k else base
                cands = ((stem + ".py", stem + ".pyi") if k else ()) + \
                    (posixpath.join(stem, "__init__.py"),)
                for c in cands:
                    c = _norm(c)
                    if c is not None and c in self.paths and c != path:
                        return {c}
        return set()

    def _js(self, path: str, spec: str) -> set[str]:
        if not spec.startswith((".", "/")):
            return set()  # a package, or a bundler alias
        base = _norm(posixpath.join(posixpath.dirname(path), spec) if spec.startswith(".")
                     else spec.lstrip("/"))
        if base is None:
            return set()
        stems = [base]
        if base.endswith((".js", ".jsx", ".mjs")):  # TypeScript ESM imports name the output
            stems.append(base.rsplit(".", 1)[0])
        for stem in stems:
            for c in [stem + e for e in _JS_EXTS] + [posixpath.join(stem, "index" + e)
                                                     for e in _JS_EXTS[1:]]:
                if c in self.paths:
                    return {c}
        return set()

    def _include(self, path: str, spec: str) -> set[str]:
        for c in (posixpath.join(posixpath.dirname(path), spec), spec):
            c = _norm(c)
            if c is not None and c in self.paths:
                return {c}
        # An include directory (include/, src/, ...): the closest file ending with spec.
        if self._by_name is None:
            self._by_name = {}
            for p in self.paths:
                self._by_name.setdefault(posixpath.basename(p), []).append(p)
        cands = [p for p in self._by_name.get(posixpath.basename(spec), [])
                 if p.endswith("/" + spec.lstrip("./"))]
        if not cands:
            return set()
        here = _key(posixpath.dirname(path))

        def closeness(p: str) -> tuple:
            common = 0
            for a, b in zip(here, _key(p)):
                if a != b:
                    break
                common += 1
            return (-common, _key(p))
        return {min(cands, key=closeness)}

    def _java(self, spec: str) -> set[str]:
        if spec.endswith(".*"):
            pkg = spec[:-2]
            if pkg in self.java_pkgs:
                return set(self.java_pkgs[pkg])
            spec = pkg  # `import static a.b.C.*;`
        parts = spec.split(".")
        for k in range(len(parts), 0, -1):
            p = self.java.get(".".join(parts[:k]))
            if p:
                return {p}
        return set()

    def _go(self, spec: str) -> set[str]:
        target = None
        for moddir, module in self.go_modules:
            if spec == module or spec.startswith(module + "/"):
                target = _norm(posixpath.join(moddir, spec[len(module) + 1:]))
                break
        if target is None and "." in spec.split("/")[0]:
            # No go.mod naming it: a folder whose path is a suffix of the import path.
            matches = [d for d in self.by_dir if d and (spec == d or spec.endswith("/" + d))]
            target = max(matches, key=len) if matches else None
        if target is None:
            return set()
        return {p for p in self.by_dir.get(target, []) if p.endswith(".go")}

    def _rust_root(self, path: str) -> str:
        d = posixpath.dirname(path)
        while True:
            if any(posixpath.join(d, f) in self.paths for f in ("lib.rs", "main.rs")):
                return d
            if not d:
                return posixpath.dirname(path)
            d = posixpath.dirname(d)

    def _rust(self, path: str, spec: str) -> set[str]:
        root = self._rust_root(path)
        rel = _key(path[len(root) + 1:] if root else path)
        if rel[-1] in ("mod.rs",) or (len(rel) == 1 and rel[0] in ("lib.rs", "main.rs")):
            here = list(rel[:-1])
        else:
            here = list(rel[:-1]) + [rel[-1][:-3]]
        parts = spec.split("::")
        # (base module, path below it); at least one component below the base must match
        if parts[0] == "crate":
            tries = [([], parts[1:])]
        elif parts[0] in ("self", "super"):
            mod = list(here)
            while parts and parts[0] in ("self", "super"):
                if parts.pop(0) == "super":
                    mod = mod[:-1]
            tries = [(mod, parts)]
        else:  # 2018 edition: a path may start with a module in scope, or at the crate root
            tries = [(here, parts), ([], parts)]
        for base, below in tries:
            mod = base + below
            for k in range(len(mod), len(base), -1):
                stem = posixpath.join(root, *mod[:k])
                for c in (stem + ".rs", posixpath.join(stem, "mod.rs")):
                    if c in self.paths and c != path:
                        return {c}
        return set()


def resolve(path: str, spec: str, files: dict[str, str] | RepoIndex) -> set[str]:
    """Files of the repository `files` that the import `spec` of `path` refers to."""
    index = files if isinstance(files, RepoIndex) else RepoIndex(files)
    return index.resolve(path, spec)


def dependency_graph(files: dict[str, str]) -> dict[str, set[str]]:
    """For every file, the files of the repository it imports."""
    index = RepoIndex(files)
    graph: dict[str, set[str]] = {}
    for p in sorted(index.paths, key=_key):
        deps: set[str] = set()
        for spec in find_imports(p, index.files[p]):
            deps |= index.resolve(p, spec)
        graph[p] = deps
    return graph


# -- ordering ---------------------------------------------------------------------------

def _tarjan(nodes: list[str], graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components, iteratively (no recursion limit on big repos)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()), key=_key)))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ()), key=_key))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                comps.append(sorted(comp, key=_key))
    return comps


def order_repository(files: dict[str, str]) -> list[str]:
    """The files' paths in training order (see the module docstring for the exact rules)."""
    files = {p.replace("\\", "/"): t for p, t in files.items()}
    docs = sorted((p for p in files if is_doc(p)), key=_key)
    code = sorted((p for p in files if not is_doc(p)), key=_key)
    code_files = {p: files[p] for p in code}
    graph = dependency_graph(code_files)
    comps = _tarjan(code, graph)
    comp_of = {p: i for i, comp in enumerate(comps) for p in comp}
    dependents: list[set[int]] = [set() for _ in comps]
    indeg = [0] * len(comps)
    for i, comp in enumerate(comps):
        deps = {comp_of[d] for p in comp for d in graph[p]} - {i}
        indeg[i] = len(deps)
        for d in deps:
            dependents[d].add(i)
    heap = [(_key(comps[i][0]), i) for i in range(len(comps)) if indeg[i] == 0]
    heapq.heapify(heap)
    code_order: list[str] = []
    while heap:
        _, i = heapq.heappop(heap)
        code_order += comps[i]
        for j in dependents[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(heap, (_key(comps[j][0]), j))

    docs_by_dir: dict[str, list[str]] = {}
    for d in docs:
        docs_by_dir.setdefault(posixpath.dirname(d), []).append(d)
    for folder in docs_by_dir:  # README first, then the rest alphabetically
        docs_by_dir[folder].sort(key=lambda p: (not posixpath.basename(p).lower()
                                                .startswith("readme"), _key(p)))
    order: list[str] = []
    for p in code_order:
        parts = _key(posixpath.dirname(p)) if posixpath.dirname(p) else ()
        for depth in range(len(parts) + 1):
            folder = "/".join(parts[:depth])
            order += docs_by_dir.pop(folder, [])
        order.append(p)
    for folder in sorted(docs_by_dir, key=lambda f: _key(f) if f else ()):
        order += docs_by_dir[folder]
    return order


def concat_repository(repo_name: str, files: dict[str, str]) -> str:
    """All files of a repository as one markdown document, in `order_repository` order."""
    files = {p.replace("\\", "/"): t for p, t in files.items()}
    blocks = [to_markdown(p, files[p]) for p in order_repository(files)]
    return f"# Repository: {repo_name}\n\n" + "\n".join(blocks)


SKIP_DIRS = frozenset({
    ".git", ".hg", ".svn", "node_modules", "bower_components", "__pycache__", ".venv", "venv",
    ".tox", ".nox", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".eggs", "site-packages",
    "vendor", "third_party", "thirdparty", "dist", "target", ".idea", ".vscode",
})


def read_repository(folder: str | os.PathLike, max_bytes: int = 1_000_000,
                    skip_dirs: frozenset[str] = SKIP_DIRS,
                    include_unknown: bool = False) -> dict[str, str]:
    """{relative posix path: text} of a source tree. Skips vendored and hidden folders,
    symlinks, files over `max_bytes`, binaries (a NUL byte or invalid UTF-8) and, unless
    `include_unknown`, files `language_of` does not know."""
    root = os.fspath(folder)
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in skip_dirs and not d.startswith(".")
                             and not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if os.path.islink(full) or (not include_unknown and language_of(rel) is None):
                continue
            try:
                if os.path.getsize(full) > max_bytes:
                    continue
                with open(full, "rb") as f:
                    raw = f.read()
                if b"\0" in raw[:8192]:
                    continue
                out[rel] = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
    return out
