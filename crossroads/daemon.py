"""What a crossroads daemon does for its supervisor: log lines journald understands, and sd_notify.

Owns the process-level plumbing shared by ``crossroads run``, ``worker`` and
``bridge``; it knows nothing about bridges or consumers.

- Logs go to stderr, one line per event. Under systemd (``$JOURNAL_STREAM`` is
  set) each line starts with a ``<N>`` syslog priority, which journald turns
  into the entry's level; elsewhere lines carry a timestamp and the level name.
- ``notify("READY=1")`` tells systemd (``Type=notify``) the daemon is serving;
  ``STOPPING=1`` that it is draining. Without ``$NOTIFY_SOCKET`` it does nothing.
- ``watchdog_interval()`` is how often to send ``WATCHDOG=1`` when the unit has ``WatchdogSec=``
  (systemd sets ``$WATCHDOG_USEC``): half of it, as sd_watchdog_enabled(3) advises. Who pings, and
  on what condition, is the daemon's: the pings must stop when the process hangs.
- ``raise_open_files_limit()`` raises the soft ``RLIMIT_NOFILE`` to the hard one at start, as Go's
  runtime does: a listening bridge holds a descriptor per peer (two per proxied WebSocket), and the
  soft default of 1,024 for a user's shell is far below what the hard limit allows.
- ``tune_gc()`` makes the cyclic garbage collector's older generations collect 25 times less often:
  its full passes over a daemon's heap were its tail latency (see the function).
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import socket
import sys
import time

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """``<N>name: message``, with any traceback folded onto the same entry."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", "\n  ")
        return f"<{_PRIORITY.get(record.levelno, 6)}>{text}"


class StampedFormatter(logging.Formatter):
    """The standard formatter, its time stamp made once per second: the lines of one second share it (with an
    access log line per HTTP request, strftime was a few per cent of serving one)."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        second, stamp = self._second  # one tuple, so a thread never pairs one second with another's stamp
        if second != int(record.created):
            second = int(record.created)
            stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = (second, stamp)
        return self.default_msec_format % (stamp, record.msecs)


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(StampedFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd's notify socket; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as exc:
            logging.getLogger("crossroads").warning("could not notify systemd at %s: %s", address, exc)
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when systemd watches nothing (or watches another pid)."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():  # meant for a parent that exec'd us differently
        return None
    return int(usec) / 2e6


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one; (the limit now, what it was). An unlimited hard
    limit is left alone, as Go leaves it: Linux refuses to set it, and a huge soft one slows programs that
    walk every descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # a sandbox that forbids it: run with what we have
        return soft, soft
    return hard, soft


# Python's defaults are (700, 10, 10): a generation-1 pass every 10 young ones, a full pass every 10 of those.
# Under load a daemon allocates fast and keeps a large heap (Twisted, Autobahn, the bridges), so full passes
# came often and each stalled every connection: crossroads run, HTTP hello under wrk -c50 on one core, p99
# 92-103 ms with the defaults, 8-12 ms with (700, 50, 50), the same with the collector off (p90 unchanged,
# ~7-9 ms). Young objects are still collected as often; cyclic garbage that survives lives a little longer.
GC_THRESHOLDS = (700, 50, 50)


def tune_gc() -> tuple[int, int, int]:
    """Set the collector's thresholds to ``GC_THRESHOLDS``; return what they were."""
    was = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    return was
