"""The worker in-process: threads, async consumers, channel selection, graceful stop."""

from __future__ import annotations

import threading

import pytest

from crossroads import layer
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
