"""The Python load clients of ``bench/web.py``, one mode per run, each printing one JSON line.

Runs in ``.venv`` (the ``websockets`` library), pinned by the bench to the core the servers do not
use, and drives crossroads and Daphne identically::

    python bench/_web_load.py '{"mode": "http", ...}'    # keep-alive HTTP at a fixed rate (open loop)
    python bench/_web_load.py '{"mode": "echo", ...}'    # WebSocket echo, N clients, closed loop
    python bench/_web_load.py '{"mode": "broadcast", ...}'  # one member sends, every member must receive
    python bench/_web_load.py '{"mode": "idle", ...}'    # open N sockets, print "ready", hold until stdin closes

Saturated HTTP throughput is wrk's job (``bench/web.py``); this client only does the fixed rate, where
wrk 4 (Debian's) cannot pace requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect

TEXT = "x" * 100  # a short chat line


def now_ns() -> int:
    return time.monotonic_ns()  # system-wide, so the bench can compare it with other processes' clocks


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def ws_connect(url: str) -> ClientConnection:
    # No compression and no client pings: the servers differ in what they negotiate by default, and the
    # figures must be the servers' cost of plain frames. Large open_timeout: a server under a connect
    # storm may hold handshakes a while; that is measured elsewhere, not failed here.
    return await connect(url, compression=None, ping_interval=None, open_timeout=60, max_queue=None)


async def open_many(url: str, count: int, concurrency: int,
                    failed: list[str] | None = None) -> list[ClientConnection]:
    """``count`` sockets, at most ``concurrency`` handshakes at a time (the layer's connect channel
    holds 100 messages by default; a storm above it would be refused with 503, by design). A failed
    handshake raises, unless ``failed`` is given: then it is described there and the rest are kept."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> ClientConnection:
        async with gate:
            return await ws_connect(url)

    opened = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=failed is not None)
    if failed is not None:
        failed += [f"{type(ws).__name__}: {ws}" for ws in opened if isinstance(ws, BaseException)]
    return [ws for ws in opened if not isinstance(ws, BaseException)]


# -- HTTP at a fixed rate --


async def read_response(reader: asyncio.StreamReader) -> int:
    """One HTTP/1.1 response (Content-Length or chunked); its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if b":" in line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:
        await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def http_fixed_rate(spec: dict[str, Any]) -> dict[str, Any]:
    """Requests scheduled every 1/rate s whatever the server does (open loop), on ``connections``
    keep-alive connections. Latency runs from the scheduled time, not from when a connection was free,
    so a stalled server shows in the figures instead of slowing the clock (no coordinated omission)."""
    url = urlsplit(spec["url"])
    request = f"GET {url.path or '/'} HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n".encode()
    rate, warmup, seconds = spec["rate"], spec["warmup"], spec["seconds"]
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    latencies: list[int] = []
    errors = {"status": 0, "late_start": 0}
    measure_from = now_ns() + round(warmup * 1e9)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        while (scheduled := await queue.get()) is not None:
            writer.write(request)
            status = await read_response(reader)
            done = now_ns()
            if status != 200:
                errors["status"] += 1
            if scheduled >= measure_from:
                latencies.append(done - scheduled)
        writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(spec["connections"])]
    await asyncio.sleep(0.2)  # connections open before the clock starts
    start = now_ns()
    total = round(rate * (warmup + seconds))
    for i in range(total):
        scheduled = start + round(i * 1e9 / rate)
        delay = (scheduled - now_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait(scheduled)
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(*workers), 60)
    return {"latencies_ns": latencies, "sent": total, "errors": errors, "cpu_seconds": time.process_time()}


# -- WebSocket echo --


async def echo(spec: dict[str, Any]) -> dict[str, Any]:
    """``clients`` sockets, each sending a message and waiting for it to come back, in a loop."""
    sockets = await open_many(spec["url"], spec["clients"], spec.get("concurrency", 50))
    warmup_ns, window_ns = round(spec["warmup"] * 1e9), round(spec["seconds"] * 1e9)
    start = now_ns()
    measure_from, measure_to = start + warmup_ns, start + warmup_ns + window_ns
    latencies: list[int] = []
    counted = [0, 0]  # round trips in the measured window, and in all
    cpu: list[float] = []

    async def client(ws: ClientConnection) -> None:
        while (sent := now_ns()) < measure_to:
            await ws.send(TEXT)
            reply = await ws.recv()
            done = now_ns()
            if reply != TEXT:
                raise RuntimeError(f"echo returned {reply!r}")
            counted[1] += 1
            if measure_from <= done < measure_to:
                counted[0] += 1
                latencies.append(done - sent)

    async def mark() -> None:  # this client's CPU over the measured window: is the load client the limit?
        await asyncio.sleep(spec["warmup"])
        cpu.append(time.process_time())
        await asyncio.sleep(spec["seconds"])
        cpu.append(time.process_time())

    await asyncio.gather(mark(), *(client(ws) for ws in sockets))
    await asyncio.gather(*(ws.close() for ws in sockets))
    return {"messages": counted[0], "round_trips": counted[1], "seconds": spec["seconds"], "latencies_ns": latencies,
            "client_cpu_seconds": cpu[1] - cpu[0]}


# -- broadcast --


async def broadcast(spec: dict[str, Any]) -> dict[str, Any]:
    """``members`` sockets join the group (the server adds each on connect); member 0 sends, and the
    time until the last member has the message is recorded, with the members that never got it."""
    members = spec["members"]
    connect_start = now_ns()
    sockets = await open_many(spec["url"], members, spec.get("concurrency", 50))
    connect_seconds = (now_ns() - connect_start) / 1e9
    await asyncio.sleep(spec.get("settle", 0.5))
    arrivals: dict[str, list[int]] = {}
    stray: list[str] = []

    async def listen(ws: ClientConnection) -> None:
        with contextlib.suppress(Exception):  # a closed socket ends its listener; losses are counted below
            async for text in ws:
                if text in arrivals:
                    arrivals[text].append(now_ns())
                else:
                    stray.append(str(text)[:40])

    listeners = [asyncio.create_task(listen(ws)) for ws in sockets]
    rounds = []
    for i in range(spec["repeats"]):
        text = f"broadcast {i} " + "x" * 80
        arrivals[text] = []
        sent = now_ns()
        await sockets[0].send(text)
        deadline = sent + round(spec["timeout"] * 1e9)
        # Wait for every member, up to the timeout; but once deliveries have started and then stopped for
        # a second, the rest are not coming (a full queue dropped them): do not sit out the whole timeout.
        seen, changed = 0, now_ns()
        while len(arrivals[text]) < members and now_ns() < deadline:
            await asyncio.sleep(0.001)
            if len(arrivals[text]) != seen:
                seen, changed = len(arrivals[text]), now_ns()
            elif seen and now_ns() - changed > 1e9:
                break
        got = list(arrivals[text])
        rounds.append({"received": len(got), "lost": members - len(got),
                       "all_ms": (max(got) - sent) / 1e6 if len(got) == members else None,
                       "first_ms": (min(got) - sent) / 1e6 if got else None,
                       "median_ms": (sorted(got)[len(got) // 2] - sent) / 1e6 if got else None})
        await asyncio.sleep(spec.get("pause", 0.2))
    await asyncio.sleep(0.5)  # late arrivals, after the timeout, still count as delivered late
    late = sum(len(arrivals[f"broadcast {i} " + "x" * 80]) for i in range(spec["repeats"])) - sum(
        r["received"] for r in rounds)
    for task in listeners:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return {"rounds": rounds, "late": late, "stray": stray[:5], "connect_seconds": connect_seconds}


# -- idle sockets --


async def idle(spec: dict[str, Any]) -> dict[str, Any]:
    started = now_ns()
    # A server that refuses some handshakes (Daphne closes one that takes over its 5 s connect timeout) is
    # reported with what it did open, not a failed benchmark.
    failed: list[str] = []
    sockets = await open_many(spec["url"], spec["count"], spec.get("concurrency", 40), failed)
    print(json.dumps({"ready": len(sockets), "seconds": (now_ns() - started) / 1e9, "failed": len(failed),
                      "failure": failed[0] if failed else ""}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the bench closes stdin
    closed = sum(1 for ws in sockets if ws.state.name != "OPEN")  # servers must not have dropped any
    for ws in sockets:
        ws.transport.abort()  # the bench stops the server next; a clean close of thousands would only wait
    return {"opened": len(sockets), "closed_by_server": closed}


MODES = {"http": http_fixed_rate, "echo": echo, "broadcast": broadcast, "idle": idle}


def main() -> None:
    raise_nofile()
    spec = json.loads(sys.argv[1])
    print(json.dumps(asyncio.run(MODES[spec["mode"]](spec))), flush=True)


if __name__ == "__main__":
    main()
