"""The built-in corpus: data for a machine with no data and no network.

Three parts, deterministic from a seed:
- code: the Python standard library's own source files (one document per file);
- prose_en: the docstrings and comments of those files, gathered per module (English);
- synthetic: bilingual (English and Chinese) text written here: arithmetic with worked
  answers, key-value facts with retrieval questions, and short explanations.

Each part is written as jsonl (`{"id", "text", "source", "lang", ...}`), the input format
of the data pipeline.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import os
import random
import sysconfig
import tokenize
from pathlib import Path
from typing import Iterator

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages",
              "__pycache__", "ensurepip", "pydoc_data", "venv"}


def stdlib_files(limit: int | None = None, seed: int = 0) -> list[Path]:
    """The standard library's .py files (tests and bundled packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    files.sort()
    if limit is not None and limit < len(files):
        files = sorted(random.Random(seed).sample(files, limit))
    return files


def _doc_id(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:16]


def _prose_of(source: str) -> str:
    """Docstrings and comment blocks of one module, as paragraphs of plain English."""
    paras: list[str] = []
    try:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    paras.append(doc.strip())
    except (SyntaxError, ValueError):
        pass
    block: list[str] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if text and not text.startswith(("!", "-*-", "noqa", "type:", "XXX")):
                    block.append(text)
                    continue
            if tok.type not in (tokenize.NL, tokenize.COMMENT) and block:
                if sum(len(b) for b in block) > 60:
                    paras.append(" ".join(block))
                block = []
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return "\n\n".join(paras)


def code_documents(files: list[Path]) -> Iterator[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rel = f.relative_to(root).as_posix()
        yield {"id": _doc_id("code", rel), "text": text, "source": "code", "lang": "code",
               "path": rel, "repo": "python-stdlib"}


def prose_documents(files: list[Path]) -> Iterator[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in files:
        try:
            prose = _prose_of(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        if len(prose) >= 200:
            rel = f.relative_to(root).as_posix()
            yield {"id": _doc_id("prose", rel), "text": prose, "source": "prose_en", "lang": "en",
                   "path": rel}


# -- synthetic bilingual text --------------------------------------------------------------

_NAMES_EN = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack"]
_NAMES_ZH = ["小明", "小红", "小刚", "小丽", "王芳", "李雷", "韩梅梅", "张伟", "刘洋", "陈静"]
_ITEMS = [("apples", "苹果", "个"), ("books", "书", "本"), ("pencils", "铅笔", "支"),
          ("stamps", "邮票", "张"), ("marbles", "弹珠", "颗"), ("cookies", "饼干", "块")]
_THINGS_EN = ["red door", "blue box", "old bridge", "north gate", "silver key", "green lamp",
              "stone tower", "quiet garden", "east window", "small boat", "tall tree", "white tent"]
_THINGS_ZH = ["红色的门", "蓝色的盒子", "旧桥", "北门", "银钥匙", "绿灯", "石塔", "安静的花园",
              "东窗", "小船", "高树", "白帐篷"]
_ATTR_EN = ["secret code", "room number", "magic number", "lucky number", "serial number"]
_ATTR_ZH = ["密码", "房间号", "神奇数字", "幸运数字", "编号"]

_EXPLAIN_EN = [
    ("Why is the sky blue?", [
        "Sunlight contains every color of visible light.",
        "When it passes through the air, short blue waves are scattered by gas molecules much more than long red waves.",
        "This scattered blue light reaches our eyes from every direction of the sky.",
        "At sunset the light travels through more air, so most blue is scattered away and the sky looks red."]),
    ("How does a plant make food?", [
        "A plant makes food by photosynthesis.",
        "Its leaves take in carbon dioxide from the air and water from the roots.",
        "Using the energy of sunlight, chlorophyll turns them into sugar and oxygen.",
        "The sugar feeds the plant and the oxygen is released into the air."]),
    ("What is a prime number?", [
        "A prime number is a whole number greater than one.",
        "It can be divided evenly only by one and by itself.",
        "For example, 2, 3, 5, 7 and 11 are prime numbers.",
        "The number 9 is not prime because it equals 3 times 3."]),
    ("Why do we have seasons?", [
        "The axis of the Earth is tilted.",
        "As the Earth goes around the Sun, each half of the planet leans toward the Sun for part of the year.",
        "The half that leans toward the Sun gets more direct light and longer days, which makes summer.",
        "Six months later the same half leans away, and it is winter there."]),
    ("What does a computer program do?", [
        "A program is a list of instructions for a computer.",
        "The computer follows the instructions one step at a time.",
        "Programs can store numbers, compare them and repeat steps many times.",
        "A small mistake in the instructions is called a bug."]),
    ("How does rain form?", [
        "The Sun warms water in seas and lakes, and some of it evaporates into vapor.",
        "The warm moist air rises and cools as it goes up.",
        "In cool air the vapor condenses into tiny droplets that form clouds.",
        "When droplets join and grow heavy, they fall as rain."]),
]
_EXPLAIN_ZH = [
    ("天空为什么是蓝色的？", [
        "太阳光包含各种颜色的可见光。", "阳光穿过空气时，波长较短的蓝光比红光更容易被气体分子散射。",
        "被散射的蓝光从天空的各个方向进入我们的眼睛。", "傍晚时阳光要穿过更厚的空气，蓝光大多被散射掉，所以天空看起来是红色的。"]),
    ("植物怎样制造养分？", [
        "植物通过光合作用制造养分。", "叶子从空气中吸收二氧化碳，根从土壤中吸收水分。",
        "叶绿素利用阳光的能量，把它们变成糖和氧气。", "糖为植物提供能量，氧气被释放到空气中。"]),
    ("什么是质数？", [
        "质数是大于一的整数。", "它只能被一和它本身整除。", "例如二、三、五、七和十一都是质数。",
        "九不是质数，因为九等于三乘三。"]),
    ("为什么会有四季？", [
        "地球的自转轴是倾斜的。", "地球绕太阳运行时，南北半球轮流朝向太阳。",
        "朝向太阳的半球得到更直接的阳光和更长的白天，就是夏天。", "半年以后，这个半球背向太阳，就进入了冬天。"]),
    ("计算机程序是做什么的？", [
        "程序是一系列交给计算机执行的指令。", "计算机按照指令一步一步地工作。",
        "程序可以保存数字、比较大小，并且多次重复同样的步骤。", "指令中的小错误被称为漏洞。"]),
    ("雨是怎样形成的？", [
        "太阳加热海洋和湖泊，一部分水蒸发成水蒸气。", "温暖潮湿的空气上升，并在上升中逐渐冷却。",
        "在冷空气中，水蒸气凝结成小水滴，形成云。", "小水滴互相合并、变重以后，就落下来成为雨。"]),
]


def _arith_en(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
    kind = rng.randrange(4)
    if kind == 0:
        return f"Question: What is {a} + {b}?\nAnswer: {a} + {b} = {a + b}. The answer is {a + b}."
    if kind == 1:
        hi, lo = max(a, b), min(a, b)
        return f"Question: What is {hi} - {lo}?\nAnswer: {hi} - {lo} = {hi - lo}. The answer is {hi - lo}."
    if kind == 2:
        return f"Question: What is {a} × {c}?\nAnswer: {a} × {c} = {a * c}. The answer is {a * c}."
    name = rng.choice(_NAMES_EN)
    item = rng.choice(_ITEMS)[0]
    give = rng.randint(1, a * c - 1) if a * c > 1 else 0
    return (f"Question: {name} has {c} boxes with {a} {item} in each box and gives away {give} {item}. "
            f"How many {item} are left?\nAnswer: {c} × {a} = {a * c}. {a * c} - {give} = {a * c - give}. "
            f"The answer is {a * c - give}.")


def _arith_zh(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
    kind = rng.randrange(4)
    if kind == 0:
        return f"问题：{a} 加 {b} 等于多少？\n解答：{a} + {b} = {a + b}。答案是 {a + b}。"
    if kind == 1:
        hi, lo = max(a, b), min(a, b)
        return f"问题：{hi} 减 {lo} 等于多少？\n解答：{hi} - {lo} = {hi - lo}。答案是 {hi - lo}。"
    if kind == 2:
        return f"问题：{a} 乘 {c} 等于多少？\n解答：{a} × {c} = {a * c}。答案是 {a * c}。"
    name = rng.choice(_NAMES_ZH)
    _, item, unit = rng.choice(_ITEMS)
    give = rng.randint(1, a * c - 1)
    return (f"问题：{name}有 {c} 盒{item}，每盒 {a} {unit}，送给别人 {give} {unit}，还剩多少{unit}？\n"
            f"解答：{c} × {a} = {a * c}，{a * c} - {give} = {a * c - give}。答案是 {a * c - give}。")


def kv_facts(rng: random.Random, lang: str, n: int) -> tuple[list[str], list[tuple[str, str]]]:
    """n distinct facts and their (question, answer) pairs, in `lang` ('en' or 'zh')."""
    things, attrs = (_THINGS_EN, _ATTR_EN) if lang == "en" else (_THINGS_ZH, _ATTR_ZH)
    pairs = rng.sample([(t, a) for t in things for a in attrs], n)
    facts, qa = [], []
    for thing, attr in pairs:
        value = str(rng.randint(1000, 9999))
        if lang == "en":
            facts.append(f"The {attr} of the {thing} is {value}.")
            qa.append((f"What is the {attr} of the {thing}?", value))
        else:
            facts.append(f"{thing}的{attr}是{value}。")
            qa.append((f"{thing}的{attr}是多少？", value))
    return facts, qa


def _retrieval(rng: random.Random, lang: str) -> str:
    facts, qa = kv_facts(rng, lang, rng.randint(3, 8))
    q, a = rng.choice(qa)
    if lang == "en":
        return " ".join(facts) + f"\nQuestion: {q}\nAnswer: {a}"
    return "".join(facts) + f"\n问题：{q}\n答案：{a}"


def _explain(rng: random.Random, lang: str) -> str:
    q, sents = rng.choice(_EXPLAIN_EN if lang == "en" else _EXPLAIN_ZH)
    body = sents[:1] + rng.sample(sents[1:-1], len(sents) - 2) + sents[-1:]
    keep = rng.randint(3, len(body))
    sep = " " if lang == "en" else ""
    return f"{q}\n" + sep.join(body[:keep])


def synthetic_documents(n: int, seed: int = 0) -> Iterator[dict]:
    rng = random.Random(seed)
    makers = [("arith", lambda r, l: _arith_en(r) if l == "en" else _arith_zh(r)),
              ("retrieval", _retrieval), ("explain", _explain)]
    for i in range(n):
        lang = "en" if i % 2 == 0 else "zh"
        kind, make = makers[(i // 2) % len(makers)]
        # Several short items per document so documents have some length.
        parts = [make(rng, lang) for _ in range(rng.randint(3, 8))]
        yield {"id": _doc_id("syn", str(seed), str(i)), "text": "\n\n".join(parts),
               "source": f"synthetic_{lang}", "lang": lang, "kind": kind}


# -- retrieval in a haystack (long-context data) ------------------------------------------------

_ADJ_EN = ["red", "blue", "green", "old", "silver", "golden", "small", "tall", "quiet", "north",
           "east", "white", "dark", "bright", "stone", "wooden", "iron", "hidden", "broken", "round",
           "yellow", "purple", "narrow", "ancient", "frozen", "lonely"]
_NOUN_EN = ["door", "box", "bridge", "gate", "key", "lamp", "tower", "garden", "window", "boat",
            "tree", "tent", "lighthouse", "owl", "river", "clock", "castle", "mirror", "wheel",
            "bell", "garden gate", "forest", "road", "house", "library", "harbor", "mill", "fox"]
_KEY_ATTR_EN = _ATTR_EN + ["password", "pin", "ticket number", "locker number", "access code"]
_ADJ_ZH = ["红色", "蓝色", "绿色", "旧", "银色", "金色", "小", "高", "安静的", "北边的", "白色",
           "黑色", "石头", "木头", "铁", "隐藏的", "破旧的", "圆形"]
_NOUN_ZH = ["门", "盒子", "桥", "大门", "钥匙", "灯", "塔", "花园", "窗户", "船", "树", "帐篷",
            "灯塔", "猫头鹰", "河", "钟", "城堡", "镜子", "轮子", "铃铛", "森林", "房子"]
_KEY_ATTR_ZH = _ATTR_ZH + ["口令", "密码锁号", "票号"]


def _needle_facts(rng: random.Random, lang: str, k: int) -> list[tuple[str, str, str]]:
    """k key-value facts (fact, question, answer) with distinct keys over a large key space,
    so a value must be read from the context, not memorised. The keys of one document share
    things and attributes (a pool of about k/2 things), so the question's every key word must
    be matched, as in a haystack holding similar facts."""
    adj, noun, attrs = ((_ADJ_EN, _NOUN_EN, _KEY_ATTR_EN) if lang == "en"
                        else (_ADJ_ZH, _NOUN_ZH, _KEY_ATTR_ZH))
    sep = " " if lang == "en" else ""
    things = list({f"{rng.choice(adj)}{sep}{rng.choice(noun)}" for _ in range(max(1, k // 2 + 1))})
    seen: set[tuple[str, str]] = set()
    out = []
    while len(out) < k:
        key = (rng.choice(attrs), rng.choice(things))
        if key in seen:
            if len(seen) >= len(attrs) * len(things):
                things.append(f"{rng.choice(adj)}{sep}{rng.choice(noun)}")
            continue
        seen.add(key)
        attr, thing = key
        value = str(rng.randint(1000, 99999))
        if lang == "en":
            out.append((f"The {attr} of the {thing} is {value}.",
                        f"What is the {attr} of the {thing}?", value))
        else:
            out.append((f"{thing}的{attr}是{value}。", f"{thing}的{attr}是多少？", value))
    return out


def _sentences(texts: list[str], lang: str) -> list[str]:
    out: list[str] = []
    for t in texts:
        for line in t.splitlines():
            line = line.strip()
            if not line:
                continue
            if lang == "zh":
                out += [x + "。" for x in line.split("。") if x.strip()]
            else:
                out += [x.strip() + "." for x in line.split(". ") if len(x.strip()) > 20]
    return out


def _retrieval_text(rng: random.Random, pool: list[str], lang: str, target: int,
                    n_facts: int, restate: bool = False) -> str:
    """One document: about `target` characters of a contiguous run of `pool` (wrapping) with
    `n_facts` facts on lines of their own at random sentence boundaries, then every fact
    asked (in shuffled order) in the NIAH eval's form, each followed by its answer."""
    start = rng.randrange(len(pool))
    fill: list[str] = []
    size = 0
    while size < target:
        s = pool[(start + len(fill)) % len(pool)]
        fill.append(s)
        size += len(s) + 1
    facts = _needle_facts(rng, lang, n_facts)
    for fact, _, _ in facts:  # on a line of its own, as the NIAH eval places needles
        at = rng.randint(0, len(fill))
        fill[at:at] = [f"\n{fact}\n"]
    asked = facts[:]
    rng.shuffle(asked)
    if lang == "en":
        tail = "".join(f"\n\nQuestion: {q}\nAnswer: {f if restate else v}" for f, q, v in asked)
    else:
        tail = "".join(f"\n\n问题：{q}\n答案：{f if restate else v}" for f, q, v in asked)
    sep = " " if lang == "en" else ""
    text = ""
    for part in fill:
        glue = "" if not text or part.startswith("\n") or text.endswith("\n") else sep
        text += glue + part
    return text.strip() + tail


def retrieval_documents(prose: list[str], n: int, seed: int = 0,
                        chars: tuple[int, int] = (1200, 8000), *, short_fraction: float = 0.9,
                        short_chars: tuple[int, int] = (0, 600),
                        short_facts: tuple[int, int] = (1, 2), list_fraction: float = 0.4,
                        long_facts: tuple[int, int] = (1, 6), restate: bool = True
                        ) -> Iterator[dict]:
    """Needle-in-a-haystack documents for pretraining (the report's phase 2 mixes in
    retrieval-heavy data): filler sentences drawn from `prose` (English; Chinese filler from
    the built-in explanations and generated sentences), key-value facts on lines of their own
    at random depths, then every fact asked in the eval's form. With `restate` (default) the
    answer is the fact's own statement ("Question: What is the pin of the red box?\nAnswer:
    The pin of the red box is 4821."): the lead-in copies the question and the value then
    follows the same words as in the fact, the pattern an induction head completes and the
    form of the NIAH prompt's lead-in; without it the answer is the bare value.

    Shape: a document longer than the training context is cut into pieces whose questions no
    longer see their facts, which teaches guessing, so `short_fraction` of the documents fit
    phase 1's 256 tokens: `short_facts` facts in `short_chars` of filler (log-uniform, at
    least 100), or with probability `list_fraction` no filler at all (the easiest case). One
    or two facts per document, like a single needle, rather than many similar keys. Chinese
    filler gets a third of the characters (about one token per character). The rest have
    `chars` of filler (log-uniform) and `long_facts` facts: documents of >= 256 tokens for the
    long-context phase, where `long_share` picks them."""
    for field, v in (("short_fraction", short_fraction), ("list_fraction", list_fraction)):
        if not 0 <= v <= 1:
            raise ValueError(f"retrieval_documents: {field} must be in [0, 1], got {v}")
    for field, r in (("chars", chars), ("short_facts", short_facts), ("long_facts", long_facts)):
        if len(r) != 2 or not 0 < r[0] <= r[1]:
            raise ValueError(f"retrieval_documents: {field} must be (lo, hi) with 0 < lo <= hi, "
                             f"got {r!r}")
    rng = random.Random(seed)
    en = _sentences(prose, "en")
    if not en:
        raise ValueError("retrieval_documents needs some English prose for the filler")
    from ..tokenizer import synthetic_chinese
    zh = _sentences([" ".join(s for _, ss in _EXPLAIN_ZH for s in ss)]
                    + [synthetic_chinese(400, seed + 1)], "zh")
    for i in range(n):
        lang = "zh" if i % 8 == 7 else "en"
        pool = en if lang == "en" else zh
        if rng.random() < short_fraction:
            lo, hi = short_chars
            target = 0 if rng.random() < list_fraction or hi < 100 else \
                int(math.exp(rng.uniform(math.log(max(lo, 100)), math.log(hi))))
            k = rng.randint(*short_facts)
        else:
            lo, hi = chars
            target = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            k = rng.randint(*long_facts)
        if lang == "zh":  # about one token per character, not ~3.5: keep the token budget
            target //= 3
        text = _retrieval_text(rng, pool, lang, target, k, restate)
        yield {"id": _doc_id("ret", str(seed), str(i)), "text": text,
               "source": f"synthetic_{lang}", "lang": lang, "kind": "retrieval_long"}


def write_jsonl(path: Path, docs) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = nbytes = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
            n += 1
            nbytes += len(d["text"].encode())
    os.replace(tmp, path)
    return {"documents": n, "bytes": nbytes}


def build_builtin_corpus(output: str | Path, seed: int = 0, code_files: int | None = None,
                         synthetic: int = 20000, retrieval: int = 0) -> dict:
    """Write code.jsonl, prose_en.jsonl and synthetic.jsonl (and retrieval.jsonl: `retrieval`
    needle-in-a-haystack documents, see `retrieval_documents`) under `output`; return stats."""
    out = Path(output)
    files = stdlib_files(code_files, seed)
    stats = {
        "code": write_jsonl(out / "code.jsonl", code_documents(files)),
        "prose_en": write_jsonl(out / "prose_en.jsonl", prose_documents(files)),
        "synthetic": write_jsonl(out / "synthetic.jsonl", synthetic_documents(synthetic, seed)),
    }
    if retrieval:
        prose = [d["text"] for d in prose_documents(files)]
        stats["retrieval"] = write_jsonl(out / "retrieval.jsonl",
                                         retrieval_documents(prose, retrieval, seed))
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
