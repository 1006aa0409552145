"""The demo in a real headless Chromium: two pages chat through the gateway over the Pyro
bus and over NATS, see each other in the room's members list, a reloaded page resumes with
the messages it missed, echo shows the stamped sender, and a bad frame shows its error."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio

from wsbus_cli.supervisor import Child, free_port

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HOW_TO = (
    "the browser test needs Debian's Chromium and Playwright's Python package: "
    "`sudo apt-get install chromium` and `pip install -e '.[dev]'`"
)
# Chromium as root in a container, with nothing reaching outside this machine.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not os.path.exists(CHROMIUM):  # pragma: no cover - depends on the machine
    pytest.skip(HOW_TO, allow_module_level=True)
playwright_api = pytest.importorskip("playwright.async_api", reason=HOW_TO)


# Every test runs on the Pyro demo and on the NATS one (a private nats-server).
@pytest.fixture(scope="module", params=["pyro", "nats"])
def demo(request: pytest.FixtureRequest) -> Iterator[str]:
    port = free_port()
    child = Child(
        ["demo", "--no-browser", "--port", str(port), "--bus", request.param],
        ready="running at",
        timeout=60,
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        assert child.stop() == 0, child.text
        assert "stopping" in child.text
        # Everything it started is gone: the page's port is closed.
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            pass


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def _open(browser: Browser, url: str, nick: str) -> Page:
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(url)
    await page.wait_for_selector('#status[data-state="open"]', timeout=15_000)
    await page.fill("#nick", nick)
    await page.click("#nick-form button[type=submit]")
    await page.wait_for_selector(f'#nick-result:has-text("you are {nick}")', timeout=10_000)
    await page.click("#join")
    await page.wait_for_selector('#room-result:has-text("joined #lobby")', timeout=10_000)
    return page


def _metrics(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The demo's /metrics, by sample name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base}metrics", timeout=10) as answer:
        body = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


async def test_two_pages_chat_over_the_pyro_bus(
    demo: str, browser: Browser, tmp_path: Path
) -> None:
    before = await asyncio.to_thread(_metrics, demo)
    ann = await _open(browser, demo, "ann")
    bob = await _open(browser, demo, "bob")
    await ann.fill("#text", "hello bob")
    await ann.click("#say-form button")
    for page in (ann, bob):
        line = page.locator("#messages li", has_text="hello bob")
        await line.wait_for(timeout=10_000)
        assert await line.locator(".from").inner_text() == "ann"
        assert await line.locator(".room").inner_text() == "#lobby"
    await bob.fill("#text", "hi ann")
    await bob.click("#say-form button")
    await ann.locator("#messages li", has_text="hi ann").wait_for(timeout=10_000)
    # The ack of each message shows in the events panel.
    await ann.locator("#events li.ack").first.wait_for(timeout=10_000)
    await ann.screenshot(path=str(os.environ.get("WSBUS_SCREENSHOTS", tmp_path)) + "/chat.png")
    # /metrics moved with the chat: two pages open, their frames and deliveries counted.
    after = await asyncio.to_thread(_metrics, demo)
    json_pages = ("wsbus_connections", (("codec", "wsbus.v1.json"), ("edge", "websockets")))
    assert after[json_pages] >= 2
    for counter in ("wsbus_frames_received_total", "wsbus_deliveries_written_total"):
        assert after[(counter, ())] > before[(counter, ())], counter


async def test_echo_shows_the_stamped_sender_and_a_bad_frame_its_error(
    demo: str, browser: Browser, tmp_path: Path
) -> None:
    page = await _open(browser, demo, "eve")
    await page.fill("#echo", "ping")
    await page.click("#echo-form button")
    sender = page.locator("#events li.sender").first
    await sender.wait_for(timeout=10_000)
    text = await sender.inner_text()
    assert '"type":"client"' in text and '"alias":"eve"' in text
    await page.click("#bad-frame")
    error = page.locator("#events li.error", has_text="unknown_field")
    await error.wait_for(timeout=10_000)
    assert "unknown field 'sender'" in await error.inner_text()
    # The page is still connected afterwards.
    assert await page.get_attribute("#status", "data-state") == "open"
    await page.screenshot(path=str(os.environ.get("WSBUS_SCREENSHOTS", tmp_path)) + "/echo.png")


async def test_the_javascript_client_reconnects_after_a_resync_close(
    demo: str, browser: Browser
) -> None:
    page = await _open(browser, demo, "rex")
    first = await page.evaluate("window.wsbusClient.connId")
    # 4507 says "you missed messages": the client reconnects, with jittered backoff.
    await page.evaluate("window.wsbusClient._ws.close(4507, 'test')")
    await page.wait_for_function(
        f"window.wsbusClient.connected && window.wsbusClient.connId !== {first!r}",
        timeout=15_000,
    )
    assert await page.get_attribute("#status", "data-state") == "open"
    # The new connection works: an echo round trip.
    await page.fill("#echo", "again")
    await page.click("#echo-form button")
    await page.locator("#echo-result", has_text='echoed "again"').wait_for(timeout=10_000)


async def test_posting_to_a_room_you_are_not_in_is_refused_on_the_page(
    demo: str, browser: Browser, tmp_path: Path
) -> None:
    page = await _open(browser, demo, "lea")
    # The nickname field allows what the rule allows.
    assert await page.get_attribute("#nick", "maxlength") == "32"
    await page.click("#leave")
    await page.wait_for_selector('#room-result:has-text("left #lobby")', timeout=10_000)
    await page.fill("#text", "anyone?")
    await page.click("#say-form button")
    refusal = page.locator("#say-result", has_text="you are not in #lobby: join it first")
    await refusal.wait_for(timeout=10_000)
    assert await page.locator("#messages li", has_text="anyone?").count() == 0
    # The panel says which action each ack answers.
    await page.locator("#events li.ack", has_text="chat.say").first.wait_for(timeout=10_000)
    # A room never joined is refused the same way.
    await page.fill("#room", "elsewhere")
    await page.fill("#text", "hello?")
    await page.click("#say-form button")
    await page.locator("#say-result", has_text="you are not in #elsewhere").wait_for(timeout=10_000)
    # A room name out of the rule: the error states the rule.
    await page.fill("#room", "bad room!")
    await page.click("#join")
    await page.locator("#room-result", has_text="a room name is 1-48 of A-Z a-z 0-9 _ -").wait_for(
        timeout=10_000
    )
    await page.screenshot(path=str(os.environ.get("WSBUS_SCREENSHOTS", tmp_path)) + "/refused.png")


async def test_reconnecting_shows_one_line_per_state_change(demo: str, browser: Browser) -> None:
    page = await _open(browser, demo, "ray")
    url = await page.evaluate("window.wsbusClient.url")
    # Nothing listens there: every attempt fails until the URL is put back.
    await page.evaluate(f"window.wsbusClient.url = 'ws://127.0.0.1:{free_port()}/'")
    await page.evaluate("window.wsbusClient._ws.close(4507, 'test')")
    await page.wait_for_function("window.wsbusClient._attempt >= 3", timeout=15_000)
    await page.evaluate(f"window.wsbusClient.url = {url!r}")
    await page.wait_for_function("window.wsbusClient.connected", timeout=30_000)
    await page.wait_for_selector('#status[data-state="open"]', timeout=10_000)
    # One line for "lost, reconnecting", one for each connection; none per failed attempt.
    assert await page.locator("#events li.state").count() == 1
    assert await page.locator("#events li.welcome").count() == 2


async def _members(page: Page) -> list[str]:
    return [text.strip() for text in await page.locator("#members li.member").all_inner_texts()]


async def test_pages_in_a_room_see_each_other_come_and_go(demo: str, browser: Browser) -> None:
    amy = await _open(browser, demo, "amy")
    ben = await _open(browser, demo, "ben")
    # Ben's list came from chat.members; Amy's from her own list and Ben's join frame.
    await ben.locator("#members li.member", has_text="amy").wait_for(timeout=10_000)
    await amy.locator("#members li.member", has_text="ben").wait_for(timeout=10_000)
    assert "amy (you)" in await _members(amy) and "ben (you)" in await _members(ben)
    await ben.click("#leave")
    await ben.wait_for_selector('#room-result:has-text("left #lobby")', timeout=10_000)
    await amy.locator("#members li.member", has_text="ben").wait_for(
        state="detached", timeout=10_000
    )
    assert await ben.locator("#members li.member").count() == 0
    # A page that goes away leaves the list too.
    await ben.click("#join")
    await amy.locator("#members li.member", has_text="ben").wait_for(timeout=10_000)
    await ben.context.close()
    await amy.locator("#members li.member", has_text="ben").wait_for(
        state="detached", timeout=10_000
    )


async def test_a_reloaded_page_resumes_with_the_messages_it_missed_once_each(
    demo: str, browser: Browser, tmp_path: Path
) -> None:
    cat = await _open(browser, demo, "cat")
    dan = await _open(browser, demo, "dan")
    await cat.locator("#members li.member", has_text="dan").wait_for(timeout=10_000)

    async def say(page: Page, text: str) -> None:
        await page.fill("#text", text)
        await page.click("#say-form button")
        await page.locator("#messages li", has_text=text).wait_for(timeout=10_000)

    await say(cat, "before the reload")
    await dan.locator("#messages li", has_text="before the reload").wait_for(timeout=10_000)
    first = await dan.evaluate("window.wsbusClient.connId")
    # Dan reloads while Cat talks: some lines go out while Dan's page is away.
    sent = [f"while away {n}" for n in range(5)]

    async def talk() -> None:
        for text in sent:
            await say(cat, text)

    await asyncio.gather(dan.reload(), talk())
    await dan.wait_for_selector('#status[data-state="open"]', timeout=15_000)
    # Away for a while for sure: the page leaves, Cat talks, the page comes back.
    await dan.goto("about:blank")
    await say(cat, "while gone")
    await dan.goto(demo)
    await dan.wait_for_selector('#status[data-state="open"]', timeout=15_000)
    # The same session: nickname and room back, a new connection.
    await dan.locator("#nick-result", has_text="you are dan").wait_for(timeout=10_000)
    await dan.locator("#events li.resumed").first.wait_for(timeout=10_000)
    assert await dan.evaluate("window.wsbusClient.connId") != first
    for text in ["before the reload", *sent, "while gone"]:
        line = dan.locator("#messages li", has_text=text)
        await line.first.wait_for(timeout=10_000)
        assert await line.count() == 1, text
    # Still in the room, and its members list is right on both pages.
    await dan.locator("#members li.member", has_text="cat").wait_for(timeout=10_000)
    await say(dan, "back again")
    await cat.locator("#messages li", has_text="back again").wait_for(timeout=10_000)
    assert [m for m in await _members(cat) if m.startswith("dan")] == ["dan"]
    assert await dan.locator("#events li.resync").count() == 0
    await dan.screenshot(path=str(os.environ.get("WSBUS_SCREENSHOTS", tmp_path)) + "/resumed.png")


async def test_a_page_whose_session_cannot_resume_says_so(demo: str, browser: Browser) -> None:
    page = await _open(browser, demo, "eli")
    # A token that is not the gateway's (forged, or from an expired session).
    key = await page.evaluate("window.wsbusClient._storageKey")
    await page.evaluate(
        f"sessionStorage.setItem({key!r}, JSON.stringify("
        "{token: 'v1.AAAAAAAAAAAAAAAAAAAAAA.forged', positions: {'room.lobby': 'x:1'}}))"
    )
    await page.reload()
    await page.wait_for_selector('#status[data-state="open"]', timeout=15_000)
    await page.locator("#room-result", has_text="session not resumed").wait_for(timeout=10_000)
    assert "resume_failed" in await page.locator("#events li.resync").first.inner_text()
    assert await page.locator("#members li.member").count() == 0
    # A new session, and a usable one.
    await page.fill("#nick", "eli2")
    await page.click("#nick-form button[type=submit]")
    await page.wait_for_selector('#nick-result:has-text("you are eli2")', timeout=10_000)
