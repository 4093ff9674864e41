"""What the in-memory backend promises beyond the conformance suite: threads and an event loop
waiting on one layer at once, and cancellation that loses nothing."""

from __future__ import annotations

import asyncio
import threading

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
