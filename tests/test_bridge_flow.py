"""bridges/flow.py's ``write_now`` on real loopback connections: straight to the socket when nothing waits, in
order behind what does, and through Twisted's own buffering, producer pauses and lost connections otherwise.
"""

from __future__ import annotations

import asyncio

from twisted.internet.protocol import Factory, Protocol

from crossroads.bridges.flow import write_now
from crossroads.bridges.reactor import as_future


class Server(Protocol):
    def connectionMade(self) -> None:  # noqa: N802
        self.lost = asyncio.get_running_loop().create_future()
        self.factory.made.set_result(self)

    def connectionLost(self, reason) -> None:  # noqa: N802
        self.lost.set_result(reason)


async def close(server, writer, port) -> None:
    writer.close()
    server.transport.loseConnection()
    await asyncio.wait_for(server.lost, 10)
    await as_future(port.stopListening())


async def connected(reactor):
    """A listening Twisted protocol and an asyncio client connected to it: (server protocol, reader, writer, port)."""
    factory = Factory.forProtocol(Server)
    factory.made = asyncio.get_running_loop().create_future()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    reader, writer = await asyncio.open_connection("127.0.0.1", port.getHost().port)
    server = await asyncio.wait_for(factory.made, 10)
    return server, reader, writer, port


def test_a_write_to_an_idle_socket_leaves_at_once(run, reactor):
    async def scenario():
        server, reader, writer, port = await connected(reactor)
        write_now(server.transport, b"hello")
        held = bool(server.transport.dataBuffer or server.transport._tempDataBuffer)
        got = await asyncio.wait_for(reader.readexactly(5), 10)
        await close(server, writer, port)
        return held, got

    held, got = run(scenario())
    assert not held and got == b"hello"  # nothing was left for the reactor to write later


def test_what_the_socket_cannot_take_is_buffered_and_later_writes_go_behind_it(run, reactor):
    big = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than loopback's socket buffers take at once

    async def scenario():
        server, reader, writer, port = await connected(reactor)
        paused = []

        class Producer:
            def pauseProducing(self):  # noqa: N802
                paused.append(True)

            def resumeProducing(self):  # noqa: N802
                pass

            def stopProducing(self):  # noqa: N802
                pass

        server.transport.registerProducer(Producer(), True)
        write_now(server.transport, big)
        buffered = server.transport._tempDataLen + len(server.transport.dataBuffer)
        write_now(server.transport, b"tail")
        got = await asyncio.wait_for(reader.readexactly(len(big) + 4), 30)
        server.transport.unregisterProducer()
        await close(server, writer, port)
        return buffered, paused, got

    buffered, paused, got = run(scenario(), timeout=60)
    assert 0 < buffered < len(big) and paused  # part went at once, the rest waited and paused the producer
    assert got == big + b"tail"


def test_a_write_after_the_peer_left_is_dropped_as_twisted_drops_it(run, reactor):
    async def scenario():
        server, reader, writer, port = await connected(reactor)
        writer.transport.abort()
        while not server.lost.done():
            write_now(server.transport, b"x" * 65536)  # until the reset is seen: never raises
            await asyncio.sleep(0.01)
        write_now(server.transport, b"after")
        await as_future(port.stopListening())
        return server.transport.connected

    assert not run(scenario())
