"""The web chat page in headless Chromium: streaming replies, stop, markdown safety, tool
blocks, the API key field, and the layout at phone width (375 px)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"web chat tests need Chromium at {CHROMIUM}", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="web chat tests need the playwright python package")
pytest.importorskip("uvicorn", reason="web chat tests need uvicorn")

from test_serve import CALL, KEY, MODEL, ScriptedEngine, ServerThread, build_model_dir  # noqa: E402

from internlm2.engine import AsyncEngine, Engine  # noqa: E402
from internlm2.hf import load_model  # noqa: E402
from internlm2.serve.app import create_app  # noqa: E402
from internlm2.tokenizer import load_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("INTERNLM2_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parents[1] / "test-artifacts")
# Markdown the page must render (and an injection attempt it must show as text).
RICH = ("Here is **bold** and *italic* with `x < y`.\n\n```python\nprint('a' * 200)\n```\n\n"
        "- first\n- second\n\n[ok](https://example.com) [bad](javascript:alert(1))\n\n"
        "<img src=x onerror=\"window.__xss=1\">\n\n" + "more words " * 300 + "<|im_end|>")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model_dir = build_model_dir(tmp_path_factory.mktemp("webchat"))
    tok = load_tokenizer(model_dir)
    engine = Engine(load_model(model_dir).eval(), tok, block_size=16, num_blocks=64,
                    max_batch_size=4, session_len=256)
    aengine = AsyncEngine(engine)
    aengine.start()
    real = ServerThread(create_app(aengine, tok, model_name=MODEL, max_tokens_limit=64))
    double = ScriptedEngine(engine, tok)
    scripted = ServerThread(create_app(double, tok, model_name=MODEL, api_keys=[KEY],
                                       features={"interpreter": True}, session_len=8192))
    yield real.url, scripted.url, double, engine
    real.stop()
    scripted.stop()
    aengine.shutdown()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_idle(page, timeout: float = 20_000) -> None:
    page.wait_for_function("document.body.dataset.state === 'idle'", timeout=timeout)


def test_chat_streams_reply_multi_turn_and_screenshot(browser, servers):
    url = servers[0]
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'tiny-chat'")
    assert page.is_hidden("#interpreter-row")  # the real server has no interpreter yet
    page.click("#settings-toggle")
    page.fill("#max-tokens", "12")
    page.fill("#system", "Be brief.")
    send(page, "Hello there")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .content').length === 1 &&"
                           "document.querySelector('.msg.assistant .content').textContent.length > 0")
    wait_idle(page)
    assert page.inner_text(".msg.user .content") == "Hello there"
    first = page.inner_text(".msg.assistant .content")
    send(page, "And again")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2")
    wait_idle(page)
    hist = page.evaluate("window.internlm2Chat.state.history.map(m => m.role)")
    assert hist == ["user", "assistant", "user", "assistant"] and first.strip()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "webchat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    page.click("#clear")
    assert page.evaluate("document.querySelectorAll('.msg').length") == 0
    page.close()


def test_stop_markdown_safety_tools_and_api_key(browser, servers):
    url, double = servers[1], servers[2]
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('status').textContent.includes('API key')")
    assert page.is_visible("#interpreter-row") or page.is_hidden("#settings")
    page.click("#settings-toggle")
    assert page.is_visible("#interpreter-row")  # this server says it has one
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    assert page.evaluate("localStorage.getItem('internlm2.apiKey')") == KEY
    double.script, double.delay = RICH, 0.01
    send(page, "show me markdown")
    page.wait_for_selector(".msg.assistant .code pre code", timeout=15_000)
    page.wait_for_function("document.querySelector('.msg.assistant .content').textContent"
                           ".includes('more words')", timeout=15_000)
    assert page.evaluate("document.body.dataset.state") == "streaming"
    page.click("#stop")
    wait_idle(page, 5_000)
    n1 = len(page.inner_text(".msg.assistant .content"))
    page.wait_for_timeout(400)
    assert len(page.inner_text(".msg.assistant .content")) == n1  # generation really ended
    assert "Stopped" in page.inner_text("#status")
    assert page.inner_text(".msg.assistant strong") == "bold"
    assert page.inner_text(".msg.assistant em") == "italic"
    assert page.inner_text(".msg.assistant :not(pre) > code") == "x < y"
    assert page.inner_text(".msg.assistant .code .copy") == "Copy"
    links = page.eval_on_selector_all(".msg.assistant a", "as => as.map(a => a.href)")
    assert links == ["https://example.com/"]  # the javascript: link stays text
    assert page.evaluate("document.querySelectorAll('.msg img').length") == 0
    assert page.evaluate("window.__xss") is None
    assert "<img src=x" in page.inner_text(".msg.assistant .content")
    # still usable after stop: the next turn shows a tool call as a collapsible block
    double.script, double.delay = "Checking." + CALL, 0.0
    send(page, "weather?")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2")
    wait_idle(page)
    summary = page.inner_text(".msg.assistant:last-child details.tool summary", timeout=3000)
    assert "get_weather" in summary
    assert "Paris" in page.text_content(".msg.assistant:last-child details.tool pre")
    assert page.inner_text(".msg.assistant:last-child .content p") == "Checking."
    page.close()


def test_layout_fits_375px(browser, servers):
    url, double = servers[1], servers[2]
    page = browser.new_page(viewport={"width": 375, "height": 740})
    page.add_init_script(f"localStorage.setItem('internlm2.apiKey', {KEY!r})")
    page.goto(url + "/")
    double.script, double.delay = ("A long line: " + "x" * 300 + "\n\n```\n" + "y" * 300
                                   + "\n```\n<|im_end|>"), 0.0
    send(page, "wide " * 80)
    page.wait_for_selector(".msg.assistant .code")
    wait_idle(page)
    page.click("#settings-toggle")
    over = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert over <= 0
    for sel in ("#send", "#stop", "#input", "#settings-toggle", "#clear"):
        box = page.locator(sel).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 375 + 0.5, sel
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webchat-375.png"))
    page.close()
