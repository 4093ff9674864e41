"""The worker: receives from the layer and runs consumers, in N threads, until told to stop.

Owns threads, the event loop for ``async def`` consumers, channel selection and
shutdown. Running one message (routing, buffering, exceptions) belongs to
``dispatch.py``; the worker must not re-implement it.

Threads block in the layer's receive (no polling) and take several messages
of one channel per receive: as many as they have been running in ``HOLD``
seconds, at most ``MAX_BATCH``. Fast consumers then cost one round trip to
Redis per burst (four times fewer than a fixed 16 cost the MQTT benchmark's
worker), while slow ones are taken one at a time, so no thread sits on
messages another thread is free to run. A thread runs its messages in the
order the channel held them. To
stop them promptly, each thread has a private process queue on the layer,
which it also listens on; ``stop()`` sends one wake-up to each. Each thread
finishes the messages in hand (they have left the layer), then exits.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import signal
import string
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from crossroads.layer import base

from .dispatch import Dispatcher

log = logging.getLogger("crossroads.worker")

FALLBACK_TIMEOUT = 5.0  # a receive returns at least this often, in case a wake-up cannot be sent
HOLD = 0.005  # seconds of work a thread takes per receive, judged by how long its recent messages took
MAX_BATCH = 64  # messages a thread takes per receive, at most


def select_channels(channels: Iterable[str], only: Iterable[str] | None = (), exclude: Iterable[str] = ()) -> list[str]:
    """The channels to listen on: ``only`` patterns keep, ``exclude`` patterns drop.

    Patterns are the layer's: ``*`` is the only wildcard (``?`` and ``!`` are name characters).
    """
    keep = [re.compile(base.glob_to_regex(p)) for p in only or ()]
    drop = [re.compile(base.glob_to_regex(p)) for p in exclude]
    chosen = [c for c in sorted(channels) if not keep or any(r.match(c) for r in keep)]
    return [c for c in chosen if not any(r.match(c) for r in drop)]


class Worker:
    """Runs the consumers of ``router`` for messages on ``channel_layer``."""

    def __init__(self, router: Any, channel_layer: Any, threads: int = 4,
                 only_channels: Iterable[str] | None = (), exclude_channels: Iterable[str] = ()) -> None:
        if threads < 1:
            raise ValueError(f"a worker needs at least one thread, got {threads}")
        self.dispatcher = Dispatcher(router, channel_layer)
        self.sync = self.dispatcher.sync
        self.threads = threads
        self.channels = select_channels(self.dispatcher.router.channels, only_channels, exclude_channels)
        if not self.channels:
            raise ValueError("no channels to listen on: the routing table is empty, or --only-channels/"
                             "--exclude-channels left nothing (routed: "
                             f"{', '.join(sorted(self.dispatcher.router.channels)) or 'none'})")
        token = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
        self.controls = [f"crossroads.worker.{token}.{i}!" for i in range(threads)]  # one wake-up queue a thread
        self._stopping = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._workers: list[threading.Thread] = []
        self._loop_thread: threading.Thread | None = None  # None until start()
        self.ready = threading.Event()

    def start(self) -> None:
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="worker-async", daemon=True)
        self._loop_thread.start()
        for i in range(self.threads):
            thread = threading.Thread(target=self._serve, args=(self.controls[i],), name=f"worker-{i}", daemon=True)
            thread.start()
            self._workers.append(thread)
        log.info("worker listening on %s with %d thread(s)", ", ".join(self.channels), self.threads)
        self.ready.set()

    def stop(self) -> None:
        """Ask every thread to finish the message in hand and exit (safe from signal handlers)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            self.sync.send_many([(control + "stop", {}) for control in self.controls])
        except Exception as exc:  # the fallback timeout still ends each thread
            log.warning("could not wake worker threads (%s); they stop within %.0fs", exc, FALLBACK_TIMEOUT)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the threads; True when all have finished."""
        for thread in self._workers:
            thread.join(timeout)
        finished = not any(thread.is_alive() for thread in self._workers)
        if finished and not self._loop.is_closed():
            if self._loop_thread is None:  # never started (a bridge of its process failed to start first)
                self._loop.close()
                return True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout)
            if not self._loop.is_running():
                self._loop.close()
        return finished

    def run(self, on_ready: Callable[[], Any] | None = None, on_stopping: Callable[[], Any] | None = None) -> None:
        """Start, stop on SIGTERM or SIGINT, and return once every thread has finished.

        ``on_ready`` is called once serving and ``on_stopping`` once a stop begins
        (the daemon tells systemd through them).
        """
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self._on_signal(signum))
        self.start()
        if on_ready:
            on_ready()
        while not self._stopping.wait(1.0):  # a timed wait keeps the main thread responsive to signals
            pass
        if on_stopping:
            on_stopping()
        self.join()
        log.info("worker stopped: %s", self.summary())

    def _on_signal(self, signum: int) -> None:
        log.info("worker received %s: finishing the messages in hand", signal.Signals(signum).name)
        threading.Thread(target=self.stop, daemon=True).start()  # stop() does I/O: not in the handler

    def summary(self) -> str:
        c = self.dispatcher.counters
        return (f"{c.consumed} consumed, {c.errors} consumer errors, {c.unrouted} unrouted, "
                f"{c.requeued} requeued, {c.gave_up} given up, {c.undelivered} sends undelivered")

    def _serve(self, control: str) -> None:
        listen = [*self.channels, control]
        batch, per_message = 1, HOLD  # nothing is known of the consumers yet: one message at first
        while not self._stopping.is_set():
            taken = self.sync.receive_many(listen, batch, timeout=FALLBACK_TIMEOUT)
            started = time.perf_counter()
            for channel, content in taken:
                if not channel.startswith(control):
                    self._run(channel, content)
            if taken:  # a moving average, so one slow message does not make the next batches tiny
                per_message = 0.7 * per_message + 0.3 * (time.perf_counter() - started) / len(taken)
                batch = max(1, min(MAX_BATCH, int(HOLD / max(per_message, 1e-9))))

    def _run(self, channel: str, content: dict) -> None:
        prepared = self.dispatcher.prepare(channel, content)
        if prepared is None:
            return
        if self.dispatcher.is_async(prepared[0]):
            asyncio.run_coroutine_threadsafe(self.dispatcher.handle_async(*prepared), self._loop).result()
        else:
            self.dispatcher.run(*prepared)
