"""The examples' consumers, through the test Client (the daemons that serve them are tested with the bridges).

The Django chat's consumers are tested by its own ``manage.py test`` (in a subprocess: this process may have
Django set up with another project already), the way docs/django.md shows for a Django project.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import CROSSROADS, ENV

from crossroads.bridges.irc import messages as irc_messages
from crossroads.bridges.mqtt import messages as mqtt_messages
from crossroads.bridges.websocket import messages as websocket_messages
from crossroads.consumers.testing import Client

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    """Import examples/<name>/<name>.py as crossroads does: its folder on the import path."""
    folder = str(EXAMPLES / name)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / name / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def chat():
    return load("chat")


def test_chat_serves_its_page_with_the_room_escaped(chat):
    client = Client(chat.routes)
    client.send_and_consume("http.request", {"path": "/chat/lobby/", "method": "GET"})
    response = client.receive()
    assert response["status"] == 200
    assert b"Room <span id=\"room\">lobby</span>" in response["content"]
    client.send_and_consume("http.request", {"path": "/", "method": "GET"})
    assert client.receive()["headers"] == [[b"location", b"/chat/lobby/"]]
    client.send("http.request", {"path": "/chat/<script>/", "method": "GET"})
    client.consume("http.request")
    assert client.receive()["status"] == 404  # not a room name: no route, no page, and no wait for one


def test_chat_broadcasts_with_names_across_protocols(chat):
    client = Client(chat.routes)
    alice = client.reply_channel
    bob = client.sync.new_channel("bob?")
    irc_lobby, mqtt_lobby = "irc-client.chat?lobby", "mqtt.chat?lobby"
    client.send_and_consume("websocket.connect", {"path": "/chat/lobby/", "query_string": b"name=alice"})
    client.send_and_consume("websocket.connect", {"path": "/chat/lobby/", "query_string": b"name=bob"},
                            reply_channel=bob)
    assert client.receive(alice) == {"accept": True} and client.receive(bob) == {"accept": True}
    client.send_and_consume("websocket.receive", {"path": "/chat/lobby/", "text": "hi bob", "protocol": "websocket"})
    assert client.receive(alice) == {"text": "[websocket] alice: hi bob"}
    assert client.receive(bob) == {"text": "[websocket] alice: hi bob"}
    # The IRC bridge joining #lobby puts the channel in the room; someone else joining does not add it twice.
    client.send_and_consume("irc-client.join", {"channel": "#lobby", "ours": True, "protocol": "irc"},
                            reply_channel=irc_lobby)
    client.send_and_consume("irc-client.join", {"channel": "#lobby", "ours": False, "protocol": "irc"},
                            reply_channel=irc_lobby)
    # MQTT has no join: publishing on chat/lobby is what puts the topic in the room.
    client.send_and_consume("mqtt.receive", {"topic": "chat/lobby", "text": "sensor up", "sender": "probe",
                                             "protocol": "mqtt"}, reply_channel=mqtt_lobby)
    said = {"text": "[mqtt] probe: sensor up"}
    assert [client.receive(c) for c in (alice, bob, irc_lobby, mqtt_lobby)] == [said] * 4
    assert client.receive(irc_lobby) is None  # once: the second join changed nothing
    client.send_and_consume("irc-client.receive", {"channel": "#lobby", "room": "#lobby", "text": "hello all",
                                                   "sender": "carol", "protocol": "irc"}, reply_channel=irc_lobby)
    said = {"text": "[irc] carol: hello all"}
    assert [client.receive(c) for c in (alice, bob, mqtt_lobby)] == [said] * 3
    assert client.receive(irc_lobby) is None  # #lobby saw carol's line itself: the bot does not repeat it
    # A private IRC message gets a hint, and nothing is broadcast.
    client.send_and_consume("irc-client.receive", {"channel": None, "room": "carol", "text": "hi bot",
                                                   "sender": "carol", "protocol": "irc"}, reply_channel="irc.x?carol")
    assert "join #lobby" in client.receive("irc.x?carol")["text"]
    assert client.receive(alice) is None
    # Another room hears nothing; a socket that left hears nothing more.
    carol = client.sync.new_channel("carol?")
    client.send_and_consume("websocket.connect", {"path": "/chat/kitchen/", "query_string": b"name=carol"},
                            reply_channel=carol)
    client.receive(carol)
    client.send_and_consume("websocket.disconnect", {"path": "/chat/lobby/", "code": 1000}, reply_channel=bob)
    client.send_and_consume("websocket.receive", {"path": "/chat/lobby/", "text": "lobby only",
                                                  "protocol": "websocket"})
    assert client.receive(carol) is None and client.receive(bob) is None
    assert client.receive(alice) == {"text": "[websocket] alice: lobby only"}


def test_chat_takes_mail_to_a_room_address_and_slack_channels_by_name(chat):
    client = Client(chat.routes)
    alice = client.reply_channel
    thread, other_thread = "email.chat?thread1", "email.chat?thread2"
    lobby_slack, unnamed_slack, dm = "slack.chat?C1", "slack.chat?C9", "slack.chat?D1"
    client.send_and_consume("websocket.connect", {"path": "/chat/lobby/", "query_string": b"name=alice"})
    assert client.receive(alice) == {"accept": True}

    def mail(text: str, to: list[str], reply_channel: str = thread, **more) -> None:
        client.send_and_consume("email.receive", {"to": to, "text": text, "sender": "erin@example.org",
                                                  "protocol": "email", "auto": None, **more},
                                reply_channel=reply_channel)

    def slack(text: str, reply_channel: str = lobby_slack, **more) -> None:
        client.send_and_consume("slack.receive", {"channel_name": "lobby", "text": text, "sender": "frank",
                                                  "protocol": "slack", "private": False, **more},
                                reply_channel=reply_channel)

    # The room is the local part of the first address at chat.localhost, whatever its case; the thread joins.
    mail("hello by mail", ["someone@elsewhere.example", "Lobby@Chat.Localhost"])
    assert client.receive(alice) == {"text": "[email] erin@example.org: hello by mail"}
    assert client.receive(thread) is None  # erin's own line is not mailed back to her
    client.send_and_consume("websocket.receive", {"path": "/chat/lobby/", "text": "hi erin", "protocol": "websocket"})
    assert client.receive(thread) == {"text": "[websocket] alice: hi erin"} == client.receive(alice)
    # Automatic mail is nobody's line: not relayed, and the thread it came in does not join.
    mail("I am away", ["lobby@chat.localhost"], other_thread, auto="auto-replied")
    mail("a list post", ["kitchen@chat.localhost"], other_thread, auto="list")
    assert client.receive(alice) is None
    # A mail to another address of the bridge's domains is not the chat's.
    mail("to nobody", ["postmaster@chat.localhost"], other_thread)
    assert client.receive(alice) is None
    # A named Slack channel is the room of its name; it joins by speaking, and does not hear its own line.
    slack("hello from Slack")
    assert client.receive(alice) == {"text": "[slack] frank: hello from Slack"}
    assert client.receive(thread) == {"text": "[slack] frank: hello from Slack"}
    assert client.receive(lobby_slack) is None
    mail("and mail again", ["lobby@chat.localhost"])
    assert client.receive(lobby_slack) == {"text": "[email] erin@example.org: and mail again"} == client.receive(alice)
    assert client.receive(thread) is None
    # A channel whose name is not known yet is asked to say it again; a DM gets the hint; neither is relayed.
    slack("too early", unnamed_slack, channel_name=None)
    assert "say that again" in client.receive(unnamed_slack)["text"]
    slack("hi bot", dm, channel_name=None, private=True)
    assert "join #lobby" in client.receive(dm)["text"]
    slack("in #random-ish", "slack.chat?C5", channel_name="not a room")  # a name no room has: nothing
    assert client.receive("slack.chat?C5") is None
    assert client.receive(alice) is None and client.receive(thread) is None


def test_echo_answers_every_protocol():
    echo = load("echo")
    client = Client(echo.routes)
    client.send_and_consume("http.request", {"path": "/x", "body": b"ping", "method": "POST"})
    assert client.receive()["content"] == b"ping"
    client.send_and_consume("websocket.connect", {"path": "/"})
    assert client.receive() == {"accept": True}
    # The channels as the bridges name them, not typed again here (the example once routed "irc.receive").
    for channel in (websocket_messages.RECEIVE, mqtt_messages.RECEIVE, irc_messages.RECEIVE):
        client.send_and_consume(channel, {"text": f"via {channel}"})
        assert client.receive() == {"text": f"via {channel}"}
    client.send_and_consume("websocket.receive", {"bytes": b"\x00\x01"})
    assert client.receive() == {"bytes": b"\x00\x01"}


def test_django_chat_passes_crossroads_check_and_its_own_django_tests(tmp_path):
    folder = EXAMPLES / "django_chat"
    # The config's folder is on the import path (crossroads) and manage.py's (Python): no PYTHONPATH for the project.
    env = {**ENV, "DJANGO_CHAT_DB": str(tmp_path / "db.sqlite3")}  # never the repository's db.sqlite3
    checked = subprocess.run([CROSSROADS, "check", "--config", str(folder / "crossroads.toml")], env=env,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
    assert "django: chatsite.settings" in checked.stdout and "system checks passed" in checked.stdout
    assert "routing: chatroom.consumers:routes consumes http.disconnect, http.request" in checked.stdout  # appended
    tested = subprocess.run([sys.executable, "manage.py", "test", "chatroom"], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=180)
    assert tested.returncode == 0 and "Ran 2 tests" in tested.stderr, tested.stderr
