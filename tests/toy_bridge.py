"""A toy bridge for the tests of bridges/base.py: a line-based TCP chat.

Each line a client sends becomes a ``toy.receive`` message with the keys every
``*.receive`` message carries (``reply_channel``, ``protocol``, ``sender``,
``room``, ``text``); each ``{"text": ...}`` on a connection's reply channel is
written back as a line, and ``{"close": True}`` closes the connection. Refusals
and bad input are answered with a line starting ``ERR``. It is also the
smallest complete example of a bridge (see docs/bridges.md).
"""

from __future__ import annotations

import asyncio

from twisted.internet import protocol
from twisted.protocols.basic import LineReceiver

from crossroads.bridges.base import Bridge, Inlet, Option, as_future, get_reactor
from crossroads.bridges.protocol import port_number, positive


class ToyConnection(LineReceiver):
    delimiter = b"\n"

    def connectionMade(self) -> None:
        self.bridge: ToyBridge = self.factory.bridge
        self.MAX_LENGTH = self.bridge.options["max_line"]
        address = self.transport.getPeer()
        self.peer = f"{address.host}:{address.port}"
        self.local_id = self.bridge.register(self)
        self.reply_channel = self.bridge.reply_channel(self.local_id)
        # Lines into the layer in the order they were said; a refused or oversized one is answered with ERR.
        self.inlet = Inlet(self.bridge, f"forwarding lines from {self.peer}", build=self._message,
                           refused=lambda channel, text: self.sendLine(b"ERR busy, say that again later"),
                           too_large=self._too_large)
        self.closed = asyncio.get_running_loop().create_future()  # close_protocol() waits for it

    def lineReceived(self, line: bytes) -> None:
        self.bridge.count("received")
        try:
            text = line.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            self.bridge.bad_input(self.peer, "line is not UTF-8")
            self.sendLine(b"ERR your line is not UTF-8")
            return
        if not self.bridge.accepting:
            self.sendLine(b"ERR shutting down, try another server")
            return
        self.inlet.put("toy.receive", text)

    def _message(self, channel: str, text: str) -> dict:
        return {"reply_channel": self.reply_channel, "protocol": "toy", "sender": self.peer,
                "room": self.bridge.options["room"], "text": text}

    def _too_large(self, channel: str, text: str) -> None:
        self.bridge.bad_input(self.peer, "line too large for the layer")
        self.sendLine(b"ERR line too large")

    def lineLengthExceeded(self, line: bytes) -> None:
        self.bridge.bad_input(self.peer, f"line longer than {self.MAX_LENGTH} bytes")
        self.sendLine(b"ERR line too long")
        self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        self.bridge.unregister(self.local_id)
        self.closed.set_result(None)


class ToyBridge(Bridge):
    type_name = "toy"
    OPTIONS = {
        "host": Option(str, "127.0.0.1", "the address to listen on"),
        "port": Option(int, 0, "the TCP port to listen on; 0 picks a free one", port_number, from_string=True),
        "room": Option(str, "lobby", "the room every line is said in"),
        "max_line": (int, 4096, "the longest line accepted, in bytes", positive),
    }

    async def open_protocol(self) -> None:
        self.accepting = True
        factory = protocol.Factory.forProtocol(ToyConnection)
        factory.bridge = self
        self.listening = get_reactor().listenTCP(self.options["port"], factory, interface=self.options["host"])
        self.port = self.listening.getHost().port

    async def stop_accepting(self) -> None:
        self.accepting = False
        await as_future(self.listening.stopListening())

    async def close_protocol(self) -> None:
        connections = list(self.targets.values())
        for connection in connections:
            connection.transport.loseConnection()  # after what is buffered has been written
        await asyncio.gather(*(connection.closed for connection in connections))

    def handle_reply(self, local_id: str, message: dict) -> None:
        connection = self.targets[local_id]
        text = message.get("text")
        if isinstance(text, str):
            for line in text.splitlines() or [""]:
                connection.sendLine(line.encode())
        elif text is not None:
            raise TypeError(f"a toy reply's text must be str, got {type(text).__name__}")
        if message.get("close"):
            connection.transport.loseConnection()
