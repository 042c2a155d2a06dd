"""The agent layer: tool schemas and validation, built-in tools, the agent loops, the CLI."""

from __future__ import annotations

import enum
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from internlm2.agent.builtin import (
    BM25,
    builtin_tools,
    calculator,
    current_time,
    document_search,
    file_reader,
    tokenize,
)
from internlm2.agent.loop import Agent, tool_call_validity
from internlm2.agent.react import ReActAgent, parse_react
from internlm2.agent.tools import ToolRegistry, parse_docstring, tool
from internlm2.chat_format import ACTION_END, ACTION_START, IM_END, INTERPRETER, PLUGIN

# ----------------------------------------------------------------------------- schemas


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


def test_schema_basic_types_defaults_and_docstring():
    @tool
    def search(query: str, k: int = 3, exact: bool = False, weight: float = 0.5) -> str:
        """Search the web.

        Args:
            query: what to look for,
                in any language.
            k (int): number of hits.
        """
        return query

    assert search.schema == {"type": "function", "function": {
        "name": "search", "description": "Search the web.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "description": "what to look for, in any language."},
            "k": {"type": "integer", "description": "number of hits.", "default": 3},
            "exact": {"type": "boolean", "default": False},
            "weight": {"type": "number", "default": 0.5}},
            "required": ["query"], "additionalProperties": False}}}


def test_schema_containers_optional_literal_enum_and_arguments():
    @tool(name="plot", description="Draw.", timeout=2)
    def f(xs: list[float], opts: dict, unit: Literal["cm", "in"], color: Color = Color.RED,
          title: str | None = None, tags: list[str] | None = None):
        return color

    assert f.name == "plot" and f.timeout == 2 and f.description == "Draw."
    assert f.parameters == {"type": "object", "properties": {
        "xs": {"type": "array", "items": {"type": "number"}},
        "opts": {"type": "object"},
        "unit": {"type": "string", "enum": ["cm", "in"]},
        "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
        "title": {"type": ["string", "null"], "default": None},
        "tags": {"type": ["array", "null"], "items": {"type": "string"}, "default": None}},
        "required": ["xs", "opts", "unit"], "additionalProperties": False}
    # Enum arguments arrive as members; the schema speaks in values.
    res = ToolRegistry([f]).call("plot", {"xs": [1, 2.5], "opts": {}, "unit": "cm",
                                          "color": "blue"})
    assert res.ok and res.value is Color.BLUE


def test_numpy_docstring():
    desc, params = parse_docstring("""Add.

    Parameters
    ----------
    a : float
        The first
        number.
    b : int
        Second.

    Returns
    -------
    float
    """)
    assert desc == "Add." and params == {"a": "The first number.", "b": "Second."}


def test_unsupported_annotation_is_a_clear_error():
    assert tool(lambda x: x, name="ident").parameters["properties"] == {"x": {}}  # any value
    with pytest.raises(TypeError, match=r"bad\(x\): cannot express"):
        @tool
        def bad(x: complex):
            return x


# ----------------------------------------------------------------------------- registry


@tool
def add(a: int, b: int = 1, mode: Literal["plain", "abs"] = "plain") -> int:
    """Add two integers."""
    return abs(a + b) if mode == "abs" else a + b


@pytest.mark.parametrize("args, needle", [
    ({"b": 2}, "missing required argument(s) a"),
    ({"a": 1, "c": 2}, "unknown argument 'c'"),
    ({"a": "one"}, "a: expected integer, got str"),
    ({"a": True}, "a: expected integer, got bool"),
    ({"a": 1, "mode": "loud"}, 'mode: "loud" is not one of ["plain", "abs"]'),
    ('{"a": 1', "not valid JSON"),
    ([1, 2], "must be a JSON object"),
])
def test_validation_errors_come_back_as_text(args, needle):
    res = ToolRegistry([add]).call("add", args)
    assert not res.ok and res.error == "validation"
    assert res.content.startswith("Error:") and needle in res.content


def test_registry_calls_unknown_tools_exceptions_and_json_strings():
    @tool
    def boom(x: int) -> int:
        """Fails."""
        return 1 // x

    reg = ToolRegistry([add, boom])
    assert reg.call("add", '{"a": 2, "b": 3.0}').content == "5"  # integral float accepted
    assert [s["function"]["name"] for s in reg.schemas()] == ["add", "boom"]
    r = reg.call("nope", {})
    assert r.error == "unknown_tool" and "available tools: add, boom" in r.content
    r = reg.call("boom", {"x": 0})
    assert r.error == "exception" and "ZeroDivisionError" in r.content
    with pytest.raises(ValueError, match="already registered"):
        reg.register(add)
    # A schema-only tool (an OpenAI dict) validates but cannot run.
    reg.register({"type": "function", "function": {"name": "ext", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}})
    assert reg.validate("ext", {})[1] == "arguments: missing required argument(s) q"
    assert reg.validate("ext", {"q": "x", "extra": 1})[1] is None  # additionalProperties unset


def test_timeout_returns_an_error_without_waiting_for_the_tool():
    @tool(timeout=0.2)
    def slow() -> str:
        """Sleeps."""
        time.sleep(3)
        return "late"

    t0 = time.perf_counter()
    res = ToolRegistry([slow]).call("slow", {})
    assert time.perf_counter() - t0 < 1.5
    assert res.error == "timeout" and "0.2 s" in res.content


# ----------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize("expr, want", [
    ("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("7 // 2", 3), ("7 % 4", 3), ("2 ** 10", 1024),
    ("10 / 4", 2.5), ("sqrt(2) * sqrt(2)", 2.0), ("log(e)", 1.0), ("sin(pi / 2)", 1.0),
    ("-3 + +1", -2), ("2^8", 256)])
def test_calculator(expr, want):
    res = ToolRegistry([calculator]).call("calculator", {"expression": expr})
    assert res.ok, res.content
    assert math.isclose(float(res.content), want, rel_tol=1e-12)


@pytest.mark.parametrize("expr, needle", [
    ("__import__('os')", "not allowed"), ("2**10**10", "exponent too large"),
    ("(1).__class__", "Attribute is not allowed"), ("x + 1", "unknown name 'x'"),
    ("1/0", "division by zero"), ("[1][0]", "not allowed"), ("factorial(100000)", "too large"),
    ("'a' * 3", "not allowed"), ("(-8) ** 0.5", "complex"), ("9" * 9 + " ** 2000", "exponent too large")])
def test_calculator_refusals(expr, needle):
    t0 = time.perf_counter()
    res = ToolRegistry([calculator]).call("calculator", {"expression": expr})
    assert not res.ok and needle in res.content
    assert time.perf_counter() - t0 < 1.0


def test_current_time():
    reg = ToolRegistry([current_time])
    import datetime as dt
    res = reg.call("current_time", {"timezone": "Asia/Shanghai"})
    assert res.ok and "+08:00" in res.content
    stamp = dt.datetime.fromisoformat(res.content.split(" ")[0])
    assert abs((stamp - dt.datetime.now(dt.timezone.utc)).total_seconds()) < 60
    assert "+00:00" in reg.call("current_time", {}).content
    bad = reg.call("current_time", {"timezone": "Mars/Olympus"})
    assert not bad.ok and "unknown time zone" in bad.content


def test_file_reader_stays_inside_its_folder(tmp_path):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "a.txt").write_text("hello " * 10)
    (tmp_path / "secret.txt").write_text("top secret")
    os.symlink(tmp_path / "secret.txt", work / "link.txt")
    reg = ToolRegistry([file_reader(work, max_bytes=20)])
    res = reg.call("read_file", {"path": "sub/a.txt"})
    assert res.ok and res.content.startswith("hello hello hello he") and "offset=20" in res.content
    assert reg.call("read_file", {"path": "sub/a.txt", "offset": 50}).content == "llo hello "
    for bad in ("../secret.txt", "sub/../../secret.txt", "link.txt", str(tmp_path / "secret.txt")):
        r = reg.call("read_file", {"path": bad})
        assert not r.ok and "secret" not in r.content.replace(bad, ""), (bad, r.content)
    assert "not a file" in reg.call("read_file", {"path": "sub"}).content


def test_tokenize_english_and_chinese():
    assert tokenize("Hello, World! 你好世界 GPU4") == ["hello", "world", "你", "好", "世", "界", "gpu4"]
    assert tokenize("模型abc") == ["模", "型", "abc"]


def test_bm25_matches_a_hand_computation(tmp_path):
    docs = {"a.txt": "cat cat dog", "b.txt": "dog bird", "c.txt": "fish fish fish fish"}
    for name, text in docs.items():
        (tmp_path / name).write_text(text)
    search = document_search(tmp_path)
    k1, b, avg = 1.5, 0.75, (3 + 2 + 4) / 3

    def term(tf, n_docs_with, length):
        idf = math.log(1 + (3 - n_docs_with + 0.5) / (n_docs_with + 0.5))
        return idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / avg))

    want = [term(2, 1, 3) + term(1, 2, 3), term(1, 2, 2), 0.0]  # query "cat dog"
    got = BM25([tokenize(t) for t in docs.values()]).scores(["cat", "dog"])
    assert got == pytest.approx(want, rel=1e-12)
    hits = ToolRegistry([search]).call("search_documents", {"query": "cat dog", "top_k": 3}).value
    assert [h["file"] for h in hits] == ["a.txt", "b.txt"]  # zero scores are dropped
    assert hits[0]["score"] == pytest.approx(want[0], abs=1e-4) and hits[0]["snippet"] == "cat cat dog"


def test_builtin_tools_by_name(tmp_path):
    names = [t.name for t in builtin_tools("calculator,time,files,search", workdir=tmp_path,
                                           docs=tmp_path)]
    assert names == ["calculator", "current_time", "read_file", "search_documents"]
    with pytest.raises(ValueError, match="--workdir"):
        builtin_tools("files")
    with pytest.raises(ValueError, match="unknown built-in tool"):
        builtin_tools("web")


# ----------------------------------------------------------------------------- the agent loop


class Scripted:
    """A backend double: replies from a script (in order), records every prompt and stop list."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.prompts: list[str] = []
        self.stops: list[list[str]] = []

    def generate_stream(self, prompt_text, stop):
        self.prompts.append(prompt_text)
        self.stops.append(list(stop))
        text = self.replies.pop(0) if self.replies else "done"
        cut = min([i for i in (text.find(s) for s in stop) if i >= 0], default=len(text))
        text = text[:cut]
        for i in range(0, len(text), 5):  # small deltas: exercises the stream parser
            yield text[i:i + 5]


def plugin(name, params, pre=""):
    return f"{pre}{ACTION_START}{PLUGIN}\n{json.dumps({'name': name, 'parameters': params})}{ACTION_END}"


def code(src, pre=""):
    return f"{pre}{ACTION_START}{INTERPRETER}\n```python\n{src}\n```{ACTION_END}"


def test_tool_call_round_trip_and_event_order():
    backend = Scripted([plugin("add", {"a": 40, "b": 2}, pre="Let me add. "),
                        "The answer is 42." + IM_END])
    agent = Agent(backend, tools=[add], system="sys")
    events = list(agent.stream("What is 40+2?"))
    kinds = [e.kind for e in events]
    assert kinds[-1] == "final" and events[-1].text == "The answer is 42." and events[-1].step == 2
    first_action = kinds.index("action")
    assert set(kinds[:first_action]) == {"text"}
    assert "".join(e.text for e in events[:first_action]) == "Let me add. "
    assert kinds[first_action:first_action + 2] == ["action", "result"]
    act, res = events[first_action], events[first_action + 1]
    assert (act.name, act.arguments) == ("add", {"a": 40, "b": 2}) and res.text == "42"
    # The first prompt declares the tool in the official plugin system turn ...
    p0 = backend.prompts[0]
    assert p0.startswith("<s><|im_start|>system\nsys<|im_end|>\n<|im_start|>system name=<|plugin|>\n")
    assert '"name": "add"' in p0 and p0.endswith("<|im_start|>user\nWhat is 40+2?<|im_end|>\n"
                                                 "<|im_start|>assistant\n")
    assert backend.stops[0] == [IM_END, ACTION_END]
    # ... and the second holds the call and the environment turn with the result.
    assert backend.prompts[1].endswith(
        '<|im_start|>assistant\nLet me add. <|action_start|><|plugin|>\n{"name": "add", '
        '"parameters": {"a": 40, "b": 2}}<|action_end|><|im_end|>\n'
        "<|im_start|>environment name=<|plugin|>\n42<|im_end|>\n<|im_start|>assistant\n")
    result = Agent(Scripted([plugin("add", {"a": 1}), "ok"]), tools=[add]).run("q")
    assert result.answer == "ok" and result.reason == "answer" and result.steps == 2
    assert [m["role"] for m in result.messages] == ["system", "user", "assistant", "environment",
                                                    "assistant"]


@dataclass
class FakeResult:
    stdout: str = ""
    stderr: str = ""
    value: object = None
    error: str | None = None
    images: list = field(default_factory=list)
    timed_out: bool = False
    restarted: bool = False


class FakeInterpreter:
    """The Interpreter API over exec() in one namespace: state persists across cells."""

    def __init__(self, workdir):
        self.workdir = str(workdir)
        self.ns: dict = {}
        self.uploads: list = []
        self.closed = False

    def run(self, src):
        import contextlib
        import io
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                exec(src, self.ns)
            return FakeResult(stdout=buf.getvalue())
        except Exception as e:  # noqa: BLE001
            return FakeResult(stdout=buf.getvalue(), error=f"{type(e).__name__}: {e}")

    def upload(self, path_or_bytes, name):
        data = Path(path_or_bytes).read_bytes()
        (Path(self.workdir) / name).write_bytes(data)
        self.uploads.append(name)

    def close(self):
        self.closed = True


def test_interpreter_round_trip_keeps_state_and_uploads(tmp_path):
    interp = FakeInterpreter(tmp_path)
    backend = Scripted([code("x = 6 * 7"), code("print(x + 1)", pre="Now print. "),
                        code("print(undefined)"), "x+1 is 43"])
    agent = Agent(backend, interpreter=interp)
    data = tmp_path / "in" / "data.csv"
    data.parent.mkdir()
    data.write_text("a,b\n1,2\n")
    assert agent.upload(data) == "data.csv" and (tmp_path / "data.csv").exists()
    result = agent.chat("compute")
    results = [e for e in result.events if e.kind == "result"]
    assert [r.text for r in results[:2]] == ["[no output]", "43"]
    assert "NameError" in results[2].text and result.answer == "x+1 is 43"
    p0 = backend.prompts[0]
    assert "<|im_start|>system name=<|interpreter|>\n" in p0 and "<|plugin|>" not in p0
    assert '<|im_start|>user name=file\n[{"path": "data.csv", "size": "8B"}]<|im_end|>' in p0
    assert backend.prompts[2].endswith(
        "Now print. <|action_start|><|interpreter|>\n```python\nprint(x + 1)\n```<|action_end|>\n"
        "<|im_end|>\n<|im_start|>environment name=<|interpreter|>\n43<|im_end|>\n"
        "<|im_start|>assistant\n")
    # Multi-turn: the next chat() continues the same history.
    backend.replies = ["second answer"]
    assert agent.chat("again").answer == "second answer"
    assert backend.prompts[-1].count("<|im_start|>user\n") == 2


def test_interpreter_action_without_interpreter_is_reported():
    agent = Agent(Scripted([code("1+1"), "fine"]), tools=[add])
    ev = next(e for e in agent.stream("q") if e.kind == "result")
    assert ev.name == "interpreter" and "not enabled" in ev.text


def test_malformed_call_json_tells_the_model_and_continues():
    bad = f"{ACTION_START}{PLUGIN}\n{{\"name\": \"add\", \"parameters\": {{\"a\": 1,}}{ACTION_END}"
    backend = Scripted([bad, plugin("add", {"a": 1, "b": 1}), "2"])
    events = list(Agent(backend, tools=[add]).stream("q"))
    errors = [e for e in events if e.kind == "error"]
    assert len(errors) == 1 and "not valid JSON" in errors[0].text
    assert "<|im_start|>environment name=<|plugin|>\nYour action could not be run" in backend.prompts[1]
    assert events[-1].kind == "final" and events[-1].text == "2" and events[-1].step == 3


def test_invalid_arguments_go_back_to_the_model():
    backend = Scripted([plugin("add", {"a": "x"}), "sorry"])
    events = list(Agent(backend, tools=[add]).stream("q"))
    assert "a: expected integer, got str" in next(e for e in events if e.kind == "result").text
    assert "environment name=<|plugin|>\nError: invalid call to add" in backend.prompts[1]


def test_step_limit():
    backend = Scripted([plugin("add", {"a": i}) for i in range(10)])
    events = list(Agent(backend, tools=[add], max_steps=3).stream("loop forever"))
    assert len(backend.prompts) == 3
    assert events[-1].kind == "final" and events[-1].reason == "max_steps"
    assert "step limit (3)" in events[-1].text
    with pytest.raises(ValueError, match="max_steps"):
        Agent(backend, max_steps=0)


def test_tool_call_validity_on_a_scripted_backend():
    tools = [add.schema]
    prompts = [{"messages": [{"role": "user", "content": "q"}], "tools": tools,
                "expected": {"name": "add", "arguments": {"a": 1}}} for _ in range(4)]
    backend = Scripted([plugin("add", {"a": 1}), plugin("add", {"a": "x"}),
                        plugin("sub", {"a": 1}), "no call"])
    got = tool_call_validity(backend, None, prompts)
    assert got["prompts"] == 4 and got["valid"] == 0.25 and got["right_tool"] == 1.0
    assert got["arguments"] == 0.25  # eval.tasks.score_tool_call: right name and a == 1


# ----------------------------------------------------------------------------- ReAct


def test_parse_react():
    assert parse_react("Thought: hm\nAction: add\nAction Input: {\"a\": 1}\n") == \
        ("action", ("add", '{"a": 1}'))
    assert parse_react("Thought: done\nFinal Answer: 42") == ("final", "42")
    assert parse_react("just text") == ("none", "just text")


def test_react_round_trip_with_plain_input_and_python(tmp_path):
    backend = Scripted([
        "Thought: I should compute.\nAction: calculator\nAction Input: 6 * 7\nObservation: fake",
        'Thought: and in python\nAction: python\nAction Input: ```python\nprint(y := 5)\n```\n',
        "Thought: I know.\nFinal Answer: 42"])
    agent = ReActAgent(backend, tools=[calculator], interpreter=FakeInterpreter(tmp_path))
    events = list(agent.stream("What is 6*7?"))
    acts = [e for e in events if e.kind == "action"]
    assert acts[0].arguments == {"expression": "6 * 7"} and acts[1].code.startswith("```python")
    assert [e.text for e in events if e.kind == "result"] == ["42", "5"]
    assert events[-1].kind == "final" and events[-1].text == "42"
    assert "Action: the tool to use, one of [calculator, python]" in backend.prompts[0]
    assert backend.stops[0] == ["Observation:", IM_END]
    # The observation is appended to the same assistant turn; the fake one the model wrote is not.
    assert backend.prompts[1].endswith("Action Input: 6 * 7\nObservation: 42\n")
    assert "fake" not in backend.prompts[1]


# ----------------------------------------------------------------------------- real model, CLI


def test_real_tiny_model_runs_the_loop(one_thread):
    from internlm2.config import ModelConfig
    from internlm2.generate import GenerationConfig
    from internlm2.model import build_model
    from internlm2.tokenizer import train_tokenizer
    tok = train_tokenizer(["The calculator adds numbers.\n你好, 1 + 1 = 2.\n"] * 20, vocab_size=384)
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = build_model(cfg, seed=0).eval()
    agent = Agent(model, tok, tools=[calculator], max_steps=2,
                  config=GenerationConfig(max_new_tokens=8, temperature=0.0))
    result = agent.run("what is 1+1?")
    assert result.reason in ("answer", "max_steps") and 1 <= result.steps <= 2
    assert result.messages[-1]["role"] in ("assistant", "environment")
    react = ReActAgent(model, tok, tools=[calculator], max_steps=1,
                       config=GenerationConfig(max_new_tokens=6, temperature=0.0))
    assert react.run("what is 1+1?").reason in ("answer", "max_steps")


def test_real_interpreter_if_available(tmp_path):
    mod = pytest.importorskip("internlm2.agent.interpreter",
                              reason="internlm2.agent.interpreter is not written yet")
    backend = Scripted([code("z = 20"), code("print(z + 1)"), "21"])
    with mod.Interpreter(workdir=tmp_path, timeout=20) as interp:
        events = list(Agent(backend, interpreter=interp).stream("q"))
    assert [e.text for e in events if e.kind == "result"][1].strip() == "21"
    assert events[-1].text == "21"


def test_cli_once_with_a_scripted_backend(capsys):
    from internlm2.agent import cli
    from internlm2.cli import build_parser
    args = build_parser().parse_args(["agent", "--model", "unused", "--tools", "calculator",
                                      "--once", "what is 2+2?", "--max-steps", "3"])
    assert args.func is cli.main
    backend = Scripted([plugin("calculator", {"expression": "2+2"}, pre="Thinking. "),
                        "It is 4."])
    assert cli.main(args, model=backend) == 0
    out = capsys.readouterr().out
    assert "Thinking. " in out and "[call calculator] {'expression': '2+2'}" in out
    assert "[calculator result]\n4\n" in out and out.rstrip().endswith("It is 4.")
    assert "<|im_start|>user\nwhat is 2+2?" in backend.prompts[0]


def test_model_backend_turns_special_stops_into_ids(monkeypatch):
    import internlm2.generate as gen
    from internlm2.agent.loop import ModelBackend
    seen = {}

    class Tok:
        eos_id = 2
        special = {IM_END: 7, ACTION_END: 9}

        def token_to_id(self, s):
            return self.special.get(s)

        def encode(self, text, add_bos=True):
            seen["add_bos"] = add_bos
            return [1, 5]

    class Model:
        training = True

        def eval(self):
            self.training = False
            return self

        def train(self, mode=True):
            self.training = mode

    def fake_stream_text(model, tok, ids, cfg):
        seen.update(ids=ids, stop_ids=cfg.stop_ids, stop_strings=cfg.stop_strings,
                    training=model.training)
        yield "hi"

    monkeypatch.setattr(gen, "stream_text", fake_stream_text)
    model = Model()
    backend = ModelBackend(model, Tok(), temperature=0.0)
    assert list(backend.generate_stream("<s>x", [IM_END, ACTION_END, "Observation:"])) == ["hi"]
    assert seen == {"add_bos": False, "ids": [1, 5], "stop_ids": (7, 9, 2),
                    "stop_strings": ("Observation:",), "training": False}
    assert model.training is True  # restored
