"""The worker: receives from the layer and runs consumers, in pools of threads, until told to stop.

Owns threads, the event loop for ``async def`` consumers, channel selection, the
pools that give chosen channels threads of their own, the watchdog that reports
slow consumers, and shutdown. Running one message (routing, buffering,
exceptions) belongs to ``dispatch.py``; the worker must not re-implement it.

Threads block in the layer's receive (no polling), one thread of a pool at a
time: it holds the pool's turn while it waits and gives it up as soon as the
receive returns, before running what it took, so the next thread waits in the
layer while it runs. Were all of them waiting, each burst a bridge sends would
be split between them, and they would take the GIL from one another (A/B,
bench/worker.py's redis:// 4 threads, 64 in flight: 36.3 -> 32.6 µs of worker
CPU per round trip). A slow consumer holds only its own thread. A thread
takes several messages of one channel per receive: as many as they have been running in ``HOLD``
seconds, at most ``prefetch`` (``PREFETCH``, 64, by default). Fast consumers
then cost one round trip to Redis per burst (four times fewer than a fixed 16
cost the MQTT benchmark's worker), while slow ones are taken one at a time, so
no thread sits on messages another thread is free to run. A thread runs its
messages in the order the channel held them. What a thread took has left the
layer: a worker killed (SIGKILL, OOM) loses it, up to ``prefetch`` messages a
thread, which is why ``prefetch`` is an option (1 takes one at a time).
What the consumers of one batch send (their buffered sends) leaves together
when the batch is done, one ``send_many`` for the lot (``Dispatcher.holding``):
a burst of HTTP requests costs one reply round trip, not one each. Only a
consumer whose last run took under ``HOLD`` runs while sends are held; before
any other (new, slow last time, or ``async def``) what is held is sent, so a
slow message does not delay the replies of the quick ones taken with it. A
quick consumer that suddenly runs long still does, as it delays the messages
after it.

Pools: a thread serves the channels of one pool, so a consumer that blocks
(a slow route) can hold only its own pool's threads; channels no pool names
go to the default pool. Threads cannot be interrupted, so a consumer running
past ``slow_consumer`` seconds is only reported: once per message, with its
thread's stack, by one watchdog thread that wakes once per tick and looks at
one slot per thread.

To stop promptly, each thread has a private process queue on the layer,
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
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from crossroads.layer import base

from .channel import release_held
from .dispatch import Dispatcher, consumer_name

log = logging.getLogger("crossroads.worker")

FALLBACK_TIMEOUT = 5.0  # a receive returns at least this often, in case a wake-up cannot be sent
HOLD = 0.005  # seconds of work a thread takes per receive, judged by how long its recent messages took
PREFETCH = 64  # messages a thread takes per receive, at most, by default (bench/worker.py measured it)
SLOW_CONSUMER = 10.0  # seconds a consumer may run on one message before it is reported
DEFAULT_POOL = "default"


class Pool(NamedTuple):
    """Channel patterns served by ``threads`` threads of their own."""

    channels: tuple[str, ...]
    threads: int


# What one thread runs now, in its slot (read by the watchdog): (channel, consumer, coroutine, started), set before a
# consumer starts and cleared after. A tuple, not an object with an __init__, as one is made per message.
# ``coroutine`` is an ``async def`` consumer's (its stack is in the coroutine, not the thread), else None;
# ``started`` is time.monotonic().
_Running = tuple[str, Any, Any, float]


def select_channels(channels: Iterable[str], only: Iterable[str] | None = (), exclude: Iterable[str] = ()) -> list[str]:
    """The channels to listen on: ``only`` patterns keep, ``exclude`` patterns drop.

    Patterns are the layer's: ``*`` is the only wildcard (``?`` and ``!`` are name characters).
    """
    keep = [re.compile(base.glob_to_regex(p)) for p in only or ()]
    drop = [re.compile(base.glob_to_regex(p)) for p in exclude]
    chosen = [c for c in sorted(channels) if not keep or any(r.match(c) for r in keep)]
    return [c for c in chosen if not any(r.match(c) for r in drop)]


def assign_pools(channels: list[str], pools: Mapping[str, Pool], threads: int) -> dict[str, tuple[list[str], int]]:
    """Each pool's channels among ``channels`` and its threads; the default pool gets what no pool names.

    A channel two pools' patterns match is a ``ValueError``; a pool none of whose patterns matches a
    channel served here gets nothing (another process may serve its channels).
    """
    if DEFAULT_POOL in pools:
        raise ValueError(f'a pool may not be named "{DEFAULT_POOL}": the default pool is the channels no pool names, '
                         "served by [worker] threads")
    matchers = {name: [re.compile(base.glob_to_regex(p)) for p in pool.channels] for name, pool in pools.items()}
    assigned: dict[str, tuple[list[str], int]] = {name: ([], pool.threads) for name, pool in pools.items()}
    default: list[str] = []
    for channel in channels:
        owners = [name for name, patterns in matchers.items() if any(r.match(channel) for r in patterns)]
        if len(owners) > 1:
            raise ValueError(f"the channel {channel} is in pools {' and '.join(owners)}: a channel is served by one "
                             "pool, so its threads are known; narrow the patterns of [worker] pools")
        (assigned[owners[0]][0] if owners else default).append(channel)
    if default:
        assigned[DEFAULT_POOL] = (default, threads)
    return assigned


def coroutine_stack(coroutine: Any) -> str:
    """Where a suspended coroutine waits: each awaiting frame, outermost first (a thread's stack would show
    only the worker thread waiting for the event loop)."""
    lines: list[str] = []
    while coroutine is not None:
        if hasattr(coroutine, "get_coro"):  # an awaited Task: follow its coroutine
            coroutine = coroutine.get_coro()
        frame = getattr(coroutine, "cr_frame", None) or getattr(coroutine, "gi_frame", None)
        if frame is None:
            break
        lines += traceback.format_stack(frame, limit=1)
        coroutine = getattr(coroutine, "cr_await", None) or getattr(coroutine, "gi_yieldfrom", None)
    return "".join(lines) or "  (not running: finished or not started yet)\n"


class Worker:
    """Runs the consumers of ``router`` for messages on ``channel_layer``.

    ``threads`` serve the channels no pool of ``pools`` (name -> ``Pool(channel patterns, threads)``)
    names; ``prefetch`` bounds the messages a thread takes per receive; a consumer running longer than
    ``slow_consumer`` seconds on one message is logged with its stack and counted (``None`` or 0: never).
    """

    def __init__(self, router: Any, channel_layer: Any, threads: int = 4,
                 only_channels: Iterable[str] | None = (), exclude_channels: Iterable[str] = (),
                 pools: Mapping[str, Pool | tuple[Iterable[str], int]] | None = None, prefetch: int = PREFETCH,
                 slow_consumer: float | None = SLOW_CONSUMER) -> None:
        pools = {name: Pool(tuple(channels), pool_threads) for name, (channels, pool_threads) in (pools or {}).items()}
        for name, pool in [(DEFAULT_POOL, Pool((), threads)), *pools.items()]:
            if pool.threads < 1:
                raise ValueError(f"a worker pool needs at least one thread, got {pool.threads} for pool {name}")
        if prefetch < 1:
            raise ValueError(f"prefetch is the most messages a thread takes per receive: at least 1, got {prefetch}")
        if slow_consumer is not None and slow_consumer < 0:
            raise ValueError(f"slow_consumer is a number of seconds (0: never report), got {slow_consumer}")
        self.dispatcher = Dispatcher(router, channel_layer)
        self.sync = self.dispatcher.sync
        self.prefetch = prefetch
        # Did each consumer's last run take under HOLD? Only those run while earlier messages' sends are held.
        self._quick: dict[Any, bool] = {}
        self.slow_consumer = slow_consumer or None
        self.channels = select_channels(self.dispatcher.router.channels, only_channels, exclude_channels)
        if not self.channels:
            raise ValueError("no channels to listen on: the routing table is empty, or --only-channels/"
                             "--exclude-channels left nothing (routed: "
                             f"{', '.join(sorted(self.dispatcher.router.channels)) or 'none'})")
        self.pools = assign_pools(self.channels, pools, threads)  # name -> (channels, threads)
        self.idle_pools = [name for name, (channels, _) in self.pools.items() if not channels]
        for name in self.idle_pools:
            del self.pools[name]
        # One (pool, channels) per thread, in pool order.
        self._plan = [(name, channels) for name, (channels, count) in self.pools.items() for _ in range(count)]
        self.threads = len(self._plan)
        token = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
        self.controls = [f"crossroads.worker.{token}.{i}!" for i in range(self.threads)]  # one wake-up queue a thread
        self._stopping = threading.Event()
        self._finished = threading.Event()  # every thread has exited: the watchdog may stop too
        self._loop = asyncio.new_event_loop()
        self._workers: list[threading.Thread] = []
        self._running: list[_Running | None] = [None] * self.threads  # each thread's slot, for the watchdog
        self._reported: dict[int, _Running] = {}  # id -> slot of the runs reported slow, while they run
        self._loop_thread: threading.Thread | None = None  # None until start()
        self._watchdog: threading.Thread | None = None  # None when slow_consumer is 0, or before start()
        self.watchdog_scans = 0  # how many times the watchdog looked (tests wait on it instead of sleeping)
        self.ready = threading.Event()

    def start(self) -> None:
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="worker-async", daemon=True)
        self._loop_thread.start()
        turns = {name: threading.Lock() for name in self.pools}  # a pool's threads take turns to receive
        for i, (pool, channels) in enumerate(self._plan):
            name = f"worker-{i}" if pool == DEFAULT_POOL else f"worker-{pool}-{i}"
            thread = threading.Thread(target=self._serve, args=(i, channels, turns[pool]), name=name, daemon=True)
            thread.start()
            self._workers.append(thread)
        if self.slow_consumer:
            self._watchdog = threading.Thread(target=self._watch, name="worker-watchdog", daemon=True)
            self._watchdog.start()
        if list(self.pools) == [DEFAULT_POOL]:
            log.info("worker listening on %s with %d thread(s)", ", ".join(self.channels), self.threads)
        else:
            for name, (channels, count) in self.pools.items():
                log.info("worker pool %s listening on %s with %d thread(s)", name, ", ".join(channels), count)
        for name in self.idle_pools:
            log.info("worker pool %s has none of its channels here (routed and selected: %s): no threads", name,
                     ", ".join(self.channels))
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
        if finished:
            self._finished.set()
            if self._watchdog is not None:  # a joined worker leaves no thread of its own behind
                self._watchdog.join(timeout)
        if finished and not self._loop.is_closed():
            if self._loop_thread is None:  # never started (a bridge of its process failed to start first)
                self._loop.close()
                return True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout)
            if not self._loop.is_running():
                self._loop.close()
        return finished

    def run(self, on_ready: Callable[[], Any] | None = None, on_stopping: Callable[[], Any] | None = None,
            on_tick: Callable[[], Any] | None = None, tick: float = 1.0) -> None:
        """Start, stop on SIGTERM or SIGINT, and return once every thread has finished.

        ``on_ready`` is called once serving and ``on_stopping`` once a stop begins
        (the daemon tells systemd through them); ``on_tick`` every ``tick`` seconds
        while serving (the daemon's systemd watchdog).
        """
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self._on_signal(signum))
        self.start()
        if on_ready:
            on_ready()
        while not self._stopping.wait(tick):  # a timed wait keeps the main thread responsive to signals
            if on_tick:
                on_tick()
        if on_stopping:
            on_stopping()
        self.join()
        log.info("worker stopped: %s", self.summary())

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def thread_report(self) -> list[tuple[str, int, int]]:
        """(pool, threads, threads running a consumer now) for each pool, for the metrics."""
        running = list(self._running)
        report = []
        first = 0
        for name, (_, count) in self.pools.items():
            report.append((name, count, sum(slot is not None for slot in running[first:first + count])))
            first += count
        return report

    def stuck(self, limit: float | None, loop_timeout: float = 5.0) -> str | None:
        """Why this worker is hung, or None: every thread dead or on one message for more than ``limit`` seconds
        (None: never judged stuck), or the event loop of ``async def`` consumers not answering. A busy worker,
        where any thread still moves on, is not stuck."""
        if self._loop_thread is not None:
            if not self._loop_thread.is_alive():
                return "the event loop of async consumers has stopped"
            try:
                asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self._loop).result(loop_timeout)
            except Exception:
                return f"the event loop of async consumers did not answer within {loop_timeout:g} s"
        if not limit or not self._workers:
            return None
        now = time.monotonic()
        for thread, running in zip(self._workers, list(self._running), strict=False):
            if thread.is_alive() and (running is None or now - running[3] <= limit):
                return None
        return (f"all {self.threads} worker thread(s) have been on one message for more than {limit:g} s "
                "([worker] stuck_after), or have died")

    def _on_signal(self, signum: int) -> None:
        log.info("worker received %s: finishing the messages in hand", signal.Signals(signum).name)
        threading.Thread(target=self.stop, daemon=True).start()  # stop() does I/O: not in the handler

    def summary(self) -> str:
        c = self.dispatcher.counters
        return (f"{c.consumed} consumed, {c.errors} consumer errors, {c.unrouted} unrouted, "
                f"{c.requeued} requeued, {c.gave_up} given up, {c.undelivered} sends undelivered, "
                f"{c.slow} slow consumers reported, {c.invalid} invalid dropped")

    def _serve(self, index: int, channels: list[str], turn: threading.Lock) -> None:
        control = self.controls[index]
        listen = [*channels, control]
        batch, per_message = 1, HOLD  # nothing is known of the consumers yet: one message at first
        while not self._stopping.is_set():
            with turn:  # one thread of the pool waits in the layer at a time (see the module doc)
                if self._stopping.is_set():
                    break
                taken = self.sync.receive_many(listen, batch, timeout=FALLBACK_TIMEOUT)
            started = time.perf_counter()
            with self.dispatcher.holding():  # the batch's replies leave together: one send_many, not one each
                for channel, content in taken:
                    if not channel.startswith(control):
                        self._run(index, channel, content)
            if taken:  # a moving average, so one slow message does not make the next batches tiny
                per_message = 0.7 * per_message + 0.3 * (time.perf_counter() - started) / len(taken)
                batch = max(1, min(self.prefetch, int(HOLD / max(per_message, 1e-9))))

    def _run(self, index: int, channel: str, content: dict) -> None:
        prepared = self.dispatcher.prepare(channel, content)
        if prepared is None:
            return
        consumer = prepared[0]
        try:
            quick = self._quick.get(consumer, False)  # only sync consumers are in it: one lookup, not two
        except TypeError:  # an unhashable callable: never known to be quick
            quick = False
        try:
            if not quick and self.dispatcher.is_async(consumer):
                release_held()  # it sends from the event loop's thread: what earlier messages sent goes first
                coroutine = self.dispatcher.handle_async(*prepared)
                self._running[index] = (channel, consumer, coroutine, time.monotonic())
                asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()
            else:
                if not quick:
                    release_held()  # it may run long: the replies of the messages before it should not wait
                self._running[index] = (channel, consumer, None, time.monotonic())
                seconds = self.dispatcher.run(*prepared)
                try:  # the last run decides, so one run slowed by a busy machine does not end the batching for good
                    self._quick[consumer] = seconds < HOLD
                except TypeError:
                    pass
        finally:
            self._running[index] = None

    # -- the slow consumer report --

    def _watch(self) -> None:
        # A tick of a quarter of the threshold reports a consumer between 1 and 1.25 times it; when nothing is
        # slow a tick costs one look at each thread's slot.
        tick = min(1.0, self.slow_consumer / 4)
        while not self._finished.wait(tick):
            self.report_slow()
            self.watchdog_scans += 1

    def report_slow(self) -> int:
        """Log (once per message) and count every consumer running past ``slow_consumer``; how many were new."""
        now = time.monotonic()
        frames: dict[int, Any] | None = None
        running_now = list(self._running)
        # Only runs still in a slot stay reported; an id kept is still its slot's own, as the dict keeps it alive.
        already = {id(slot): slot for slot in running_now if slot is not None and id(slot) in self._reported}
        self._reported = already
        reported = 0
        for thread, running in zip(self._workers, running_now, strict=False):
            if running is None or id(running) in already or now - running[3] < self.slow_consumer:
                continue
            already[id(running)] = running
            channel, consumer, coroutine, started = running
            reported += 1
            self.dispatcher.counters.slow += 1
            if coroutine is not None:
                where, stack = "the coroutine", coroutine_stack(coroutine)
            else:
                if frames is None:
                    frames = sys._current_frames()
                frame = frames.get(thread.ident) if thread.ident is not None else None
                where = f"thread {thread.name}"
                stack = "".join(traceback.format_stack(frame)) if frame is not None else "  (thread gone)\n"
            log.warning("slow consumer: %s has been running for %.1fs on a message on %s (more than [worker] "
                        "slow_consumer = %gs); it holds a thread of its pool until it returns. Reported once per "
                        "message and counted. The stack of %s:\n%s", consumer_name(consumer),
                        now - started, channel, self.slow_consumer, where, stack.rstrip("\n"))
        return reported
