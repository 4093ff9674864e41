"""Failover benchmark: how long the layer is out when a Redis primary behind Sentinel dies, and what is lost;
and how long the chat takes to recover from a 5 s network partition of its worker host.

Owns the "Recovery after a Redis failover" section of ``docs/benchmarks.md`` and ``bench/results/failover.json``
(issue 16 asks for the time to recover after a Sentinel failover and after the 5 s partition, in seconds, beside
the metrics figures).

Each round starts the tests' Sentinel group (tests/servers.py: a primary, a replica, three sentinels, Debian's
redis-server, free ports) and two threads of this process on one ``redis+sentinel://`` layer URL, each with a
layer of its own: a sender putting a numbered message on a channel every ``interval`` seconds (a refused send,
``LayerUnavailable`` or ``ChannelFull``, is counted and the next one tried at the next tick), and a receiver.
After a steady second the primary is killed (SIGKILL); the round ends a second after the first message sent after
the kill has been received. Read off one clock (``time.monotonic``):

- failover: from the kill until the first sentinel names the replica as the primary (polled every 20 ms): Redis
  Sentinel's own time, set by its ``down-after-milliseconds`` and the election;
- resumed: from the kill until the first send is accepted again, and until the first message sent after the kill
  is received: what a bridge and a worker see;
- lost: sends the layer accepted that never arrived (replication is asynchronous: those the primary took and had
  not passed to its replica when it died), and any received twice.

The partition: run as root, ``tests/test_several_hosts.py`` (three network namespaces, the worker host's link down
for 5 s) ``partitions`` times, each printing the time from the link coming back to the first line delivered end to
end; without root it is left out, and the section says so.

Usage: ``.venv/bin/python bench/failover.py [--quick | --report]``.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench.layer imports as part of the bench package
sys.path.append(str(ROOT / "tests"))  # tests/servers.py: the Sentinel group the tests start

from _sections import bench_main, print_blocks, pyplot, targets_markdown  # noqa: E402
from servers import SentinelGroup, wait_until  # noqa: E402

from bench.layer import BenchError, cpu_model, timed_run  # noqa: E402
from crossroads import layer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "failover.json"
DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "img" / "failover.png"
CHANNEL = "bench.failover"


@dataclass(frozen=True)
class Config:
    rounds: int
    interval: float  # seconds between the sender's messages
    down_after: int  # the sentinels' down-after-milliseconds
    steady: float  # seconds of traffic before the kill, and after the recovery
    partitions: int  # runs of tests/test_several_hosts.py (root only)

    @classmethod
    def make(cls, quick: bool) -> Config:
        return cls(rounds=1 if quick else 5, interval=0.005, down_after=2000, steady=0.5 if quick else 1.0,
                   partitions=0 if quick else 3)


PARTITION_LINE = re.compile(r"several hosts: the first line delivered end to end ([\d.]+) s after the worker host's "
                            r"link came back \((.*)\)")


def partition_runs(count: int) -> dict[str, Any]:
    """``count`` runs of the several-host test: the recovery time each printed, and how the latency was made."""
    if os.geteuid() != 0:
        return {"skipped": "not root: tests/test_several_hosts.py needs root (network namespaces)", "seconds": []}
    found: dict[str, Any] = {"seconds": [], "how": ""}
    for index in range(count):
        done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_several_hosts.py", "-q", "-s",
                               "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        line = PARTITION_LINE.search(done.stdout)
        if done.returncode or line is None:
            raise BenchError(f"tests/test_several_hosts.py failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
        found["seconds"].append(float(line[1]))
        found["how"] = line[2]
        print(f"partition {index + 1}: the first line end to end {line[1]} s after the link came back", flush=True)
    return found


class Sender(threading.Thread):
    def __init__(self, url: str, interval: float) -> None:
        super().__init__(name="sender", daemon=True)
        self.sync = layer.from_url(url, prefix="failover").sync
        self.interval = interval
        self.accepted: dict[int, float] = {}  # n -> when the layer accepted it
        self.refused: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stopping.wait(self.interval):
            sent = time.monotonic()
            try:
                self.sync.send(CHANNEL, {"n": n})
            except (layer.LayerUnavailable, layer.ChannelFull):
                self.refused.append(sent)
                continue
            self.accepted[n] = sent
            n += 1


class Receiver(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(name="receiver", daemon=True)
        self.sync = layer.from_url(url, prefix="failover").sync
        self.got: list[tuple[int, float]] = []  # (n, when received)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                for _, message in self.sync.receive_many([CHANNEL], 100, timeout=0.5):
                    self.got.append((message["n"], time.monotonic()))
            except layer.LayerUnavailable:
                time.sleep(0.01)  # the layer waits outages out itself; this only keeps a raise from spinning


def one_round(config: Config) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as workdir, \
            SentinelGroup(Path(workdir), down_after=config.down_after) as sentinels:
        sender, receiver = Sender(sentinels.url, config.interval), Receiver(sentinels.url)
        receiver.start()
        sender.start()
        try:
            time.sleep(config.steady)  # the steady traffic before the kill is the measurement itself, not a wait
            replica = sentinels.replica.port
            killed = time.monotonic()
            sentinels.primary.stop()
            promoted = None
            while promoted is None and time.monotonic() < killed + 60:
                if sentinels.primary_port() == replica:
                    promoted = time.monotonic()
                else:
                    time.sleep(0.02)
            if promoted is None:
                raise BenchError("the sentinels did not promote the replica within 60 s")

            def first_after_kill() -> float | None:
                return next((at for n, at in list(receiver.got) if sender.accepted.get(n, 0) > killed), None)

            wait_until(lambda: first_after_kill() is not None, "a message sent after the kill to arrive", timeout=60)
            time.sleep(config.steady)
        finally:
            sender.stopping.set()
            sender.join(30)
            deadline = time.monotonic() + 10  # what is in flight arrives before the receiver stops
            while time.monotonic() < deadline and len(receiver.got) < len(sender.accepted):
                time.sleep(0.05)
            receiver.stopping.set()
            receiver.join(30)
            sender.sync.close()
            receiver.sync.close()
        version = sentinels.replica.version
    received = [n for n, _ in receiver.got]
    resumed_send = min(at for at in sender.accepted.values() if at > killed)
    return {"failover_s": promoted - killed, "send_resumed_s": resumed_send - killed,
            "delivery_resumed_s": first_after_kill() - killed, "accepted": len(sender.accepted),
            "refused": len(sender.refused), "lost": len(set(sender.accepted) - set(received)),
            "twice": len(received) - len(set(received)), "redis_server": version}


def run_all(config: Config) -> dict[str, Any]:
    rounds = []
    for index in range(config.rounds):
        got = one_round(config)
        rounds.append(got)
        print(f"round {index + 1}: failover {got['failover_s']:.2f} s, sends resumed {got['send_resumed_s']:.2f} s, "
              f"deliveries resumed {got['delivery_resumed_s']:.2f} s after the kill; {got['accepted']:,} accepted, "
              f"{got['refused']:,} refused, {got['lost']} lost, {got['twice']} twice", flush=True)
    return {"config": asdict(config), "rounds": rounds, "partition": partition_runs(config.partitions),
            "machine": {"cpu": cpu_model(), "redis_server": rounds[0]["redis_server"], "commit": commit()}}


def commit() -> str:
    import subprocess

    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "no commit yet"


def median(results: dict[str, Any], key: str) -> float:
    return statistics.median(row[key] for row in results["rounds"])


def table(results: dict[str, Any]) -> str:
    lines = ["| round | failover (sentinels) s | sends accepted again s | deliveries again s | accepted | refused "
             "| lost | twice |", "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for index, row in enumerate(results["rounds"], 1):
        lines.append(f"| {index} | {row['failover_s']:.2f} | {row['send_resumed_s']:.2f} | "
                     f"{row['delivery_resumed_s']:.2f} | {row['accepted']:,} | {row['refused']:,} | {row['lost']} "
                     f"| {row['twice']} |")
    lines.append(f"| median | {median(results, 'failover_s'):.2f} | {median(results, 'send_resumed_s'):.2f} | "
                 f"{median(results, 'delivery_resumed_s'):.2f} | | | | |")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> str:
    # The promotion is polled every 20 ms, the deliveries seen as they come: a catch-up under that is "none".
    behind = max(0.0, statistics.median(row["delivery_resumed_s"] - row["failover_s"] for row in results["rounds"]))
    twice = sum(row["twice"] for row in results["rounds"])
    return targets_markdown([
        ("time to recover after a Sentinel failover, recorded (issue 16)",
         f"{median(results, 'delivery_resumed_s'):.2f} s from the kill (median), of which the sentinels' failover "
         f"{median(results, 'failover_s'):.2f} s and crossroads' own catching up "
         + (f"{behind:.2f} s" if behind >= 0.02 else "under the 20 ms the promotion is polled at"), True),
        ("no message received twice", f"{twice} in {len(results['rounds'])} rounds", twice == 0),
        *partition_target(results),
    ])


def partition_target(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    part = results.get("partition") or {}
    if not part.get("seconds"):
        return []
    runs = ", ".join(f"{value:.2f}" for value in part["seconds"])
    return [("time to recover after the 5 s partition of the worker host, recorded (issue 16)",
             f"{statistics.median(part['seconds']):.2f} s from the link coming back to the first line end to end "
             f"(median of {len(part['seconds'])} runs: {runs})", True)]


def report(results: dict[str, Any]) -> None:
    print_blocks(table(results), targets(results))


def chart(results: dict[str, Any], path: Path) -> None:
    plt, _ = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    rounds = range(1, len(results["rounds"]) + 1)
    for key, label in (("failover_s", "sentinels promote the replica"), ("send_resumed_s", "sends accepted again"),
                       ("delivery_resumed_s", "deliveries again")):
        ax.plot(rounds, [row[key] for row in results["rounds"]], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("seconds after the primary was killed")
    ax.set_xticks(list(rounds))
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=9)
    ax.set_title(f"Redis primary killed, Sentinel down-after {results['config']['down_after']} ms (lower is better)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def document(results: dict[str, Any]) -> str:
    cfg, m = results["config"], results["machine"]
    lost = sum(row["lost"] for row in results["rounds"])
    accepted = sum(row["accepted"] for row in results["rounds"])
    rel = Path("img") / CHART.name
    return f"""## Recovery after a Redis failover

How long the layer is out when the Redis primary behind Sentinel dies, and what is lost (issue 16). Reproduce with
`.venv/bin/python bench/failover.py` (took {results['seconds']:.0f} s; `--quick` writes nothing, `--report` redraws
from [`bench/results/failover.json`](../bench/results/failover.json)). crossroads at {m['commit']}; redis-server
{m['redis_server']}; {m['cpu']}.

### Method

{cfg['rounds']} rounds; each starts the tests' Sentinel group (tests/servers.py: a primary, a replica, three
sentinels with `down-after-milliseconds {cfg['down_after']}`, quorum 2, Debian's redis-server on free ports) and
two threads, each with a layer of its own on the same `redis+sentinel://` URL: a sender putting a numbered message
on one channel every {cfg['interval'] * 1000:g} ms (a refused send is counted, the next tried at the next tick),
and a receiver. After {cfg['steady']:g} s of traffic the primary is killed (SIGKILL); the round ends
{cfg['steady']:g} s after the first message sent after the kill has arrived. Times are from the kill, on one clock:
when the first sentinel names the replica as primary (polled every 20 ms), when the layer accepts a send again,
and when the first message sent after the kill is received. *Lost*: sends the layer accepted that never arrived.

### Rounds

{table(results)}

![failover times]({rel})

### Targets

{targets(results)}

### Reading

- Most of the outage is Sentinel's: a primary is only declared down after `down-after-milliseconds` unanswered
  ({cfg['down_after']} ms here; Sentinel's default is 30,000 ms, so expect ~30 s more with it), then the sentinels
  elect a leader and promote the replica. What crossroads adds is the time from the promotion to its next accepted
  send: the layer asks the sentinels for the primary again after a connection fails, with its usual backoff.
- Lost: {lost} of {accepted:,} accepted sends in all rounds. Redis replicates asynchronously: a send the primary
  acknowledged and had not yet passed to its replica when it was killed is gone (docs/spec/layer.md, failover). With
  a message every {cfg['interval'] * 1000:g} ms and a replica on loopback that window is usually empty; over a
  slower link, or under load, expect up to the replication lag's worth. Redis' `WAIT` bounds it (the tests use it).
- {partition_reading(results)}
- Refused sends are the layer saying `LayerUnavailable` during the switch: a bridge turns that into its protocol's
  refusal (an MQTT PUBACK withheld, a 503, an SMTP 451), so the peer sends again and nothing it was told was
  accepted is lost to the outage itself.
"""


def partition_reading(results: dict[str, Any]) -> str:
    part = results.get("partition") or {}
    if not part.get("seconds"):
        return ("The 5 s partition (tests/test_several_hosts.py) was not run: "
                f"{part.get('skipped', 'no runs were asked for')}.")
    return (f"The 5 s partition: `tests/test_several_hosts.py` run {len(part['seconds'])} times (as root; "
            f"{part['how']}): from the worker host's link coming back to the first MQTT line delivered end to end, "
            f"median {statistics.median(part['seconds']):.2f} s. The worker's blocking pop waits out a 5 s cut on its "
            "TCP connection (its read timeout is longer) and does not reconnect: the time is most likely TCP's "
            "retransmission backoff on that connection once the link is up; docs/running.md, Several machines.")


def main(argv: list[str] | None = None) -> int:
    return bench_main("failover", argv, description=__doc__.split("\n\n")[0],
                      run=lambda config: timed_run(run_all, config), config=Config.make, report=report, doc=DOC,
                      chart_path=CHART, chart=chart, document=document, results_path=RESULTS)


if __name__ == "__main__":
    sys.exit(main())
