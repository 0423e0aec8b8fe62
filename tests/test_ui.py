"""The web UI in headless chromium (playwright) against test_chat_web.py's scripted and babbling servers;
Markdown and injected HTML go to the page's renderer (`window.nanochatRender`) or a routed reply."""

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright
from test_chat_web import (
    SCRIPT_AFTER_TOOL,
    SCRIPT_BEFORE_TOOL,
    SCRIPT_EXPR,
    SCRIPT_REPLY,
    babbler_server,  # noqa: F401 - the shared server fixtures
    guarded_server,  # noqa: F401
    scripted_server,  # noqa: F401
)

from nanochat.calculator import use_calculator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"no chromium binary ({CHROMIUM}); install it with apt-get install chromium",
)

# The scripted reply as the page shows it: the calculator call <<1+2=3>> is a chip.
SCRIPT_CHIP = f"calc {SCRIPT_EXPR} = {use_calculator(SCRIPT_EXPR)}"
SCRIPT_SHOWN = SCRIPT_BEFORE_TOOL + SCRIPT_CHIP + SCRIPT_AFTER_TOOL

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

# Renders Markdown with the page's own renderer into #probe (created on first use).
RENDER_PROBE = """(markdown) => {
  const probe = document.getElementById("probe") || document.body.appendChild(document.createElement("div"));
  Object.assign(probe, { id: "probe", className: "message assistant" });
  window.nanochatRender(markdown, probe);
}"""

# HTML that runs code if it is ever parsed as HTML rather than shown as text.
INJECTED = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><b>bold?</b>'


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, request):
    """open_page(server fixture name): a fresh page on that server's UI; page.sent collects its chat POSTs.
    Fixtures are taken by name: as parameters they would shadow the imports (ruff F811)."""
    contexts = []

    def open_(server_fixture: str):
        server = request.getfixturevalue(server_fixture)
        context = browser.new_context(viewport={"width": 1000, "height": 700})
        contexts.append(context)
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.sent, page.server = [], server

        def record(r):
            if r.url.endswith("/chat/completions"):
                page.sent.append(json.loads(r.post_data))

        page.on("request", record)
        page.goto(server.url + "/")
        return page

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture
def page(open_page):
    return open_page("scripted_server")


def wait_idle(page, n_assistant: int) -> None:
    page.wait_for_function(
        f"""() => document.body.dataset.busy === "false"
            && document.querySelectorAll(".message.assistant").length === {n_assistant}"""
    )


def texts(page, selector: str) -> list[str]:
    return page.locator(selector).all_inner_texts()


def say(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def route_reply(page, pieces: list[str]) -> None:
    """Answers the page's next chats with `pieces` as a server-sent event stream, like the server."""
    events = [{"token": p, "gpu": 0} for p in pieces] + [{"done": True, "finish_reason": "stop"}]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
    stream = dict(status=200, content_type="text/event-stream", body=body)
    page.route("**/chat/completions", lambda route: route.fulfill(**stream))


# ---------------------------------------------------------------------------- conversation


def test_ui_streams_a_reply_then_regenerates_and_edits(page):
    # Shift+Enter is a newline, Enter sends
    page.click("#input")
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    assert page.input_value("#input") == "first line\nsecond line" and page.sent == []
    page.keyboard.press("Enter")
    wait_idle(page, 1)
    assert texts(page, ".message.user") == ["first line\nsecond line"]
    expect(page.locator(".message.assistant")).to_have_text(SCRIPT_SHOWN)
    expect(page.locator(".message.assistant .tool-chip")).to_have_text(SCRIPT_CHIP)  # <<1+2=3>>: a chip
    expect(page.locator(".message.assistant .tool-chip.refused")).to_have_count(0)
    assert page.sent[-1]["messages"] == [{"role": "user", "content": "first line\nsecond line"}]
    assert page.input_value("#input") == ""

    # a second turn carries the whole conversation, the reply as the server wrote it
    say(page, "and again")
    wait_idle(page, 2)
    assert [m["role"] for m in page.sent[-1]["messages"]] == ["user", "assistant", "user"]
    assert page.sent[-1]["messages"][1] == {"role": "assistant", "content": SCRIPT_REPLY}

    # clicking the first reply regenerates it: the chat is cut there and resent
    page.locator(".message.assistant").first.click()
    wait_idle(page, 1)
    assert len(page.sent) == 3
    assert page.sent[-1]["messages"] == [{"role": "user", "content": "first line\nsecond line"}]
    assert texts(page, ".message.user") == ["first line\nsecond line"]
    expect(page.locator(".message.assistant")).to_have_text(SCRIPT_SHOWN)

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


def test_ui_header_shows_the_settings_in_effect_and_slash_commands_set_them(page):
    health = httpx.get(page.server.url + "/health", timeout=10).json()
    temperature, top_k, max_tokens = (health["defaults"][k] for k in ("temperature", "top_k", "max_tokens"))
    expect(page.locator("#model")).to_have_text(health["model"])
    settings = "temperature {:g} \u00b7 top-k {} \u00b7 max tokens {}"
    expect(page.locator("#settings")).to_have_text(settings.format(temperature, top_k, max_tokens))
    say(page, "/topk 7")  # one override; the others stay the server's
    expect(page.locator("#settings")).to_have_text(settings.format(temperature, 7, max_tokens))
    for command in ("/temperature 0.25", "/maxtokens 300", "/help", "/temperature 9", "/bogus"):
        say(page, command)
    notices = texts(page, ".notice")
    assert "top-k set to 7" in notices[0] and "temperature set to 0.25" in notices[1]
    assert "max tokens set to 300" in notices[2]
    assert all(c in notices[3] for c in ("/temperature", "/topk", "/maxtokens", "/clear"))
    assert len(texts(page, ".notice.error")) == 2  # out of range, unknown command
    expect(page.locator("#settings")).to_have_text(settings.format(0.25, 7, 300))
    assert page.sent == []  # commands are not chat messages

    say(page, "hi")
    wait_idle(page, 1)
    sent = page.sent[-1]
    assert sent["temperature"] == 0.25 and sent["top_k"] == 7 and sent["max_tokens"] == 300

    say(page, "/clear")
    assert page.locator(".message").count() == 0


def test_ui_long_chat_sends_its_newest_turns_and_a_refused_message_comes_back_to_fix(page):
    """The server refuses a conversation over 32,000 characters: five turns of 7,000 go on working,
    the fifth request leaving out the oldest pair, and the chat saying so. A message over 8,000 is
    refused: the error shows, and its text is back in the box."""
    for i in range(5):
        say(page, f"{i}" + "x" * 7000)
        wait_idle(page, i + 1)
    assert texts(page, ".message.assistant") == [SCRIPT_SHOWN] * 5  # every turn answered
    assert [len(body["messages"]) for body in page.sent] == [1, 3, 5, 7, 7]
    last = page.sent[-1]["messages"]
    assert last[0]["content"].startswith("1x") and sum(len(m["content"]) for m in last) <= 32000
    expect(page.locator(".notice")).to_contain_text("oldest 2 messages")
    expect(page.locator(".notice.error")).to_have_count(0)

    too_long = "x" * 8001
    say(page, too_long)
    expect(page.locator(".notice.error")).to_contain_text("8000")
    wait_idle(page, 5)
    assert page.locator(".message").count() == 10  # the rejected turn is taken out again
    assert page.input_value("#input") == too_long  # ... and its text is back in the box to fix


# ---------------------------------------------------------------------------- markdown


def test_ui_streamed_code_block_has_a_working_copy_button(page):
    # the fence and the code arrive split across pieces, as a model streams them
    pieces = ["Try this:\n\n``", "`py", "thon\nprint('<b>hi</b>')\nx = 2", "\n```\n", "Done **now**."]
    route_reply(page, pieces)
    say(page, "code please")
    wait_idle(page, 1)
    reply = page.locator(".message.assistant")
    expect(reply.locator("pre code")).to_have_count(1)
    expect(reply.locator("pre code")).to_have_text("print('<b>hi</b>')\nx = 2")
    expect(reply.locator("strong")).to_have_text("now")
    expect(reply.locator("b")).to_have_count(0)

    copy = reply.locator(".code-block button.copy")
    expect(copy).to_have_text("Copy")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "print('<b>hi</b>')\nx = 2"
    expect(copy).to_have_text("Copy", timeout=5000)  # only briefly
    assert len(page.sent) == 1  # clicking Copy did not regenerate the reply


def test_ui_shows_injected_html_as_text_and_renders_markdown(page):
    # in a streamed reply, in the renderer's every inline form, and in the user's own message
    route_reply(page, [INJECTED[:9], INJECTED[9:40], INJECTED[40:], "\n\n# " + INJECTED])
    say(page, INJECTED)
    wait_idle(page, 1)
    expect(page.locator(".message.user")).to_have_text(INJECTED)
    expect(page.locator(".message.assistant p")).to_have_text(INJECTED)
    expect(page.locator(".message.assistant h1")).to_have_text(INJECTED)
    link = f'[{INJECTED}](https://e.com/"><img/src=x/onerror=window.__pwned=3>)'
    inline_forms = f"**{INJECTED}** *{INJECTED}* `{INJECTED}` <<{INJECTED}>> {link}"
    page.evaluate(RENDER_PROBE, f"{inline_forms}\n\n```html\n{INJECTED}\n```")
    expect(page.locator("#probe a")).to_have_text(INJECTED)
    expect(page.locator("#probe pre code")).to_have_text(INJECTED)
    for where in ("#messages", "#probe"):
        assert page.locator(f"{where} :is(img, script, b)").count() == 0
    assert page.evaluate("window.__pwned") is None

    markdown = """## Title
Some **bold *and it*** and *it* and `x < y`, 2*3*4 stays.
a second line

- one
- two with `code`
  continued

3. three

4. four

Links: [ok](https://example.com/a?b=1), [js](javascript:alert(1)), [rel](/x)."""
    page.evaluate(RENDER_PROBE, markdown)
    probe = page.locator("#probe")
    expect(probe.locator("h2")).to_have_text("Title")
    expect(probe.locator("strong")).to_have_text("bold and it")
    expect(probe.locator("strong em")).to_have_text("and it")
    expect(probe.locator("p > em")).to_have_text("it")
    expect(probe.locator("p code")).to_have_text("x < y")
    assert probe.locator("p").first.inner_text().endswith("2*3*4 stays.\na second line")
    assert texts(page, "#probe ul > li") == ["one", "two with code\ncontinued"]
    assert texts(page, "#probe ol > li") == ["three", "four"]  # one list across the blank line
    assert probe.locator("ol").get_attribute("start") == "3"
    link = probe.locator("a")
    expect(link).to_have_count(1)  # only the http(s) link is a link; the others stay text
    assert link.get_attribute("href") == "https://example.com/a?b=1"
    assert link.get_attribute("rel") == "noopener noreferrer" and link.get_attribute("target") == "_blank"
    expect(probe.locator("p").last).to_contain_text("[js](javascript:alert(1)), [rel](/x).")

    # a code block still streaming (no closing fence yet) is already a code block
    page.evaluate(RENDER_PROBE, "Here:\n```js\nlet a = 1 * 2 * 3;\n**not bold**")
    expect(probe.locator("pre code")).to_have_count(1)
    expect(probe.locator("pre code")).to_have_text("let a = 1 * 2 * 3;\n**not bold**")
    assert probe.locator("pre code").get_attribute("class") == "language-js"
    expect(probe.locator("strong")).to_have_count(0)

    # a refused calculator call (no result) is a chip marked refused; inside code it stays literal text
    page.evaluate(RENDER_PROBE, "a <<2**999>> b\n\n`<<1+1=2>>`\n\n```\n<<3*3=9>>\n```")
    expect(probe.locator(".tool-chip.refused")).to_have_text("calc 2**999")
    expect(probe.locator(".tool-chip")).to_have_count(1)
    expect(probe.locator("p code")).to_have_text("<<1+1=2>>")
    expect(probe.locator("pre code")).to_have_text("<<3*3=9>>")


# ---------------------------------------------------------------------------- stop


def test_ui_stop_button_and_esc_cancel_the_generation(open_page):
    page = open_page("babbler_server")
    server = page.server
    say(page, "/maxtokens 4000")  # ~2000 tokens of budget (the context's size): seconds of work
    for turn, stop in enumerate([lambda: page.click("#send"), lambda: page.keyboard.press("Escape")]):
        before = server.stats()
        page.evaluate(COUNT_UPDATES)
        say(page, f"talk {turn}")
        reply = page.locator(".message.assistant").nth(turn)
        # the reply shows up piece by piece while it streams
        page.wait_for_function('() => window.__updates > 3 && document.body.dataset.busy === "true"')
        expect(page.locator("#send")).to_have_text("Stop")
        started = time.time()
        stop()
        wait_idle(page, turn + 1)
        assert time.time() - started < 5
        expect(page.locator("#send")).to_have_text("Send")
        expect(reply.locator(".reply-note")).to_have_text("stopped")
        assert "stopped" in reply.get_attribute("class")
        assert len(reply.inner_text()) > len("stopped")  # the partial reply stays

        stats = server.idle()
        assert stats["busy"] == 0
        assert stats["requests_cancelled"] == before["requests_cancelled"] + 1
        assert stats["tokens_generated"] - before["tokens_generated"] < 1500  # stopped early

    # the partial first reply went back to the server as the conversation's context
    assert [m["role"] for m in page.sent[-1]["messages"]] == ["user", "assistant", "user"]
    assert page.sent[-1]["messages"][1]["content"]


def test_ui_asks_once_for_the_api_key_of_a_guarded_server(open_page):
    page = open_page("guarded_server")  # started with --api-key sekrit
    asked = []
    page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept("sekrit")))
    say(page, "hello")
    wait_idle(page, 1)
    say(page, "again")
    wait_idle(page, 2)
    assert len(asked) == 1 and "API key" in asked[0]  # asked once, then kept for the tab
    assert all(reply.strip() and "API key" not in reply for reply in texts(page, ".message.assistant"))
