"""Project-made alignment data: formats, determinism, rendering and the learnable signal."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import operator
import re

import pytest

from internlm2.align.synth import (
    DOMAINS,
    TOOLS,
    build_alignment_data,
    preference_records,
    prompt_records,
    read_jsonl,
    sft_records,
    split_records,
    write_jsonl,
)
from internlm2.chat_format import parse_output, render_chat

CJK = re.compile(r"[\u4e00-\u9fff]")
MATH = re.compile(r"(\d+) ?(\+|-|×|plus|minus|times|加|减|乘) ?(\d+)")
OPS = {"+": operator.add, "plus": operator.add, "加": operator.add,
       "-": operator.sub, "minus": operator.sub, "减": operator.sub,
       "×": operator.mul, "times": operator.mul, "乘": operator.mul}
TOOL_SPECS = {t["function"]["name"]: t["function"] for t in TOOLS}


@pytest.fixture(scope="module")
def sft():
    return sft_records(600, seed=1)


@pytest.fixture(scope="module")
def pref():
    return preference_records(400, seed=1)


@pytest.fixture(scope="module")
def prompts():
    return prompt_records(200, seed=1)


def _expected(question: str) -> int:
    """The arithmetic result of a math question, worked out here, not by the generator."""
    a, op, b = MATH.search(question).groups()
    return OPS[op](int(a), int(b))


def _first_user(messages: list[dict]) -> str:
    return next(m["content"] for m in messages if m["role"] == "user")


def test_deterministic_for_a_seed_and_different_across_seeds():
    for make in (sft_records, preference_records, prompt_records):
        a, b, c = make(60, seed=3), make(60, seed=3), make(60, seed=4)
        assert json.dumps(a, ensure_ascii=False) == json.dumps(b, ensure_ascii=False)
        assert a != c


def test_records_are_varied(sft, pref, prompts):
    for recs in (sft, pref, prompts):
        distinct = {json.dumps(r, ensure_ascii=False, sort_keys=True) for r in recs}
        assert len(distinct) >= 0.95 * len(recs)
    numbers = {n for r in sft for n in re.findall(r"\d+", json.dumps(r["messages"]))}
    assert len(numbers) > 300


def test_every_sft_record_renders(sft):
    for rec in sft:
        assert set(rec) <= {"messages", "tools"}
        text = render_chat(rec["messages"], tools=rec.get("tools"), add_generation_prompt=False)
        assert text.startswith("<s><|im_start|>")
        assert any(m["role"] == "assistant" and m.get("loss", True) for m in rec["messages"])
        assert rec["messages"][-1]["role"] == "assistant"
    # Shares are exact: 25% tool calls, 10% interpreter runs by default.
    assert sum(any("tool_calls" in m for m in r["messages"]) for r in sft) == 150
    assert sum(any("code" in m for m in r["messages"]) for r in sft) == 60
    assert any(m.get("loss") is False for r in sft for m in r["messages"])
    assert any("tools" in r and not any("tool_calls" in m for m in r["messages"]) for r in sft)
    assert any(sum(m["role"] == "user" for m in r["messages"]) == 3 for r in sft)


def test_tool_calls_match_the_declared_tools(sft):
    calls = 0
    for rec in sft:
        msgs, tools = rec["messages"], rec.get("tools")
        offered = {t["function"]["name"] for t in tools or []}
        for i, m in enumerate(msgs):
            if "tool_calls" not in m:
                continue
            calls += 1
            assert m["content"] and len(m["tool_calls"]) == 1
            call = m["tool_calls"][0]
            assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"]) and call["type"] == "function"
            name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
            assert name in offered
            params = TOOL_SPECS[name]["parameters"]
            assert set(params["required"]) <= set(args) <= set(params["properties"])
            for key, value in args.items():
                assert isinstance(value, str) and value
                assert value in params["properties"][key].get("enum", [value])
            # The rendered action block parses back to the same call.
            text = render_chat(msgs[: i + 1], tools=tools, add_generation_prompt=False)
            body = text.rsplit("<|im_start|>assistant\n", 1)[1]
            assert '<|action_start|><|plugin|>\n{"name": ' in body
            parsed = parse_output(body)
            assert parsed.error is None and parsed.content == m["content"]
            assert (parsed.tool_calls[0].name, parsed.tool_calls[0].arguments) == (name, args)
            # A tool turn answers the call, then the final answer uses its result.
            result, final = msgs[i + 1], msgs[i + 2]
            assert result["role"] == "tool" and result["tool_call_id"] == call["id"]
            assert result["name"] == name
            values = json.loads(result["content"]).values()
            assert final["role"] == "assistant" and any(str(v) in final["content"] for v in values)
    assert calls == 150


def test_interpreter_records_render_and_their_outputs_are_right(sft):
    seen = 0
    for rec in sft:
        msgs = rec["messages"]
        for i, m in enumerate(msgs):
            if "code" not in m:
                continue
            seen += 1
            text = render_chat(msgs, tools=rec.get("tools"))
            assert "<|im_start|>system name=<|interpreter|>\n" in text
            assert f"<|action_start|><|interpreter|>\n```python\n{m['code']}\n```<|action_end|>\n" in text
            assert "<|im_start|>environment name=<|interpreter|>\n" in text
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(m["code"], {})  # noqa: S102 - the generator's own arithmetic snippets
            env = msgs[i + 1]
            assert env == {"role": "environment", "name": "interpreter", "content": out.getvalue().strip()}
            assert env["content"] in msgs[i + 2]["content"]
    assert seen == 60


@pytest.mark.parametrize("frac", [0.0, 0.3, 0.7])
def test_chinese_share(frac):
    for recs, key in ((sft_records(200, seed=5, zh_fraction=frac), "messages"),
                      (preference_records(200, seed=5, zh_fraction=frac), "prompt"),
                      (prompt_records(200, seed=5, zh_fraction=frac), "messages")):
        share = sum(bool(CJK.search(_first_user(r[key]))) for r in recs) / len(recs)
        assert abs(share - frac) <= 0.03


def test_preference_pairs(pref):
    counts = dict.fromkeys(DOMAINS, 0)
    for rec in pref:
        assert set(rec) == {"prompt", "chosen", "rejected", "domain"}
        counts[rec["domain"]] += 1
        assert rec["prompt"][-1]["role"] == "user"
        chosen, rejected = rec["chosen"], rec["rejected"]
        assert len(chosen) == len(rejected) == 1
        assert chosen[0]["role"] == rejected[0]["role"] == "assistant"
        assert chosen != rejected
        for side in (chosen, rejected):
            render_chat(rec["prompt"] + side, add_generation_prompt=False)
        good, bad = chosen[0]["content"], rejected[0]["content"]
        if rec["domain"] == "math":
            r = _expected(rec["prompt"][-1]["content"])
            assert re.search(rf"= {r}\b", good) and not re.search(rf"= {r}\b", bad)
        elif rec["domain"] == "code":
            for text in (good, bad):
                ast.parse(text.removeprefix("```python\n").removesuffix("\n```"))
    assert counts == dict.fromkeys(DOMAINS, 100)
    only_math = preference_records(20, seed=0, domains=["math"])
    assert {r["domain"] for r in only_math} == {"math"}


def test_code_pairs_differ_in_behaviour():
    """The chosen function is right and the rejected one wrong on a probe input."""
    probes = {"add_": (5,), "times_": (5,), "is_multiple_of_": (0,), "square": (5,),
              "is_even": (4,), "larger": (3, 8), "reverse": ("abc",), "total": ([1, 2, 3],),
              "last": ([1, 2, 3],), "factorial": (5,), "count_char": ("banana", "a")}
    for rec in preference_records(200, seed=2, domains=["code"]):
        results = []
        for side in ("chosen", "rejected"):
            ns: dict = {}
            exec(rec[side][0]["content"].strip("`").removeprefix("python\n"), ns)  # noqa: S102
            fn = next(v for k, v in ns.items() if not k.startswith("__"))
            args = next(a for p, a in probes.items() if fn.__name__.startswith(p))
            results.append(fn(*args))
        assert results[0] != results[1]


def test_prompt_records(prompts):
    counts = dict.fromkeys(DOMAINS, 0)
    for rec in prompts:
        counts[rec["domain"]] += 1
        assert set(rec) <= {"messages", "domain", "reference"}
        assert rec["messages"][-1]["role"] == "user"
        render_chat(rec["messages"])
        if rec["domain"] == "math":
            assert rec["reference"] == str(_expected(rec["messages"][-1]["content"]))
        elif rec["domain"] in ("harmless", "code"):
            assert "reference" not in rec
    assert counts == dict.fromkeys(DOMAINS, 50)
    assert sum("reference" in r for r in prompts if r["domain"] == "helpful") > 30


def test_records_pass_the_alignment_data_checks(sft, pref, prompts):
    data = pytest.importorskip("internlm2.align.data")
    validate = getattr(data, "validate_record", None)
    if validate is None:
        pytest.skip("internlm2.align.data has no validate_record")
    for recs, kind in ((sft, "sft"), (pref, "pref"), (prompts, "prompt")):
        for rec in recs:
            assert validate(rec, kind) == [], rec


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="zh_fraction"):
        sft_records(10, zh_fraction=1.5)
    with pytest.raises(ValueError, match="exceed"):
        sft_records(10, tool_fraction=0.8, interpreter_fraction=0.5)
    with pytest.raises(ValueError, match="domains"):
        preference_records(10, domains=["poetry"])
    with pytest.raises(ValueError, match="val_fraction"):
        split_records([{}], val_fraction=1.0)


def test_split_records():
    recs = [{"i": i} for i in range(100)]
    train, val = split_records(recs, val_fraction=0.2, seed=7)
    assert (len(train), len(val)) == (80, 20)
    assert sorted(r["i"] for r in train + val) == list(range(100))
    assert [r["i"] for r in train] == sorted(r["i"] for r in train)  # order kept
    assert split_records(recs, 0.2, seed=7) == (train, val)
    assert split_records(recs, 0.2, seed=8)[1] != val
    assert split_records(recs, 0.0) == (recs, [])
    assert len(split_records(recs[:3], 0.1)[1]) == 1


def test_write_read_jsonl_and_build(tmp_path):
    paths = build_alignment_data(tmp_path / "out" / "align", n_sft=120, n_pref=80, n_prompts=40,
                                 seed=2, val_fraction=0.25)
    assert set(paths) == {"sft", "sft_val", "pref", "pref_val", "prompts", "prompts_val"}
    for stem, n in (("sft", 120), ("pref", 80), ("prompts", 40)):
        train, val = read_jsonl(paths[stem]), read_jsonl(paths[f"{stem}_val"])
        assert paths[stem].name == f"{stem}.jsonl"
        assert (len(train), len(val)) == (n - n // 4, n // 4)
    assert read_jsonl(paths["sft"]) + read_jsonl(paths["sft_val"]) != []
    text = paths["sft"].read_text(encoding="utf-8")
    assert CJK.search(text) and "\\u" not in text  # ensure_ascii=False
    assert sorted(p.name for p in paths["sft"].parent.iterdir()) == sorted(
        p.name for p in paths.values())  # no temp files left behind

    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"a": 1}])
    bad.write_text(bad.read_text() + "\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        read_jsonl(bad)
