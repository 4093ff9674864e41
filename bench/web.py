"""Web benchmark: crossroads' HTTP and WebSocket bridges side by side with Daphne 4 + Channels 4, serving
the same hello-world HTTP consumer, the same WebSocket echo and the same group broadcast.

Owns this file and its helpers, each run where it must run:

- ``bench/_web_crossroads.py``: crossroads' consumers (``.venv``, imported by the crossroads daemons);
- ``bench/_web_channels.py``: the Channels application Daphne serves (the channels_redis virtualenv, with
  ``bench/_worker_django_settings.py`` as its settings, shared with bench/worker.py);
- ``bench/_web_load.py``: the Python load clients (fixed-rate HTTP, echo, broadcast, idle sockets);

and what they write: the "Web (HTTP and WebSocket)" section of ``docs/benchmarks.md``,
``docs/img/web-throughput.png`` and the raw figures in ``bench/results/web.json``.

Servers, each measured alone on an otherwise idle machine:

- crossroads, memory://: ``crossroads run`` (both bridges and the worker threads in one process);
- crossroads, redis://: ``crossroads bridge web`` + ``crossroads bridge sockets`` + ``crossroads worker``;
- Daphne + Channels with ``InMemoryChannelLayer``, and with channels_redis: one ``daphne`` process (Channels 4
  has no separate worker for HTTP and WebSocket consumers: they run inside Daphne).

Scenarios: saturated HTTP requests/s (wrk), HTTP latency at a fixed rate (``_web_load.py``), WebSocket echo
with 100 clients, a broadcast to a 1,000-member group, and RSS per idle WebSocket with 10,000 open.

Usage: ``.venv/bin/python bench/web.py [--quick | --report]``; ``--quick`` is a smoke run that writes nothing,
``--report`` rewrites the doc section and the plot from the last full run's JSON without measuring.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so bench.layer imports as part of the bench package; bench/ stays for the helpers
sys.path.append(str(ROOT / "tests"))  # tests/servers.py: the server launchers the tests and benchmarks share

from _processes import ProcessGroup  # noqa: E402  (after the sys.path fix)
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
from bench.worker import CHANNELS_PINS, ensure_channels_venv, machine  # noqa: E402

LOAD = ROOT / "bench" / "_web_load.py"
RESULTS = ROOT / "bench" / "results" / "web.json"
DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "img" / "web-throughput.png"
DAPHNE_PIN = "4.2.3"  # the latest 4.x when this benchmark was written; pinned so runs compare

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

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(rounds=1, wrk_seconds=1, rate=500, rate_seconds=1, echo_warmup=0.3, echo_seconds=1, broadcasts=1,
                       idle=600, settle=0.5)
        return cls(rounds=3, wrk_seconds=3, rate=500, rate_seconds=5, echo_warmup=1, echo_seconds=2.5, broadcasts=8,
                   idle=10_000, settle=2)


@dataclass(frozen=True)
class Setup:
    system: str  # "crossroads" | "daphne"
    layer: str  # "memory" | "redis"
    tuned: bool = False  # crossroads with its bridge's reply queue raised to TUNED_CAPACITY (broadcast only)

    @property
    def label(self) -> str:
        if self.system == "daphne":
            return f"Daphne + Channels, {'InMemoryChannelLayer' if self.layer == 'memory' else 'channels_redis'}"
        how = "crossroads run" if self.layer == "memory" else "bridges + worker, 3 processes"
        return f"crossroads {self.layer}://, {how}" + (f", reply queue {TUNED_CAPACITY:,}" if self.tuned else "")


# -- the servers --


class Servers(ProcessGroup):
    """The process(es) of one setup, pinned to SERVER_CORE."""

    def __init__(self, setup: Setup, redis_url: str, workdir: Path) -> None:
        self.setup = setup
        log = workdir / f"web-{setup.system}-{setup.layer}{'-tuned' if setup.tuned else ''}.log"
        super().__init__(setup.label, log, SERVER_CORE, ROOT)
        self.http_port = free_port()
        if setup.system == "daphne":
            self.ws_port = self.http_port  # Daphne serves both on one port
            env = {**os.environ, "PYTHONPATH": str(ROOT / "bench"), "DJANGO_SETTINGS_MODULE": "_worker_django_settings",
                   "BENCH_CHANNEL_LAYER": setup.layer, "BENCH_REDIS_URL": redis_url}
            self.start("daphne", [str(CR_VENV / "bin" / "daphne"), "-b", "127.0.0.1", "-p", str(self.http_port),
                                  "_web_channels:application"], env)
        else:
            self.ws_port = free_port()
            config = workdir / f"crossroads-{setup.layer}{'-tuned' if setup.tuned else ''}.toml"
            config.write_text(crossroads_toml(setup, redis_url, self.http_port, self.ws_port))
            # The repository root, not bench/, on the path: the routing is bench._web_crossroads:routes.
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            self.start_crossroads(setup.layer, config, {"web": "web", "sockets": "sockets"}, env)
        self.ready()

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


def crossroads_toml(setup: Setup, redis_url: str, http_port: int, ws_port: int) -> str:
    """Defaults everywhere (capacity 100, 4 worker threads, access log on), except the tuned reply queue and
    room for the idle sockets."""
    url = "memory://" if setup.layer == "memory" else redis_url
    tuned = f'channel_capacity = {{ "websocket.sockets.*" = {TUNED_CAPACITY} }}\n' if setup.tuned else ""
    return f"""[layer]
url = "{url}"
{tuned}
[routing]
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
    if rate is None:
        raise BenchError(f"wrk printed no Requests/sec:\n{out}")
    figures: dict[str, Any] = {"req_per_s": float(rate.group(1)), "errors": 0}
    for pct in ("50", "99"):
        found = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        figures[f"p{pct}_ms"] = float(found.group(1)) * UNITS[found.group(2)] if found else None
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                    r"timeout (\d+)"):
        found = re.search(pattern, out)
        if found:
            figures["errors"] += sum(int(n) for n in found.groups())
    return figures


def run_http_saturated(servers: Servers, config: Config, wrk_binary: str) -> dict[str, Any]:
    cpu = servers.cpu()
    saturated = wrk(wrk_binary, f"http://127.0.0.1:{servers.http_port}/", config.wrk_seconds)
    saturated["server_cpu_percent"] = (servers.cpu() - cpu) / config.wrk_seconds * 100
    return saturated


def run_http_fixed(servers: Servers, config: Config) -> dict[str, Any]:
    paced = load({"mode": "http", "url": f"http://127.0.0.1:{servers.http_port}/", "rate": config.rate,
                  "connections": 20, "warmup": 0.5, "seconds": config.rate_seconds}, config.rate_seconds + 60)
    return {"rate": config.rate, **latency_summary(paced["latencies_ns"]), "errors": paced["errors"]["status"]}


def run_echo(servers: Servers, config: Config) -> dict[str, Any]:
    cpu = servers.cpu()
    got = load({"mode": "echo", "url": f"ws://127.0.0.1:{servers.ws_port}/echo/", "clients": ECHO_CLIENTS,
                "warmup": config.echo_warmup, "seconds": config.echo_seconds}, config.echo_seconds + 90)
    seconds = config.echo_warmup + config.echo_seconds
    return {"msg_per_s": got["messages"] / got["seconds"], **latency_summary(got["latencies_ns"]),
            "client_cpu_percent": got["client_cpu_seconds"] / got["seconds"] * 100,
            "server_cpu_percent": (servers.cpu() - cpu) / seconds * 100}  # includes connecting: roughly


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
                rows[setup]["idle"] = idle = run_idle(s, config)
                failed = f", {idle['handshakes_failed']:,} handshakes failed ({idle['failure'][:80]})" \
                    if idle["handshakes_failed"] else ""
                print(f"  idle {idle['connections']:,} sockets: {idle['bytes_per_connection'] / 1024:5.1f} KiB each "
                      f"(opened in {idle['open_seconds']:.1f} s{failed})  {setup.label}", flush=True)
                wait_quiet(s)
            for s in servers.values():
                wrk(wrk_binary, f"http://127.0.0.1:{s.http_port}/", 1)  # warm-up (wrk takes whole seconds)
            saturated: dict[Setup, list[dict[str, Any]]] = {setup: [] for setup in setups}
            for _ in range(config.rounds):
                for setup, s in servers.items():
                    saturated[setup].append(run_http_saturated(s, config, wrk_binary))
            for setup, s in servers.items():
                sat = median_run(saturated[setup], "req_per_s")
                fixed = run_http_fixed(s, config)
                rows[setup]["http"] = {"saturated": sat, "fixed": fixed}
                print(f"  HTTP {sat['req_per_s']:>7,.0f} req/s (runs {fmt_runs(sat['runs_req_per_s'])}, server CPU "
                      f"{sat['server_cpu_percent']:.0f}%); at {fixed['rate']} req/s p50 {fixed['p50_ms']:.2f} ms "
                      f"p99 {fixed['p99_ms']:.2f} ms  {setup.label}", flush=True)
            echoes: dict[Setup, list[dict[str, Any]]] = {setup: [] for setup in setups}
            for _ in range(config.rounds):
                for setup, s in servers.items():
                    echoes[setup].append(run_echo(s, config))
                    wait_quiet(s)
            for setup in setups:
                rows[setup]["echo"] = echo = median_run(echoes[setup], "msg_per_s")
                print(f"  echo {echo['msg_per_s']:>7,.0f} msg/s (runs {fmt_runs(echo['runs_msg_per_s'])}), p50 "
                      f"{echo['p50_ms']:.2f} ms p99 {echo['p99_ms']:.2f} ms (client CPU "
                      f"{echo['client_cpu_percent']:.0f}%)  {setup.label}", flush=True)
        for setup, s in servers.items():
            rows[setup]["broadcast"] = b = run_broadcast(s, config)
            print(f"  broadcast: all {MEMBERS} in {fmt_ms(b['all_ms'])} ms (median of {b['complete_rounds']} "
                  f"complete rounds), lost {b['lost']:,} of {b['sent']:,}  {setup.label}", flush=True)
            wait_quiet(s)
        for setup, s in servers.items():
            s.alive()
            rows[setup]["log_warnings"] = warnings(s.text())
        return list(rows.values())
    finally:
        stop_all(list(servers.values()))


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


SETUPS = (Setup("crossroads", "memory"), Setup("daphne", "memory"), Setup("crossroads", "redis"),
          Setup("daphne", "redis"), Setup("crossroads", "memory", tuned=True), Setup("crossroads", "redis", tuned=True))


def ensure_daphne() -> None:
    """The channels_redis virtualenv of bench/layer.py and bench/worker.py, plus Daphne at a pinned version."""
    ensure_channels_venv()
    if installed_versions(str(CR_PYTHON), ["daphne"]) != {"daphne": DAPHNE_PIN}:
        print(f"installing daphne {DAPHNE_PIN} into {CR_VENV.relative_to(ROOT)} ...", flush=True)
        keep = installed_versions(str(CR_PYTHON), ["channels_redis", "redis", "hiredis", *CHANNELS_PINS])
        pins = [f"{k}=={v}" for k, v in keep.items() if v]  # Daphne's requirements must not move the others
        subprocess.run([str(CR_PYTHON), "-m", "pip", "install", "-q", f"daphne=={DAPHNE_PIN}", *pins], check=True)


def raise_nofile() -> None:
    """Soft descriptor limit up to the hard one; the servers and clients started from here inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * 10_000 // IDLE_PROCESSES + 1000:
        print(f"warning: the hard descriptor limit is {hard}: 10,000 sockets may not open", file=sys.stderr)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_all(config: Config) -> dict[str, Any]:
    wrk_binary = ensure_wrk()
    ensure_daphne()
    raise_nofile()
    redis = BenchRedis()
    try:
        results: dict[str, Any] = {"config": asdict(config), "machine": machine(redis, bool(cpu_pin(0))), "rows": []}
        results["machine"]["channels_venv"]["daphne"] = installed_versions(str(CR_PYTHON), ["daphne"])["daphne"]
        results["machine"]["crossroads_venv"].update(installed_versions(sys.executable,
                                                                        ["Twisted", "autobahn", "websockets"]))
        results["machine"]["channels_venv"].update(installed_versions(str(CR_PYTHON), ["Twisted", "autobahn"]))
        results["machine"]["wrk"] = subprocess.run([wrk_binary, "-v"], capture_output=True,
                                                   text=True).stdout.split(" Copyright")[0].strip()
        with tempfile.TemporaryDirectory(prefix="web-bench-") as workdir:
            results["rows"] = measure([s for s in SETUPS if not s.tuned], redis, config, wrk_binary, Path(workdir))
            for setup in SETUPS:  # one at a time: both use the same Redis group name
                if setup.tuned:
                    results["rows"] += measure([setup], redis, config, wrk_binary, Path(workdir))
        return results
    finally:
        redis.stop()


# -- reporting --


def find(results: dict[str, Any], system: str, layer: str, tuned: bool = False) -> dict[str, Any] | None:
    for row in results["rows"]:
        if (row["system"], row["layer"], row["tuned"]) == (system, layer, tuned):
            return row
    return None


def daphne_best(results: dict[str, Any], figure: Any) -> float:
    """Daphne's better figure of its two layers: the targets compare against the stronger one."""
    return max(figure(row) for row in results["rows"] if row["system"] == "daphne")


def http_rate(row: dict[str, Any]) -> float:
    return row["http"]["saturated"]["req_per_s"]


def echo_rate(row: dict[str, Any]) -> float:
    return row["echo"]["msg_per_s"]


def main_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in results["rows"] if not row["tuned"]]


def ratio_cell(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×" if reference else "—"


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f}–{max(values):,.0f}"


def http_table(results: dict[str, Any]) -> str:
    best = daphne_best(results, http_rate)
    rate = results["config"]["rate"]
    lines = ["| server | req/s, saturated (wrk, median) | runs, min–max | × Daphne (best) | wrk p50 / p99 ms "
             f"| server CPU | errors | p50 ms at {rate} req/s | p99 ms at {rate} req/s |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in main_rows(results):
        sat, fixed = row["http"]["saturated"], row["http"]["fixed"]
        lines.append(f"| {row['label']} | {sat['req_per_s']:,.0f} | {spread(sat['runs_req_per_s'])} "
                     f"| {ratio_cell(sat['req_per_s'], best)} "
                     f"| {sat['p50_ms']:.1f} / {sat['p99_ms']:.1f} | {sat['server_cpu_percent']:.0f}% "
                     f"| {sat['errors'] + fixed['errors']} | {fixed['p50_ms']:.2f} | {fixed['p99_ms']:.2f} |")
    return "\n".join(lines)


def echo_table(results: dict[str, Any]) -> str:
    best = daphne_best(results, echo_rate)
    lines = ["| server | messages/s (median) | runs, min–max | × Daphne (best) | round trip p50 ms | p99 ms "
             "| load client CPU |", "|---|--:|--:|--:|--:|--:|--:|"]
    for row in main_rows(results):
        e = row["echo"]
        lines.append(f"| {row['label']} | {e['msg_per_s']:,.0f} | {spread(e['runs_msg_per_s'])} "
                     f"| {ratio_cell(e['msg_per_s'], best)} "
                     f"| {e['p50_ms']:.2f} | {e['p99_ms']:.2f} | {e['client_cpu_percent']:.0f}% |")
    return "\n".join(lines)


def broadcast_table(results: dict[str, Any]) -> str:
    theirs = find(results, "daphne", "redis")
    reference = theirs["broadcast"]["all_ms"] if theirs else None
    lines = [f"| server | all {MEMBERS:,} have it, ms (median) | worst complete round ms | × faster than "
             "Daphne + channels_redis | median member ms (of those that got it) | complete rounds | lost (of sent) |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for row in results["rows"]:
        b = row["broadcast"]
        faster = f"{reference / b['all_ms']:.2f}×" if reference and b["all_ms"] else "—"
        lines.append(f"| {row['label']} | {fmt_ms(b['all_ms'])} | {fmt_ms(b['all_ms_max'])} | {faster} "
                     f"| {fmt_ms(b['member_median_ms'])} | {b['complete_rounds']} of {len(b['rounds'])} "
                     f"| {b['lost']:,} of {b['sent']:,} |")
    return "\n".join(lines)


def idle_table(results: dict[str, Any]) -> str:
    lines = ["| server | sockets open | KiB per socket | RSS before → after, MiB (per process) | opened in s "
             "| closed by the server | handshakes failed |", "|---|--:|--:|--:|--:|--:|--:|"]
    for row in main_rows(results):
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
    return found


def chart(results: dict[str, Any], path: Path) -> None:
    """Four panels, one bar per server: HTTP req/s, echo msg/s, broadcast time, KiB per idle socket."""
    plt, _ = pyplot()
    rows = main_rows(results)
    colors = {("crossroads", "memory"): "#1f77b4", ("crossroads", "redis"): "#6baed6",
              ("daphne", "memory"): "#d62728", ("daphne", "redis"): "#ff9896"}
    panels = (("HTTP hello: req/s (higher is better)", rows, http_rate),
              (f"WebSocket echo, {ECHO_CLIENTS} clients: msg/s (higher is better)", rows, echo_rate),
              (f"Broadcast to {MEMBERS:,}: ms until all have it\n(lower is better; ✗ = messages lost)",
               results["rows"], lambda r: r["broadcast"]["all_ms"] or 0.0),
              ("KiB per idle WebSocket (lower is better)", rows,
               lambda r: r["idle"]["bytes_per_connection"] / 1024))
    fig, axes = plt.subplots(1, 4, figsize=(18, 5.2), gridspec_kw={"width_ratios": [1, 1, 1.5, 1]})
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
        ax.set_xticks(range(len(subset)), labels, fontsize=7.5)
        ax.set_title(title, fontsize=9.5)
        ax.set_ylim(top=(max(values) or 1) * 1.18)
    fig.suptitle("crossroads bridges vs Daphne 4 + Channels 4 (2 cores: servers on one, load on the other)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def short_label(row: dict[str, Any]) -> str:
    if row["system"] == "daphne":
        return f"Daphne\n{'in-memory' if row['layer'] == 'memory' else 'channels_redis'}"
    return f"crossroads\n{row['layer']}://" + (f"\nqueue {TUNED_CAPACITY:,}" if row["tuned"] else "")


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
    default = [row for row in results["rows"] if row["system"] == "crossroads" and not row["tuned"]]
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
    ours = [row["idle"]["open_seconds"] for row in main_rows(results) if row["system"] == "crossroads"]
    theirs = [row["idle"]["open_seconds"] for row in main_rows(results) if row["system"] == "daphne"]
    if ours and theirs:
        lines.append(f"- Opening the {results['config']['idle']:,} idle sockets took crossroads "
                     f"{' and '.join(f'{v:.0f}' for v in ours)} s, Daphne {' and '.join(f'{v:.0f}' for v in theirs)} s "
                     "(same clients, same concurrency).")
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
    rel = os.path.relpath
    pinning = (f"Every server process is pinned to core {SERVER_CORE} and every load client (wrk, `_web_load.py`) to "
               f"core {CLIENT_CORE} with `taskset -c`; redis-server is not pinned. So each server gets one core, "
               "whatever its number of processes: crossroads' three redis:// processes share it."
               if m["pinned"] else "Processes are not pinned (no taskset, or a single core).")
    return f"""## Web (HTTP and WebSocket)

crossroads' HTTP bridge (`type = "http"`) and WebSocket bridge (`type = "websocket"`) against what a Django user
runs instead: [Daphne](https://pypi.org/project/daphne/) {m['channels_venv']['daphne']} serving Channels
{m['channels_venv']['channels']} consumers, with Channels' `InMemoryChannelLayer` or channels_redis
{m['channels_venv']['channels_redis']}. The same consumers on both sides: a hello-world HTTP consumer
(`200`, `content-type: text/plain`, `Hello, world!`), a WebSocket echo, and a broadcast consumer that adds each
socket to one group on connect and sends what it receives to the group.

Reproduce with `.venv/bin/python bench/web.py` (took {results['seconds'] / 60:.1f} min; `--quick` is a smoke run
that writes nothing). It starts its own redis-server, installs wrk with apt-get if it is missing (as root; otherwise
it says what to run), and adds Daphne {DAPHNE_PIN} to bench/layer.py's `.bench-venvs/channels_redis` (Channels and
Django pinned by bench/worker.py). Raw figures: [`bench/results/web.json`]({rel(RESULTS, DOC.parent)}).

**Machine**: {m['nproc']} cores, {m['cpu']}; Python {m['python']}; redis-server {m['redis_server']};
{m['wrk']}; crossroads at {m['commit']} with {mine}; Channels venv: {theirs}.

### Method

- **Servers.** crossroads memory://: `crossroads run` (both bridges and 4 worker threads in one process).
  crossroads redis://: `crossroads bridge web`, `crossroads bridge sockets` and `crossroads worker`, three
  processes. Daphne: one `daphne` process with the consumers inside it; Channels 4 has no separate worker for HTTP
  and WebSocket consumers (`runworker` only serves `channel` consumers), so our redis:// split is compared with
  Daphne's single process, with its layer set to channels_redis (every consumer instance then also creates a
  channel and listens on it, which is what a Channels deployment with a Redis layer pays) or to the in-memory layer.
  crossroads' config keeps every default (layer capacity 100, 4 worker threads); both servers keep their access
  log on (to a file). The Channels consumers are what its docs teach: `AsyncHttpConsumer` for HTTP (Channels' own
  HTTP consumer, like-for-like with a crossroads consumer; a Django view would add Django's request machinery),
  the synchronous `WebsocketConsumer` for echo, and for broadcast a `WebsocketConsumer` with `groups = [...]`
  whose `receive` calls `async_to_sync(group_send)`. crossroads: functions routed on `http.request` and
  `websocket.*` (`bench/_web_crossroads.py`).
- {pinning}
- **HTTP, saturated**: wrk (1 thread, {HTTP_CONNECTIONS} keep-alive connections, {cfg['wrk_seconds']:g} s after a
  1 s warm-up run), `GET /`. Its p50/p99 are latencies at saturation, mostly queueing. Server CPU is all its
  processes' user + system time over the run ÷ its length (100% = the one core).
- **HTTP at a fixed rate**: {cfg['rate']} requests/s for {cfg['rate_seconds']:g} s after 0.5 s, the same for every
  server and below every one's saturation, open loop on 20 keep-alive connections (`_web_load.py`; Debian's wrk 4
  cannot pace). Latency runs from each request's scheduled time, so a stall is not hidden.
- **WebSocket echo**: {ECHO_CLIENTS} clients (`websockets` {m['crossroads_venv'].get('websockets')}, no
  compression), each sending a 100-character text and waiting for it to come back, for {cfg['echo_seconds']:g} s
  after {cfg['echo_warmup']:g} s; messages/s are round trips completed in the window. The load client's CPU is
  shown: near 100% it, not the server, would be the limit.
- **Broadcast**: {MEMBERS:,} sockets join the group (opened 50 at a time); one of them sends a text and we time
  until the last member has it, {cfg['broadcasts']} rounds; a member without the message after
  {BROADCAST_TIMEOUT:g} s counts as lost. The time includes the client reading {MEMBERS:,} frames on one core, the
  same for both. crossroads is also run with its WebSocket bridge's reply queue raised to {TUNED_CAPACITY:,}
  (`channel_capacity = {{"websocket.sockets.*" = {TUNED_CAPACITY}}}`): every socket of one bridge process shares
  that queue, 100 messages by default.
- **Memory**: {cfg['idle']:,} idle sockets to the echo consumer, opened from {IDLE_PROCESSES} client processes
  ({IDLE_CONCURRENCY} handshakes in flight each, under the connect channel's capacity), held {cfg['settle']:g} s;
  KiB per socket is the growth of the RSS of every server process (redis-server excluded) ÷ sockets, measured
  first, on servers that have served nothing but a readiness probe. The soft `ulimit -n` is raised to the hard
  limit for every process.

### HTTP hello world

{http_table(results)}

### WebSocket echo, {ECHO_CLIENTS} clients

{echo_table(results)}

### Broadcast to a {MEMBERS:,}-member group

{broadcast_table(results)}

### Memory per idle WebSocket

{idle_table(results)}

![web benchmark]({rel(CHART, DOC.parent)})

### Targets

× Daphne (best): against the better of Daphne's two layers for each figure.

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
    args = parser.parse_args(argv)
    if args.report:
        save_run("web", json.loads(RESULTS.read_text()), doc=DOC, chart_path=CHART, chart=chart,
                 document=document, results_path=None)
        return 0
    if hasattr(os, "sched_setaffinity") and cpu_pin(CLIENT_CORE):
        os.sched_setaffinity(0, {CLIENT_CORE})  # this process only waits; keep it off the servers' core
    results = timed_run(run_all, Config.make(args.quick))
    if results is None:
        return 1
    for table in (http_table, echo_table, broadcast_table, idle_table):
        print()
        print(table(results))
    print()
    print(targets_markdown(targets(results)))
    print()
    print(reading(results))
    print()
    print(problems(results))
    print(f"\ntook {results['seconds']} s")
    if not args.quick:
        save_run("web", results, doc=DOC, chart_path=CHART, chart=chart, document=document, results_path=RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
