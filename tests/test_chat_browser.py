"""The chat example in a real browser: two headless Chromium pages join one room and see each other, on a
phone-wide page too, across a rename.

`crossroads run` serves examples/chat (the page over the HTTP bridge, its WebSocket over the
WebSocket bridge) and Playwright drives Debian's /usr/bin/chromium (it cannot download a browser
here). Set CROSSROADS_SCREENSHOT=path to keep a screenshot of the page (docs/img/chat.png is one), and of the
narrow page beside it (path with .narrow.png).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from servers import free_port, require_binary, wait_for_port
from test_cli import ENV
from test_daemons import Daemon

CHAT = Path(__file__).resolve().parent.parent / "examples" / "chat"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def chat_server(tmp_path, monkeypatch):
    web = free_port()
    config = tmp_path / "crossroads.toml"
    # The page and its WebSocket only: the MQTT, IRC and mail parts have tests of their own (test_chat_example.py).
    config.write_text((CHAT / "crossroads.toml").read_text().replace("port = 8000", f"port = {web}")
                      .replace('type = "mqtt"', 'type = "mqtt"\nenabled = false')
                      .replace('type = "irc"', 'type = "irc"\nenabled = false')
                      .replace('type = "email"', 'type = "email"\nenabled = false'))
    monkeypatch.setitem(ENV, "PYTHONPATH", os.pathsep.join([str(CHAT), ENV["PYTHONPATH"]]))
    daemon = Daemon(tmp_path, "chat", "run", "--config", str(config))
    try:
        daemon.wait_ready()
        wait_for_port(web, daemon.process)
        yield f"http://127.0.0.1:{web}"
        daemon.terminate()
    finally:
        daemon.close()


def test_two_pages_chat_in_one_room(chat_server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=require_binary("chromium"), args=CHROMIUM_ARGS)
        try:
            alice = browser.new_page()
            bob = browser.new_page()
            alice.goto(f"{chat_server}/chat/lobby/?name=alice")
            bob.goto(f"{chat_server}/chat/lobby/?name=bob")
            for page, name in ((alice, "alice"), (bob, "bob")):
                expect(page.locator("#status")).to_have_text(f"connected as {name}", timeout=15000)
            alice.fill("#text", "hello from alice")
            alice.click("button")
            for page in (alice, bob):
                expect(page.locator("#log li").last).to_have_text("[websocket] alice: hello from alice", timeout=15000)
            bob.fill("#text", "hi alice <b>not bold</b>")
            bob.press("#text", "Enter")
            expect(alice.locator("#log li").last).to_have_text("[websocket] bob: hi alice <b>not bold</b>",
                                                               timeout=15000)
            assert alice.locator("#log b").count() == 0, "a message was rendered as HTML"
            if os.environ.get("CROSSROADS_SCREENSHOT"):
                alice.screenshot(path=os.environ["CROSSROADS_SCREENSHOT"])
        finally:
            browser.close()


def test_narrow_page_and_renaming_lose_nothing(chat_server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=require_binary("chromium"), args=CHROMIUM_ARGS)
        try:
            phone = browser.new_page(viewport={"width": 390, "height": 844})  # an iPhone 12-14's CSS width
            other = browser.new_page()
            phone.goto(f"{chat_server}/chat/lobby/?name=carol")
            other.goto(f"{chat_server}/chat/lobby/?name=dave")
            for page, name in ((phone, "carol"), (other, "dave")):
                expect(page.locator("#status")).to_have_text(f"connected as {name}", timeout=15000)
            # Everything of the form is on the screen, side by side: nothing cut off, nothing to scroll to.
            boxes = {part: phone.locator(part).bounding_box() for part in ("#name", "#text", "button")}
            assert boxes["#name"]["x"] >= 0 and boxes["button"]["x"] + boxes["button"]["width"] <= 390, boxes
            assert boxes["#name"]["x"] + boxes["#name"]["width"] <= boxes["#text"]["x"], boxes
            assert boxes["#text"]["x"] + boxes["#text"]["width"] <= boxes["button"]["x"], boxes
            assert boxes["#text"]["width"] >= boxes["button"]["width"], boxes  # room to see what one types
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390
            if os.environ.get("CROSSROADS_SCREENSHOT"):
                phone.screenshot(path=str(Path(os.environ["CROSSROADS_SCREENSHOT"]).with_suffix(".narrow.png")))
            # A new name is a new socket; what is typed while it opens is sent on it, not dropped.
            phone.fill("#name", "caroline")
            phone.press("#name", "Tab")  # the name box's change event
            phone.fill("#text", "typed while renaming")
            phone.press("#text", "Enter")
            for page in (phone, other):
                expect(page.locator("#log li").last).to_have_text("[websocket] caroline: typed while renaming",
                                                                  timeout=15000)
            expect(phone.locator("#status")).to_have_text("connected as caroline")
            other.fill("#text", "hello caroline")
            other.press("#text", "Enter")
            expect(phone.locator("#log li").last).to_have_text("[websocket] dave: hello caroline", timeout=15000)
            assert phone.locator("#log li").count() == 2  # each line once: the old socket heard nothing twice
        finally:
            browser.close()
