"""Web benchmark: crossroads' HTTP and WebSocket bridges side by side with Channels 4 on Daphne 4 and on
uvicorn[standard] (uvloop + httptools), serving the same hello-world HTTP consumer, the same WebSocket echo
and the same group broadcast; a bare uvicorn ASGI app is the ceiling.

Owns this file and its helpers, each run where it must run:

- ``bench/_web_crossroads.py``: crossroads' consumers (``.venv``, imported by the crossroads daemons);
- ``bench/_web_channels.py``: the Channels application Daphne and uvicorn serve (the channels_redis and the
  uvicorn virtualenvs, with ``bench/_worker_django_settings.py`` as its settings, shared with bench/worker.py);
- ``bench/_web_bare.py``: the bare ASGI hello and echo uvicorn serves as the ceiling (the uvicorn virtualenv);
- ``bench/_web_load.py``: the Python load clients (fixed-rate HTTP, echo, broadcast, idle sockets);

and what they write: the "Web (HTTP and WebSocket)" section of ``docs/benchmarks.md``,
``docs/img/web-throughput.png`` and the raw figures in ``bench/results/web.json``.

Servers, each measured alone on an otherwise idle machine:

- crossroads, memory://: ``crossroads run`` (both bridges and the worker threads in one process);
- crossroads, redis://: ``crossroads bridge web`` + ``crossroads bridge sockets`` + ``crossroads worker``;
- Daphne + Channels with ``InMemoryChannelLayer``, and with channels_redis: one ``daphne`` process (Channels 4
  has no separate worker for HTTP and WebSocket consumers: they run inside Daphne);
- uvicorn + Channels, the same two layers: one ``uvicorn --loop uvloop --http httptools`` process;
- bare uvicorn: the same uvicorn with ``_web_bare.py``, HTTP and echo only (no layer, nothing to broadcast).

Scenarios: saturated HTTP requests/s (wrk), HTTP latency at a fixed rate (``_web_load.py``), WebSocket echo
with 100 clients, a broadcast to a 1,000-member group, and RSS per idle WebSocket with 10,000 open. For every
saturated run: CPU per request or message (every server process, from /proc) and, over Redis, Redis commands
per request or message (``INFO commandstats`` deltas).

Usage: ``.venv/bin/python bench/web.py [--quick | --report]``; ``--quick`` is a smoke run that writes nothing,
``--report`` rewrites the doc section and the plot from the last full run's JSON without measuring. A partial
run writes nothing either: ``--only crossroads:redis --scenarios http --wrk-seconds 3`` is the quick look at
crossroads' Redis commands per request under wrk that issue 17 §3 was measured with.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so bench.layer imports as part of the bench package; bench/ stays for the helpers
sys.path.append(str(ROOT / "tests"))  # tests/servers.py: the server launchers the tests and benchmarks share

from _processes import ProcessGroup, Scraper  # noqa: E402  (after the sys.path fix)
from _sections import pyplot, save_run, targets_markdown  # noqa: E402
from _worker_load import process_cpu  # noqa: E402
from servers import free_port  # noqa: E402

from bench.layer import (  # noqa: E402
    CR_PYTHON,
    CR_VENV,
    BenchError,
    BenchRedis,
    cpu_pin,
    installed_versions,
    latency_summary,
    timed_run,
)
from bench.worker import (  # noqa: E402
    CHANNELS_PINS,
    METRICS_SCRAPE_INTERVAL,
    METRICS_TARGET,
    ensure_channels_venv,
    machine,
)

LOAD = ROOT / "bench" / "_web_load.py"
RESULTS = ROOT / "bench" / "results" / "web.json"
DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "img" / "web-throughput.png"
DAPHNE_PIN = "4.2.3"  # the latest 4.x when this benchmark was written; pinned so runs compare
UV_VENV = ROOT / ".bench-venvs" / "uvicorn"
UV_PYTHON = UV_VENV / "bin" / "python"
# uvicorn[standard] and the parts of it that set its speed, the latest when this was written; pinned so runs compare.
# Channels, Django and channels_redis as in the Daphne virtualenv (bench/worker.py, bench/layer.py).
UVICORN_PINS = {"uvicorn": "0.54.0", "uvloop": "0.23.0", "httptools": "0.9.0", "websockets": "15.0.1"}

CLIENT_CORE, SERVER_CORE = 0, 1
HTTP_CONNECTIONS = 50  # wrk's keep-alive connections, under the layer's default capacity of 100
ECHO_CLIENTS = 100
MEMBERS = 1000
BROADCAST_TIMEOUT = 5.0  # seconds a member may take to get a broadcast before it counts as lost
# Reply-queue capacity for the "raised capacity" broadcast runs: every member socket of one bridge
# process shares that process's reply queue, which holds 100 messages by default (docs/spec/layer.md).
TUNED_CAPACITY = 5000
IDLE_PROCESSES = 2  # client processes holding the idle sockets (each needs a descriptor per socket)
IDLE_CONCURRENCY = 40  # handshakes in flight per client process; 2 × 40 stays under the connect channel's 100
KIB_TARGET = 32
SCENARIOS = ("idle", "http", "echo", "broadcast")


@dataclass(frozen=True)
class Config:
    rounds: int  # saturated HTTP and echo runs per server, interleaved; the median is reported
    wrk_seconds: int  # wrk takes whole seconds
    rate: int  # fixed HTTP rate, requests/s, the same for every server
    rate_seconds: float
    echo_warmup: float
    echo_seconds: float
    broadcasts: int
    idle: int  # idle WebSocket connections for the memory figure
    settle: float  # seconds the idle sockets are held before the RSS is read
    only: tuple[str, ...] = ()  # "system:layer" of the setups to run (--only); empty: every setup
    scenarios: tuple[str, ...] = SCENARIOS  # what to measure (--scenarios)

    @classmethod
    def make(cls, quick: bool, only: tuple[str, ...] = (), scenarios: tuple[str, ...] = SCENARIOS,
             wrk_seconds: int | None = None) -> Config:
        if quick:
            config = cls(rounds=1, wrk_seconds=1, rate=500, rate_seconds=1, echo_warmup=0.3, echo_seconds=1,
                         broadcasts=1, idle=600, settle=0.5, only=only, scenarios=scenarios)
        else:
            config = cls(rounds=3, wrk_seconds=3, rate=500, rate_seconds=5, echo_warmup=1, echo_seconds=2.5,
                         broadcasts=8, idle=10_000, settle=2, only=only, scenarios=scenarios)
        return replace(config, wrk_seconds=wrk_seconds) if wrk_seconds else config

    @property
    def partial(self) -> bool:
        return bool(self.only) or self.scenarios != SCENARIOS

    def runs(self, setup: Setup, scenario: str) -> bool:
        return scenario in setup.scenarios and scenario in self.scenarios


@dataclass(frozen=True)
class Setup:
    system: str  # "crossroads" | "daphne" | "uvicorn" (+ Channels) | "bare" (uvicorn, a bare ASGI app)
    layer: str  # "memory" | "redis" | "none" (bare)
    tuned: bool = False  # crossroads with its bridge's reply queue raised to TUNED_CAPACITY (broadcast only)
    metrics: bool = False  # crossroads with [metrics] listen set and its /metrics scraped (issue 16: the cost)

    @property
    def scenarios(self) -> tuple[str, ...]:
        """What is measured on this setup: the ceiling has no layer, so no broadcast, and no idle figure; nor has
        uvicorn + Channels an idle figure: opening 10,000 sockets to a Channels server takes up to two minutes
        (Daphne's rows), the longest part of a full run, and Daphne's rows already give Channels' cost per socket."""
        if self.system == "bare" or self.metrics:
            return ("http", "echo")
        return ("http", "echo", "broadcast") if self.system == "uvicorn" else SCENARIOS

    @property
    def label(self) -> str:
        if self.system == "bare":
            return "uvicorn, bare ASGI app (ceiling)"
        if self.system in CHANNELS_SERVERS:
            layer = "InMemoryChannelLayer" if self.layer == "memory" else "channels_redis"
            return f"{CHANNELS_SERVERS[self.system]} + Channels, {layer}"
        how = "crossroads run" if self.layer == "memory" else "bridges + worker, 3 processes"
        return (f"crossroads {self.layer}://, {how}" + (f", reply queue {TUNED_CAPACITY:,}" if self.tuned else "")
                + (f", /metrics scraped every {METRICS_SCRAPE_INTERVAL:g} s" if self.metrics else ""))


CHANNELS_SERVERS = {"daphne": "Daphne", "uvicorn": "uvicorn"}  # the servers that run the Channels app


# -- the servers --


class Servers(ProcessGroup):
    """The process(es) of one setup, pinned to SERVER_CORE."""

    def __init__(self, setup: Setup, redis_url: str, workdir: Path) -> None:
        self.setup = setup
        log = workdir / f"web-{setup.system}-{setup.layer}{'-tuned' if setup.tuned else ''}.log"
        super().__init__(setup.label, log, SERVER_CORE, ROOT)
        self.http_port = free_port()
        self.scraper: Scraper | None = None
        if setup.system != "crossroads":
            self.ws_port = self.http_port  # Daphne and uvicorn serve both on one port
            env = {**os.environ, "PYTHONPATH": str(ROOT / "bench"), "DJANGO_SETTINGS_MODULE": "_worker_django_settings",
                   "BENCH_CHANNEL_LAYER": setup.layer, "BENCH_REDIS_URL": redis_url}
            if setup.system == "daphne":
                self.start("daphne", [str(CR_VENV / "bin" / "daphne"), "-b", "127.0.0.1", "-p", str(self.http_port),
                                      "_web_channels:application"], env)
            else:  # uvicorn[standard] as its docs run it for speed; Channels' router has no lifespan handler
                app = "_web_bare:application" if setup.system == "bare" else "_web_channels:application"
                self.start("uvicorn", [str(UV_VENV / "bin" / "uvicorn"), "--host", "127.0.0.1", "--port",
                                       str(self.http_port), "--loop", "uvloop", "--http", "httptools",
                                       "--ws", "websockets", "--lifespan", "off", app], env)
        else:
            self.ws_port = free_port()
            self.metrics_port = free_port() if setup.metrics else None
            config = workdir / (f"crossroads-{setup.layer}{'-tuned' if setup.tuned else ''}"
                                f"{'-metrics' if setup.metrics else ''}.toml")
            config.write_text(crossroads_toml(setup, redis_url, self.http_port, self.ws_port, self.metrics_port))
            # The repository root, not bench/, on the path: the routing is bench._web_crossroads:routes.
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            self.start_crossroads(setup.layer, config, {"web": "web", "sockets": "sockets"}, env)
        self.ready()
        if setup.metrics:
            self.scraper = Scraper(self.metrics_port, METRICS_SCRAPE_INTERVAL)
            self.scraper.start()

    def wait_ready(self) -> None:
        """Until a GET answers 200 and a WebSocket echoes: every process is up and the worker consumes."""
        from websockets.sync.client import connect

        deadline = time.monotonic() + 60
        while True:
            self.alive()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/", timeout=2) as response:
                    ok = response.status == 200
                with connect(f"ws://127.0.0.1:{self.ws_port}/echo/", open_timeout=2, compression=None) as ws:
                    ws.send("ready?")
                    ok = ok and ws.recv(timeout=2) == "ready?"
                if ok:
                    return
            except (OSError, TimeoutError, Exception):  # not listening yet, or the worker not consuming yet
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{self.setup.label} did not come up in 60 s; log:\n{self.tail()}")
            time.sleep(0.2)

    def cpu(self) -> float:
        return sum(process_cpu(pid) for pid in self.pids.values())

    def rss(self) -> dict[str, int]:
        return {name: rss_bytes(pid) for name, pid in self.pids.items()}


def crossroads_toml(setup: Setup, redis_url: str, http_port: int, ws_port: int, metrics_port: int | None) -> str:
    """Defaults everywhere (capacity 100, 4 worker threads, access log on, no [metrics]), except the tuned reply
    queue, the metrics setup's [metrics] and room for the idle sockets."""
    url = "memory://" if setup.layer == "memory" else redis_url
    tuned = f'channel_capacity = {{ "websocket.sockets.*" = {TUNED_CAPACITY} }}\n' if setup.tuned else ""
    metrics = f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n\n' if metrics_port else ""
    return f"""[layer]
url = "{url}"
{tuned}
{metrics}[routing]
app = "bench._web_crossroads:routes"

[bridges.web]
type = "http"
port = {http_port}

[bridges.sockets]
type = "websocket"
port = {ws_port}
max_connections = 20000  # the idle-socket figure opens 10,000 at once: the default cap, exactly
"""


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def stop_all(servers: list[Servers]) -> None:
    """Stop every setup at once: Daphne may take its application close timeout (10 s) to exit."""
    for s in servers:
        s.terminate()
    for s in servers:
        s.stop(grace=3)  # nothing is measured any more: no need to sit out a graceful close


# -- the load --


def load(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One ``_web_load.py`` run on CLIENT_CORE; its last JSON line."""
    command = [*cpu_pin(CLIENT_CORE), sys.executable, str(LOAD), json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"load client {spec['mode']} timed out; stderr:\n{(exc.stderr or '')[-2000:]}") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise BenchError(f"load client {spec['mode']} exited {done.returncode}; stderr:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def ensure_wrk() -> str:
    """Debian's wrk, installed with apt-get when missing and we are root; otherwise a clear error."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise BenchError("wrk is not installed: run 'sudo apt-get install -y wrk' and start the benchmark again")
    print("wrk is not installed: running apt-get install -y wrk ...", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, stdout=subprocess.DEVNULL)
    found = shutil.which("wrk")
    if not found:
        raise BenchError("apt-get install wrk did not provide a wrk binary")
    return found


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(binary: str, url: str, seconds: float) -> dict[str, Any]:
    """wrk, one thread on CLIENT_CORE, HTTP_CONNECTIONS keep-alive connections, as fast as the server answers."""
    command = [*cpu_pin(CLIENT_CORE), binary, "-t1", f"-c{HTTP_CONNECTIONS}", f"-d{seconds:g}s", "--latency", url]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"^\s+(\d+) requests in", out, re.MULTILINE)
    if rate is None or total is None:
        raise BenchError(f"wrk printed no Requests/sec:\n{out}")
    figures: dict[str, Any] = {"req_per_s": float(rate.group(1)), "requests": int(total.group(1)), "errors": 0}
    for pct in ("50", "99"):
        found = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        figures[f"p{pct}_ms"] = float(found.group(1)) * UNITS[found.group(2)] if found else None
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                    r"timeout (\d+)"):
        found = re.search(pattern, out)
        if found:
            figures["errors"] += sum(int(n) for n in found.groups())
    return figures


def script_calls() -> frozenset[str]:
    """The commands crossroads' Lua scripts run inside Redis (``redis.call('RPUSH', ...)`` in layer/redis.py).
    Redis counts them in ``INFO commandstats`` as if a client had sent them; what crosses the network is the one
    EVALSHA. crossroads sends these commands itself only on paths HTTP hello and echo do not take (waking a
    receive blocked on several shards, group membership, pending counts)."""
    text = (ROOT / "layer" / "redis.py").read_text()
    return frozenset(name.lower() for name in re.findall(r"redis\.call\('([A-Z]+)'", text))


SCRIPT_CALLS = script_calls()


def commandstats(redis: BenchRedis) -> dict[str, int]:
    """Redis' calls so far per command name (``INFO commandstats``), e.g. ``{"evalsha": 1200, "blpop": 30}``."""
    return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in redis.client.info("commandstats").items()}


class Counted:
    """CPU of every server process and, over Redis, Redis commands by name, from here to ``done(operations)``."""

    def __init__(self, servers: Servers, redis: BenchRedis) -> None:
        self.servers, self.redis = servers, redis if servers.setup.layer == "redis" else None
        self.cpu = servers.cpu()
        self.commands = commandstats(redis) if self.redis else {}

    def done(self, operations: int, seconds: float) -> dict[str, Any]:
        cpu = self.servers.cpu() - self.cpu
        figures: dict[str, Any] = {"server_cpu_percent": cpu / seconds * 100,
                                   "cpu_us_per_op": cpu / max(operations, 1) * 1e6, "operations": operations}
        if self.redis:
            after = commandstats(self.redis)
            calls = {name: n - self.commands.get(name, 0) for name, n in after.items()
                     if name != "info" and n > self.commands.get(name, 0)}
            inside = SCRIPT_CALLS if self.servers.setup.system == "crossroads" else frozenset()
            figures["redis_commands_per_op"] = sum(n for name, n in calls.items() if name not in inside) / max(
                operations, 1)
            figures["redis_commands_run_per_op"] = sum(calls.values()) / max(operations, 1)
            figures["redis_commands"] = dict(sorted(calls.items(), key=lambda kv: -kv[1]))
        return figures


def run_http_saturated(servers: Servers, config: Config, wrk_binary: str, redis: BenchRedis) -> dict[str, Any]:
    counted = Counted(servers, redis)
    saturated = wrk(wrk_binary, f"http://127.0.0.1:{servers.http_port}/", config.wrk_seconds)
    return {**saturated, **counted.done(saturated["requests"], config.wrk_seconds)}


def run_http_fixed(servers: Servers, config: Config) -> dict[str, Any]:
    paced = load({"mode": "http", "url": f"http://127.0.0.1:{servers.http_port}/", "rate": config.rate,
                  "connections": 20, "warmup": 0.5, "seconds": config.rate_seconds}, config.rate_seconds + 60)
    return {"rate": config.rate, **latency_summary(paced["latencies_ns"]), "errors": paced["errors"]["status"]}


def run_echo(servers: Servers, config: Config, redis: BenchRedis) -> dict[str, Any]:
    counted = Counted(servers, redis)
    got = load({"mode": "echo", "url": f"ws://127.0.0.1:{servers.ws_port}/echo/", "clients": ECHO_CLIENTS,
                "warmup": config.echo_warmup, "seconds": config.echo_seconds}, config.echo_seconds + 90)
    seconds = config.echo_warmup + config.echo_seconds
    # Per message over the whole run, warm-up included: the CPU and commands of connecting and closing the
    # clients are spread over its messages (roughly: 100 sockets against tens of thousands of messages).
    return {"msg_per_s": got["messages"] / got["seconds"], **latency_summary(got["latencies_ns"]),
            "client_cpu_percent": got["client_cpu_seconds"] / got["seconds"] * 100,
            **counted.done(got["round_trips"], seconds)}


def run_broadcast(servers: Servers, config: Config) -> dict[str, Any]:
    got = load({"mode": "broadcast", "url": f"ws://127.0.0.1:{servers.ws_port}/group/", "members": MEMBERS,
                "repeats": config.broadcasts, "timeout": BROADCAST_TIMEOUT},
               config.broadcasts * (BROADCAST_TIMEOUT + 1) + 120)
    rounds = got["rounds"]
    complete = [r["all_ms"] for r in rounds if r["all_ms"] is not None]
    medians = [r["median_ms"] for r in rounds if r["median_ms"] is not None]
    return {"rounds": rounds, "complete_rounds": len(complete),
            "all_ms": statistics.median(complete) if complete else None,
            "all_ms_max": max(complete) if complete else None,
            "member_median_ms": statistics.median(medians) if medians else None,
            "lost": sum(r["lost"] for r in rounds), "late": got["late"], "sent": MEMBERS * len(rounds),
            "connect_seconds": got["connect_seconds"]}


def run_idle(servers: Servers, config: Config) -> dict[str, Any]:
    """RSS of the server processes before and after ``config.idle`` sockets open, from IDLE_PROCESSES clients."""
    before = servers.rss()
    per = config.idle // IDLE_PROCESSES
    spec = {"mode": "idle", "url": f"ws://127.0.0.1:{servers.ws_port}/idle/", "count": per,
            "concurrency": IDLE_CONCURRENCY}
    clients = [subprocess.Popen([*cpu_pin(CLIENT_CORE), sys.executable, str(LOAD), json.dumps(spec)], cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(IDLE_PROCESSES)]
    try:
        ready = []
        for client in clients:
            line = client.stdout.readline()
            if not line:
                raise BenchError(f"idle client died: {client.stderr.read()[-2000:]}")
            ready.append(json.loads(line))
        time.sleep(config.settle)  # the server settles: handshake buffers freed, timers armed
        after = servers.rss()
        servers.alive()
        results = []
        for client in clients:
            out, err = client.communicate("", timeout=60)
            results.append(json.loads(out.splitlines()[-1]))
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
    opened = sum(r["opened"] for r in results)
    grown = sum(after.values()) - sum(before.values())
    return {"connections": opened, "open_seconds": max(r["seconds"] for r in ready),
            "handshakes_failed": sum(r.get("failed", 0) for r in ready),
            "failure": next((r["failure"] for r in ready if r.get("failure")), ""),
            "closed_by_server": sum(r["closed_by_server"] for r in results),
            "rss_before": before, "rss_after": after, "bytes_per_connection": grown / max(opened, 1)}


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median ``key`` (rounds are odd), with every run's figure beside it."""
    ordered = sorted(runs, key=lambda run: run[key])
    return {**ordered[len(ordered) // 2], f"runs_{key}": [run[key] for run in runs]}


def measure(setups: list[Setup], redis: BenchRedis, config: Config, wrk_binary: str,
            workdir: Path) -> list[dict[str, Any]]:
    """Every scenario on ``setups``, all serving at once (idle ones cost nothing), rounds interleaved
    server by server: this machine's speed drifts by tens of percent over a minute, and interleaving
    spreads the drift over every server instead of favouring whichever ran in a fast moment."""
    redis.flush()
    servers: dict[Setup, Servers] = {}
    try:
        for setup in setups:
            started = time.monotonic()
            servers[setup] = Servers(setup, redis.url, workdir)
            print(f"{setup.label}: ready in {time.monotonic() - started:.1f} s", flush=True)
        rows = {setup: {**asdict(setup), "label": setup.label, "pids": s.pids} for setup, s in servers.items()}
        tuned = all(setup.tuned for setup in setups)
        if not tuned:
            # Idle sockets first, on servers that have only answered the readiness probe: after the other
            # scenarios their heap would already hold room for those sockets, and the growth would read low.
            for setup, s in servers.items():
                if not config.runs(setup, "idle"):
                    continue
                rows[setup]["idle"] = idle = run_idle(s, config)
                failed = f", {idle['handshakes_failed']:,} handshakes failed ({idle['failure'][:80]})" \
                    if idle["handshakes_failed"] else ""
                print(f"  idle {idle['connections']:,} sockets: {idle['bytes_per_connection'] / 1024:5.1f} KiB each "
                      f"(opened in {idle['open_seconds']:.1f} s{failed})  {setup.label}", flush=True)
                wait_quiet(s)
            if "http" in config.scenarios:
                measure_http(servers, rows, config, wrk_binary, redis)
            if "echo" in config.scenarios:
                measure_echo(servers, rows, config, redis)
            for setup, s in servers.items():
                if s.scraper:  # after the load: what one scrape costs the process, alone
                    rows[setup]["scrape"] = scrape = measure_scrape(s)
                    print(f"  /metrics: {scrape['cpu_ms']:.2f} ms of CPU per scrape ({scrape['bytes']:,} bytes)  "
                          f"{setup.label}", flush=True)
        for setup, s in servers.items():
            if not config.runs(setup, "broadcast"):
                continue
            rows[setup]["broadcast"] = b = run_broadcast(s, config)
            print(f"  broadcast: all {MEMBERS} in {fmt_ms(b['all_ms'])} ms (median of {b['complete_rounds']} "
                  f"complete rounds), lost {b['lost']:,} of {b['sent']:,}  {setup.label}", flush=True)
            wait_quiet(s)
        for setup, s in servers.items():
            s.alive()
            rows[setup]["log_warnings"] = warnings(s.text())
            if s.scraper:
                s.scraper.stopping.set()
                s.scraper.join()
                rows[setup]["scrapes"] = s.scraper.scrapes
                if s.scraper.failures or not s.scraper.scrapes:
                    raise BenchError(f"{setup.label}: /metrics answered {s.scraper.scrapes} scrapes, failed "
                                     f"{s.scraper.failures}")
        return list(rows.values())
    finally:
        stop_all(list(servers.values()))


def measure_http(servers: dict[Setup, Servers], rows: dict[Setup, dict[str, Any]], config: Config, wrk_binary: str,
                 redis: BenchRedis) -> None:
    """Saturated rounds interleaved server by server, then each at the fixed rate."""
    for s in servers.values():
        wrk(wrk_binary, f"http://127.0.0.1:{s.http_port}/", 1)  # warm-up (wrk takes whole seconds)
    saturated: dict[Setup, list[dict[str, Any]]] = {setup: [] for setup in servers}
    for _ in range(config.rounds):
        for setup, s in servers.items():
            saturated[setup].append(run_http_saturated(s, config, wrk_binary, redis))
    for setup, s in servers.items():
        sat = median_run(saturated[setup], "req_per_s")
        fixed = run_http_fixed(s, config)
        rows[setup]["http"] = {"saturated": sat, "fixed": fixed}
        print(f"  HTTP {sat['req_per_s']:>7,.0f} req/s (runs {fmt_runs(sat['runs_req_per_s'])}, server CPU "
              f"{sat['server_cpu_percent']:.0f}%, {sat['cpu_us_per_op']:.0f} µs/request{commands_note(sat)}); "
              f"at {fixed['rate']} req/s p50 {fixed['p50_ms']:.2f} ms p99 {fixed['p99_ms']:.2f} ms  {setup.label}",
              flush=True)


def measure_echo(servers: dict[Setup, Servers], rows: dict[Setup, dict[str, Any]], config: Config,
                 redis: BenchRedis) -> None:
    """Echo rounds interleaved server by server."""
    echoes: dict[Setup, list[dict[str, Any]]] = {setup: [] for setup in servers}
    for _ in range(config.rounds):
        for setup, s in servers.items():
            echoes[setup].append(run_echo(s, config, redis))
            wait_quiet(s)
    for setup in servers:
        rows[setup]["echo"] = echo = median_run(echoes[setup], "msg_per_s")
        print(f"  echo {echo['msg_per_s']:>7,.0f} msg/s (runs {fmt_runs(echo['runs_msg_per_s'])}), p50 "
              f"{echo['p50_ms']:.2f} ms p99 {echo['p99_ms']:.2f} ms (client CPU "
              f"{echo['client_cpu_percent']:.0f}%, {echo['cpu_us_per_op']:.0f} µs/message{commands_note(echo)})  "
              f"{setup.label}", flush=True)


def commands_note(figures: dict[str, Any]) -> str:
    if "redis_commands" not in figures:
        return ""
    ops = max(figures["operations"], 1)
    named = " ".join(f"{name.upper()} {n / ops:.2f}" for name, n in figures["redis_commands"].items())
    return f", Redis commands {figures['redis_commands_per_op']:.2f} sent/op: {named}"


def fmt_runs(values: list[float]) -> str:
    return " ".join(f"{v:,.0f}" for v in values)


def wait_quiet(servers: Servers, limit: float = 20.0) -> None:
    """Until the servers use under 10% of a core: thousands of sockets just closed are still being torn down
    (disconnect messages, consumers), and the next scenario must not measure that."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        cpu = servers.cpu()
        time.sleep(0.3)
        if servers.cpu() - cpu < 0.03:
            break


def warnings(log: str) -> dict[str, Any]:
    """WARNING/ERROR lines of the servers' log, grouped by their text without addresses and numbers."""
    counts: dict[str, int] = {}
    for line in log.splitlines():
        if " WARNING " in line or " ERROR " in line or "Traceback" in line:
            key = re.sub(r"\d+(\.\d+)*(:\d+)?", "N", line.split(" ", 2)[-1])[:200]
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:10])


def fmt_ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


SETUPS = (Setup("crossroads", "memory"), Setup("crossroads", "memory", metrics=True), Setup("daphne", "memory"),
          Setup("uvicorn", "memory"),
          Setup("crossroads", "redis"), Setup("daphne", "redis"), Setup("uvicorn", "redis"), Setup("bare", "none"),
          Setup("crossroads", "memory", tuned=True), Setup("crossroads", "redis", tuned=True))


def ensure_daphne() -> None:
    """The channels_redis virtualenv of bench/layer.py and bench/worker.py, plus Daphne at a pinned version."""
    ensure_channels_venv()
    if installed_versions(str(CR_PYTHON), ["daphne"]) != {"daphne": DAPHNE_PIN}:
        print(f"installing daphne {DAPHNE_PIN} into {CR_VENV.relative_to(ROOT)} ...", flush=True)
        keep = installed_versions(str(CR_PYTHON), ["channels_redis", "redis", "hiredis", *CHANNELS_PINS])
        pins = [f"{k}=={v}" for k, v in keep.items() if v]  # Daphne's requirements must not move the others
        subprocess.run([str(CR_PYTHON), "-m", "pip", "install", "-q", f"daphne=={DAPHNE_PIN}", *pins], check=True)


def ensure_uvicorn() -> None:
    """.bench-venvs/uvicorn: uvicorn[standard] at UVICORN_PINS, with the Daphne virtualenv's Channels, Django,
    channels_redis, redis-py and hiredis at the same versions. Skipped when it already holds exactly those."""
    pins = {**UVICORN_PINS, **installed_versions(str(CR_PYTHON), ["channels_redis", "redis", "hiredis",
                                                                    *CHANNELS_PINS])}
    pins = {name: version for name, version in pins.items() if version}
    if UV_PYTHON.exists() and installed_versions(str(UV_PYTHON), list(pins)) == pins:
        return
    print(f"installing uvicorn[standard] {UVICORN_PINS['uvicorn']} + Channels into {UV_VENV.relative_to(ROOT)} ...",
          flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(UV_VENV)], check=True)
    wanted = [f"uvicorn[standard]=={pins.pop('uvicorn')}", *(f"{k}=={v}" for k, v in pins.items())]
    subprocess.run([str(UV_PYTHON), "-m", "pip", "install", "-q", *wanted], check=True)


def raise_nofile() -> None:
    """Soft descriptor limit up to the hard one; the servers and clients started from here inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * 10_000 // IDLE_PROCESSES + 1000:
        print(f"warning: the hard descriptor limit is {hard}: 10,000 sockets may not open", file=sys.stderr)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_all(config: Config) -> dict[str, Any]:
    wrk_binary = ensure_wrk()
    ensure_daphne()
    ensure_uvicorn()
    raise_nofile()
    redis = BenchRedis()
    try:
        results: dict[str, Any] = {"config": asdict(config), "machine": machine(redis, bool(cpu_pin(0))), "rows": []}
        results["machine"]["channels_venv"]["daphne"] = installed_versions(str(CR_PYTHON), ["daphne"])["daphne"]
        results["machine"]["crossroads_venv"].update(installed_versions(sys.executable,
                                                                        ["Twisted", "autobahn", "websockets"]))
        results["machine"]["channels_venv"].update(installed_versions(str(CR_PYTHON), ["Twisted", "autobahn"]))
        results["machine"]["uvicorn_venv"] = installed_versions(str(UV_PYTHON), [*UVICORN_PINS, "channels",
                                                                                  "channels_redis", "Django"])
        results["machine"]["load_before"] = os.getloadavg()
        results["machine"]["wrk"] = subprocess.run([wrk_binary, "-v"], capture_output=True,
                                                   text=True).stdout.split(" Copyright")[0].strip()
        with tempfile.TemporaryDirectory(prefix="web-bench-") as workdir:
            chosen = [s for s in SETUPS if not config.only or f"{s.system}:{s.layer}" in config.only]
            results["rows"] = measure([s for s in chosen if not s.tuned], redis, config, wrk_binary, Path(workdir))
            for setup in chosen if "broadcast" in config.scenarios else ():  # one at a time: the same group name
                if setup.tuned:
                    results["rows"] += measure([setup], redis, config, wrk_binary, Path(workdir))
        return results
    finally:
        redis.stop()


# -- reporting --


def find(results: dict[str, Any], system: str, layer: str, tuned: bool = False,
         metrics: bool = False) -> dict[str, Any] | None:
    for row in results["rows"]:
        if (row["system"], row["layer"], row["tuned"], row.get("metrics", False)) == (system, layer, tuned, metrics):
            return row
    return None


def daphne_best(results: dict[str, Any], figure: Any) -> float:
    """Daphne's better figure of its two layers: the targets compare against the stronger one."""
    return max((figure(row) for row in results["rows"] if row["system"] == "daphne"), default=0.0)


def http_rate(row: dict[str, Any]) -> float:
    return row["http"]["saturated"]["req_per_s"]


def echo_rate(row: dict[str, Any]) -> float:
    return row["echo"]["msg_per_s"]


def main_rows(results: dict[str, Any], scenario: str | None = None) -> list[dict[str, Any]]:
    """The untuned rows; with ``scenario``, only those that measured it (the ceiling has no idle or broadcast)."""
    return [row for row in results["rows"] if not row["tuned"] and (scenario is None or scenario in row)]


def uvicorn_ratio(results: dict[str, Any], row: dict[str, Any], figure: Any) -> str:
    """``row``'s figure against uvicorn + Channels on the same layer (the ceiling against the in-memory one)."""
    theirs = find(results, "uvicorn", "memory" if row["layer"] == "none" else row["layer"])
    return ratio_cell(figure(row), figure(theirs)) if theirs else "—"


def per_op(figures: dict[str, Any]) -> tuple[str, str]:
    """CPU µs and Redis commands per request or message (sent, and run with the scripts' own), as table cells."""
    commands, cpu = figures.get("redis_commands_per_op"), figures.get("cpu_us_per_op")  # absent before issue 17
    cpu_cell = "—" if cpu is None else f"{cpu:,.0f}"
    if commands is None:
        return cpu_cell, "—"
    return cpu_cell, f"{commands:.2f} ({figures['redis_commands_run_per_op']:.2f})"


def ratio_cell(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×" if reference else "—"


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f}–{max(values):,.0f}"


def http_table(results: dict[str, Any]) -> str:
    best = daphne_best(results, http_rate)
    rate = results["config"]["rate"]
    lines = ["| server | req/s, saturated (wrk, median) | runs, min–max | × Daphne (best) | × uvicorn + Channels "
             "(same layer) | wrk p50 / p99 ms | server CPU | CPU µs per request | Redis commands per request "
             "(with scripts' own) "
             f"| errors | p50 ms at {rate} req/s | p99 ms at {rate} req/s |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in main_rows(results, "http"):
        sat, fixed = row["http"]["saturated"], row["http"]["fixed"]
        cpu, commands = per_op(sat)
        lines.append(f"| {row['label']} | {sat['req_per_s']:,.0f} | {spread(sat['runs_req_per_s'])} "
                     f"| {ratio_cell(sat['req_per_s'], best)} | {uvicorn_ratio(results, row, http_rate)} "
                     f"| {sat['p50_ms']:.1f} / {sat['p99_ms']:.1f} | {sat['server_cpu_percent']:.0f}% | {cpu} "
                     f"| {commands} | {sat['errors'] + fixed['errors']} | {fixed['p50_ms']:.2f} "
                     f"| {fixed['p99_ms']:.2f} |")
    return "\n".join(lines)


def echo_table(results: dict[str, Any]) -> str:
    best = daphne_best(results, echo_rate)
    lines = ["| server | messages/s (median) | runs, min–max | × Daphne (best) | × uvicorn + Channels (same layer) "
             "| round trip p50 ms | p99 ms | CPU µs per message | Redis commands per message (with scripts' own) "
             "| load client CPU |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in main_rows(results, "echo"):
        e = row["echo"]
        cpu, commands = per_op(e)
        lines.append(f"| {row['label']} | {e['msg_per_s']:,.0f} | {spread(e['runs_msg_per_s'])} "
                     f"| {ratio_cell(e['msg_per_s'], best)} | {uvicorn_ratio(results, row, echo_rate)} "
                     f"| {e['p50_ms']:.2f} | {e['p99_ms']:.2f} | {cpu} | {commands} "
                     f"| {e['client_cpu_percent']:.0f}% |")
    return "\n".join(lines)


def commands_table(results: dict[str, Any]) -> str:
    """Redis commands per request (HTTP) and per message (echo) by command name, for every Redis setup."""
    lines = ["| server | scenario | Redis commands per operation, by command (*: run by a script, not sent) |",
             "|---|---|---|"]
    for row in main_rows(results):
        for scenario, figures in (("HTTP", row.get("http", {}).get("saturated")), ("echo", row.get("echo"))):
            if figures and "redis_commands" in figures:
                ops = max(figures["operations"], 1)
                inside = SCRIPT_CALLS if row["system"] == "crossroads" else frozenset()
                named = ", ".join(f"{name.upper()}{'*' if name in inside else ''} {n / ops:.2f}"
                                  for name, n in figures["redis_commands"].items() if n / ops >= 0.005) or "none"
                lines.append(f"| {row['label']} | {scenario} | {named} |")
    return "\n".join(lines)


def broadcast_table(results: dict[str, Any]) -> str:
    theirs = find(results, "daphne", "redis")
    reference = theirs["broadcast"]["all_ms"] if theirs else None
    lines = [f"| server | all {MEMBERS:,} have it, ms (median) | worst complete round ms | × faster than "
             "Daphne + channels_redis | median member ms (of those that got it) | complete rounds | lost (of sent) |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for row in results["rows"]:
        if "broadcast" not in row:
            continue
        b = row["broadcast"]
        faster = f"{reference / b['all_ms']:.2f}×" if reference and b["all_ms"] else "—"
        lines.append(f"| {row['label']} | {fmt_ms(b['all_ms'])} | {fmt_ms(b['all_ms_max'])} | {faster} "
                     f"| {fmt_ms(b['member_median_ms'])} | {b['complete_rounds']} of {len(b['rounds'])} "
                     f"| {b['lost']:,} of {b['sent']:,} |")
    return "\n".join(lines)


def idle_table(results: dict[str, Any]) -> str:
    lines = ["| server | sockets open | KiB per socket | RSS before → after, MiB (per process) | opened in s "
             "| closed by the server | handshakes failed |", "|---|--:|--:|--:|--:|--:|--:|"]
    for row in main_rows(results, "idle"):
        i = row["idle"]
        rss = ", ".join(f"{name} {i['rss_before'][name] / 2**20:.0f} → {i['rss_after'][name] / 2**20:.0f}"
                        for name in i["rss_before"])
        lines.append(f"| {row['label']} | {i['connections']:,} | {i['bytes_per_connection'] / 1024:.1f} | {rss} "
                     f"| {i['open_seconds']:.1f} | {i['closed_by_server']} | {i.get('handshakes_failed', 0):,} |")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    found = []
    for layer, share in (("memory", 1.0), ("redis", 0.5)):
        row = find(results, "crossroads", layer)
        if row is None:
            continue
        what = "memory://, one process" if layer == "memory" else "redis://, separate worker"
        need = "≥ Daphne's" if share == 1 else "≥ ½ Daphne's"
        for name, figure, unit in (("HTTP req/s", http_rate, "req/s"), ("WebSocket echo msg/s", echo_rate, "msg/s")):
            best = daphne_best(results, figure)
            found.append((f"{what}: {name} {need}", f"{figure(row):,.0f} {unit} = {figure(row) / best:.2f}× "
                          f"Daphne's {best:,.0f}", figure(row) >= share * best))
    theirs = find(results, "daphne", "redis")
    for tuned in (False, True):
        row = find(results, "crossroads", "redis", tuned)
        if row is None or theirs is None:
            continue
        b, ref = row["broadcast"], theirs["broadcast"]["all_ms"]
        speed = ref / b["all_ms"] if ref and b["all_ms"] else 0.0
        note = f" (reply queue raised to {TUNED_CAPACITY:,})" if tuned else " (default config)"
        measured = (f"{fmt_ms(b['all_ms'])} ms vs {fmt_ms(ref)} ms = {speed:.2f}×" if b["all_ms"] else
                    f"no round reached all {MEMBERS:,} members (Channels: {fmt_ms(ref)} ms)")
        found.append((f"broadcast to {MEMBERS:,}: ≥ 2× faster than Channels + channels_redis{note}", measured,
                      speed >= 2))
        found.append((f"broadcast: zero loss{note}", f"{b['lost']:,} lost of {b['sent']:,}", b["lost"] == 0))
    for layer in ("memory", "redis"):
        row = find(results, "crossroads", layer)
        if row is not None:
            kib = row["idle"]["bytes_per_connection"] / 1024
            found.append((f"< {KIB_TARGET} KiB per idle connection ({layer}://, every crossroads process)",
                          f"{kib:.1f} KiB", kib < KIB_TARGET))
    return found + uvicorn_targets(results) + metrics_targets(results)


def metrics_ratios(results: dict[str, Any]) -> dict[str, float]:
    """Throughput with /metrics scraped ÷ without, HTTP and echo: the median of the rounds' ratios (each round's
    pair ran back to back)."""
    on, off = find(results, "crossroads", "memory", metrics=True), find(results, "crossroads", "memory")
    if on is None or off is None:
        return {}
    ratios = {}
    for name, key in (("http", "runs_req_per_s"), ("echo", "runs_msg_per_s")):
        runs = (on["http"]["saturated"] if name == "http" else on["echo"])[key]
        base = (off["http"]["saturated"] if name == "http" else off["echo"])[key]
        ratios[name] = statistics.median(a / b for a, b in zip(runs, base, strict=True))
    return ratios


def metrics_targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Issue 16: serving and scraping /metrics costs nothing measurable, within 3% of the process's core."""
    on = find(results, "crossroads", "memory", metrics=True)
    if on is None or "scrape" not in on:
        return []
    scrape = on["scrape"]
    share = scrape["cpu_ms"] / 1000 / METRICS_SCRAPE_INTERVAL
    return [(f"memory://: /metrics scraped every {METRICS_SCRAPE_INTERVAL:g} s costs ≤ {1 - METRICS_TARGET:.0%} of "
             "the server's core (issue 16)",
             f"{scrape['cpu_ms']:.2f} ms of CPU per scrape ({scrape['bytes']:,} bytes) = {share:.2%} of a core at "
             f"one a second ({share / 15:.3%} at Prometheus' 15 s)", share <= 1 - METRICS_TARGET)]


def measure_scrape(s: Servers, count: int = 50) -> dict[str, Any]:
    """CPU the server spends per /metrics scrape, its load otherwise idle: its CPU over ``count`` scrapes one after
    the other, less what it spends idle over as long (its metrics thread polls twice a second)."""
    s.scraper.stopping.set()
    s.scraper.join()
    url = f"http://127.0.0.1:{s.metrics_port}/metrics"
    idle_from, started = s.cpu(), time.monotonic()
    time.sleep(1.0)  # the idle CPU rate, measured over a fixed span: nothing to wait for
    idle_rate = (s.cpu() - idle_from) / (time.monotonic() - started)
    cpu_from, started, size = s.cpu(), time.monotonic(), 0
    for _ in range(count):
        with urllib.request.urlopen(url, timeout=10) as response:
            size = len(response.read())
    spent = s.cpu() - cpu_from - idle_rate * (time.monotonic() - started)
    return {"scrapes": count, "cpu_ms": max(spent, 0.0) / count * 1000, "bytes": size}


def uvicorn_targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Issue 17's targets, against uvicorn[standard] + Channels on the same layer."""
    found = []
    for layer, what, least in (("memory", "memory://, one process", {"HTTP": 1.3, "echo": 2.0}),
                               ("redis", "redis://, separate worker", {"HTTP": 1.0, "echo": 1.0})):
        ours, theirs = find(results, "crossroads", layer), find(results, "uvicorn", layer)
        if ours is None or theirs is None:
            continue
        for name, figure, unit in (("HTTP", http_rate, "req/s"), ("echo", echo_rate, "msg/s")):
            ratio = figure(ours) / figure(theirs)
            found.append((f"{what}: {'HTTP hello req/s' if name == 'HTTP' else 'WebSocket echo msg/s'} "
                          f"≥ {least[name]:.1f}× uvicorn + Channels'",
                          f"{figure(ours):,.0f} {unit} = {ratio:.2f}× uvicorn's {figure(theirs):,.0f}",
                          ratio >= least[name]))
        if layer == "memory":
            p99, their_p99 = ours["http"]["saturated"]["p99_ms"], theirs["http"]["saturated"]["p99_ms"]
            found.append((f"{what}: HTTP p99 at saturation (wrk) ≤ uvicorn + Channels'",
                          f"{p99:.1f} ms vs {their_p99:.1f} ms", p99 <= their_p99))
        else:
            for name, figures, per in (("HTTP", ours["http"]["saturated"], "request"),
                                       ("echo", ours["echo"], "message")):
                commands = figures["redis_commands_per_op"]
                found.append((f"{what}: {name} ≤ 1.5 Redis commands per {per} at saturation (sent by clients)",
                              f"{commands:.2f} sent ({figures['redis_commands_run_per_op']:.2f} with the scripts' "
                              "own calls, as commandstats counts them)", commands <= 1.5))
    return found


def chart(results: dict[str, Any], path: Path) -> None:
    """Four panels, one bar per server: HTTP req/s, echo msg/s, broadcast time, KiB per idle socket."""
    plt, _ = pyplot()
    colors = {("crossroads", "memory"): "#1f77b4", ("crossroads", "redis"): "#6baed6",
              ("daphne", "memory"): "#d62728", ("daphne", "redis"): "#ff9896",
              ("uvicorn", "memory"): "#2ca02c", ("uvicorn", "redis"): "#98df8a", ("bare", "none"): "#7f7f7f"}
    panels = (("HTTP hello: req/s (higher is better)", main_rows(results, "http"), http_rate),
              (f"WebSocket echo, {ECHO_CLIENTS} clients: msg/s (higher is better)", main_rows(results, "echo"),
               echo_rate),
              (f"Broadcast to {MEMBERS:,}: ms until all have it\n(lower is better; ✗ = messages lost)",
               [row for row in results["rows"] if "broadcast" in row], lambda r: r["broadcast"]["all_ms"] or 0.0),
              ("KiB per idle WebSocket (lower is better)", main_rows(results, "idle"),
               lambda r: r["idle"]["bytes_per_connection"] / 1024))
    fig, axes = plt.subplots(1, 4, figsize=(22, 5.6), gridspec_kw={"width_ratios": [1.3, 1.3, 1.6, 1.1]})
    for ax, (title, subset, figure) in zip(axes, panels, strict=True):
        values = [figure(row) for row in subset]
        labels = [short_label(row) for row in subset]
        bars = ax.bar(range(len(subset)), values, color=[colors[(r["system"], r["layer"])] for r in subset],
                      hatch=None)
        for bar, row in zip(bars, subset, strict=True):
            if row["tuned"]:
                bar.set_hatch("//")
        marks = [f"{v:,.0f}" if v >= 10 else f"{v:.1f}" for v in values]
        if "Broadcast" in title:
            marks = [m if r["broadcast"]["all_ms"] else f"✗ {r['broadcast']['lost'] / r['broadcast']['sent']:.0%} lost"
                     for m, r in zip(marks, subset, strict=True)]
        ax.bar_label(bars, labels=marks, fontsize=8, padding=2)
        if "KiB" in title:
            ax.axhline(KIB_TARGET, color="crimson", linestyle="--", linewidth=1)
            ax.text(-0.4, KIB_TARGET * 1.02, f"target < {KIB_TARGET} KiB", color="crimson", fontsize=8)
        ax.set_xticks(range(len(subset)), labels, fontsize=6.5)
        ax.set_title(title, fontsize=9.5)
        ax.set_ylim(top=(max(values) or 1) * 1.18)
    fig.suptitle("crossroads bridges vs Channels 4 on Daphne 4 and on uvicorn[standard]; bare uvicorn as the "
                 "ceiling (2 cores: servers on one, load on the other)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def short_label(row: dict[str, Any]) -> str:
    if row["system"] == "bare":
        return "uvicorn\nbare ASGI"
    if row["system"] in CHANNELS_SERVERS:
        return f"{CHANNELS_SERVERS[row['system']]}\n{'in-memory' if row['layer'] == 'memory' else 'channels_redis'}"
    return (f"crossroads\n{row['layer']}://" + (f"\nqueue {TUNED_CAPACITY:,}" if row["tuned"] else "")
            + ("\n/metrics on" if row.get("metrics") else ""))


def logged(results: dict[str, Any], system: str, text: str) -> int:
    """How many warning lines containing ``text`` the ``system``'s servers logged, over every setup."""
    return sum(count for row in results["rows"] if row["system"] == system
               for line, count in row.get("log_warnings", {}).items() if text in line)


def reading(results: dict[str, Any]) -> str:
    """What the tables say, and why the misses happen, in figures computed from them."""
    lines = []
    rate = results["config"]["rate"]
    slow = [row["label"] for row in main_rows(results) if row["http"]["saturated"]["req_per_s"] < 1.25 * rate]
    if slow:
        lines.append(f"- The fixed rate ({rate} req/s) is within 25% of the saturation of {', '.join(slow)}: "
                     "its fixed-rate latencies include queueing.")
    default = [row for row in main_rows(results, "broadcast") if row["system"] == "crossroads"]
    lossy = [row for row in default if row["broadcast"]["lost"]]
    if lossy:
        worst = max(row["broadcast"]["lost"] / row["broadcast"]["sent"] for row in lossy)
        drops = logged(results, "crossroads", "group_send to")
        lines.append(
            f"- **Broadcast, default config: up to {worst:.0%} of deliveries lost.** Every socket of one WebSocket "
            "bridge process receives on one process queue (`websocket.<bridge>.<random>!`, docs/spec/layer.md: a "
            "process queue's capacity counts every local channel behind it), which holds 100 messages by default. "
            f"A `group_send` to {MEMBERS:,} members of one bridge puts {MEMBERS:,} messages on it at once; what does "
            "not fit is dropped. The drop is not silent: the layer counts it in `GroupSendResult.dropped` and logs "
            f"it ({drops:,} `group_send … dropped N of N deliveries: members full` lines here), but no member gets "
            f"those messages. Channels gives each consumer its own channel, so its {MEMBERS:,} members each hold "
            "100. With one line of config, `channel_capacity = {\"websocket.sockets.*\" = "
            f"{TUNED_CAPACITY}}}` (the reply queue sized for the sockets one bridge process serves), nothing is lost "
            "and the broadcast target is met (the rows marked *reply queue*). The bridge does not size its own "
            "queue; the bridge tests' 1,000-client broadcast test passes because it builds its layer with a raised "
            "capacity.")
    refused = logged(results, "crossroads", "refused websocket.disconnect")
    if refused:
        lines.append(
            f"- **Lost `websocket.disconnect`s.** When many sockets close at once (the {MEMBERS:,} broadcast members, "
            f"the idle sockets), the `websocket.disconnect` channel (capacity 100) fills and the bridge drops the "
            f"rest: {refused:,} `the layer refused websocket.disconnect … its consumer will not hear that it closed` "
            "lines in this run. A consumer that keeps state per socket is never told: the broadcast consumer's "
            "`Group.discard` does not run for those sockets, so their memberships stay until `group_expiry` (a day "
            "by default) and later `group_send`s keep delivering to sockets that are gone.")
    if logged(results, "crossroads", "refused http.disconnect for"):
        lines.append("- `the layer refused http.disconnect for N s; N events dropped`: the bench's hello-world app "
                     "routes no `http.disconnect` (it keeps no state per request), so nothing drains that channel; "
                     "once its 100 places are taken (wrk's connections closing with requests in flight), later "
                     "disconnects wait 10 s for room and are then dropped, counted and logged, as designed. An app "
                     "that routes `http.disconnect` gets every one, in order "
                     "(tests/test_bridge_base.py, 1,000 at once into a channel of 10).")
    if logged(results, "crossroads", "dropped a reply to http."):
        lines.append("- `dropped a reply to http.… nothing is registered for it (its connection closed?)`: wrk closes "
                     "its connections at the end of a run with requests in flight; those replies have nowhere to go. "
                     "Expected.")
    ours = [row["idle"]["open_seconds"] for row in main_rows(results, "idle") if row["system"] == "crossroads"]
    theirs = [row["idle"]["open_seconds"] for row in main_rows(results, "idle") if row["system"] == "daphne"]
    if ours and theirs:
        lines.append(f"- Opening the {results['config']['idle']:,} idle sockets took crossroads "
                     f"{' and '.join(f'{v:.0f}' for v in ours)} s, Daphne {' and '.join(f'{v:.0f}' for v in theirs)} s "
                     "(same clients, same concurrency).")
    ratios, off = metrics_ratios(results), find(results, "crossroads", "memory")
    if ratios and off is not None:
        runs = off["http"]["saturated"]["runs_req_per_s"]
        spread_pct = (max(runs) - min(runs)) / statistics.median(runs)
        lines.append(f"- Metrics on ÷ off, throughput: HTTP {ratios['http']:.2f}×, echo {ratios['echo']:.2f}× (medians "
                     "of the rounds' ratios, each pair back to back). The same setup's own saturated rounds spread by "
                     f"{spread_pct:.0%} here, so a throughput ratio cannot show a 3% cost either way; the target is "
                     "judged on what a scrape costs the process, measured alone after the load.")
    lines.append("- This machine's speed drifts by tens of percent from one run to the next (a virtual machine): "
                 "the *runs* columns show the spread; saturated figures are medians of interleaved rounds.")
    return "\n".join(lines)


def problems(results: dict[str, Any]) -> str:
    """The servers' own warnings, as evidence next to the figures."""
    lines = []
    for row in results["rows"]:
        for text, count in row.get("log_warnings", {}).items():
            lines.append(f"- {row['label']}: {count:,} × `{text[:160]}`")
    return "\n".join(lines) or "- none logged."


def document(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    mine = ", ".join(f"{k} {v}" for k, v in m["crossroads_venv"].items())
    theirs = ", ".join(f"{k} {v}" for k, v in m["channels_venv"].items())
    uv = m.get("uvicorn_venv", {})
    uvs = ", ".join(f"{k} {v}" for k, v in uv.items())
    load = m.get("load_before")
    loaded = f" Load average {load[0]:.2f} (1 min) when the run started." if load else ""
    rel = os.path.relpath
    pinning = (f"Every server process is pinned to core {SERVER_CORE} and every load client (wrk, `_web_load.py`) to "
               f"core {CLIENT_CORE} with `taskset -c`; redis-server is not pinned. So each server gets one core, "
               "whatever its number of processes: crossroads' three redis:// processes share it."
               if m["pinned"] else "Processes are not pinned (no taskset, or a single core).")
    return f"""## Web (HTTP and WebSocket)

crossroads' HTTP bridge (`type = "http"`) and WebSocket bridge (`type = "websocket"`) against what a Django user
runs instead: Channels {m['channels_venv']['channels']} consumers served by
[Daphne](https://pypi.org/project/daphne/) {m['channels_venv']['daphne']} and by the fastest server a Channels user
picks, [uvicorn](https://pypi.org/project/uvicorn/)[standard] {uv.get('uvicorn', '?')} (uvloop
{uv.get('uvloop', '?')}, httptools {uv.get('httptools', '?')}), each with Channels' `InMemoryChannelLayer` or
channels_redis {m['channels_venv']['channels_redis']}. The same consumers on every side: a hello-world HTTP consumer
(`200`, `content-type: text/plain`, `Hello, world!`), a WebSocket echo, and a broadcast consumer that adds each
socket to one group on connect and sends what it receives to the group. The ceiling: uvicorn serving a bare ASGI
app (`bench/_web_bare.py`, the same hello bytes and an echo, no framework, no layer).

Reproduce with `.venv/bin/python bench/web.py` (took {results['seconds'] / 60:.1f} min; `--quick` is a smoke run
that writes nothing). It starts its own redis-server, installs wrk with apt-get if it is missing (as root; otherwise
it says what to run), adds Daphne {DAPHNE_PIN} to bench/layer.py's `.bench-venvs/channels_redis` (Channels and
Django pinned by bench/worker.py), and makes `.bench-venvs/uvicorn` with uvicorn[standard] and the same Channels,
Django, channels_redis and redis-py. Raw figures: [`bench/results/web.json`]({rel(RESULTS, DOC.parent)}).

**Machine**: {m['nproc']} cores, {m['cpu']}; Python {m['python']}; redis-server {m['redis_server']};
{m['wrk']}; crossroads at {m['commit']} with {mine}; Daphne venv: {theirs}; uvicorn venv: {uvs}.{loaded}

### Method

- **Servers.** crossroads memory://: `crossroads run` (both bridges and 4 worker threads in one process).
  crossroads redis://: `crossroads bridge web`, `crossroads bridge sockets` and `crossroads worker`, three
  processes. Daphne: one `daphne` process with the consumers inside it; Channels 4 has no separate worker for HTTP
  and WebSocket consumers (`runworker` only serves `channel` consumers), so our redis:// split is compared with
  Daphne's single process, with its layer set to channels_redis (every consumer instance then also creates a
  channel and listens on it, which is what a Channels deployment with a Redis layer pays) or to the in-memory layer.
  uvicorn + Channels: the same application in one `uvicorn --loop uvloop --http httptools --ws websockets
  --lifespan off` process (Channels' router answers no lifespan events). Bare uvicorn: the same command on
  `_web_bare:application`, measured on HTTP and echo only. crossroads memory:// with metrics (issue 16: what
  serving them costs): the same `crossroads run` with `[metrics] listen` set, a thread of the benchmark GETting its
  `/metrics` every {METRICS_SCRAPE_INTERVAL:g} s (15× Prometheus' default rate) all through the run, measured on
  HTTP and echo in the same interleaved rounds as the rest; its ratio to the row without is the median of the
  rounds' ratios. After the load, the scraper stops and 50 scrapes in a row are timed in the server's CPU (less
  its idle CPU over as long): what one scrape costs, the figure the issue-16 target is judged on.
  crossroads' config keeps every default (layer capacity 100, 4 worker threads); both servers keep their access
  log on (to a file). The Channels consumers are what its docs teach: `AsyncHttpConsumer` for HTTP (Channels' own
  HTTP consumer, like-for-like with a crossroads consumer; a Django view would add Django's request machinery),
  the synchronous `WebsocketConsumer` for echo, and for broadcast a `WebsocketConsumer` with `groups = [...]`
  whose `receive` calls `async_to_sync(group_send)`. crossroads: functions routed on `http.request` and
  `websocket.*` (`bench/_web_crossroads.py`).
- {pinning}
- **HTTP, saturated**: wrk (1 thread, {HTTP_CONNECTIONS} keep-alive connections, {cfg['wrk_seconds']:g} s after a
  1 s warm-up run), `GET /`. Its p50/p99 are latencies at saturation, mostly queueing. Server CPU is all its
  processes' user + system time over the run ÷ its length (100% = the one core); CPU µs per request is that time
  ÷ the requests wrk completed. Redis commands per request: the growth of `calls` in redis-server's
  `INFO commandstats` over the run (every command but `INFO`, from every client: the idle setups' blocking
  receives too) ÷ the requests. Redis counts the commands a Lua script runs as calls too; the first figure
  counts what clients send (an `EVALSHA` once), the one in brackets everything Redis ran. The table after the
  echo one splits them by command. Channels runs its HTTP and WebSocket consumers inside the server process,
  so neither scenario needs its layer: its figures there are the other setups' stragglers.
- **HTTP at a fixed rate**: {cfg['rate']} requests/s for {cfg['rate_seconds']:g} s after 0.5 s, the same for every
  server and below every one's saturation, open loop on 20 keep-alive connections (`_web_load.py`; Debian's wrk 4
  cannot pace). Latency runs from each request's scheduled time, so a stall is not hidden.
- **WebSocket echo**: {ECHO_CLIENTS} clients (`websockets` {m['crossroads_venv'].get('websockets')}, no
  compression), each sending a 100-character text and waiting for it to come back, for {cfg['echo_seconds']:g} s
  after {cfg['echo_warmup']:g} s; messages/s are round trips completed in the window. The load client's CPU is
  shown: near 100% it, not the server, would be the limit. CPU µs and Redis commands per message are taken over
  the whole run (connecting, warm-up and closing included) ÷ every round trip of the run.
- **Broadcast**: {MEMBERS:,} sockets join the group (opened 50 at a time); one of them sends a text and we time
  until the last member has it, {cfg['broadcasts']} rounds; a member without the message after
  {BROADCAST_TIMEOUT:g} s counts as lost. The time includes the client reading {MEMBERS:,} frames on one core, the
  same for both. crossroads is also run with its WebSocket bridge's reply queue raised to {TUNED_CAPACITY:,}
  (`channel_capacity = {{"websocket.sockets.*" = {TUNED_CAPACITY}}}`): every socket of one bridge process shares
  that queue, 100 messages by default.
- **Memory** (crossroads and Daphne; not measured on uvicorn, to keep a full run near 9 minutes: opening
  10,000 sockets to a Channels server takes up to two minutes): {cfg['idle']:,} idle sockets to the echo
  consumer, opened from {IDLE_PROCESSES} client processes
  ({IDLE_CONCURRENCY} handshakes in flight each, under the connect channel's capacity), held {cfg['settle']:g} s;
  KiB per socket is the growth of the RSS of every server process (redis-server excluded) ÷ sockets, measured
  first, on servers that have served nothing but a readiness probe. The soft `ulimit -n` is raised to the hard
  limit for every process.

### HTTP hello world

{http_table(results)}

### WebSocket echo, {ECHO_CLIENTS} clients

{echo_table(results)}

### Redis commands per request and per message, by command

{commands_table(results)}

### Broadcast to a {MEMBERS:,}-member group

{broadcast_table(results)}

### Memory per idle WebSocket

{idle_table(results)}

![web benchmark]({rel(CHART, DOC.parent)})

### Targets

× Daphne (best): against the better of Daphne's two layers for each figure; × uvicorn + Channels: against the
same layer (issue 17).

{targets_markdown(targets(results))}

### Reading

{reading(results)}

### What the servers logged (warnings and errors, numbers replaced by N)

{problems(results)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run that writes no file")
    parser.add_argument("--report", action="store_true",
                        help="measure nothing: rewrite the doc section and the plot from bench/results/web.json")
    parser.add_argument("--only", action="append", default=[], metavar="SYSTEM:LAYER",
                        help="run only this setup (crossroads, daphne, uvicorn or bare : memory, redis or none); "
                             "repeatable; a partial run writes no file")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)}; a partial run writes no file")
    parser.add_argument("--wrk-seconds", type=int, help="length of each saturated HTTP run")
    args = parser.parse_args(argv)
    if args.report:
        save_run("web", json.loads(RESULTS.read_text()), doc=DOC, chart_path=CHART, chart=chart,
                 document=document, results_path=None)
        return 0
    if hasattr(os, "sched_setaffinity") and cpu_pin(CLIENT_CORE):
        os.sched_setaffinity(0, {CLIENT_CORE})  # this process only waits; keep it off the servers' core
    scenarios = tuple(name for name in SCENARIOS if name in args.scenarios.split(","))
    config = Config.make(args.quick, tuple(args.only), scenarios, args.wrk_seconds)
    results = timed_run(run_all, config)
    if results is None:
        return 1
    if not args.quick and not config.partial:  # the raw figures first: a failure below must not lose the run
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    tables = {"http": http_table, "echo": echo_table, "broadcast": broadcast_table, "idle": idle_table}
    for scenario, table in tables.items():
        if scenario in config.scenarios:
            print()
            print(table(results))
            if scenario == "echo" or (scenario == "http" and "echo" not in config.scenarios):
                print()
                print(commands_table(results))
    if config.partial:
        print(f"\ntook {results['seconds']} s (a partial run: no targets, nothing written)")
        return 0
    print()
    print(targets_markdown(targets(results)))
    print()
    print(reading(results))
    print()
    print(problems(results))
    print(f"\ntook {results['seconds']} s")
    if not args.quick and not config.partial:
        save_run("web", results, doc=DOC, chart_path=CHART, chart=chart, document=document, results_path=RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
