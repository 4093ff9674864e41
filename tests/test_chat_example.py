"""The chat example as deployed: every part its own process over Redis, real clients of every protocol.

`crossroads bridge web` (HTTP and its WebSocket bridge on one port), `crossroads bridge mqtt`,
`crossroads bridge irc` and `crossroads worker` run from examples/chat/crossroads.toml (only the
addresses changed) against a redis-server, a mosquitto and an ngircd the test starts. A browser's
WebSocket, a mosquitto_sub/mosquitto_pub pair and an IRC user written here each see what the
others say. Every wait has a deadline.
"""

from __future__ import annotations

import os
import socket
import subprocess
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


def chat_config(tmp_path: Path, redis_url: str, web_port: int, mosquitto: MosquittoServer, irc: NgircdServer) -> str:
    text = (CHAT / "crossroads.toml").read_text()
    for old, new in (("port = 8000", f"port = {web_port}"), ("mqtt://127.0.0.1:1883", mosquitto.url),
                     ("irc://127.0.0.1:6667", irc.url), ("[routing]", f'[layer]\nurl = "{redis_url}"\n\n[routing]')):
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
