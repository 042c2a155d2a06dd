"""The InternLM2-Chat format: exact official strings, ids and loss mask, tool-call parsing."""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import pytest
from conftest import mask_runs

from internlm2.chat_format import (
    DEFAULT_INTERPRETER_PROMPT,
    ChatFormatError,
    CodeDelta,
    ContentDelta,
    ParsedOutput,
    StreamParser,
    ToolCallDelta,
    ToolCallStart,
    parse_output,
    render_chat,
    render_chat_ids,
    to_openai_message,
)

TOKENIZER_FILE = Path(__file__).resolve().parents[1].parent / "shared/data/internlm2_tokenizer.model"

WEATHER_FN = {
    "name": "get_current_weather",
    "description": "Get the current weather in a given location",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string"},
        },
        "required": ["location"],
    },
}
WEATHER_TOOL = {"type": "function", "function": WEATHER_FN}
# LMDeploy dumps its pydantic Function model: keys description, name, parameters.
WEATHER_JSON = json.dumps([{"description": WEATHER_FN["description"], "name": WEATHER_FN["name"],
                            "parameters": WEATHER_FN["parameters"]}], ensure_ascii=False)
SYSTEM = "You are InternLM2-Chat, a harmless AI assistant"


@pytest.fixture(scope="module")
def tok():
    if not TOKENIZER_FILE.is_file():
        pytest.skip(f"official tokenizer not found at {TOKENIZER_FILE}")
    from internlm2.tokenizer import load_tokenizer
    return load_tokenizer(TOKENIZER_FILE)


# ----------------------------------------------------------------------------- rendering


def test_plain_chat_exact():
    msgs = [{"role": "user", "content": "Hello"}]
    assert render_chat(msgs) == "<s><|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(msgs, bos=False, add_generation_prompt=False) == (
        "<|im_start|>user\nHello<|im_end|>\n")


def test_multi_turn_with_system_exact():
    # chat_format.md "Basic Structure" and the chat tokenizer_config.json chat_template.
    msgs = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello, I am InternLM2-Chat, how can I assist you?"},
        {"role": "user", "content": "你好"},
    ]
    assert render_chat(msgs) == (
        "<s><|im_start|>system\nYou are InternLM2-Chat, a harmless AI assistant<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHello, I am InternLM2-Chat, how can I assist you?<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_tools_turn_placement_and_json():
    turn = f"<|im_start|>system name=<|plugin|>\n{WEATHER_JSON}<|im_end|>\n"
    with_sys = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    assert render_chat(with_sys, tools=[WEATHER_TOOL]) == (
        f"<s><|im_start|>system\n{SYSTEM}<|im_end|>\n{turn}"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    no_sys = [{"role": "user", "content": "Hi"}]
    assert render_chat(no_sys, tools=[WEATHER_FN]) == (  # a bare function schema works too
        f"<s>{turn}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # Non-ASCII stays as is; a missing description is null; extra keys are dropped.
    out = render_chat(no_sys, tools=[{"name": "查询", "strict": True}], bos=False)
    assert out.startswith('<|im_start|>system name=<|plugin|>\n'
                          '[{"description": null, "name": "查询", "parameters": null}]<|im_end|>\n')


def test_tool_call_and_result_exact():
    # chat_format.md "Function Call" example, with the tool list as the server serialises it.
    msgs = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "I want to know today's weather in Shanghai"},
        {"role": "assistant", "content": "Sure, I will search for the weather of Shanghai.",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {
             "name": "get_current_weather", "arguments": '{"location":"Shanghai"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_current_weather",
         "content": '{"temperature": 22}'},
        {"role": "assistant", "content": "The weather in Shanghai is 22 celsius"},
    ]
    expected = (
        f"<s><|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>system name=<|plugin|>\n{WEATHER_JSON}<|im_end|>\n"
        "<|im_start|>user\nI want to know today's weather in Shanghai<|im_end|>\n"
        "<|im_start|>assistant\nSure, I will search for the weather of Shanghai."
        '<|action_start|><|plugin|>\n{"name": "get_current_weather", "parameters": '
        '{"location": "Shanghai"}}<|action_end|><|im_end|>\n'
        '<|im_start|>environment name=<|plugin|>\n{"temperature": 22}<|im_end|>\n'
        "<|im_start|>assistant\nThe weather in Shanghai is 22 celsius<|im_end|>\n")
    before = json.dumps(msgs)
    assert render_chat(msgs, tools=[WEATHER_TOOL], add_generation_prompt=False) == expected
    assert json.dumps(msgs) == before  # the caller's messages are not modified
    # dict arguments, `parameters` key, the official environment role and the legacy function role
    alt = [dict(m) for m in msgs]
    alt[2] = {"role": "assistant", "content": alt[2]["content"], "tool_calls": [
        {"type": "function", "function": {"name": "get_current_weather",
                                          "parameters": {"location": "Shanghai"}}}]}
    for result in ({"role": "environment", "name": "plugin", "content": '{"temperature": 22}'},
                   {"role": "environment", "name": "<|plugin|>", "content": '{"temperature": 22}'},
                   {"role": "function", "name": "get_current_weather",
                    "content": '{"temperature": 22}'}):
        alt[3] = result
        assert render_chat(alt, tools=[WEATHER_TOOL], add_generation_prompt=False) == expected


def test_tool_calls_only_and_several():
    msgs = [{"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "a", "arguments": "{}"}},
                {"type": "function", "function": {"name": "b", "arguments": {"k": "值"}}}]}]
    assert render_chat(msgs, bos=False, add_generation_prompt=False).endswith(
        '<|im_start|>assistant\n<|action_start|><|plugin|>\n{"name": "a", "parameters": {}}'
        '<|action_end|><|action_start|><|plugin|>\n{"name": "b", "parameters": {"k": "值"}}'
        "<|action_end|><|im_end|>\n")


def test_interpreter_turn_and_call_exact():
    code = "import pandas as pd\ndf = pd.read_csv('data.csv')\nprint(df.shape)"
    msgs = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Please help me process and visualize this dataset.\n"},
        {"role": "user", "name": "file", "content": '[{"path": "data.csv", "size": "10K"}]'},
        {"role": "assistant", "content": "I have processed the data.\n\n", "code": code},
        {"role": "environment", "name": "interpreter", "content": "(100, 3)"},
        {"role": "assistant", "content": "The table has 100 rows."},
    ]
    expected = (
        f"<s><|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>system name=<|interpreter|>\n{DEFAULT_INTERPRETER_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nPlease help me process and visualize this dataset.\n<|im_end|>\n"
        '<|im_start|>user name=file\n[{"path": "data.csv", "size": "10K"}]<|im_end|>\n'
        "<|im_start|>assistant\nI have processed the data.\n\n"
        f"<|action_start|><|interpreter|>\n```python\n{code}\n```<|action_end|>\n<|im_end|>\n"
        "<|im_start|>environment name=<|interpreter|>\n(100, 3)<|im_end|>\n"
        "<|im_start|>assistant\nThe table has 100 rows.<|im_end|>\n")
    assert render_chat(msgs, interpreter=True, add_generation_prompt=False) == expected
    # The same call written in the content passes through unchanged.
    inline = [dict(m) for m in msgs]
    inline[3] = {"role": "assistant", "content": "I have processed the data.\n\n<|action_start|>"
                 f"<|interpreter|>\n```python\n{code}\n```<|action_end|>\n"}
    assert render_chat(inline, interpreter=True, add_generation_prompt=False) == expected


def test_interpreter_and_tools_order():
    out = render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                      tools=[WEATHER_TOOL], interpreter="Run Python.", bos=False)
    assert out == ("<|im_start|>system\nS<|im_end|>\n"
                   "<|im_start|>system name=<|interpreter|>\nRun Python.<|im_end|>\n"
                   f"<|im_start|>system name=<|plugin|>\n{WEATHER_JSON}<|im_end|>\n"
                   "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat([{"role": "user", "content": "U"}], interpreter=False) == render_chat(
        [{"role": "user", "content": "U"}])


def test_content_parts_are_concatenated():
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    assert render_chat([{"role": "user", "content": parts}]) == render_chat(
        [{"role": "user", "content": "Hello"}])


@pytest.mark.parametrize("messages, kwargs, fragment", [
    ([{"role": "robot", "content": "x"}], {}, "messages[0].role"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": 3}], {}, "messages[1].content"),
    ([{"role": "user", "content": {"text": "x"}}], {}, "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}], {},
     "messages[0].content[0]"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c"}], {},
     "messages[1].content"),
    ([{"role": "user"}], {}, "messages[0].content"),
    (["hello"], {}, "messages[0]"),
    ([{"role": "user", "content": "x"}], {"tools": [{"type": "function", "function": {}}]},
     "tools[0].function.name"),
    ([{"role": "user", "content": "x"}], {"tools": [{"name": "f", "parameters": "loose"}]},
     "tools[0].parameters"),
    ([{"role": "user", "content": "x"}], {"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ([{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{bad"}}]}], {},
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "content": "x", "tool_calls": [{"type": "function"}]}], {},
     "messages[0].tool_calls[0].function"),
    ([{"role": "user", "name": "a b", "content": "x"}], {}, "messages[0].name"),
])
def test_validation_errors(messages, kwargs, fragment):
    with pytest.raises(ChatFormatError) as e:
        render_chat(messages, **kwargs)
    assert fragment in str(e.value)
    assert isinstance(e.value, ValueError)


# ----------------------------------------------------------------------------- ids and mask


TYPICAL = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "用中文介绍一下上海。"},
     {"role": "assistant", "content": "上海是中国的经济中心，位于长江入海口。\n\n- 人口：约2500万"}],
    [{"role": "user", "content": "I want to know today's weather in Shanghai"},
     {"role": "assistant", "content": "Sure, I will search for the weather of Shanghai.",
      "tool_calls": [{"type": "function", "function": {
          "name": "get_current_weather", "arguments": '{"location": "Shanghai"}'}}]},
     {"role": "tool", "content": '{"temperature": 22}'},
     {"role": "assistant", "content": "The weather in Shanghai is 22 celsius."}],
    [{"role": "user", "content": "What is 2**100?"},
     {"role": "assistant", "content": "Let me compute it.", "code": "print(2**100)"},
     {"role": "environment", "name": "interpreter", "content": "1267650600228229401496703205376"},
     {"role": "assistant", "content": "2**100 = 1267650600228229401496703205376"}],
]
TOOLS = [None, [WEATHER_TOOL], None]
INTERP = [None, None, True]



@pytest.mark.parametrize("k", range(len(TYPICAL)))
def test_ids_equal_encoding_of_rendered_text(tok, k):
    for gen in (False, True):
        ids, mask = render_chat_ids(TYPICAL[k], tok, tools=TOOLS[k], interpreter=INTERP[k],
                                    add_generation_prompt=gen)
        text = render_chat(TYPICAL[k], tools=TOOLS[k], interpreter=INTERP[k],
                           add_generation_prompt=gen, bos=False)
        assert ids == tok.encode(text, add_bos=True)
        assert ids == tok.encode("<s>" + text, add_bos=False)
        assert len(mask) == len(ids)
    ids, _ = render_chat_ids(TYPICAL[k], tok, tools=TOOLS[k], interpreter=INTERP[k], bos=False)
    assert ids[0] != tok.bos_id


@pytest.mark.parametrize("k", range(len(TYPICAL)))
def test_loss_mask_covers_exactly_assistant_replies(tok, k):
    msgs = TYPICAL[k]
    ids, mask = render_chat_ids(msgs, tok, tools=TOOLS[k], interpreter=INTERP[k])
    replies = [render_chat([m], add_generation_prompt=False, bos=False)
               .removeprefix("<|im_start|>assistant\n").removesuffix("\n")
               for m in msgs if m["role"] == "assistant"]
    assert [tok.decode(r) for r in mask_runs(ids, mask)] == replies
    assert all(r.endswith("<|im_end|>") for r in replies)
    # <|action_start|>/<|action_end|> of the call are trained on.
    if k == 1:
        trained = {i for i, b in zip(ids, mask) if b}
        assert {tok.special_tokens["<|action_start|>"], tok.special_tokens["<|action_end|>"],
                tok.special_tokens["<|plugin|>"], tok.im_end_id} <= trained
    # Everything untrained decodes back to the rest of the text.
    untrained = tok.decode([i for i, b in zip(ids, mask) if not b])
    full = render_chat(msgs, tools=TOOLS[k], interpreter=INTERP[k], add_generation_prompt=False)
    for r in replies:
        full = full.replace(r, "", 1)
    assert untrained == full


def test_loss_false_and_generation_prompt(tok):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "loss": False},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ids, mask = render_chat_ids(msgs, tok)
    assert [tok.decode(r) for r in mask_runs(ids, mask)] == ["d<|im_end|>"]
    assert ids == tok.encode(render_chat(msgs, add_generation_prompt=False), add_bos=False)
    ids, mask = render_chat_ids(msgs[:3], tok, add_generation_prompt=True)
    assert sum(mask) == 0
    assert tok.decode(ids).endswith("<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n")


def test_header_encoded_apart_from_reply(tok):
    # The one place ids may differ from encoding the whole text: a reply whose first characters
    # merge with the header's "\n" ("\n\n" is one piece). The ids follow generation, where the
    # prompt ends with "<|im_start|>assistant\n" and the reply's tokens come after it.
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\nanswer"}]
    ids, mask = render_chat_ids(msgs, tok, bos=False)
    prompt = tok.encode(render_chat(msgs[:1], bos=False), add_bos=False)
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
    assert ids[len(prompt):] == tok.encode("\nanswer<|im_end|>\n", add_bos=False)
    assert ids != tok.encode(render_chat(msgs, bos=False, add_generation_prompt=False),
                             add_bos=False)


# ----------------------------------------------------------------------------- parsing


def test_parse_plain_text():
    assert parse_output("Hello there.<|im_end|>") == ParsedOutput("Hello there.")
    assert parse_output("Hello there.") == ParsedOutput("Hello there.")


@pytest.mark.parametrize("body", [
    '{"name": "get_current_weather", "parameters": {"location": "上海"}}',
    '{"name": "get_current_weather", "arguments": {"location": "上海"}}',
    '{"name": "get_current_weather", "arguments": "{\\"location\\": \\"上海\\"}"}',
    '  {"name":"get_current_weather","parameters":{"location":"上海"}}\n',
])
@pytest.mark.parametrize("ending", ["<|action_end|><|im_end|>", "<|action_end|>", "",
                                    "<|action_end|>\n<|im_end|>\n"])
def test_parse_good_calls(body, ending):
    text = f"I will check.<|action_start|><|plugin|>\n{body}{ending}"
    p = parse_output(text)
    assert p.error is None and p.code is None
    assert p.content == "I will check."
    [call] = p.tool_calls
    assert (call.name, call.arguments, call.raw) == ("get_current_weather", {"location": "上海"},
                                                     body.strip())
    assert call.id.startswith("call_") and len(call.id) == 29
    int(call.id[5:], 16)
    msg = to_openai_message(p)
    assert msg == {"role": "assistant", "content": "I will check.", "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": "get_current_weather", "arguments": '{"location": "上海"}'}}]}


def test_parse_call_only_and_several_calls():
    text = ('<|action_start|><|plugin|>\n{"name": "a", "parameters": {}}<|action_end|>'
            '<|action_start|><|plugin|>\n{"name": "b", "parameters": {"x": 1}}<|action_end|>')
    p = parse_output(text)
    assert p.content == "" and [c.name for c in p.tool_calls] == ["a", "b"]
    msg = to_openai_message(p)
    assert msg["content"] is None and len({c["id"] for c in msg["tool_calls"]}) == 2


def test_parse_interpreter_code():
    text = ("I have processed the data and visualized it for you.\n\n<|action_start|>"
            "<|interpreter|>\n```python\nimport pandas as pd\n\nprint(1)\n```<|action_end|>\n"
            "<|im_end|>")
    p = parse_output(text)
    assert p.error is None and p.tool_calls == []
    assert p.content == "I have processed the data and visualized it for you.\n\n"
    assert p.code == "import pandas as pd\n\nprint(1)"
    assert parse_output(text.split("<|action_end|>")[0]).code == p.code  # stopped at action_end
    assert parse_output("<|action_start|><|interpreter|>\nprint(2)").code == "print(2)"
    msg = to_openai_message(p)
    assert msg == {"role": "assistant", "content": p.content, "code": p.code}


def test_render_parse_round_trip():
    for text in [
        'Sure.<|action_start|><|plugin|>\n{"name": "f", "parameters": {"q": "东京"}}<|action_end|>',
        "Let me run it.<|action_start|><|interpreter|>\n```python\nprint(1)\n```<|action_end|>\n",
        "No tools here.",
    ]:
        msg = to_openai_message(parse_output(text + "<|im_end|>"))
        rendered = render_chat([msg], bos=False, add_generation_prompt=False)
        assert rendered == f"<|im_start|>assistant\n{text}<|im_end|>\n"


@pytest.mark.parametrize("text", [
    'Checking.<|action_start|><|plugin|>\n{"name": "f", "parameters": {"q": "x"',  # truncated
    "Checking.<|action_start|><|plugin|>\n{'name': 'f', 'parameters': {}}<|action_end|>",
    'Checking.<|action_start|><|plugin|>\n{"name": "f", "parameters": {}} oops<|action_end|>',
    'Checking.<|action_start|><|plugin|>\n{"name": "f", "parameters": {}',  # no action_end
    "Checking.<|action_start|><|plugin|>\n<|action_end|>",
    "Checking.<|action_start|><|plugin|>\nnot json at all",
    'Checking.<|action_start|><|plugin|>\n["f", {}]<|action_end|>',
    'Checking.<|action_start|><|plugin|>\n{"parameters": {}}<|action_end|>',
    'Checking.<|action_start|><|plugin|>\n{"name": "f", "parameters": [1]}<|action_end|>',
    'Checking.<|action_start|><|plugin|>\n{"name": "f", "arguments": "{bad"}<|action_end|>',
    "Checking.<|action_start|>junk<|action_end|>",
    "Checking.<|action_start|>",
    'Checking.<|action_start|><|plugin|>\n{"name": "f", "parameters": {}}<|action_end|>'
    "<|action_start|><|plugin|>\n{broken",
])
def test_parse_malformed_never_raises(text):
    p = parse_output(text + "<|im_end|>")
    assert p.error and p.tool_calls == [] and p.code is None
    assert p.content == text
    assert to_openai_message(p) == {"role": "assistant", "content": text}


def test_deterministic_ids():
    text = ('<|action_start|><|plugin|>\n{"name": "a", "parameters": {}}<|action_end|>'
            '<|action_start|><|plugin|>\n{"name": "b", "parameters": {}}<|action_end|>')
    a = parse_output(text, rng=random.Random(7))
    b = parse_output(text, rng=random.Random(7))
    assert [c.id for c in a.tool_calls] == [c.id for c in b.tool_calls]
    assert a.tool_calls[0].id != a.tool_calls[1].id


# ----------------------------------------------------------------------------- streaming


STREAM_CASES = [
    "Hello, world! A plain answer with <tags> and a < sign.<|im_end|>",
    "Hello <|im_e",  # ends in something that only looks like a marker
    'Sure, I will search.<|action_start|><|plugin|>\n{"name": "get_current_weather", '
    '"parameters": {"location": "上海", "unit": "c"}}<|action_end|><|im_end|>',
    '<|action_start|><|plugin|>\n{"name": "f", "arguments": "{\\"a\\": [1, 2]}"}',
    "Computing.\n\n<|action_start|><|interpreter|>\n```python\nx = 1\nprint(x + 1)\n```"
    "<|action_end|>\n<|im_end|>\n",
    'A<|action_start|><|plugin|>\n{"name": "a", "parameters": {}}<|action_end|>\n'
    'B<|action_start|><|plugin|>\n{"name": "b", "parameters": {"k": 1}}<|action_end|>  ',
    'Broken.<|action_start|><|plugin|>\n{"name": "f", "parameters": {"q": "x"',
    "Junk.<|action_start|>nothing<|action_end|> after",
    "Junk at end.<|action_start|> <|plu",
    "<|action_start|><|interpreter|>\n```python\nprint(1)\n```<|action_end|>"
    "<|action_start|><|interpreter|>\nprint(2)<|action_end|>",
    "",
]


def _chunks(text, rng):
    out, i = [], 0
    while i < len(text):
        n = rng.choice([1, 1, 2, 3, 5, 8, 13, 40])
        out.append(text[i:i + n])
        i += n
    return out


@pytest.mark.parametrize("text", STREAM_CASES)
def test_stream_parser_matches_parse_output(text):
    rng = random.Random(zlib.crc32(text.encode()))
    for trial in range(25):
        sp = StreamParser(rng=random.Random(trial))
        events = []
        for chunk in _chunks(text, rng):
            events += sp.feed(chunk)
        events += sp.flush()
        final = sp.finish()
        assert final == parse_output(text, rng=random.Random(trial))
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        assert all(e.text for e in events if isinstance(e, ContentDelta))
        if final.error is None or "Broken" in text or "Junk" in text:
            assert content == final.content
        if final.error is None:
            starts = [e for e in events if isinstance(e, ToolCallStart)]
            assert [(s.index, s.id, s.name) for s in starts] == [
                (i, c.id, c.name) for i, c in enumerate(final.tool_calls)]
            msg = to_openai_message(final)
            for i, c in enumerate(msg.get("tool_calls", [])):
                args = "".join(e.arguments for e in events
                               if isinstance(e, ToolCallDelta) and e.index == i)
                assert args == c["function"]["arguments"]
            code = "".join(e.text for e in events if isinstance(e, CodeDelta))
            assert code == (final.code or "")


def test_stream_holds_back_only_marker_prefixes():
    sp = StreamParser()
    assert sp.feed("Hello <|act") == [ContentDelta("Hello ")]
    assert sp.feed("ual text") == [ContentDelta("<|actual text")]
    [start] = sp.feed("<|action_start|><|plugin|>\n{\"name\": \"f\"")
    assert (start.index, start.name) == (0, "f") and start.id.startswith("call_")
    assert sp.feed(', "parameters": {"a": 1}}') == []
    assert sp.feed("<|action_end|>") == [ToolCallDelta(0, '{"a": 1}')]
    assert sp.flush() == []
    assert sp.finish().tool_calls[0].id == start.id
