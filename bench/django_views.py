"""Django benchmark: one Django project served through crossroads side by side with gunicorn and Daphne.

Owns this file and the project it serves, ``bench/_django_site.py`` (settings, URLconf and two views: ``/``
says hello, ``/orm/`` reads one row through the ORM on SQLite) with ``bench/_django_asgi.py`` (Daphne's
application: Channels 4's ``ProtocolTypeRouter`` around Django's ASGI handler), and what they write: the
"Django views" section of ``docs/benchmarks.md``, ``docs/img/django-throughput.png`` and the raw figures in
``bench/results/django.json``.

Servers, all serving the same project, every server process pinned to one core, wrk on the other:

- crossroads, memory://: ``crossroads run`` with a ``[django]`` table (the HTTP bridge and 4 worker threads
  running ``django_view``, one process);
- crossroads, redis://: ``crossroads bridge web`` + ``crossroads worker`` (4 threads);
- gunicorn, sync workers: 4 worker processes (one request at a time each: as many at once as crossroads' 4
  threads), in a virtualenv of its own (``.bench-venvs/gunicorn``);
- Daphne + Channels 4: one ``daphne`` process, Django's sync views run on asgiref's thread pool, in the
  Channels virtualenv bench/web.py makes.

Not ``bench/django.py``: bench/ is on the path of its helpers' processes (Daphne's, Channels' workers), where a
``django.py`` would be imported in place of Django itself.

Usage: ``.venv/bin/python bench/django_views.py [--quick | --report]``; ``--quick`` is a smoke run that writes nothing,
``--report`` rewrites the doc section and the plot from the last full run's JSON without measuring.
"""

from __future__ import annotations

import json
import os
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
from _sections import bench_main, print_blocks, pyplot, targets_markdown  # noqa: E402
from _worker_load import process_cpu  # noqa: E402
from servers import free_port  # noqa: E402

from bench.layer import CR_VENV, BenchError, BenchRedis, cpu_pin, installed_versions, timed_run  # noqa: E402
from bench.web import (  # noqa: E402
    CLIENT_CORE,
    HTTP_CONNECTIONS,
    SERVER_CORE,
    ensure_daphne,
    ensure_wrk,
    fmt_runs,
    median_run,
    stop_all,
    wait_quiet,
    warnings,
    wrk,
)
from bench.worker import CHANNELS_PINS, machine  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "django.json"
DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "img" / "django-throughput.png"
GUNICORN_VENV = ROOT / ".bench-venvs" / "gunicorn"
GUNICORN_PYTHON = GUNICORN_VENV / "bin" / "python"
GUNICORN_PINS = {"gunicorn": "27.0.1", "Django": CHANNELS_PINS["Django"]}  # the same Django as Daphne's side
THREADS = 4  # crossroads' default [worker] threads; gunicorn gets as many sync worker processes
PATHS = {"hello": "/", "orm": "/orm/"}


@dataclass(frozen=True)
class Config:
    rounds: int  # saturated runs per server and view, interleaved; the median is reported
    wrk_seconds: int

    @classmethod
    def make(cls, quick: bool) -> Config:
        return cls(rounds=1, wrk_seconds=1) if quick else cls(rounds=3, wrk_seconds=5)


@dataclass(frozen=True)
class Setup:
    system: str  # "crossroads" | "gunicorn" | "daphne"
    layer: str = ""  # crossroads: "memory" | "redis"

    @property
    def label(self) -> str:
        if self.system == "gunicorn":
            return f"gunicorn, {THREADS} sync workers"
        if self.system == "daphne":
            return "Daphne + Channels 4 (Django's ASGI handler)"
        how = "crossroads run" if self.layer == "memory" else "bridge + worker, 2 processes"
        return f"crossroads {self.layer}://, {how}"


SETUPS = (Setup("crossroads", "memory"), Setup("gunicorn"), Setup("daphne"), Setup("crossroads", "redis"))


class Servers(ProcessGroup):
    """The process(es) of one setup serving the project, pinned to SERVER_CORE."""

    def __init__(self, setup: Setup, redis_url: str, workdir: Path, database: Path) -> None:
        self.setup = setup
        name = f"{setup.system}-{setup.layer}" if setup.layer else setup.system
        super().__init__(setup.label, workdir / f"django-{name}.log", SERVER_CORE, ROOT / "bench")
        self.port = free_port()
        env = project_env(database)
        if setup.system == "gunicorn":  # access log on, as the others have theirs
            self.start("gunicorn", [str(GUNICORN_VENV / "bin" / "gunicorn"), "--workers", str(THREADS),
                                    "--worker-class", "sync", "--bind", f"127.0.0.1:{self.port}",
                                    "--access-logfile", "-", "django.core.wsgi:get_wsgi_application()"], env)
        elif setup.system == "daphne":
            self.start("daphne", [str(CR_VENV / "bin" / "daphne"), "-b", "127.0.0.1", "-p", str(self.port),
                                  "_django_asgi:application"], env)
        else:
            config = workdir / f"crossroads-django-{setup.layer}.toml"
            config.write_text(crossroads_toml(setup.layer, redis_url, self.port))
            self.start_crossroads(setup.layer, config, {"bridge": "web"}, env)
        self.ready()

    def wait_ready(self) -> None:
        """Until both views answer 200: every process is up and Django is set up wherever it runs."""
        deadline = time.monotonic() + 60
        while True:
            self.alive()
            try:
                if all(self.get(path) == 200 for path in PATHS.values()):
                    return
            except OSError:  # not listening yet, or the worker not consuming yet
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{self.setup.label} did not come up in 60 s; log:\n{self.tail()}")
            time.sleep(0.2)

    def get(self, path: str) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as response:
            return response.status

    def cpu(self) -> float:
        """CPU seconds of every process of the setup, gunicorn's forked workers included."""
        from servers import _descendants

        pids = [pid for top in self.pids.values() for pid in (top, *_descendants(top))]
        total = 0.0
        for pid in pids:
            try:
                total += process_cpu(pid)
            except OSError:
                pass  # gone meanwhile
        return total


def project_env(database: Path) -> dict[str, str]:
    """The environment every server of the project runs in: bench/ on the path, the settings, the database."""
    return {**os.environ, "PYTHONPATH": str(ROOT / "bench"), "DJANGO_SETTINGS_MODULE": "_django_site",
            "BENCH_DJANGO_DB": str(database)}


def crossroads_toml(layer: str, redis_url: str, port: int) -> str:
    """The config a Django developer writes (docs/django.md): a [django] table and an HTTP bridge; no routing
    table (``django_view`` serves every request), every default kept (4 worker threads, access log on)."""
    url = "memory://" if layer == "memory" else redis_url
    return f"""[layer]
url = "{url}"

[django]
settings = "_django_site"

[bridges.web]
type = "http"
port = {port}
"""


def gunicorn_versions() -> dict[str, str | None]:
    """GUNICORN_PINS' packages as installed in the gunicorn venv (bench.layer's ``installed_versions`` needs
    msgpack, which that venv has no use for)."""
    script = ("import importlib.metadata as m, json, sys\n"
              "def version(name):\n    try:\n        return m.version(name)\n    except m.PackageNotFoundError:\n"
              "        return None\n"
              "print(json.dumps({name: version(name) for name in sys.argv[1:]}))")
    done = subprocess.run([str(GUNICORN_PYTHON), "-c", script, *GUNICORN_PINS], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def ensure_gunicorn() -> None:
    """``.bench-venvs/gunicorn`` with gunicorn and Django at GUNICORN_PINS; skipped when it holds exactly those."""
    if GUNICORN_PYTHON.exists() and gunicorn_versions() == GUNICORN_PINS:
        return
    print(f"installing {', '.join(f'{k} {v}' for k, v in GUNICORN_PINS.items())} into "
          f"{GUNICORN_VENV.relative_to(ROOT)} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(GUNICORN_VENV)], check=True)
    subprocess.run([str(GUNICORN_PYTHON), "-m", "pip", "install", "-q",
                    *(f"{k}=={v}" for k, v in GUNICORN_PINS.items())], check=True)


def make_database(path: Path) -> None:
    """Migrate the project's SQLite database and add the one user ``/orm/`` reads, before any server starts."""
    script = ("import django; django.setup(); from django.core.management import call_command; "
              "call_command('migrate', verbosity=0); from django.contrib.auth.models import User; "
              "User.objects.create_user('bench')")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT / "bench", capture_output=True, text=True,
                          env=project_env(path))
    if done.returncode != 0:
        raise BenchError(f"migrating the bench project failed:\n{done.stderr[-2000:]}")


def run_saturated(servers: Servers, path: str, config: Config, wrk_binary: str) -> dict[str, Any]:
    cpu = servers.cpu()
    figures = wrk(wrk_binary, f"http://127.0.0.1:{servers.port}{path}", config.wrk_seconds)
    used = servers.cpu() - cpu
    figures["server_cpu_percent"] = used / config.wrk_seconds * 100
    requests = figures["req_per_s"] * config.wrk_seconds
    figures["cpu_us_per_request"] = used / requests * 1e6 if requests else None
    return figures


def measure(redis: BenchRedis, config: Config, wrk_binary: str, workdir: Path) -> list[dict[str, Any]]:
    """Every view on every setup, all serving at once (idle ones cost nothing), rounds interleaved server by
    server, so the machine's drift is spread over every server."""
    database = workdir / "db.sqlite3"
    make_database(database)
    servers: dict[Setup, Servers] = {}
    try:
        for setup in SETUPS:
            started = time.monotonic()
            servers[setup] = Servers(setup, redis.url, workdir, database)
            print(f"{setup.label}: ready in {time.monotonic() - started:.1f} s", flush=True)
        rows = {setup: {**asdict(setup), "label": setup.label, "pids": s.pids} for setup, s in servers.items()}
        for s in servers.values():
            for path in PATHS.values():
                wrk(wrk_binary, f"http://127.0.0.1:{s.port}{path}", 1)  # warm-up (wrk takes whole seconds)
        for view, path in PATHS.items():
            runs: dict[Setup, list[dict[str, Any]]] = {setup: [] for setup in SETUPS}
            for _ in range(config.rounds):
                for setup, s in servers.items():
                    runs[setup].append(run_saturated(s, path, config, wrk_binary))
                    wait_quiet(s)
            for setup in SETUPS:
                rows[setup][view] = got = median_run(runs[setup], "req_per_s")
                print(f"  {view:5} {got['req_per_s']:>7,.0f} req/s (runs {fmt_runs(got['runs_req_per_s'])}), p50 "
                      f"{got['p50_ms']:.1f} ms p99 {got['p99_ms']:.1f} ms, {got['cpu_us_per_request']:.0f} µs CPU "
                      f"per request, {got['errors']} errors  {setup.label}", flush=True)
        for setup, s in servers.items():
            s.alive()
            rows[setup]["log_warnings"] = warnings(s.text())
        return list(rows.values())
    finally:
        stop_all(list(servers.values()))


def run_all(config: Config) -> dict[str, Any]:
    wrk_binary = ensure_wrk()
    ensure_daphne()
    ensure_gunicorn()
    if hasattr(os, "sched_setaffinity") and cpu_pin(CLIENT_CORE):
        os.sched_setaffinity(0, {CLIENT_CORE})  # this process only waits; keep it off the servers' core
    redis = BenchRedis()
    try:
        results: dict[str, Any] = {"config": asdict(config), "machine": machine(redis, bool(cpu_pin(0))), "rows": []}
        results["machine"]["load_before"] = os.getloadavg()
        results["machine"]["crossroads_venv"].update(installed_versions(sys.executable, ["Django", "Twisted"]))
        results["machine"]["channels_venv"].update(installed_versions(str(CR_VENV / "bin" / "python"), ["daphne"]))
        results["machine"]["gunicorn_venv"] = gunicorn_versions()
        results["machine"]["wrk"] = subprocess.run([wrk_binary, "-v"], capture_output=True,
                                                   text=True).stdout.split(" Copyright")[0].strip()
        with tempfile.TemporaryDirectory(prefix="django-bench-") as workdir:
            results["rows"] = measure(redis, config, wrk_binary, Path(workdir))
        results["machine"]["load_after"] = os.getloadavg()
        return results
    finally:
        redis.stop()


# -- reporting --


def find(results: dict[str, Any], system: str, layer: str = "") -> dict[str, Any] | None:
    return next((row for row in results["rows"] if (row["system"], row["layer"]) == (system, layer)), None)


def table(results: dict[str, Any], view: str) -> str:
    reference = find(results, "gunicorn")
    base = reference[view]["req_per_s"] if reference else 0.0
    lines = ["| server | req/s (wrk, median) | runs, min–max | × gunicorn | p50 / p99 ms | server CPU "
             "| CPU µs per request | errors |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for row in results["rows"]:
        got = row[view]
        runs = got["runs_req_per_s"]
        lines.append(f"| {row['label']} | {got['req_per_s']:,.0f} | {min(runs):,.0f}–{max(runs):,.0f} "
                     f"| {got['req_per_s'] / base:.2f}× | {got['p50_ms']:.1f} / {got['p99_ms']:.1f} "
                     f"| {got['server_cpu_percent']:.0f}% | {got['cpu_us_per_request']:,.0f} | {got['errors']} |"
                     if base else f"| {row['label']} | {got['req_per_s']:,.0f} | — | — | — | — | — | — |")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    ours, theirs = find(results, "crossroads", "memory"), find(results, "gunicorn")
    if ours is None or theirs is None:
        return []
    found = []
    for view in PATHS:
        mine, base = ours[view]["req_per_s"], theirs[view]["req_per_s"]
        found.append((f"crossroads memory:// ≥ gunicorn ({THREADS} sync workers, same core): {view} view",
                      f"{mine:,.0f} vs {base:,.0f} req/s = {mine / base:.2f}×", mine >= base))
    return found


def reading(results: dict[str, Any]) -> str:
    lines = []
    errors = [row["label"] for row in results["rows"] if any(row[view]["errors"] for view in PATHS)]
    if errors:
        lines.append(f"- wrk counted errors (non-2xx answers or socket errors) for {', '.join(errors)}: see the "
                     "servers' warnings below.")
    lines.append("- gunicorn's sync workers close the connection after every response (they do not keep "
                 "connections alive), so wrk reconnects for each request there; the other servers keep wrk's "
                 f"{HTTP_CONNECTIONS} connections open. That is how a sync gunicorn serves without a proxy in front.")
    if any("dropped a reply to http." in text for row in results["rows"] for text in row.get("log_warnings", {})):
        lines.append("- `dropped a reply to http.… nothing is registered for it (its connection closed?)`: wrk closes "
                     "its connections at the end of a run with requests in flight; those replies have nowhere to go. "
                     "Expected.")
    if any("'http.disconnect' is full" in text for row in results["rows"] for text in row.get("log_warnings", {})):
        lines.append("- `channel 'http.disconnect' is full`: the project routes nothing but `http.request` (the "
                     "`[django]` table appends `django_view` for it alone), so nothing drains `http.disconnect`; once "
                     "its 100 places are taken by wrk's closing connections, the bridge refuses further disconnects "
                     "(counted and logged). It costs the measured requests nothing.")
    lines.append("- CPU µs per request is every server process's user + system time over the run ÷ the requests "
                 "answered: unlike req/s it does not move with the other load on the machine.")
    return "\n".join(lines)


def problems(results: dict[str, Any]) -> str:
    lines = [f"- {row['label']}: {count:,} × `{text[:160]}`" for row in results["rows"]
             for text, count in row.get("log_warnings", {}).items()]
    return "\n".join(lines) or "- none logged."


def document(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    rel = os.path.relpath
    load = " / ".join(f"{value:.2f}" for value in m.get("load_before", ()))
    return f"""## Django views

One Django project ([`bench/_django_site.py`]({rel(ROOT / 'bench' / '_django_site.py', DOC.parent)}):
`startproject`'s middleware, a hello view, and a view that reads one `User` through the ORM on SQLite, Django's
defaults otherwise) served by crossroads (`[django]`, [django.md](django.md)) and by what a Django user runs
instead: gunicorn {m['gunicorn_venv']['gunicorn']} with {THREADS} sync workers, and Daphne
{m['channels_venv']['daphne']} + Channels {m['channels_venv']['channels']} (`ProtocolTypeRouter` around Django's
ASGI handler), all on Django {m['crossroads_venv']['Django']} (crossroads) and {m['gunicorn_venv']['Django']}
(gunicorn, Daphne).

Reproduce with `.venv/bin/python bench/django_views.py` (took {results['seconds'] / 60:.1f} min; `--quick` is a smoke
run that writes nothing). It installs wrk with apt-get if missing (as root), gunicorn and Django into
`.bench-venvs/gunicorn`, and Daphne into bench/web.py's Channels virtualenv. Raw figures:
[`bench/results/django.json`]({rel(RESULTS, DOC.parent)}).

**Machine**: {m['nproc']} cores, {m['cpu']}; Python {m['python']}; redis-server {m['redis_server']}; {m['wrk']};
crossroads at {m['commit']}; load average before the run {load}.

### Method

- **Servers**, each with the same parallelism: crossroads memory:// is `crossroads run` (the HTTP bridge and
  {THREADS} worker threads running `django_view`, one process); crossroads redis:// is `crossroads bridge web`
  and `crossroads worker` ({THREADS} threads); gunicorn runs {THREADS} sync worker processes (one request at a
  time each); Daphne is one process, running Django's sync views through `sync_to_async` on asgiref's thread
  pool. Every server process is pinned to core {SERVER_CORE} with `taskset -c` (redis-server is not pinned), wrk
  to core {CLIENT_CORE}: the same one core for every server. Access logs on for all (to a file).
- **Load**: wrk (1 thread, {HTTP_CONNECTIONS} connections, {cfg['wrk_seconds']} s after a 1 s warm-up run),
  {cfg['rounds']} rounds per server and view, interleaved server by server; the median round is reported. p50/p99
  are wrk's latencies at saturation (mostly queueing).

### Hello view (`GET /`)

{table(results, 'hello')}

### One ORM read (`GET /orm/`)

{table(results, 'orm')}

![django benchmark]({rel(CHART, DOC.parent)})

### Targets

{targets_markdown(targets(results))}

### Reading

{reading(results)}

### What the servers logged (warnings and errors, numbers replaced by N)

{problems(results)}
"""


def chart(results: dict[str, Any], path: Path) -> None:
    """Two panels, one bar per server: req/s of the hello view and of the ORM view."""
    plt, _ = pyplot()
    colors = {"crossroads": "#1f77b4", "gunicorn": "#2ca02c", "daphne": "#d62728"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, view in zip(axes, PATHS, strict=True):
        rows = results["rows"]
        values = [row[view]["req_per_s"] for row in rows]
        bars = ax.bar(range(len(rows)), values, color=[colors[row["system"]] for row in rows])
        for bar, row in zip(bars, rows, strict=True):
            if row["layer"] == "redis":
                bar.set_alpha(0.55)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8, padding=2)
        ax.set_xticks(range(len(rows)), [short_label(row) for row in rows], fontsize=8)
        ax.set_title(f"{'hello view' if view == 'hello' else 'one ORM read'}: req/s (higher is better)", fontsize=9.5)
        ax.set_ylim(top=(max(values) or 1) * 1.18)
    fig.suptitle("Django through crossroads vs gunicorn and Daphne (servers on one core, wrk on the other)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def short_label(row: dict[str, Any]) -> str:
    if row["system"] == "crossroads":
        return f"crossroads\n{row['layer']}://"
    return {"gunicorn": f"gunicorn\n{THREADS} sync workers", "daphne": "Daphne\n+ Channels 4"}[row["system"]]


def report(results: dict[str, Any]) -> None:
    print_blocks(table(results, "hello"), table(results, "orm"), targets_markdown(targets(results)),
                 reading(results), problems(results))


def main(argv: list[str] | None = None) -> int:
    return bench_main("django", argv, description=__doc__.split("\n\n")[0], run=lambda c: timed_run(run_all, c),
                      config=Config.make, report=report, doc=DOC, chart_path=CHART, chart=chart, document=document,
                      results_path=RESULTS)


if __name__ == "__main__":
    sys.exit(main())
