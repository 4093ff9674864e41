"""Memory per idle WebSocket on ``crossroads run`` (memory://), for one tree or several side by side.

Owns the quick figure behind docs/benchmarks.md's "Memory per idle WebSocket" (bench/web.py measures the
full one, 10,000 sockets beside Daphne): RSS of the ``crossroads run`` process before and after ``--count``
sockets open to an accepting consumer and stay idle, from one ``_web_load.py`` client. Each ``--tree`` is a
checkout with its own ``.venv`` (a ``git worktree`` of an older commit, say); rounds alternate between them
so the machine's load falls on each alike. With ``--trace``, each server also runs under tracemalloc and
the report adds what the open sockets allocated, per line of code, in bytes per socket::

    python bench/ws_idle.py --tree . --tree /tmp/pre-hardening --count 3000 --rounds 3
    python bench/ws_idle.py --trace --count 1000       # where the bytes go (RSS is then tracemalloc's too)
    python bench/ws_idle.py --shared                   # upgrades on the HTTP bridge's port, as `websocket =`

The consumer lives in a temporary folder on ``PYTHONPATH``, so every tree runs the same one, and ``bench``
itself is not imported by the server (an old tree has an old copy).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
LOAD = ROOT / "bench" / "_web_load.py"
SNAPSHOT = signal.SIGUSR2  # SIGUSR1 is crossroads' stack dump

APP = '''
from crossroads import route


def accept(message):
    message.reply_channel.send({"accept": True})


def ignore(message):
    pass


routes = [route("websocket.connect", accept), route("websocket.receive", ignore),
          route("websocket.disconnect", ignore)]
'''

# Runs `crossroads run`, under tracemalloc when WS_IDLE_TRACE names a file prefix: each SNAPSHOT signal
# writes the next snapshot (prefix-0.snap, prefix-1.snap, ...).
SERVER = '''
import os, signal, sys, tracemalloc
prefix = os.environ.get("WS_IDLE_TRACE")
if prefix:
    tracemalloc.start(12)
    taken = [0]
    def snapshot(signum, frame):
        tracemalloc.take_snapshot().dump(f"{prefix}-{taken[0]}.snap")
        taken[0] += 1
        print("snapshot", taken[0], file=sys.stderr, flush=True)
    signal.signal(signal.SIGUSR2, snapshot)
from crossroads.cli import main
sys.exit(main(["run", "--config", sys.argv[1]]))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(shared: bool, http_port: int, ws_port: int) -> str:
    if shared:  # the HTTP bridge's port splitter hands upgrades to the WebSocket bridge
        bridges = f'[bridges.web]\ntype = "http"\nport = {http_port}\nwebsocket = "sockets"\n\n' \
                  f'[bridges.sockets]\ntype = "websocket"\n'
    else:
        bridges = f'[bridges.sockets]\ntype = "websocket"\nport = {ws_port}\n'
    return f'[layer]\nurl = "memory://"\n\n[routing]\napp = "idle_app:routes"\n\n{bridges}'


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_ready(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with connect(url, open_timeout=2, compression=None):
                return
        except (OSError, TimeoutError, Exception):
            time.sleep(0.2)
    raise SystemExit(f"the server did not accept a WebSocket in 60 s:\n{log.read_text()[-3000:]}")


def snapshot(server: subprocess.Popen, path: Path) -> tracemalloc.Snapshot:
    server.send_signal(SNAPSHOT)
    deadline = time.monotonic() + 120
    while not path.exists() or path.stat().st_size == 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"no snapshot {path} within 120 s")
        time.sleep(0.2)
    time.sleep(0.5)  # dump() writes it in one go; give it time to finish
    return tracemalloc.Snapshot.load(str(path))


def one_round(tree: Path, count: int, shared: bool, trace: bool, work: Path) -> dict:
    http_port, ws_port = free_port(), free_port()
    (work / "crossroads.toml").write_text(config(shared, http_port, ws_port))
    env = {**os.environ, "PYTHONPATH": str(work)}
    prefix = work / "trace"
    if trace:
        env["WS_IDLE_TRACE"] = str(prefix)
    log = work / "server.log"
    python = tree / ".venv" / "bin" / "python"
    with open(log, "w") as out:
        server = subprocess.Popen([str(python), "-c", SERVER, str(work / "crossroads.toml")], cwd=work, env=env,
                                  stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    url = f"ws://127.0.0.1:{http_port if shared else ws_port}/idle/"
    try:
        wait_ready(url, server, log)
        time.sleep(0.5)
        before_snap = snapshot(server, Path(f"{prefix}-0.snap")) if trace else None
        before = rss(server.pid)
        spec = {"mode": "idle", "url": url, "count": count, "concurrency": 40}
        client = subprocess.Popen([sys.executable, str(LOAD), json.dumps(spec)], cwd=ROOT, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = json.loads(client.stdout.readline() or "{}")
        if ready.get("ready") != count:
            client.kill()
            raise SystemExit(f"opened {ready} of {count}: {client.stderr.read()[-2000:]}")
        time.sleep(1.0)  # handshake buffers freed, timers armed
        after = rss(server.pid)
        after_snap = snapshot(server, Path(f"{prefix}-1.snap")) if trace else None
        out, _ = client.communicate("", timeout=120)
        held = json.loads(out.splitlines()[-1])
        if held["closed_by_server"]:
            raise SystemExit(f"the server closed {held['closed_by_server']} idle sockets")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    result = {"kib_per_socket": (after - before) / count / 1024, "rss_before_mib": before / 2**20}
    if trace:
        result["trace"] = (before_snap, after_snap)
    return result


def print_trace(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, count: int, top: int) -> None:
    """What the open sockets allocated, by line and by the traceback's ours-or-Autobahn's frames."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>")]
    before, after = before.filter_traces(ignore), after.filter_traces(ignore)
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    print(f"  tracemalloc: {grown / count:,.0f} bytes per socket in Python objects")
    for stat in after.compare_to(before, "lineno")[:top]:
        frame = stat.traceback[0]
        where = f"{'/'.join(Path(frame.filename).parts[-3:])}:{frame.lineno}"
        print(f"  {stat.size_diff / count:8.0f} B  {stat.count_diff / count:6.2f} blocks  {where}")
    print("  by traceback (the innermost frames of crossroads, Autobahn or Twisted that led there):")
    for stat in after.compare_to(before, "traceback")[:top]:
        frames = [f for f in reversed(stat.traceback) if "crossroads" in f.filename or "/wsmem" in f.filename
                  or "autobahn" in f.filename or "twisted" in f.filename][:3]
        shown = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames) or \
            f"{Path(stat.traceback[0].filename).name}:{stat.traceback[0].lineno}"
        print(f"  {stat.size_diff / count:8.0f} B  {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", action="append", type=Path, help="a checkout with its own .venv (repeatable)")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shared", action="store_true", help="the WebSocket bridge on the HTTP bridge's port")
    parser.add_argument("--trace", action="store_true", help="run under tracemalloc; show where the bytes go")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.tree or [ROOT]]
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}; "
          f"{args.count} idle sockets, {'shared port' if args.shared else 'own port'}")
    figures: dict[Path, list[float]] = {tree: [] for tree in trees}
    for n in range(args.rounds):
        for tree in trees:
            with tempfile.TemporaryDirectory(prefix="ws-idle-") as folder:
                work = Path(folder)
                (work / "idle_app.py").write_text(APP)
                got = one_round(tree, args.count, args.shared, args.trace, work)
            figures[tree].append(got["kib_per_socket"])
            print(f"round {n + 1}: {got['kib_per_socket']:5.2f} KiB per socket (RSS before "
                  f"{got['rss_before_mib']:.1f} MiB)  {tree}", flush=True)
            if args.trace:
                print_trace(*got["trace"], args.count, args.top)
    for tree, kib in figures.items():
        print(f"median {statistics.median(kib):5.2f} KiB per socket (min {min(kib):.2f}, max {max(kib):.2f})  {tree}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
