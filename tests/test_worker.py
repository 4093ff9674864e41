"""The worker in-process: threads, pools, async consumers, channel selection, slow consumer reports, stop."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from servers import wait_until

from crossroads import layer, route
from crossroads.consumers.worker import Worker, select_channels


def collect(sync, channel: str, count: int, timeout: float = 30) -> list[dict]:
    got = []
    while len(got) < count:
        batch = sync.receive_many([channel], count - len(got), timeout=timeout)
        assert batch, f"only {len(got)} of {count} replies arrived on {channel}"
        got += [message for _, message in batch]
    return got


def test_worker_threads_answer_every_request(channel_layer):
    worker = Worker("apps.slow:routes", channel_layer, threads=4)
    worker.start()
    try:
        sync = channel_layer.sync
        reply = sync.new_channel("client?")
        sync.send_many([("test.echo", {"text": f"m{i}", "n": i, "reply_channel": reply}) for i in range(60)])
        sync.send_many([("test.shout", {"text": f"a{i}", "reply_channel": reply}) for i in range(20)])
        got = collect(sync, reply, 80)
        assert sorted(m["n"] for m in got if "n" in m) == list(range(60))
        assert sorted(m["text"] for m in got if "n" not in m) == sorted(f"A{i}" for i in range(20))
    finally:
        worker.stop()
        assert worker.join(30)
    assert worker.dispatcher.counters.consumed == 80


@pytest.mark.parametrize("bad", ["bad name!!", 5, "x" * 120])
def test_a_message_with_an_invalid_reply_channel_is_dropped_and_the_thread_goes_on(channel_layer, caplog, bad):
    # One hostile message in a batch: counted and logged, never run; the thread serves the rest of the batch and
    # every batch after it (before, the error from building its reply channel ended the thread).
    worker = Worker("apps.slow:routes", channel_layer, threads=1)
    sync = channel_layer.sync
    reply = sync.new_channel("client?")
    sync.send_many([("test.echo", {"text": "m0", "n": 0, "reply_channel": reply}),
                    ("test.echo", {"text": "bad", "reply_channel": bad}),
                    ("test.echo", {"text": "bad again", "reply_channel": bad}),
                    ("test.echo", {"text": "m1", "n": 1, "reply_channel": reply})])
    with caplog.at_level(logging.WARNING, logger="crossroads.worker"):
        worker.start()
        try:
            assert [m["n"] for m in collect(sync, reply, 2)] == [0, 1]
            sync.send("test.echo", {"text": "m2", "n": 2, "reply_channel": reply})
            assert [m["n"] for m in collect(sync, reply, 1)] == [2]
        finally:
            worker.stop()
            assert worker.join(30)
    counters = worker.dispatcher.counters
    assert (counters.invalid, counters.consumed) == (2, 3)
    assert "2 invalid dropped" in worker.summary()
    dropped = [r for r in caplog.records if "reply_channel is not a channel" in r.getMessage()]
    assert len(dropped) == 1 and "test.echo" in dropped[0].getMessage()


def test_one_thread_takes_messages_in_batches_and_keeps_their_order(channel_layer):
    worker = Worker("apps.slow:routes", channel_layer, threads=1)
    sync = channel_layer.sync
    reply = sync.new_channel("client?")
    sync.send_many([("test.echo", {"text": f"m{i}", "n": i, "reply_channel": reply}) for i in range(90)])
    worker.start()  # after the sends: every receive can take a full batch
    try:
        assert [m["n"] for m in collect(sync, reply, 90)] == list(range(90))
    finally:
        worker.stop()
        assert worker.join(30)


def test_a_batch_replies_in_order_when_a_later_message_sends_immediately(channel_layer):
    # A thread's batch sends its replies together when it is done; an immediate send in a later message of the
    # batch first sends what the earlier ones left, so nothing is overtaken on the reply channel.
    worker = Worker("apps.mixed:routes", channel_layer, threads=1)
    sync = channel_layer.sync
    reply = sync.new_channel("client?")
    sync.send_many([("test.mixed", {"n": i, "reply_channel": reply}) for i in range(40)])
    worker.start()  # after the sends: every receive can take a full batch
    try:
        got = [(m["n"], "immediately" in m) for m in collect(sync, reply, 60)]
    finally:
        worker.stop()
        assert worker.join(30)
    assert got == [(i, immediate) for i in range(40) for immediate in ((True, False) if i % 2 else (False,))]
    assert worker.dispatcher.counters.undelivered == 0


def test_a_slow_message_does_not_hold_the_replies_of_the_quick_ones_taken_with_it(channel_layer):
    # The quick echoes and the waiting message share a receive; the echoes are answered while it still waits.
    worker = Worker("apps.mixed:routes", channel_layer, threads=1)
    sync = channel_layer.sync
    reply = sync.new_channel("client?")
    sync.send_many([("test.echo", {"n": i, "reply_channel": reply}) for i in range(30)])
    sync.send("test.echo", {"n": 30, "kind": "wait", "reply_channel": reply})
    worker.start()
    try:
        assert [m["n"] for m in collect(sync, reply, 30)] == list(range(30))  # before the release
        sync.send("test.release", {})
        assert collect(sync, reply, 1) == [{"finished": 30, "released": True}]
    finally:
        worker.stop()
        assert worker.join(30)


def test_slow_consumers_are_taken_one_at_a_time_so_every_thread_gets_one(channel_layer):
    # A thread takes as many messages as it has been running in a few milliseconds. Consumers that wait (here
    # until released) are taken one by one: the second message goes to the second thread, instead of waiting
    # behind the first in the batch of a busy one.
    worker = Worker("apps.slow:routes", channel_layer, threads=2)
    sync = channel_layer.sync
    reply = sync.new_channel("client?")
    worker.start()
    try:
        for round_ in range(2):
            sync.send_many([("test.hold", {"n": round_ * 10 + i, "reply_channel": reply}) for i in range(2)])
            started = collect(sync, "test.started", 2)  # both in hand at once: one per thread
            assert sorted(m["n"] for m in started) == [round_ * 10, round_ * 10 + 1]
            sync.send_many([("test.release", {}), ("test.release", {})])
            assert sorted(m["finished"] for m in collect(sync, reply, 2)) == [round_ * 10, round_ * 10 + 1]
    finally:
        worker.stop()
        assert worker.join(30)


class CountingReceives:
    """The layer's blocking face, counting how many threads are inside ``receive_many`` at once."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.lock = threading.Lock()
        self.inside = self.most = 0

    def receive_many(self, *args, **kwargs):
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        try:
            return self.sync.receive_many(*args, **kwargs)
        finally:
            with self.lock:
                self.inside -= 1

    def __getattr__(self, name):
        return getattr(self.sync, name)


def test_one_thread_of_a_pool_waits_in_the_layer_at_a_time_and_a_slow_consumer_holds_only_its_own(channel_layer):
    # Were all four threads waiting in the layer, a burst would be split between them; the thread that took
    # messages gives the turn up before running them, so a consumer that waits does not stop the others.
    worker = Worker("apps.slow:routes", channel_layer, threads=4)
    counting = worker.sync = CountingReceives(worker.sync)
    sync = channel_layer.sync
    reply = sync.new_channel("client?")
    worker.start()
    try:
        sync.send("test.hold", {"n": 1, "reply_channel": reply})
        assert sync.receive(["test.started"], timeout=30) == ("test.started", {"n": 1})
        sync.send_many([("test.echo", {"text": f"m{i}", "n": i, "reply_channel": reply}) for i in range(90)])
        got = collect(sync, reply, 90)  # while the held one still holds its thread
        assert sorted(m["n"] for m in got) == list(range(90))
        sync.send("test.release", {})
        assert collect(sync, reply, 1) == [{"finished": 1, "released": True}]
    finally:
        worker.stop()
        assert worker.join(30)
    assert counting.most == 1


def test_stop_finishes_the_message_in_hand(channel_layer):
    worker = Worker("apps.slow:routes", channel_layer, threads=2)
    worker.start()
    sync = channel_layer.sync
    reply = sync.new_channel("client?")
    sync.send("test.hold", {"n": 7, "reply_channel": reply})
    assert sync.receive(["test.started"], timeout=30) == ("test.started", {"n": 7})
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    stopper.join(10)
    assert not worker.join(0.2), "the worker quit with a message in hand"
    sync.send("test.release", {})
    assert worker.join(30)
    assert sync.receive([reply], timeout=5) == (reply, {"finished": 7, "released": True})


def test_channel_selection():
    channels = {"http.request", "websocket.connect", "websocket.receive", "mqtt.receive"}
    assert select_channels(channels, only=["websocket.*"]) == ["websocket.connect", "websocket.receive"]
    assert select_channels(channels, exclude=["websocket.*", "http.*"]) == ["mqtt.receive"]
    with pytest.raises(ValueError, match="no channels to listen on"):
        Worker("apps.slow:routes", layer.from_url("memory://"), only_channels=["nothing.*"])


# -- pools: a slow route cannot take the threads of others (issue 14 §5) --


def hold_both_threads(sync, reply: str, count: int) -> None:
    """``count`` holds in hand at once (each announces itself before it waits to be released)."""
    sync.send_many([("test.hold", {"n": n, "reply_channel": reply}) for n in range(count)])
    assert sorted(m["n"] for m in collect(sync, "test.started", count)) == list(range(count))


def test_with_one_pool_slow_consumers_take_every_thread_and_a_fast_request_waits(channel_layer):
    """The finding, as it was: both threads hold a slow message, so an echo is answered only after one returns."""
    worker = Worker("apps.slow:routes", channel_layer, threads=2)
    sync = channel_layer.sync
    reply = sync.new_channel("client?")
    worker.start()
    try:
        hold_both_threads(sync, reply, 2)
        sync.send("test.echo", {"text": "fast", "n": 99, "reply_channel": reply})
        sync.send("test.release", {})
        first, second = collect(sync, reply, 2)
        assert "finished" in first and second == {"text": "fast", "n": 99}  # the echo came after a slow one ended
        sync.send("test.release", {})
        assert "finished" in collect(sync, reply, 1)[0]
    finally:
        worker.stop()
        assert worker.join(30)


def test_a_slow_route_in_a_pool_of_its_own_does_not_delay_a_fast_route(channel_layer):
    worker = Worker("apps.slow:routes", channel_layer, threads=1, pools={"slow": (["test.hold"], 2)})
    assert worker.threads == 3
    sync = channel_layer.sync
    reply = sync.new_channel("client?")
    worker.start()
    try:
        hold_both_threads(sync, reply, 2)  # the slow pool's two threads are busy...
        sync.send("test.hold", {"n": 2, "reply_channel": reply})  # ...and a third slow one waits for them
        sync.send("test.echo", {"text": "fast", "n": 99, "reply_channel": reply})
        # Answered while every slow message is still held: nothing has been released yet.
        assert collect(sync, reply, 1) == [{"text": "fast", "n": 99}]
        sync.send_many([("test.release", {})] * 3)
        assert sorted(m["finished"] for m in collect(sync, reply, 3)) == [0, 1, 2]
    finally:
        worker.stop()
        assert worker.join(30)


def test_pools_assign_each_channel_once():
    memory = layer.from_url("memory://")
    worker = Worker("apps.slow:routes", memory, threads=2, pools={"slow": (["test.hold*"], 3), "mqtt": (["mqtt.*"], 1)})
    assert worker.pools == {"slow": (["test.hold", "test.hold_async"], 3),
                            "default": (["test.echo", "test.shout", "test.tick"], 2)}
    assert worker.idle_pools == ["mqtt"]  # none of its channels is routed here: no threads
    assert worker.threads == 5
    with pytest.raises(ValueError, match="the channel test.hold is in pools a and b"):
        Worker("apps.slow:routes", memory, pools={"a": (["test.*"], 1), "b": (["test.hold"], 1)})
    with pytest.raises(ValueError, match='may not be named "default"'):
        Worker("apps.slow:routes", memory, pools={"default": (["test.hold"], 1)})
    everything = Worker("apps.slow:routes", memory, threads=2, pools={"all": (["test.*"], 1)})
    assert everything.pools == {"all": (sorted(everything.channels), 1)}  # no channel left: no default threads
    assert everything.threads == 1


# -- the slow consumer report --


def slow_reports(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("slow consumer:")]


@pytest.mark.parametrize("channel, consumer, frame", [
    ("test.hold", "apps.slow.hold", "in hold\n"),
    ("test.hold_async", "apps.slow.hold_async", "in hold_async\n"),
])
def test_a_slow_consumer_is_reported_once_with_its_stack_and_counted(channel_layer, caplog, channel, consumer,
                                                                     frame):
    worker = Worker("apps.slow:routes", channel_layer, threads=2, slow_consumer=0.05)
    sync = channel_layer.sync
    reply = sync.new_channel("client?")
    with caplog.at_level(logging.WARNING, logger="crossroads.worker"):
        worker.start()
        try:
            sync.send("test.echo", {"text": "quick", "n": 1, "reply_channel": reply})
            assert collect(sync, reply, 1) == [{"text": "quick", "n": 1}]
            sync.send(channel, {"n": 7, "reply_channel": reply})
            collect(sync, "test.started", 1)
            wait_until(lambda: slow_reports(caplog), "the slow consumer report")
            scans = worker.watchdog_scans
            wait_until(lambda: worker.watchdog_scans >= scans + 3, "three more looks of the watchdog")
            sync.send("test.release", {})
            assert collect(sync, reply, 1) == [{"finished": 7, "released": True}]
        finally:
            worker.stop()
            assert worker.join(30)
    (record,) = slow_reports(caplog)  # once for the message, however long it ran
    text = record.getMessage()
    assert record.levelno == logging.WARNING
    assert f"{consumer} has been running for" in text and f"on a message on {channel}" in text
    assert "slow_consumer = 0.05s" in text
    assert "apps/slow.py" in text and frame in text  # the stack says where it waits
    assert "sync.receive" in text or "to_thread" in text
    assert worker.dispatcher.counters.slow == 1
    assert "1 slow consumers reported" in worker.summary()


def test_an_unhashable_consumer_is_served_and_never_taken_for_quick(channel_layer):
    from test_consumers import UnhashableConsumer

    consumer = UnhashableConsumer()
    worker = Worker([route("test.unhashable", consumer)], channel_layer, threads=1)
    worker.start()
    try:
        sync = channel_layer.sync
        reply = sync.new_channel("client?")
        sync.send_many([("test.unhashable", {"reply_channel": reply}) for _ in range(3)])
        assert collect(sync, reply, 3) == [{"seen": 1}, {"seen": 2}, {"seen": 3}]
    finally:
        worker.stop()
        assert worker.join(30)
    assert worker._quick == {} and worker.dispatcher.counters.consumed == 3


def test_each_slow_run_is_reported_once_even_of_the_same_consumer_on_the_same_thread(caplog):
    worker = Worker("apps.slow:routes", layer.from_url("memory://"), threads=1, slow_consumer=0.05)
    worker._workers = [threading.current_thread()]  # the slot's thread: never started, the test fills the slot
    long_ago = time.monotonic() - 1  # a second ago: past slow_consumer
    with caplog.at_level(logging.WARNING, logger="crossroads.worker"):
        worker._running[0] = ("test.hold", print, None, long_ago)
        assert worker.report_slow() == 1
        assert worker.report_slow() == 0  # the same run: reported already
        worker._running[0] = ("test.hold", print, None, long_ago)  # the next message: a run of its own
        assert worker.report_slow() == 1
        worker._running[0] = None
        assert worker.report_slow() == 0
    assert len(slow_reports(caplog)) == 2 and worker.dispatcher.counters.slow == 2
    assert worker._reported == {}  # nothing is kept of runs that ended


def test_no_watchdog_when_slow_consumer_is_off(channel_layer):
    worker = Worker("apps.slow:routes", channel_layer, threads=1, slow_consumer=0)
    worker.start()
    try:
        assert "worker-watchdog" not in [thread.name for thread in threading.enumerate()]
    finally:
        worker.stop()
        assert worker.join(30)
