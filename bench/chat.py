"""Cross-protocol latency of the chat example: IRC -> WebSocket and MQTT -> IRC, through the channel layer.

Owns the "Cross-protocol chat" section of ``docs/benchmarks.md``, ``docs/img/chat-latency.png`` and
``bench/results/chat.json``. It runs examples/chat as a user would (its crossroads.toml, only the
addresses changed and IRC pacing lifted, see below) against its own redis-server, mosquitto and
ngircd on free ports, in two setups:

- redis://: ``crossroads bridge web``, ``bridge mqtt``, ``bridge irc`` and ``worker``, four processes;
- memory://: ``crossroads run``, one process.

The clients live in this process, on one clock: an IRC user (asyncio streams), a browser's WebSocket
(``websockets``), an MQTT publisher (paho). Each sample is sequential: say one line, wait until it
arrives on the other protocol, then the next. The floor is the same hop without crossroads: an IRC
user to another through ngircd, an MQTT publish to a subscriber through mosquitto. There is no
competitor to run side by side: no packaged gateway bridges these protocols into one consumer, so
the floors are the reference.

The IRC bridge's flood control (4 lines at once, then 1 every 2 s, the default that keeps a bot on
public networks) would dominate a back-to-back measurement; this run lifts it (``flood_rate``,
``flood_burst``) to measure the bridge itself.

Usage: ``.venv/bin/python bench/chat.py [--quick | --report]``; ``--quick`` is a smoke run that writes
nothing, ``--report`` rewrites the doc section and the plot from the last full run's JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so bench.layer imports as part of the bench package (as in bench/web.py)
sys.path.append(str(ROOT / "tests"))  # tests/servers.py: the server launchers the tests and benchmarks share

from _processes import ProcessGroup  # noqa: E402
from _sections import pyplot, save_run, targets_markdown  # noqa: E402
from servers import MosquittoServer, NgircdServer, free_port  # noqa: E402

from bench.layer import BenchError, BenchRedis, cpu_model, cpu_pin, latency_summary, timed_run  # noqa: E402
from bench.mqtt import private_broker  # noqa: E402
from bench.web import warnings  # noqa: E402

CHAT = ROOT / "examples" / "chat"
DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "img" / "chat-latency.png"
RESULTS = ROOT / "bench" / "results" / "chat.json"
SERVER_CORE, CLIENT_CORE = 1, 0
TIMEOUT = 10.0  # seconds one sample may take before the run fails


class IrcUser:
    """Someone on IRC: registers, joins #lobby, says lines; every line heard goes into ``heard``."""

    def __init__(self, nick: str) -> None:
        self.nick = nick
        self.heard: asyncio.Queue[tuple[int, str]] = asyncio.Queue()  # (arrival ns, line)

    async def connect(self, port: int) -> IrcUser:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)  # ngircd is up: start() waited
        self.say_raw(f"NICK {self.nick}", f"USER {self.nick} 0 * :{self.nick}", "JOIN #lobby")
        self.task = asyncio.ensure_future(self._read())
        await self.wait_for(lambda line: " JOIN " in line and line.startswith(f":{self.nick}!"), "its own JOIN")
        return self

    def say_raw(self, *lines: str) -> None:
        self.writer.write("".join(line + "\r\n" for line in lines).encode())

    async def _read(self) -> None:
        while line := await self.reader.readline():
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if text.startswith("PING"):
                self.say_raw("PONG" + text[4:])
            else:
                self.heard.put_nowait((time.perf_counter_ns(), text))

    async def wait_for(self, wanted: Any, what: str, timeout: float = 20) -> int:
        """Arrival time of the first line ``wanted`` accepts; lines before it are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                at, line = await asyncio.wait_for(self.heard.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise BenchError(f"{self.nick} did not hear {what} within {timeout} s") from None
            if wanted(line):
                return at

    def close(self) -> None:
        self.task.cancel()
        self.writer.close()


class MqttClient:
    """paho on its own thread; arrivals go to an asyncio queue with their time."""

    def __init__(self, port: int, name: str, loop: asyncio.AbstractEventLoop, subscribe: str | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.heard: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.properties = Properties(PacketTypes.PUBLISH)
        self.properties.UserProperty = ("sender", name)
        subscribed = loop.create_future()

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            at = time.perf_counter_ns()
            loop.call_soon_threadsafe(self.heard.put_nowait, (at, message.payload.decode()))

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
            if subscribe:
                client.subscribe(subscribe, qos=1)
            else:
                loop.call_soon_threadsafe(subscribed.set_result, None)

        def on_subscribe(client: Any, userdata: Any, mid: Any, reasons: Any, properties: Any) -> None:
            loop.call_soon_threadsafe(subscribed.set_result, None)

        self.client.on_message, self.client.on_connect, self.client.on_subscribe = on_message, on_connect, on_subscribe
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.ready = subscribed

    def publish(self, topic: str, text: str) -> None:
        self.client.publish(topic, text, qos=1, properties=self.properties)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def chat_config(workdir: Path, layer_url: str, web_port: int, broker: MosquittoServer, irc: NgircdServer) -> Path:
    text = (CHAT / "crossroads.toml").read_text()
    for old, new in (("port = 8000", f"port = {web_port}"), ("mqtt://127.0.0.1:1883", f"mqtt://127.0.0.1:{broker.port}"),
                     ("irc://127.0.0.1:6667", f"irc://127.0.0.1:{irc.port}"),
                     ("port = 2525", f"port = {free_port()}"),  # the chat's email bridge, idle here
                     ('nick = "crossroads"', 'nick = "crossroads"\nflood_burst = 1000\nflood_rate = 1000.0'),
                     ("[routing]", f'[layer]\nurl = "{layer_url}"\nprefix = "benchchat{free_port()}"\n\n[routing]')):
        if old not in text:
            raise BenchError(f"examples/chat/crossroads.toml no longer has {old!r}: update bench/chat.py")
        text = text.replace(old, new)
    path = workdir / "crossroads.toml"
    path.write_text(text)
    return path


class Chat(ProcessGroup):
    """The chat example's processes for one setup, pinned to SERVER_CORE."""

    def __init__(self, setup: str, config: Path, workdir: Path) -> None:
        super().__init__(f"crossroads {setup}://", workdir / f"chat-{setup}.log", SERVER_CORE, workdir)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHAT), str(ROOT)])}
        self.start_crossroads(setup, config, {"web": "web", "mqtt": "mqtt", "irc": "irc"}, env)


async def samples(count: int, say: Any, heard: Any) -> list[int]:
    """``count`` sequential round trips: ``say(i)`` then ``await heard(i)``, which returns the arrival time."""
    latencies = []
    for i in range(count):
        started = time.perf_counter_ns()
        say(i)
        latencies.append(await heard(i) - started)
        if (i + 1) % 100 == 0:
            print(f"    {i + 1}/{count}", flush=True)
    return latencies


async def next_text(queue: asyncio.Queue, wanted: str, what: str) -> int:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            at, text = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise BenchError(f"{what}: {wanted!r} did not arrive within {TIMEOUT} s") from None
        if text == wanted:
            return at


async def floors(count: int, irc: NgircdServer, broker: MosquittoServer) -> dict[str, Any]:
    """The same hops with nobody in between: IRC user to IRC user, MQTT publisher to subscriber."""
    loop = asyncio.get_running_loop()
    # erin joins first, then frank: once frank has seen his own JOIN, he hears what erin says.
    erin, frank = await IrcUser("erin").connect(irc.port), await IrcUser("frank").connect(irc.port)
    publisher = MqttClient(broker.port, "floor-pub", loop)
    subscriber = MqttClient(broker.port, "floor-sub", loop, subscribe="floor/x")
    await asyncio.wait_for(asyncio.gather(publisher.ready, subscriber.ready), 20)
    try:
        print("  floor: IRC user -> IRC user through ngircd", flush=True)
        irc_hop = await samples(count, lambda i: erin.say_raw(f"PRIVMSG #lobby :f{i}"),
                                lambda i: frank.wait_for(lambda line: line.endswith(f"PRIVMSG #lobby :f{i}"),
                                                         f"f{i}", TIMEOUT))
        print("  floor: MQTT publisher -> subscriber through mosquitto", flush=True)
        mqtt_hop = await samples(count, lambda i: publisher.publish("floor/x", f"f{i}"),
                                 lambda i: next_text(subscriber.heard, f"f{i}", "MQTT floor"))
    finally:
        for client in (erin, frank, publisher, subscriber):
            client.close()
    return {"irc": latency_summary(irc_hop), "mqtt": latency_summary(mqtt_hop),
            "irc_ms": [n / 1e6 for n in irc_hop], "mqtt_ms": [n / 1e6 for n in mqtt_hop]}


async def through_crossroads(count: int, web_port: int, irc: NgircdServer, broker: MosquittoServer) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    loop = asyncio.get_running_loop()
    carol = await IrcUser("carol").connect(irc.port)
    await carol.wait_for(lambda line: line.startswith(":crossroads!") and " JOIN " in line, "the bridge joining", 60)
    dave = MqttClient(broker.port, "dave", loop)
    await asyncio.wait_for(dave.ready, 20)
    deadline = time.monotonic() + 60
    while True:  # the web bridge may still be starting
        try:
            alice = await connect(f"ws://127.0.0.1:{web_port}/chat/lobby/?name=alice", compression=None,
                                  origin=f"http://127.0.0.1:{web_port}", open_timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError("the chat's web bridge never accepted a WebSocket") from None
            await asyncio.sleep(0.2)
    alice_heard: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    async def listen() -> None:
        async for text in alice:
            alice_heard.put_nowait((time.perf_counter_ns(), text))

    listening = asyncio.ensure_future(listen())
    try:
        # MQTT joins the room by speaking; repeat until the bridge's subscription is in place.
        for attempt in range(200):
            dave.publish("chat/lobby", f"join {attempt}")
            try:
                await carol.wait_for(lambda line: "[mqtt] dave: join " in line, "dave's first message", 0.5)
                break
            except BenchError:
                continue
        else:
            raise BenchError("the MQTT bridge never relayed a message to IRC")
        await asyncio.sleep(0.5)  # the join retries still in flight arrive and are dropped below
        for queue in (carol.heard, alice_heard):
            while not queue.empty():
                queue.get_nowait()
        print("  IRC -> WebSocket", flush=True)
        irc_to_ws = await samples(count, lambda i: carol.say_raw(f"PRIVMSG #lobby :t{i}"),
                                  lambda i: next_text(alice_heard, f"[irc] carol: t{i}", "IRC -> WebSocket"))
        print("  MQTT -> IRC", flush=True)
        mqtt_to_irc = await samples(count, lambda i: dave.publish("chat/lobby", f"m{i}"),
                                    lambda i: carol.wait_for(lambda line: line.endswith(f"[mqtt] dave: m{i}"),
                                                             f"m{i}", TIMEOUT))
    finally:
        listening.cancel()
        await alice.close()
        carol.close()
        dave.close()
    return {"irc_to_ws": latency_summary(irc_to_ws), "mqtt_to_irc": latency_summary(mqtt_to_irc),
            "irc_to_ws_ms": [n / 1e6 for n in irc_to_ws], "mqtt_to_irc_ms": [n / 1e6 for n in mqtt_to_irc]}


def run_all(count: int) -> dict[str, Any]:
    import importlib.metadata
    import platform

    workdir = Path(tempfile.mkdtemp(prefix="bench-chat-"))
    redis, broker = BenchRedis(), private_broker(workdir)
    irc = NgircdServer(workdir / "ngircd", name="irc.bench")
    irc.command_prefix = tuple(cpu_pin(SERVER_CORE))  # on the core of the chat's own processes
    irc.start()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    results: dict[str, Any] = {
        "samples": count,
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
                    "redis_server": redis.version, "mosquitto": broker.version, "ngircd": irc.version,
                    "pinned": bool(cpu_pin(0)), "commit": commit.stdout.strip(),
                    "versions": {name: importlib.metadata.version(name)
                                 for name in ("twisted", "autobahn", "paho-mqtt", "redis", "websockets")}},
    }
    try:
        print("floors", flush=True)
        results["floor"] = asyncio.run(floors(count, irc, broker))
        for setup, url in (("redis", redis.url), ("memory", "memory://")):
            print(f"crossroads {setup}://", flush=True)
            web_port = free_port()
            chat = Chat(setup, chat_config(workdir, url, web_port, broker, irc), workdir)
            try:
                results[setup] = asyncio.run(through_crossroads(count, web_port, irc, broker))
            finally:
                log = chat.stop(grace=30)
            results[setup]["warnings"] = warnings(log)
    finally:
        for server in (irc, broker, redis):
            server.stop()
    return results


def row(label: str, summary: dict[str, float], floor: dict[str, float]) -> str:
    return (f"| {label} | {summary['p50_ms']:.2f} | {summary['p99_ms']:.2f} | {summary['max_ms']:.2f} | "
            f"{summary['p50_ms'] / floor['p50_ms']:.1f}x |")


def table(results: dict[str, Any]) -> str:
    floor = results["floor"]
    lines = ["| path | p50 ms | p99 ms | max ms | p50 ÷ floor's p50 |", "|---|---|---|---|---|"]
    for setup, name in (("redis", "redis://, 4 processes"), ("memory", "memory://, crossroads run")):
        lines.append(row(f"IRC → WebSocket, {name}", results[setup]["irc_to_ws"], floor["irc"]))
        lines.append(row(f"MQTT → IRC, {name}", results[setup]["mqtt_to_irc"], floor["mqtt"]))
    lines.append(row("floor: IRC user → IRC user (ngircd)", floor["irc"], floor["irc"]))
    lines.append(row("floor: MQTT publish → subscriber (mosquitto)", floor["mqtt"], floor["mqtt"]))
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    plt, _ = pyplot()
    figure, axis = plt.subplots(figsize=(8, 4.2))
    series = [("IRC → WS, redis://", results["redis"]["irc_to_ws_ms"]),
              ("MQTT → IRC, redis://", results["redis"]["mqtt_to_irc_ms"]),
              ("IRC → WS, memory://", results["memory"]["irc_to_ws_ms"]),
              ("MQTT → IRC, memory://", results["memory"]["mqtt_to_irc_ms"]),
              ("floor: IRC → IRC", results["floor"]["irc_ms"]), ("floor: MQTT → MQTT", results["floor"]["mqtt_ms"])]
    for label, values in series:
        ordered = sorted(values)
        axis.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label,
                  linestyle="--" if label.startswith("floor") else "-")
    axis.set_xscale("log")
    axis.set_xlabel("latency, ms (log scale)")
    axis.set_ylabel("fraction of messages")
    axis.set_title(f"Cross-protocol chat latency, {results['samples']} sequential messages per path")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def document(results: dict[str, Any]) -> str:
    m = results["machine"]
    versions = ", ".join(f"{name} {version}" for name, version in m["versions"].items())
    logged = {setup: results[setup]["warnings"] for setup in ("redis", "memory")}
    problems = "\n".join(f"- {setup}://: {count} × `{text}`" for setup, found in logged.items()
                         for text, count in found.items()) or "- none"
    found = [(f"IRC → WebSocket p50, redis:// (recorded; floor {results['floor']['irc']['p50_ms']:.2f} ms)",
              f"{results['redis']['irc_to_ws']['p50_ms']:.2f} ms", True),
             (f"MQTT → IRC p50, redis:// (recorded; floor {results['floor']['mqtt']['p50_ms']:.2f} ms)",
              f"{results['redis']['mqtt_to_irc']['p50_ms']:.2f} ms", True)]
    return f"""## Cross-protocol chat

`.venv/bin/python bench/chat.py` (also in `make bench`). The chat example (examples/chat) as a user
runs it, against the bench's own redis-server, mosquitto and ngircd: how long one line takes from
an IRC user to a browser's WebSocket, and from an MQTT publisher to an IRC user, through the channel
layer and the `chat` consumer. {results['samples']} sequential messages per path (each waits for the
previous to arrive); all clients in the bench process, on one clock; servers pinned to core
{SERVER_CORE}, clients on core {CLIENT_CORE}. The IRC bridge's flood control is lifted for this run
(`flood_burst = 1000`, `flood_rate = 1000`): with the defaults (4 lines at once, then one every
2 s) a back-to-back run would measure the pacing, which is there to keep a bot from being kicked.

No packaged gateway bridges these protocols into one consumer to run side by side, so the
reference is the **floor**: the same hop with nobody in between (an IRC user to another through
ngircd; an MQTT publish to a subscriber through mosquitto).

Machine: {m['nproc']} cores ({m['cpu']}), Python {m['python']}, redis {m['redis_server']}, mosquitto
{m['mosquitto']}, {m['ngircd']}; crossroads at {m['commit']} with {versions}.
Took {results.get('seconds', '?')} s.

{table(results)}

![latency distribution of each path](img/chat-latency.png)

{targets_markdown(found, heading="issue 6 asks to record")}

Each crossroads hop is a chain the floor does not have: the IRC (or MQTT) bridge parses the line
and stores `irc-client.receive` (`mqtt.receive`) in the layer; the worker takes it, runs `chat`,
which loads the sender's session and sends one message to the room's group; the layer delivers a
copy to each member's bridge queue; that bridge writes a WebSocket frame (a PRIVMSG). Over redis://
that is four processes and several Redis round trips; memory:// is one process.

The first run of this benchmark put MQTT → IRC at 44 ms p50, all of it between mosquitto and the
MQTT bridge: mosquitto writes with Nagle's algorithm on by default (`set_tcp_nodelay false`), so
after its PUBACK to the bridge's reply publish it held the next PUBLISH until the bridge's delayed
ACK, 40 ms later. The bridge now asks Linux for a quick ACK on every read of its broker socket
(`TCP_QUICKACK`), which took the p50 under 2 ms against mosquitto's defaults. A maximum near 40 ms
is still seen on the MQTT path (a message or two in 500), where the kernel delays an ACK between two
reads; `set_tcp_nodelay true` in mosquitto.conf removes those too.

What the servers logged (warnings and errors, numbers replaced by N):

{problems}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run that writes no file")
    parser.add_argument("--report", action="store_true",
                        help="measure nothing: rewrite the doc section and the plot from bench/results/chat.json")
    args = parser.parse_args(argv)
    if args.report:
        save_run("chat", json.loads(RESULTS.read_text()), doc=DOC, chart_path=CHART, chart=chart,
                 document=document, results_path=None)
        return 0
    if hasattr(os, "sched_setaffinity") and cpu_pin(CLIENT_CORE):
        os.sched_setaffinity(0, {CLIENT_CORE})
    results = timed_run(run_all, 30 if args.quick else 500)
    if results is None:
        return 1
    print()
    print(table(results))
    print(f"\ntook {results['seconds']} s")
    if not args.quick:
        save_run("chat", results, doc=DOC, chart_path=CHART, chart=chart, document=document, results_path=RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
