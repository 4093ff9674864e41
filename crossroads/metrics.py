"""A daemon's HTTP endpoints for operators: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

Owns the ``[metrics] listen`` server of ``crossroads run``, ``bridge`` and
``worker``, and the collectors behind ``/metrics``. The collectors read the
counters the bridges, the worker and the layer keep already (``Bridge.counters``,
``DispatchCounters``, the layer's ``Counters``) when a scrape comes: the hot
path gains nothing. Health and readiness are the caller's: it passes two
functions that each return ``(ok, JSON body)``.

The server is wsgiref's on a thread of its own, not a Twisted one on the
reactor, because ``crossroads worker`` has no reactor, and because a loop that
is stuck must still get its ``/healthz`` answered (with a 503). Reading the
counters from that thread is safe: each is a dict copied under the GIL or a
plain int.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import __version__
from .config import parse_listen
from .consumers.dispatch import DURATION_BUCKETS

log = logging.getLogger("crossroads.metrics")

Check = Callable[[], tuple[bool, dict[str, Any]]]

HEALTH_STATES = ("starting", "connected", "degraded", "stopping", "stopped")  # bridges.health.HEALTH_STATES
# What each bridge counter means, for its HELP line; a bridge's own counters get a generic one.
BRIDGE_COUNTERS = {
    "received": "Messages (lines, frames, requests, publishes) received from peers.",
    "sent": "Messages the layer accepted from this bridge.",
    "refused": "Messages the layer refused (a full channel or the layer down); the peer was told in its protocol.",
    "replies": "Replies delivered to peers.",
    "unknown_replies": "Replies for a connection that was gone.",
    "dropped": "Messages dropped (replies for gone peers, backlogs over their bound, replies cut short at stop).",
    "bad_input": "Peer input rejected as malformed.",
    "errors": "Internal errors (a handler raised, a stop step overran).",
    "connects": "Connections made to servers (brokers, IRC servers, mailboxes).",
    "connect_failures": "Attempts to connect to a server that failed (each is retried with backoff).",
}
WORKER_COUNTERS = {  # DispatchCounters field -> (metric name, help)
    "consumed": ("consumed", "Messages consumers ran on (whether or not they raised)."),
    "errors": ("consumer_errors", "Messages whose consumer raised."),
    "unrouted": ("unrouted", "Messages on a channel no route takes."),
    "requeued": ("requeued", "Messages a consumer asked to see again later (ConsumeLater)."),
    "gave_up": ("gave_up", "Messages dropped after too many ConsumeLater requeues."),
    "undelivered": ("undelivered", "Buffered sends of consumers lost to a full channel or an unreachable layer."),
    "slow": ("slow_consumers", "Consumers reported running past [worker] slow_consumer on one message."),
    "invalid": ("invalid", "Messages dropped unrun: their reply_channel is not a channel name."),
}
LAYER_COUNTERS = {
    "sent": "Messages sent into the layer by this process.",
    "received": "Messages received from the layer by this process.",
    "refused": "Sends refused with ChannelFull.",
    "dropped": "Group messages accepted but not delivered to a member (it was full).",
    "expired": "Messages discarded because nobody received them within the expiry.",
    "undecryptable": "Messages received sealed with a key this process does not have.",
}
_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(counter: str) -> str:
    """A counter's name as a metric name's part (``slow-clients`` -> ``slow_clients``)."""
    return _NAME_RE.sub("_", counter)


class BridgeCollector:
    """Every bridge's counters, state and registered peers, labelled ``bridge`` and ``type``."""

    def __init__(self, bridges: Callable[[], Iterable[Any]]) -> None:
        self.bridges = bridges

    def collect(self) -> Iterable[Any]:
        bridges = list(self.bridges())
        labels = ["bridge", "type"]
        counters: dict[str, CounterMetricFamily] = {}
        state = GaugeMetricFamily("crossroads_bridge_state", "1 for the state the bridge is in, 0 for the others.",
                                  labels=[*labels, "state"])
        since = GaugeMetricFamily("crossroads_bridge_state_since_timestamp_seconds",
                                  "When the bridge entered its state (Unix time).", labels=labels)
        peers = GaugeMetricFamily("crossroads_bridge_peers",
                                  "Connections and targets the bridge has registered for replies.", labels=labels)
        for name in BRIDGE_COUNTERS:  # always present, so a rate() over a bridge that never counted one works
            counters[name] = CounterMetricFamily(f"crossroads_bridge_{name}", BRIDGE_COUNTERS[name], labels=labels)
        for bridge in bridges:
            values = [bridge.name, bridge.type_name]
            for counter, value in bridge.counters.items():
                if counter not in counters:
                    counters[counter] = CounterMetricFamily(f"crossroads_bridge_{metric_name(counter)}",
                                                            f"The {bridge.type_name} bridge's {counter} counter.",
                                                            labels=labels)
                counters[counter].add_metric(values, value)
            health = bridge.health
            for one in HEALTH_STATES:
                state.add_metric([*values, one], 1.0 if health["state"] == one else 0.0)
            since.add_metric(values, health["since"])
            peers.add_metric(values, len(bridge.targets))
        yield from counters.values()
        yield from (state, since, peers)


class WorkerCollector:
    """The worker's dispatch counters and its threads, busy or not, by pool."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def collect(self) -> Iterable[Any]:
        counters = self.worker.dispatcher.counters
        for field, (name, help_text) in WORKER_COUNTERS.items():
            family = CounterMetricFamily(f"crossroads_worker_{name}", help_text)
            family.add_metric([], getattr(counters, field))
            yield family
        yield from consumer_families(counters.by_consumer)
        threads = GaugeMetricFamily("crossroads_worker_threads", "Threads serving the pool's channels.",
                                    labels=["pool"])
        busy = GaugeMetricFamily("crossroads_worker_busy_threads", "Threads running a consumer now.", labels=["pool"])
        for pool, count, running in self.worker.thread_report():
            threads.add_metric([pool], count)
            busy.add_metric([pool], running)
        yield threads
        yield busy


BUCKET_LABELS = [*(repr(bound) for bound in DURATION_BUCKETS), "+Inf"]


def consumer_families(by_consumer: dict[Any, Any]) -> Iterable[Any]:
    """Messages run and the duration histogram, by channel and consumer (``DispatchCounters.by_consumer``)."""
    labels = ["channel", "consumer"]
    messages = CounterMetricFamily("crossroads_worker_messages", "Messages consumers ran on, by channel and consumer.",
                                   labels=labels)
    durations = HistogramMetricFamily("crossroads_worker_consumer_duration_seconds",
                                      "How long a consumer ran on one message (not the flush of what it sent).",
                                      labels=labels)
    for stats in list(by_consumer.values()):  # a copy: a worker thread may add a pair meanwhile
        values = [stats.channel, stats.consumer]
        counts, total, cumulative = list(stats.buckets), stats.seconds, 0
        buckets = []
        for label, count in zip(BUCKET_LABELS, counts, strict=True):
            cumulative += count
            buckets.append((label, cumulative))
        messages.add_metric(values, stats.count)
        durations.add_metric(values, buckets, sum_value=total)
    yield messages
    yield durations


class LayerCollector:
    """The layer object's counters in this process, and its queues' depths where that costs no I/O (memory://)."""

    def __init__(self, channel_layer: Any) -> None:
        self.layer = channel_layer

    def collect(self) -> Iterable[Any]:
        counters = getattr(self.layer, "counters", None)
        if counters is not None:
            for name, value in counters.as_dict().items():
                family = CounterMetricFamily(f"crossroads_layer_{metric_name(name)}",
                                             LAYER_COUNTERS.get(name, f"The layer's {name} counter."))
                family.add_metric([], value)
                yield family
        if type(self.layer).__name__ == "MemoryLayer":
            # Redis would need a SCAN of every queue per scrape: `crossroads status` shows those depths instead.
            depth = GaugeMetricFamily("crossroads_layer_queue_depth", "Messages waiting in the queue.",
                                      labels=["queue"])
            for queue, count in self.layer._stats()["pending"].items():
                depth.add_metric([queue], count)
            yield depth


class InfoCollector:
    def __init__(self, command: str) -> None:
        self.command = command

    def collect(self) -> Iterable[Any]:
        info = InfoMetricFamily("crossroads", "The crossroads version and the command this process runs.")
        info.add_metric([], {"version": __version__, "command": self.command})
        yield info


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every 15 s would flood the journal
        pass


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``listen`` (``host:port``) for one daemon process."""

    def __init__(self, listen: str, command: str, healthz: Check, readyz: Check) -> None:
        self.address = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(InfoCollector(command))
        ProcessCollector(registry=self.registry)  # crossroads_process_* would be odd: Prometheus' names are known
        self.healthz, self.readyz = healthz, readyz
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def register(self, collector: Any) -> None:
        self.registry.register(collector)

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.address[1]

    def start(self) -> None:
        """Listen (an OSError if the address is taken) and serve on a thread."""
        import socket

        class Server(_Server):
            address_family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET

        self._server = make_server(self.address[0], self.address[1], self.app, server_class=Server,
                                   handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics (and /healthz, /readyz)", *self._server.server_address[:2])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def app(self, environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            try:
                body = generate_latest(self.registry)
            except Exception as exc:  # a collector's bug must not take the endpoint down with a traceback page
                log.exception("collecting the metrics failed")
                return self._reply(start_response, "500 Internal Server Error", {"error": str(exc)})
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
            return [body]
        if path in ("/healthz", "/readyz"):
            ok, body = (self.healthz if path == "/healthz" else self.readyz)()
            return self._reply(start_response, "200 OK" if ok else "503 Service Unavailable", body)
        return self._reply(start_response, "404 Not Found", {"error": f"no {path} here: /metrics, /healthz, /readyz"})

    @staticmethod
    def _reply(start_response: Callable, status: str, body: dict) -> list[bytes]:
        data = json.dumps(body, sort_keys=True).encode() + b"\n"
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]


def readiness(bridges: Iterable[Any], worker: Any = None) -> tuple[bool, dict[str, Any]]:
    """Ready when every bridge is connected (and the worker serving); the body says each one's state."""
    states = {bridge.name: {"type": bridge.type_name, **bridge.health} for bridge in bridges}
    not_ready = [f"{name} is {status['state']}" + (f": {status['reason']}" if status.get("reason") else "")
                 for name, status in states.items() if status["state"] != "connected"]
    body: dict[str, Any] = {"bridges": states}
    if worker is not None:
        serving = worker.ready.is_set() and not worker.stopping
        body["worker"] = {"serving": serving, "threads": worker.threads}
        if not serving:
            not_ready.append("the worker is not serving")
    body["ready"] = not not_ready
    if not_ready:
        body["reason"] = "; ".join(not_ready)
    return not not_ready, body
