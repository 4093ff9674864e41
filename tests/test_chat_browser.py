"""The chat example in a real browser: two headless Chromium pages join one room and see each other.

`crossroads run` serves examples/chat (the page over the HTTP bridge, its WebSocket over the
WebSocket bridge) and Playwright drives Debian's /usr/bin/chromium (it cannot download a browser
here). Set CROSSROADS_SCREENSHOT=path to keep a screenshot of the page (docs/img/chat.png is one).
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
    # The page and its WebSocket only: the MQTT and IRC parts have tests of their own (test_chat_example.py).
    config.write_text((CHAT / "crossroads.toml").read_text().replace("port = 8000", f"port = {web}")
                      .replace('type = "mqtt"', 'type = "mqtt"\nenabled = false')
                      .replace('type = "irc"', 'type = "irc"\nenabled = false'))
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
