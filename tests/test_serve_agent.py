"""The agent endpoint (/v1/agent/chat) over HTTP: a real uvicorn on 127.0.0.1, the real server
code, the REAL sandboxed Interpreter, and a scripted engine double that writes official
interpreter action blocks token by token (as tests/test_serve.py scripts tool calls). Plus
`EngineBackend` on the real AsyncEngine with a tiny model, and the web chat in Chromium."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("uvicorn", reason="uvicorn is needed for the server tests")
pytest.importorskip("matplotlib", reason="the interpreter figure test needs matplotlib")

from test_serve import KEY, MODEL, ScriptedEngine, ServerThread, build_model_dir

from internlm2.agent.backends import EngineBackend
from internlm2.engine import AsyncEngine, Engine, SamplingParams
from internlm2.hf import load_model
from internlm2.serve.agent_routes import AgentSettings
from internlm2.serve.app import create_app
from internlm2.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"
AUTH = {"Authorization": f"Bearer {KEY}"}
CODE = "import matplotlib.pyplot as plt\nx = 6 * 7\nprint('hello', x)\nplt.plot([1, 3, 2])\nx"
ACTION = f"Let me compute.<|action_start|><|interpreter|>\n```python\n{CODE}\n```<|action_end|>"
FINAL = "The answer is 42.<|im_end|>"


class AgentScript(ScriptedEngine):
    """Plays `scripts` in order, one per engine request (then FINAL); notes requests that were
    closed before their end (the abort path)."""

    def __init__(self, engine, tokenizer):
        super().__init__(engine, tokenizer)
        self.scripts: list[str] = []
        self.closed_early = 0

    async def generate(self, prompt_ids, params, request_id=None):
        self.script = self.scripts.pop(0) if self.scripts else FINAL
        done = False
        try:
            async for out in super().generate(prompt_ids, params, request_id):
                done = out.finished
                yield out
        finally:
            self.closed_early += not done


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    model_dir = build_model_dir(tmp_path_factory.mktemp("agent"))
    tok = load_tokenizer(model_dir)
    engine = Engine(load_model(model_dir).eval(), tok, block_size=16, num_blocks=64,
                    max_batch_size=4, session_len=256)
    aengine = AsyncEngine(engine)
    aengine.start()
    double = AgentScript(engine, tok)
    app = create_app(double, tok, model_name=MODEL, api_keys=[KEY, "other"],
                     session_len=8192,
                     agent=AgentSettings(tools=("calculator",), interpreter_timeout_s=20,
                                         max_sessions=5))
    agent_srv = ServerThread(app)
    plain = ServerThread(create_app(aengine, tok, model_name=MODEL))
    yield {"tok": tok, "engine": engine, "aengine": aengine, "double": double,
           "url": agent_srv.url, "plain_url": plain.url, "store": app.state.agent_sessions}
    agent_srv.stop()
    plain.stop()
    app.state.agent_sessions.close_all_sync()
    aengine.shutdown()


def events(url: str, body: dict, headers=AUTH, stop_after=None) -> list[dict]:
    """The SSE events of one agent request (the JSON objects, then "[DONE]")."""
    out = []
    with httpx.stream("POST", url + "/v1/agent/chat", json=body, headers=headers,
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
            if stop_after is not None and stop_after(out[-1]):
                break
    return out


def of(evs, kind):
    return [e for e in evs if isinstance(e, dict) and e["type"] == kind]


def test_interpreter_turns_keep_state_and_serve_figures(stack):
    url, double, tok = stack["url"], stack["double"], stack["tok"]
    double.scripts = [ACTION, FINAL]
    evs = events(url, {"messages": [{"role": "user", "content": "what is 6 * 7? plot it"}],
                       "temperature": 0})
    assert evs[-1] == "[DONE]" and evs[0]["type"] == "session"
    sid = evs[0]["session_id"]
    assert "".join(e["text"] for e in of(evs, "text") if e["step"] == 1) == "Let me compute."
    (action,) = of(evs, "action")
    assert action["name"] == "interpreter" and action["code"].strip() == CODE
    (result,) = of(evs, "result")
    assert result["stdout"] == "hello 42\n" and result["value"] == "42" and result["error"] is None
    (img,) = result["images"]
    assert img["url"].startswith("data:image/png;base64,")
    assert base64.b64decode(img["url"].split(",", 1)[1])[:8] == PNG
    (final,) = of(evs, "final")
    assert final == {"type": "final", "step": 2, "text": "The answer is 42.", "reason": "answer"}
    # the second step saw the real interpreter's output as an environment turn
    second = tok.decode(double.prompts[-1])
    assert "<|im_start|>environment name=<|interpreter|>\nhello 42\n42" in second
    # the figure is also served from the session's folder, to its owner only
    got = httpx.get(url + img["path"], headers=AUTH)
    assert got.status_code == 200 and got.content[:8] == PNG
    assert got.headers["x-content-type-options"] == "nosniff"
    other = httpx.get(url + img["path"], headers={"Authorization": "Bearer other"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "session_not_found"
    sneaky = httpx.get(f"{url}/v1/agent/files/{sid}/..%2F..%2Fetc%2Fpasswd", headers=AUTH)
    assert sneaky.status_code == 404
    # the next turn of the same chat runs in the same interpreter: x is still there
    double.scripts = ["<|action_start|><|interpreter|>\n```python\nx + 1\n```<|action_end|>",
                      "43.<|im_end|>"]
    evs2 = events(url, {"session_id": sid, "messages": [
        {"role": "user", "content": "what is 6 * 7? plot it"},
        {"role": "assistant", "content": "The answer is 42."},
        {"role": "user", "content": "and plus one?"}]})
    assert evs2[0]["session_id"] == sid
    assert of(evs2, "result")[0]["value"] == "43" and of(evs2, "final")[0]["text"] == "43."
    # another key cannot use this session
    r = httpx.post(url + "/v1/agent/chat", headers={"Authorization": "Bearer other"},
                   json={"session_id": sid, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404


def test_tools_errors_auth_and_disabled(stack):
    url, double = stack["url"], stack["double"]
    call = ('<|action_start|><|plugin|>\n{"name": "calculator", "parameters": '
            '{"expression": "2**10"}}<|action_end|>')
    double.scripts = [call, "1024<|im_end|>"]
    evs = events(url, {"interpreter": False, "tools": ["calculator"],
                       "messages": [{"role": "user", "content": "2^10?"}]})
    (action,) = of(evs, "action")
    assert action["name"] == "calculator" and action["arguments"] == {"expression": "2**10"}
    assert "1024" in of(evs, "result")[0]["text"] and of(evs, "final")[0]["text"] == "1024"
    # no interpreter in this request: code is refused, not run
    double.scripts = ["<|action_start|><|interpreter|>\n```python\nprint(1)\n```<|action_end|>"]
    evs = events(url, {"interpreter": False, "messages": [{"role": "user", "content": "hi"}]})
    assert "not enabled" in of(evs, "result")[0]["text"]
    # request errors come in OpenAI's error shape, before any stream
    r = httpx.post(url + "/v1/agent/chat", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for body, param in [({"messages": [{"role": "user", "content": "x"}], "tools": ["time"]},
                         "tools"),
                        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
                        ({"messages": [{"role": "user", "content": "x"}], "session_id": "../x"},
                         "session_id")]:
        r = httpx.post(url + "/v1/agent/chat", json=body, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(stack["plain_url"] + "/v1/agent/chat",
                   json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert httpx.get(stack["plain_url"] + "/health").json()["features"]["interpreter"] is False
    assert httpx.get(url + "/health").json()["features"]["interpreter"] is True


def test_disconnect_stops_the_loop_and_frees_the_session(stack):
    url, double, store = stack["url"], stack["double"], stack["store"]
    double.scripts, double.delay = ["word " * 400 + "<|im_end|>"], 0.02
    before = double.closed_early
    try:
        evs = events(url, {"messages": [{"role": "user", "content": "talk"}]},
                     stop_after=lambda e: isinstance(e, dict) and e["type"] == "text")
        sid = evs[0]["session_id"]
        deadline = time.time() + 5
        while (double.closed_early == before or store.sessions[sid].in_use()) \
                and time.time() < deadline:
            time.sleep(0.05)
        assert double.closed_early == before + 1  # the engine request was aborted
        assert not store.sessions[sid].in_use()
        # one request at a time per session
        double.scripts = ["word " * 400 + "<|im_end|>"]
        seen, release = threading.Event(), threading.Event()

        def streaming(e) -> bool:  # hold the stream open until the second request is answered
            if isinstance(e, dict) and e["type"] == "text":
                seen.set()
                return release.wait(10)
            return False

        t = threading.Thread(target=events, args=(url, {
            "session_id": sid, "messages": [{"role": "user", "content": "a"}]}),
            kwargs={"stop_after": streaming})
        t.start()
        assert seen.wait(10)
        r = httpx.post(url + "/v1/agent/chat", headers=AUTH,
                       json={"session_id": sid, "messages": [{"role": "user", "content": "b"}]})
        release.set()
        t.join(10)
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_busy"
    finally:
        double.delay = 0.0


def test_engine_backend_on_the_real_engine(stack):
    """EngineBackend from a worker thread against the real AsyncEngine: greedy text equals the
    engine's own answer, special-token stops become stop ids, closing early aborts."""
    tok, aengine, engine = stack["tok"], stack["aengine"], stack["engine"]
    loop = asyncio.new_event_loop()
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    try:
        prompt = "<s><|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
        params = SamplingParams(max_tokens=12, temperature=0.0)
        backend = EngineBackend(aengine, tok, loop, params, session_len=256)
        got = "".join(backend.generate_stream(prompt, ["<|im_end|>", "<|action_end|>"]))
        ids = tok.encode(prompt, add_bos=False)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # "<s>" is the BOS
        p = backend._params(len(ids), ["<|im_end|>", "<|action_end|>"])
        assert tok.token_to_id("<|action_end|>") in p.stop_token_ids and p.stop == ()

        async def direct():
            text = ""
            async for out in aengine.generate(ids, p):
                text = out.text
            return text

        assert got == asyncio.run_coroutine_threadsafe(direct(), loop).result(30)
        assert backend.last_finish_reason in ("stop", "length")
        # closing the generator early aborts the engine request
        long = EngineBackend(aengine, tok, loop, SamplingParams(max_tokens=200), session_len=256)
        gen = long.generate_stream(prompt, [])
        next(gen)
        gen.close()
        deadline = time.time() + 5
        while (engine.num_running or engine.num_waiting) and time.time() < deadline:
            time.sleep(0.02)
        assert engine.num_running == 0 and engine.num_waiting == 0
        assert long.last_finish_reason is None  # it never finished
        with pytest.raises(ValueError, match="session length"):
            next(EngineBackend(aengine, tok, loop, session_len=4).generate_stream(prompt, []))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        th.join(5)


# ------------------------------------------------------------------ the web chat in Chromium

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("INTERNLM2_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parents[1] / "test-artifacts")


def test_webchat_runs_the_interpreter(stack):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"the browser check needs Chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright")
    from test_webchat import ARGS
    url, double = stack["url"], stack["double"]
    double.scripts = [ACTION, "The answer is **42**.<|im_end|>"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 1300})
        page.add_init_script(f"localStorage.setItem('internlm2.apiKey', {KEY!r})")
        page.goto(url + "/")
        page.click("#settings-toggle")
        page.wait_for_selector("#interpreter-row:not([hidden])")
        page.check("#interpreter")
        page.fill("#input", "what is 6 * 7? plot it")
        page.press("#input", "Enter")
        page.wait_for_function("document.body.dataset.state === 'idle' && "
                               "document.querySelector('.msg.assistant .agent-final')",
                               timeout=30_000)
        code = page.text_content(".msg.assistant details.tool.code-action pre")
        assert "x = 6 * 7" in code
        assert "hello 42" in page.text_content(".msg.assistant .agent-result pre")
        src = page.get_attribute(".msg.assistant .agent-result img", "src")
        assert src.startswith("data:image/png;base64,")
        page.wait_for_function("document.querySelector('.msg.assistant .agent-result img')"
                               ".naturalWidth > 0")
        assert page.inner_text(".msg.assistant .agent-final strong") == "42"
        hist = page.evaluate("window.internlm2Chat.state.history")
        assert hist[-1] == {"role": "assistant", "content": "The answer is **42**."}
        sid = page.evaluate("window.internlm2Chat.state.agentSession")
        assert sid in stack["store"].sessions
        page.click("#settings-toggle")  # closed, so the screenshot shows the conversation
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "webchat-interpreter.png"), full_page=True)
        # the stop button ends a running agent turn (and its engine request)
        before = double.closed_early
        double.scripts, double.delay = ["word " * 400 + "<|im_end|>"], 0.02
        try:
            page.fill("#input", "talk")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2 &&"
                                   "document.querySelector('.msg.assistant:last-child .agent-text')",
                                   timeout=15_000)
            page.click("#stop")
            page.wait_for_function("document.body.dataset.state === 'idle'", timeout=5_000)
            assert "Stopped" in page.inner_text("#status")
            deadline = time.time() + 5
            while double.closed_early == before and time.time() < deadline:
                time.sleep(0.05)
            assert double.closed_early == before + 1
        finally:
            double.delay = 0.0
        browser.close()


def test_session_store_cap_idle_reap_and_close():
    """The cap answers 429 in OpenAI's shape; idle sessions are closed (their interpreter and
    folder with them); close_all stops the rest (server shutdown)."""
    from internlm2.serve.agent_routes import SessionStore
    from internlm2.serve.protocol import APIError

    async def scenario():
        store = SessionStore(AgentSettings(max_sessions=1, idle_timeout_s=0.2))
        s = await store.acquire(None, "owner")
        workdir = s.interpreter.workdir
        assert os.path.isdir(workdir)
        store.release(s)
        with pytest.raises(APIError) as e:
            await store.acquire(None, "owner")
        assert e.value.status == 429 and e.value.body()["error"]["code"] == "too_many_sessions"
        await asyncio.sleep(0.3)
        fresh = await store.acquire(None, "owner")  # the idle one was reaped to make room
        assert s.id not in store.sessions and not os.path.isdir(workdir)
        store.release(fresh)
        await store.close_all()
        assert not store.sessions
        with pytest.raises(RuntimeError, match="closed"):
            fresh.interpreter.run("1")

    asyncio.run(scenario())
