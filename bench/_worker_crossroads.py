"""crossroads' side of ``bench/worker.py``: the echo consumer, a bridge-like sender, the worker process, and
the timing of one message through the dispatcher against the same work done by hand.

Imported by ``bench/worker.py`` (memory:// in one process, the sender for redis://, the overhead
timing), and run as the worker process for redis://::

    python bench/_worker_crossroads.py serve redis://127.0.0.1:PORT/0 THREADS [PREFETCH] [--metrics]

which prints ``{"ready": true}`` once its threads listen (with ``--metrics``, also the port its /metrics
listens on), serves until its standard input closes, then prints its counters as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from _worker_load import REQUEST_CHANNEL, Recorder, now_ns, process_cpu, request

from crossroads import layer, route
from crossroads.consumers.dispatch import Dispatcher
from crossroads.consumers.worker import PREFETCH, Worker

PROCESS_QUEUE = "bench.bridge!"  # the sender's one receive queue, like a bridge process's
FIRST_REPLY_TIMEOUT = 60.0  # the worker may still be starting
REPLY_TIMEOUT = 30.0


def echo(message: Any) -> None:
    message.reply_channel.send({"text": message.text})


routes = [route(REQUEST_CHANNEL, echo)]


async def drive(channel_layer: Any, window: int, warmup: float, seconds: float, windows: int,
                cpu: Any = None) -> dict[str, Any]:
    """Keep ``window`` requests in flight through ``channel_layer``'s async face, as a bridge does.

    Each of ``window`` connections sends a request and waits for its reply; one receive loop
    on the process queue hands replies to connections by their reply channel's local part.
    Latency is from just before the send to the reply's arrival in the receive loop. ``cpu``: see
    ``Recorder``.
    """
    loop = asyncio.get_running_loop()
    recorder = Recorder(warmup, seconds, windows, cpu)
    waiting: dict[str, asyncio.Future] = {}
    sent_at: dict[str, int] = {}

    async def connection(name: str) -> None:
        while not recorder.stopping:
            waiting[name] = reply = loop.create_future()  # registered before the send: see receive_loop
            sent_at[name] = now_ns()
            await channel_layer.send(REQUEST_CHANNEL, request(name))
            await reply

    async def receive_loop() -> None:
        timeout = FIRST_REPLY_TIMEOUT
        # Ends when stopping with nothing in flight: every connection then sees ``stopping`` before it sends again.
        while waiting or not recorder.stopping:
            got = await channel_layer.receive_many([PROCESS_QUEUE], window, timeout=timeout)
            now = now_ns()
            if not got:
                raise RuntimeError(f"no reply within {timeout:g} s with {len(waiting)} request(s) in flight")
            timeout = REPLY_TIMEOUT
            for channel, _content in got:
                recorder.done(now - sent_at[channel], now)
                waiting.pop(channel).set_result(None)

    connections = [asyncio.ensure_future(connection(f"{PROCESS_QUEUE}{i}")) for i in range(window)]
    try:
        await receive_loop()
        await asyncio.gather(*connections)
    finally:
        for task in connections:
            task.cancel()
    return recorder.result()


def run_in_process(url: str, threads: int, window: int, warmup: float, seconds: float, windows: int,
                   prefetch: int = PREFETCH) -> dict[str, Any]:
    """Worker threads (blocking face) and the sender (async face, on this thread's loop) on one layer."""
    channel_layer = layer.from_url(url)
    worker = Worker(routes, channel_layer, threads=threads, prefetch=prefetch)
    worker.start()
    try:
        # The sender is this thread; the rest of the process is the worker (its threads and its loop).
        def cpu() -> dict[str, float]:
            return {"sender": time.thread_time(), "process": time.process_time()}

        result = asyncio.run(drive(channel_layer, window, warmup, seconds, windows, cpu))
    finally:
        worker.stop()
        worker.join(10)
    return {**result, "worker": counters(worker)}


def counters(worker: Worker) -> dict[str, Any]:
    c = worker.dispatcher.counters
    return {"consumed": c.consumed, "errors": c.errors, "unrouted": c.unrouted, "undelivered": c.undelivered}


def run_sender(url: str, window: int, warmup: float, seconds: float, windows: int,
               pids: dict[str, int]) -> dict[str, Any]:
    """The sender alone (this process), against a worker in another process; ``pids``: other processes
    whose CPU time to report (the worker, redis-server)."""
    channel_layer = layer.from_url(url)

    def cpu() -> dict[str, float]:
        return {"sender": time.process_time(), **{name: process_cpu(pid) for name, pid in pids.items()}}

    async def main() -> dict[str, Any]:
        try:
            return await drive(channel_layer, window, warmup, seconds, windows, cpu)
        finally:
            await channel_layer.close()

    return asyncio.run(main())


# -- the framework's cost per message --

REPLY = f"{PROCESS_QUEUE}1"


def bare(content: dict) -> dict:
    """The consumer's own work with no layer at all: read the text, build the reply."""
    return {"text": content.get("text")}


def time_overhead(batches: int, per_batch: int) -> dict[str, list[float]]:
    """ns per message of each way to handle one request, batch by batch, the ways interleaved.

    - ``handle``: ``Dispatcher.handle(channel, content)``: route, build the Message, run ``echo``
      with its send buffered, flush the buffer with ``send_many``;
    - ``direct``: the same reply sent by hand with ``layer.sync.send``, no framework;
    - ``bare``: the consumer's own work alone (read the text, build the reply), no send.

    Every way gets a fresh dict per message, made in the timed loop, as a worker gets one fresh
    from the layer; the reply queue is emptied between batches. Batches are small so that what
    the loop keeps alive stays small: a large backlog would make the garbage collector's full
    collections, not the code under test, the bulk of the time.
    """
    channel_layer = layer.from_url("memory://", capacity=per_batch + 1)
    sync = channel_layer.sync
    dispatcher = Dispatcher(routes, channel_layer)
    template = request(REPLY)
    times: dict[str, list[float]] = {"handle": [], "direct": [], "bare": []}

    def handle(content: dict) -> None:
        dispatcher.handle(REQUEST_CHANNEL, content)

    def direct(content: dict) -> None:  # what ``echo`` does, written against the layer by hand
        sync.send(content["reply_channel"], {"text": content.get("text")})

    ways = {"handle": handle, "direct": direct, "bare": bare}
    for _ in range(batches):
        for name, call in ways.items():
            start = time.perf_counter_ns()
            for _ in range(per_batch):
                call(dict(template))
            times[name].append((time.perf_counter_ns() - start) / per_batch)
            sync.flush()
    if dispatcher.counters.consumed != batches * per_batch or dispatcher.counters.undelivered:
        raise RuntimeError(f"dispatcher counters are off: {dispatcher.counters}")
    return times


def serve(url: str, threads: int, prefetch: int = PREFETCH, metrics: bool = False) -> None:
    """The worker process for redis://; with ``metrics``, serving /metrics as ``crossroads worker`` does."""
    channel_layer = layer.from_url(url)
    worker = Worker(routes, channel_layer, threads=threads, prefetch=prefetch)
    worker.start()
    ready: dict[str, Any] = {"ready": True}
    if metrics:
        from crossroads.metrics import LayerCollector, MetricsServer, WorkerCollector, readiness

        server = MetricsServer("127.0.0.1:0", "worker", lambda: (True, {"alive": True}),
                               lambda: readiness([], worker))
        server.register(WorkerCollector(worker))
        server.register(LayerCollector(channel_layer))
        server.start()
        ready["metrics_port"] = server.port
    print(json.dumps(ready), flush=True)
    sys.stdin.read()  # the benchmark closes our standard input when it is done
    worker.stop()
    finished = worker.join(10)
    print(json.dumps({"finished": finished, **counters(worker)}), flush=True)


if __name__ == "__main__":
    flags = [arg for arg in sys.argv[1:] if arg.startswith("--")]
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    if len(args) not in (3, 4) or args[0] != "serve" or set(flags) - {"--metrics"}:
        sys.exit(f"usage: {sys.argv[0]} serve REDIS_URL THREADS [PREFETCH] [--metrics]")
    serve(args[1], int(args[2]), *(int(arg) for arg in args[3:]), metrics="--metrics" in flags)
