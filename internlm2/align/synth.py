"""Project-made alignment data: SFT conversations, preference pairs and PPO prompts.

Small bilingual (English / Chinese) datasets, deterministic from a seed, that a tiny model
(a few M parameters, ~8k-token BPE vocabulary) learns in a few hundred CPU steps: templated
skills with short answers (mostly under 40 tokens) and a clear signal. No network, no hub.

Formats (jsonl, one JSON object per line, written with ensure_ascii=False):

- SFT: `{"messages": [...], "tools": [...]}` ("tools" only where the conversation offers
  tools): OpenAI chat messages, as `internlm2.chat_format.render_chat(messages, tools=...)`
  renders them. An assistant message may carry `tool_calls` (`[{"id": "call_...", "type":
  "function", "function": {"name": ..., "arguments": "<json string>"}}]`) or `code` (Python
  for the interpreter); a `tool` message answers a call (`tool_call_id`, `name`, `content`).
  Interpreter conversations hold their own `{"role": "system", "name": "interpreter",
  "content": DEFAULT_INTERPRETER_PROMPT}` turn and get the output back as `{"role":
  "environment", "name": "interpreter", "content": ...}`, so every record renders on its own
  (do not also pass `interpreter=True`). `"loss": false` on an assistant message keeps it out
  of the loss (some multi-turn records use it on their first answer).
- Preference pairs: `{"prompt": [messages], "chosen": [assistant message], "rejected":
  [assistant message], "domain": "helpful" | "harmless" | "code" | "math"}`. The signal:
  math, the right result vs a wrong one; helpful, a direct on-topic answer vs an evasive,
  off-topic or needlessly refusing one; harmless, a polite refusal of a clearly harmful request
  vs eager compliance (that holds no actual instructions); code, a correct small function vs
  one with an obvious bug. Within a pair the wording differs only by that signal where it can.
- PPO prompts: `{"messages": [..., user turn], "domain": ..., "reference": "<answer>"}`, with
  "reference" only where one short answer is right (math, and the checkable helpful tasks).

`build_alignment_data` writes the three kinds, each split into train and a held-out `_val` file.
"""

from __future__ import annotations

import copy
import json
import math
import operator
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from internlm2.chat_format import DEFAULT_INTERPRETER_PROMPT, make_call_id
from internlm2.data.builtin import kv_facts

__all__ = [
    "DOMAINS", "TOOLS", "build_alignment_data", "preference_records", "prompt_records",
    "read_jsonl", "sft_records", "split_records", "write_jsonl",
]

DOMAINS: tuple[str, ...] = ("helpful", "harmless", "code", "math")


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required}}}


TOOLS: list[dict] = [
    _fn("get_weather", "Get the current weather in a city.",
        {"city": {"type": "string", "description": "City name"},
         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]),
    _fn("calculator", "Evaluate an arithmetic expression.",
        {"expression": {"type": "string", "description": "e.g. 12 * (3 + 4)"}}, ["expression"]),
    _fn("search", "Search the web and return a short snippet.",
        {"query": {"type": "string"}}, ["query"]),
    _fn("get_time", "Get the current local time in a timezone.",
        {"timezone": {"type": "string", "description": "IANA name, e.g. Asia/Tokyo"}},
        ["timezone"]),
]
_TOOL_BY_NAME = {t["function"]["name"]: t for t in TOOLS}

# -- vocabulary: (English, Chinese) pairs; `zh` (a bool) indexes them --------------------------

_WORDS = [
    "apple", "banana", "cherry", "river", "mountain", "window", "garden", "pencil", "rocket",
    "planet", "silver", "yellow", "orange", "tiger", "rabbit", "dragon", "winter", "summer",
    "castle", "bridge", "candle", "forest", "island", "jacket", "kitten", "ladder", "marble",
    "needle", "pepper", "puzzle", "rainbow", "shadow", "spring", "thunder", "violin", "wizard",
    "butter", "camera", "dinner", "engine", "flower", "guitar", "hammer", "lemon", "monkey",
    "ocean", "parrot", "school", "turtle", "cloud",
]
_NAMES = [("Alice", "小明"), ("Bob", "小红"), ("Carol", "小刚"), ("David", "小丽"),
          ("Emma", "王芳"), ("Frank", "李雷"), ("Grace", "韩梅梅"), ("Henry", "张伟")]
_CAPITALS = [  # (country, capital) pairs
    (("France", "法国"), ("Paris", "巴黎")), (("Japan", "日本"), ("Tokyo", "东京")),
    (("China", "中国"), ("Beijing", "北京")), (("Italy", "意大利"), ("Rome", "罗马")),
    (("Germany", "德国"), ("Berlin", "柏林")), (("Spain", "西班牙"), ("Madrid", "马德里")),
    (("Egypt", "埃及"), ("Cairo", "开罗")), (("Canada", "加拿大"), ("Ottawa", "渥太华")),
    (("Australia", "澳大利亚"), ("Canberra", "堪培拉")), (("Russia", "俄罗斯"), ("Moscow", "莫斯科")),
    (("India", "印度"), ("New Delhi", "新德里")), (("Kenya", "肯尼亚"), ("Nairobi", "内罗毕")),
    (("the United Kingdom", "英国"), ("London", "伦敦")), (("South Korea", "韩国"), ("Seoul", "首尔")),
    (("Mexico", "墨西哥"), ("Mexico City", "墨西哥城")), (("Brazil", "巴西"), ("Brasilia", "巴西利亚")),
]
_CITIES = [  # (city, IANA timezone)
    (("Paris", "巴黎"), "Europe/Paris"), (("Tokyo", "东京"), "Asia/Tokyo"),
    (("Beijing", "北京"), "Asia/Shanghai"), (("Shanghai", "上海"), "Asia/Shanghai"),
    (("London", "伦敦"), "Europe/London"), (("New York", "纽约"), "America/New_York"),
    (("Berlin", "柏林"), "Europe/Berlin"), (("Sydney", "悉尼"), "Australia/Sydney"),
    (("Moscow", "莫斯科"), "Europe/Moscow"), (("Cairo", "开罗"), "Africa/Cairo"),
    (("Seoul", "首尔"), "Asia/Seoul"), (("Los Angeles", "洛杉矶"), "America/Los_Angeles"),
    (("Singapore", "新加坡"), "Asia/Singapore"), (("Rome", "罗马"), "Europe/Rome"),
]
_WEATHER = [  # (condition, plausible Celsius range)
    (("sunny", "晴"), (15, 35)), (("cloudy", "多云"), (5, 25)), (("rainy", "有雨"), (5, 25)),
    (("windy", "有风"), (0, 20)), (("snowy", "下雪"), (-10, 0)), (("foggy", "有雾"), (0, 15)),
]
_FACTS = [  # (question, search query, snippet); the final answer repeats the snippet
    (("Who wrote Hamlet?", "《哈姆雷特》是谁写的？"), ("author of Hamlet", "哈姆雷特 作者"),
     ("Hamlet was written by William Shakespeare.", "《哈姆雷特》的作者是莎士比亚。")),
    (("How tall is Mount Everest?", "珠穆朗玛峰有多高？"), ("Mount Everest height", "珠穆朗玛峰 高度"),
     ("Mount Everest is 8,849 metres tall.", "珠穆朗玛峰高 8849 米。")),
    (("What is the longest river in the world?", "世界上最长的河是哪条？"), ("longest river", "最长的河"),
     ("The Nile is the longest river, about 6,650 km long.", "尼罗河是世界上最长的河，长约 6650 公里。")),
    (("Who painted the Mona Lisa?", "《蒙娜丽莎》是谁画的？"), ("Mona Lisa painter", "蒙娜丽莎 作者"),
     ("The Mona Lisa was painted by Leonardo da Vinci.", "《蒙娜丽莎》是达·芬奇画的。")),
    (("What is the largest ocean?", "最大的海洋是哪个？"), ("largest ocean", "最大的海洋"),
     ("The Pacific is the largest ocean on Earth.", "太平洋是地球上最大的海洋。")),
    (("When did people first land on the Moon?", "人类第一次登月是在哪一年？"), ("first Moon landing", "第一次登月"),
     ("People first landed on the Moon in 1969.", "人类在 1969 年第一次登上月球。")),
    (("What is the chemical symbol for gold?", "金的化学符号是什么？"), ("chemical symbol gold", "金 化学符号"),
     ("The chemical symbol for gold is Au.", "金的化学符号是 Au。")),
    (("How many planets are in the solar system?", "太阳系有几颗行星？"), ("planets solar system", "太阳系 行星"),
     ("There are eight planets in the solar system.", "太阳系有八颗行星。")),
]
_SYSTEM = (["You are a helpful assistant.", "Answer briefly and accurately.",
            "You are a helpful, honest and harmless AI assistant."],
           ["你是一个乐于助人的助手。", "请简短准确地回答。", "你是一个有用、诚实、无害的 AI 助手。"])
_EVASIVE = (["I'm not sure. You could look it up somewhere.", "Let's talk about something else.",
             "That is an interesting question with many possible answers."],
            ["我不太确定，你可以自己查一查。", "我们还是聊点别的吧。", "这是个有意思的问题，答案有很多种。"])
_REFUSE = (["Sorry, I can't help with that.", "I'm afraid I cannot answer that request."],
           ["抱歉，我无法帮助你。", "对不起，这个问题我不能回答。"])
_HELLO = ((["Hello!", "Hi there.", "Hi!"], "Hello! How can I help you today?"),
          (["你好！", "您好。", "嗨！"], "你好！有什么可以帮你的吗？"))
_THANKS = ((["Thanks!", "Thank you.", "Great, thanks."], "You're welcome!"),
           (["谢谢！", "好的，谢谢。"], "不客气！"))
_OPS = {"+": (operator.add, ("plus", "加")), "-": (operator.sub, ("minus", "减")),
        "×": (operator.mul, ("times", "乘"))}
_CALC_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _bot(text: str, **extra: Any) -> dict:
    return {"role": "assistant", "content": text, **extra}


def _system(rng: random.Random, zh: bool) -> dict:
    return {"role": "system", "content": rng.choice(_SYSTEM[zh])}


def _stop(zh: bool) -> str:
    return "。" if zh else "."


# -- single-turn tasks ------------------------------------------------------------------------


def _arith(rng: random.Random, zh: bool) -> tuple[str, str, int]:
    """(question, answer, result) of one +, - or × question."""
    op = rng.choice(list(_OPS))
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
    elif op == "×":
        b = rng.randint(2, 12)
    fn, word = _OPS[op]
    r = fn(a, b)
    if zh:
        qs = [f"{a} {op} {b} 等于多少？", f"计算 {a} {op} {b}。", f"{a} {word[1]} {b} 等于几？"]
    else:
        qs = [f"What is {a} {op} {b}?", f"Calculate {a} {op} {b}.", f"{a} {op} {b} = ?",
              f"What is {a} {word[0]} {b}?"]
    return rng.choice(qs), f"{a} {op} {b} = {r}{_stop(zh)}", r


def _follow_up(rng: random.Random, zh: bool, prev: int) -> tuple[str, str, int]:
    """A turn that builds on the previous result, so the model has to read the context."""
    if rng.random() < 0.5:
        c = rng.randint(2, 20)
        q = f"再加上 {c} 呢？" if zh else f"Now add {c} to that."
        return q, f"{prev} + {c} = {prev + c}{_stop(zh)}", prev + c
    c = rng.randint(2, 5)
    q = f"再乘以 {c} 呢？" if zh else f"Now multiply that by {c}."
    return q, f"{prev} × {c} = {prev * c}{_stop(zh)}", prev * c


# (English (questions, answer), Chinese (questions, answer), reference or None), formatted
# with the fields `_instruct` draws.
_INSTRUCT = [
    ((['Repeat the word "{w}" {k} times.'], "{rep}"), (["把单词 {w} 重复 {k} 遍。"], "{rep}"), "{rep}"),
    ((['Write "{w}" in uppercase.', "Convert {w} to capital letters."], "{up}"),
     (["把 {w} 转换成大写字母。"], "{up}"), "{up}"),
    ((['Spell "{w}" backwards.', "Reverse the word {w}."], "{rev}"), (["把单词 {w} 倒过来写。"], "{rev}"),
     "{rev}"),
    ((['How many letters are in the word "{w}"?'], 'The word "{w}" has {n} letters.'),
     (["单词 {w} 有几个字母？"], "{w} 有 {n} 个字母。"), "{n}"),
    ((['How many times does the letter "{c}" appear in "{w}"?'], 'The letter "{c}" appears {kc} {times} in "{w}".'),
     (["字母 {c} 在 {w} 中出现了几次？"], "{c} 在 {w} 中出现了 {kc} 次。"), "{kc}"),
    ((["What is the capital of {country}?", "Name the capital of {country}."], "The capital of {country} is {cap}."),
     (["{country}的首都是哪里？", "{country}的首都叫什么？"], "{country}的首都是{cap}。"), "{cap}"),
    ((["Say hello to {name}."], "Hello, {name}! Nice to meet you."), (["向{name}问好。"], "{name}，你好！很高兴认识你。"),
     None),
    ((["Is {num} even or odd?"], "{num} is {parity}."), (["{num} 是奇数还是偶数？"], "{num} 是{parity}。"), "{parity}"),
    ((["Which is larger, {a} or {b}?"], "{m} is larger."), (["{a} 和 {b} 哪个更大？"], "{m} 更大。"), "{m}"),
]


def _instruct(rng: random.Random, zh: bool) -> tuple[str, str, str | None]:
    """(question, answer, reference) of a short instruction; reference None when open-ended."""
    if rng.random() < 0.1:  # retrieval from a few stated facts (the built-in corpus's kind)
        facts, qa = kv_facts(rng, "zh" if zh else "en", rng.randint(2, 4))
        q, value = rng.choice(qa)
        return ("" if zh else " ").join(facts) + "\n" + q, value, value
    w, k, num = rng.choice(_WORDS), rng.randint(2, 4), rng.randint(1, 999)
    c = rng.choice(w)
    a, b = rng.sample(range(1, 1000), 2)
    country, cap = (x[zh] for x in rng.choice(_CAPITALS))
    f = {"w": w, "k": k, "rep": " ".join([w] * k), "up": w.upper(), "rev": w[::-1], "n": len(w),
         "c": c, "kc": w.count(c), "times": "time" if w.count(c) == 1 else "times",
         "country": country, "cap": cap, "name": rng.choice(_NAMES)[zh], "num": num,
         "parity": (("even", "偶数"), ("odd", "奇数"))[num % 2][zh], "a": a, "b": b, "m": max(a, b)}
    *langs, ref = rng.choice(_INSTRUCT)
    questions, answer = langs[zh]
    return (rng.choice(questions).format(**f), answer.format(**f),
            None if ref is None else ref.format(**f))


# -- tools and the interpreter ----------------------------------------------------------------


def _tool_subset(rng: random.Random, must: str | None) -> list[dict]:
    """Some of TOOLS in a random order, always including `must`: the model picks by name."""
    others = [n for n in _TOOL_BY_NAME if n != must]
    names = rng.sample(others, rng.randint(0 if must else 1, len(others)))
    names += [must] if must else []
    rng.shuffle(names)
    return [copy.deepcopy(_TOOL_BY_NAME[n]) for n in names]


# tool: English (questions, thought, answer), Chinese (...), formatted with `_tool_task`'s fields.
_TOOL_TEXT = {
    "get_weather": (
        (["What's the weather in {city}{say}?", "How is the weather in {city} now{say}?",
          "Tell me the current weather in {city}{say}."],
         "Let me check the weather in {city}.", "It is {temp}{sym} and {cond} in {city} right now."),
        (["{city}现在天气怎么样{say}？", "查一下{city}的天气{say}。"], "我来查一下{city}的天气。",
         "{city}现在{cond}，气温 {temp}{sym}。")),
    "calculator": (
        (["Use the calculator to work out {expr}.", "What is {expr}? Use the calculator."],
         "I'll use the calculator.", "{expr} = {r}."),
        (["用计算器算一下 {expr}。", "{expr} 等于多少？请用计算器。"], "我用计算器算一下。", "{expr} = {r}。")),
    "search": (
        (["{q}", "Search the web: {q}", "Please look this up: {q}"], "Let me search for that.", "{snippet}"),
        (["{q}", "帮我搜一下：{q}", "请查一查：{q}"], "我来搜索一下。", "{snippet}")),
    "get_time": (
        (["What time is it in {city}?", "What's the current time in {city}?"],
         "Let me check the time in {city}.", "It is {t} in {city} now."),
        (["{city}现在几点？", "{city}现在是什么时间？"], "我来查一下{city}的当前时间。", "{city}现在是 {t}。")),
}
_UNIT_SAY = {None: ("", ""), "celsius": (" in Celsius", "（用摄氏度）"),
             "fahrenheit": (" in Fahrenheit", "（用华氏度）")}


def _tool_task(rng: random.Random, zh: bool, name: str) -> tuple[str, str, dict, dict, str]:
    """(question, thought, arguments, result, final answer) for one call of tool `name`."""
    names, tz = rng.choice(_CITIES)
    f: dict[str, Any] = {"city": names[zh]}
    if name == "get_weather":
        asked = rng.choice([None, None, None, "celsius", "fahrenheit"])
        unit = asked or "celsius"
        cond, span = rng.choice(_WEATHER)
        temp = rng.randint(*span)
        temp = temp if unit == "celsius" else round(temp * 9 / 5 + 32)
        f.update(temp=temp, sym="°C" if unit == "celsius" else "°F", cond=cond[zh],
                 say=_UNIT_SAY[asked][zh])
        args = {"city": f["city"], "unit": unit}
        result = {"city": f["city"], "temperature": temp, "unit": unit, "condition": f["cond"]}
    elif name == "calculator":
        a, b, c = rng.randint(100, 999), rng.randint(10, 99), rng.randint(2, 30)
        op1, op2 = rng.choice(list(_CALC_OPS)), rng.choice(list(_CALC_OPS))
        expr, r = f"{a} {op1} {b}", _CALC_OPS[op1](a, b)
        if rng.random() < 0.5:
            expr, r = f"({expr}) {op2} {c}", _CALC_OPS[op2](r, c)
        f.update(expr=expr, r=r)
        args, result = {"expression": expr}, {"result": r}
    elif name == "search":
        q, query, snippet = (x[zh] for x in rng.choice(_FACTS))
        f.update(q=q, snippet=snippet)
        args, result = {"query": query}, {"query": query, "snippet": snippet}
    else:
        f["t"] = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
        args, result = {"timezone": tz}, {"timezone": tz, "time": f["t"]}
    questions, thought, answer = _TOOL_TEXT[name][zh]
    return rng.choice(questions).format(**f), thought.format(**f), args, result, answer.format(**f)


def _tool_conversation(rng: random.Random, zh: bool) -> dict:
    name = rng.choice(list(_TOOL_BY_NAME))
    q, thought, args, result, answer = _tool_task(rng, zh, name)
    call_id = make_call_id(rng)
    call = {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
    msgs = [_system(rng, zh)] if rng.random() < 0.2 else []
    msgs += [_user(q), _bot(thought, tool_calls=[call]),
             {"role": "tool", "tool_call_id": call_id, "name": name,
              "content": json.dumps(result, ensure_ascii=False)},
             _bot(answer)]
    return {"messages": msgs, "tools": _tool_subset(rng, name)}


# (code, what it prints, English (question, answer), Chinese (question, answer)), formatted with
# the fields `_interpreter_task` draws; {out} is the printed output.
_INTERPRETER = [
    ("print(sum(range({a}, {b} + 1)))", lambda f: sum(range(f["a"], f["b"] + 1)),
     ("What is the sum of all integers from {a} to {b}?", "The sum of the integers from {a} to {b} is {out}."),
     ("从 {a} 到 {b} 的所有整数之和是多少？", "从 {a} 到 {b} 的整数之和是 {out}。")),
    ("import math\nprint(math.factorial({n}))", lambda f: math.factorial(f["n"]),
     ("What is {n} factorial?", "{n}! = {out}."), ("{n} 的阶乘是多少？", "{n}! = {out}。")),
    ("print({d} ** {n})", lambda f: f["d"] ** f["n"],
     ("Compute {d} to the power of {n}.", "{d}^{n} = {out}."), ("计算 {d} 的 {n} 次方。", "{d}^{n} = {out}。")),
    ("print(sum(all(k % d for d in range(2, int(k ** 0.5) + 1)) for k in range(2, {b})))",
     lambda f: sum(all(k % d for d in range(2, math.isqrt(k) + 1)) for k in range(2, f["b"])),
     ("How many prime numbers are less than {b}?", "There are {out} prime numbers less than {b}."),
     ("小于 {b} 的质数有多少个？", "小于 {b} 的质数有 {out} 个。")),
    ("print(sorted([{xs}]))", lambda f: sorted(f["nums"]),
     ("Sort these numbers from smallest to largest: {xs}.", "Sorted: {out}."),
     ("把这些数从小到大排序：{xs}。", "排序结果：{out}。")),
]


def _interpreter_task(rng: random.Random, zh: bool) -> tuple[str, str, str, str]:
    """(question, code, what the code prints, answer)."""
    nums = rng.sample(range(1, 100), rng.randint(4, 7))
    f: dict[str, Any] = {"a": rng.randint(1, 50), "b": rng.randint(51, 500), "n": rng.randint(5, 20),
                         "d": rng.randint(2, 9), "nums": nums, "xs": ", ".join(map(str, nums))}
    code, compute, *langs = rng.choice(_INTERPRETER)
    f["out"] = str(compute(f))
    question, answer = langs[zh]
    return question.format(**f), code.format(**f), f["out"], answer.format(**f)


def _interpreter_conversation(rng: random.Random, zh: bool) -> dict:
    q, code, out, answer = _interpreter_task(rng, zh)
    thought = rng.choice(["我用 Python 来计算。", "我运行一段 Python 代码。"] if zh else
                         ["Let me compute this with Python.", "I'll run some Python."])
    msgs = [_system(rng, zh)] if rng.random() < 0.3 else []
    msgs += [{"role": "system", "name": "interpreter", "content": DEFAULT_INTERPRETER_PROMPT},
             _user(q), _bot(thought, code=code),
             {"role": "environment", "name": "interpreter", "content": out}, _bot(answer)]
    return {"messages": msgs}


# -- SFT --------------------------------------------------------------------------------------


def _multi_turn(rng: random.Random, zh: bool) -> dict:
    msgs = [_system(rng, zh)] if rng.random() < 0.5 else []
    n_turns, prev = rng.randint(2, 3), None
    for t in range(n_turns):
        if t == 0 and rng.random() < 0.25:
            qs, a = _HELLO[zh]
            q = rng.choice(qs)
        elif t == n_turns - 1 and rng.random() < 0.2:
            qs, a = _THANKS[zh]
            q = rng.choice(qs)
        elif prev is not None and rng.random() < 0.6:
            q, a, prev = _follow_up(rng, zh, prev)
        elif rng.random() < 0.5:
            q, a, prev = _arith(rng, zh)
        else:
            q, a, _ = _instruct(rng, zh)
            prev = None
        msgs += [_user(q), _bot(a)]
    if rng.random() < 0.3:  # an earlier answer the model reads but is not trained to say
        next(m for m in msgs if m["role"] == "assistant")["loss"] = False
    return {"messages": msgs}


def _single_turn(rng: random.Random, zh: bool, kind: str) -> dict:
    q, a, _ = _arith(rng, zh) if kind == "arith" else _instruct(rng, zh)
    msgs = [_system(rng, zh)] if rng.random() < 0.15 else []
    rec: dict = {"messages": [*msgs, _user(q), _bot(a)]}
    if rng.random() < 0.15:  # tools on offer that are not needed: answer directly
        rec["tools"] = _tool_subset(rng, None)
    return rec


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _allocate(n: int, shares: dict[str, float], rng: random.Random) -> list[str]:
    """n labels in exactly the given shares (largest remainder), in a seeded random order."""
    total = sum(shares.values()) or 1.0
    raw = {k: n * v / total for k, v in shares.items()}
    counts = {k: int(x) for k, x in raw.items()}
    for k in sorted(raw, key=lambda k: counts[k] - raw[k])[: n - sum(counts.values())]:
        counts[k] += 1
    labels = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(labels)
    return labels


def _langs(n: int, zh_fraction: float, rng: random.Random) -> list[bool]:
    _check_fraction("zh_fraction", zh_fraction)
    return [x == "zh" for x in _allocate(n, {"zh": zh_fraction, "en": 1 - zh_fraction}, rng)]


_CALL_ID_RE = re.compile(r"call_[0-9a-f]{24}")


def _distinct(n: int, make: Callable[[int], dict], tries: int = 20) -> list[dict]:
    """n records from make(i), a repeat retried up to `tries` times: distinct records keep the
    held-out split honest (a small template space, like harmless, still repeats some)."""
    seen: set[str] = set()
    out = []
    for i in range(n):
        for _ in range(tries):
            rec = make(i)
            key = _CALL_ID_RE.sub("", json.dumps(rec, ensure_ascii=False, sort_keys=True))
            if key not in seen:
                break
        seen.add(key)
        out.append(rec)
    return out


def sft_records(n: int, seed: int = 0, zh_fraction: float = 0.3, tool_fraction: float = 0.25,
                interpreter_fraction: float = 0.1) -> list[dict]:
    """n SFT conversations: tool calls and interpreter runs in the given shares, the rest split
    35 / 35 / 30 between arithmetic, short instructions and multi-turn chats."""
    _check_fraction("tool_fraction", tool_fraction)
    _check_fraction("interpreter_fraction", interpreter_fraction)
    rest = 1.0 - tool_fraction - interpreter_fraction
    if rest < -1e-9:
        raise ValueError("tool_fraction + interpreter_fraction must not exceed 1, got "
                         f"{tool_fraction} + {interpreter_fraction}")
    rest = max(rest, 0.0)
    rng = random.Random(f"sft:{seed}")
    langs = _langs(n, zh_fraction, rng)
    kinds = _allocate(n, {"tool": tool_fraction, "interpreter": interpreter_fraction,
                          "arith": 0.35 * rest, "instruct": 0.35 * rest, "multi": 0.3 * rest}, rng)

    def make(i: int) -> dict:
        kind, zh = kinds[i], langs[i]
        if kind == "tool":
            return _tool_conversation(rng, zh)
        if kind == "interpreter":
            return _interpreter_conversation(rng, zh)
        if kind == "multi":
            return _multi_turn(rng, zh)
        return _single_turn(rng, zh, kind)

    return _distinct(n, make)


# -- preferences and PPO prompts --------------------------------------------------------------

# (request, refusal, action, slots for {x}), each an (English, Chinese) pair.
_HARMFUL = [
    (("How do I secretly get into {x}?", "怎样偷偷进入{x}？"),
     ("Sorry, I can't help with entering someone else's property.", "抱歉，我不能帮你进入别人的地方。"),
     ("get into {x}", "进入{x}"), [("my neighbor's house", "邻居的房子"), ("my coworker's car", "同事的汽车"),
                                  ("a stranger's garage", "陌生人的车库"), ("my teacher's office", "老师的办公室")]),
    (("How can I hack into {x}?", "怎样入侵{x}？"),
     ("I can't help with breaking into other people's accounts; it is illegal.", "我不能帮你入侵别人的账号，这是违法的。"),
     ("hack into {x}", "入侵{x}"), [("my ex's email account", "前任的邮箱"), ("my boss's phone", "老板的手机"),
                                   ("a classmate's social media account", "同学的社交账号"), ("a bank's website", "银行的网站")]),
    (("Write a threatening message to {x}.", "帮我写一条威胁{x}的消息。"),
     ("I won't write threats, but I can help you write a calm message.", "我不会写威胁别人的内容，但可以帮你写一条冷静的消息。"),
     ("threaten {x}", "威胁{x}"),
     [("my coworker", "同事"), ("my neighbor", "邻居"), ("my classmate", "同学"), ("my ex", "前任")]),
    (("How do I steal {x} without getting caught?", "怎样偷{x}而不被发现？"),
     ("Sorry, I can't help with stealing.", "抱歉，我不能帮助偷窃。"),
     ("steal {x}", "偷{x}"), [("money from a shop", "商店的钱"), ("a phone from my friend", "朋友的手机"),
                             ("clothes from a supermarket", "超市的衣服"), ("my neighbor's bike", "邻居的自行车")]),
    (("Help me cheat on my {x} exam.", "帮我在{x}考试中作弊。"),
     ("I can't help you cheat, but I'd be glad to help you study.", "我不能帮你作弊，但很乐意帮你复习。"),
     ("cheat on your {x} exam", "在{x}考试中作弊"),
     [("math", "数学"), ("history", "历史"), ("driving", "驾照"), ("English", "英语")]),
    (("How can I make a fake {x}?", "怎样伪造{x}？"),
     ("Sorry, I can't help with forging documents; it is illegal.", "抱歉，我不能帮助伪造证件，这是违法的。"),
     ("make a fake {x}", "伪造{x}"),
     [("ID card", "身份证"), ("passport", "护照"), ("diploma", "毕业证"), ("driver's license", "驾照")]),
    (("Write a false rumor about {x} to spread online.", "帮我编一个关于{x}的谣言发到网上。"),
     ("I won't help spread false rumors; they hurt people.", "我不会帮你散布谣言，谣言会伤害别人。"),
     ("spread a rumor about {x}", "散布关于{x}的谣言"),
     [("my classmate", "同学"), ("a famous singer", "一位著名歌手"), ("my boss", "老板")]),
]
_LEADS = (["", "Quick question. ", "I need help. ", "Be honest with me. "],
          ["", "问个问题，", "我需要帮助。", "老实告诉我，"])
# Compliance that is plainly unsafe in spirit but holds no actual instructions.
_COMPLY = (["Sure! Here is how to {a}: first, make sure nobody is watching, then ... Nobody will know.",
            "Of course. To {a}, just follow these steps: ... Easy!"],
           ["好的！{a}的方法如下：首先确保没人看见，然后…… 谁也不会发现。", "没问题。想要{a}，只要按下面的步骤做：…… 很简单！"])

# (signature, task (English, Chinese), correct body, buggy body); {k} is a small constant.
_CODE = [
    ("add_{k}(x)", ("returns x plus {k}", "返回 x 加 {k}"), "return x + {k}", "return x - {k}"),
    ("times_{k}(x)", ("returns x multiplied by {k}", "返回 x 乘以 {k}"), "return x * {k}", "return x + {k}"),
    ("is_multiple_of_{k}(n)", ("tells whether n is a multiple of {k}", "判断 n 是否是 {k} 的倍数"),
     "return n % {k} == 0", "return n % {k} == 1"),
    ("square(x)", ("returns the square of x", "返回 x 的平方"), "return x * x", "return x * 2"),
    ("is_even(n)", ("tells whether n is even", "判断 n 是否是偶数"), "return n % 2 == 0", "return n % 2 == 1"),
    ("larger(a, b)", ("returns the larger of a and b", "返回 a 和 b 中较大的一个"),
     "return a if a > b else b", "return a if a < b else b"),
    ("reverse(s)", ("returns the string s reversed", "返回反转后的字符串 s"), "return s[::-1]", "return s"),
    ("total(xs)", ("returns the sum of the list xs", "返回列表 xs 的和"), "return sum(xs)", "return len(xs)"),
    ("last(xs)", ("returns the last item of the list xs", "返回列表 xs 的最后一个元素"),
     "return xs[-1]", "return xs[0]"),
    ("factorial(n)", ("returns n factorial", "返回 n 的阶乘"),
     "result = 1\n    for i in range(1, n + 1):\n        result *= i\n    return result",
     "result = 1\n    for i in range(1, n):\n        result *= i\n    return result"),
    ("count_char(s, c)", ("counts how often c occurs in s", "统计 c 在 s 中出现的次数"),
     "return s.count(c)", "return len(s)"),
]


def _harmful(rng: random.Random, zh: bool) -> tuple[str, str, str]:
    """(request, polite refusal, unsafe-sounding compliance)."""
    request, refusal, action, slots = rng.choice(_HARMFUL)
    x = rng.choice(slots)[zh]
    q = rng.choice(_LEADS[zh]) + request[zh].format(x=x)
    x = x if zh else re.sub(r"\bmy\b", "your", x)  # the reply speaks to the user
    return q, refusal[zh], rng.choice(_COMPLY[zh]).format(a=action[zh].format(x=x))


def _code_task(rng: random.Random, zh: bool) -> tuple[str, str, str]:
    """(request, correct function, buggy function), the functions in a ```python fence."""
    sig, task, good, bad = rng.choice(_CODE)
    k = rng.randint(2, 19)
    sig, task = sig.format(k=k), task[zh].format(k=k)
    if zh:
        q = rng.choice([f"写一个 Python 函数 `{sig}`，{task}。", f"请用 Python 实现 `{sig}`：{task}。"])
    else:
        q = rng.choice([f"Write a Python function `{sig}` that {task}.",
                        f"Implement `{sig}` in Python: it {task}."])

    def fence(body: str) -> str:
        return f"```python\ndef {sig}:\n    {body.format(k=k)}\n```"
    return q, fence(good), fence(bad)


def _pair(rng: random.Random, domain: str, zh: bool) -> tuple[str, str, str]:
    """(question, chosen text, rejected text) of one preference pair."""
    if domain == "math":
        q, good, r = _arith(rng, zh)
        off = rng.choice([-10, -2, -1, 1, 2, 3, 10])
        wrong = r + off if r + off >= 0 else r - off
        return q, good, good.replace(f"= {r}", f"= {wrong}")
    if domain == "helpful":
        q, good, _ = _instruct(rng, zh)
        style = rng.randrange(3)
        if style < 2:
            return q, good, rng.choice((_EVASIVE, _REFUSE)[style][zh])
        bad = good
        while bad == good:
            bad = _instruct(rng, zh)[1]  # a fine answer, to some other question
        return q, good, bad
    if domain == "harmless":
        return _harmful(rng, zh)
    return _code_task(rng, zh)


def _plan(salt: str, n: int, domains: Sequence[str],
          zh_fraction: float) -> tuple[random.Random, list[bool], list[str]]:
    """The generator, each record's language and its domain (the domains in equal shares)."""
    if not domains or any(d not in DOMAINS for d in domains):
        raise ValueError(f"domains must be a non-empty subset of {DOMAINS}, got {list(domains)}")
    rng = random.Random(salt)
    return rng, _langs(n, zh_fraction, rng), _allocate(n, dict.fromkeys(domains, 1.0), rng)


def preference_records(n: int, seed: int = 0, domains: Sequence[str] = DOMAINS,
                       zh_fraction: float = 0.3) -> list[dict]:
    """n preference pairs, the domains in equal shares."""
    rng, langs, labels = _plan(f"pref:{seed}", n, domains, zh_fraction)

    def make(i: int) -> dict:
        zh = langs[i]
        q, good, bad = _pair(rng, labels[i], zh)
        prompt = [_system(rng, zh)] if rng.random() < 0.1 else []
        return {"prompt": [*prompt, _user(q)], "chosen": [_bot(good)], "rejected": [_bot(bad)],
                "domain": labels[i]}

    return _distinct(n, make)


def prompt_records(n: int, seed: int = 0, domains: Sequence[str] = DOMAINS,
                   zh_fraction: float = 0.3) -> list[dict]:
    """n PPO prompts, the domains in equal shares; "reference" where one answer is right."""
    rng, langs, labels = _plan(f"prompts:{seed}", n, domains, zh_fraction)

    def make(i: int) -> dict:
        zh, domain = langs[i], labels[i]
        ref: Any = None
        if domain == "math":
            q, _, ref = _arith(rng, zh)
        elif domain == "helpful":
            q, _, ref = _instruct(rng, zh)
        else:
            q = (_harmful if domain == "harmless" else _code_task)(rng, zh)[0]
        msgs = [_system(rng, zh)] if rng.random() < 0.2 else []
        rec: dict = {"messages": [*msgs, _user(q)], "domain": domain}
        if ref is not None:
            rec["reference"] = str(ref)
        return rec

    return _distinct(n, make)


# -- files ------------------------------------------------------------------------------------


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write records one per line (UTF-8, ensure_ascii=False) to a temp file, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a jsonl file (blank lines skipped); errors name the file and line."""
    from .data import iter_objects
    return [obj for _, obj in iter_objects(path)]


def split_records(records: Sequence[dict], val_fraction: float = 0.1,
                  seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, val): a seeded random `val_fraction` of the records held out, order kept. At
    least one is held out when val_fraction > 0 and there are two or more records."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(records)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    held = set(random.Random(f"split:{seed}").sample(range(n), n_val))
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def build_alignment_data(out_dir: str | os.PathLike, *, n_sft: int = 2000, n_pref: int = 2000,
                         n_prompts: int = 400, seed: int = 0,
                         val_fraction: float = 0.1) -> dict[str, Path]:
    """Write sft / pref / prompts .jsonl and their held-out `_val` files under out_dir; each n
    counts train and val together. Returns the paths by stem ("sft", "sft_val", ...)."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for stem, records in (("sft", sft_records(n_sft, seed)),
                          ("pref", preference_records(n_pref, seed)),
                          ("prompts", prompt_records(n_prompts, seed))):
        train, val = split_records(records, val_fraction, seed)
        paths[stem] = write_jsonl(out / f"{stem}.jsonl", train)
        paths[f"{stem}_val"] = write_jsonl(out / f"{stem}_val.jsonl", val)
    return paths
