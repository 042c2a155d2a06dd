"""Code data (markdown, dedup text, quality, repository order) and long-context selection."""

import base64
import math
import random

import pytest
import torch

from internlm2.data.code import (CodeQualityConfig, CodeQualityFilter, calibrate_cutoffs,
                                 concat_repository, dependency_graph, find_imports,
                                 language_of, normalize_for_dedup, order_repository,
                                 quality_score, read_repository, resolve, to_markdown)
from internlm2.data.longctx import (LongContextConfig, LongContextSelector,
                                    PerplexityDiffFilter, chunk_starts, perplexity_gain,
                                    text_stats)

# -- repository order --------------------------------------------------------------------

FAKE_REPO = {
    "README.md": "# Demo\n\nA small repository.\n",
    "main.py": "from pkg import cli\nimport sys\n\ncli.main(sys.argv)\n",
    "pkg/README.md": "The package.\n",
    "pkg/notes.rst": "Notes\n=====\n",
    "pkg/__init__.py": "from .core import run\n",
    "pkg/core.py": "from .util import helper\nimport os\n\ndef run():\n    return helper()\n",
    "pkg/util.py": "import math\n\ndef helper():\n    return math.pi\n",
    "pkg/cli.py": "from pkg.core import run  # absolute\n\ndef main(argv):\n    run()\n",
    # the cycle a <-> b; b also needs util, which must come before both
    "pkg/a.py": "from . import b\n\nx = 1\n",
    "pkg/b.py": "from .a import x\nfrom .util import helper\n",
    "web/app.js": "import { f } from './lib';\nconsole.log(f());\n",
    "web/lib.js": "export function f() { return 1; }\n",
    "csrc/main.c": '#include <stdio.h>\n#include "util.h"\nint main(void) { return util(); }\n',
    "csrc/util.c": '#include "util.h"\nint util(void) { return 0; }\n',
    "csrc/util.h": "int util(void);\n",
    "docs/guide.md": "How to use it.\n",
}

EXPECTED_ORDER = [
    "README.md",
    "csrc/util.h", "csrc/main.c", "csrc/util.c",
    "pkg/README.md", "pkg/notes.rst",
    "pkg/util.py", "pkg/a.py", "pkg/b.py", "pkg/core.py", "pkg/__init__.py", "pkg/cli.py",
    "main.py",
    "web/lib.js", "web/app.js",
    "docs/guide.md",
]


def write_tree(root, files):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_order_repository_on_fake_repo(tmp_path):
    write_tree(tmp_path, FAKE_REPO)
    # things read_repository must skip
    write_tree(tmp_path, {"node_modules/dep/index.js": "x", ".git/config": "[core]\n",
                          "__pycache__/m.py": "x = 1\n"})
    (tmp_path / "blob.py").write_bytes(b"\x00\x01binary")
    (tmp_path / "huge.py").write_text("x = 1\n" * 50_000)
    files = read_repository(tmp_path, max_bytes=100_000)
    assert files == FAKE_REPO

    order = order_repository(files)
    assert order == EXPECTED_ORDER
    pos = {p: i for i, p in enumerate(order)}
    graph = dependency_graph({p: t for p, t in files.items() if not p.endswith((".md", ".rst"))})
    for p, deps in graph.items():
        for d in deps:
            if {p, d} != {"pkg/a.py", "pkg/b.py"}:
                assert pos[d] < pos[p], (d, p)
    assert graph["pkg/a.py"] == {"pkg/b.py"} and graph["pkg/b.py"] == {"pkg/a.py", "pkg/util.py"}
    assert graph["pkg/cli.py"] == {"pkg/core.py"}  # absolute import inside the package
    assert graph["csrc/main.c"] == {"csrc/util.h"}  # <stdio.h> is not in the repository
    # docs sit right before the first code file of their folder
    assert pos["pkg/README.md"] + 2 == pos["pkg/util.py"] == min(pos[p] for p in order
                                                                 if p.startswith("pkg/")
                                                                 and p.endswith(".py"))
    # deterministic: any insertion order gives the same result
    items = list(files.items())
    for seed in range(3):
        random.Random(seed).shuffle(items)
        assert order_repository(dict(items)) == EXPECTED_ORDER

    text = concat_repository("demo", files)
    assert text.startswith("# Repository: demo\n\n## File: README.md\n\n# Demo\n")
    assert text.index("## File: csrc/util.h") < text.index("## File: csrc/main.c")
    assert "## File: pkg/a.py\n\n```python\nfrom . import b\n\nx = 1\n```\n" in text


def test_cycle_of_three_broken_alphabetically():
    files = {"z.py": "import y\n", "y.py": "import x\n", "x.py": "import z\nimport w\n",
             "w.py": ""}
    assert order_repository(files) == ["w.py", "x.py", "y.py", "z.py"]


def test_find_imports_per_language():
    assert find_imports("pkg/m.py", (
        "import os, sys as system\nfrom . import b, c as d\nfrom ..x.y import (\n  p,  # c\n"
        "  q,\n)\nfrom .m import *\ndef f():\n    import pkg.sub\n")) == {
        "os", "sys", ".b", ".c", "..x.y.p", "..x.y.q", ".m", "pkg.sub"}
    js = ("import x from \"./x\";\nimport {a,\n b} from '../lib/b';\nimport './side.css';\n"
          "export * from \"./re\";\nconst q = require('./q');\nconst z = await import(\"./z\");\n"
          "import React from 'react';\n")
    assert find_imports("src/a.js", js) == {"./x", "../lib/b", "./side.css", "./re", "./q",
                                            "./z", "react"}
    assert find_imports("src/a.ts", "import type { T } from './types';\n") == {"./types"}
    assert find_imports("x.cpp", '#include "x.h"\n# include <vector>\n#include "../inc/y.hpp"\n'
                        ) == {"x.h", "vector", "../inc/y.hpp"}
    assert find_imports("x.h", '#include "a/b.h"\n') == {"a/b.h"}
    assert find_imports("A.java", "package a.b;\nimport a.c.D;\nimport static a.c.E.f;\n"
                        "import java.util.*;\n") == {"a.c.D", "a.c.E.f", "java.util.*"}
    assert find_imports("m.go", 'package main\nimport "fmt"\nimport (\n  "github.com/u/r/pkg" // c\n'
                        '  alias "github.com/u/r/other"\n  _ "x/y"\n)\n') == {
        "fmt", "github.com/u/r/pkg", "github.com/u/r/other", "x/y"}
    assert find_imports("src/lib.rs", "mod a;\npub mod b;\nmod inline { }\n"
                        "use crate::x::{y, z::{self, W as V}, *};\nuse std::io;\nuse super::q as r;\n"
                        ) == {"self::a", "self::b", "crate::x::y", "crate::x::z", "crate::x::z::W",
                              "crate::x", "std::io", "super::q"}
    assert find_imports("notes.txt", "import os\n") == set()


def test_resolve_java_go_rust():
    files = {
        "src/main/java/a/b/App.java": "package a.b;\nimport a.c.Util;\nimport a.d.*;\n",
        "src/main/java/a/c/Util.java": "package a.c;\nimport static a.c.Consts.PI;\n",
        "src/main/java/a/c/Consts.java": "package a.c;\n",
        "src/main/java/a/d/One.java": "package a.d;\n",
        "src/main/java/a/d/Two.java": "package a.d;\n",
        "go.mod": "module github.com/u/r\n\ngo 1.21\n",
        "cmd/main.go": 'package main\nimport (\n  "fmt"\n  "github.com/u/r/internal/db"\n)\n',
        "internal/db/db.go": "package db\n",
        "internal/db/conn.go": "package db\n",
        "src/lib.rs": "mod net;\npub mod util;\n",
        "src/net/mod.rs": "mod tcp;\nuse crate::util::helper;\n",
        "src/net/tcp.rs": "use super::super::util;\nuse std::io;\n",
        "src/util.rs": "pub fn helper() {}\n",
    }
    g = dependency_graph(files)
    assert g["src/main/java/a/b/App.java"] == {"src/main/java/a/c/Util.java",
                                               "src/main/java/a/d/One.java",
                                               "src/main/java/a/d/Two.java"}
    assert g["src/main/java/a/c/Util.java"] == {"src/main/java/a/c/Consts.java"}
    assert g["cmd/main.go"] == {"internal/db/db.go", "internal/db/conn.go"}
    assert g["src/lib.rs"] == {"src/net/mod.rs", "src/util.rs"}
    assert g["src/net/mod.rs"] == {"src/net/tcp.rs", "src/util.rs"}
    assert g["src/net/tcp.rs"] == {"src/util.rs"}
    order = order_repository(files)
    assert order.index("src/util.rs") < order.index("src/net/tcp.rs") < order.index("src/lib.rs")
    # JS extension and index resolution, C include directories
    js = {"web/a.ts": "import {b} from './b.js';\nimport c from './c';\n", "web/b.ts": "",
          "web/c/index.tsx": "", "include/lib/x.h": "", "src/x.c": '#include "lib/x.h"\n'}
    assert resolve("web/a.ts", "./b.js", js) == {"web/b.ts"}
    assert resolve("web/a.ts", "./c", js) == {"web/c/index.tsx"}
    assert resolve("src/x.c", "lib/x.h", js) == {"include/lib/x.h"}
    assert resolve("web/a.ts", "../../outside", js) == set()


def test_language_of():
    assert [language_of(p) for p in ["a.py", "b.TSX", "c.hpp", "d.h", "Makefile", "README",
                                     "x.rs", "y.go", "z.java", "n.md", "CMakeLists.txt",
                                     "data.bin", "noext"]] == [
        "python", "typescript", "cpp", "c", "makefile", "text", "rust", "go", "java",
        "markdown", "cmake", None, None]


# -- markdown and dedup text --------------------------------------------------------------

def test_to_markdown_exact_format():
    assert to_markdown("pkg/a.py", "\n\nx = 1\r\ny = 2  \n\n") == \
        "## File: pkg/a.py\n\n```python\nx = 1\ny = 2\n```\n"
    assert to_markdown("src\\b.rs", "fn main() {}\n") == \
        "## File: src/b.rs\n\n```rust\nfn main() {}\n```\n"
    assert to_markdown("doc.py", '"""Example:\n\n```\ncode\n```\n"""\n') == \
        '## File: doc.py\n\n````python\n"""Example:\n\n```\ncode\n```\n"""\n````\n'
    assert to_markdown("README.md", "# Title\n\nText.\n") == "## File: README.md\n\n# Title\n\nText.\n"
    assert to_markdown("blob.xyz", "data\n") == "## File: blob.xyz\n\n```\ndata\n```\n"
    assert to_markdown("empty.py", "") == "## File: empty.py\n\n```python\n```\n"
    assert to_markdown("x.txt", "t", lang="python") == "## File: x.txt\n\n```python\nt\n```\n"


CODE4 = """\
class Stack:
    \"\"\"A stack.\"\"\"

    def __init__(self):
        self.items = []



    def push(self, x):
        if x is None:
            raise ValueError("none")
        self.items.append(x)   
"""


def test_normalize_for_dedup_indentation():
    code2 = CODE4.replace("    ", "  ")
    tabs = CODE4.replace("    ", "\t")
    norm = normalize_for_dedup(CODE4)
    assert normalize_for_dedup(code2) == normalize_for_dedup(tabs) == norm
    assert normalize_for_dedup(CODE4.replace("\n", "\r\n")) == norm
    assert "\n\n\n" not in norm and not any(ln != ln.rstrip() for ln in norm.split("\n"))
    assert norm.split("\n")[-1] == "\t\tself.items.append(x)"
    # different code (a different nesting) stays different
    assert normalize_for_dedup(CODE4.replace("        self.items.append", "    self.items.append")) != norm
    assert normalize_for_dedup(CODE4.replace("push", "pop")) != norm


# -- quality ------------------------------------------------------------------------------

CLEAN_MODULE = '''"""Small geometry helpers."""

import math


class Point:
    """A point in the plane."""

    def __init__(self, x: float, y: float) -> None:
        self.x = x
        self.y = y

    def norm(self) -> float:
        # Euclidean length from the origin.
        return math.hypot(self.x, self.y)


def distance(a: Point, b: Point) -> float:
    """Distance between two points."""
    return math.hypot(a.x - b.x, a.y - b.y)


def centroid(points: list[Point]) -> Point:
    """The mean of the points; raises on an empty list."""
    if not points:
        raise ValueError("no points")
    n = len(points)
    return Point(sum(p.x for p in points) / n, sum(p.y for p in points) / n)
'''


def test_quality_score_levels():
    score, level, reasons = quality_score("geo/points.py", CLEAN_MODULE)
    assert level == "high" and score == 1.0 and reasons == []

    minified = "var a=function(b){return b*2},c=[1,2,3].map(a);" * 60
    s, level, reasons = quality_score("dist/app.min.js", minified)
    assert (s, level) == (0.0, "low") and reasons[0].startswith("minified")

    generated = "# Code generated by protoc-gen-go. DO NOT EDIT.\n" + CLEAN_MODULE
    assert quality_score("api_pb2.py", generated)[1:] == ("low", ["autogenerated"])

    blob = base64.b64encode(random.Random(0).randbytes(3000)).decode()
    data = "DATA = (\n" + "".join(f'    "{blob[i:i + 76]}"\n' for i in range(0, len(blob), 76)) + ")\n"
    _, level, reasons = quality_score("assets.py", data)
    assert level == "low" and reasons[0].startswith("data_like")

    table = "static const int T[] = {\n" + "".join(
        ", ".join(str(random.Random(i).randrange(1000)) for _ in range(12)) + ",\n"
        for i in range(40)) + "};\n"
    assert quality_score("table.c", table)[1] == "low"
    assert quality_score("tiny.py", "x=1\n")[2] == ["too_small: 3 chars"]

    # soft signals: long but undocumented, definition-free script -> moderate
    script = "".join(f"value_{i} = compute(value_{i - 1}, {i})\n" for i in range(1, 40))
    s, level, reasons = quality_score("run.py", script)
    assert level == "moderate" and {r.split(":")[0] for r in reasons} == {"no_comments",
                                                                          "no_definitions"}


def test_code_quality_filter_and_cutoffs():
    f = CodeQualityFilter()
    assert f.check({"text": CLEAN_MODULE, "path": "a.py", "lang": "code"}) is None
    reason = f.check({"text": "x=[" + "1," * 2000 + "]", "path": "d.js", "lang": "code"})
    assert reason.startswith("code_quality_low: ")
    assert f.check({"text": "x=1", "lang": "en"}) is None  # not code: not judged here
    assert [f.upsample_factor(x) for x in ("high", "moderate", "low")] == [2, 1, 0]
    assert f.annotate({"text": CLEAN_MODULE, "path": "a.py"})["code_quality"]["level"] == "high"
    strict = CodeQualityFilter(CodeQualityConfig(high_cutoff=1.01, low_cutoff=1.01))
    assert strict.check({"text": CLEAN_MODULE, "path": "a.py"}).startswith("code_quality_low")
    scores = [i / 1000 for i in range(1000)]
    hi, lo = calibrate_cutoffs(scores)
    assert sum(s >= hi for s in scores) == 168 and sum(s < lo for s in scores) == 133


# -- long-context statistical filters ---------------------------------------------------

def english_essay(n_bytes=40_000, seed=0):
    rng = random.Random(seed)
    subj = ["the committee", "our team", "the researchers", "the city council", "many readers",
            "the engineers", "the old library", "a small company", "the students", "the report"]
    verb = ["reviewed", "questioned", "supported", "rebuilt", "described", "measured",
            "criticised", "expanded", "simplified", "explained"]
    obj = ["the proposal", "the budget", "the bridge", "the archive", "the results",
           "the new policy", "the schedule", "the survey", "the design", "the plan"]
    pats = ["{A} {v} {o}, but {b} {w} {p}.", "Because {a} {v} {o}, {b} {w} {p}.",
            "{A} {v} {o}; however, {b} {w} {p}.", "Although {a} {v} {o}, {b} {w} {p}.",
            "{A} {v} {o}. Therefore, {b} {w} {p}.", "Moreover, {a} {v} {o} in the spring.",
            "For example, {a} {v} {o} twice.", "As a result, {b} {w} {p} again.",
            "{A} {v} {o} while {b} {w} {p}.", "In addition, {a} {v} {o} with care."]
    paras, size = [], 0
    while size < n_bytes:
        sents = []
        for _ in range(rng.randint(4, 8)):
            a, b = rng.choice(subj), rng.choice(subj)
            s = rng.choice(pats).format(A=a.capitalize(), a=a, b=b, v=rng.choice(verb),
                                        w=rng.choice(verb), o=rng.choice(obj), p=rng.choice(obj))
            sents.append(s[0].upper() + s[1:])
        paras.append(" ".join(sents))
        size += len(paras[-1]) + 1
    return "\n".join(paras)


def chinese_essay(n_bytes=40_000, seed=0):
    rng = random.Random(seed)
    subj = ["委员会", "研究人员", "我们的团队", "市政府", "许多读者", "工程师们", "这家小公司", "学生们"]
    verb = ["审查了", "支持了", "重建了", "描述了", "测量了", "扩展了", "简化了", "解释了"]
    obj = ["这项提案", "预算", "那座桥", "档案馆", "实验结果", "新政策", "时间表", "设计方案"]
    pats = ["{a}{v}{o}，但是{b}{w}{p}。", "因为{a}{v}{o}，所以{b}{w}{p}。",
            "虽然{a}{v}{o}，然而{b}{w}{p}。", "{a}{v}{o}，而且{b}{w}{p}。",
            "此外，{a}{v}{o}。", "因此，{b}{w}{p}。", "例如，{a}在春天{v}{o}。",
            "如果{a}{v}{o}，{b}就会{w}{p}。", "同时，{a}{v}{o}。", "尽管如此，{b}{w}{p}。"]
    paras, size = [], 0
    while size < n_bytes:
        sents = [rng.choice(pats).format(a=rng.choice(subj), b=rng.choice(subj),
                                         v=rng.choice(verb), w=rng.choice(verb),
                                         o=rng.choice(obj), p=rng.choice(obj))
                 for _ in range(rng.randint(4, 8))]
        paras.append("".join(sents))
        size += len(paras[-1].encode()) + 1
    return "\n".join(paras)


def repeat_to(lines, n_bytes):
    out, size, i = [], 0, 0
    while size < n_bytes:
        out.append(lines(i))
        size += len(out[-1].encode()) + 1
        i += 1
    return "\n".join(out)


def test_long_context_selector_keeps_prose_and_drops_lists():
    sel = LongContextSelector()
    en, zh = english_essay(), chinese_essay()
    assert len(en.encode()) >= 32768 and len(zh.encode()) >= 32768
    assert sel.check({"text": en, "lang": "en"}) is None
    assert sel.check({"text": zh, "lang": "zh"}) is None
    assert sel.check({"text": zh}) is None  # language detected when not given
    assert text_stats(en, "en")["distinct_discourse"] >= 8

    assert sel.check({"text": en[:5000], "lang": "en"}).startswith("too_short")
    menu = repeat_to(lambda i: ["Home", "About us", "Contact", "Privacy policy", "Login",
                                f"Page {i}"][i % 6], 40_000)
    assert sel.check({"text": menu, "lang": "en"}).startswith("short_lines")
    rows = repeat_to(lambda i: f"Item {i:06d} | SKU-{(i * 7919) % 10000:04d} | "
                               f"${(i * 37) % 1000:4d}.00 | In stock", 40_000)
    assert sel.check({"text": rows, "lang": "en"}).startswith(("uniform_lines", "high_digits"))
    rng = random.Random(1)
    ads = repeat_to(lambda i: f"The {rng.choice(['new', 'classic', 'premium', 'compact'])} "
                              f"{rng.choice(['lamp', 'chair', 'kettle', 'desk', 'sofa'])} comes in "
                              f"{rng.choice(['red', 'grey', 'oak', 'white'])} and features a "
                              f"{rng.choice(['matte', 'gloss', 'brushed'])} finish with "
                              f"{rng.choice(['free delivery', 'a warranty', 'easy assembly'])}.",
                    40_000)
    assert sel.check({"text": ads, "lang": "en"}).startswith("low_discourse")
    zh_ads = repeat_to(lambda i: ["本店新品上架欢迎选购正品保障全场包邮", "限时特价优惠活动火热进行中",
                                  "客服热线全天在线为您服务"][i % 3], 40_000)
    assert sel.check({"text": zh_ads, "lang": "zh"}).startswith("low_discourse")
    # thresholds are per language and configurable
    lax = LongContextSelector(LongContextConfig(min_bytes=1000))
    assert lax.check({"text": en[:5000], "lang": "en"}) is None


# -- perplexity difference ----------------------------------------------------------------

class InductionLM(torch.nn.Module):
    """A toy causal LM that uses long context only through copying: at each position it
    looks for the most recent earlier occurrence of the last k tokens and predicts, with
    probability p, the token that followed it; otherwise it is uniform."""

    def __init__(self, vocab: int, k: int = 3, p: float = 0.9):
        super().__init__()
        self.vocab, self.k, self.p = vocab, k, p
        self.calls: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls.append(input_ids.clone())
        b, t = input_ids.shape
        base = math.log((1 - self.p) / self.vocab)
        logits = torch.full((b, t, self.vocab), base)
        for r in range(b):
            ids = input_ids[r].tolist()
            last: dict[tuple, int] = {}
            for i in range(self.k - 1, t):
                gram = tuple(ids[i - self.k + 1 : i + 1])
                if gram in last:
                    logits[r, i, ids[last[gram] + 1]] = math.log(self.p + (1 - self.p) / self.vocab)
                last[gram] = i
        return logits


def test_perplexity_gain_scores_the_right_tokens_with_the_right_context():
    model = InductionLM(vocab=512)
    ids = list(range(250))
    d = perplexity_gain(model, ids, tail=10, short_context=5, chunk=100, stride=1,
                        max_chunks=None, return_details=True)
    assert d["chunks"] == 3 and d["tokens"] == 30
    long_calls = [c for c in model.calls if c.shape[1] > 5]
    short_rows = {tuple(r.tolist()) for c in model.calls if c.shape[1] == 5 for r in c}
    # long: the whole chunk but its last token, one chunk per call
    assert [c[0].tolist() for c in long_calls] == [list(range(0, 99)), list(range(100, 199)),
                                                   list(range(200, 249))]
    # short: for every tail token i of every chunk, exactly the 5 tokens before it
    tails = [i for s, L in ((0, 100), (100, 100), (200, 50)) for i in range(s + L - 10, s + L)]
    assert short_rows == {tuple(range(i - 5, i)) for i in tails}
    assert d["gain"] == pytest.approx(0.0, abs=1e-5)  # no repeats: nothing to gain

    # stride: blocks of 4 share a window; the last, shorter block keeps the window width
    model.calls.clear()
    perplexity_gain(model, ids[:100], tail=10, short_context=5, chunk=100, stride=4)
    short = [c for c in model.calls if c.shape[1] == 8]
    assert len(short) == 1 and [r.tolist()[-1] for r in short[0]] == [92, 96, 98]
    assert chunk_starts(250, 100, 60, None) == [0, 100]
    assert chunk_starts(1000, 100, 10, 4) == [0, 200, 500, 700]
    assert math.isnan(perplexity_gain(model, ids[:12], tail=10, short_context=5, chunk=100))


def test_perplexity_gain_sign_on_repeated_vs_unrelated_text():
    rng = random.Random(0)
    model = InductionLM(vocab=256)
    passage = [rng.randrange(256) for _ in range(48)]
    filler = [rng.randrange(256) for _ in range(200)]
    repeated = passage + filler + passage
    unrelated = passage + filler + [rng.randrange(256) for _ in range(48)]
    kw = dict(tail=40, short_context=8, chunk=1024)
    gain_rep = perplexity_gain(model, repeated, **kw)
    gain_unrel = perplexity_gain(model, unrelated, **kw)
    assert gain_rep > 3.5  # ~ log(256) - (-log 0.9): the copy is found only with long context
    assert abs(gain_unrel) < 0.05

    class ByteTokenizer:
        def encode(self, text, add_bos=False, allow_special=False):
            return list(text.encode())

    letters = "abcdefghijklmnopqrstuvwxyz "
    para = "".join(rng.choice(letters) for _ in range(300))
    noise = "".join(rng.choice(letters) for _ in range(1500))
    f = PerplexityDiffFilter(InductionLM(vocab=256, k=6), ByteTokenizer(), tail=200,
                             short_context=32, chunk=4096)
    assert f.check({"text": para + noise + para}) is None
    assert f.check({"text": para + noise + noise[::-1][:300]}).startswith("ppl_no_gain")
    assert f.check({"text": "short"}).startswith("ppl_too_short")


def test_perplexity_gain_with_internlm2_model():
    from internlm2.config import ModelConfig
    from internlm2.model import build_model

    model = build_model(ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2), seed=0).eval()
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))
    kw = dict(tail=24, short_context=16, chunk=128, stride=4)
    d = perplexity_gain(model, ids, batch_size=8, return_details=True, **kw)
    assert d["chunks"] == 3 and math.isfinite(d["gain"]) and d["long_nll"] > 0
    # batching and the logits_to_keep shortcut change nothing
    assert perplexity_gain(model, ids, batch_size=5, **kw) == pytest.approx(d["gain"], abs=1e-4)
    assert perplexity_gain(lambda x: model(x), ids, **kw) == pytest.approx(d["gain"], abs=1e-4)

    class ByteTokenizer:
        def encode(self, text):
            return list(text.encode())

    f = PerplexityDiffFilter(model, ByteTokenizer(), tail=32, short_context=16, chunk=256)
    reason = f.check({"text": english_essay(2000)})
    assert reason is None or reason.startswith("ppl_no_gain")


def test_retrieval_documents_ask_every_fact_once_with_its_own_answer():
    import re

    from internlm2.data.builtin import retrieval_documents
    prose = ["The module reads configuration files and returns a mapping of sections. "
             "Each section holds options whose values are strings until converted. "
             "Errors in the file are reported with the line number where they occur."] * 5
    docs = list(retrieval_documents(prose, 48, seed=3, restate=False, short_facts=(2, 6)))
    assert docs == list(retrieval_documents(prose, 48, seed=3, restate=False,
                                            short_facts=(2, 6)))  # deterministic
    assert {d["lang"] for d in docs} == {"en", "zh"}
    for d in docs:
        if d["lang"] != "en":
            continue
        body, *qas = d["text"].split("\n\nQuestion: ")
        lines = body.split("\n")
        assert qas, "every document asks at least one question"
        keys = set()
        for qa in qas:
            q, a = qa.split("\nAnswer: ")
            m = re.fullmatch(r"What is the (.+) of the (.+)\?", q)
            assert m and (m[1], m[2]) not in keys  # no key asked twice: one right answer
            keys.add((m[1], m[2]))
            # the fact is a line of its own in the body, with this answer
            assert f"The {m[1]} of the {m[2]} is {a}." in lines
        facts = [x for x in lines if re.fullmatch(r"The .+ of the .+ is \d+\.", x)]
        assert len(facts) == len(qas)  # every hidden fact is asked
    # restate: every answer is the fact's own statement (the NIAH prompt's lead-in + value)
    for d in retrieval_documents(prose, 24, seed=4):  # restate is the default
        if d["lang"] == "en":
            body, *qas = d["text"].split("\n\nQuestion: ")
            for qa in qas:
                q, a = qa.split("\nAnswer: ")
                m = re.fullmatch(r"The (.+) of the (.+) is \d+\.", a)
                assert m and q == f"What is the {m[1]} of the {m[2]}?" and a in body.split("\n")
        else:
            body, *qas = d["text"].split("\n\n问题：")
            for qa in qas:
                q, a = qa.split("\n答案：")
                assert re.fullmatch(r".+的.+是\d+。", a) and a in body.split("\n")
    with pytest.raises(ValueError, match="short_fraction"):
        list(retrieval_documents(prose, 1, short_fraction=2.0))
    with pytest.raises(ValueError, match="prose"):
        list(retrieval_documents([], 1))
