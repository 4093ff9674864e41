"""Hostile WebSocket clients that do not read: the bridge's memory stays bounded, and fast clients are served.

Each attack is the one measured against the bridge before it bounded what waits per connection (issue 14 §1):
a client that floods an echo consumer and never reads (RSS 143 MB -> 1.14 GB in 15 s), a non-reading member of a
Group getting 20 MB per round (194 -> 455 MB), 1,000,000 pings whose pongs are never read (104 -> 246 MB). Each
runs against `crossroads bridge` + `crossroads worker` over Redis, bounded in frames and seconds, on loopback, and
asserts the bridge process's resident memory (from /proc) during and after it against a bound, in bytes.
"""

from __future__ import annotations

import base64
import os
import select
import socket
import struct
import time

import pytest
from servers import free_port
from test_daemons import bridge_and_worker
from test_websocket_bridge import daemon_config

from crossroads import layer

MIB = 1024 * 1024
SEND_BUFFER = 2 * MIB  # the bridge's max_send_buffer in these tests
# What the bridge may grow by under an attack: the held frames (SEND_BUFFER), what Twisted holds per socket, the
# layer's client buffers and the allocator's slack. Before the bound the same attacks grew it by 140 MB to 1 GB.
GROWTH_BOUND = 24 * MIB  # measured with the bound: +0.6 MB (echo flood), +3.3 MB (group member)
PING_GROWTH_BOUND = 16 * MIB  # pongs are small: before the bound, 15 s of pings grew it by 36 MB here (292,000)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def config(tmp_path, redis_url: str, prefix: str, port: int) -> str:
    """The echo app's daemons (tests/test_websocket_bridge.py), this bridge bounded tighter than its defaults."""
    bounds = f"port = {port}\nmax_send_buffer = {SEND_BUFFER}\nsend_timeout = 3"
    return daemon_config(tmp_path, redis_url, prefix, bounds)


def frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (RFC 6455 §5.2)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if length < 256 else _xor(payload, mask)
    return head + mask + masked


def _xor(payload: bytes, mask: bytes) -> bytes:
    key = int.from_bytes((mask * (len(payload) // 4 + 1))[:len(payload)], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(len(payload), "big")


def non_reading_client(port: int, path: str) -> socket.socket:
    """A WebSocket client with a 4 KiB receive buffer, upgraded; it reads the 101 and then nothing ever again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        got = sock.recv(1)  # byte by byte: nothing after the head may be taken off the socket
        assert got, f"closed during the handshake: {head!r}"
        head += got
    assert head.startswith(b"HTTP/1.1 101"), head
    sock.setblocking(False)
    return sock


def flood(sock: socket.socket, data: bytes, count: int, seconds: float, sample) -> dict:
    """Send ``data`` up to ``count`` times for at most ``seconds``, never reading; ``sample()`` every 0.2 s.

    Returns how many were sent in full and whether the bridge closed the connection."""
    deadline = time.monotonic() + seconds
    sent, view, closed, next_sample = 0, memoryview(data), False, 0.0
    while sent < count and time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_sample:
            sample()
            next_sample = now + 0.2
        _, writable, _ = select.select([], [sock], [], 0.2)
        if not writable:
            continue  # pushed back: the bridge does not read us while our answers wait
        try:
            written = sock.send(view)
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        view = view[written:]
        if not view:
            sent += 1
            view = memoryview(data)
    # What is left of a frame cut short by the deadline: whatever is sent next must finish it first.
    return {"sent": sent, "closed": closed, "rest": bytes(view) if len(view) < len(data) else b""}


def closed_by_bridge(sock: socket.socket, seconds: float, rest: bytes = b"") -> bool:
    """Whether the bridge closes the socket within ``seconds`` (sends fail, or the peer's FIN/RST arrives).

    It sends empty pings, each whole: ``rest`` (a frame ``flood`` left half-sent) first, then a ping only once the
    last is out. A ping written into the middle of a frame would be a broken stream, which the bridge closes as a
    protocol error (its consumer hearing 1006), not for the reason the test waits for."""
    deadline = time.monotonic() + seconds
    out = memoryview(rest)
    while time.monotonic() < deadline:
        if not out:
            out = memoryview(frame(0x9, b""))
        try:
            out = out[sock.send(out):]
        except BlockingIOError:
            pass
        except OSError:
            return True
        time.sleep(0.1)  # polling a socket the test owns, with a deadline: there is no event to wait on
    return False


@pytest.fixture
def gateway(tmp_path, redis_server, daemons):
    port = free_port()
    prefix = f"wsflow{port}"
    bridge, _ = bridge_and_worker(tmp_path, daemons, "ws", config(tmp_path, redis_server.url, prefix, port), port)
    return {"port": port, "pid": bridge.process.pid, "bridge": bridge, "prefix": prefix, "redis": redis_server.url}


def disconnects(gateway: dict, seconds: float = 20) -> list[dict]:
    """The websocket.disconnect messages the echo app reported (on test.disconnects), waiting for the first."""
    client = layer.from_url(gateway["redis"], prefix=gateway["prefix"]).sync
    try:
        found = []
        _, message = client.receive(["test.disconnects"], timeout=seconds)
        while message is not None:
            found.append(message)
            _, message = client.receive(["test.disconnects"], timeout=0.5)
        return found
    finally:
        client.close()


def test_an_echo_flood_from_a_client_that_never_reads_is_pushed_back_and_bounded(gateway):
    before = rss(gateway["pid"])
    peak = [before]
    sock = non_reading_client(gateway["port"], "/echo/")
    try:
        result = flood(sock, frame(0x2, os.urandom(10_000)), 100_000, 15,
                       lambda: peak.append(rss(gateway["pid"])))
        assert result["closed"] or closed_by_bridge(sock, 15, result["rest"]), \
            "send_timeout (3 s) should have closed it"
    finally:
        sock.close()
    # Pushed back: the bridge stopped reading while its answers waited, so far fewer than 100,000 frames went in.
    assert result["sent"] < 20_000, result
    assert max(peak) - before < GROWTH_BOUND, (before, max(peak))
    (gone,) = [d for d in disconnects(gateway) if d["path"] == "/echo/"]
    assert gone["code"] == 1008
    assert "reading nothing for send_timeout (3 s)" in gateway["bridge"].log() or \
        f"over max_send_buffer ({SEND_BUFFER} bytes) behind" in gateway["bridge"].log()


def test_a_group_member_that_does_not_read_is_cut_off_and_the_fast_ones_get_everything(gateway):
    from websockets.sync.client import connect

    port = gateway["port"]
    before = rss(gateway["pid"])
    peak = [before]
    slow = non_reading_client(port, "/room/r/")
    rounds, size = 200, 100_000  # 20 MB to every member
    try:
        with connect(f"ws://127.0.0.1:{port}/room/r/", open_timeout=20, max_size=None) as fast, \
                connect(f"ws://127.0.0.1:{port}/room/r/", open_timeout=20, max_size=None) as sender:
            got = []
            for i in range(rounds):
                text = f"{i:06d}" + "x" * (size - 6)
                sender.send(text)
                # Closed loop: the next round once the fast members have this one, so the layer never fills. (The
                # sender is a member too, and reads its copy: one that does not is a slow client as well.)
                for member in (fast, sender):
                    assert member.recv(timeout=20) == text
                got.append(i)
                if i % 10 == 0:
                    peak.append(rss(gateway["pid"]))
        assert got == list(range(rounds))
        assert closed_by_bridge(slow, 20)
    finally:
        slow.close()
    assert max(peak) - before < GROWTH_BOUND, (before, max(peak))
    assert f"(/room/r/): over max_send_buffer ({SEND_BUFFER} bytes) behind" in gateway["bridge"].log()


def test_pings_whose_pongs_are_never_read_stop_being_read(gateway):
    from websockets.sync.client import connect

    before = rss(gateway["pid"])
    peak = [before]
    sock = non_reading_client(gateway["port"], "/echo/")
    pings = b"".join(frame(0x9, b"p" * 100) for _ in range(1000))  # 1,000 pings a write, 1,000,000 at most
    try:
        result = flood(sock, pings, 1000, 15, lambda: peak.append(rss(gateway["pid"])))
        # Another client is served meanwhile.
        with connect(f"ws://127.0.0.1:{gateway['port']}/echo/", open_timeout=20) as other:
            other.send("still here")
            assert other.recv(timeout=20) == "still here"
    finally:
        sock.close()
    # Pushed back long before a million, and closed by send_timeout: its pongs were waiting and it read none.
    assert result["sent"] < 1000 and result["closed"], result
    assert max(peak) - before < PING_GROWTH_BOUND, (before, max(peak))


def test_a_client_flooding_past_our_close_frame_is_cut_off_not_read_until_the_close_timeout(gateway):
    """The consumer closes the connection; the client, reading nothing, never sees the close frame and floods on.
    Autobahn reads on until the client's own close (never coming) or its 1 s timeout; the bridge cuts the TCP
    connection once the client sent max_message_size + 64 KiB past the close, instead of reading ~300 MB."""
    sock = non_reading_client(gateway["port"], "/echo/")
    try:
        sock.setblocking(True)
        sock.sendall(frame(0x1, b"close"))  # the echo consumer answers {"close": True}
        sock.setblocking(False)
        result = flood(sock, frame(0x2, os.urandom(10_000)), 100_000, 15, lambda: None)
        assert result["closed"] or closed_by_bridge(sock, 15, result["rest"])
    finally:
        sock.close()
    # 1 MB of budget, plus what the kernel's socket buffers held: a few hundred frames, not tens of thousands.
    assert result["sent"] < 2_000, result
    assert "still sending, over max_message_size past our close frame" in gateway["bridge"].log()
    (gone,) = [d for d in disconnects(gateway) if d["path"] == "/echo/"]
    assert gone["code"] == 1006  # no close frame came back: an abnormal closure, as the spec says
