"""MQTT benchmark: crossroads' MQTT bridge, through the layer to a worker, against a bare paho-mqtt client
that a user would hand-write to do the same work, on the same mosquitto, in one run.

Owns this file and its helpers, each run where it must run:

- ``bench/mqtt_clients.py``: the paho clients (publisher, requester, and the competitor: a bare subscriber
  and a bare responder), run with ``.bench-venvs/paho`` (paho-mqtt alone, at ``.venv``'s version);
- ``bench/mqtt_consumers.py``: crossroads' consumers (count; echo), imported by the crossroads daemons;

and what they write: the "MQTT" section of ``docs/benchmarks.md``, ``docs/img/mqtt.png`` and the raw figures
in ``bench/results/mqtt.json``.

It starts its own mosquitto (its own config, on a free port; never the system's on 1883) and redis-server.
Receivers, each measured with the same publisher flooding N 256-byte messages into mosquitto:

- bare paho: one process, paho's own loop, counting in ``on_message``;
- crossroads redis://: ``crossroads bridge mqtt`` -> redis:// layer -> ``crossroads worker`` with a counting
  consumer (two processes);
- crossroads memory://: ``crossroads run`` (bridge and worker threads in one process), the same consumer.

Scenarios: (a)/(b) QoS 0 flood, messages/s and how many arrived; (c) QoS 1 end to end, messages/s and how
many were lost; (d) sequential round trips publish -> consumer -> reply -> requester, p50/p99.

Usage: ``.venv/bin/python bench/mqtt.py [--quick | --report]``; ``--quick`` is a smoke run that writes nothing,
``--report`` rewrites the doc section and the plot from the last full run's JSON without measuring.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so bench.layer imports as part of the bench package; bench/ stays for the helpers
sys.path.append(str(ROOT / "tests"))  # tests/servers.py: the server launchers the tests and benchmarks share

from _processes import ProcessGroup  # noqa: E402  (after the sys.path fix)
from _sections import bench_main, print_blocks, pyplot, targets_markdown  # noqa: E402
from _worker_load import process_cpu  # noqa: E402
from servers import MosquittoServer  # noqa: E402

from bench.layer import BenchError, BenchRedis, cpu_pin, latency_summary, machine_facts, timed_run  # noqa: E402
from bench.web import warnings  # noqa: E402

CLIENTS = ROOT / "bench" / "mqtt_clients.py"
PAHO_VENV = ROOT / ".bench-venvs" / "paho"
PAHO_PYTHON = PAHO_VENV / "bin" / "python"
RESULTS = ROOT / "bench" / "results" / "mqtt.json"
DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "img" / "mqtt.png"

LOAD_CORE, SERVER_CORE = 0, 1
SIZE = 256  # bytes per payload
# Seconds without a new arrival, once the publisher is done, after which the rest count as lost. Longer at QoS 1:
# the bridge retries a message the layer refused after a back-off of up to 2 s; at QoS 0 it drops it at once.
IDLE = {0: 3.0, 1: 10.0}
FLOOD_TIMEOUT = 300.0  # a safety net: the idle rule above decides what is lost
SETUPS = ("bare", "redis", "memory")  # also each setup's topic prefix, so no receiver sees another's traffic
LABELS = {"bare": "bare paho subscriber, 1 process", "redis": "crossroads redis://, bridge + worker, 2 processes",
          "memory": "crossroads memory://, crossroads run, 1 process"}
RT_LABELS = {"bare": "bare paho responder, 1 process", "redis": "crossroads redis://, bridge + worker, 2 processes",
             "memory": "crossroads memory://, crossroads run, 1 process"}


@dataclass(frozen=True)
class Config:
    count_q0: int  # messages per QoS 0 flood
    count_q1: int  # messages per QoS 1 flood
    rounds: int  # floods per receiver and QoS, interleaved receiver by receiver; the median is reported
    requests: int  # measured sequential round trips per responder
    requests_q1: int  # the same with replies at QoS 1, the bridge's default (they take ~40 ms each: see the doc)
    warmup: int  # round trips (and, x10, flood messages) sent first and not measured

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(count_q0=3000, count_q1=1000, rounds=1, requests=200, requests_q1=20, warmup=20)
        return cls(count_q0=30_000, count_q1=10_000, rounds=3, requests=2000, requests_q1=100, warmup=100)


# -- the servers --


def private_broker(workdir: Path) -> MosquittoServer:
    """The tests' mosquitto (tests/servers.py: own config, free port), started, logging errors and warnings only.

    ``max_queued_messages 0`` (no limit): mosquitto's default, 1,000 per client, drops QoS 0 *and* QoS 1
    messages beyond it when a subscriber falls behind a flood. Without the limit every receiver is offered
    all N messages and drains them at its own pace, so messages/s measures the receiver and a loss is the
    receiver's, not the broker's."""
    return MosquittoServer(workdir / "mosquitto", extra="max_queued_messages 0", log_types=("error", "warning")).start()


def broker_warnings(broker: MosquittoServer) -> dict[str, int]:
    """Its log (errors and warnings only, by its config) grouped by text without the timestamp and numbers."""
    counts: dict[str, int] = {}
    for line in broker.log().splitlines():
        key = re.sub(r"\d+(\.\d+)*(:\d+)?", "N", line.split(": ", 1)[-1])[:200]
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:10])


class Crossroads(ProcessGroup):
    """One crossroads setup (redis: ``bridge mqtt`` + ``worker``; memory: ``run``), pinned to SERVER_CORE,
    counting into its own state file."""

    def __init__(self, setup: str, redis_url: str, broker: MosquittoServer, workdir: Path) -> None:
        super().__init__(LABELS[setup], workdir / f"crossroads-{setup}.log", SERVER_CORE, ROOT)
        self.setup = setup
        self.broker = broker
        self.state = workdir / f"state-{setup}.json"
        config = workdir / f"crossroads-{setup}.toml"
        config.write_text(crossroads_toml(setup, redis_url, broker.port))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_MQTT_STATE": str(self.state)}
        self.start_crossroads(setup, config, {"bridge": "mqtt"}, env)
        self.ready()

    def wait_ready(self) -> None:
        """Until one request comes back through the echo consumer: the bridge is subscribed, the worker consumes."""
        deadline = time.monotonic() + 60
        while True:
            self.alive()
            got = run_client({"mode": "request", "topic": f"{self.setup}/rt/ready", "count": 1, "warmup": 0,
                              "size": SIZE, "qos": 0, "timeout": 1.0}, self.broker, LOAD_CORE, 30)
            if not got["lost"]:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.label}: no echo in 60 s; log:\n{self.tail()}")

    def cpu(self) -> dict[str, float]:
        return {name: process_cpu(p.pid) for name, p in self.processes.items()}

    def counters(self, topic: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.state.read_text()).get(topic)
        except (OSError, ValueError):  # not written yet
            return None

    def wait_count(self, topic: str, expect: int, idle: float) -> dict[str, Any]:
        """The consumer's counters for ``topic`` once ``expect`` distinct messages arrived, or nothing new arrived
        for ``idle`` seconds (the rest are lost), or FLOOD_TIMEOUT passed. Called when the publisher is done."""
        deadline = time.monotonic() + FLOOD_TIMEOUT
        last, changed = -1, time.monotonic()
        shown = time.monotonic()
        while True:
            self.alive()
            got = self.counters(topic)
            now = time.monotonic()
            received = got["received"] if got else 0
            if got and got["distinct"] >= expect:
                return got
            if now - shown > 3:
                print(f"    ... {received:,} of {expect:,} arrived", flush=True)
                shown = now
            if received != last:
                last, changed = received, now
            elif now - changed > idle or now > deadline:
                return got or {"received": 0, "distinct": 0, "first_ns": 0, "last_ns": 0}
            time.sleep(0.02)


def crossroads_toml(setup: str, redis_url: str, broker_port: int) -> str:
    """Defaults everywhere (layer capacity 100, 4 worker threads), the bridge subscribed to this setup's topics."""
    url = "memory://" if setup == "memory" else redis_url
    return f"""[layer]
url = "{url}"

[routing]
app = "bench.mqtt_consumers:routes"

[bridges.mqtt]
type = "mqtt"
broker = "mqtt://127.0.0.1:{broker_port}"
client_id = "bench-{setup}"
subscribe = [
    {{topic = "{setup}/q0/#", qos = 0}},
    {{topic = "{setup}/q1/#", qos = 1}},
    {{topic = "{setup}/rt/+", qos = 0}},
]
reply_topic = "{{topic}}/reply"
"""


# -- the clients --


def client_process(spec: dict[str, Any], broker: MosquittoServer, core: int) -> subprocess.Popen:
    """A ``mqtt_clients.py`` process; its stderr (progress, errors) goes to ours."""
    full = {"host": "127.0.0.1", "port": broker.port, **spec}
    return subprocess.Popen([*cpu_pin(core), str(PAHO_PYTHON), str(CLIENTS), json.dumps(full)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def last_line(process: subprocess.Popen, what: str, timeout: float, stdin: str | None = None) -> dict[str, Any]:
    try:
        out, _ = process.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise BenchError(f"{what} timed out after {timeout:g} s") from None
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        raise BenchError(f"{what} exited {process.returncode} (its errors are above)")
    return json.loads(lines[-1])


def wait_ready(process: subprocess.Popen, what: str) -> None:
    """The client's ``{"ready": true}`` line: it is subscribed (it gives up by itself after 10 s)."""
    line = process.stdout.readline()
    if not line.startswith('{"ready"'):
        process.kill()
        process.communicate()
        raise BenchError(f"{what} did not get ready (its errors are above)")


def run_client(spec: dict[str, Any], broker: MosquittoServer, core: int, timeout: float) -> dict[str, Any]:
    return last_line(client_process(spec, broker, core), spec["mode"], timeout)


def publish(broker: MosquittoServer, topic: str, qos: int, count: int) -> dict[str, Any]:
    return run_client({"mode": "publish", "topic": topic, "qos": qos, "count": count, "size": SIZE},
                      broker, LOAD_CORE, FLOOD_TIMEOUT)


# -- the scenarios --


def flood(setup: str, servers: dict[str, Crossroads], broker: MosquittoServer, qos: int, count: int,
          run: str) -> dict[str, Any]:
    """One flood of ``count`` messages at ``qos`` to ``setup``'s receiver; its figures."""
    topic = f"{setup}/q{qos}/{run}"
    if setup == "bare":
        receiver = client_process({"mode": "subscribe", "topic": topic, "qos": qos, "expect": count, "idle": IDLE[qos],
                                   "timeout": FLOOD_TIMEOUT}, broker, SERVER_CORE)
        wait_ready(receiver, "bare subscriber")
        sent = publish(broker, topic, qos, count)
        got = last_line(receiver, "bare subscriber", FLOOD_TIMEOUT + 10)
        cpu = {"subscriber": got["cpu_s"]}
    else:
        crossroads = servers[setup]
        before = crossroads.cpu()
        sent = publish(broker, topic, qos, count)
        got = crossroads.wait_count(topic, count, IDLE[qos])
        cpu = {name: used - before[name] for name, used in crossroads.cpu().items()}
    span = (got["last_ns"] - got["first_ns"]) / 1e9
    return {"count": count, "received": got["received"], "distinct": got["distinct"],
            "lost": count - got["distinct"], "duplicates": got["received"] - got["distinct"],
            "msg_per_s": got["distinct"] / span if span > 0 else 0.0,
            # from the first publish to the last arrival: what the publisher saw the whole chain do
            "end_to_end_msg_per_s": got["distinct"] / ((got["last_ns"] - sent["start_ns"]) / 1e9) if span else 0.0,
            "publisher_msg_per_s": sent["msg_per_s"],
            # per message published: a receiver that drops messages still did work for them
            "cpu_us_per_message": {name: used / count * 1e6 for name, used in cpu.items()}}


def round_trips(setup: str, broker: MosquittoServer, requests: int, warmup: int,
                default_qos: bool = False) -> dict[str, Any]:
    """Sequential requests to ``setup``'s responder; the requester on LOAD_CORE. Replies at QoS 0 like the requests,
    or with ``default_qos`` at QoS 1: the bridge's default ``qos`` for replies, and the bare responder's likewise."""
    topic = f"{setup}/rt/{'default' if default_qos else 'req'}"
    spec = {"mode": "request", "topic": topic, "count": requests, "warmup": warmup, "size": SIZE, "qos": 0,
            "timeout": 5.0}
    responder = None
    if setup == "bare":
        responder = client_process({"mode": "respond", "topic": f"{setup}/rt/+", "qos": 0,
                                    "reply_qos": 1 if default_qos else 0}, broker, SERVER_CORE)
        wait_ready(responder, "bare responder")
    try:
        got = run_client(spec, broker, LOAD_CORE, (requests + warmup) * 5.0 + 30)
    finally:
        if responder is not None:
            last_line(responder, "bare responder", 10, stdin="stop\n")
    latencies = got["latencies_ns"]
    return {**latency_summary(latencies), "lost": got["lost"], "requests": requests, "reply_qos": int(default_qos),
            "latencies_ms": [round(n / 1e6, 4) for n in latencies]}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median messages/s, with every run's rate and the losses over all runs beside it."""
    ordered = sorted(runs, key=lambda run: run["msg_per_s"])
    return {**ordered[len(ordered) // 2], "runs_msg_per_s": [run["msg_per_s"] for run in runs],
            "lost_all_runs": sum(run["lost"] for run in runs), "sent_all_runs": sum(run["count"] for run in runs),
            "duplicates_all_runs": sum(run["duplicates"] for run in runs)}


def show_flood(setup: str, qos: int, got: dict[str, Any]) -> None:
    cpu = ", ".join(f"{name} {us:.0f}" for name, us in got["cpu_us_per_message"].items())
    twice = f", {got['duplicates']:,} twice" if got["duplicates"] else ""
    print(f"  QoS {qos} {got['msg_per_s']:>8,.0f} msg/s, {got['distinct']:,} of {got['count']:,} arrived{twice} "
          f"(publisher {got['publisher_msg_per_s']:,.0f} msg/s; CPU µs/msg: {cpu})  {LABELS[setup]}", flush=True)


def show_trip(label: str, got: dict[str, Any]) -> None:
    print(f"  p50 {got['p50_ms']:.3f} ms, p99 {got['p99_ms']:.3f} ms, lost {got['lost']}  {label}", flush=True)


def measure(config: Config, redis: BenchRedis, broker: MosquittoServer, workdir: Path) -> dict[str, Any]:
    servers: dict[str, Crossroads] = {}
    try:
        for setup in SETUPS[1:]:
            started = time.monotonic()
            servers[setup] = Crossroads(setup, redis.url, broker, workdir)
            print(f"{LABELS[setup]}: ready in {time.monotonic() - started:.1f} s", flush=True)
        for setup in SETUPS:  # warm-up: first connections to Redis, code paths, allocator
            flood(setup, servers, broker, 0, config.warmup * 10, "warmup")
        floods: dict[str, dict[str, Any]] = {}
        for qos, count in ((0, config.count_q0), (1, config.count_q1)):
            print(f"flood: {config.rounds} × {count:,} messages of {SIZE} bytes at QoS {qos} per receiver, "
                  "rounds interleaved", flush=True)
            runs: dict[str, list[dict[str, Any]]] = {setup: [] for setup in SETUPS}
            for round_ in range(config.rounds):
                # Interleaved: this machine's speed drifts over a minute; every receiver gets some of each moment.
                for setup in SETUPS:
                    runs[setup].append(got := flood(setup, servers, broker, qos, count, f"r{round_}"))
                    show_flood(setup, qos, got)
            floods[f"q{qos}"] = {setup: median_run(runs[setup]) for setup in SETUPS}
        print(f"round trips: {config.requests:,} sequential requests after {config.warmup} unmeasured", flush=True)
        trips: dict[str, dict[str, Any]] = {}
        for setup in SETUPS:
            trips[setup] = got = round_trips(setup, broker, config.requests, config.warmup)
            show_trip(RT_LABELS[setup], got)
        print(f"round trips with QoS 1 replies: {config.requests_q1:,} sequential requests", flush=True)
        for setup in ("bare", "redis"):
            trips[f"{setup}-q1"] = got = round_trips(setup, broker, config.requests_q1, config.warmup // 10, True)
            show_trip(f"{RT_LABELS[setup]}, replies at QoS 1", got)
        logs = {}
        for setup, crossroads in servers.items():
            crossroads.alive()
            logs[setup] = warnings(crossroads.text())
        logs["mosquitto"] = broker_warnings(broker)
        return {"floods": floods, "round_trips": trips, "log_warnings": logs}
    finally:
        for crossroads in servers.values():
            crossroads.stop()


# -- set-up --


def ensure_paho_venv() -> str:
    """``.bench-venvs/paho`` with paho-mqtt at ``.venv``'s version (the clients differ, not the library)."""
    version = importlib.metadata.version("paho-mqtt")
    if PAHO_PYTHON.exists():
        found = subprocess.run([str(PAHO_PYTHON), str(CLIENTS), json.dumps({"mode": "versions",
                                                                            "packages": ["paho-mqtt"]})],
                               capture_output=True, text=True)
        if found.returncode == 0 and json.loads(found.stdout.splitlines()[-1]) == {"paho-mqtt": version}:
            return version
    print(f"installing paho-mqtt {version} into {PAHO_VENV.relative_to(ROOT)} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(PAHO_VENV)], check=True)
    subprocess.run([str(PAHO_PYTHON), "-m", "pip", "install", "-q", f"paho-mqtt=={version}"], check=True)
    return version


def machine(redis: BenchRedis, paho: str) -> dict[str, Any]:
    measured = ["bridges/base.py", "bridges/inlet.py", "bridges/health.py", "bridges/reconnect.py", "bridges/mqtt",
                "layer", "consumers", "crossroads"]
    return machine_facts(redis, measured, ("paho-mqtt", "Twisted", "redis", "hiredis", "msgpack"), paho=paho)


def run_all(config: Config) -> dict[str, Any]:
    paho = ensure_paho_venv()
    results: dict[str, Any] = {"config": asdict(config)}
    with tempfile.TemporaryDirectory(prefix="mqtt-bench-") as workdir:
        # Both servers before pinning ourselves: children inherit the affinity, and these stay free on either core.
        redis = BenchRedis()
        broker = None
        try:
            broker = private_broker(Path(workdir))
            results["machine"] = machine(redis, paho)
            results["machine"]["mosquitto"] = broker.version
            if hasattr(os, "sched_setaffinity") and cpu_pin(LOAD_CORE):
                os.sched_setaffinity(0, {LOAD_CORE})  # this process only waits; keep it off the receivers' core
            results.update(measure(config, redis, broker, Path(workdir)))
        finally:
            if broker is not None:
                broker.stop()
            redis.stop()
    return results


# -- reporting --


def rate_cell(value: float) -> str:
    return f"{value:,.0f}"


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×" if reference else "—"


def flood_table(results: dict[str, Any], qos: int) -> str:
    rows = results["floods"][f"q{qos}"]
    bare = rows["bare"]["msg_per_s"]
    lines = ["| receiver | msg/s (median) | runs, min–max | × bare paho | arrived, median run | lost, all runs | "
             "twice, all runs | publisher msg/s | CPU µs per message published |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for setup in SETUPS:
        row = rows[setup]
        runs = row["runs_msg_per_s"]
        cpu = " + ".join(f"{us:.0f} ({name})" for name, us in row["cpu_us_per_message"].items())
        lines.append(f"| {LABELS[setup]} | {rate_cell(row['msg_per_s'])} | {min(runs):,.0f}–{max(runs):,.0f} | "
                     f"{ratio(row['msg_per_s'], bare)} | {row['distinct']:,} of {row['count']:,} | "
                     f"{row['lost_all_runs']:,} of {row['sent_all_runs']:,} | {row['duplicates_all_runs']:,} | "
                     f"{rate_cell(row['publisher_msg_per_s'])} | {cpu} |")
    return "\n".join(lines)


def trip_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, label, key of its floor) of every round-trip row present."""
    rows = [(setup, f"{RT_LABELS[setup]}, replies at QoS 0", "bare") for setup in SETUPS]
    rows += [(f"{setup}-q1", f"{RT_LABELS[setup]}, replies at QoS 1", "bare-q1") for setup in ("bare", "redis")]
    return [row for row in rows if row[0] in results["round_trips"]]


def trip_table(results: dict[str, Any]) -> str:
    trips = results["round_trips"]
    lines = ["| responder | requests | p50 ms | p99 ms | max ms | p50 × its floor | p99 × its floor | lost |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for key, label, floor_key in trip_rows(results):
        row, floor = trips[key], trips[floor_key]
        lines.append(f"| {label} | {row['requests']:,} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | "
                     f"{row['max_ms']:.2f} | {ratio(row['p50_ms'], floor['p50_ms'])} | "
                     f"{ratio(row['p99_ms'], floor['p99_ms'])} | {row['lost']} |")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    q0, q1 = results["floods"]["q0"], results["floods"]["q1"]
    bare, ours = q0["bare"]["msg_per_s"], q0["redis"]["msg_per_s"]
    lost = q0["redis"]["lost_all_runs"]
    dropped = f" (and {lost:,} of {q0['redis']['sent_all_runs']:,} lost)" if lost else " (none lost)"
    found = [("(b) redis://, QoS 0: msg/s ≥ 50% of the bare paho subscriber's",
              f"{ours:,.0f} msg/s = {ours / bare:.0%} of {bare:,.0f}{dropped}", ours >= 0.5 * bare)]
    for setup in ("redis", "memory"):
        row = q1[setup]
        found.append((f"(c) QoS 1 end to end, {setup}://: no message lost",
                      f"{row['lost_all_runs']:,} lost of {row['sent_all_runs']:,} ({row['duplicates_all_runs']:,} "
                      "delivered twice)", row["lost_all_runs"] == 0))
    return found


def chart(results: dict[str, Any], path: Path) -> None:
    """Left: messages/s per receiver at QoS 0 and 1. Right: the round-trip latency distribution (CDF)."""
    plt, ticker = pyplot()
    colors = {"bare": "#7f7f7f", "redis": "#6baed6", "memory": "#1f77b4"}
    fig, (bars_ax, cdf_ax) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1, 1.2]})
    width = 0.27
    for i, setup in enumerate(SETUPS):
        values = [results["floods"][f"q{qos}"][setup]["msg_per_s"] for qos in (0, 1)]
        bars = bars_ax.bar([x + (i - 1) * width for x in (0, 1)], values, width, color=colors[setup],
                           label=LABELS[setup])
        lost = [results["floods"][f"q{qos}"][setup]["lost_all_runs"] for qos in (0, 1)]
        bars_ax.bar_label(bars, labels=[f"{v:,.0f}" + (f"\n✗ {n:,} lost" if n else "") for v, n in zip(values, lost,
                                                                                                         strict=True)],
                          fontsize=8, padding=2)
    bars_ax.set_ylim(top=bars_ax.get_ylim()[1] * 1.12)  # room for the labels over the tallest bar
    bars_ax.set_xticks([0, 1], ["QoS 0 flood", "QoS 1 flood"])
    bars_ax.set_ylabel("messages/s delivered to the consumer")
    bars_ax.set_title(f"Throughput, {SIZE}-byte messages (higher is better)", fontsize=10)
    bars_ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08))  # below: bars can be any height
    bars_ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    for key, label, _ in trip_rows(results):
        ms = sorted(results["round_trips"][key]["latencies_ms"])
        cdf_ax.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], color=colors[key.split("-")[0]], label=label,
                    linestyle="--" if key.endswith("-q1") else "-")
    cdf_ax.set_xscale("log")
    cdf_ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    cdf_ax.set_xlabel("round trip, ms (log scale)")
    cdf_ax.set_ylabel("fraction of requests answered within")
    cdf_ax.axhline(0.5, color="#bbbbbb", linewidth=0.8, linestyle=":")
    cdf_ax.axhline(0.99, color="#bbbbbb", linewidth=0.8, linestyle=":")
    cdf_ax.set_title("Round trip publish → consumer → reply → requester (left is better)", fontsize=10)
    cdf_ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("crossroads MQTT bridge vs a bare paho-mqtt client (2 cores: receivers on one, load on the other)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reading(results: dict[str, Any]) -> str:
    """What the tables say, in figures computed from them."""
    lines = []
    floods, trips = results["floods"], results["round_trips"]
    q0 = floods["q0"]
    for setup in ("redis", "memory"):
        ours, bare = q0[setup]["cpu_us_per_message"], q0["bare"]["cpu_us_per_message"]["subscriber"]
        lines.append(f"- {LABELS[setup]}: {sum(ours.values()):.0f} µs of CPU per message published at QoS 0 "
                     f"({', '.join(f'{name} {us:.0f}' for name, us in ours.items())}) against the bare "
                     f"subscriber's {bare:.0f} µs: {sum(ours.values()) / bare:.1f}×"
                     + (f", though it delivered only {q0[setup]['distinct']:,} of the {q0[setup]['count']:,} "
                        "(median run)." if q0[setup]["lost"] else "."))
    budget = sum(q0["redis"]["cpu_us_per_message"].values())
    bare_rate = q0["bare"]["msg_per_s"]
    lines.append(f"- Its two processes share one core, so redis:// can deliver at most ~{1e6 / budget:,.0f} msg/s at "
                 f"{budget:.0f} µs per message; half the bare subscriber's rate ({bare_rate / 2:,.0f} msg/s) needs "
                 f"≤ {2e6 / bare_rate:.0f} µs for the bridge and the worker together.")
    redis_rate, memory_rate = q0["redis"]["msg_per_s"], q0["memory"]["msg_per_s"]
    if redis_rate < 0.5 * memory_rate:
        lines.append(f"- The same bridge delivers {memory_rate:,.0f} msg/s over memory:// and {redis_rate:,.0f} over "
                     "redis://: what limits (b) is the hop through Redis, which costs both processes CPU on the "
                     "core they share (serializing, Redis calls) and adds a round trip per batch.")
    for qos in (0, 1):
        bare = floods[f"q{qos}"]["bare"]
        if bare["msg_per_s"] > 0.8 * bare["publisher_msg_per_s"]:
            lines.append(f"- QoS {qos}: the bare subscriber ({bare['msg_per_s']:,.0f} msg/s) kept up with the "
                         f"publisher ({bare['publisher_msg_per_s']:,.0f} msg/s{', 20 in flight' if qos else ''}): "
                         "its figure is partly the publisher's, so ratios against it are, if anything, generous.")
    full = sum(count for setup in ("redis", "memory") for line, count in results["log_warnings"].get(setup, {}).items()
               if "'mqtt.receive' is full" in line)
    lossy = [f"{LABELS[setup]}: {q0[setup]['lost_all_runs']:,} of {q0[setup]['sent_all_runs']:,}"
             for setup in ("redis", "memory") if q0[setup]["lost_all_runs"]]
    if lossy:
        lines.append(f"- QoS 0 messages lost by crossroads ({'; '.join(lossy)}). "
                     + (f"The bridge logged `channel 'mqtt.receive' is full` {full:,} times: when the workers fall "
                        "behind, the channel (capacity 100) refuses messages, and the bridge drops a refused QoS 0 "
                        "message, as docs/spec/mqtt.md says (\"that is QoS 0\"), rather than pausing its reads from "
                        "the broker. The bare subscriber, "
                        "which does its work in `on_message`, slows the socket down instead and loses nothing."
                        if full else "The servers logged no reason: see below."))
    crawl = [f"{LABELS[setup]}: {floods['q1'][setup]['msg_per_s']:,.0f} msg/s at QoS 1 against "
             f"{q0[setup]['msg_per_s']:,.0f} at QoS 0" for setup in ("redis", "memory")
             if floods["q1"][setup]["msg_per_s"] < 0.25 * q0[setup]["msg_per_s"]]
    if crawl and full:
        lines.append(f"- crossroads at QoS 1 is much slower than at QoS 0 while its channel is full "
                     f"({'; '.join(crawl)}). Nothing is lost: the bridge holds each message the layer refused, "
                     "unacknowledged, and offers it again after a back-off, during which the workers may sit idle.")
    missed_by_cpu = q0["redis"]["msg_per_s"] < 0.5 * q0["bare"]["msg_per_s"] and not q0["redis"]["lost_all_runs"]
    if full and not lossy and not missed_by_cpu:  # otherwise the "missed by CPU" line below says it
        lines.append(f"- The {full:,} `channel 'mqtt.receive' is full` warnings below are backpressure at work, not "
                     "losses: the bridge holds what the layer refused and stops reading from the broker while too "
                     "much waits (TCP then holds the broker back), so every message arrives.")
    slow = {key: trips[key]["p50_ms"] for key in ("bare-q1", "redis-q1")
            if key in trips and trips[key]["p50_ms"] > 20 * trips["bare"]["p50_ms"]}
    if slow:
        who = " and ".join(f"{'the bare responder' if key == 'bare-q1' else 'crossroads'} ({ms:.0f} ms p50)"
                           for key, ms in slow.items())
        lines.append(f"- Replies at QoS 1 are slow for {who}: mosquitto acknowledges the reply with a PUBACK and "
                     "then sends the next request on the same socket, and with its default `set_tcp_nodelay false` "
                     "Nagle's algorithm holds that request until the responder's delayed ACK (40 ms on Linux). "
                     "`set_tcp_nodelay true` in mosquitto.conf, replying at QoS 0, or quick ACKs on the responder's "
                     "socket remove it"
                     + ("; crossroads' bridge asks Linux for quick ACKs on every read, so its QoS 1 replies (its "
                        "default) take milliseconds, not Nagle's 40 ms." if "redis-q1" not in slow else "."))
    if missed_by_cpu:
        lines.append("- (b) is missed by CPU, not by loss: the bridge and the worker share one core, as the bare "
                     "subscriber has one, and spend "
                     f"{sum(q0['redis']['cpu_us_per_message'].values()):.0f} µs per message against its "
                     f"{q0['bare']['cpu_us_per_message']['subscriber']:.0f}. When the worker falls behind, the bridge "
                     "stops reading the broker's socket instead of dropping: no QoS 0 message is lost.")
    lines.append("- Where the bridge's CPU goes (py-spy on the bridge under this flood, at 6c8b1d1, about 20 µs per "
                 "message): 40% reading the broker's socket in 64 KiB pieces and decoding the PUBLISH packets "
                 "(bridges/mqtt/packets.py), 12% building the `mqtt.receive` messages, a third sending them to Redis "
                 "(msgpack, then one script call per batch). Until 28e654c the bridge let paho read (three or four "
                 "system calls and several objects per message: MQTTMessage, Properties, its topic matcher) and "
                 "sent each message into the layer from a task of its own: 75 µs per message, and (b) at 33%. The "
                 "worker takes up to 64 messages per Redis call while its consumer is quick (d4b37b7; 16 before).")
    load = results["machine"]["load_before"]
    lines.append(f"- Load average before the run: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min) on "
                 f"{results['machine']['nproc']} cores"
                 + (": the machine was not idle (the benchmark run just before this one, or other work, "
                    "still in the average); the *runs* column shows the spread." if load[0] > 0.3 else "."))
    return "\n".join(lines)


def problems(results: dict[str, Any]) -> str:
    lines = []
    for setup, found in results["log_warnings"].items():
        for text, count in found.items():
            lines.append(f"- {LABELS.get(setup, setup)}: {count:,} × `{text[:160]}`")
    return "\n".join(lines) or "- none logged."


def document(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    rel = os.path.relpath
    mine = ", ".join(f"{k} {v}" for k, v in m["crossroads_venv"].items())
    pinning = (f"Every receiver process (the bare subscriber or responder, crossroads' bridge and worker, "
               f"`crossroads run`) is pinned to core {SERVER_CORE} and every load client (publisher, requester) to "
               f"core {LOAD_CORE} with `taskset -c`; mosquitto and redis-server are not pinned. So each receiver gets "
               "one core, whatever its number of processes: crossroads' two redis:// processes share it."
               if m["pinned"] else "Processes are not pinned (no taskset, or a single core).")
    return f"""## MQTT

crossroads' MQTT bridge (`type = "mqtt"`) against what a user would hand-write instead: one paho-mqtt
{m['paho']} client with paho's own loop, doing the consumer's work in `on_message`. Both sit on the same
mosquitto and get the same messages from the same publisher. The crossroads consumers count
(`<setup>/q0/#`, `<setup>/q1/#`) and echo (`<setup>/rt/+`, replied on `{{topic}}/reply` by the bridge's
`reply_topic`): `bench/mqtt_consumers.py`; the paho clients: `bench/mqtt_clients.py`.

Reproduce with `.venv/bin/python bench/mqtt.py` (took {results['seconds'] / 60:.1f} min; `--quick` is a smoke run
that writes nothing, `--report` redraws from the JSON). It starts its own mosquitto (own config, free port) and
redis-server, and installs paho-mqtt {m['paho']} into `.bench-venvs/paho` for the bare clients and the load.
Raw figures: [`bench/results/mqtt.json`]({rel(RESULTS, DOC.parent)}).

**Machine**: {m['nproc']} cores, {m['cpu']}; Python {m['python']}; mosquitto {m['mosquitto']}; redis-server
{m['redis_server']}; crossroads at {m['commit']} with {mine}. A shared machine: other engineers' tests may have
run beside it (load average {m['load_before'][0]:.2f} when it started).

### Method

- **Receivers.** Bare paho: one process, `loop()` as `loop_forever()` runs it, counting in `on_message`.
  crossroads redis://: `crossroads bridge mqtt` and `crossroads worker`, two processes, over redis://.
  crossroads memory://: `crossroads run`, the bridge and the worker threads in one process. crossroads keeps
  every default (layer capacity 100, 4 worker threads, MQTT 5, a receive maximum of 100 unacknowledged QoS 1
  messages, replies at QoS 1 unless the reply says otherwise).
- {pinning}
- **Flood**: the publisher (paho, no loop thread: `publish()` writes straight to the socket) sends N
  {SIZE}-byte messages as fast as it can, {cfg['count_q0']:,} at QoS 0 and {cfg['count_q1']:,} at QoS 1
  (publisher and subscription at the same QoS: end to end), {cfg['rounds']} rounds per receiver, interleaved, the
  median shown. Each payload starts with a sequence number; the receiver counts distinct ones.
  msg/s = distinct messages ÷ the time from the first arrival to the last, at the consumer (for crossroads:
  in the worker, after the layer). A message that has not arrived {IDLE[0]:g} s (QoS 0) or {IDLE[1]:g} s (QoS 1)
  after the last arrival is lost.
  mosquitto runs with `max_queued_messages 0` (no per-client queue limit): its default of 1,000 drops QoS 0
  and QoS 1 messages for a subscriber that falls behind a flood, which would measure the broker, not the
  receiver. CPU per message: the receiver processes' user + system time over the flood ÷ messages published
  (mosquitto and redis-server excluded; a receiver that drops messages did some work for them too).
- **Round trip**: a requester publishes a {SIZE}-byte request at QoS 0 and waits for its reply before the next,
  {cfg['requests']:,} times after {cfg['warmup']} unmeasured. The floor is a bare paho responder that
  publishes each payload back on `{{topic}}/reply` from `on_message`; crossroads' echo consumer answers
  `message.reply_channel.send({{"payload": ..., "qos": 0}})` and the bridge publishes it on `{{topic}}/reply`.
  The "replies at QoS 1" rows ({cfg['requests_q1']} requests): the bare responder publishes its replies at QoS 1,
  and crossroads' consumer leaves out `qos`, so the bridge's default applies (its `qos` option, 1).

### (a), (b): QoS 0 flood, {cfg['count_q0']:,} messages

{flood_table(results, 0)}

### (c): QoS 1 end to end, {cfg['count_q1']:,} messages

{flood_table(results, 1)}

### (d): round trip, {cfg['requests']:,} sequential requests

{trip_table(results)}

![MQTT benchmark]({rel(CHART, DOC.parent)})

### Targets

{targets_markdown(targets(results))}

### Reading

{reading(results)}

### What the servers logged (warnings and errors, numbers replaced by N)

{problems(results)}
"""


def print_report(results: dict[str, Any]) -> None:
    print_blocks(*(flood_table(results, qos) for qos in (0, 1)), trip_table(results),
                 targets_markdown(targets(results)), reading(results), problems(results))


def main(argv: list[str] | None = None) -> int:
    return bench_main("mqtt", argv, description=__doc__.split("\n\n")[0], run=lambda config: timed_run(run_all, config),
                      config=Config.make, report=print_report, doc=DOC, chart_path=CHART, chart=chart,
                      document=document, results_path=RESULTS)

if __name__ == "__main__":
    sys.exit(main())
