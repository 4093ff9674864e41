"""The server processes of one benchmarked setup: started pinned to a core, their output in one log file.

Shared by bench/web.py, bench/mqtt.py and bench/chat.py (``Scraper``, a Prometheus stand-in, by bench/worker.py
too). Output goes to a file, not a pipe: a full pipe would stall a server in the middle of a measurement. Each
benchmark subclasses ``ProcessGroup`` with what is its own (its config, how to tell the setup is ready:
``wait_ready()``). The third-party servers (redis-server, mosquitto, ngircd) come from tests/servers.py, as in the
tests.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from bench.layer import BenchError, cpu_pin

CROSSROADS = str(Path(sys.executable).parent / "crossroads")  # of the virtualenv running the benchmark


class ProcessGroup:
    def __init__(self, label: str, log_path: Path, core: int, cwd: Path) -> None:
        self.label = label
        self.core, self.cwd = core, cwd
        self.log = open(log_path, "w+")  # noqa: SIM115  (closed in stop())
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.processes[name] = subprocess.Popen([*cpu_pin(self.core), *command], cwd=self.cwd, env=env,
                                                stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)

    def start_crossroads(self, layer: str, config: Path, bridges: dict[str, str], env: dict[str, str]) -> None:
        """One crossroads setup on ``config``: for memory://, ``crossroads run``; otherwise ``crossroads worker``
        and a ``crossroads bridge`` per entry of ``bridges`` (process name -> bridge name)."""
        if layer == "memory":
            self.start("run", [CROSSROADS, "run", "--config", str(config)], env)
        else:
            self.start("worker", [CROSSROADS, "worker", "--config", str(config)], env)
            for name, bridge in bridges.items():
                self.start(name, [CROSSROADS, "bridge", bridge, "--config", str(config)], env)

    def ready(self) -> None:
        """Return once ``wait_ready()`` says the setup serves; if it fails, stop every process first."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self) -> None:
        """Return once the setup serves; raise ``BenchError`` if it does not. Each benchmark says how it knows."""

    @property
    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self.processes.items()}

    def alive(self) -> None:
        """Raise ``BenchError`` with the log's tail if any process has exited."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise BenchError(f"{self.label}: {name} exited {process.returncode}; log:\n{self.tail()}")

    def text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def tail(self) -> str:
        return self.text()[-3000:]

    def terminate(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()

    def stop(self, grace: float = 10.0) -> str:
        """SIGTERM every process, SIGKILL what is left after ``grace`` seconds; the log's text."""
        self.terminate()
        for process in self.processes.values():
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        text = self.text()
        self.log.close()
        return text


class Scraper(threading.Thread):
    """GETs a process's /metrics every ``interval`` seconds, as Prometheus would (its default is every 15 s)."""

    def __init__(self, port: int, interval: float) -> None:
        super().__init__(name="scraper", daemon=True)
        self.url, self.interval = f"http://127.0.0.1:{port}/metrics", interval
        self.scrapes, self.failures = 0, 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    body = response.read()
                self.scrapes += b"crossroads_worker_consumed_total" in body
            except OSError:
                self.failures += 1
