"""The web UI in a real headless browser (Debian's chromium driven by playwright) against the real
chat_web server of test_chat_web.py serving its scripted model, whose reply is known exactly.

Skipped, with the reason, when no chromium binary is installed (CI: `apt-get install -y chromium`).
The screenshot goes to the test's tmp_path (ui.png).
"""

import json
import shutil
from pathlib import Path

import pytest
from test_chat_web import scripted_server  # noqa: F401 - the shared server fixture

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"no chromium binary ({CHROMIUM}); install it with apt-get install chromium",
)

# Counts text changes inside assistant messages, to see that a reply arrives in several pieces.
COUNT_UPDATES = """() => {
  window.__updates = 0;
  new MutationObserver((records) => {
    for (const r of records) {
      const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
      if (el && el.closest(".message.assistant")) window.__updates++;
    }
  }).observe(document.getElementById("messages"), { subtree: true, childList: true, characterData: true });
}"""


@pytest.fixture
def page(request):
    from playwright.sync_api import sync_playwright

    server = request.getfixturevalue("scripted_server")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.set_default_timeout(30_000)
        page.sent = []  # request bodies the page POSTed to /chat/completions
        page.on(
            "request",
            lambda r: (
                page.sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None
            ),
        )
        page.server = server  # its .url, and .reply: what the scripted model answers
        page.goto(server.url + "/")
        yield page
        browser.close()


def wait_idle(page, n_assistant: int) -> None:
    page.wait_for_function(
        f"""() => document.body.dataset.busy === "false"
            && document.querySelectorAll(".message.assistant").length === {n_assistant}"""
    )


def texts(page, selector: str) -> list[str]:
    return page.locator(selector).all_inner_texts()


def test_ui_streams_a_reply_then_regenerates_and_edits(page, tmp_path):
    from playwright.sync_api import expect

    page.evaluate(COUNT_UPDATES)
    # Shift+Enter is a newline, Enter sends
    page.click("#input")
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    assert page.input_value("#input") == "first line\nsecond line" and page.sent == []
    page.keyboard.press("Enter")
    wait_idle(page, 1)
    assert texts(page, ".message.user") == ["first line\nsecond line"]
    expect(page.locator(".message.assistant")).to_have_text(page.server.reply)
    assert page.evaluate("window.__updates") > 3  # the reply streamed in pieces
    assert page.sent[-1]["messages"] == [{"role": "user", "content": "first line\nsecond line"}]
    assert page.input_value("#input") == ""

    # a second turn carries the whole conversation
    page.fill("#input", "and again")
    page.press("#input", "Enter")
    wait_idle(page, 2)
    assert [m["role"] for m in page.sent[-1]["messages"]] == ["user", "assistant", "user"]
    assert page.sent[-1]["messages"][1]["content"] == page.server.reply
    page.screenshot(path=str(tmp_path / "ui.png"))
    assert (tmp_path / "ui.png").stat().st_size > 1000

    # clicking the first reply regenerates it: the chat is cut there and resent
    page.locator(".message.assistant").first.click()
    wait_idle(page, 1)
    assert len(page.sent) == 3
    assert page.sent[-1]["messages"] == [{"role": "user", "content": "first line\nsecond line"}]
    assert texts(page, ".message.user") == ["first line\nsecond line"]
    expect(page.locator(".message.assistant")).to_have_text(page.server.reply)

    # clicking a user message edits it; Enter resends from there
    page.locator(".message.user").first.click()
    box = page.locator(".message.user .edit-box")
    expect(box).to_have_value("first line\nsecond line")
    box.fill("edited question")
    box.press("Enter")
    wait_idle(page, 1)
    assert page.sent[-1]["messages"] == [{"role": "user", "content": "edited question"}]
    assert texts(page, ".message.user") == ["edited question"]

    # New chat empties the conversation
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    expect(page.locator("#empty")).to_be_visible()


def test_ui_slash_commands_set_sampling_and_help(page):
    from playwright.sync_api import expect

    for command in ("/temperature 0.25", "/topk 7", "/help", "/temperature 9", "/bogus"):
        page.fill("#input", command)
        page.press("#input", "Enter")
    notices = texts(page, ".notice")
    assert "temperature set to 0.25" in notices[0] and "top-k set to 7" in notices[1]
    assert "/temperature" in notices[2] and "/topk" in notices[2] and "/clear" in notices[2]
    assert len(texts(page, ".notice.error")) == 2  # out of range, unknown command
    expect(page.locator("#settings")).to_have_text("temperature 0.25 \u00b7 top-k 7")
    assert page.sent == []  # commands are not chat messages

    page.fill("#input", "hi")
    page.press("#input", "Enter")
    wait_idle(page, 1)
    assert page.sent[-1]["temperature"] == 0.25 and page.sent[-1]["top_k"] == 7

    page.fill("#input", "/clear")
    page.press("#input", "Enter")
    assert page.locator(".message").count() == 0


def test_ui_shows_server_errors_and_gives_the_text_back(page):
    from playwright.sync_api import expect

    too_long = "x" * 8001
    page.fill("#input", too_long)
    page.press("#input", "Enter")
    expect(page.locator(".notice.error")).to_contain_text("8000")
    wait_idle(page, 0)
    assert page.locator(".message").count() == 0  # the rejected turn is taken out again
    assert page.input_value("#input") == too_long  # ... and its text is back in the box to fix
