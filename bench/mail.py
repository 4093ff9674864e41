"""Email benchmark: mails/s the email bridge takes over SMTP into the layer, against a bare aiosmtpd server whose
handler does nothing, in one run.

Owns this file and its helpers, each run where it must run:

- ``bench/email_clients.py``: the SMTP load (stdlib smtplib), the competitors (the bare aiosmtpd server, the bare
  replier) and the recording smarthost, run with ``.bench-venvs/aiosmtpd`` (aiosmtpd and aiosmtplib alone, at
  ``.venv``'s versions);
- ``bench/email_consumers.py``: crossroads' consumers (count ``email.receive``; answer the reply scenario's mails),
  imported by the crossroads daemons;

and what they write: the "Email" section of ``docs/benchmarks.md``, ``docs/img/email.png`` and the raw figures in
``bench/results/email.json``.

It starts its own redis-server (tests/servers.py: a free port), and every SMTP server on a free port of its own.
Receivers, each pinned to one core, each sent the same mails by 4 smtplib clients pinned to the other:

- bare aiosmtpd: one process, aiosmtpd's ``SMTP`` on ``loop.create_server``, ``handle_DATA`` answering ``250 OK``;
- crossroads redis://: ``crossroads bridge mail`` (type email) -> redis:// layer -> ``crossroads worker`` with a
  counting consumer (two processes);
- crossroads memory://: ``crossroads run`` (bridge and worker threads in one process), the same consumer.

Scenarios:

- the flood, 256-byte and 20 KiB mails, rounds interleaved receiver by receiver, the median: mails/s answered 250,
  the 4xx answers (451: the layer is full; the client sends the mail again), and for crossroads that every
  accepted mail reached the consumer once;
- the reply latency (issue 12): sequential 256-byte mails from this process (on the load core), each answered by
  a consumer on its ``reply_channel``; the time from the client's end of DATA (its ``.`` sent) to the reply
  arriving at a recording smarthost (a bare aiosmtpd process pinned to the load core), p50/p99 per setup. Against
  the bare row: a hand-written aiosmtpd handler sending the reply itself with aiosmtplib. crossroads is
  configured with ``smarthost`` and its per-recipient reply limit lifted (``reply_rate``/``reply_burst``: every
  reply goes to the benchmark's one sender, and the defaults would hold back all but 5 a minute).

Usage: ``.venv/bin/python bench/mail.py [--quick | --report]``; ``--quick`` is a smoke run that writes nothing,
``--report`` rewrites the doc section and the plot from the last full run's JSON without measuring.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import queue
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
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
from servers import free_port  # noqa: E402

from bench.layer import BenchError, BenchRedis, cpu_pin, machine_facts, timed_run  # noqa: E402
from bench.web import warnings  # noqa: E402

CLIENTS = ROOT / "bench" / "email_clients.py"
SMTPD_VENV = ROOT / ".bench-venvs" / "aiosmtpd"
SMTPD_PYTHON = SMTPD_VENV / "bin" / "python"
RESULTS = ROOT / "bench" / "results" / "email.json"
DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "img" / "email.png"

LOAD_CORE, SERVER_CORE = 0, 1
DOMAIN = "bench.example"
RECIPIENT = f"inbox@{DOMAIN}"
SIZES = (256, 20 * 1024)  # bytes per mail, headers included
CLIENT_COUNT = 4  # concurrent SMTP clients, one connection each
RETRY = 0.01  # seconds a client waits before sending a mail answered 4xx again
IDLE = 5.0  # seconds without a new arrival at the consumer, once the clients are done, after which the rest are lost
FLOOD_TIMEOUT = 300.0  # a safety net: the idle rule above decides what is lost
SETUPS = ("bare", "redis", "memory")
CALM_BARE = {256: 1807, 20 * 1024: 481}  # the bare server's mails/s in the run at 398e5bc (load average 2.3)
LABELS = {"bare": "bare aiosmtpd, handler answers 250, 1 process",
          "redis": "crossroads redis://, bridge + worker, 2 processes",
          "memory": "crossroads memory://, crossroads run, 1 process"}
LATENCY_SIZE = 256  # bytes per mail of the reply-latency scenario
REPLY_TIMEOUT = 30.0  # seconds a reply may take to reach the smarthost before it counts as missing
LATENCY_LABELS = {"bare": "bare aiosmtpd handler, replies itself with aiosmtplib.send, 1 process",
                  "redis": LABELS["redis"], "memory": LABELS["memory"]}


@dataclass(frozen=True)
class Config:
    counts: dict[str, int]  # mails per flood, per size (str: JSON keys), shared among the clients
    rounds: int  # floods per receiver and size, interleaved receiver by receiver; the median is reported
    warmup: int  # mails sent to each receiver first and not measured
    replies: int  # reply-latency mails measured per setup, over ``rounds`` interleaved rounds
    reply_warmup: int  # reply-latency mails sent to each setup first and not measured

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(counts={"256": 400, "20480": 200}, rounds=1, warmup=40, replies=60, reply_warmup=10)
        return cls(counts={"256": 2500, "20480": 1200}, rounds=3, warmup=200, replies=600, reply_warmup=50)


def size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


# -- the receivers --


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Receiver(ProcessGroup):
    """One setup's SMTP server on a free port, pinned to SERVER_CORE, its processes' CPU readable."""

    def __init__(self, setup: str, workdir: Path) -> None:
        super().__init__(LABELS[setup], workdir / f"{setup}.log", SERVER_CORE, ROOT)
        self.setup = setup
        self.port = free_port()

    def cpu(self) -> dict[str, float]:
        return {name: process_cpu(p.pid) for name, p in self.processes.items()}

    def wait_ready(self) -> None:
        """Until one mail is answered 250 (and, for crossroads, reached the consumer)."""
        deadline = time.monotonic() + 60
        while True:
            self.alive()
            if not port_open(self.port):
                time.sleep(0.05)
                continue
            try:
                got = send_mails(self, "ready", 256, 1, clients=1, timeout=5)
                if got["accepted"] == 1 and self.arrived("ready", 1, idle=5)["distinct"] == 1:
                    return
            except BenchError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise BenchError(f"{self.label}: no mail taken in 60 s; log:\n{self.tail()}")
            time.sleep(0.2)

    def arrived(self, run: str, expect: int, idle: float) -> dict[str, Any]:
        """What the consumer counted for ``run``: the bare server has none, it only answers."""
        return {"received": expect, "distinct": expect, "first_ns": 0, "last_ns": 0}


class BareServer(Receiver):
    def __init__(self, workdir: Path) -> None:
        super().__init__("bare", workdir)
        spec = {"mode": "serve", "host": "127.0.0.1", "port": self.port}
        self.start("server", [str(SMTPD_PYTHON), str(CLIENTS), json.dumps(spec)], dict(os.environ))
        self.ready()


class BareReplier(Receiver):
    """The reply-latency competitor: aiosmtpd + a handler sending each reply itself with aiosmtplib."""

    def __init__(self, workdir: Path, smarthost_port: int) -> None:
        super().__init__("bare", workdir)
        self.label = LATENCY_LABELS["bare"]
        spec = {"mode": "replier", "host": "127.0.0.1", "port": self.port, "smarthost_host": "127.0.0.1",
                "smarthost_port": smarthost_port}
        self.start("server", [str(SMTPD_PYTHON), str(CLIENTS), json.dumps(spec)], dict(os.environ))
        self.ready()


class RecordingSmarthost:
    """The smarthost replies go to: a bare aiosmtpd process on LOAD_CORE printing each mail's arrival time."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.log = open(workdir / "smarthost.log", "w+")  # noqa: SIM115  (closed in stop())
        spec = {"mode": "smarthost", "host": "127.0.0.1", "port": self.port}
        self.process = subprocess.Popen([*cpu_pin(LOAD_CORE), str(SMTPD_PYTHON), str(CLIENTS), json.dumps(spec)],
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.arrivals: queue.Queue[dict[str, Any]] = queue.Queue()
        try:
            json_line(self.process, "recording smarthost")  # {"ready": true}: listening
        except BenchError:
            self.log.seek(0)
            raise BenchError(f"recording smarthost: not started; log:\n{self.log.read()[-3000:]}") from None
        threading.Thread(target=self._read, name="smarthost-arrivals", daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith("{"):
                self.arrivals.put(json.loads(line))

    def wait(self, run: str, seq: int, timeout: float) -> dict[str, Any] | None:
        """The arrival of the reply to ``run seq`` (``ns``: its DATA in; ``ehlo_ns``: its session's EHLO), or None
        after ``timeout`` seconds. Replies to other mails (the readiness checks', one too late) are passed over."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                got = self.arrivals.get(timeout=left)
            except queue.Empty:
                break
            if got.get("run") == run and got.get("seq") == seq:
                return got
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class Crossroads(Receiver):
    """crossroads (redis: ``bridge mail`` + ``worker``; memory: ``run``), counting into its own state file, its
    replies sent through ``smarthost_port``."""

    def __init__(self, setup: str, redis_url: str, workdir: Path, smarthost_port: int) -> None:
        super().__init__(setup, workdir)
        self.state = workdir / f"state-{setup}.json"
        config = workdir / f"crossroads-{setup}.toml"
        config.write_text(crossroads_toml(setup, redis_url, self.port, smarthost_port))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_EMAIL_STATE": str(self.state)}
        self.start_crossroads(setup, config, {"bridge": "mail"}, env)
        self.ready()

    def counters(self, run: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.state.read_text()).get(run)
        except (OSError, ValueError):  # not written yet
            return None

    def arrived(self, run: str, expect: int, idle: float) -> dict[str, Any]:
        """The consumer's counters for ``run`` once ``expect`` distinct mails arrived, or nothing new arrived for
        ``idle`` seconds (the rest are lost), or FLOOD_TIMEOUT passed. Called when the clients are done."""
        deadline = time.monotonic() + FLOOD_TIMEOUT
        last, changed = -1, time.monotonic()
        while True:
            self.alive()
            got = self.counters(run)
            now = time.monotonic()
            received = got["received"] if got else 0
            if got and got["distinct"] >= expect:
                return got
            if received != last:
                last, changed = received, now
            elif now - changed > idle or now > deadline:
                return got or {"received": 0, "distinct": 0, "first_ns": 0, "last_ns": 0}
            time.sleep(0.02)


def crossroads_toml(setup: str, redis_url: str, port: int, smarthost_port: int) -> str:
    """Defaults everywhere (layer capacity 100, 4 worker threads, max_message_size 512 KiB), one domain; replies
    through the recording smarthost, the per-recipient reply limit lifted (the one sender gets every reply)."""
    url = "memory://" if setup == "memory" else redis_url
    return f"""[layer]
url = "{url}"

[routing]
app = "bench.email_consumers:routes"

[bridges.mail]
type = "email"
port = {port}
domains = ["{DOMAIN}"]
smarthost = "smtp://127.0.0.1:{smarthost_port}"
reply_rate = 1000000.0
reply_burst = 1000000
"""


# -- the load --


def client_process(spec: dict[str, Any]) -> subprocess.Popen:
    return subprocess.Popen([*cpu_pin(LOAD_CORE), str(SMTPD_PYTHON), str(CLIENTS), json.dumps(spec)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def json_line(process: subprocess.Popen, what: str) -> dict[str, Any]:
    line = process.stdout.readline()
    if not line.startswith("{"):
        process.kill()
        process.communicate()
        raise BenchError(f"{what} exited {process.returncode} without its line (its errors are above)")
    return json.loads(line)


def send_mails(receiver: Receiver, run: str, size: int, count: int, clients: int = CLIENT_COUNT,
               timeout: float = FLOOD_TIMEOUT) -> dict[str, Any]:
    """``count`` mails to ``receiver`` from ``clients`` smtplib processes on LOAD_CORE, started together once every
    one is connected; their answers summed, the time from the first client's start to the last one's end."""
    share = [count // clients + (i < count % clients) for i in range(clients)]
    processes = [client_process({"mode": "send", "host": "127.0.0.1", "port": receiver.port, "to": RECIPIENT,
                                 "run": run, "size": size, "first_seq": sum(share[:i]), "count": n, "retry": RETRY,
                                 "timeout": timeout}) for i, n in enumerate(share)]
    try:
        for process in processes:
            json_line(process, "SMTP client")  # {"ready": true}: connected, EHLO answered
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [json_line(process, "SMTP client") for process in processes]
        for process in processes:
            process.wait(10)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    answers: dict[str, int] = {}
    for got in results:
        for code, n in got["answers"].items():
            answers[code] = answers.get(code, 0) + n
    start, end = min(r["start_ns"] for r in results), max(r["end_ns"] for r in results)
    return {"accepted": sum(r["accepted"] for r in results), "answers": answers, "start_ns": start, "end_ns": end,
            "client_cpu_s": sum(r["cpu_s"] for r in results)}


# -- the scenarios --


def flood(setup: str, receivers: dict[str, Receiver], size: int, count: int, run: str) -> dict[str, Any]:
    """One flood of ``count`` mails of ``size`` bytes to ``setup``'s receiver; its figures."""
    receiver = receivers[setup]
    before = receiver.cpu()
    sent = send_mails(receiver, run, size, count)
    got = receiver.arrived(run, sent["accepted"], IDLE)
    cpu = {name: used - before[name] for name, used in receiver.cpu().items()}
    wall = (sent["end_ns"] - sent["start_ns"]) / 1e9
    accepted = sent["accepted"]
    done_ns = max(sent["end_ns"], got["last_ns"])  # crossroads: the consumer may finish after the last 250
    temporary = sum(n for code, n in sent["answers"].items() if code.startswith("4"))
    return {"count": count, "accepted": accepted, "answers": sent["answers"], "temporary": temporary,
            "mail_per_s": accepted / wall if wall > 0 else 0.0,
            # from the first MAIL FROM to the last mail at the consumer: what the whole chain did
            "end_to_end_mail_per_s": got["distinct"] / ((done_ns - sent["start_ns"]) / 1e9),
            "consumed": got["distinct"], "lost": max(accepted - got["distinct"], 0),
            "duplicates": got["received"] - got["distinct"], "extra": max(got["distinct"] - accepted, 0),
            "cpu_us_per_mail": {name: used / accepted * 1e6 for name, used in cpu.items()} if accepted else {},
            "client_cpu_us_per_mail": sent["client_cpu_s"] / accepted * 1e6 if accepted else 0.0,
            # how busy each core was: the load's (4 clients on one core) and the receiver's
            "load_core_busy": sent["client_cpu_s"] / wall if wall > 0 else 0.0,
            "server_core_busy": sum(cpu.values()) / ((done_ns - sent["start_ns"]) / 1e9)}


def reply_latency(receiver: Receiver, smarthost: RecordingSmarthost, run: str, count: int,
                  warmup: int) -> dict[str, Any]:
    """``warmup + count`` mails to ``receiver`` one after the other over one connection, each sent once the reply to
    the one before reached the smarthost; the latencies (ms) of the last ``count``: from the moment the client
    sends the mail's end (DATA's ``.``; 256 bytes go in one write) to the reply's arrival at the smarthost."""
    from email_clients import SENDER, mail

    bodies = [mail(run, seq, LATENCY_SIZE, RECIPIENT) + b".\r\n" for seq in range(warmup + count)]
    latencies: list[float] = []
    sessions: list[float] = []  # of each latency, the sender's SMTP session with the smarthost (EHLO to DATA in)
    answers: dict[str, int] = {}  # DATA's answers other than 250
    missing = 0
    kept = 0  # replies that came over a connection opened for an earlier one (the bridge's outbox keeps it idle)
    before = receiver.cpu()
    client = smtplib.SMTP("127.0.0.1", receiver.port, timeout=30)
    try:
        client.ehlo("load.client.example")
        for seq, body in enumerate(bodies):
            for command, ok in ((lambda: client.mail(SENDER), (250,)), (lambda: client.rcpt(RECIPIENT), (250, 251)),
                                (lambda: client.docmd("DATA"), (354,))):
                code, text = command()
                if code not in ok:
                    raise BenchError(f"{receiver.label}: answered {code} {text!r} in the reply scenario")
            start = time.monotonic_ns()
            client.send(body)
            code, _ = client.getreply()
            if code != 250:
                answers[str(code)] = answers.get(str(code), 0) + 1
                continue
            arrived = smarthost.wait(run, seq, REPLY_TIMEOUT)
            if arrived is None:
                missing += 1
            elif seq >= warmup:
                latencies.append(round((arrived["ns"] - start) / 1e6, 3))
                if arrived.get("ehlo_ns") and arrived["ehlo_ns"] >= start:
                    sessions.append(round((arrived["ns"] - arrived["ehlo_ns"]) / 1e6, 3))
                elif arrived.get("ehlo_ns"):  # its session began before this mail: a connection kept from before
                    kept += 1
    finally:
        client.quit()
    cpu = sum(used - before[name] for name, used in receiver.cpu().items())
    return {"latencies_ms": latencies, "sessions_ms": sessions, "kept": kept, "answers": answers, "missing": missing,
            "sent": len(bodies), "cpu_us_per_mail": cpu / len(bodies) * 1e6}


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0-100) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))] if ordered else 0.0


def latency_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [ms for got in rounds for ms in got["latencies_ms"]]
    sessions = [ms for got in rounds for ms in got["sessions_ms"]]
    answers: dict[str, int] = {}
    for got in rounds:
        for code, n in got["answers"].items():
            answers[code] = answers.get(code, 0) + n
    return {"count": len(latencies), "p50_ms": percentile(latencies, 50), "p90_ms": percentile(latencies, 90),
            "p99_ms": percentile(latencies, 99), "max_ms": max(latencies, default=0.0),
            "mean_ms": sum(latencies) / len(latencies) if latencies else 0.0,
            # of each latency, the sender's session with the smarthost (its EHLO to the reply's DATA in)
            "session_p50_ms": percentile(sessions, 50), "session_p99_ms": percentile(sessions, 99),
            "missing": sum(got["missing"] for got in rounds), "answers": answers,
            "kept": sum(got.get("kept", 0) for got in rounds),
            "sent": sum(got["sent"] for got in rounds),
            "cpu_us_per_mail": sorted(got["cpu_us_per_mail"] for got in rounds)[len(rounds) // 2],
            "latencies_ms": latencies}


def show_latency(setup: str, got: dict[str, Any]) -> None:
    print(f"  reply latency p50 {percentile(got['latencies_ms'], 50):.2f} ms, p99 "
          f"{percentile(got['latencies_ms'], 99):.2f} ms over {len(got['latencies_ms'])}, {got['missing']} missing, "
          f"{sum(got['answers'].values())} not 250 (CPU {got['cpu_us_per_mail']:.0f} µs/mail)  {LATENCY_LABELS[setup]}",
          flush=True)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median mails/s, with every run's rate, and the answers and losses over all runs beside it."""
    ordered = sorted(runs, key=lambda run: run["mail_per_s"])
    return {**ordered[len(ordered) // 2], "runs_mail_per_s": [run["mail_per_s"] for run in runs],
            "sent_all_runs": sum(run["count"] for run in runs),
            "accepted_all_runs": sum(run["accepted"] for run in runs),
            "temporary_all_runs": sum(run["temporary"] for run in runs),
            "lost_all_runs": sum(run["lost"] for run in runs),
            "duplicates_all_runs": sum(run["duplicates"] for run in runs),
            "extra_all_runs": sum(run["extra"] for run in runs)}


def show_flood(setup: str, size: int, got: dict[str, Any]) -> None:
    cpu = ", ".join(f"{name} {us:.0f}" for name, us in got["cpu_us_per_mail"].items())
    checks = "" if setup == "bare" else (f", {got['consumed']:,} consumed, {got['lost']} lost, "
                                         f"{got['duplicates']} twice")
    print(f"  {size_label(size):>6} {got['mail_per_s']:>7,.0f} mails/s, {got['accepted']:,} of {got['count']:,} "
          f"accepted, {got['temporary']} 4xx{checks} (CPU µs/mail: {cpu}; clients {got['client_cpu_us_per_mail']:.0f}; "
          f"load core {got['load_core_busy']:.0%} busy)  {LABELS[setup]}", flush=True)


def reading_cost(size: int, repeat: int) -> float:
    """CPU µs the bridge spends reading one mail of ``size`` into its ``email.receive`` (``messages.read_mail`` and
    ``receive_message`` as ``EmailBridge._read`` calls them, with the bridge's default limits), in this process:
    the part of the bridge's CPU per mail that is MIME parsing, not SMTP or the layer."""
    from email_clients import SENDER, mail

    from crossroads.bridges.email import messages as m
    from crossroads.bridges.email.bridge import _HEADROOM, EmailBridge
    from crossroads.layer.base import MAX_MESSAGE_SIZE

    options = EmailBridge.validate_options({"domains": [DOMAIN]})
    limits = m.Limits(options["max_message_size"], options["max_header_bytes"], options["max_parts"],
                      options["max_depth"], options["max_attachment_content"],
                      options["max_address_header_bytes"])
    raw = mail("cost", 1, size, RECIPIENT)
    started = time.process_time()
    for _ in range(repeat):
        parsed = m.read_mail(raw, limits)
        authenticated = m.authentication(smtp_login=None, relay=None, authserv_id="", headers=())
        m.receive_message(parsed, envelope_from=SENDER, envelope_to=[RECIPIENT], reply_prefix="email.reply.bench!",
                          limits=limits, budget=MAX_MESSAGE_SIZE - _HEADROOM, authenticated=authenticated,
                          own_addresses=[])
    return (time.process_time() - started) / repeat * 1e6


def measure(config: Config, redis: BenchRedis, workdir: Path) -> dict[str, Any]:
    receivers: dict[str, Receiver] = {}
    smarthost = replier = None
    try:
        smarthost = RecordingSmarthost(workdir)
        for setup in SETUPS:
            started = time.monotonic()
            receivers[setup] = (BareServer(workdir) if setup == "bare"
                                else Crossroads(setup, redis.url, workdir, smarthost.port))
            print(f"{LABELS[setup]}: ready in {time.monotonic() - started:.1f} s", flush=True)
        for setup in SETUPS:  # warm-up: first connections, code paths, allocator
            for size in SIZES:
                flood(setup, receivers, size, config.warmup, f"warmup-{size}")
        floods: dict[str, dict[str, Any]] = {}
        for size in SIZES:
            count = config.counts[str(size)]
            print(f"flood: {config.rounds} × {count:,} mails of {size_label(size)} from {CLIENT_COUNT} clients per "
                  "receiver, rounds interleaved", flush=True)
            runs: dict[str, list[dict[str, Any]]] = {setup: [] for setup in SETUPS}
            for round_ in range(config.rounds):
                # Interleaved: this machine's speed drifts over a minute; every receiver gets some of each moment.
                for setup in SETUPS:
                    runs[setup].append(got := flood(setup, receivers, size, count, f"s{size}-r{round_}"))
                    show_flood(setup, size, got)
            floods[str(size)] = {setup: median_run(runs[setup]) for setup in SETUPS}
        replier = BareReplier(workdir, smarthost.port)
        repliers = {"bare": replier, "redis": receivers["redis"], "memory": receivers["memory"]}
        print(f"reply latency: {config.replies:,} sequential mails of {size_label(LATENCY_SIZE)} per setup over "
              f"{config.rounds} interleaved rounds, after {config.reply_warmup} unmeasured", flush=True)
        latency_runs: dict[str, list[dict[str, Any]]] = {setup: [] for setup in repliers}
        for round_ in range(config.rounds):
            share = config.replies // config.rounds + (round_ < config.replies % config.rounds)
            for setup, receiver in repliers.items():
                got = reply_latency(receiver, smarthost, f"rt-{setup}-r{round_}", share,
                                    config.reply_warmup if round_ == 0 else 0)
                latency_runs[setup].append(got)
                show_latency(setup, got)
        latency = {setup: latency_summary(runs) for setup, runs in latency_runs.items()}
        costs = {str(size): reading_cost(size, config.warmup) for size in SIZES}
        logs = {}
        for setup, receiver in [*receivers.items(), ("bare-reply", replier)]:
            receiver.alive()
            logs[setup] = warnings(receiver.text())
        return {"floods": floods, "reply_latency": latency, "reading_cost_us": costs, "log_warnings": logs}
    finally:
        for receiver in [*receivers.values(), *([replier] if replier else [])]:
            receiver.stop()
        if smarthost is not None:
            smarthost.stop()


# -- set-up --


def ensure_smtpd_venv() -> str:
    """``.bench-venvs/aiosmtpd`` with aiosmtpd and aiosmtplib at ``.venv``'s versions (the receivers differ, not the
    libraries: the bare replier sends with the aiosmtplib the bridge sends with)."""
    wanted = {name: importlib.metadata.version(name) for name in ("aiosmtpd", "aiosmtplib")}
    if SMTPD_PYTHON.exists():
        found = subprocess.run([str(SMTPD_PYTHON), str(CLIENTS), json.dumps({"mode": "versions",
                                                                             "packages": list(wanted)})],
                               capture_output=True, text=True)
        if found.returncode == 0 and json.loads(found.stdout.splitlines()[-1]) == wanted:
            return wanted["aiosmtpd"]
    pins = [f"{name}=={version}" for name, version in wanted.items()]
    print(f"installing {', '.join(pins)} into {SMTPD_VENV.relative_to(ROOT)} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(SMTPD_VENV)], check=True)
    subprocess.run([str(SMTPD_PYTHON), "-m", "pip", "install", "-q", *pins], check=True)
    return wanted["aiosmtpd"]


def machine(redis: BenchRedis, aiosmtpd: str) -> dict[str, Any]:
    measured = ["bridges/base.py", "bridges/inlet.py", "bridges/listening.py", "bridges/email", "layer", "consumers",
                "crossroads"]
    return machine_facts(redis, measured, ("aiosmtpd", "aiosmtplib", "Twisted", "redis", "hiredis", "msgpack"),
                         aiosmtpd=aiosmtpd)


def run_all(config: Config) -> dict[str, Any]:
    aiosmtpd = ensure_smtpd_venv()
    results: dict[str, Any] = {"config": asdict(config)}
    with tempfile.TemporaryDirectory(prefix="email-bench-") as workdir:
        # redis-server before pinning ourselves: children inherit the affinity, and it stays free on either core.
        redis = BenchRedis()
        try:
            results["machine"] = machine(redis, aiosmtpd)
            if hasattr(os, "sched_setaffinity") and cpu_pin(LOAD_CORE):
                os.sched_setaffinity(0, {LOAD_CORE})  # this process only waits; keep it off the receivers' core
            results.update(measure(config, redis, Path(workdir)))
        finally:
            redis.stop()
    return results


# -- reporting --


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×" if reference else "—"


def flood_table(results: dict[str, Any], size: int) -> str:
    rows = results["floods"][str(size)]
    bare = rows["bare"]["mail_per_s"]
    lines = ["| receiver | mails/s (median) | runs, min–max | × bare | 4xx answers, all runs | reached the consumer, "
             "all runs | lost / twice, all runs | CPU µs per mail | clients' CPU µs per mail | load core busy |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for setup in SETUPS:
        row = rows[setup]
        runs = row["runs_mail_per_s"]
        cpu = " + ".join(f"{us:.0f} ({name})" for name, us in row["cpu_us_per_mail"].items())
        if setup == "bare":
            reached, lost = "— (no consumer)", "—"
        else:
            reached = f"{row['accepted_all_runs'] - row['lost_all_runs']:,} of {row['accepted_all_runs']:,} accepted"
            lost = f"{row['lost_all_runs']:,} / {row['duplicates_all_runs']:,}"
        lines.append(f"| {LABELS[setup]} | {row['mail_per_s']:,.0f} | {min(runs):,.0f}–{max(runs):,.0f} | "
                     f"{ratio(row['mail_per_s'], bare)} | {row['temporary_all_runs']:,} | {reached} | {lost} | {cpu} | "
                     f"{row['client_cpu_us_per_mail']:.0f} | {row['load_core_busy']:.0%} |")
    return "\n".join(lines)


def latency_table(results: dict[str, Any]) -> str:
    rows = results["reply_latency"]
    bare = rows["bare"]["p50_ms"]
    lines = ["| setup | p50 ms | p90 ms | p99 ms | max ms | mean ms | p50 × bare | of which the smarthost session "
             "(EHLO to DATA in), p50 / p99 ms | replies timed | missing / not 250 | receiver CPU µs per mail and "
             "reply |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for setup, row in rows.items():
        session = ("— (a kept connection)" if row.get("kept", 0) >= row["count"] else
                   f"{row['session_p50_ms']:.2f} / {row['session_p99_ms']:.2f}")
        lines.append(f"| {LATENCY_LABELS[setup]} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['p99_ms']:.2f} | "
                     f"{row['max_ms']:.2f} | {row['mean_ms']:.2f} | {ratio(row['p50_ms'], bare)} | "
                     f"{session} | {row['count']:,} | "
                     f"{row['missing']:,} / {sum(row['answers'].values()):,} | {row['cpu_us_per_mail']:,.0f} |")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    found = []
    for size in SIZES:
        rows = results["floods"][str(size)]
        bare, ours = rows["bare"]["mail_per_s"], rows["redis"]["mail_per_s"]
        found.append((f"redis://, {size_label(size)} mails: mails/s ≥ 50% of the bare aiosmtpd server's",
                      f"{ours:,.0f} mails/s = {ours / bare:.0%} of {bare:,.0f}", ours >= 0.5 * bare))
    for setup in ("redis", "memory"):
        lost = sum(results["floods"][str(size)][setup]["lost_all_runs"] for size in SIZES)
        twice = sum(results["floods"][str(size)][setup]["duplicates_all_runs"] for size in SIZES)
        extra = sum(results["floods"][str(size)][setup]["extra_all_runs"] for size in SIZES)
        accepted = sum(results["floods"][str(size)][setup]["accepted_all_runs"] for size in SIZES)
        found.append((f"{setup}://: every mail answered 250 reaches the consumer, once",
                      f"{lost:,} lost, {twice:,} twice, {extra:,} not answered 250 of {accepted:,} accepted",
                      lost == twice == extra == 0))
    if "reply_latency" in results:
        bare = results["reply_latency"]["bare"]
        for setup in ("redis", "memory"):
            row = results["reply_latency"][setup]
            found.append((f"{setup}://: DATA-to-reply latency at the smarthost, p50/p99, recorded (bare handler "
                          f"{bare['p50_ms']:.2f}/{bare['p99_ms']:.2f} ms)",
                          f"{row['p50_ms']:.2f} / {row['p99_ms']:.2f} ms over {row['count']:,} replies, "
                          f"{row['missing']} missing", row["count"] > 0 and row["missing"] == 0))
    return found


def chart(results: dict[str, Any], path: Path) -> None:
    """Left: mails/s per receiver and size. Right: CPU per mail, stacked per process."""
    plt, ticker = pyplot()
    colors = {"bare": "#7f7f7f", "redis": "#6baed6", "memory": "#1f77b4"}
    latency = results.get("reply_latency")
    fig, axes = plt.subplots(1, 3 if latency else 2, figsize=(20 if latency else 14, 6))
    rate_ax, cpu_ax = axes[0], axes[1]
    width = 0.27
    xs = range(len(SIZES))
    for i, setup in enumerate(SETUPS):
        rows = [results["floods"][str(size)][setup] for size in SIZES]
        values = [row["mail_per_s"] for row in rows]
        bars = rate_ax.bar([x + (i - 1) * width for x in xs], values, width, color=colors[setup], label=LABELS[setup])
        rate_ax.bar_label(bars, labels=[f"{v:,.0f}" + (f"\n{row['temporary_all_runs']:,} × 4xx"
                                                       if row["temporary_all_runs"] else "")
                                        for v, row in zip(values, rows, strict=True)], fontsize=8, padding=2)
        bottoms = [0.0] * len(SIZES)
        for j, name in enumerate(rows[0]["cpu_us_per_mail"]):
            heights = [row["cpu_us_per_mail"].get(name, 0.0) for row in rows]
            cpu_ax.bar([x + (i - 1) * width for x in xs], heights, width, bottom=bottoms, color=colors[setup],
                       edgecolor="white", hatch="//" if j else None,
                       label=f"{LABELS[setup].split(',')[0]}: {name}")
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        cpu_ax.bar_label(cpu_ax.containers[-1], labels=[f"{b:,.0f}" for b in bottoms], fontsize=8, padding=2)
    costs = results.get("reading_cost_us", {})
    for x, size in zip(xs, SIZES, strict=True):  # the bridge's share that is reading the mail, timed alone
        if str(size) in costs:
            base = results["floods"][str(size)]["redis"]["cpu_us_per_mail"].get("worker", 0.0)
            cpu_ax.hlines(base + costs[str(size)], x - width / 2, x + width / 2, colors="black", linestyles=":",
                          label="redis:// bridge: of which reading the mail (timed alone)" if x == 0 else None)
    for ax in (rate_ax, cpu_ax):
        ax.set_xticks(list(xs), [f"{size_label(size)} mails" for size in SIZES])
        ax.set_ylim(top=ax.get_ylim()[1] * 1.12)  # room for the labels over the tallest bar
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    rate_ax.set_ylabel("mails/s answered 250")
    rate_ax.set_title(f"Throughput, {CLIENT_COUNT} SMTP clients (higher is better)", fontsize=10)
    rate_ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    cpu_ax.set_ylabel("CPU µs per mail accepted")
    cpu_ax.set_title("Receiver CPU per mail, per process (lower is better)", fontsize=10)
    cpu_ax.legend(fontsize=8, loc="upper left")
    if latency:
        lat_ax = axes[2]
        setups = list(latency)
        for i, (key, name) in enumerate((("p50_ms", "p50"), ("p99_ms", "p99"))):
            values = [latency[setup][key] for setup in setups]
            bars = lat_ax.bar([x + (i - 0.5) * 0.4 for x in range(len(setups))], values, 0.4,
                              color=[colors[setup] for setup in setups], edgecolor="black",
                              hatch="//" if i else None, label=name)
            lat_ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8, padding=2)
        lat_ax.set_xticks(range(len(setups)), [LATENCY_LABELS[setup].split(",")[0].replace("bare aiosmtpd handler",
                                                                                            "bare handler")
                                               for setup in setups], fontsize=8)
        lat_ax.set_ylabel("ms, end of DATA to the reply at the smarthost")
        lat_ax.set_title("Reply latency, sequential 256 B mails: p50 (plain), p99 (hatched); lower is better",
                         fontsize=10)
        lat_ax.set_ylim(top=lat_ax.get_ylim()[1] * 1.12)
    fig.suptitle("crossroads email bridge vs a bare aiosmtpd server (2 cores: receivers on one, load on the other)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reading(results: dict[str, Any]) -> str:
    """What the tables say, in figures computed from them."""
    lines = []
    costs = results.get("reading_cost_us", {})
    for size in SIZES:
        rows = results["floods"][str(size)]
        bare = rows["bare"]
        bare_cpu = sum(bare["cpu_us_per_mail"].values())
        label = size_label(size)
        for setup in ("redis", "memory"):
            ours = rows[setup]["cpu_us_per_mail"]
            lines.append(f"- {label}, {LABELS[setup]}: {sum(ours.values()):,.0f} µs of CPU per mail "
                         f"({', '.join(f'{name} {us:,.0f}' for name, us in ours.items())}) against the bare "
                         f"server's {bare_cpu:,.0f}: {sum(ours.values()) / bare_cpu:.1f}×.")
        budget = sum(rows["redis"]["cpu_us_per_mail"].values())
        lines.append(f"- {label}: redis://'s two processes share one core, so at {budget:,.0f} µs per mail they can "
                     f"take at most ~{1e6 / budget:,.0f} mails/s (measured: {rows['redis']['mail_per_s']:,.0f}); half "
                     f"the bare server's rate ({bare['mail_per_s'] / 2:,.0f} mails/s) needs ≤ "
                     f"{2e6 / bare['mail_per_s']:,.0f} µs for the bridge and the worker together.")
        if str(size) in costs:
            bridge = rows["redis"]["cpu_us_per_mail"].get("bridge", 0.0)
            cost, room = costs[str(size)], 2e6 / bare["mail_per_s"]
            lines.append(f"- {label}: reading the mail into its `email.receive` (`messages.read_mail` and "
                         f"`receive_message`, timed alone in one process) costs {cost:,.0f} µs: "
                         f"{cost / bridge:.0%} of the redis:// bridge's {bridge:,.0f} µs per mail; the rest is "
                         f"SMTP (aiosmtpd's costs the bare server {bare_cpu:,.0f}), the bridge's hooks and the "
                         "layer (the mail is read on the loop: no hand-off to the reading thread)"
                         + (f". Reading alone is over the {room:,.0f} µs the target leaves: no change elsewhere "
                            "meets it." if cost > room else "."))
        busy, server = bare["load_core_busy"], bare["server_core_busy"]
        verdict = (": the bare server's core was full, so it, not the load, set the pace." if server > 0.85 else
                   ": the clients' core was nearly full, so the bare figure is partly the load's, and ratios "
                   "against it are, if anything, generous to crossroads." if busy > 0.85 else
                   ": neither filled its core: what is left went to waiting on the round trips (MAIL, RCPT, DATA, "
                   "the mail) and to the other processes of this shared machine.")
        lines.append(f"- {label}, is the load the bottleneck? Against the bare server the {CLIENT_COUNT} clients "
                     f"used {busy:.0%} of their core ({bare['client_cpu_us_per_mail']:,.0f} µs per mail) and the "
                     f"server {server:.0%} of its own{verdict}")
    redis_rows = {size: results["floods"][str(size)]["redis"] for size in SIZES}
    calm = ", ".join(f"{size_label(size)} {redis_rows[size]['mail_per_s'] / bare:.0%} of {bare:,}"
                     for size, bare in CALM_BARE.items())
    budgets = ", ".join(f"{size_label(size)} ≤ ~{1e6 / sum(redis_rows[size]['cpu_us_per_mail'].values()):,.0f}"
                        for size in SIZES)
    lines.append("- The bare server's rate moves with the machine's load more than crossroads' does (it waits on "
                 "round trips; crossroads mostly computes, its two processes on one core). The run at 398e5bc, "
                 f"load average 2.3, measured the bare server at {CALM_BARE[256]:,} (256 B) and "
                 f"{CALM_BARE[20 * 1024]:,} (20 KiB) mails/s: against those, redis:// here is {calm}. What decides "
                 f"the target on a calm machine is crossroads' CPU per mail: on its one core, {budgets} mails/s.")
    lines.append("- Where the bridge's CPU goes (py-spy --gil of the redis:// bridge under this flood, 256-byte "
                 "mails, bridges/email at 91773bb; shares of the samples holding the GIL): reading the mail in its "
                 "thread ~45% (`receive_message` 25%, the stdlib parser 6%, the headers 10%: each parsed once, "
                 "plain values without the header registry; 2,380 µs a mail before, at 398e5bc); aiosmtpd's "
                 "protocol on the loop ~25% (its DATA line reading, replies, timeouts; plain `<a@b>` MAIL FROM and "
                 "RCPT TO paths are read by the bridge, aiosmtpd's `_getaddr` defining a class per call, which "
                 "the bare server still pays); the hand-off to the reading thread and back ~10%; the Redis "
                 "layer's send ~4%; the bridge's own hooks (`handle_DATA`, `push`) a few percent. The worker's "
                 "CPU is the Redis layer's blocking pops (a round trip per mail or batch) and the benchmark "
                 "consumer's counter file. A mail with encoded words, quoted names or address lists still goes "
                 "through the registry: a multipart/mixed reply (text and html alternatives, a PDF, encoded "
                 "words, 3 addresses) reads in ~1,500 µs.")
    temporary = {setup: sum(results["floods"][str(size)][setup]["temporary_all_runs"] for size in SIZES)
                 for setup in ("redis", "memory")}
    full = {setup: sum(n for text, n in results["log_warnings"].get(setup, {}).items() if "is full" in text)
            for setup in ("redis", "memory")}
    if any(temporary.values()):
        lines.append("- 4xx answers: " + "; ".join(f"{setup}:// {n:,}" for setup, n in temporary.items())
                     + ". The bridge answers 451 when the layer refuses the mail (the `email.receive` channel is "
                     "full: its capacity is 100 and the workers are behind); the client sends the mail again "
                     f"{RETRY * 1000:g} ms later, as an MTA would (later). Nothing is lost: see the targets.")
    else:
        lines.append(f"- No 4xx answer: with {CLIENT_COUNT} clients at most {CLIENT_COUNT} mails are in the bridge at "
                     "once, and the worker kept the `email.receive` channel (capacity 100) from filling"
                     + (f" (though the bridge logged it full {sum(full.values()):,} times)" if any(full.values())
                        else "") + ".")
    for size in SIZES:
        rows = results["floods"][str(size)]
        lag = [(setup, rows[setup]["end_to_end_mail_per_s"], rows[setup]["mail_per_s"])
               for setup in ("redis", "memory")]
        keeps = all(e2e >= 0.9 * rate for _, e2e, rate in lag)
        lines.append(f"- {size_label(size)}: to the consumer (first MAIL FROM to the last mail consumed, median run) "
                     + ", ".join(f"{setup}:// {e2e:,.0f}" for setup, e2e, _ in lag) + " mails/s: "
                     + ("the worker keeps up with the bridge's 250s." if keeps else
                        "the worker lags behind the bridge's 250s (the channel holds the difference)."))
    load = results["machine"]["load_before"]
    lines.append(f"- Load average before the run: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min) on "
                 f"{results['machine']['nproc']} cores"
                 + (": the machine was not idle (the benchmark run just before this one, or other work, "
                    "still in the average); the *runs* column shows the spread."
                    if load[0] > 0.3 else ": the machine was quiet."))
    return "\n".join(lines)


def latency_reading(results: dict[str, Any]) -> str:
    """What the reply-latency table says, in figures computed from it."""
    rows = results["reply_latency"]
    bare = rows["bare"]
    lines = []
    for setup in ("redis", "memory"):
        row = rows[setup]
        if row.get("kept", 0) >= row["count"]:  # no reply opened a connection: there is no session to split off
            split = (f"Every reply went over the connection kept from the one before: no SMTP session with the "
                     f"smarthost of its own (the handler's, its EHLO to the reply's DATA in: "
                     f"{bare['session_p50_ms']:.2f} ms of its p50).")
        else:
            split = (f"Of its p50, the SMTP session with the smarthost (its EHLO to the reply's DATA in) is "
                     f"{row['session_p50_ms']:.2f} ms (the handler's: {bare['session_p50_ms']:.2f}); the other "
                     f"{row['p50_ms'] - row['session_p50_ms']:.2f} ms (the handler's: "
                     f"{bare['p50_ms'] - bare['session_p50_ms']:.2f}) run from the end of DATA to the smarthost's "
                     "EHLO.")
        lines.append(f"- {LATENCY_LABELS[setup]}: p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms: "
                     f"{row['p50_ms'] - bare['p50_ms']:+.2f} ms ({ratio(row['p50_ms'], bare['p50_ms'])}) at the "
                     f"median and {row['p99_ms'] - bare['p99_ms']:+.2f} ms at p99 against the hand-written handler's "
                     f"{bare['p50_ms']:.2f} / {bare['p99_ms']:.2f} ms. " + split)
    rounds = results["config"]["rounds"]
    count = results["config"]["replies"]
    shares = [count // rounds + (i < count % rounds) for i in range(rounds)]

    def per_round(setup: str) -> list[float]:  # the pooled latencies are in round order, ``shares`` each
        values, at = [], 0
        for share in shares:
            values.append(percentile(rows[setup]["latencies_ms"][at:at + share], 50))
            at += share
        return values

    spread = {setup: per_round(setup) for setup in rows}
    lines.append("- The p50 of each round (rounds interleaved setup by setup): " + "; ".join(
        f"{setup} {', '.join(f'{v:.2f}' for v in values)} ms" for setup, values in spread.items())
        + f". Each setup's rounds spread over {min(max(v) - min(v) for v in spread.values()):.2f}-"
        f"{max(max(v) - min(v) for v in spread.values()):.2f} ms on this shared machine: a difference between "
        "setups smaller than that is not one this run can tell apart, and the p99s (a few replies in a hundred) "
        "are the machine's other tenants as much as ours.")
    widest = max(max(v) - min(v) for v in spread.values())
    verdict = []
    for setup in ("redis", "memory"):
        extra = rows[setup]["p50_ms"] - bare["p50_ms"]
        slower = sum(ours > theirs for ours, theirs in zip(spread[setup], spread["bare"], strict=True))
        verdict.append(f"{setup}:// {extra:+.2f} ms at p50 (slower than the replier in {slower} of {rounds} "
                       "rounds), "
                       + ("more than the rounds' spread: a cost of its own" if abs(extra) > widest else
                          "within the rounds' spread: no difference this run can show"))
    lines.append("- In short, against a hand-written aiosmtpd + aiosmtplib replier: " + "; ".join(verdict)
                 + ". Over redis:// the mail and its reply each cross the layer to and from another process (the "
                 "worker), which memory:// does in one.")
    kept = ", ".join(f"{setup} {rows[setup].get('kept', 0):,} of {rows[setup]['count']:,}" for setup in rows)
    lines.append("- The bare replier opens a connection to the smarthost per reply: `aiosmtplib.send` does so by "
                 "design, so each reply pays a TCP connect, the greeting and EHLO, MAIL, RCPT, DATA and QUIT. The "
                 "bridge's outbox keeps its connection open for `smarthost_idle_timeout` seconds (5 by default) once "
                 "its queue is empty, so replies one after the other share one (the session column above counts "
                 "only replies that opened a connection). Replies timed that went over a connection kept from an "
                 f"earlier one: {kept}. Measured apart on this machine (aiosmtplib 5.1.3 sending to aiosmtpd in one "
                 "process, 100 mails), a connection per mail costs 2.2 ms of CPU (1.9 user, 0.3 system), a mail on "
                 "a kept connection 0.7 ms.")
    lines.append("- What crossroads adds, on the path of one mail: the bridge reads it (on its loop, as a small plain-"
                 "text mail like these is sure to be cheap to read; any other in its reading thread; the flood's "
                 "reading cost above) and sends `email.receive` into the layer before its 250; a worker takes it (over"
                 " redis://, a blocking pop: another process, another round trip) and runs the consumer, whose reply "
                 "goes back through the layer to the bridge's reply channel; the bridge builds the reply "
                 "(`messages.build_reply`: threading headers, a Message-ID, RFC 5322 checks) and hands it to the "
                 "outbox's task, which connects unless its connection is still open from the reply before. The hand-"
                 "written handler parses the mail on the loop and starts its `aiosmtplib.send` in a task as it answers"
                 " 250: no layer, no other process, no thread.")
    lines.append("- CPU per mail and its reply, receiver side (from /proc, clock ticks over each round, median "
                 "round; redis-server and the smarthost excluded): " + ", ".join(
                     f"{setup} {rows[setup]['cpu_us_per_mail']:,.0f} µs" for setup in rows)
                 + ". Sequential mails leave the receivers mostly idle: these are latencies of an unloaded path, "
                 "not of a busy one.")
    limited = sum(n for setup in ("redis", "memory") for text, n in results["log_warnings"].get(setup, {}).items()
                  if "reply_rate" in text)
    missing = sum(row["missing"] for row in rows.values())
    lines.append("- The reply limit: `reply_rate`/`reply_burst` are lifted for this run (see the method), and "
                 + ("no reply was held back by it (no `over reply_rate` line in the logs)" if not limited else
                    f"the logs still say `over reply_rate` {limited:,} times: the figures are suspect")
                 + f"; {missing:,} replies missing. With the defaults, this run's one sender would have had 5 "
                 "replies and then one a minute: the limit, not the latency, would be what a test of the defaults "
                 "measured.")
    lines.append("- Not measured: replies under load. With many mails at once the outbox sends replies in order over "
                 "one connection, so a reply also waits for those before it; "
                 "the flood above does not reply.")
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
    counts = " and ".join(f"{cfg['counts'][str(size)]:,} of {size_label(size)}" for size in SIZES)
    pinning = (f"Every receiver process (the bare server, crossroads' bridge and worker, `crossroads run`) is pinned "
               f"to core {SERVER_CORE} and the {CLIENT_COUNT} client processes to core {LOAD_CORE} with `taskset -c`; "
               "redis-server is not pinned. So each receiver gets one core, whatever its number of processes: "
               "crossroads' two redis:// processes share it."
               if m["pinned"] else "Processes are not pinned (no taskset, or a single core).")
    latency_method = (
        f"{cfg['replies']:,} mails of {size_label(LATENCY_SIZE)} per setup, one after the other over one SMTP "
        f"connection from the benchmark's own process (on core {LOAD_CORE}), each sent once the reply to the one "
        f"before has arrived, in {cfg['rounds']} rounds interleaved setup by setup, after {cfg['reply_warmup']} "
        "unmeasured. The latency runs from the moment the client writes the mail's end (DATA's `.`: the 256 bytes "
        "go in one write) to the moment the reply's DATA is in at a recording smarthost: a bare aiosmtpd process on "
        f"core {LOAD_CORE} timing each mail first thing in its `handle_DATA` (one clock, `time.monotonic_ns()`, for "
        "every process). crossroads: the same receivers as above, with `smarthost` set to it; a consumer answers "
        "each mail on `message.reply_channel` with one line of text (`bench/email_consumers.py`), the bridge builds "
        "the reply (`In-Reply-To`, `References`, a Message-ID of its own) and sends it with aiosmtplib. **The "
        "per-recipient reply limit is lifted** (`reply_rate = 1000000.0`, `reply_burst = 1000000`): every reply "
        "goes to the benchmark's one sender, and the defaults (5 at once, then one a minute) would drop all but "
        "the first 5 (`rate_limited`): this measures the latency, not the limiter. Bare row: aiosmtpd with a "
        "hand-written `handle_DATA` that parses the mail (`policy.default`), answers 250 and sends the reply itself "
        f"with `aiosmtplib.send` (aiosmtplib {m['crossroads_venv'].get('aiosmtplib', '?')}, as the bridge's) in a "
        f"task, on core {SERVER_CORE}. A reply not at the smarthost {REPLY_TIMEOUT:g} s after its 250 counts as "
        "missing."
        if "reply_latency" in results else "not measured in this run.")
    latency_section = (f"### Reply latency, {size_label(LATENCY_SIZE)} mails, {cfg['replies']:,} per setup\n\n"
                       f"{latency_table(results)}\n\n{latency_reading(results)}" if "reply_latency" in results
                       else "")
    tables = "\n\n".join(f"### {size_label(size)} mails, {cfg['counts'][str(size)]:,} per round\n\n"
                         f"{flood_table(results, size)}" for size in SIZES)
    return f"""## Email (SMTP inbound)

crossroads' email bridge (`type = "email"`) taking mail over SMTP into the layer, against the ceiling a
hand-written receiver reaches: aiosmtpd {m['aiosmtpd']}'s own SMTP protocol with a handler whose `handle_DATA`
answers `250 OK` and does nothing else. Both get the same mails from the same 4 smtplib clients. The crossroads
consumer counts `email.receive` by its Subject (`bench/email_consumers.py`); the clients and the bare server:
`bench/email_clients.py`.

Reproduce with `.venv/bin/python bench/mail.py` (took {results['seconds'] / 60:.1f} min; `--quick` is a smoke run
that writes nothing, `--report` redraws from the JSON). It starts its own redis-server and every SMTP server on a
free port, and installs aiosmtpd {m['aiosmtpd']} into `.bench-venvs/aiosmtpd` for the bare server and the load.
Raw figures: [`bench/results/email.json`]({rel(RESULTS, DOC.parent)}).

**Machine**: {m['nproc']} cores, {m['cpu']}; Python {m['python']}; redis-server {m['redis_server']}; crossroads
at {m['commit']} with {mine}. Load average {m['load_before'][0]:.2f} when this run started (a shared machine:
other engineers' tests may run beside it).

### Method

- **Receivers.** Bare aiosmtpd: one process, `SMTP(handler)` on `loop.create_server`, `handle_DATA` returning
  `"250 OK"`. crossroads redis://: `crossroads bridge mail` and `crossroads worker`, two processes, over the
  benchmark's own redis-server. crossroads memory://: `crossroads run`, the bridge and the worker threads in one
  process. crossroads keeps every default (layer capacity 100, 4 worker threads, `max_message_size` 512 KiB,
  one domain in `domains`) but `smarthost`, `reply_rate` and `reply_burst`, which only the reply-latency
  scenario uses (below; the flood's mails get no reply): the bridge reads each mail into its `email.receive`
  (MIME parsing: on its loop for a mail sure to be cheap to read, as the flood's are; any other in a thread of its
  own), and answers 250 only once the layer accepted it, 451 when it cannot.
- {pinning}
- **Load**: {CLIENT_COUNT} client processes (stdlib `smtplib`), each on one connection sending mails back to
  back (`MAIL FROM`, `RCPT TO`, `DATA`), started together once all are connected: {counts} per round (headers
  included, plain text), shared among the clients, {cfg['rounds']} rounds per receiver and size, interleaved
  receiver by receiver, the median shown, after {cfg['warmup']} mails per receiver and size unmeasured.
  mails/s = mails answered 250 ÷ the time from the first client's first command to the last client's last
  answer. A mail answered 4xx (451: the layer is full) is counted and sent again {RETRY * 1000:g} ms later; a 5xx
  would be given up (none was).
- **Delivery check** (crossroads): each Subject is `<run> <seq>`; the consumer counts distinct ones. A mail
  answered 250 that has not reached the consumer {IDLE:g} s after the last arrival is lost; one counted twice was
  delivered twice.
- **CPU per mail**: each receiver process's user + system time over the round (from /proc; for crossroads until
  the last mail is consumed) ÷ mails accepted; redis-server excluded. The clients' CPU per mail and how busy their
  core was say whether the load, not the receiver, set the pace.
- **DATA-to-reply latency** (issue 12): {latency_method}

{tables}

{latency_section}

![Email benchmark]({rel(CHART, DOC.parent)})

### Targets

{targets_markdown(targets(results))}

### Reading

{reading(results)}

### What the servers logged (warnings and errors, numbers replaced by N)

{problems(results)}
"""


def print_report(results: dict[str, Any]) -> None:
    latency = [latency_table(results), latency_reading(results)] if "reply_latency" in results else []
    print_blocks(*(flood_table(results, size) for size in SIZES), *latency, targets_markdown(targets(results)),
                 reading(results), problems(results))


def main(argv: list[str] | None = None) -> int:
    return bench_main("email", argv, description=__doc__.split("\n\n")[0],
                      run=lambda config: timed_run(run_all, config), config=Config.make, report=print_report,
                      doc=DOC, chart_path=CHART, chart=chart, document=document, results_path=RESULTS)

if __name__ == "__main__":
    sys.exit(main())
