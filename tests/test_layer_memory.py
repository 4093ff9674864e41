"""What the in-memory backend promises beyond the conformance suite: threads and an event loop
waiting on one layer at once, and cancellation that loses nothing."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from crossroads import layer


def test_cancelled_receive_puts_its_message_back():
    L = layer.from_url("memory://")

    async def scenario():
        receiver = asyncio.ensure_future(L.receive(["cancel.a"]))
        await asyncio.sleep(0)  # let it register as a waiter
        L.sync.send("cancel.a", {"value": 1})  # handed to the waiting receiver...
        receiver.cancel()  # ...which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await receiver
        return await L.receive(["cancel.a"], timeout=1)

    assert asyncio.run(scenario()) == ("cancel.a", {"value": 1})
    assert L.sync.stats()["received"] == 1


def test_a_thread_and_a_coroutine_wait_on_one_layer():
    L = layer.from_url("memory://")
    from_thread: list = []
    thread = threading.Thread(target=lambda: from_thread.append(L.sync.receive(["both.a"], timeout=30)))
    thread.start()

    async def scenario():
        waiting = asyncio.ensure_future(L.receive(["both.a"], timeout=30))
        await asyncio.sleep(0)
        await L.send("both.a", {"n": 1})
        await L.send("both.a", {"n": 2})
        return await waiting

    from_loop = asyncio.run(scenario())
    thread.join(30)
    assert sorted([from_loop[1]["n"], from_thread[0][1]["n"]]) == [1, 2]


def test_what_expires_unread_is_swept_so_a_long_running_process_does_not_keep_it():
    """A channel session per connection, members of groups nobody sends to, messages nobody reads: each expires,
    and without a sweep an all-in-one process would hold them for as long as it runs."""
    L = layer.from_url("memory://", expiry=0.05, group_expiry=0.05)  # no sweep for 30 s: the first is below
    sync = L.sync
    for n in range(200):
        sync.kv_set(f"session:{n}", {"user": "ann"}, ttl=0.05)
        sync.group_add(f"room{n}", f"member{n}")
        sync.send(f"nobody.reads{n}", {"n": n})
    assert len(L._records) == 200 and len(L._groups) == 200 and len(L._queues) == 200
    expired_at = time.time() + 0.05
    while time.time() <= expired_at:  # their deadlines pass: waiting on the clock itself, not on a guess
        time.sleep(0.01)
    L.sweep_every = 0.0  # the next addition sweeps, instead of the first one 30 s after the layer was made
    sync.kv_set("session:new", {"user": "bob"}, ttl=60)
    assert list(L._records) == ["session:new"] and L._groups == {} and L._queues == {}
    assert sync.kv_get("session:new") == {"user": "bob"}
    assert L.sync.stats()["expired"] == 200  # the messages count as expired, as when read late


def test_the_sweep_keeps_what_has_not_expired():
    L = layer.from_url("memory://")
    L.sweep_every = 0.0
    sync = L.sync
    sync.kv_set("session:a", {"user": "ann"}, ttl=60)
    sync.group_add("room", "member!1")
    sync.send("queue", {"n": 1})
    sync.kv_set("session:b", {"user": "bob"}, ttl=60)  # sweeps
    assert sync.kv_get("session:a") == {"user": "ann"}
    assert sync.group_channels("room") == ["member!1"]
    assert sync.receive(["queue"], timeout=1) == ("queue", {"n": 1})


def test_a_woken_receiver_takes_what_is_sent_before_it_runs_up_to_its_limit():
    """One wake-up for a burst: sends made before the woken receiver runs are handed to it too, in order, up to
    what it asked for; the rest queue, and another waiting receiver is not woken for them."""
    L = layer.from_url("memory://")

    async def scenario():
        first = asyncio.ensure_future(L.receive_many(["burst.a"], 3))
        second = asyncio.ensure_future(L.receive_many(["burst.a"], 3, timeout=0.2))
        await asyncio.sleep(0)  # both wait
        for i in range(5):  # no await in between: neither receiver runs until the burst is sent
            L.sync.send("burst.a", {"i": i})
        got_first, got_second = await first, await second
        return got_first, got_second, await L.receive_many(["burst.a"], 10, timeout=1)

    first, second, rest = asyncio.run(scenario())
    assert [m["i"] for _, m in first] == [0, 1, 2]
    # The second was woken by none of the burst: it ran when its timeout came and found the rest queued.
    assert [m["i"] for _, m in second] + [m["i"] for _, m in rest] == [3, 4]


def test_a_cancelled_receiver_puts_back_everything_it_was_handed_in_order():
    L = layer.from_url("memory://")

    async def scenario():
        receiver = asyncio.ensure_future(L.receive_many(["burst.b"], 10))
        await asyncio.sleep(0)
        for i in range(4):
            L.sync.send("burst.b", {"i": i})  # all four handed to it
        receiver.cancel()
        with pytest.raises(asyncio.CancelledError):
            await receiver
        return await L.receive_many(["burst.b"], 10, timeout=1)

    assert [m["i"] for _, m in asyncio.run(scenario())] == [0, 1, 2, 3]
    assert L.sync.stats()["received"] == 4

