"""The built-in chat page in a real headless Chromium (Debian's), against the real server."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e
CHROMIUM = Path("/usr/bin/chromium")
# Flags that let Debian's chromium run headless as root in a container, quietly and offline.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def page(tmp_path: Path):
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium where it runs "
            "as root with apt; elsewhere install it to run this test"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1000, "height": 720},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def running_rows(base: str) -> int:
    text = httpx.get(base + "/metrics", timeout=10).text
    total = 0
    for name in ("mlxd_running_sequences", "mlxd_waiting_sequences"):
        m = re.search(rf"^{name} ([0-9.e+]+)$", text, flags=re.M)
        assert m, f"{name} missing from /metrics"
        total += int(float(m.group(1)))
    return total


def test_chat_page_streams_keeps_the_conversation_and_stops(live_server, page, tmp_path):
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    bodies: list[dict] = []
    page.on(
        "request",
        lambda r: (
            bodies.append(json.loads(r.post_data or "{}"))
            if r.url.endswith("/v1/chat/completions")
            else None
        ),
    )
    page.goto(live_server + "/")
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    assert page.locator("#model").input_value() == "smollm2:135m"

    # The renderer escapes model text before adding its own tags.
    html = page.evaluate(
        "renderMarkdown('<img src=x onerror=alert(1)> **b** `c`\\n```py\\nx<1\\n```')"
    )
    assert "<img" not in html and "&lt;img" in html
    assert "<strong>b</strong>" in html and "<code>c</code>" in html
    assert '<pre><code class="language-py">x&lt;1</code></pre>' in html

    # A whole answer first: the page streams it and keeps it in the conversation.
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "40")
    page.fill("#prompt", "What is the capital of France?")
    page.click("#send")
    answer = page.locator(".msg.assistant .content").nth(0)
    page.wait_for_function("() => !document.querySelector('#send').disabled", timeout=120_000)
    assert answer.inner_text().strip()

    # A long answer: text appears while the stream is still open, then Stop ends it.
    page.fill("#max-tokens", "2000")
    page.fill("#prompt", "Write a very long story about a dragon who learns to cook.")
    page.click("#send")
    second = page.locator(".msg.assistant .content").nth(1)
    page.wait_for_function(
        "() => document.querySelectorAll('.msg.assistant .content')[1].textContent.length > 20",
        timeout=120_000,
    )
    assert page.locator("#stop").is_visible()  # still streaming when the text showed up
    seen = second.inner_text()
    page.wait_for_function(
        "n => document.querySelectorAll('.msg.assistant .content')[1].textContent.length > n",
        arg=len(seen),
        timeout=60_000,
    )
    page.click("#stop")
    page.wait_for_function(
        "() => document.querySelectorAll('.msg .meta')[1].textContent === 'stopped'"
    )
    assert not page.locator("#stop").is_visible()

    deadline = time.monotonic() + 15
    while running_rows(live_server) and time.monotonic() < deadline:
        time.sleep(0.2)  # the abort lands at the engine's next step
    assert running_rows(live_server) == 0

    assert len(bodies) == 2
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[1]["stream"] is True
    assert (bodies[0]["temperature"], bodies[0]["max_tokens"]) == (0, 40)
    assert not errors
    shot = tmp_path / "chat-page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 5000


def test_chat_page_shows_server_errors(live_server, page):
    page.goto(live_server + "/")
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    # A model that disappeared meanwhile: the server's own message is shown to the user.
    page.evaluate(
        "() => { const o = document.createElement('option'); o.value = o.textContent = 'gone:1';"
        " document.querySelector('#model').append(o); document.querySelector('#model').value = 'gone:1'; }"
    )
    page.fill("#prompt", "hello")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    text = page.inner_text("#error")
    assert text.startswith("Error 404") and "gone:1" in text


def test_chat_page_folds_reasoning_renders_markdown_and_explains_429(live_server, page):
    """What the default model never sends (reasoning, Markdown on demand) and a full queue: the
    page is the real one; its chat requests are answered by the browser's request routing."""
    chunks = [
        {"delta": {"role": "assistant", "content": ""}},
        {"delta": {"reasoning_content": "The user asks about France."}},
        {"delta": {"content": "It is **Paris**.\n```py\nprint('<b>')\n```"}},
        {"delta": {}, "finish_reason": "stop"},
    ]
    sse = "".join(
        "data: " + json.dumps({"choices": [{"index": 0, "finish_reason": None, **c}]}) + "\n\n"
        for c in chunks
    )
    full = {"error": {"message": "the queue is full", "type": "rate_limit_error", "param": None}}
    replies = [
        {"status": 200, "content_type": "text/event-stream", "body": sse + "data: [DONE]\n\n"},
        {"status": 429, "headers": {"Retry-After": "3"}, "json": full},
    ]
    page.route("**/v1/chat/completions", lambda route: route.fulfill(**replies.pop(0)))
    page.goto(live_server + "/")
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    page.fill("#prompt", "Capital of France?")
    page.click("#send")
    page.wait_for_function("() => !document.querySelector('#send').disabled")
    details = page.locator(".msg.assistant details")
    assert details.is_visible() and details.get_attribute("open") is None  # shown, folded
    assert page.inner_text(".msg.assistant details summary") == "Reasoning"
    assert page.locator(".msg.assistant .reasoning").text_content() == "The user asks about France."
    content = page.inner_html(".msg.assistant .content")
    assert "<strong>Paris</strong>" in content
    assert "<pre><code class=\"language-py\">print('&lt;b&gt;')</code></pre>" in content

    page.fill("#prompt", "And of Italy?")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    text = page.inner_text("#error")
    assert "429" in text and "the queue is full" in text and "retry in 3 s" in text
