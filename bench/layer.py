"""Channel-layer benchmark: crossroads' Redis layer against channels_redis 4.x and plain redis-py.

Owns this file, ``bench/_layer_worker.py`` (the per-process client code), and what they write:
its own section "Channel layer" of ``docs/benchmarks.md`` (through ``bench/_sections.py``, which leaves the
other sections alone), ``docs/img/layer-ratios.png`` and the raw figures in ``bench/results/layer.json``
(``layer-quick.json`` for ``--quick``).

One run starts its own ``redis-server`` on a free port, installs channels_redis into its own
virtualenv (``.bench-venvs/channels_redis``, with the same redis-py and hiredis as ``.venv`` so
only the layer differs), and runs every case as a consumer process and a producer process, pinned
to different cores (except where a case says unpinned), with FLUSHALL in between. Scenarios, 256-byte msgpack
messages:

- (a) one message per call, to a normal channel: saturated msg/s and latency at a fixed rate; and the same
  unpinned (the scheduler places producer, consumer and redis-server on the two cores as it likes, as on a
  deployment that does not pin), where every process's CPU per message counts, not only the slowest one's;
- (b) the same through a process-local channel;
- (c) batched: send_many / receive_many (for the floor: one multi-value RPUSH per channel, pipelined, + BLMPOP COUNT);
- (d) group_send to 1,000 members: call time, and drops reported against drops that happened.

Usage: ``.venv/bin/python bench/layer.py [--quick] [--out docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from _sections import pyplot, targets_markdown, write_section  # bench/ is on sys.path: this file runs as a script

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "tests"))  # tests/servers.py: the server launchers the tests and benchmarks share

from servers import RedisServer, ServerError  # noqa: E402

WORKER = ROOT / "bench" / "_layer_worker.py"
CR_VENV = ROOT / ".bench-venvs" / "channels_redis"
CR_PYTHON = CR_VENV / "bin" / "python"
CR_VERSION = "4.3.0"  # the latest 4.x when this benchmark was written; pinned so runs compare
RESULTS_DIR = ROOT / "bench" / "results"

SYNC, ASYNC, CR, PLAIN = "crossroads-sync", "crossroads-async", "channels_redis", "redis-py"
LABELS = {SYNC: "crossroads (sync face)", ASYNC: "crossroads (async face)", CR: "channels_redis", PLAIN: "redis-py"}
BATCH = 100
GROUP_CAPACITY = 100  # both layers' default


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    channel: str | None  # None: a process-local channel the consumer makes
    batch: int
    contenders: tuple[str, ...]
    latency: bool
    pinned: bool = True  # producer on core 0, consumer on core 1; False: wherever the scheduler puts them


SCENARIOS = (
    Scenario("a", "(a) one at a time", "bench.a", 1, (SYNC, ASYNC, CR, PLAIN), True),
    Scenario("u", "(a) one at a time, unpinned", "bench.u", 1, (SYNC, ASYNC, PLAIN), False, pinned=False),
    Scenario("b", "(b) process-local channel", None, 1, (SYNC, ASYNC, CR), True),
    Scenario("c", "(c) batched, 100 per call", "bench.c", BATCH, (SYNC, ASYNC, PLAIN), False),
)


@dataclass(frozen=True)
class Config:
    count: int  # measured messages per throughput run, (a) and (b)
    batch_count: int  # measured messages per throughput run, (c)
    warmup: int  # messages sent and discarded first: connections, scripts, caches
    repeats: int  # throughput runs per case; the median is reported
    rate: int  # msg/s of the latency phase, the same for every contender
    latency_seconds: float
    members: int
    group_sends: int

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(count=3000, batch_count=50_000, warmup=200, repeats=1, rate=1000, latency_seconds=0.5,
                       members=1000, group_sends=150)
        return cls(count=15_000, batch_count=200_000, warmup=500, repeats=5, rate=1000, latency_seconds=3.0,
                   members=1000, group_sends=150)


class BenchError(RuntimeError):
    pass


# -- statistics shared by every contender --


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def rate_of(consumed: dict[str, Any]) -> float:
    """Messages per second over the consumer's first-to-last measured receive."""
    span = (consumed["last_ns"] - consumed["first_ns"]) / 1e9
    return consumed["received"] / span if span > 0 else float("nan")


def latency_summary(latencies_ns: list[int]) -> dict[str, float]:
    ms = [n / 1e6 for n in latencies_ns]
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms), "samples": len(ms)}


# -- processes --


class BenchRedis(RedisServer):
    """The tests' redis-server (tests/servers.py: a free port, no persistence), started in a directory of its
    own, with what the benchmarks ask of it besides."""

    def __init__(self) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="bench-redis-")))
        self.start()
        self.client = redis.Redis(port=self.port)

    def flush(self) -> None:
        self.client.flushall()

    def stored_messages(self, match: str) -> int:
        """Messages stored under keys matching ``match``: list length or sorted-set size, per layer."""
        keys = list(self.client.scan_iter(match=match, count=1000))
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
        types = pipe.execute()
        for key, kind in zip(keys, types, strict=True):
            if kind == b"list":
                pipe.llen(key)
            else:
                pipe.zcard(key)
        return sum(pipe.execute())

    def stop(self) -> None:
        self.client.close()
        super().stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def cpu_pin(core: int) -> list[str]:
    """``taskset -c core`` when there are two cores or more to keep producer and consumer apart."""
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(core)]
    return []


def python_for(contender: str) -> str:
    return str(CR_PYTHON) if contender == CR else sys.executable


class Worker:
    """One ``_layer_worker.py`` process; it prints JSON lines, the last one is its result."""

    def __init__(self, spec: dict[str, Any], core: int | None = None, python: str | None = None) -> None:
        pin = [] if core is None else cpu_pin(core)
        command = [*pin, python or python_for(spec["contender"]), str(WORKER), json.dumps(spec)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.spec = spec

    def line(self) -> dict[str, Any]:
        """The next JSON line (used for the consumer's "ready")."""
        text = self.process.stdout.readline()
        if not text:
            self.fail()
        return json.loads(text)

    def result(self, timeout: float = 120) -> dict[str, Any]:
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
            raise BenchError(f"{self.describe()} timed out; stderr:\n{err[-2000:]}") from None
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if self.process.returncode != 0 or not lines:
            raise BenchError(f"{self.describe()} exited {self.process.returncode}; stderr:\n{err[-2000:]}")
        return json.loads(lines[-1])

    def fail(self) -> None:
        self.process.kill()
        _, err = self.process.communicate()
        raise BenchError(f"{self.describe()} died; stderr:\n{err[-2000:]}")

    def describe(self) -> str:
        return f"{self.spec.get('contender', '')} {self.spec['role']} worker".strip()


def run_pair(server: BenchRedis, contender: str, scenario: Scenario, count: int, rate: int,
             config: Config) -> dict[str, Any]:
    """One consumer (core 1) and one producer (core 0), or both unpinned, on an empty Redis; the consumer's figures."""
    server.flush()
    consumer_core, producer_core = (1, 0) if scenario.pinned else (None, None)
    spec = {"contender": contender, "url": server.url, "capacity": count + config.warmup + 1,
            "warmup": config.warmup, "count": count, "batch": scenario.batch}
    consumer = Worker({**spec, "role": "consume", "channel": scenario.channel, "latency": bool(rate)},
                      core=consumer_core)
    channel = consumer.line()["channel"]
    producer = Worker({**spec, "role": "produce", "channel": channel, "rate": rate}, core=producer_core)
    producer.result()
    consumed = consumer.result()
    if consumed.get("stuck") or consumed["received"] != count:
        raise BenchError(f"{contender} {scenario.title}: consumer got {consumed['received']} of {count} messages")
    return consumed


def run_messaging(server: BenchRedis, scenario: Scenario, contender: str, config: Config) -> dict[str, Any]:
    count = config.batch_count if scenario.batch > 1 else config.count
    rates = [rate_of(run_pair(server, contender, scenario, count, 0, config)) for _ in range(config.repeats)]
    figures: dict[str, Any] = {"msg_per_s": statistics.median(rates), "runs_msg_per_s": rates, "count": count}
    if scenario.latency:
        paced = run_pair(server, contender, scenario, round(config.rate * config.latency_seconds), config.rate, config)
        figures.update(latency_summary(paced["latencies_ns"]), rate=config.rate)
    return figures


def run_group(server: BenchRedis, contender: str, config: Config) -> dict[str, Any]:
    """group_send to members with room (the first ``capacity`` sends), then to full members."""
    server.flush()
    spec = {"role": "group", "contender": contender, "url": server.url, "capacity": GROUP_CAPACITY,
            "members": config.members, "sends": config.group_sends}
    got = Worker(spec, core=0).result()
    room = min(GROUP_CAPACITY, config.group_sends)
    with_room_ms = [n / 1e6 for n in got["call_ns"][:room]]
    full_ms = [n / 1e6 for n in got["call_ns"][room:]]
    attempted = config.members * config.group_sends
    stored = server.stored_messages("*bench.member.*")
    reported = got["reported_dropped"]
    return {
        "ms_per_call": statistics.median(with_room_ms),
        "ms_per_call_when_full": statistics.median(full_ms) if full_ms else None,
        "deliveries_per_s": config.members / (statistics.median(with_room_ms) / 1e3),
        "attempted": attempted,
        "stored": stored,
        "actual_dropped": attempted - stored,
        "reported_dropped": reported,
        "silent_dropped": attempted - stored - (reported or 0),
        "group_add_seconds": got["group_add_seconds"],
    }


# -- set-up --


def installed_versions(python: str, packages: list[str]) -> dict[str, str | None]:
    return Worker({"role": "versions", "packages": packages}, python=python).result()


def ensure_channels_redis() -> None:
    """Make .bench-venvs/channels_redis with channels_redis pinned and .venv's redis-py and hiredis.

    Skipped when it already holds exactly those versions.
    """
    pins = {"channels_redis": CR_VERSION, "redis": importlib.metadata.version("redis")}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        pins["hiredis"] = importlib.metadata.version("hiredis")
    if CR_PYTHON.exists() and installed_versions(str(CR_PYTHON), list(pins)) == pins:
        return
    print(f"installing channels_redis {CR_VERSION} into {CR_VENV.relative_to(ROOT)} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(CR_VENV)], check=True)
    subprocess.run([str(CR_PYTHON), "-m", "pip", "install", "-q", *(f"{k}=={v}" for k, v in pins.items())],
                   check=True)


def machine_facts(redis_server: Any, measured: list[str], packages: tuple[str, ...], **own: Any) -> dict[str, Any]:
    """What a benchmark records of the machine and the code it measured: cores, CPU, Python, redis-server, whether
    pinning works, the crossroads venv's ``packages``, the load before the run (other engineers share the machine),
    and the commit, with a note when the ``measured`` paths had uncommitted changes; ``own`` adds the benchmark's."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", *measured], cwd=ROOT, capture_output=True, text=True)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "redis_server": redis_server.version,
        "pinned": bool(cpu_pin(0)),
        **own,
        "crossroads_venv": {name: importlib.metadata.version(name) for name in packages},
        "load_before": os.getloadavg(),
        "commit": (commit.stdout.strip() or "no commit yet")
        + (f" + uncommitted changes in {', '.join(measured)}" if dirty.stdout.strip() else ""),
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or "unknown"."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def machine(server: BenchRedis) -> dict[str, Any]:
    cpu = cpu_model()
    ours = {name: importlib.metadata.version(name) for name in ("redis", "hiredis", "msgpack")}
    theirs = installed_versions(str(CR_PYTHON), ["channels_redis", "channels", "redis", "hiredis", "msgpack"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "layer"], cwd=ROOT, capture_output=True, text=True)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "redis_server": server.version,
        "pinned": bool(cpu_pin(0)),
        "crossroads_venv": ours,
        "channels_redis_venv": theirs,
        "commit": (commit.stdout.strip() or "no commit yet") + (" + uncommitted layer/" if dirty.stdout else ""),
    }


def run_all(config: Config) -> dict[str, Any]:
    ensure_channels_redis()
    server = BenchRedis()
    try:
        results: dict[str, Any] = {"config": asdict(config), "machine": machine(server), "cases": {}, "group": {}}
        for scenario in SCENARIOS:
            for contender in scenario.contenders:
                print(f"{scenario.title:<28} {LABELS[contender]:<24}", end=" ", flush=True)
                figures = run_messaging(server, scenario, contender, config)
                results["cases"].setdefault(scenario.key, {})[contender] = figures
                print(f"{figures['msg_per_s']:>10,.0f} msg/s", flush=True)
        for contender in (SYNC, CR):
            print(f"{'(d) group_send':<28} {LABELS[contender]:<24}", end=" ", flush=True)
            results["group"][contender] = got = run_group(server, contender, config)
            print(f"{got['ms_per_call']:>10.2f} ms/call", flush=True)
        return results
    finally:
        server.stop()


# -- reporting --


def baseline(results: dict[str, Any], scenario: str, contender: str) -> tuple[float | None, str]:
    """The figure to compare against, falling back to (a) where a contender lacks the feature."""
    cases = results["cases"]
    if contender in cases[scenario]:
        return cases[scenario][contender]["msg_per_s"], ""
    if contender in cases["a"] and scenario != "u":  # unpinned figures compare with unpinned ones only
        return cases["a"][contender]["msg_per_s"], "a"
    return None, ""


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value and base else None


def messaging_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for scenario in SCENARIOS:
        cases = results["cases"][scenario.key]
        for contender, figures in cases.items():
            row = {"scenario": scenario, "contender": contender, **figures}
            for other in (CR, PLAIN):
                base, fallback = baseline(results, scenario.key, other)
                row[f"vs_{other}"] = None if contender == other else ratio(figures["msg_per_s"], base)
                row[f"vs_{other}_note"] = fallback
            rows.append(row)
    return rows


def fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def messaging_table(results: dict[str, Any]) -> str:
    lines = ["| scenario | contender | msg/s (median) | runs, min–max | p50 ms | p99 ms "
             "| × channels_redis | × redis-py |",
             "|---|---|--:|--:|--:|--:|--:|--:|"]
    for row in messaging_rows(results):
        cells = [f"{row['msg_per_s']:,.0f}", f"{min(row['runs_msg_per_s']):,.0f}–{max(row['runs_msg_per_s']):,.0f}",
                 fmt(row.get("p50_ms"), ".3f", "—"), fmt(row.get("p99_ms"), ".3f", "—")]
        for other in (CR, PLAIN):
            cell = fmt(row[f"vs_{other}"], ".2f", "—")
            cells.append(f"{cell} ¹" if row[f"vs_{other}_note"] and row[f"vs_{other}"] else cell)
        lines.append(f"| {row['scenario'].title} | {LABELS[row['contender']]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_table(results: dict[str, Any]) -> str:
    lines = ["| contender | ms per group_send (members with room) | ms per call (members full) | deliveries/s "
             "| dropped (actual) | dropped (reported) | silent drops |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for contender, got in results["group"].items():
        lines.append(f"| {LABELS[contender]} | {got['ms_per_call']:.2f} | {fmt(got['ms_per_call_when_full'], '.2f')} "
                     f"| {got['deliveries_per_s']:,.0f} | {got['actual_dropped']:,} "
                     f"| {fmt(got['reported_dropped'], ',', 'nothing reported')} | {got['silent_dropped']:,} |")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, what was measured, met) for the sync face, the one workers use, and (c)/(d)."""
    a, c, group = results["cases"]["a"], results["cases"]["c"], results["group"]
    ours, theirs, floor = a[SYNC], a[CR], a[PLAIN]
    unpinned = results["cases"]["u"]
    found = [
        ("(a) msg/s ≥ 4× channels_redis", f"{ours['msg_per_s'] / theirs['msg_per_s']:.2f}×",
         ours["msg_per_s"] >= 4 * theirs["msg_per_s"]),
        ("(a) msg/s ≥ 75% of plain redis-py", f"{ours['msg_per_s'] / floor['msg_per_s']:.0%}",
         ours["msg_per_s"] >= 0.75 * floor["msg_per_s"]),
        *((f"(a) unpinned, {LABELS[face].split('(')[1][:-1]}: msg/s ≥ 0.9× plain redis-py (issue 17)",
           f"{unpinned[face]['msg_per_s'] / unpinned[PLAIN]['msg_per_s']:.2f}×",
           unpinned[face]["msg_per_s"] >= 0.9 * unpinned[PLAIN]["msg_per_s"]) for face in (SYNC, ASYNC)),
        ("(a) p99 below channels_redis's p50", f"{ours['p99_ms']:.3f} ms vs {theirs['p50_ms']:.3f} ms",
         ours["p99_ms"] < theirs["p50_ms"]),
        ("(c) ≥ 100,000 msg/s", f"{c[SYNC]['msg_per_s']:,.0f} msg/s", c[SYNC]["msg_per_s"] >= 100_000),
        ("(d) group_send no slower than channels_redis",
         f"{group[SYNC]['ms_per_call']:.2f} ms vs {group[CR]['ms_per_call']:.2f} ms",
         group[SYNC]["ms_per_call"] <= group[CR]["ms_per_call"]),
        ("(d) no silent drop", f"{group[SYNC]['silent_dropped']:,} silent of {group[SYNC]['actual_dropped']:,} dropped",
         group[SYNC]["silent_dropped"] == 0),
    ]
    return found


def targets_table(results: dict[str, Any]) -> str:
    return targets_markdown(targets(results), "target (crossroads, sync face unless named)")


def chart(results: dict[str, Any], path: Path) -> None:
    """Bars of crossroads' throughput ratios against both contenders, on a log scale (1× marked)."""
    plt, ticker = pyplot()

    labels: list[str] = []
    series: dict[str, list[tuple[float | None, str]]] = {CR: [], PLAIN: []}  # (ratio, footnote mark)
    for row in messaging_rows(results):
        if row["contender"] in (SYNC, ASYNC):
            pinning = "" if row["scenario"].pinned else " unpinned"
            labels.append(f"{row['scenario'].title.split(')')[0]}){pinning}\n{row['contender'].split('-')[1]}")
            for other in series:
                series[other].append((row[f"vs_{other}"], "¹" if row[f"vs_{other}_note"] else ""))
    group = results["group"]
    labels.append("(d) group\nsync")
    series[CR].append((group[SYNC]["deliveries_per_s"] / group[CR]["deliveries_per_s"], ""))
    series[PLAIN].append((None, ""))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.38
    xs = range(len(labels))
    for offset, other, name in ((-width / 2, CR, "vs channels_redis 4.x"), (width / 2, PLAIN, "vs plain redis-py")):
        values = [value or float("nan") for value, _ in series[other]]
        bars = ax.bar([x + offset for x in xs], values, width, label=name)
        ax.bar_label(bars, labels=[f"{v:.2f}×{mark}" if v else "" for v, mark in series[other]], fontsize=8, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}×"))
    ax.set_xticks(list(xs), labels, fontsize=9)
    ax.set_ylim(top=ax.get_ylim()[1] * 2)  # room for the labels of the tallest bars
    ax.set_ylabel("crossroads throughput ÷ contender's (log)")
    ax.set_title("crossroads Redis layer: throughput ratios (higher is better)")
    ax.legend(fontsize=9, loc="upper left")
    fig.text(0.99, 0.01, "¹ against the contender's (a) figure: it lacks the feature", ha="right", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def document(results: dict[str, Any], chart_path: Path, out: Path, json_path: Path) -> str:
    m, cfg = results["machine"], results["config"]
    ours = ", ".join(f"{k} {v}" for k, v in m["crossroads_venv"].items())
    theirs = ", ".join(f"{k} {v}" for k, v in m["channels_redis_venv"].items())
    pinning = ("Producer pinned to core 0 and consumer to core 1 with `taskset -c` (except in *(a) unpinned*, where "
               "the scheduler places them); redis-server is not pinned and shares the two cores." if m["pinned"]
               else "Processes are not pinned (no taskset or a single core).")
    return f"""## Channel layer

crossroads' Redis layer (`layer.redis`) against [channels_redis](https://pypi.org/project/channels-redis/)
{m['channels_redis_venv']['channels_redis']} and against the floor, plain redis-py `RPUSH`/`BLPOP` of msgpack bytes
(when batched: one multi-value `RPUSH` per channel, pipelined, with `BLMPOP … COUNT 100`).
All three talk to the same private `redis-server`, emptied with `FLUSHALL` before every run.

Reproduce with `make bench`, or `.venv/bin/python bench/layer.py` (add `--quick` for a smoke run that writes no
doc). The script starts its own redis-server on a free port and installs channels_redis into
`.bench-venvs/channels_redis` with the same redis-py and hiredis as `.venv`, so only the layer differs.
Raw figures: [`{json_path.relative_to(ROOT)}`]({os.path.relpath(json_path, out.parent)}).

**Machine**: {m['nproc']} cores, {m['cpu']}; Python {m['python']}; redis-server {m['redis_server']};
crossroads at {m['commit']} with {ours}; channels_redis venv: {theirs}.

**Method**: 256-byte messages (`{{"text": "x…", "t": time.monotonic_ns()}}`, 256 bytes as msgpack), one producer
process and one consumer process. {pinning}
- *msg/s*: the producer sends {cfg['count']:,} messages ({cfg['batch_count']:,} batched) as fast as it can after
  {cfg['warmup']} warm-up messages; throughput is messages received ÷ the consumer's first-to-last receive time.
  Capacity is raised above the message count. Median of {cfg['repeats']} runs; the range shows how much runs vary
  on this machine.
- *latency*: a separate run at a fixed {cfg['rate']:,} msg/s for {cfg['latency_seconds']:g} s, identical for every
  contender, so that queueing does not dominate; latency is receive time − send time, on the system-wide monotonic
  clock.
- *(a) unpinned*: the same as (a) with nothing pinned (issue 17's black-box case): producer, consumer and
  redis-server share the two cores, so the figure follows the CPU every process spends per message, not only
  the slowest process's. Throughput only, no latency run.
- The sync face is driven from a coroutine like the others; with no suspension that adds well under 1 µs a call.
- (b): crossroads `new_channel("bench!")` + `receive(["bench!"])`; channels_redis `new_channel()` and receive on that
  name. redis-py has no process-local channels: its ratio uses its (a) figure (¹).
- (c): channels_redis has no batch API: its ratio uses its (a) figure (¹).
- (d): {cfg['members']:,} members (normal channels `bench.member.N`), capacity {GROUP_CAPACITY} (the default of both),
  nobody reading, {cfg['group_sends']} `group_send` calls: the first {GROUP_CAPACITY} find room, the rest find every
  member full. *Actual* drops are {cfg['members']:,} × {cfg['group_sends']} minus the messages found stored in Redis
  afterwards; *reported* drops are what `group_send` returned (crossroads: `GroupSendResult.dropped`; channels_redis
  returns `None` and only logs at INFO). Call time is the median over the calls that found room.

{messaging_table(results)}

{group_table(results)}

{targets_table(results)}

![crossroads throughput ratios]({os.path.relpath(chart_path, out.parent)})
"""


def print_report(results: dict[str, Any]) -> None:
    print()
    print(messaging_table(results))
    print()
    print(group_table(results))
    print()
    print(targets_table(results))


def timed_run(run: Any, config: Any) -> dict[str, Any] | None:
    """``run(config)`` with its duration in ``results["seconds"]``; None (and the reason printed) if it failed."""
    started = time.monotonic()
    try:
        results = run(config)
    except (BenchError, ServerError) as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return None
    results["seconds"] = round(time.monotonic() - started, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (writes no doc unless --out is given)")
    parser.add_argument("--out", type=Path,
                        help="the markdown to write (default: docs/benchmarks.md, none with --quick)")
    args = parser.parse_args(argv)
    out = args.out if args.out or args.quick else ROOT / "docs" / "benchmarks.md"
    results = timed_run(run_all, Config.make(args.quick))
    if results is None:
        return 1
    print_report(results)
    json_path = RESULTS_DIR / ("layer-quick.json" if args.quick else "layer.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nraw results: {json_path.relative_to(ROOT)}; took {results['seconds']} s")
    if out:
        out = out.resolve()
        chart_path = out.parent / "img" / "layer-ratios.png"
        chart(results, chart_path)
        write_section(out, "layer", document(results, chart_path, out, json_path), heading="Channel layer")
        print(f"wrote {os.path.relpath(out)} and {os.path.relpath(chart_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
