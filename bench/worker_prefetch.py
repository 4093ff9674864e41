"""Prefetch benchmark: what ``[worker] prefetch = 1`` costs against the default (64), request/reply through
crossroads' worker, the two settings measured side by side in one run.

Owns this file and what it writes: the "Prefetch" section of ``docs/benchmarks.md`` and the raw figures in
``bench/results/worker_prefetch.json``. The load, the echo consumer and the worker process are
``bench/worker.py``'s (``_worker_crossroads.py``, ``_worker_load.py``), so the figures compare with its.

Method: rounds; in each round every case runs once with each setting, the order of the two settings
alternating from round to round, so that whatever else the (shared) machine does at a moment falls on
both. A case's figure is the median of its rounds. Cases: memory:// in one process (4 worker threads, 64
requests in flight) and redis:// with the worker in a process of its own (4 threads; 1 and 64 in flight).

Usage: ``.venv/bin/python bench/worker_prefetch.py [--quick] [--rounds N] [--redraw]``; ``--quick`` writes
nothing, ``--redraw`` rewrites the doc section from the raw figures without measuring.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _worker_crossroads as ours  # noqa: E402  (after the sys.path fix, on purpose)
from _sections import write_section  # noqa: E402

from bench.layer import BenchError, BenchRedis, cpu_model, latency_summary, timed_run  # noqa: E402
from bench.worker import check_worker, crossroads_worker, pin_self  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "worker_prefetch.json"
DOC = ROOT / "docs" / "benchmarks.md"
SETTINGS = (64, 1)  # the default, then one at a time
THREADS = 4
CASES = (("memory", 64), ("redis", 1), ("redis", 64))  # (layer, requests in flight)


def measure_memory(window: int, prefetch: int, warmup: float, seconds: float) -> dict[str, Any]:
    raw = ours.run_in_process("memory://", THREADS, window, warmup, seconds, 1, prefetch)
    check_worker(f"memory:// prefetch {prefetch}", raw["worker"])
    return raw


def measure_redis(server: BenchRedis, window: int, prefetch: int, warmup: float, seconds: float) -> dict[str, Any]:
    with crossroads_worker(server, THREADS, str(prefetch)) as (worker, _):
        raw = ours.run_sender(server.url, window, warmup, seconds, 1, {"worker": worker.process.pid})
        worker.alive()
    return raw


def run_all(options: argparse.Namespace) -> dict[str, Any]:
    warmup, seconds = (0.3, 0.5) if options.quick else (1.0, 2.0)
    server = BenchRedis()
    try:
        pinned = pin_self()
        rows: dict[str, dict[str, Any]] = {}
        for round_ in range(options.rounds):
            order = SETTINGS if round_ % 2 == 0 else tuple(reversed(SETTINGS))
            for layer_name, window in CASES:
                for prefetch in order:
                    if layer_name == "memory":
                        raw = measure_memory(window, prefetch, warmup, seconds)
                    else:
                        raw = measure_redis(server, window, prefetch, warmup, seconds)
                    if not raw["latencies_ns"]:
                        raise BenchError(f"{layer_name}:// {window} in flight, prefetch {prefetch}: no round trip")
                    row = rows.setdefault(f"{layer_name}/{window}/{prefetch}", {
                        "layer": layer_name, "window": window, "prefetch": prefetch, "rates": [], "p50_ms": [],
                        "p99_ms": [], "worker_cpu_us": []})
                    row["rates"].append(raw["round_trips"][0] / raw["window_seconds"])
                    latency = latency_summary(raw["latencies_ns"])
                    row["p50_ms"].append(latency["p50_ms"])
                    row["p99_ms"].append(latency["p99_ms"])
                    cpu = raw.get("cpu_seconds", {})
                    worker_cpu = cpu.get("worker", cpu.get("process", 0.0) - cpu.get("sender", 0.0))
                    row["worker_cpu_us"].append(worker_cpu / max(raw["round_trips"][0], 1) * 1e6)
                    print(f"round {round_ + 1}: {layer_name + '://':<10} {window:>3} in flight  "
                          f"prefetch {prefetch:>2}  {row['rates'][-1]:>9,.0f} rt/s  p50 {latency['p50_ms']:.3f} ms",
                          flush=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return {"rounds": options.rounds, "warmup": warmup, "window_seconds": seconds, "threads": THREADS,
                "machine": {"cpu": cpu_model(), "pinned": pinned, "redis_server": server.version,
                            "commit": commit.stdout.strip()},
                "rows": list(rows.values())}
    finally:
        server.stop()


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(results: dict[str, Any]) -> str:
    rows = {(r["layer"], r["window"], r["prefetch"]): r for r in results["rows"]}
    lines = ["| layer | in flight | prefetch | round trips/s (median) | rounds, min–max | p50 ms | p99 ms "
             "| worker CPU µs per round trip | prefetch 1 ÷ 64, median of the rounds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for layer_name, window in CASES:
        for prefetch in SETTINGS:
            row = rows[(layer_name, window, prefetch)]
            ratio = ""
            if prefetch == 1:  # round by round: the two runs of a round shared the machine's moment
                paired = zip(row["rates"], rows[(layer_name, window, 64)]["rates"], strict=True)
                ratio = f"{median([one / default for one, default in paired]):.2f}×"
            lines.append(f"| {layer_name}:// | {window} | {prefetch}{' (default)' if prefetch == 64 else ''} "
                         f"| {median(row['rates']):,.0f} | {min(row['rates']):,.0f}–{max(row['rates']):,.0f} "
                         f"| {median(row['p50_ms']):.3f} | {median(row['p99_ms']):.3f} "
                         f"| {median(row['worker_cpu_us']):.0f} | {ratio} |")
    return "\n".join(lines)


def document(results: dict[str, Any]) -> str:
    machine = results["machine"]
    return f"""## Prefetch

`[worker] prefetch` is the most messages a worker thread takes per receive (docs/configuration.md). A
thread takes as many as it runs in 5 ms, so with quick consumers the default, 64, makes one round trip to
the layer per burst; but what a thread took has left the layer, and a worker killed with SIGKILL loses it:
up to `prefetch` × threads messages (docs/running.md, "When a worker dies"). `prefetch = 1` loses only
the messages being run. This is what it costs, on the Worker benchmark's load (an echo consumer, a sender
that behaves like a bridge), {results['threads']} worker threads.

Reproduce with `.venv/bin/python bench/worker_prefetch.py` (about 3 min). Raw figures:
[`bench/results/worker_prefetch.json`](../bench/results/worker_prefetch.json).

**Method.** {results['rounds']} rounds; in each, every case runs once with each setting, the order of
the two settings alternating between rounds; {results['warmup']:g} s of warm-up, then a
{results['window_seconds']:g} s window. The figures are the medians of the rounds; the last column is the
median of each round's ratio, the two runs of a round having shared the machine's moment. The machine
({machine['cpu']}, 2 cores; sender {'pinned to core 0, worker to core 1' if machine['pinned'] else
'not pinned'}; redis-server {machine['redis_server']}) was shared with other engineers' test runs while
this ran ({results['seconds']:g} s in all): interleaving puts their load on both settings alike, and the
min–max column shows how much it moved. Commit {machine['commit']}.

{table(results)}

With one request in flight a receive finds one message whatever the setting, so prefetch changes nothing
that the rounds' spread lets one see. With 64 in flight, taking one message per receive costs a round trip
to the layer per message instead of one per burst: on Redis that is the worker CPU column's difference and
most of the throughput lost; in memory:// a receive is cheap and the loss is smaller. Choose
`prefetch = 1` for consumers whose messages must not be lost with a killed worker beyond the ones being
run (an acknowledged MQTT QoS 1 message, a mail that got its 250), and for slow consumers, which are taken
one at a time anyway; keep the default for quick, high-rate traffic where a crash losing a burst is
acceptable.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run that writes no file")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 7; 2 with --quick)")
    parser.add_argument("--redraw", action="store_true", help=f"rewrite the doc section from {RESULTS.name}")
    options = parser.parse_args(argv)
    options.rounds = options.rounds or (2 if options.quick else 7)
    if options.redraw:
        write_section(DOC, "prefetch", document(json.loads(RESULTS.read_text())))
        return 0
    started = time.monotonic()
    results = timed_run(run_all, options)
    if results is None:
        return 1
    print()
    print(table(results))
    print(f"\ntook {time.monotonic() - started:.0f} s")
    if not options.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        write_section(DOC, "prefetch", document(results))
        print(f"wrote {RESULTS.relative_to(ROOT)} and the prefetch section of {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
