"""tests/slack_emulator.py, driven by the real slack-sdk on the reactor's loop: what the Slack bridge's tests rely on.

``AsyncWebClient(base_url=...)`` for the Web API, ``slack_sdk.socket_mode.aiohttp.SocketModeClient`` for Socket
Mode (acks, redelivery, disconnect frames, a silently dead socket), and ``slack_sdk.signature.SignatureVerifier``
for the Events API's signatures. Every wait is on an event the emulator records, with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import time

import pytest
from aiohttp import web
from slack_emulator import SlackEmulator, slack_signature
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.signature import SignatureVerifier
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient

MENTION = {"type": "app_mention", "text": "<@U111> hi", "user": "U222", "ts": "1610241741.000200",
           "channel": "C111", "event_ts": "1610241741.000200"}


def web_client(emulator: SlackEmulator, token: str | None = None, **kwargs) -> AsyncWebClient:
    return AsyncWebClient(token=token or emulator.bot_token, base_url=emulator.api_url, **kwargs)


@contextlib.asynccontextmanager
async def socket_mode(emulator: SlackEmulator, *, ack: bool = True, ping_interval: float = 5):
    """A real Socket Mode client, connected; ``received`` collects every request, acked when ``ack``."""
    client = SocketModeClient(app_token=emulator.app_token, web_client=web_client(emulator),
                              ping_interval=ping_interval)
    client.received = []

    async def listener(sdk: SocketModeClient, request: SocketModeRequest) -> None:
        client.received.append(request)
        emulator._changed()
        if ack:
            await sdk.send_socket_mode_response(SocketModeResponse(envelope_id=request.envelope_id))

    client.socket_mode_request_listeners.append(listener)
    await client.connect()
    await emulator.wait_for(lambda: emulator.connections == 1, what="the first connection")
    try:
        yield client
    finally:
        await client.close()


# -- the Web API ---------------------------------------------------------------------------------------------------


def test_auth_test_names_us_and_is_recorded(run):
    async def scenario():
        async with SlackEmulator() as emulator:
            answer = await web_client(emulator).auth_test()
            assert (answer["user_id"], answer["bot_id"], answer["team_id"]) == ("U111", "B111", "T111")
            assert [(c.method, c.token) for c in emulator.calls] == [("auth.test", "xoxb-emulator")]

    run(scenario())


@pytest.mark.parametrize(("token", "error"), [("xoxb-wrong", "invalid_auth"),
                                              ("xapp-emulator", "not_allowed_token_type")])
def test_a_wrong_token_is_refused_as_slack_refuses_it(run, token, error):
    async def scenario():
        async with SlackEmulator() as emulator:
            with pytest.raises(SlackApiError) as caught:
                await web_client(emulator, token).auth_test()
            assert caught.value.response["error"] == error
            with pytest.raises(SlackApiError) as caught:
                await web_client(emulator).apps_connections_open(app_token="xapp-wrong")
            assert caught.value.response["error"] == "invalid_auth"

    run(scenario())


def test_posting_updating_ephemeral_and_reactions_land_in_the_channel(run):
    async def scenario():
        async with SlackEmulator() as emulator:
            client = web_client(emulator)
            posted = await client.chat_postMessage(channel="C111", text="a &amp; b")
            threaded = await client.chat_postMessage(channel="C111", text="in thread", thread_ts=posted["ts"])
            await client.chat_update(channel="C111", ts=posted["ts"], text="edited")
            await client.chat_postEphemeral(channel="C111", user="U222", text="only you")
            await client.reactions_add(channel="C111", timestamp=posted["ts"], name="thumbsup")
            history = emulator.history["C111"]
            assert [(m["text"], m.get("thread_ts")) for m in history] == [("edited", None),
                                                                           ("in thread", posted["ts"])]
            assert threaded["message"]["user"] == "U111"
            assert emulator.ephemeral[0]["user"] == "U222"
            assert emulator.reactions == [("C111", posted["ts"], "thumbsup")]
            with pytest.raises(SlackApiError, match="already_reacted"):
                await client.reactions_add(channel="C111", timestamp=posted["ts"], name="thumbsup")
            with pytest.raises(SlackApiError, match="message_not_found"):
                await client.chat_update(channel="C111", ts="1.2", text="x")
            assert [c.method for c in emulator.calls] == ["chat.postMessage", "chat.postMessage", "chat.update",
                                                          "chat.postEphemeral", "reactions.add", "reactions.add",
                                                          "chat.update"]

    run(scenario())


def test_names_are_looked_up_and_unknown_ones_refused(run):
    async def scenario():
        async with SlackEmulator(users={"U222": "alice"}, channels={"C111": "random"}) as emulator:
            client = web_client(emulator)
            assert (await client.users_info(user="U222"))["user"]["name"] == "alice"
            assert (await client.conversations_info(channel="C111"))["channel"]["name"] == "random"
            with pytest.raises(SlackApiError, match="user_not_found"):
                await client.users_info(user="U999")
            with pytest.raises(SlackApiError, match="channel_not_found"):
                await client.conversations_info(channel="C999")

    run(scenario())


def test_text_over_forty_thousand_characters_is_truncated_with_a_warning(run):
    async def scenario():
        async with SlackEmulator() as emulator:
            answer = await web_client(emulator).chat_postMessage(channel="C1", text="x" * 40_001)
            assert answer["response_metadata"]["warnings"] == ["message_truncated"]
            assert len(emulator.history["C1"][0]["text"]) == 40_000

    run(scenario())


def test_too_many_posts_to_one_channel_get_429_with_retry_after_and_others_go_on(run):
    async def scenario():
        async with SlackEmulator(posts_per_window=2, window=1.0) as emulator:
            client = web_client(emulator)
            for n in range(2):
                await client.chat_postMessage(channel="C1", text=f"{n}")
            with pytest.raises(SlackApiError) as caught:
                await client.chat_postMessage(channel="C1", text="2")
            assert caught.value.response.status_code == 429
            assert caught.value.response["error"] == "ratelimited"
            assert int(caught.value.response.headers["Retry-After"]) >= 1
            await client.chat_postMessage(channel="C2", text="other channel")  # not held by C1's limit
            assert emulator.rate_limited == ["C1"]

            # slack-sdk's own retry handler honours Retry-After, and the post goes through, in order.
            patient = web_client(emulator, retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=2)])
            await patient.chat_postMessage(channel="C1", text="2")
            assert [m["text"] for m in emulator.history["C1"]] == ["0", "1", "2"]

    run(scenario())


# -- Socket Mode ---------------------------------------------------------------------------------------------------


def test_an_envelope_reaches_the_sdk_and_its_ack_is_recorded(run):
    async def scenario():
        async with SlackEmulator() as emulator, socket_mode(emulator) as client:
            envelope_id = await emulator.send_event(MENTION, event_id="Ev1")
            await emulator.wait_for(lambda: envelope_id in emulator.acks, what="the ack")
            request = client.received[0]
            assert (request.type, request.envelope_id, request.retry_attempt) == ("events_api", envelope_id, 0)
            assert request.payload["event"]["text"] == "<@U111> hi" and request.payload["event_id"] == "Ev1"
            assert emulator.unacked() == [] and emulator.hellos == 1
            assert [c.method for c in emulator.calls] == ["apps.connections.open"]

    run(scenario())


def test_envelopes_arrive_in_the_order_queued(run):
    async def scenario():
        async with SlackEmulator() as emulator, socket_mode(emulator) as client:
            ids = [await emulator.send_event({**MENTION, "text": str(n)}) for n in range(20)]
            await emulator.wait_for(lambda: len(emulator.acks) == 20, what="20 acks")
            assert [r.envelope_id for r in client.received] == ids

    run(scenario())


def test_an_unacked_envelope_comes_again_with_retry_attempt(run):
    async def scenario():
        async with SlackEmulator() as emulator, socket_mode(emulator, ack=False) as client:
            envelope_id = await emulator.send_event(MENTION)
            await emulator.wait_for(lambda: len(client.received) == 1, what="the first delivery")
            assert emulator.unacked() == [envelope_id]
            await emulator.redeliver()
            await emulator.wait_for(lambda: len(client.received) == 2, what="the redelivery")
            again = client.received[1]
            assert (again.envelope_id, again.retry_attempt, again.retry_reason) == (envelope_id, 1, "timeout")
            await client.send_socket_mode_response(SocketModeResponse(envelope_id=envelope_id))
            await emulator.wait_for(lambda: envelope_id in emulator.acks, what="the late ack")

    run(scenario())


def test_a_slash_command_ack_carries_its_response_payload(run):
    command = {"command": "/hello", "text": "", "user_id": "U222", "channel_id": "C111",
               "trigger_id": "111.222.xxx", "response_url": "https://hooks.slack.com/commands/T111/1/x"}

    async def scenario():
        async with SlackEmulator() as emulator, socket_mode(emulator, ack=False) as client:
            envelope_id = await emulator.send_envelope("slash_commands", command)
            await emulator.wait_for(lambda: client.received, what="the command")
            assert client.received[0].accepts_response_payload is True
            await client.send_socket_mode_response(SocketModeResponse(envelope_id, payload={"text": "hello!"}))
            ack = await emulator.wait_for(lambda: emulator.acks.get(envelope_id), what="the ack")
            assert ack["payload"] == {"text": "hello!"}

    run(scenario())


def test_a_disconnect_frame_makes_the_sdk_ask_for_a_new_url_and_nothing_is_lost(run):
    async def scenario():
        async with SlackEmulator() as emulator, socket_mode(emulator) as client:
            await emulator.send_disconnect("refresh_requested")
            await emulator.wait_for(lambda: emulator.hellos == 2, what="the second hello")
            assert len(emulator.calls_to("apps.connections.open")) == 2
            envelope_id = await emulator.send_event(MENTION)
            await emulator.wait_for(lambda: envelope_id in emulator.acks, what="the ack on the new socket")
            assert [r.envelope_id for r in client.received] == [envelope_id]

    run(scenario())


def test_an_envelope_unacked_when_its_socket_closes_comes_on_the_next(run):
    async def scenario():
        async with SlackEmulator() as emulator, socket_mode(emulator, ack=False) as client:
            envelope_id = await emulator.send_event(MENTION)
            await emulator.wait_for(lambda: client.received, what="the first delivery")
            client.socket_mode_request_listeners.append(
                lambda sdk, request: sdk.send_socket_mode_response(SocketModeResponse(request.envelope_id)))
            await emulator.send_disconnect("warning")
            await emulator.wait_for(lambda: envelope_id in emulator.acks, what="the ack after the switch")
            assert emulator.hellos == 2
            assert [(r.envelope_id, r.retry_attempt) for r in client.received] == [(envelope_id, 0), (envelope_id, 1)]

    run(scenario())


def test_a_silently_dead_socket_is_noticed_by_the_sdks_ping_and_replaced(run):
    async def scenario():
        async with SlackEmulator() as emulator, socket_mode(emulator, ping_interval=0.1) as client:
            emulator.drop_silently()
            envelope_id = await emulator.send_event(MENTION)  # waits: no live socket to send it on
            assert client.received == []
            await emulator.wait_for(lambda: emulator.hellos == 2, timeout=15, what="the reconnect")
            await emulator.wait_for(lambda: envelope_id in emulator.acks, what="the envelope on the new socket")
            assert len(emulator.calls_to("apps.connections.open")) == 2

    run(scenario())


# -- the Events API ------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def receiver(statuses: list[int], verifier: SignatureVerifier):
    """An HTTP endpoint answering each POST with the next of ``statuses``; it records whether each was signed right."""
    seen: list[tuple[bool, dict[str, str], bytes]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((verifier.is_valid_request(body, dict(request.headers)), dict(request.headers), body))
        status = statuses[min(len(seen), len(statuses)) - 1]
        return web.Response(status=status, headers={"X-Slack-No-Retry": "1"} if status == 400 else {})

    app = web.Application()
    app.router.add_post("/slack/events", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/slack/events", seen
    finally:
        await runner.cleanup()


def test_deliveries_are_signed_as_slack_signs_them(run):
    async def scenario():
        async with SlackEmulator() as emulator:
            verifier = SignatureVerifier(emulator.signing_secret)
            async with receiver([200], verifier) as (url, seen):
                payload = emulator.event_callback(MENTION, event_id="Ev1")
                attempts = await emulator.deliver(url, payload)
                assert [a.status for a in attempts] == [200]
                valid, headers, body = seen[0]
                assert valid and json.loads(body)["event_id"] == "Ev1"
                assert headers["X-Slack-Signature"] == verifier.generate_signature(
                    timestamp=headers["X-Slack-Request-Timestamp"], body=body)
                assert "X-Slack-Retry-Num" not in headers

    run(scenario())


def test_a_wrong_secret_or_a_stale_timestamp_fails_the_sdks_check(run):
    async def scenario():
        async with SlackEmulator() as emulator:
            async with receiver([200], SignatureVerifier(emulator.signing_secret)) as (url, seen):
                payload = emulator.event_callback(MENTION)
                await emulator.deliver(url, payload, signing_secret="not-the-secret")
                await emulator.deliver(url, payload, timestamp=int(time.time()) - 301)
                await emulator.deliver(url, payload, timestamp=int(time.time()) - 250)
                assert [valid for valid, _, _ in seen] == [False, False, True]

    run(scenario())


def test_a_failed_delivery_is_retried_with_its_number_until_a_2xx(run):
    async def scenario():
        async with SlackEmulator() as emulator:
            async with receiver([503, 503, 200], SignatureVerifier(emulator.signing_secret)) as (url, seen):
                attempts = await emulator.deliver(url, emulator.event_callback(MENTION))
                assert [(a.status, a.headers.get("X-Slack-Retry-Num")) for a in attempts] == [
                    (503, None), (503, "1"), (200, "2")]
                assert all(valid for valid, _, _ in seen)
                assert seen[1][1]["X-Slack-Retry-Reason"] == "http_error"
            async with receiver([500], SignatureVerifier(emulator.signing_secret)) as (url, seen):
                assert len(await emulator.deliver(url, emulator.event_callback(MENTION), retries=3)) == 4
            async with receiver([400], SignatureVerifier(emulator.signing_secret)) as (url, seen):
                assert len(await emulator.deliver(url, emulator.event_callback(MENTION))) == 1  # X-Slack-No-Retry

    run(scenario())


def test_the_signature_helper_matches_the_sdks():
    verifier = SignatureVerifier("s3cret")
    assert slack_signature("s3cret", "1531420618", b'{"a": 1}') == verifier.generate_signature(
        timestamp="1531420618", body=b'{"a": 1}')
