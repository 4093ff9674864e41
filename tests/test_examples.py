"""The examples' consumers, through the test Client (the daemons that serve them are tested with the bridges)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from consumers.testing import Client

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
    assert client.receive() is None  # not a room name: no route, no page


def test_chat_broadcasts_with_names_across_protocols(chat):
    client = Client(chat.routes)
    alice = client.reply_channel
    bob = client.sync.new_channel("bob?")
    client.send_and_consume("websocket.connect", {"path": "/chat/lobby/", "query_string": b"name=alice"})
    client.send_and_consume("websocket.connect", {"path": "/chat/lobby/", "query_string": b"name=bob"},
                            reply_channel=bob)
    assert client.receive(alice) == {"accept": True} and client.receive(bob) == {"accept": True}
    client.send_and_consume("websocket.receive", {"path": "/chat/lobby/", "text": "hi bob"})
    assert client.receive(alice) == {"text": "alice: hi bob"}
    assert client.receive(bob) == {"text": "alice: hi bob"}
    # a message from another protocol in the same room reaches both sockets, with its own sender
    client.send_and_consume("mqtt.receive", {"path": "/chat/lobby/", "text": "sensor up", "sender": "probe"},
                            reply_channel="mqtt.replies!lobby")
    assert client.receive(alice) == {"text": "probe: sensor up"}
    # another room hears nothing
    carol = client.sync.new_channel("carol?")
    client.send_and_consume("websocket.connect", {"path": "/chat/kitchen/", "query_string": b"name=carol"},
                            reply_channel=carol)
    client.receive(carol)
    client.send_and_consume("websocket.receive", {"path": "/chat/lobby/", "text": "lobby only"})
    assert client.receive(carol) is None


def test_echo_answers_every_protocol():
    echo = load("echo")
    client = Client(echo.routes)
    client.send_and_consume("http.request", {"path": "/x", "body": b"ping", "method": "POST"})
    assert client.receive()["content"] == b"ping"
    client.send_and_consume("websocket.connect", {"path": "/"})
    assert client.receive() == {"accept": True}
    for channel in ("websocket.receive", "mqtt.receive", "irc.receive", "email.receive", "slack.receive"):
        client.send_and_consume(channel, {"text": f"via {channel}"})
        assert client.receive() == {"text": f"via {channel}"}
    client.send_and_consume("websocket.receive", {"bytes": b"\x00\x01"})
    assert client.receive() == {"bytes": b"\x00\x01"}
