"""The chat example as deployed: every part its own process over Redis, real clients of every protocol.

`crossroads bridge web` (HTTP and its WebSocket bridge on one port), `crossroads bridge mqtt`,
`crossroads bridge irc` and `crossroads worker` run from examples/chat/crossroads.toml (only the
addresses changed) against a redis-server, a mosquitto and an ngircd the test starts. A browser's
WebSocket, a mosquitto_sub/mosquitto_pub pair and an IRC user written here each see what the
others say. The second test adds `crossroads bridge email` (swaks sends the mail, the tests'
aiosmtpd smarthost receives the replies) and the commented-out `crossroads bridge slack` (its
real slack-sdk against tests/slack_emulator.py), with a real Chromium page as the browser. Every
wait has a deadline.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from servers import MosquittoServer, NgircdServer, free_port, require_binary, wait_for_port
from test_cli import ENV
from test_daemons import Daemon
from websockets.sync.client import connect

CHAT = Path(__file__).resolve().parent.parent / "examples" / "chat"


class IrcUser:
    """A person on IRC, as a raw socket: registers, joins, says lines, and reads what the server relays."""

    def __init__(self, port: int, nick: str) -> None:
        self.nick = nick
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        self.send(f"NICK {nick}", f"USER {nick} 0 * :{nick}")
        self.expect(lambda line: line.split()[1:2] == ["001"], "registration (001)")

    def send(self, *lines: str) -> None:
        self.sock.sendall("".join(line + "\r\n" for line in lines).encode())

    def lines(self, deadline: float):
        while time.monotonic() < deadline:
            while b"\r\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\r\n", 1)
                text = line.decode("utf-8", "replace")
                if text.startswith("PING"):
                    self.send("PONG" + text[4:])
                    continue
                yield text
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return
            if not data:
                return
            self.buffer += data

    def expect(self, wanted, what: str, timeout: float = 20) -> str:
        seen = []
        for line in self.lines(time.monotonic() + timeout):
            if wanted(line):
                return line
            seen.append(line)
        raise AssertionError(f"{self.nick} saw no {what} within {timeout} s; saw {seen[-10:]}")

    def close(self) -> None:
        self.sock.close()


def chat_config(tmp_path: Path, redis_url: str, web_port: int, mosquitto: MosquittoServer, irc: NgircdServer,
                more: tuple[tuple[str, str], ...] = (), mail_port: int | None = None) -> str:
    text = (CHAT / "crossroads.toml").read_text()
    for old, new in (("port = 8000", f"port = {web_port}"), ("mqtt://127.0.0.1:1883", mosquitto.url),
                     ("irc://127.0.0.1:6667", irc.url), ("[routing]", f'[layer]\nurl = "{redis_url}"\n\n[routing]'),
                     ("port = 2525", f"port = {mail_port or free_port()}"), *more):
        assert old in text, f"examples/chat/crossroads.toml no longer has {old!r}"
        text = text.replace(old, new)
    path = tmp_path / "crossroads.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def chat_env(monkeypatch):
    monkeypatch.setitem(ENV, "PYTHONPATH", os.pathsep.join([str(CHAT), ENV["PYTHONPATH"]]))


def test_browser_mqtt_and_irc_users_talk_in_one_room(tmp_path, redis_server, chat_env):
    mosquitto = MosquittoServer(tmp_path / "mosquitto").start()
    irc = NgircdServer(tmp_path / "ngircd", max_nick_length=9).start()  # Debian's default, as docs/chat.md uses
    web_port = free_port()
    config = chat_config(tmp_path, redis_server.url, web_port, mosquitto, irc)
    carol = IrcUser(irc.port, "carol")
    carol.send("JOIN #lobby")
    daemons = [Daemon(tmp_path, name, *args, "--config", config)
               for name, *args in (("web", "bridge", "web"), ("mqtt", "bridge", "mqtt"), ("irc", "bridge", "irc"),
                                   ("worker", "worker"))]
    listener = None
    try:
        for daemon in daemons:
            daemon.wait_ready()
        wait_for_port(web_port, daemons[0].process)
        carol.expect(lambda line: line.startswith(":crossroad!") and "JOIN" in line, "the bridge joining #lobby")
        mosquitto.wait_for_log("Sending SUBACK to crossroads-mqtt", 20)
        listener = subprocess.Popen([require_binary("mosquitto_sub"), "-p", str(mosquitto.port), "-V", "5",
                                     "-i", "dave-sub", "-t", "chat/lobby/out"],
                                    stdout=subprocess.PIPE, text=True)
        mosquitto.wait_for_log("Sending SUBACK to dave-sub", 20)
        with connect(f"ws://127.0.0.1:{web_port}/chat/lobby/?name=alice", origin=f"http://127.0.0.1:{web_port}",
                     open_timeout=20) as alice:

            def publish(text: str) -> None:
                subprocess.run([require_binary("mosquitto_pub"), "-p", str(mosquitto.port), "-V", "5", "-q", "1",
                                "-t", "chat/lobby", "-m", text, "-D", "publish", "user-property", "sender", "dave"],
                               check=True, timeout=20)

            def everyone_sees(said: str, irc: bool = True) -> None:
                assert alice.recv(timeout=20) == said
                if irc:
                    carol.expect(lambda line: line.endswith(f"PRIVMSG #lobby :{said}"), repr(said))
                assert listener.stdout.readline().rstrip("\n") == said  # mosquitto_sub prints each payload

            publish("dave here, over MQTT")  # MQTT has no join: the first publish puts chat/lobby in the room
            everyone_sees("[mqtt] dave: dave here, over MQTT")
            alice.send("hello from the browser")
            everyone_sees("[websocket] alice: hello from the browser")
            carol.send("PRIVMSG #lobby :hi from IRC, with ünïcode")
            everyone_sees("[irc] carol: hi from IRC, with ünïcode", irc=False)
            alice.send("and back")  # what the bot says next in #lobby is this, not carol's own line again
            everyone_sees("[websocket] alice: and back", irc=False)
            assert carol.expect(lambda line: " PRIVMSG #lobby :" in line, "the bot's next line").endswith(
                "PRIVMSG #lobby :[websocket] alice: and back")
        for daemon in reversed(daemons):
            daemon.terminate()
    finally:
        if listener is not None:
            listener.kill()
        carol.close()
        for daemon in daemons:
            daemon.close()
        irc.stop()
        mosquitto.stop()


class Lines:
    """A process's output lines (mosquitto_sub's payloads), read in a thread so that each wait has a deadline."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.queue.put(line.rstrip("\n"))

    def next(self, what: str, timeout: float = 20) -> str:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"mosquitto_sub printed no {what} within {timeout} s") from None


@pytest.mark.timeout(300)
def test_every_protocol_talks_in_one_room(tmp_path, redis_server, chat_env, daemons):
    """A Chromium page, an MQTT client, an IRC user, a mail client and a Slack user in #lobby: each one's line
    reaches every other one as "[protocol] sender: text"; the IRC and Slack channels and the mail thread do not get
    their own lines back, the browser and the MQTT subscriber do (as the room's other members' lines)."""
    from email import message_from_bytes, policy

    from playwright.sync_api import expect, sync_playwright
    from servers import Smarthost
    from test_chat_browser import CHROMIUM_ARGS
    from test_slack_bridge import ThreadedEmulator, post, texts

    swaks = require_binary("swaks")
    chromium = require_binary("chromium")
    mosquitto = MosquittoServer(tmp_path / "mosquitto").start()
    irc = NgircdServer(tmp_path / "ngircd", max_nick_length=9).start()
    smarthost = Smarthost().start()  # a plain local MTA, as docs/chat.md's `python -m aiosmtpd`
    slack = ThreadedEmulator(users={"U222": "frank"}, channels={"C111": "lobby"}, posts_per_window=100)
    emulator = slack.emulator
    web_port, mail_port = free_port(), free_port()
    # The bundled config, its Slack part uncommented and pointed at the emulator (api_url), the tokens as the
    # commented lines take them: the bot token from the environment, the app token from a credential.
    text = (CHAT / "crossroads.toml").read_text()
    slack_table = text[text.index("# [bridges.slack]"):]
    config = chat_config(tmp_path, redis_server.url, web_port, mosquitto, irc, (
        ("smtp://127.0.0.1:2526", smarthost.url),
        (slack_table, "".join(line.removeprefix("# ") for line in slack_table.splitlines(keepends=True))
         + f'api_url = "{emulator.api_url}"\n')), mail_port=mail_port)
    (tmp_path / "credentials").mkdir()
    (tmp_path / "credentials" / "slack-app-token").write_text(emulator.app_token)
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path / "credentials"), "SLACK_BOT_TOKEN": emulator.bot_token}
    carol = IrcUser(irc.port, "carol")
    carol.send("JOIN #lobby")
    listener = None
    started = [Daemon(tmp_path, name, *args, "--config", config, env=env)
               for name, *args in (("web", "bridge", "web"), ("mqtt", "bridge", "mqtt"), ("irc", "bridge", "irc"),
                                   ("email", "bridge", "email"), ("slack", "bridge", "slack"), ("worker", "worker"))]
    daemons += started
    try:
        for daemon in started:
            daemon.wait_ready(90)  # six Python processes importing at once on a shared machine
        wait_for_port(web_port, started[0].process)
        wait_for_port(mail_port, started[3].process)
        carol.expect(lambda line: line.startswith(":crossroad!") and "JOIN" in line, "the bridge joining #lobby")
        mosquitto.wait_for_log("Sending SUBACK to crossroads-mqtt", 20)
        slack.call(emulator.wait_for(lambda: emulator.hellos == 1, timeout=20, what="the bridge's Socket Mode link"))
        listener = subprocess.Popen([require_binary("mosquitto_sub"), "-p", str(mosquitto.port), "-V", "5",
                                     "-i", "dave-sub", "-t", "chat/lobby/out"], stdout=subprocess.PIPE, text=True)
        dave = Lines(listener)
        mosquitto.wait_for_log("Sending SUBACK to dave-sub", 20)

        def publish(text: str) -> None:
            subprocess.run([require_binary("mosquitto_pub"), "-p", str(mosquitto.port), "-V", "5", "-q", "1",
                            "-t", "chat/lobby", "-m", text, "-D", "publish", "user-property", "sender", "dave"],
                           check=True, timeout=20)

        def mail(body: str, *headers: str) -> None:
            subprocess.run([swaks, "--server", f"127.0.0.1:{mail_port}", "--from", "erin@example.org",
                            "--to", "lobby@chat.localhost", "--header", "Subject: Lobby", "--body", body,
                            *[part for header in headers for part in ("--add-header", header)]],
                           check=True, timeout=30, capture_output=True)

        posts = iter(range(1, 1000))

        def say_on_slack(text: str) -> None:
            slack.call(emulator.send_event(post(text, f"17000000{next(posts):02d}.000100", channel="C111",
                                                user="U222")))

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                alice = browser.new_page()
                alice.goto(f"http://127.0.0.1:{web_port}/chat/lobby/?name=alice")
                expect(alice.locator("#status")).to_have_text("connected as alice", timeout=20000)
                shown = alice.locator("#log li")

                def page_shows(said: str) -> None:
                    expect(shown.last).to_have_text(said, timeout=20000)

                # MQTT, Slack and mail have no "join": a first line is what puts each in the room.
                publish("dave joins")
                page_shows("[mqtt] dave: dave joins")
                assert dave.next("join line") == "[mqtt] dave: dave joins"
                assert carol.expect(lambda line: " PRIVMSG #lobby :" in line, "the bot's line").endswith(
                    ":[mqtt] dave: dave joins")
                # The bridge learns #lobby's and frank's names with this first post (it waits for the lookups).
                say_on_slack("frank joins")
                page_shows("[slack] frank: frank joins")
                for heard in (dave.next("Slack's join line"), carol.expect(lambda line: " PRIVMSG #lobby :" in line,
                                                                          "the bot's line")):
                    assert heard.endswith("[slack] frank: frank joins")
                mail("erin joins")
                page_shows("[email] erin@example.org: erin joins")
                assert dave.next("mail's join line") == "[email] erin@example.org: erin joins"
                assert carol.expect(lambda line: " PRIVMSG #lobby :" in line, "the bot's line").endswith(
                    ":[email] erin@example.org: erin joins")
                slack.call(emulator.wait_for(lambda: len(texts(emulator, "C111")) == 1, timeout=20,
                                             what="erin's line in #lobby"))  # frank's own not: #lobby has it
                assert texts(emulator, "C111")[0] == "[email] erin@example.org: erin joins"

                # Now one line from each, in turn; each waits for everyone to hear it before the next.
                said_by = {
                    "websocket": "[websocket] alice: hello from Chromium",
                    "mqtt": "[mqtt] dave: hello from MQTT",
                    "irc": "[irc] carol: hello from IRC, ünïcode",
                    "email": "[email] erin@example.org: hello by mail",
                    "slack": "[slack] frank: hello from Slack & co",
                }
                mails = 0
                for protocol, said in said_by.items():
                    if protocol == "websocket":
                        alice.fill("#text", "hello from Chromium")
                        alice.press("#text", "Enter")
                    elif protocol == "mqtt":
                        publish("hello from MQTT")
                    elif protocol == "irc":
                        carol.send("PRIVMSG #lobby :hello from IRC, ünïcode")
                    elif protocol == "email":  # a reply in the thread, as a mail client writes it
                        reply = message_from_bytes(smarthost.received[-1]["data"], policy=policy.default)
                        mail("hello by mail\n\n> " + reply.get_content().strip(), f"In-Reply-To: {reply['Message-ID']}",
                             f"References: {reply['References']} {reply['Message-ID']}", )
                    else:
                        say_on_slack("hello from Slack &amp; co")
                    page_shows(said)  # the browser shows every line, its own too
                    assert dave.next(repr(said)) == said  # so does the MQTT subscriber
                    if protocol != "irc":
                        assert carol.expect(lambda line: " PRIVMSG #lobby :" in line, "the bot's line").endswith(
                            f"PRIVMSG #lobby :{said}")
                    if protocol != "slack":
                        slack.call(emulator.wait_for(lambda said=said: said in texts(emulator, "C111"), timeout=20,
                                                     what=said))
                    if protocol != "email":
                        mails += 1
                        smarthost.wait_for(mails, timeout=20)
                assert [line.inner_text() for line in shown.all()][-5:] == list(said_by.values())
            finally:
                browser.close()

        # Every channel heard exactly the others' lines: the Slack channel none of its own, the IRC channel none of
        # carol's (the next line the bot said after hers was erin's), the mail thread none of erin's.
        assert texts(emulator, "C111")[1:] == [said_by[p] for p in ("websocket", "mqtt", "irc", "email")]
        replies = [message_from_bytes(entry["data"], policy=policy.default) for entry in smarthost.received]
        assert [entry["rcpt_tos"] for entry in smarthost.received] == [["erin@example.org"]] * 4
        assert [r.get_content().strip() for r in replies] == [said_by[p] for p in ("websocket", "mqtt", "irc", "slack")]
        assert {r["From"] for r in replies} == {"lobby@chat.localhost"} and {r["Subject"] for r in replies} == {
            "Re: Lobby"}
        first_id = replies[0]["References"].split()[0]  # erin's first mail: every reply is in its thread
        assert all(r["References"].split()[0] == first_id for r in replies)
        assert replies[-1]["In-Reply-To"] != replies[0]["In-Reply-To"]  # the last answers erin's reply
        for daemon in reversed(started):
            log = daemon.terminate()
            assert emulator.app_token not in log and emulator.bot_token not in log
    finally:
        if listener is not None:
            listener.kill()
        carol.close()
        for daemon in started:
            daemon.close()
        slack.close()
        smarthost.stop()
        irc.stop()
        mosquitto.stop()
