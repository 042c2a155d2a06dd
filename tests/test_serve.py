"""The OpenAI-compatible server over HTTP with the official `openai` client: a real uvicorn on
127.0.0.1 serving a tiny random model through the real Engine, plus a scripted engine double
(real tool-call text, token by token) behind the same server code for the tool-call paths."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai", reason="the openai client is needed for the server tests")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is needed for the server tests")

from internlm2.config import ModelConfig  # noqa: E402
from internlm2.engine import AsyncEngine, Engine, RequestOutput  # noqa: E402
from internlm2.hf import save_model  # noqa: E402
from internlm2.model import build_model  # noqa: E402
from internlm2.serve.app import create_app  # noqa: E402
from internlm2.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny-chat"
KEY = "sk-test-key"
TEXT = ("The quick brown fox jumps over the lazy dog. " * 20
        + "What is the weather in Paris today? It is sunny and warm. " * 10
        + '{"name": "get_weather", "parameters": {"city": "Paris"}} ' * 10
        + "def add(a, b):\n    return a + b\n" * 10)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CALL = '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}<|action_end|><|im_end|>'


def build_model_dir(root):
    """A tiny random InternLM2 checkpoint with a small trained tokenizer (a few seconds)."""
    tok = train_tokenizer([TEXT], vocab_size=512, output_dir=root / "tok")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      initializer_range=0.2)
    save_model(build_model(cfg, seed=0), root / "m", tokenizer=tok)
    return root / "m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn on 127.0.0.1 in a daemon thread; `url` once it accepts connections."""

    def __init__(self, app):
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class ScriptedEngine:
    """AsyncEngine double: answers every request with `script`, token by token, honouring the
    request's stop token ids and max_tokens like the real engine; records the prompts."""

    def __init__(self, engine: Engine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer
        self.script = CALL
        self.delay = 0.0  # seconds per token, for UIs that must see a reply in progress
        self.fail_after: int | None = None  # raise after this many tokens (engine failure)
        self.prompts: list[list[int]] = []

    async def generate(self, prompt_ids, params, request_id=None):
        self.prompts.append(list(prompt_ids))
        stops = set(params.stop_token_ids if params.stop_token_ids is not None
                    else self.engine.eos_token_ids)
        ids, text, n = [], "", len(prompt_ids)

        def out(new, delta, reason):
            return RequestOutput(request_id, n, new, delta, list(ids), text, None,
                                 reason is not None, reason)

        for t in self.tokenizer.encode(self.script, add_bos=False):
            await asyncio.sleep(self.delay)
            if t in stops:
                yield out([], "", "stop")
                return
            if self.fail_after is not None and len(ids) >= self.fail_after:
                raise RuntimeError("engine exploded")
            ids.append(t)
            full = self.tokenizer.decode(ids)
            delta, text = full[len(text):], full
            done = len(ids) >= params.max_tokens
            yield out([t], delta, "length" if done else None)
            if done:
                return
        yield out([], "", "stop")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def stack(model_dir):
    """(engine, server) with the real engine, and (double, server) for the scripted one."""
    from internlm2.hf import load_model
    tok = load_tokenizer(model_dir)
    engine = Engine(load_model(model_dir).eval(), tok, block_size=16, num_blocks=160,
                    max_batch_size=32, session_len=256)
    aengine = AsyncEngine(engine)
    aengine.start()
    real = ServerThread(create_app(aengine, tok, model_name=MODEL, max_tokens_limit=200))
    double = ScriptedEngine(engine, tok)
    scripted = ServerThread(create_app(double, tok, model_name=MODEL, api_keys=[KEY, "other"],
                                       cors_origins=["http://example.com"],
                                       max_request_bytes=20_000))
    yield {"engine": engine, "tok": tok, "url": real.url, "double": double,
           "scripted_url": scripted.url}
    real.stop()
    scripted.stop()
    aengine.shutdown()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tool_client(stack):
    return openai.OpenAI(base_url=stack["scripted_url"] + "/v1", api_key=KEY, max_retries=0)


def chat(client, content="Hello there", **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kw)


# -- plain generation -----------------------------------------------------------------------

def test_models_health_and_tokenize(client, stack):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    h = httpx.get(stack["url"] + "/health").json()
    assert h["status"] == "ok" and h["features"]["interpreter"] is False and h["session_len"] == 256
    r = httpx.post(stack["url"] + "/v1/tokenize", json={"prompt": "The quick brown fox"}).json()
    assert r["tokens"] == stack["tok"].encode("The quick brown fox") and r["count"] == len(r["tokens"])


def test_chat_stream_equals_non_stream_with_usage(client):
    full = chat(client, extra_body={"ignore_eos": True})
    msg = full.choices[0]
    assert msg.finish_reason == "length" and msg.message.role == "assistant"
    u = full.usage
    assert u.completion_tokens == 12 and u.total_tokens == u.prompt_tokens + 12
    assert u.prompt_tokens_details.cached_tokens >= 0
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True},
                       extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.message.content and text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 12
    # the same prompt again is served from the prefix cache (prompt >= one block of 16)
    if u.prompt_tokens > 16:
        again = chat(client, extra_body={"ignore_eos": True})
        assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_completions_stop_string_spanning_tokens(client, stack):
    tok = stack["tok"]
    base = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=16,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    ids = base.usage.completion_tokens
    assert ids == 16 and text
    gen = tok.encode(text, add_bos=False)
    # a stop string made of the 3rd-5th generated tokens' text (multi-token)
    stop = tok.decode(gen[2:5])
    assert len(tok.encode(stop, add_bos=False)) >= 2
    cut = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=16,
                                    temperature=0, stop=[stop, "zzzz-never"],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.find(stop)]
    # echo puts the prompt text first
    echo = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=4,
                                     temperature=0, echo=True)
    assert echo.choices[0].text.startswith("The quick brown")


def test_n_choices_with_seed(client):
    r = chat(client, n=3, temperature=1.0, seed=7, max_tokens=10, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 30
    single = chat(client, temperature=1.0, seed=7, max_tokens=10, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == single.choices[0].message.content  # same seed
    assert len({c.message.content for c in r.choices}) > 1  # seed + i per choice
    s = list(chat(client, n=2, stream=True, temperature=0, max_tokens=6))
    per = {0: "", 1: ""}
    for c in s:
        for ch in c.choices:
            per[ch.index] += ch.delta.content or ""
    assert per[0] == per[1]  # greedy: both choices alike


def test_logprobs_chat_and_completions(client):
    r = chat(client, logprobs=True, top_logprobs=3, max_tokens=5, extra_body={"ignore_eos": True})
    items = r.choices[0].logprobs.content
    assert len(items) == 5
    for it in items:
        assert it.logprob <= 0 and len(it.top_logprobs) == 3
        assert it.top_logprobs[0].token == it.token  # greedy picks the best
        assert abs(it.top_logprobs[0].logprob - it.logprob) < 1e-4
    assert "".join(it.token for it in items) == r.choices[0].message.content
    c = client.completions.create(model=MODEL, prompt="The quick", max_tokens=4, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.top_logprobs[0]) <= 2 and lp.text_offset[0] == 0


def test_embeddings(client):
    e = client.embeddings.create(model=MODEL, input=["The quick brown fox", "def add(a, b):"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 64
    assert e.data[0].embedding != e.data[1].embedding and e.usage.prompt_tokens > 4


# -- tools (scripted engine double, real server code) --------------------------------------

def test_tool_call_non_stream_and_prompt(tool_client, stack):
    double, tok = stack["double"], stack["tok"]
    double.script = "Let me check." + CALL
    r = tool_client.chat.completions.create(
        model=MODEL, tools=TOOLS, messages=[{"role": "user", "content": "Weather in Paris?"}])
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content == "Let me check."
    (call,) = ch.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    prompt = tok.decode(double.prompts[-1])
    assert "<|im_start|>system name=<|plugin|>\n" in prompt and "get_weather" in prompt
    # the call and its result go back into the next prompt as an action block + environment
    follow = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
              {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    double.script = "It is sunny.<|im_end|>"
    r2 = tool_client.chat.completions.create(model=MODEL, tools=TOOLS, messages=follow)
    assert r2.choices[0].message.content == "It is sunny." and r2.choices[0].finish_reason == "stop"
    prompt = tok.decode(double.prompts[-1])
    assert ('<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
            '<|action_end|>') in prompt
    assert "<|im_start|>environment name=<|plugin|>\nsunny, 21 C<|im_end|>" in prompt


def test_tool_choice_none_required_and_named(tool_client, stack):
    double, tok = stack["double"], stack["tok"]
    msgs = [{"role": "user", "content": "Weather?"}]
    double.script = "No tools here.<|im_end|>"
    r = tool_client.chat.completions.create(model=MODEL, tools=TOOLS, tool_choice="none",
                                            messages=msgs)
    assert r.choices[0].message.content == "No tools here."
    assert "<|plugin|>" not in tok.decode(double.prompts[-1])
    # named: the prompt already holds the call's opening; the model writes the arguments
    double.script = '{"city": "Rome"}}<|action_end|>'
    r = tool_client.chat.completions.create(
        model=MODEL, tools=TOOLS, messages=msgs,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert tok.decode(double.prompts[-1]).endswith(
        '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": ')
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}
    double.script = '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|action_end|>'
    r = tool_client.chat.completions.create(model=MODEL, tools=TOOLS, messages=msgs,
                                            tool_choice="required")
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}


def test_tool_call_streaming_name_first_then_arguments(tool_client, stack):
    stack["double"].script = "Checking." + CALL
    chunks = list(tool_client.chat.completions.create(
        model=MODEL, tools=TOOLS, stream=True, messages=[{"role": "user", "content": "Paris?"}]))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Checking."
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == ""
    args = "".join(tc.function.arguments or "" for tc in calls[1:])
    assert all(tc.id is None for tc in calls[1:]) and json.loads(args) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_tool_json_is_plain_content(tool_client, stack, stream):
    bad = '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": Paris}<|action_end|><|im_end|>'
    stack["double"].script = bad
    kw = dict(model=MODEL, tools=TOOLS, messages=[{"role": "user", "content": "Paris?"}])
    if not stream:
        ch = tool_client.chat.completions.create(**kw).choices[0]
        assert not ch.message.tool_calls and ch.finish_reason == "stop"
        assert '{"city": Paris}' in ch.message.content
        return
    chunks = list(tool_client.chat.completions.create(stream=True, **kw))
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert '{"city": Paris}' in text and chunks[-1].choices[0].finish_reason == "stop"


# -- errors, auth, limits -------------------------------------------------------------------

def test_engine_failure_mid_stream_is_an_error_event(stack):
    double = stack["double"]
    double.script, double.fail_after = "Some words that go on" + CALL, 2
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        e = _err(httpx.post(stack["scripted_url"] + "/v1/chat/completions", json=body,
                            headers=auth), 500, "engine exploded")
        assert e["type"] == "server_error"
        r = httpx.post(stack["scripted_url"] + "/v1/chat/completions",
                       json={**body, "stream": True}, headers=auth)
        events = [x[6:] for x in r.text.split("\n\n") if x.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        assert "engine exploded" in json.loads(events[-2])["error"]["message"]
    finally:
        double.fail_after = None


def _err(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    for w in words:
        assert w in e["message"], e["message"]
    return e


def test_errors_in_openai_shape(stack):
    url = stack["url"] + "/v1/chat/completions"
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    _err(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}),
         400, "JSON")
    _err(httpx.post(url, json={**ok, "model": "gpt-9"}), 404, "gpt-9", MODEL)
    e = _err(httpx.post(url, json={**ok, "messages": [{"role": "wizard", "content": "x"}]}),
             400, "wizard")
    assert e["param"] == "messages[0].role"
    e = _err(httpx.post(url, json={**ok, "temperature": 5}), 400, "temperature")
    assert e["param"] == "temperature"
    _err(httpx.post(url, json={**ok, "max_tokens": 500}), 400, "500", "200")
    long = {**ok, "messages": [{"role": "user", "content": "fox " * 150}], "max_tokens": 150}
    _err(httpx.post(url, json=long), 400, "150", "256")
    _err(httpx.post(url, json={**ok, "tool_choice": "required"}), 400, "tools")
    _err(httpx.post(stack["url"] + "/v1/nothing", json={}), 404)
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=stack["url"] + "/v1", api_key="x", max_retries=0) \
            .chat.completions.create(model=MODEL, messages=[], max_tokens=2)


def test_api_keys_cors_and_body_limit(stack):
    url = stack["scripted_url"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    _err(httpx.post(url + "/v1/chat/completions", json=body), 401, "API key")
    _err(httpx.post(url + "/v1/chat/completions", json=body,
                    headers={"Authorization": "Bearer wrong"}), 401, "invalid")
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer other"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()
    assert httpx.get(url + "/health").json()["auth"] is True  # open, so the page can ask for a key
    pre = httpx.options(url + "/v1/chat/completions", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "http://example.com"
    big = {**body, "messages": [{"role": "user", "content": "x" * 30_000}]}
    auth = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    _err(httpx.post(url + "/v1/chat/completions", json=big, headers=auth), 413, "20000")
    chunked = (json.dumps(big)[k:k + 4096].encode() for k in range(0, 31_000, 4096))
    _err(httpx.post(url + "/v1/chat/completions", content=chunked, headers=auth), 413, "20000")


# -- concurrency and cancellation -----------------------------------------------------------

PROMPTS = ["The quick brown fox", "What is the weather", "def add(a, b):", "It is sunny",
           "jumps over the lazy", "Paris today?", "return a + b", "brown dog"]


def test_32_concurrent_streams_match_sequential_greedy(client, stack):
    kw = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
    ref = {p: chat(client, p, **kw).choices[0].message.content for p in PROMPTS}
    aclient = openai.AsyncOpenAI(base_url=stack["url"] + "/v1", api_key="x", max_retries=0)

    async def one(p: str) -> tuple[str, str]:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], stream=True, **kw)
        text = ""
        async for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
        return p, text

    async def main():
        try:
            return await asyncio.gather(*[one(PROMPTS[i % len(PROMPTS)]) for i in range(32)])
        finally:
            await aclient.close()

    got = asyncio.run(main())
    assert len(got) == 32 and all(text == ref[p] for p, text in got)


def test_client_disconnect_frees_kv_blocks(stack):
    engine = stack["engine"]
    start = engine.num_free_blocks
    body = {"model": MODEL, "messages": [{"role": "user", "content": "The quick brown fox"}],
            "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: ") for x in got)
        assert engine.num_running == 1 and engine.num_free_blocks < start
    deadline = time.time() + 10
    while time.time() < deadline and (engine.num_running or engine.num_free_blocks != start):
        time.sleep(0.05)
    assert engine.num_running == 0 and engine.num_free_blocks == start


# -- Python API -----------------------------------------------------------------------------

def test_pipeline(model_dir):
    import internlm2
    with internlm2.pipeline(model_dir, num_blocks=64, session_len=128) as pipe:
        one = pipe("The quick brown", {"max_new_tokens": 8, "ignore_eos": True})
        assert one.finish_reason == "length" and len(one.token_ids) == 8 and one.prompt_tokens > 1
        batch = pipe(["The quick brown", [{"role": "user", "content": "Hi"}]],
                     gen_config={"max_new_tokens": 8, "ignore_eos": True})
        assert batch[0].text == one.text and batch[1].index == 1
        deltas = list(pipe.stream([{"role": "user", "content": "Hi"}],
                                  {"max_new_tokens": 8, "ignore_eos": True}))
        assert "".join(d.text for d in deltas) == batch[1].text
        assert deltas[-1].finish_reason == "length"
        with pytest.raises(ValueError, match="gen_config.bogus"):
            pipe("x", {"bogus": 1})
    with pytest.raises(RuntimeError, match="closed"):
        pipe("x")


@pytest.mark.slow
def test_serve_command_end_to_end(model_dir):
    """`internlm2 serve` as a user runs it: a subprocess, an API key, one chat, then SIGTERM."""
    import subprocess
    import sys
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "internlm2", "serve", "--model", str(model_dir), "--port",
         str(port), "--api-keys", "k1,k2", "--model-name", "cli-model", "--num-blocks", "32",
         "--session-len", "128", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k2", max_retries=0)
        r = c.chat.completions.create(model="cli-model", max_tokens=3,
                                      messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens <= 3 and r.choices[0].message.role == "assistant"
        assert httpx.get(url + "/").text.startswith("<!doctype html>")
        assert httpx.get(url + "/static/chat.js").status_code == 200
    finally:
        proc.terminate()
        proc.wait(20)
