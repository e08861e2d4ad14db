"""The chat page at / in a real headless Chromium (Playwright), against a real server on 127.0.0.1
with a tiny model: streaming, stop, history across reloads, errors, and a server with an API key."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from colossuslm.serve.api import ServerSettings, create_app
from colossuslm.serve.async_engine import AsyncEngine
from colossuslm.serve.engine import EngineConfig, LLMEngine
from tests.serve_helpers import ServerThread, make_checkpoint, one_torch_thread  # noqa: F401 (fixture)

MODEL = "tiny-web"
KEY = "web-key-456"
SYSTEM_CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

pytestmark = pytest.mark.timeout(120)


def find_chromium(playwright) -> str | None:
    """Playwright's own Chromium if `playwright install chromium` put it there, else a system one."""
    own = playwright.chromium.executable_path
    if own and os.path.exists(own):
        return own
    for name in SYSTEM_CHROMIUMS:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        executable = find_chromium(playwright)
        if executable is None:
            pytest.skip(
                "no Chromium found: neither Playwright's own (`playwright install chromium`) nor one of "
                f"{', '.join(SYSTEM_CHROMIUMS)} on PATH (Debian: apt-get install chromium; scripts/setup.sh does)"
            )
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("web"))
    engine = AsyncEngine(LLMEngine.from_checkpoint(ckpt, device="cpu", config=EngineConfig(max_num_seqs=4))).start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def open_server(engine):
    with ServerThread(create_app(engine, ServerSettings(model_name=MODEL))) as server:
        yield server


@pytest.fixture(scope="module")
def keyed_server(engine):
    with ServerThread(create_app(engine, ServerSettings(model_name=MODEL, api_key=KEY))) as server:
        yield server


@pytest.fixture
def page(browser, request):
    """A fresh browser context (empty localStorage) whose requests must all go to the server itself."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.requests, page.errors = [], []
    page.on("request", lambda req: page.requests.append(req))
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    yield page
    context.close()
    origins = {req.url.split("/", 3)[2] for req in page.requests if not req.url.startswith("data:")}
    assert len(origins) <= 1 and all(o.startswith("127.0.0.1:") for o in origins), origins
    assert page.errors == []


@contextlib.contextmanager
def slow_engine(engine: AsyncEngine, seconds_per_step: float):
    """Each engine step takes a while, so a reply is surely still streaming when the test acts."""
    llm = engine.engine
    real_step = llm.step

    def slow_step():
        time.sleep(seconds_per_step)
        return real_step()

    llm.step = slow_step
    try:
        yield
    finally:
        del llm.step


def wait_until_idle(engine: AsyncEngine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.running == stats.waiting == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {engine.stats()}")


def chat_bodies(page: Page) -> list[dict]:
    return [r.post_data_json for r in page.requests if r.url.endswith("/v1/chat/completions")]


def send(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_until(condition, timeout: float = 10.0) -> None:
    """Poll from Python: the page's Content-Security-Policy forbids the eval that wait_for_function uses."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the page")
        time.sleep(0.02)


def reply_is_streaming(page: Page) -> bool:
    """Some reply text is on the page (whitespace counts: the tiny model likes newlines) and the stream is open."""
    return bool(page.locator(".message.assistant .text").last.text_content()) and page.locator("#stop").is_enabled()


def wait_for_reply(page: Page) -> None:
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()


def test_page_and_assets_load_without_the_key(keyed_server):
    page = httpx.get(f"{keyed_server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for path, kind in (("/web/chat.js", "text/javascript"), ("/web/chat.css", "text/css")):
        asset = httpx.get(f"{keyed_server.url}{path}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), path
    assert "innerHTML" not in httpx.get(f"{keyed_server.url}/web/chat.js").text
    # Only the named assets are public: any other path needs the key, and with it is simply not there.
    assert httpx.get(f"{keyed_server.url}/web/other.js").status_code == 401
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{keyed_server.url}/web/other.js", headers=bearer).status_code == 404
    assert httpx.post(f"{keyed_server.url}/tokenize", json={"prompt": "hi"}).status_code == 401
    assert httpx.get(f"{keyed_server.url}/v1/models").status_code == 401  # the API itself stays guarded


def test_streamed_reply_history_reload_and_new_chat(open_server, engine, page):
    page.goto(open_server.url)
    expect(page.locator("#model")).to_have_text(f"model: {MODEL}")
    page.fill("#system-prompt", "You are terse.")
    page.fill("#max-tokens", "12")
    page.fill("#temperature", "0")

    with slow_engine(engine, 0.08):  # 12 tokens take about a second
        send(page, "Hello <b>there</b>!")
        # Text shows up while the reply is still streaming (stop enabled), then the reply ends.
        wait_until(lambda: reply_is_streaming(page))
        expect(page.locator(".message.assistant.streaming")).to_have_count(1)
        wait_for_reply(page)
    user = page.locator(".message.user .text")
    expect(user).to_have_text(["Hello <b>there</b>!"])  # shown as text, not markup
    assert page.locator("#messages b").count() == 0
    first_reply = page.locator(".message.assistant .text").first.text_content()
    assert first_reply
    expect(page.locator("#stats")).to_contain_text("tokens/s")
    expect(page.locator("#error")).to_be_hidden()

    send(page, "And then?")
    wait_for_reply(page)
    bodies = chat_bodies(page)
    assert [b["stream"] for b in bodies] == [True, True]
    assert bodies[1]["temperature"] == 0 and bodies[1]["max_tokens"] == 12 and bodies[1]["model"] == MODEL
    # Every turn sends the whole conversation, the system prompt first.
    assert bodies[1]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello <b>there</b>!"},
        {"role": "assistant", "content": first_reply},
        {"role": "user", "content": "And then?"},
    ]

    page.reload()
    expect(page.locator(".message")).to_have_count(4)
    expect(page.locator(".message.user .text")).to_have_text(["Hello <b>there</b>!", "And then?"])
    assert page.locator(".message.assistant .text").first.text_content() == first_reply
    expect(page.locator("#system-prompt")).to_have_value("You are terse.")
    expect(page.locator("#max-tokens")).to_have_value("12")

    page.click("#new-chat")
    expect(page.locator(".message")).to_have_count(0)
    page.reload()
    expect(page.locator("#model")).to_have_text(f"model: {MODEL}")
    expect(page.locator(".message")).to_have_count(0)


def test_api_error_is_shown_and_the_turn_can_be_retried(open_server, page):
    page.goto(open_server.url)
    expect(page.locator("#model")).to_have_text(f"model: {MODEL}")
    page.fill("#max-tokens", "100000")  # beyond the 128-token context: the server answers 400
    send(page, "Hello")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("400")
    expect(page.locator(".message")).to_have_count(0)  # the failed turn is taken back...
    expect(page.locator("#prompt")).to_have_value("Hello")  # ... and its text is kept to retry
    page.fill("#max-tokens", "4")
    page.press("#prompt", "Enter")
    wait_for_reply(page)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator(".message")).to_have_count(2)


def test_stop_ends_a_long_reply_and_the_page_stays_usable(open_server, engine, page):
    def without_eos(route):  # a reply that would go on for 100 tokens unless stopped
        route.continue_(post_data=json.dumps(route.request.post_data_json | {"ignore_eos": True}))

    page.route("**/v1/chat/completions", without_eos)
    page.goto(open_server.url)
    expect(page.locator("#model")).to_have_text(f"model: {MODEL}")
    page.fill("#max-tokens", "100")
    reply = page.locator(".message.assistant .text")
    with slow_engine(engine, 0.1):  # 100 tokens would take 10 s
        send(page, "Tell me a long story")
        wait_until(lambda: reply_is_streaming(page))
        page.click("#stop")
        wait_for_reply(page)
        stopped_text = reply.first.text_content()
        wait_until_idle(engine)  # the aborted stream freed its slot on the server
    page.wait_for_timeout(300)
    assert reply.first.text_content() == stopped_text  # nothing more arrives
    expect(page.locator(".message.assistant .note")).to_have_text("stopped")
    expect(page.locator("#prompt")).to_be_enabled()
    page.reload()  # the stopped reply is kept in the history, marked as such
    expect(page.locator(".message")).to_have_count(2)
    assert reply.first.text_content() == stopped_text
    expect(page.locator(".message.assistant .note")).to_have_text("stopped")
    expect(page.locator("#model")).to_have_text(f"model: {MODEL}")

    page.fill("#max-tokens", "60")  # the history takes part of the 128-token context now
    with slow_engine(engine, 0.1):  # "New chat" in the middle of a reply drops it, and the stream
        send(page, "Another long one")
        wait_until(lambda: page.locator(".message").count() == 4 and reply_is_streaming(page))
        page.click("#new-chat")
        wait_for_reply(page)
        expect(page.locator(".message")).to_have_count(0)
        wait_until_idle(engine)
    page.reload()
    expect(page.locator(".message")).to_have_count(0)

    page.fill("#max-tokens", "3")
    send(page, "Short one")
    wait_for_reply(page)
    expect(page.locator(".message")).to_have_count(2)
    expect(page.locator("#error")).to_be_hidden()


def test_server_with_an_api_key(keyed_server, page):
    page.goto(keyed_server.url)  # the page loads without the key; its API calls need it
    error = page.locator("#error")
    expect(error).to_contain_text("401")
    expect(error).to_contain_text("API key")
    expect(page.locator("#model")).to_have_text("model: ?")
    send(page, "Hello")
    expect(error).to_contain_text("401")
    expect(page.locator(".message")).to_have_count(0)

    page.fill("#api-key", "wrong-key")
    page.locator("#api-key").dispatch_event("change")  # as on leaving the field: the page tries the key
    expect(error).to_contain_text("Incorrect or missing API key")
    expect(page.locator("#model")).to_have_text("model: ?")

    page.fill("#api-key", KEY)
    page.locator("#api-key").dispatch_event("change")
    expect(page.locator("#model")).to_have_text(f"model: {MODEL}")
    expect(error).to_be_hidden()
    page.fill("#max-tokens", "4")
    send(page, "Hello")
    wait_for_reply(page)
    expect(page.locator(".message")).to_have_count(2)
    expect(error).to_be_hidden()
    chat = [r for r in page.requests if r.url.endswith("/v1/chat/completions")]
    assert chat and chat[-1].headers["authorization"] == f"Bearer {KEY}"

    page.reload()  # the key is kept in localStorage
    expect(page.locator("#api-key")).to_have_value(KEY)
    expect(page.locator("#model")).to_have_text(f"model: {MODEL}")
