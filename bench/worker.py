"""Worker benchmark: request/reply round trips through crossroads' worker, and what the consumer framework
costs per message, side by side with Django Channels 4 (its worker and SyncConsumer, on channels_redis).

Owns this file and its helpers, each run where it must run:

- ``bench/_worker_crossroads.py``: the echo consumer, the bridge-like sender, the worker process for
  redis://, the framework-cost timing (``.venv``);
- ``bench/_worker_channels.py`` and ``bench/_worker_django_settings.py``: the same for Channels
  (the channels_redis virtualenv);
- ``bench/_worker_load.py``: the request and the round-trip clock both senders share;
- ``bench/_sections.py``: rewriting one section of ``docs/benchmarks.md`` (shared with bench/layer.py);

and what they write: the "Worker" section of ``docs/benchmarks.md``, ``docs/img/worker-roundtrips.png``
and the raw figures in ``bench/results/worker.json``.

Scenarios (the method is written out in the doc section this script writes):

1. round trips per second and latency, with 1 and 64 requests in flight: a sender that behaves like a
   bridge sends ``{"text": ..., "reply_channel": "bench.bridge!N"}`` to ``bench.request`` and receives the
   replies on its process queue; the worker runs an echo consumer. memory:// in one process (crossroads:
   worker threads on the blocking face, sender on the async face; Channels: its in-memory layer), and
   redis:// with the worker in a process of its own (crossroads: 1 and 4 threads; Channels: runworker);
2. the framework's cost per message: ``Dispatcher.handle`` against the same reply sent by hand.

Usage: ``.venv/bin/python bench/worker.py [--quick]``; ``--quick`` is a smoke run that writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so bench.layer imports as part of the bench package; bench/ stays for the helpers

import _worker_crossroads as ours  # noqa: E402  (after the sys.path fix, on purpose)
from _processes import Scraper  # noqa: E402
from _sections import pyplot, save_run, targets_markdown  # noqa: E402

from bench.layer import (  # noqa: E402
    CR_PYTHON,
    BenchError,
    BenchRedis,
    cpu_model,
    cpu_pin,
    ensure_channels_redis,
    installed_versions,
    latency_summary,
    timed_run,
)

CHANNELS_SIDE = ROOT / "bench" / "_worker_channels.py"
CROSSROADS_SIDE = ROOT / "bench" / "_worker_crossroads.py"
RESULTS = ROOT / "bench" / "results" / "worker.json"
DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "img" / "worker-roundtrips.png"
# Pinned so runs compare; channels_redis, redis-py and hiredis are pinned by bench/layer.py.
CHANNELS_PINS = {"channels": "4.3.2", "Django": "5.2.19"}

SENDER_CORE, WORKER_CORE = 0, 1
MEMORY_TARGET = 20_000  # round trips/s, memory://
OVERHEAD_TARGET_US = 20.0  # framework cost per message
METRICS_TARGET = 0.97  # round trips/s with /metrics served and scraped ÷ without (issue 16: within 3%)
METRICS_SCRAPE_INTERVAL = 1.0  # seconds; 15x Prometheus' default, so that any cost of a scrape shows


@dataclass(frozen=True)
class Config:
    warmup: float  # seconds of round trips discarded first, from the first reply on
    seconds: float  # length of one measured window
    windows: int  # measured windows per case; the median is reported
    in_flight: tuple[int, ...]
    threads: tuple[int, ...]  # crossroads worker threads
    overhead_batches: int
    overhead_per_batch: int
    overhead_warmup: float  # seconds of untimed dispatching before the overhead timing
    metrics_rounds: int  # rounds of metrics off/on, the order alternating

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(warmup=0.3, seconds=0.5, windows=2, in_flight=(1, 64), threads=(1, 4),
                       overhead_batches=100, overhead_per_batch=100, overhead_warmup=0.3, metrics_rounds=2)
        return cls(warmup=1.0, seconds=2.0, windows=5, in_flight=(1, 64), threads=(1, 4),
                   overhead_batches=2000, overhead_per_batch=100, overhead_warmup=2.0, metrics_rounds=8)


@dataclass(frozen=True)
class Case:
    layer: str  # "memory" | "redis"
    system: str  # "crossroads" | "channels"
    threads: int | None  # crossroads worker threads; None for Channels' worker
    window: int

    @property
    def label(self) -> str:
        if self.system == "crossroads":
            return f"crossroads, {self.threads} thread{'s' if self.threads != 1 else ''}"
        return "Channels, runworker" if self.layer == "redis" else "Channels, Worker in-process"


# -- running --


def summarize(case: Case, raw: dict[str, Any]) -> dict[str, Any]:
    rates = [n / raw["window_seconds"] for n in raw["round_trips"]]
    if not raw["latencies_ns"]:
        raise BenchError(f"{case}: no round trip completed in the measured windows")
    return {**asdict(case), "label": case.label, "rt_per_s": statistics.median(rates), "runs_rt_per_s": rates,
            **latency_summary(raw["latencies_ns"]), "cpu_us_per_rt": cpu_per_round_trip(raw),
            **({"worker": raw["worker"]} if "worker" in raw else {})}


def cpu_per_round_trip(raw: dict[str, Any]) -> dict[str, float]:
    """CPU µs per measured round trip, by process (or thread): sender, worker, redis, or one process."""
    cpu = dict(raw.get("cpu_seconds", {}))
    if "sender" in cpu and "process" in cpu:  # crossroads memory://: the worker is the rest of the process
        cpu["worker"] = cpu.pop("process") - cpu["sender"]
    count = sum(raw["round_trips"])
    return {name: seconds / count * 1e6 for name, seconds in cpu.items()} if count else {}


def check_worker(case: Case, counters: dict[str, Any]) -> None:
    if counters["errors"] or counters["undelivered"] or counters["unrouted"]:
        raise BenchError(f"{case}: the worker reported trouble: {counters}")


def run_channels(args: list[str], timeout: float, core: int) -> dict[str, Any]:
    """One Channels-side process (channels_redis virtualenv); its last stdout line is its JSON result."""
    command = [*cpu_pin(core), str(CR_PYTHON), str(CHANNELS_SIDE), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(args[:2])} timed out; stderr:\n{(exc.stderr or '')[-2000:]}") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise BenchError(f"Channels {' '.join(args[:2])} exited {done.returncode}; stderr:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


class Background:
    """A worker process on its own core, stderr kept in a file (a full pipe would stall it)."""

    def __init__(self, command: list[str], what: str, stdin: bool = False) -> None:
        self.what = what
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([*cpu_pin(WORKER_CORE), *command], cwd=ROOT, text=True, stderr=self.stderr,
                                        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                        stdout=subprocess.PIPE)

    def fail(self, why: str) -> BenchError:
        self.process.kill()
        self.process.wait()
        self.stderr.seek(0)
        return BenchError(f"{self.what} {why}; stderr:\n{self.stderr.read()[-2000:]}")

    def alive(self) -> None:
        if self.process.poll() is not None:
            raise self.fail(f"exited {self.process.returncode}")


def run_memory(config: Config, results: list[dict[str, Any]]) -> None:
    """memory://: crossroads in this process; Channels' in-memory layer in one process of its own."""
    for threads in config.threads:
        for window in config.in_flight:
            case = Case("memory", "crossroads", threads, window)
            raw = ours.run_in_process("memory://", threads, window, config.warmup, config.seconds, config.windows)
            check_worker(case, raw["worker"])
            results.append(report(summarize(case, raw)))
    for window in config.in_flight:
        case = Case("memory", "channels", None, window)
        raw = run_channels(["memory", *phases(config, window)], timeout(config), SENDER_CORE)
        results.append(report(summarize(case, raw)))


@contextlib.contextmanager
def crossroads_worker(server: BenchRedis, threads: int, *extra: str) -> Iterator[tuple[Background, dict[str, Any]]]:
    """A crossroads worker process (``_worker_crossroads.py serve``) on a flushed server: (it, its ready line).

    On the way out its standard input is closed, which stops it; its last line, its counters, is checked."""
    server.flush()
    worker = Background([sys.executable, str(CROSSROADS_SIDE), "serve", server.url, str(threads), *extra],
                        f"crossroads worker ({threads} threads{', ' if extra else ''}{' '.join(extra)})", stdin=True)
    try:
        ready = worker.process.stdout.readline()
        if not ready:
            raise worker.fail("did not start")
        yield worker, json.loads(ready)
        out, _ = worker.process.communicate(input="", timeout=30)  # closing stdin stops it
    except subprocess.TimeoutExpired:
        raise worker.fail("did not stop") from None
    finally:
        if worker.process.poll() is None:  # the sender failed: leave no worker behind
            worker.process.kill()
            worker.process.wait()
    check_worker(Case("redis", "crossroads", threads, 0), json.loads(out.splitlines()[-1]))


def run_redis(server: BenchRedis, config: Config, results: list[dict[str, Any]]) -> None:
    """redis://: the worker in a process of its own on WORKER_CORE, the sender on SENDER_CORE."""
    for threads in config.threads:
        with crossroads_worker(server, threads) as (worker, _):
            for window in config.in_flight:
                case = Case("redis", "crossroads", threads, window)
                raw = ours.run_sender(server.url, window, config.warmup, config.seconds, config.windows,
                                      {"worker": worker.process.pid, "redis": server.process.pid})
                worker.alive()
                results.append(report(summarize(case, raw)))
    server.flush()
    worker = Background([str(CR_PYTHON), str(CHANNELS_SIDE), "worker", server.url], "Channels runworker")
    try:
        for window in config.in_flight:
            case = Case("redis", "channels", None, window)
            pids = [str(worker.process.pid), str(server.process.pid)]
            raw = run_channels(["send", server.url, *phases(config, window), *pids], timeout(config), SENDER_CORE)
            worker.alive()
            results.append(report(summarize(case, raw)))
    finally:
        worker.process.terminate()
        worker.process.wait(10)


def run_metrics(server: BenchRedis, config: Config) -> dict[str, Any]:
    """redis://, 4 threads, the largest window: the worker with /metrics scraped every second, and without,
    round by round, the order alternating."""
    window, threads = max(config.in_flight), max(config.threads)
    got: dict[str, Any] = {"window": window, "threads": threads, "interval": METRICS_SCRAPE_INTERVAL,
                           "rounds": config.metrics_rounds, "scrapes": 0, "scrape_failures": 0,
                           **{mode: {"rates": [], "worker_cpu_us": []} for mode in ("off", "on")}}
    for round_ in range(config.metrics_rounds):
        for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
            with crossroads_worker(server, threads, *(["--metrics"] if mode == "on" else [])) as (worker, ready):
                scraper = Scraper(ready["metrics_port"], METRICS_SCRAPE_INTERVAL) if mode == "on" else None
                if scraper:
                    scraper.start()
                raw = ours.run_sender(server.url, window, config.warmup, config.seconds, config.windows,
                                      {"worker": worker.process.pid})
                if scraper:
                    scraper.stopping.set()
                    scraper.join()
                    got["scrapes"] += scraper.scrapes
                    got["scrape_failures"] += scraper.failures
                worker.alive()
            row = summarize(Case("redis", "crossroads", threads, window), raw)
            got[mode]["rates"].append(row["rt_per_s"])
            got[mode]["worker_cpu_us"].append(row["cpu_us_per_rt"].get("worker", 0.0))
            print(f"metrics {mode:>3}, round {round_ + 1}: {row['rt_per_s']:>9,.0f} rt/s, worker "
                  f"{got[mode]['worker_cpu_us'][-1]:.1f} µs CPU per round trip", flush=True)
    if got["scrape_failures"] or not got["scrapes"]:
        raise BenchError(f"the worker's /metrics answered {got['scrapes']} scrapes, failed {got['scrape_failures']}")
    return got


def phases(config: Config, window: int) -> list[str]:
    return [str(window), str(config.warmup), str(config.seconds), str(config.windows)]


def timeout(config: Config) -> float:
    return config.warmup + config.seconds * config.windows + 90  # + start-up and the first reply


def report(row: dict[str, Any]) -> dict[str, Any]:
    print(f"{row['layer'] + '://':<10} {row['label']:<30} {row['window']:>3} in flight  {row['rt_per_s']:>9,.0f} rt/s  "
          f"p50 {row['p50_ms']:7.3f} ms  p99 {row['p99_ms']:7.3f} ms", flush=True)
    return row


def run_overhead(config: Config) -> dict[str, Any]:
    """Framework cost per message; see ``_worker_crossroads.time_overhead`` and the doc for the definition."""
    deadline = time.monotonic() + config.overhead_warmup
    while time.monotonic() < deadline:  # a cold CPU and cold caches would make the first batches slower
        ours.time_overhead(10, config.overhead_per_batch)
    times = ours.time_overhead(config.overhead_batches, config.overhead_per_batch)
    paired = [h - d for h, d in zip(times["handle"], times["direct"], strict=True)]  # same moment, same CPU state
    us = {name: statistics.median(values) / 1e3 for name, values in times.items()}
    got = {"handle_us": us["handle"], "direct_us": us["direct"], "bare_us": us["bare"],
           "overhead_us": statistics.median(paired) / 1e3,
           "fastest_batch_us": {name: min(values) / 1e3 for name, values in times.items()},
           "batches": config.overhead_batches, "per_batch": config.overhead_per_batch}
    print(f"framework overhead: {got['overhead_us']:.2f} µs/message (handle {us['handle']:.2f} µs, "
          f"direct send {us['direct']:.2f} µs, bare body {us['bare']:.2f} µs)", flush=True)
    return got


# -- set-up --


def ensure_channels_venv() -> None:
    """bench/layer.py's channels_redis virtualenv, plus Channels and Django at pinned versions."""
    ensure_channels_redis()
    if installed_versions(str(CR_PYTHON), list(CHANNELS_PINS)) != CHANNELS_PINS:
        print(f"installing {', '.join(f'{k} {v}' for k, v in CHANNELS_PINS.items())} into {CR_PYTHON.parent.parent}",
              flush=True)
        subprocess.run([str(CR_PYTHON), "-m", "pip", "install", "-q", *(f"{k}=={v}" for k, v in CHANNELS_PINS.items())],
                       check=True)


def pin_self() -> bool:
    """Pin this process (the senders' side, and memory:// whole) to SENDER_CORE, as ``taskset -c`` would."""
    if not cpu_pin(SENDER_CORE) or not hasattr(os, "sched_setaffinity"):
        return False
    os.sched_setaffinity(0, {SENDER_CORE})
    return True


def machine(server: BenchRedis, pinned: bool) -> dict[str, Any]:
    cpu = cpu_model()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "consumers", "layer"], cwd=ROOT, capture_output=True,
                           text=True)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "redis_server": server.version,
        "pinned": pinned,
        "crossroads_venv": {name: importlib.metadata.version(name) for name in ("redis", "hiredis", "msgpack")},
        "channels_venv": installed_versions(str(CR_PYTHON), ["channels", "channels_redis", "Django", "asgiref",
                                                             "redis", "hiredis", "msgpack"]),
        "commit": (commit.stdout.strip() or "no commit yet")
        + (" + uncommitted consumers/ or layer/" if dirty.stdout.strip() else ""),
    }


def run_all(config: Config) -> dict[str, Any]:
    ensure_channels_venv()
    server = BenchRedis()  # before pinning: redis-server stays free to run on either core
    try:
        pinned = pin_self()
        results: dict[str, Any] = {"config": asdict(config), "machine": machine(server, pinned), "cases": []}
        results["overhead"] = run_overhead(config)
        run_memory(config, results["cases"])
        run_redis(server, config, results["cases"])
        results["metrics"] = run_metrics(server, config)
        return results
    finally:
        server.stop()


# -- reporting --


def find(results: dict[str, Any], layer: str, system: str, window: int, threads: int | None = None) -> dict | None:
    for row in results["cases"]:
        if (row["layer"], row["system"], row["window"], row["threads"]) == (layer, system, window, threads):
            return row
    return None


def vs_channels(results: dict[str, Any], row: dict[str, Any]) -> float | None:
    theirs = find(results, row["layer"], "channels", row["window"])
    return None if row["system"] == "channels" or theirs is None else row["rt_per_s"] / theirs["rt_per_s"]


def roundtrip_table(results: dict[str, Any]) -> str:
    lines = ["| layer | worker | in flight | round trips/s (median) | windows, min–max | p50 ms | p99 ms "
             "| × Channels | CPU µs per round trip: sender / worker / redis-server |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for row in results["cases"]:
        ratio = vs_channels(results, row)
        lines.append(f"| {row['layer']}:// | {row['label']} | {row['window']} | {row['rt_per_s']:,.0f} "
                     f"| {min(row['runs_rt_per_s']):,.0f}–{max(row['runs_rt_per_s']):,.0f} "
                     f"| {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {'—' if ratio is None else f'{ratio:.2f}'} "
                     f"| {cpu_cell(row['cpu_us_per_rt'])} |")
    return "\n".join(lines)


def cpu_cell(cpu: dict[str, float]) -> str:
    if "process" in cpu:
        return f"{cpu['process']:.0f} (one process, both)"
    return " / ".join(f"{cpu[name]:.0f}" if name in cpu else "—" for name in ("sender", "worker", "redis"))


def overhead_table(results: dict[str, Any]) -> str:
    o = results["overhead"]
    fastest = o["fastest_batch_us"]
    return "\n".join([
        "| per message | µs (median of batches) | µs (fastest batch) |",
        "|---|--:|--:|",
        f"| `Dispatcher.handle(channel, content)`: the framework | {o['handle_us']:.2f} | {fastest['handle']:.2f} |",
        f"| the same reply sent by hand with `layer.sync.send` | {o['direct_us']:.2f} | {fastest['direct']:.2f} |",
        f"| the consumer body alone, no send | {o['bare_us']:.2f} | {fastest['bare']:.2f} |",
        f"| **framework overhead** (handle − by hand, paired batches) | **{o['overhead_us']:.2f}** "
        f"| {fastest['handle'] - fastest['direct']:.2f} |",
    ])


def metrics_ratio(results: dict[str, Any]) -> float:
    """Round trips/s with metrics on ÷ off, the median of the rounds' ratios (each round's pair ran back to back)."""
    m = results["metrics"]
    return statistics.median(on / off for on, off in zip(m["on"]["rates"], m["off"]["rates"], strict=True))


def metrics_table(results: dict[str, Any]) -> str:
    m = results["metrics"]
    lines = ["| worker | round trips/s (median of rounds) | rounds | worker CPU µs per round trip (median) |",
             "|---|--:|--:|--:|"]
    for mode, label in (("off", "no [metrics]"), ("on", f"/metrics served, scraped every {m['interval']:g} s")):
        rates = m[mode]["rates"]
        lines.append(f"| {label} | {statistics.median(rates):,.0f} | {', '.join(f'{r:,.0f}' for r in rates)} "
                     f"| {statistics.median(m[mode]['worker_cpu_us']):.1f} |")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    found = []
    window = max(results["config"]["in_flight"])
    for threads in results["config"]["threads"]:
        row = find(results, "memory", "crossroads", window, threads)
        found.append((f"memory:// ≥ {MEMORY_TARGET:,} round trips/s ({window} in flight, {threads} thread"
                      f"{'s' if threads != 1 else ''})", f"{row['rt_per_s']:,.0f}", row["rt_per_s"] >= MEMORY_TARGET))
    overhead = results["overhead"]["overhead_us"]
    found.append((f"framework overhead < {OVERHEAD_TARGET_US:g} µs per message", f"{overhead:.2f} µs",
                  overhead < OVERHEAD_TARGET_US))
    if "metrics" in results:
        ratio = metrics_ratio(results)
        found.append((f"redis://, metrics on: round trips/s ≥ {METRICS_TARGET:.0%} of metrics off (issue 16)",
                      f"{ratio:.3f}× (median of {results['metrics']['rounds']} paired rounds)",
                      ratio >= METRICS_TARGET))
    return found


def targets_table(results: dict[str, Any]) -> str:
    return targets_markdown(targets(results), "target")


def chart(results: dict[str, Any], path: Path) -> None:
    """Round trips/s per worker, 1 and N in flight, memory:// and redis:// side by side (log scale)."""
    plt, ticker = pyplot()

    windows = results["config"]["in_flight"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, layer in zip(axes, ("memory", "redis"), strict=True):
        labels = list(dict.fromkeys(row["label"] for row in results["cases"] if row["layer"] == layer))
        width = 0.8 / len(windows)
        for i, window in enumerate(windows):
            values = []
            for label in labels:
                row = next(r for r in results["cases"] if r["layer"] == layer and r["label"] == label
                           and r["window"] == window)
                values.append(row["rt_per_s"])
            xs = [x + (i - (len(windows) - 1) / 2) * width for x in range(len(labels))]
            bars = ax.bar(xs, values, width, label=f"{window} in flight")
            ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8, padding=2)
        if layer == "memory":
            ax.axhline(MEMORY_TARGET, color="crimson", linestyle="--", linewidth=1)
            ax.text(len(labels) - 0.5, MEMORY_TARGET * 1.08, f"target {MEMORY_TARGET:,}", color="crimson",
                    ha="right", fontsize=8)
        ax.set_xticks(range(len(labels)), [label.replace(", ", ",\n") for label in labels], fontsize=9)
        ax.set_title(f"{layer}://" + (" (one process)" if layer == "memory" else " (worker in its own process)"))
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:,.0f}"))
    axes[0].set_ylabel("request/reply round trips per second (log)")
    axes[0].set_ylim(top=axes[0].get_ylim()[1] * 2)
    axes[1].legend(fontsize=9, loc="upper right")
    fig.suptitle("Echo consumer, bridge-like sender: crossroads worker vs Channels 4 worker (higher is better)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def total_cpu(row: dict[str, Any]) -> float:
    return sum(row["cpu_us_per_rt"].values())


def reading(results: dict[str, Any]) -> str:
    """What the table says, in figures computed from it."""
    window = max(results["config"]["in_flight"])
    lines = []
    for layer in ("memory", "redis"):
        theirs = find(results, layer, "channels", window)
        for threads in results["config"]["threads"]:
            row = find(results, layer, "crossroads", window, threads)
            if row and theirs and row["cpu_us_per_rt"] and theirs["cpu_us_per_rt"]:
                lines.append(f"- {layer}://, {window} in flight, {threads} thread{'s' if threads != 1 else ''}: "
                             f"{total_cpu(row):,.0f} µs against Channels' {total_cpu(theirs):,.0f} µs "
                             f"({total_cpu(theirs) / total_cpu(row):.1f}× less).")
    return "CPU per round trip, all processes together (what a deployment pays per message):\n\n" + "\n".join(lines)


def metrics_section(results: dict[str, Any]) -> str:
    if "metrics" not in results:
        return "Not measured in this run."
    m = results["metrics"]
    return f"""What serving Prometheus metrics costs the worker (issue 16: within 3%): the redis:// worker with
{m['threads']} threads and {m['window']} requests in flight, as above, started once with its `/metrics` endpoint (the
`MetricsServer` and collectors `crossroads worker` uses with a `[metrics]` table) and once without, in
{m['rounds']} rounds, the order alternating round by round; with metrics on, a thread of the benchmark GETs
`/metrics` every {m['interval']:g} s ({m['scrapes']} scrapes in all, 15× Prometheus' default rate). What is always
paid, metrics or not, is counted inside "Consumer overhead per message" above: the dispatcher's counters and the
per-consumer duration histogram (two `perf_counter` calls and a bisect per message). A round's ratio swings by
several percent either way on a shared machine (0.94 to 1.08 over 8 rounds on 2026-12-03, where 4 rounds had
given 0.961 and a "missed"), so a full run takes 8 rounds. A scrape itself costs the worker ~1.5 ms of CPU
(200 scrapes of an idle worker, on that machine): 0.15% of a core at one a second.

{metrics_table(results)}

Metrics on ÷ off: {metrics_ratio(results):.3f}× (the median of the rounds' ratios)."""


def document(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    mine = ", ".join(f"{k} {v}" for k, v in m["crossroads_venv"].items())
    theirs = ", ".join(f"{k} {v}" for k, v in m["channels_venv"].items())
    window = max(cfg["in_flight"])
    rel = os.path.relpath
    pinning = (f"**Pinning**: the benchmark process (every sender, and memory:// whole) is pinned to core "
               f"{SENDER_CORE} and\n  each worker process to core {WORKER_CORE} with `taskset -c`; redis-server is "
               "not pinned. memory:// runs on one core because\n  Python runs one thread at a time anyway: a "
               "second core only adds cross-core wake-ups."
               if m["pinned"] else "Processes are not pinned (no taskset, or a single core).")
    return f"""## Worker

What one worker process sustains, request/reply, from a sender that behaves like a bridge to an echo consumer and
back, and what the consumer framework costs per message; side by side with what a user would pick instead: Django
Channels {m['channels_venv']['channels']} (its `SyncConsumer` run by its worker, `channels.worker.Worker` as
`manage.py runworker` runs it) on channels_redis {m['channels_venv']['channels_redis']}.

Reproduce with `.venv/bin/python bench/worker.py` (about {results['seconds'] / 60:.0f} min; `--quick` is a smoke run
that writes nothing). It starts its own redis-server on a free port (`--save "" --appendonly no`) and reuses
bench/layer.py's `.bench-venvs/channels_redis` (same redis-py and hiredis as `.venv`), adding Channels and Django
at pinned versions. Raw figures: [`bench/results/worker.json`]({rel(RESULTS, DOC.parent)}).

**Machine**: {m['nproc']} cores, {m['cpu']}; Python {m['python']}; redis-server {m['redis_server']};
crossroads at {m['commit']} with {mine}; Channels venv: {theirs}.

### Method

- **The consumer**: `message.reply_channel.send({{"text": message.text}})`, routed with
  `route("bench.request", echo)`; for Channels, a `SyncConsumer` whose `bench_request` handler does
  `async_to_sync(self.channel_layer.send)(message["reply_channel"], {{"type": "bench.reply", "text": ...}})`.
- **The sender** keeps *N* requests in flight ({' and '.join(map(str, cfg['in_flight']))}): *N* connections,
  each sending `{{"type": "bench.request", "text": <100 chars>, "reply_channel": ..., "protocol", "sender",
  "room"}}` to `bench.request` and waiting for its reply before sending again. crossroads' sender is built like a
  bridge: the layer's async face, one receive loop (`receive_many(["bench.bridge!"], N)`) on its process queue
  handing each reply to its connection by the reply channel's local part (`bench.bridge!0` …). Channels' sender
  does what Daphne does: a `new_channel()` per connection and `await layer.receive(that channel)`.
- **memory://**: crossroads' `Worker(routes, layer, threads=T)` threads (blocking face) and the sender (asyncio)
  in one process on one `layer.from_url("memory://")`. Channels: its `InMemoryChannelLayer`, with its worker and
  the sender on one event loop in one process (its in-memory layer cannot be shared between processes).
- **redis://**: the worker in a process of its own (crossroads: `Worker` with T threads; Channels: `runworker
  bench.request`, which runs every message of a channel through one consumer instance, one at a time), the sender
  in another. Both layers keep their defaults (capacity 100, expiry 60 s), except that channels_redis gets
  `socket_timeout: None`, the documented workaround for redis-py 8, whose new 5 s default otherwise kills every
  consumer idle for 5 s ([django/channels_redis#422](https://github.com/django/channels_redis/issues/422)).
- **Figures**: after {cfg['warmup']:g} s of warm-up from the first reply, {cfg['windows']} windows of
  {cfg['seconds']:g} s; round trips/s is the median window (the range shows the spread). Latency is from just
  before the send to the reply's arrival at the sender, over every round trip of the measured windows.
- **CPU per round trip**: user + system CPU time over the measured windows ÷ their round trips, per process
  (from `/proc/PID/stat`; for crossroads on memory://, the sender is the main thread and the worker the rest of
  the process). It shows where the time goes, and what a deployment pays per message whatever the core count.
- {pinning}
- **Framework overhead**, the issue's "consumer overhead per message": `Dispatcher.handle(channel, content)` on a
  memory:// layer (route, build the `Message` and its `Channel`s, open the send buffer, fire the signals, run
  `echo`, copy the reply into the buffer, flush it with `send_many`) **minus** the same reply sent by hand,
  `layer.sync.send(content["reply_channel"], {{"text": content.get("text")}})`, which is what `echo` would do
  with no framework. Both put the same message on the same queue, so the difference is the framework alone. Each
  message is a fresh dict (as a worker's come fresh from the layer), {cfg['overhead_batches']:,} batches of
  {cfg['overhead_per_batch']} messages, the ways interleaved batch by batch; the overhead is the median of the
  per-batch differences. Receiving is not included: it is the layer's cost, measured in "Channel layer" above.
  This machine's speed was seen to vary by up to ~1.7× from one second to the next (a virtual machine), so the
  fastest batch is shown too.

### Round trips

{roundtrip_table(results)}

× Channels: crossroads' round trips/s ÷ Channels' on the same layer with as many requests in flight.

![round trips per second]({rel(CHART, DOC.parent)})

{reading(results)}

### Consumer overhead per message

{overhead_table(results)}

### Metrics on and off

{metrics_section(results)}

### Targets

{targets_table(results)}

The memory:// target is read at {window} in flight, where it measures what the worker sustains; with 1 in flight
each round trip waits for two thread wake-ups, and the figure is 1 ÷ latency.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run that writes no file")
    args = parser.parse_args(argv)
    results = timed_run(run_all, Config.make(args.quick))
    if results is None:
        return 1
    print()
    print(roundtrip_table(results))
    print()
    print(overhead_table(results))
    print()
    print(metrics_table(results))
    print()
    print(targets_table(results))
    print(f"\ntook {results['seconds']} s")
    if not args.quick:
        save_run("worker", results, doc=DOC, chart_path=CHART, chart=chart, document=document, results_path=RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
