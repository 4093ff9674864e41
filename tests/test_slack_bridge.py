"""The Slack bridge against tests/slack_emulator.py, driven by the real slack-sdk on the reactor's loop.

The bridge runs on Twisted's asyncio reactor (the ``reactor``/``run``
fixtures); the test plays the consumer through the layer (``take`` what the
bridge sent, ``send`` to its reply channels), or runs tests/apps/slack_echo.py
in a Worker. Slack is the emulator, in the same loop (in a thread of its own
for the separate-process test). One test stops a real Redis under the bridge.
Every wait is on a condition with a deadline; none is a bare sleep.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import asynccontextmanager

import pytest
from servers import RedisServer, free_port, running_in_process, take, wait_until_async
from slack_emulator import SlackEmulator

from crossroads import layer
from crossroads.bridges.base import OptionError
from crossroads.bridges.slack import messages as m
from crossroads.bridges.slack.bridge import SlackBridge

USERS = {"U222": "alice", "U333": "bob"}
CHANNELS = {"C111": "general", "C222": "random"}


def post(text: str, ts: str, *, channel: str = "C111", user: str = "U222", **more) -> dict:
    """A ``message`` event as Slack sends it for a post in a channel."""
    return {"type": "message", "channel": channel, "user": user, "text": text, "ts": ts, "event_ts": ts,
            "channel_type": "channel", **more}


@asynccontextmanager
async def bridging(emulator: SlackEmulator, options: dict | None = None, *, channel_layer=None, app: str | None = None):
    """A started SlackBridge on the emulator, its link up (``slack.connect`` taken unless a worker consumes it)."""
    channel_layer = channel_layer or layer.from_url("memory://", capacity=1000)
    bridge = SlackBridge("work", {"bot_token": emulator.bot_token, "app_token": emulator.app_token,
                                  "api_url": emulator.api_url, **(options or {})}, channel_layer)
    async with running_in_process(bridge, app):
        if app is None:
            bridge.connected = await take(channel_layer, "slack.connect")
        else:
            await wait_until_async(lambda: bridge.link.connected, "the bridge to connect")
        yield bridge


async def reply(bridge: SlackBridge, message: dict, content: dict) -> None:
    await bridge.layer.send(message["reply_channel"], content)


def texts(emulator: SlackEmulator, channel: str) -> list[str]:
    return [m["text"] for m in emulator.history.get(channel, [])]


# -- receive and reply ---------------------------------------------------------------------------------------------


def test_receive_and_reply_in_channel_and_thread(run):
    async def scenario():
        async with SlackEmulator(users=USERS, channels=CHANNELS) as emulator, bridging(emulator) as bridge:
            assert bridge.connected["user"] == "U111" and bridge.connected["transport"] == "socket"
            assert "ticket" not in bridge.connected["url"]
            first = await emulator.send_event(post("hi <@U111> &amp; <#C222|random>", "1700000001.000100"),
                                              event_id="Ev1")
            got = await take(bridge.layer, "slack.receive")
            await emulator.wait_for(lambda: first in emulator.acks, what="the ack")
            # The first post of a user and a channel waits for their names' lookups (at most lookup_wait).
            assert (got["user_name"], got["sender"], got["room"]) == ("alice", "alice", "general")
            await emulator.send_event(post("in thread", "1700000002.000100", thread_ts="1700000001.000100"))
            threaded = await take(bridge.layer, "slack.receive")
            await emulator.send_event(post("again", "1700000003.000100"))
            again = await take(bridge.layer, "slack.receive")
            await reply(bridge, got, {"text": "to the channel"})
            await reply(bridge, threaded, {"text": "to the thread"})
            await emulator.wait_for(lambda: len(emulator.history.get("C111", [])) == 2, what="two posts")
            return bridge, got, threaded, again, emulator.history["C111"]

    bridge, got, threaded, again, history = run(scenario())
    assert got["text"] == "hi @crossroads & #random" and got["body"] == "hi <@U111> &amp; <#C222|random>"
    assert got["mentioned"] is True and got["protocol"] == "slack" and got["network"] == "work"
    assert (got["team"], got["channel"], got["user"], got["ts"], got["event_id"]) == (
        "T111", "C111", "U222", "1700000001.000100", "Ev1")
    assert got["thread_ts"] is None and got["retry_attempt"] == 0 and got["edited"] is False
    assert (threaded["sender"], threaded["room"], threaded["thread_ts"]) == ("alice", "general", "1700000001.000100")
    assert got["reply_channel"].endswith("!c.C111") and again["reply_channel"] == got["reply_channel"]  # stable
    assert threaded["reply_channel"].endswith("!t.C111.1700000001.000100")
    assert [(m["text"], m.get("thread_ts")) for m in history] == [("to the channel", None),
                                                                   ("to the thread", "1700000001.000100")]
    assert bridge.counters["posted"] == 2 and bridge.counters["errors"] == 0


def test_our_own_posts_never_come_back_as_input(run):
    async def scenario():
        async with SlackEmulator() as emulator, bridging(emulator) as bridge:
            own = [await emulator.send_event(post("mine", "1700000001.000100", user="U111")),
                   await emulator.send_event({"type": "message", "subtype": "bot_message", "bot_id": "B111",
                                              "channel": "C111", "text": "my bot", "ts": "1700000002.000100"})]
            await emulator.send_event(post("theirs", "1700000003.000100"))
            got = await take(bridge.layer, "slack.receive")
            await emulator.wait_for(lambda: all(e in emulator.acks for e in own), what="acks of our own posts")
            return bridge, got

    bridge, got = run(scenario())
    assert got["text"] == "theirs"
    assert bridge.counters["skipped"] == 2


def test_a_mention_arriving_twice_is_delivered_once(run):
    async def scenario():
        async with SlackEmulator() as emulator, bridging(emulator) as bridge:
            event = post("<@U111> deploy", "1700000001.000100")
            both = [await emulator.send_event(event, event_id="Ev1"),
                    await emulator.send_event({**event, "type": "app_mention"}, event_id="Ev2")]
            await emulator.send_event(post("next", "1700000002.000100"))
            first = await take(bridge.layer, "slack.receive")
            second = await take(bridge.layer, "slack.receive")
            await emulator.wait_for(lambda: all(e in emulator.acks for e in both), what="both acks")
            return bridge, first, second

    bridge, first, second = run(scenario())
    assert (first["event_id"], first["mentioned"]) == ("Ev1", True)
    assert second["text"] == "next"
    assert bridge.counters["repeats"] == 1


def test_the_ack_waits_while_redis_is_stopped_and_the_event_is_delivered_once_after(run, tmp_path):
    redis = RedisServer(tmp_path / "redis").start()

    async def scenario():
        channel_layer = layer.from_url(redis.url, prefix="slack-redis")
        async with SlackEmulator() as emulator, bridging(emulator, channel_layer=channel_layer) as bridge:
            await emulator.send_event(post("before", "1700000001.000100"))
            assert (await take(channel_layer, "slack.receive"))["text"] == "before"
            try:
                redis.command("SHUTDOWN", "NOSAVE")
            except Exception:
                pass  # the connection drops as it shuts down
            await asyncio.to_thread(redis.process.wait, 10)
            held = await emulator.send_event(post("during", "1700000002.000100"))
            await wait_until_async(lambda: bridge.counters["refused"] >= 1, "the bridge to meet the stopped layer")
            assert held in emulator.unacked()
            await emulator.redeliver()  # Slack resends the unacknowledged envelope: it joins the waiting copy
            await wait_until_async(lambda: bridge.counters["repeats"] >= 1, "the redelivery to be recognised")
            assert held in emulator.unacked() and bridge.health["state"] == "degraded"
            redis.start()
            await emulator.wait_for(lambda: held in emulator.acks, timeout=20, what="the ack once Redis is back")
            await emulator.send_event(post("after", "1700000003.000100"))
            during = await take(channel_layer, "slack.receive", timeout=20)
            after = await take(channel_layer, "slack.receive")
            return during, after

    try:
        during, after = run(scenario(), timeout=60)
    finally:
        redis.stop()
    assert (during["text"], after["text"]) == ("during", "after")  # once, and in order


def test_a_socket_recycled_mid_stream_loses_and_doubles_nothing(run):
    async def scenario():
        async with SlackEmulator() as emulator, bridging(emulator) as bridge:
            sent = []
            for n in range(40):
                if n == 20:
                    await emulator.send_disconnect("refresh_requested")
                sent.append(await emulator.send_event(post(str(n), f"17000000{n:02d}.000100")))
            got = [await take(bridge.layer, "slack.receive") for _ in range(40)]
            await emulator.wait_for(lambda: not emulator.unacked(), what="every ack")
            await emulator.send_event(post("last", "1700000099.000100"))
            last = await take(bridge.layer, "slack.receive")
            return bridge, emulator, got, last

    bridge, emulator, got, last = run(scenario())
    assert sorted(int(m["text"]) for m in got) == list(range(40)) and last["text"] == "last"
    assert emulator.hellos == 2 and len(emulator.calls_to("apps.connections.open")) == 2
    assert emulator.peak_connections == 2  # the next connection was opened before the old one was let go
    assert emulator.connections == 0  # the old connection was let go (and the bridge has stopped)
    assert bridge.counters["connects"] == 1  # a recycle is not a reconnect: no slack.disconnect either


def test_a_silently_dead_socket_is_caught_by_the_watchdog(run):
    async def scenario():
        async with SlackEmulator() as emulator, bridging(emulator, {"ping_interval": 0.5}) as bridge:
            states = []
            bridge.health_listeners.append(lambda health: states.append(health["state"]))
            emulator.drop_silently()
            waiting = await emulator.send_event(post("while dead", "1700000001.000100"))
            lost = await take(bridge.layer, "slack.disconnect", timeout=15)
            again = await take(bridge.layer, "slack.connect", timeout=15)
            await emulator.wait_for(lambda: waiting in emulator.acks, what="the envelope on the new socket")
            got = await take(bridge.layer, "slack.receive")
            await wait_until_async(lambda: bridge.health["state"] == "connected", "health to say connected")
            return bridge, emulator, lost, again, got, states

    bridge, emulator, lost, again, got, states = run(scenario())
    assert "degraded" in states  # while the dead socket was being replaced, not before
    assert lost["reason"] == "ping timeout" and again["transport"] == "socket"
    assert got["text"] == "while dead"
    assert len(emulator.calls_to("apps.connections.open")) == 2 and bridge.counters["connects"] == 2


def test_a_connection_slack_closes_is_made_again_with_a_fresh_url(run):
    async def scenario():
        async with SlackEmulator() as emulator, bridging(emulator, {"reconnect_initial": 0.05}) as bridge:
            await emulator.close_connections()
            lost = await take(bridge.layer, "slack.disconnect")
            await take(bridge.layer, "slack.connect")
            await emulator.send_event(post("after", "1700000001.000100"))
            got = await take(bridge.layer, "slack.receive")
            return bridge, emulator, lost, got

    bridge, emulator, lost, got = run(scenario())
    assert lost["reason"] == "connection lost" and got["text"] == "after"
    assert emulator.hellos == 2 and len(emulator.calls_to("apps.connections.open")) == 2
    assert len(emulator.calls_to("auth.test")) == 1 and bridge.counters["connects"] == 2


# -- posting -------------------------------------------------------------------------------------------------------


def test_a_429_holds_only_its_channel_and_keeps_the_order(run):
    async def scenario():
        async with SlackEmulator(posts_per_window=2, window=1.0) as emulator, \
                bridging(emulator, {"rate": 100, "burst": 100}) as bridge:
            await emulator.send_event(post("one", "1700000001.000100"))
            await emulator.send_event(post("two", "1700000002.000100", channel="C222"))
            in_one, in_two = [await take(bridge.layer, "slack.receive") for _ in range(2)]
            for n in range(5):
                await reply(bridge, in_one, {"text": str(n)})
            await emulator.wait_for(lambda: emulator.rate_limited, what="a 429")
            await reply(bridge, in_two, {"text": "other"})
            await emulator.wait_for(lambda: len(texts(emulator, "C111")) == 5 and texts(emulator, "C222"),
                                    what="every post")
            return bridge, emulator

    bridge, emulator = run(scenario())
    assert texts(emulator, "C111") == ["0", "1", "2", "3", "4"]
    posted = [(c.args["channel"], c.args["text"]) for c in emulator.calls_to("chat.postMessage") if c.status == 200]
    assert posted.index(("C222", "other")) < posted.index(("C111", "4"))  # not held behind C111's Retry-After
    assert bridge.counters["rate_limited"] >= 1 and bridge.counters["not_delivered"] == 0


def test_long_text_is_split_under_the_limit_and_escaped(run):
    lines = [f"line {n} & <{n}>" + "x" * 90 for n in range(400)]
    text = "\n".join(lines)

    async def scenario():
        async with SlackEmulator(posts_per_window=1000) as emulator, bridging(emulator, {"burst": 100}) as bridge:
            await emulator.send_event(post("hi", "1700000001.000100"))
            got = await take(bridge.layer, "slack.receive")
            await reply(bridge, got, {"text": text})
            await reply(bridge, got, {"text": "a & b <@U1>"})
            expected = len(text) // 3900 + 2
            await emulator.wait_for(lambda: len(texts(emulator, "C111")) >= expected and
                                    texts(emulator, "C111")[-1] == "a &amp; b &lt;@U1&gt;", what="every piece")
            return emulator

    emulator = run(scenario())
    pieces = texts(emulator, "C111")[:-1]
    assert len(text) > 40_000 and all(len(p) <= 4000 for p in pieces)
    assert "\n".join(pieces) == text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_an_invalid_reply_is_ignored_logged_and_counted(run, caplog):
    async def scenario():
        async with SlackEmulator() as emulator, bridging(emulator) as bridge:
            await emulator.send_event(post("hi", "1700000001.000100"))
            got = await take(bridge.layer, "slack.receive")
            await reply(bridge, got, {"text": "x", "mrkdwn": "y"})
            await reply(bridge, got, {"text": "fine"})
            await emulator.wait_for(lambda: texts(emulator, "C111"), what="the good reply")
            return bridge, emulator

    bridge, emulator = run(scenario())
    assert texts(emulator, "C111") == ["fine"]
    assert bridge.counters["invalid_replies"] == 1
    assert "not both" in caplog.text


def test_malformed_envelopes_are_acknowledged_counted_and_skipped(run):
    async def scenario():
        async with SlackEmulator() as emulator, bridging(emulator) as bridge:
            bad = [await emulator.send_envelope("events_api", {"type": "event_callback", "event": {"type": "message"}}),
                   await emulator.send_envelope("events_api", "not an object"),
                   await emulator.send_envelope("interactive", {"type": "block_actions"})]
            await emulator.send_event(post("good", "1700000001.000100"))
            got = await take(bridge.layer, "slack.receive")
            await emulator.wait_for(lambda: all(e in emulator.acks for e in bad), what="acks of the bad ones")
            return bridge, got

    bridge, got = run(scenario())
    assert got["text"] == "good"
    assert bridge.counters["bad_input"] == 2 and bridge.counters["skipped"] == 1


def test_richer_replies_ephemeral_reaction_update_blocks_and_threads(run):
    async def scenario():
        async with SlackEmulator(posts_per_window=100) as emulator, bridging(emulator, {"burst": 100}) as bridge:
            await emulator.send_event(post("parent", "1700000001.000100"))
            await emulator.send_event(post("child", "1700000002.000100", thread_ts="1700000001.000100"))
            in_channel, in_thread = [await take(bridge.layer, "slack.receive") for _ in range(2)]
            await reply(bridge, in_channel, {"mrkdwn": "*bold* <@U222>"})
            await emulator.wait_for(lambda: texts(emulator, "C111"), what="the first post")
            ours = emulator.history["C111"][0]["ts"]
            await reply(bridge, in_channel, {"type": "reaction", "name": ":thumbsup:", "ts": ours})
            await reply(bridge, in_channel, {"type": "update", "ts": ours, "text": "edited"})
            await reply(bridge, in_channel, {"type": "ephemeral", "user": "U222", "text": "only you"})
            await reply(bridge, in_channel, {"blocks": [{"type": "section", "text": {"type": "mrkdwn",
                                                                                      "text": "*hi*"}}],
                                             "text": "hi"})
            await reply(bridge, in_thread, {"text": "in the thread", "broadcast": True})
            await reply(bridge, in_thread, {"text": "in the channel", "thread": False})
            await emulator.wait_for(lambda: len(emulator.history["C111"]) == 4 and emulator.ephemeral
                                    and emulator.reactions, what="every reply")
            return emulator, ours

    emulator, ours = run(scenario())
    history = emulator.history["C111"]
    assert history[0]["text"] == "edited" and history[0]["ts"] == ours  # mrkdwn as written, then updated
    assert [c.args["text"] for c in emulator.calls_to("chat.postMessage")][0] == "*bold* <@U222>"
    assert history[1]["blocks"][0]["type"] == "section" and history[1]["text"] == "hi"
    assert (history[2]["text"], history[2]["thread_ts"], history[2]["reply_broadcast"]) == (
        "in the thread", "1700000001.000100", True)
    assert history[3]["text"] == "in the channel" and "thread_ts" not in history[3]
    assert emulator.reactions == [("C111", ours, "thumbsup")]
    assert (emulator.ephemeral[0]["user"], emulator.ephemeral[0]["text"]) == ("U222", "only you")


def test_edits_are_delivered_marked_and_previews_skipped(run):
    async def scenario():
        async with SlackEmulator() as emulator, bridging(emulator) as bridge:
            original = {"type": "message", "user": "U222", "text": "teh plan", "ts": "1700000001.000100"}
            edit = {"type": "message", "subtype": "message_changed", "channel": "C111", "hidden": True,
                    "ts": "1700000005.000100", "event_ts": "1700000005.000100",
                    "message": {**original, "text": "the plan", "edited": {"user": "U222"}},
                    "previous_message": original}
            preview = {**edit, "ts": "1700000006.000100", "message": {**original, "attachments": [{}]}}
            await emulator.send_event(preview)
            await emulator.send_event(edit)
            got = await take(bridge.layer, "slack.receive")
            return bridge, got

    bridge, got = run(scenario())
    assert (got["edited"], got["text"], got["ts"]) == (True, "the plan", "1700000001.000100")
    assert bridge.counters["skipped"] == 1


def test_with_lookup_wait_0_an_event_never_waits_for_names_and_the_order_is_kept(run):
    async def scenario():
        async with SlackEmulator(users=USERS, channels=CHANNELS) as emulator, \
                bridging(emulator, {"lookup_wait": 0}) as bridge:
            await emulator.send_event(post("first", "1700000001.000100"))
            first = await take(bridge.layer, "slack.receive")
            await wait_until_async(lambda: not bridge.lookups and bridge.names.get("c:C111", time.monotonic()),
                                   "the lookups to finish")
            await emulator.send_event(post("second", "1700000002.000100"))
            second = await take(bridge.layer, "slack.receive")
            return first, second

    first, second = run(scenario())
    assert (first["sender"], first["room"]) == ("U222", "C111")  # looked up for the next event, not waited for
    assert (second["sender"], second["room"]) == ("alice", "general")


def test_events_behind_one_waiting_for_names_keep_slacks_order(run):
    async def scenario():
        async with SlackEmulator(users=USERS, channels=CHANNELS) as emulator, bridging(emulator) as bridge:
            for n in range(5):  # the first waits for U222's and C111's names; the rest queue behind it
                await emulator.send_event(post(f"line {n}", f"170000000{n + 1}.000100"))
            return [await take(bridge.layer, "slack.receive") for _ in range(5)]

    got = run(scenario())
    assert [m["text"] for m in got] == [f"line {n}" for n in range(5)]
    assert {(m["sender"], m["room"]) for m in got} == {("alice", "general")}


def test_a_failed_name_lookup_never_holds_an_event_back(run):
    async def scenario():
        async with SlackEmulator() as emulator, bridging(emulator) as bridge:
            await emulator.send_event(post("who am I", "1700000001.000100", user="U999", channel="C999"))
            got = await take(bridge.layer, "slack.receive")
            await wait_until_async(lambda: bridge.counters["lookup_failures"] == 2, "both lookups to fail")
            await emulator.send_event(post("still here", "1700000002.000100", user="U999", channel="C999"))
            again = await take(bridge.layer, "slack.receive")
            return bridge, emulator, got, again

    bridge, emulator, got, again = run(scenario())
    assert (got["sender"], got["room"], again["sender"], again["text"]) == ("U999", "C999", "U999", "still here")
    assert len(emulator.calls_to("users.info")) == 1  # not asked again at once: a minute later at the earliest


def test_a_token_slack_refuses_is_reported_and_retried(run, caplog):
    async def scenario():
        async with SlackEmulator() as emulator:
            channel_layer = layer.from_url("memory://")
            bridge = SlackBridge("work", {"bot_token": "xoxb-wrong", "app_token": emulator.app_token,
                                          "api_url": emulator.api_url, "reconnect_initial": 0.05}, channel_layer)
            async with running_in_process(bridge, None):
                await emulator.wait_for(lambda: len(emulator.calls_to("auth.test")) >= 2, what="a second attempt")
                await wait_until_async(lambda: bridge.health["state"] == "degraded", "health to say degraded")
                return bridge.health, emulator

    health, emulator = run(scenario())
    assert "Slack refused the bot token (invalid_auth): check bot_token" in health["reason"]
    assert emulator.calls_to("apps.connections.open") == []
    assert "xoxb-wrong" not in caplog.text


def test_posts_beyond_max_queued_are_dropped_oldest_first_and_counted(run, caplog):
    async def scenario():
        async with SlackEmulator(posts_per_window=1, window=2.0) as emulator, \
                bridging(emulator, {"max_queued": 2, "burst": 100, "rate": 100}) as bridge:
            await emulator.send_event(post("hi", "1700000001.000100"))
            got = await take(bridge.layer, "slack.receive")
            await reply(bridge, got, {"text": "first"})
            await emulator.wait_for(lambda: texts(emulator, "C111"), what="the first post")
            for n in range(5):  # the channel is held by a 429's Retry-After meanwhile
                await reply(bridge, got, {"text": str(n)})
            await wait_until_async(lambda: bridge.counters["outbound_dropped"] == 3, "the overflow")
            await emulator.wait_for(lambda: len(texts(emulator, "C111")) == 3, timeout=15, what="the rest")
            return bridge, emulator

    bridge, emulator = run(scenario(), timeout=40)
    assert texts(emulator, "C111") == ["first", "3", "4"]
    assert "over max_queued (2)" in caplog.text


def test_a_post_that_cannot_be_written_is_logged_counted_and_the_channel_goes_on(run, caplog):
    """Bytes in ``blocks`` pass the reply's checks, but neither orjson nor json writes them (a TypeError): that post
    is dropped with its traceback logged and counted, and the channel's later posts still go."""
    async def scenario():
        async with SlackEmulator() as emulator, bridging(emulator, {"rate": 100, "burst": 100}) as bridge:
            await emulator.send_event(post("hi", "1700000001.000100"))
            got = await take(bridge.layer, "slack.receive")
            await reply(bridge, got, {"text": "one"})
            await reply(bridge, got, {"text": "fallback", "blocks": [{"type": "section", "text": b"raw"}]})
            await reply(bridge, got, {"text": "two"})
            await emulator.wait_for(lambda: len(texts(emulator, "C111")) == 2, what="the posts around the bad one")
            return bridge, emulator

    bridge, emulator = run(scenario())
    assert texts(emulator, "C111") == ["one", "two"]
    assert bridge.counters["not_delivered"] == 1 and bridge.counters["posted"] == 2
    failed = [r for r in caplog.records if "chat.postMessage to C111 failed unexpectedly" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None and failed[0].exc_info[0] is TypeError


def test_events_api_bad_bodies_are_answered_and_counted(run):
    async def scenario():
        async with SlackEmulator() as emulator, events_bridge(emulator) as (bridge, url):
            not_json = await emulator.deliver(url, b"{not json", retries=0)
            unknown = await emulator.deliver(url, {"type": "something_new"}, retries=0)
            elsewhere = await emulator.deliver(url.replace("/slack/events", "/other"), {"type": "x"}, retries=0)
            return bridge, not_json, unknown, elsewhere

    bridge, not_json, unknown, elsewhere = run(scenario())
    assert [a.status for a in not_json + unknown + elsewhere] == [200, 200, 404]
    assert bridge.counters["bad_input"] == 2


# -- slash commands ------------------------------------------------------------------------------------------------


def command_payload(emulator: SlackEmulator, trigger: str) -> dict:
    return {"command": "/deploy", "text": "prod", "user_id": "U222", "user_name": "alice", "channel_id": "C111",
            "channel_name": "general", "team_id": "T111", "trigger_id": trigger,
            "response_url": emulator.response_url(trigger)}


def test_a_slash_command_is_answered_in_the_ack_and_after_it(run):
    async def scenario():
        async with SlackEmulator() as emulator, bridging(emulator, {"command_wait": 0.1}) as bridge:
            # In time: the answer goes back in the acknowledgement.
            bridge.options["command_wait"] = 2.5
            quick = await emulator.send_envelope("slash_commands", command_payload(emulator, "1.1.a"))
            command = await take(bridge.layer, "slack.command")
            await reply(bridge, command, {"text": "deploying <now>"})
            quick_ack = await emulator.wait_for(lambda: emulator.acks.get(quick), what="the ack")
            # Too late for the ack (the test answers only once it is sent): the answer goes to response_url.
            bridge.options["command_wait"] = 0.1
            slow = await emulator.send_envelope("slash_commands", command_payload(emulator, "2.2.b"))
            late = await take(bridge.layer, "slack.command")
            slow_ack = await emulator.wait_for(lambda: emulator.acks.get(slow), what="the ack without an answer")
            await reply(bridge, late, {"text": "done", "response_type": "in_channel"})
            await emulator.wait_for(lambda: emulator.responses, what="the answer on response_url")
            return command, quick_ack, slow_ack, emulator.responses

    command, quick_ack, slow_ack, responses = run(scenario())
    assert (command["command"], command["body"], command["sender"], command["room"]) == (
        "/deploy", "prod", "alice", "general")
    assert quick_ack["payload"] == {"text": "deploying &lt;now&gt;", "response_type": "ephemeral"}
    assert "payload" not in slow_ack
    assert responses == [("/commands/T111/2.2.b/x", {"text": "done", "response_type": "in_channel"})]


def test_acks_of_every_websocket_frame_size_arrive_whole(run):
    # The bridge writes its acks as WebSocket frames of its own (a round's in one write): a plain ack (a length
    # under 126 bytes), and answers in the ack whose frames take the 16-bit and the 64-bit length (40,000 "é" are
    # 240,000 bytes of JSON), all read back by aiohttp's server in the emulator.
    texts = {"3.3.c": "short", "4.4.d": "medium " * 200, "5.5.e": "é" * 40_000}

    async def scenario():
        async with SlackEmulator() as emulator, bridging(emulator, {"command_wait": 2.5}) as bridge:
            sent = {trigger: await emulator.send_envelope("slash_commands", command_payload(emulator, trigger))
                    for trigger in texts}
            for _ in texts:
                command = await take(bridge.layer, "slack.command")
                await reply(bridge, command, {"text": texts[command["trigger_id"]]})
            plain = await emulator.send_event({"type": "message", "channel": "C111", "user": "U222", "text": "hi",
                                               "ts": "1610241741.000900"})
            await emulator.wait_for(lambda: all(e in emulator.acks for e in [*sent.values(), plain]),
                                    what="every ack")
            return {trigger: emulator.acks[envelope] for trigger, envelope in sent.items()}, emulator.acks[plain]

    answered, plain = run(scenario())
    assert {trigger: ack["payload"]["text"] for trigger, ack in answered.items()} == texts
    assert "payload" not in plain


# -- the Events API ------------------------------------------------------------------------------------------------


@asynccontextmanager
async def events_bridge(emulator: SlackEmulator, channel_layer=None, **extra):
    options = {"transport": "events", "app_token": "", "signing_secret": emulator.signing_secret, "port": 0,
               **extra}
    async with bridging(emulator, options, channel_layer=channel_layer) as bridge:
        yield bridge, f"http://127.0.0.1:{bridge.port}/slack/events"


def test_events_api_listener_holds_max_connections(run):
    async def scenario():
        async with SlackEmulator() as emulator, events_bridge(emulator, max_connections=1) as (bridge, url):
            _, idle = await asyncio.open_connection("127.0.0.1", bridge.port)
            await wait_until_async(lambda: bridge.open_connections == 1, "the idle connection to be counted")
            refused = await emulator.deliver(url, {"type": "url_verification", "challenge": "c-1"}, retries=0)
            idle.close()
            await wait_until_async(lambda: bridge.open_connections == 0, "its slot to be freed")
            served = await emulator.deliver(url, {"type": "url_verification", "challenge": "c-2"}, retries=0)
            return bridge, refused, served

    bridge, refused, served = run(scenario())
    assert [a.status for a in refused] == [503] and [a.status for a in served] == [200]
    assert bridge.counters["connections_refused"] == 1


def test_events_api_checks_signatures_and_recognises_retries(run):
    async def scenario():
        async with SlackEmulator() as emulator, events_bridge(emulator) as (bridge, url):
            challenge = await emulator.deliver(url, {"type": "url_verification", "challenge": "c-123",
                                                     "token": "t"})
            payload = emulator.event_callback(post("over http", "1700000001.000100"), event_id="EvH")
            wrong = await emulator.deliver(url, payload, signing_secret="not-the-secret", retries=0)
            stale = await emulator.deliver(url, payload, timestamp=int(time.time()) - 301, retries=0)
            good = await emulator.deliver(url, payload)
            got = await take(bridge.layer, "slack.receive")
            retried = await emulator.deliver(url, payload, headers={"X-Slack-Retry-Num": "1",
                                                                    "X-Slack-Retry-Reason": "http_timeout"})
            await emulator.deliver(url, emulator.event_callback(post("next", "1700000002.000100")))
            after = await take(bridge.layer, "slack.receive")
            return bridge, challenge, wrong, stale, good, got, retried, after

    bridge, challenge, wrong, stale, good, got, retried, after = run(scenario())
    assert json.loads(challenge[0].answer) == {"challenge": "c-123"}
    assert [a.status for a in wrong] == [401] and [a.status for a in stale] == [401]
    assert [a.status for a in good] == [200] and [a.status for a in retried] == [200]
    assert got["event_id"] == "EvH" and got["text"] == "over http"
    assert after["text"] == "next"  # the retry was not delivered again
    assert bridge.counters["bad_signatures"] == 2 and bridge.counters["repeats"] == 1


def test_events_api_answers_503_while_the_layer_is_full_and_slack_retries(run):
    async def scenario():
        channel_layer = layer.from_url("memory://", capacity=1)
        async with SlackEmulator() as emulator, events_bridge(emulator, channel_layer) as (bridge, url):
            await channel_layer.send("slack.receive", {"text": "filler"})
            payload = emulator.event_callback(post("wait", "1700000001.000100"))
            refused = await emulator.deliver(url, payload, retries=1)
            assert (await take(channel_layer, "slack.receive"))["text"] == "filler"
            taken = await emulator.deliver(url, payload, headers={"X-Slack-Retry-Num": "2"})
            got = await take(channel_layer, "slack.receive")
            return refused, taken, got

    refused, taken, got = run(scenario())
    assert [(a.status, a.answer_headers.get("Retry-After")) for a in refused] == [(503, "1"), (503, "1")]
    assert [a.status for a in taken] == [200] and got["text"] == "wait" and got["retry_attempt"] == 2


def test_events_api_slash_command_is_answered_in_the_response(run):
    async def scenario():
        async with SlackEmulator() as emulator, events_bridge(emulator) as (bridge, url):
            from urllib.parse import urlencode

            body = urlencode(command_payload(emulator, "3.3.c")).encode()
            answering = asyncio.ensure_future(emulator.deliver(url, body, retries=0,
                                                               content_type="application/x-www-form-urlencoded"))
            command = await take(bridge.layer, "slack.command")
            await reply(bridge, command, {"text": "ok"})
            return await answering

    answered = run(scenario())
    assert answered[0].status == 200
    assert json.loads(answered[0].answer) == {"text": "ok", "response_type": "ephemeral"}


# -- options and deployment ----------------------------------------------------------------------------------------


def test_options_are_checked():
    base = {"bot_token": "xoxb-1", "app_token": "xapp-1"}
    for options, problem in [
        ({"bot_token": "xapp-1", "app_token": "xapp-1"}, "bot_token: must be a bot token"),
        ({"bot_token": "xoxb-1", "app_token": "xoxb-1"}, "app_token: must be an app-level token"),
        ({"bot_token": "xoxb-1"}, "app_token: is required"),
        ({"bot_token": "xoxb-1", "transport": "events"}, "signing_secret: is required"),
        ({**base, "transport": "rtm"}, "transport: must be"),
        ({**base, "api_url": "https://slack.com/api"}, "api_url: must be an http"),
        ({**base, "path": "slack"}, "path: must start with"),
        ({**base, "command_wait": 3}, "command_wait: must be 0.1 to 2.5"),
        ({**base, "split_at": 40_001}, "split_at: must be 1 to 40000"),
        ({"app_token": "xapp-1"}, "bot_token: is required"),
    ]:
        with pytest.raises(OptionError, match=problem):
            SlackBridge.validate_options(options)
    assert SlackBridge.validate_options({**base, "rate": "2.5"})["rate"] == 2.5


class ThreadedEmulator:
    """The emulator on a loop in a thread of its own, for tests whose bridge runs in another process."""

    def __init__(self, **options) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.emulator = self.call(self._make(options))

    @staticmethod
    async def _make(options: dict) -> SlackEmulator:
        return await SlackEmulator(**options).start()

    def call(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.emulator.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_bridge_and_worker_daemons_over_redis(tmp_path, redis_server, daemons):
    from test_cli import write_config
    from test_daemons import Daemon

    slack = ThreadedEmulator(users=USERS)
    emulator = slack.emulator
    try:
        config = str(write_config(tmp_path, f"""[layer]
url = "{redis_server.url}"
prefix = "slackdaemons{free_port()}"

[routing]
app = "apps.slack_echo:routes"

[bridges.work]
type = "slack"
bot_token = "${{SLACK_BOT_TOKEN}}"
app_token = "${{credential:slack-app-token}}"
api_url = "{emulator.api_url}"
"""))
        (tmp_path / "credentials").mkdir()
        (tmp_path / "credentials" / "slack-app-token").write_text(emulator.app_token)
        env = {"CREDENTIALS_DIRECTORY": str(tmp_path / "credentials"), "SLACK_BOT_TOKEN": emulator.bot_token}
        started = (Daemon(tmp_path, "bridge", "bridge", "work", "--config", config, env=env),
                   Daemon(tmp_path, "worker", "worker", "--config", config, env=env))
        daemons += started
        for daemon in started:
            daemon.wait_ready()
        slack.call(emulator.wait_for(lambda: emulator.hellos == 1, timeout=20, what="the bridge's connection"))
        for n in range(3):
            slack.call(emulator.send_event(post(f"hello {n}", f"170000000{n}.000100")))
        slack.call(emulator.wait_for(lambda: len(texts(emulator, "C111")) == 3, timeout=20, what="three echoes"))
        assert sorted(texts(emulator, "C111")) == [f"echo: hello {n}" for n in range(3)]
        slack.call(emulator.wait_for(lambda: not emulator.unacked(), what="every ack"))
        command = slack.call(emulator.send_envelope("slash_commands", command_payload(emulator, "9.9.d")))
        # The worker's answer goes in the ack when it is in time (command_wait), else to response_url: one of them.
        ack = slack.call(emulator.wait_for(lambda: emulator.acks.get(command), what="the command's ack"))
        answer = ack.get("payload") or slack.call(emulator.wait_for(lambda: emulator.responses, what="an answer"))[0][1]
        assert answer["text"] == "ran /deploy prod"
        for daemon in started:
            log = daemon.terminate()
            assert emulator.app_token not in log and emulator.bot_token not in log  # never printed
    finally:
        slack.close()


def test_a_text_only_reply_is_posted_as_with_its_defaults_spelled_out():
    # handle_reply posts {"text": ...} without building a Reply: the same calls, args and key order as the full path.
    bridge = SlackBridge("work", {"bot_token": "xoxb-t", "app_token": "xapp-t", "split_at": 100}, None)
    posted = []
    bridge._post = lambda channel, method, args: posted.append((channel, method, list(args.items())))
    for local_id in ("c.C1", "t.C1.1700000001.000100"):
        bridge.targets[local_id] = m.target_of(local_id)
        for text in ("hi", "a & <b>", "   ", "line\n" * 300, "x" * 500, "\n\n"):
            posted.clear()
            bridge.handle_reply(local_id, {"text": text})
            fast = list(posted)
            posted.clear()
            bridge.handle_reply(local_id, {"text": text, "thread": True, "broadcast": False, "unfurl": True})
            assert fast == posted and fast, (local_id, text)
