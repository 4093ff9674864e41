"""A TCP relay that delays every byte by a fixed time each way: the latency tc netem would add, for a kernel
without netem (tests/test_several_hosts.py puts it in front of Redis on the Redis host).

    python tests/delay_relay.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS

Each connection accepted is relayed to a connection of its own to the target; what one side sends is written to
the other ``DELAY_MS`` after it was read, in order, so the relay adds latency without changing the stream (TLS
passes through untouched). When either side closes, or its link breaks, both are closed. It prints ``ready`` once
it listens and runs until killed.
"""

from __future__ import annotations

import asyncio
import sys


async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it was read."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await chunks.get()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            if not data:
                break
            writer.write(data)
            await writer.drain()

    delivering = asyncio.ensure_future(deliver())
    try:
        while data := await reader.read(65536):
            chunks.put_nowait((loop.time() + delay, data))
        chunks.put_nowait((loop.time() + delay, b""))  # the end of the stream, delayed as the rest
        await delivering
    finally:
        delivering.cancel()
        writer.close()


async def main(listen_host: str, listen_port: int, target_host: str, target_port: int, delay: float) -> None:
    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(target_host, target_port)
        except OSError:
            client_writer.close()
            return
        both = [asyncio.ensure_future(carry(client_reader, server_writer, delay)),
                asyncio.ensure_future(carry(server_reader, client_writer, delay))]
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in both:
                task.cancel()
            client_writer.close()
            server_writer.close()

    server = await asyncio.start_server(relay, listen_host, listen_port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit(f"usage: {sys.argv[0]} LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS")
    host, port, target, target_port, delay_ms = sys.argv[1:]
    asyncio.run(main(host, int(port), target, int(target_port), float(delay_ms) / 1000))
