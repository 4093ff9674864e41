"""bridges/slack/messages.py: the pure half of the Slack bridge, every rule checked without a socket.

Payload shapes are Slack's documented ones: the envelopes of slack-sdk's own Socket Mode test server
(tests/slack_sdk/socket_mode/mock_socket_mode_server.py: an ``app_mention`` and a ``message`` from
U222 mentioning the app's user U111 in C111, and the ``/hello-socket-mode`` slash command), and the
message subtypes of api.slack.com/events/message (``message_changed`` with ``message`` and
``previous_message``, hidden ``message_deleted`` and ``message_replied``, ``bot_message``).
"""

from __future__ import annotations

import copy
import json

import pytest

from crossroads.bridges.slack import messages as m

ME = m.Identity(user_id="U111", bot_id="B111", team="T111")
PREFIX = "slack.work.Xy3!"

APP_MENTION = {
    "token": "verification-token", "team_id": "T111", "api_app_id": "A111",
    "event": {"client_msg_id": "f0582a78-72db-4feb-b2f3-1e47d66365c8", "type": "app_mention", "text": "<@U111>",
              "user": "U222", "ts": "1610241741.000200", "team": "T111",
              "blocks": [{"type": "rich_text", "block_id": "Sesm", "elements": [
                  {"type": "rich_text_section", "elements": [{"type": "user", "user_id": "U111"}]}]}],
              "channel": "C111", "event_ts": "1610241741.000200"},
    "type": "event_callback", "event_id": "Ev111", "event_time": 1610241741,
    "authorizations": [{"enterprise_id": None, "team_id": "T111", "user_id": "U222", "is_bot": True,
                        "is_enterprise_install": False}],
    "is_ext_shared_channel": False, "event_context": "1-app_mention-T111-C111",
}
MESSAGE = {
    "token": "verification-token", "team_id": "T111", "api_app_id": "A111",
    "event": {"client_msg_id": "f0582a78-72db-4feb-b2f3-1e47d66365c8", "type": "message",
              "text": "<@U111> Hi here!", "user": "U222", "ts": "1610241741.000200", "team": "T111",
              "channel": "C111", "event_ts": "1610241741.000200", "channel_type": "channel"},
    "type": "event_callback", "event_id": "Ev222", "event_time": 1610241741,
    "is_ext_shared_channel": False, "event_context": "1-message-T111-C111",
}
SLASH_COMMAND = {
    "token": "verification-token", "team_id": "T111", "team_domain": "xxx", "channel_id": "C111",
    "channel_name": "random", "user_id": "U111", "user_name": "testxyz", "command": "/hello-socket-mode",
    "text": "", "api_app_id": "A111", "response_url": "https://hooks.slack.com/commands/T111/111/xxx",
    "trigger_id": "111.222.xxx",
}
USERS = {"U111": "crossroads", "U222": "alice"}.get
CHANNELS = {"C111": "random", "C222": "general"}.get


def payload_with(base: dict, **event) -> dict:
    payload = copy.deepcopy(base)
    payload["event"].update(event)
    return payload


def receive(payload: dict, **kwargs) -> dict:
    message = m.event_message(payload, ME, "work", PREFIX, users=USERS, channels=CHANNELS, **kwargs)
    assert isinstance(message, dict), message
    return message


# -- slack.receive -------------------------------------------------------------------------------------------------


def test_a_message_from_someone_else_becomes_slack_receive_with_every_key():
    message = receive(MESSAGE, retry_attempt=2)
    assert message == {
        "reply_channel": "slack.work.Xy3!c.C111", "team": "T111", "channel": "C111", "channel_type": "channel",
        "user": "U222", "bot_id": None, "ts": "1610241741.000200", "thread_ts": None, "event_id": "Ev222",
        "event_ts": "1610241741.000200", "type": "message", "subtype": None, "edited": False,
        "body": "<@U111> Hi here!", "files": [], "user_name": "alice", "channel_name": "random",
        "mentioned": True, "private": False, "retry_attempt": 2, "network": "work",
        "protocol": "slack", "sender": "alice", "room": "random", "text": "@crossroads Hi here!",
    }
    json.dumps(message)  # plain data: fits the layer's msgpack


def test_an_app_mention_is_mentioned_and_keeps_its_type():
    message = receive(APP_MENTION)
    assert (message["type"], message["mentioned"], message["text"], message["event_id"]) == (
        "app_mention", True, "@crossroads", "Ev111")


def test_without_names_sender_and_room_are_the_ids():
    message = m.event_message(MESSAGE, ME, "work", PREFIX)
    assert (message["sender"], message["room"], message["user_name"], message["channel_name"]) == (
        "U222", "C111", None, None)
    assert message["text"] == "@U111 Hi here!"


def test_a_message_that_does_not_mention_us_is_not_mentioned():
    assert receive(payload_with(MESSAGE, text="hello all"))["mentioned"] is False
    assert receive(payload_with(MESSAGE, text="hi <@U999>"))["mentioned"] is False


def test_a_direct_message_is_private():
    message = receive(payload_with(MESSAGE, channel="D123", channel_type="im", text="psst"))
    assert (message["private"], message["room"], message["reply_channel"]) == (True, "D123", PREFIX + "c.D123")


@pytest.mark.parametrize("own", [{"user": "U111"}, {"user": None, "bot_id": "B111", "subtype": "bot_message"},
                                 {"bot_id": "B111"}])
def test_our_own_posts_never_come_back(own):
    payload = payload_with(MESSAGE, **own)
    payload["event"] = {k: v for k, v in payload["event"].items() if v is not None}
    assert m.event_message(payload, ME, "work", PREFIX) == m.Skip("own")


def test_another_apps_bot_message_is_delivered_with_its_username():
    payload = payload_with(MESSAGE, subtype="bot_message", bot_id="B999", username="deploybot", text="deployed")
    del payload["event"]["user"]
    message = receive(payload)
    assert (message["user"], message["sender"], message["subtype"], message["text"]) == (
        "B999", "deploybot", "bot_message", "deployed")


def test_thread_replies_get_the_threads_reply_channel():
    message = receive(payload_with(MESSAGE, ts="1610241800.000300", thread_ts="1610241741.000200"))
    assert message["reply_channel"] == PREFIX + "t.C111.1610241741.000200"
    assert message["thread_ts"] == "1610241741.000200"


@pytest.mark.parametrize(("threading", "top_level", "in_thread"), [
    ("auto", "c.C111", "t.C111.1.5"),
    ("always", "t.C111.1610241741.000200", "t.C111.1.5"),
    ("never", "c.C111", "c.C111"),
])
def test_the_threading_option_picks_the_reply_channel(threading, top_level, in_thread):
    assert receive(MESSAGE, threading=threading)["reply_channel"] == PREFIX + top_level
    assert receive(payload_with(MESSAGE, thread_ts="1.5"), threading=threading)["reply_channel"] == PREFIX + in_thread


def test_files_are_metadata_only():
    files = [{"id": "F1", "name": "a.png", "title": "a", "mimetype": "image/png", "size": 12,
              "url_private": "https://files.slack.com/files-pri/T1-F1/a.png", "thumb_64": "https://x"}]
    message = receive(payload_with(MESSAGE, subtype="file_share", files=files, text=""))
    assert message["files"] == [{"id": "F1", "name": "a.png", "mimetype": "image/png", "size": 12,
                                 "url_private": "https://files.slack.com/files-pri/T1-F1/a.png"}]
    assert message["subtype"] == "file_share"


def edit(new_text: str, old_text: str = "<@U111> Hi here!", **new) -> dict:
    payload = payload_with(MESSAGE, subtype="message_changed", hidden=True, ts="1610241900.000400",
                           message={"type": "message", "user": "U222", "text": new_text, "ts": "1610241741.000200",
                                    "edited": {"user": "U222", "ts": "1610241900.000000"}, **new},
                           previous_message={"type": "message", "user": "U222", "text": old_text,
                                             "ts": "1610241741.000200"})
    del payload["event"]["user"], payload["event"]["text"]
    return payload


def test_an_edit_is_delivered_as_the_new_text_of_the_original_message():
    message = receive(edit("<@U111> Hi there!"))
    assert (message["edited"], message["ts"], message["text"], message["user"]) == (
        True, "1610241741.000200", "@crossroads Hi there!", "U222")


def test_an_unfurl_or_reply_count_change_is_skipped():
    assert m.event_message(edit("<@U111> Hi here!", attachments=[{"title": "preview"}]), ME, "w", PREFIX) == \
        m.Skip("unfurl")


def test_an_edit_of_our_own_post_is_skipped():
    assert m.event_message(edit("changed", user="U111"), ME, "w", PREFIX) == m.Skip("own")


@pytest.mark.parametrize("subtype", ["message_deleted", "message_replied", "channel_join", "channel_topic"])
def test_hidden_and_bookkeeping_subtypes_are_skipped(subtype):
    payload = payload_with(MESSAGE, subtype=subtype, hidden=subtype in ("message_deleted", "message_replied"))
    assert m.event_message(payload, ME, "w", PREFIX) == m.Skip("hidden")


def test_other_events_are_skipped():
    payload = {"type": "event_callback", "event_id": "Ev9", "event": {"type": "reaction_added", "user": "U222"}}
    assert m.event_message(payload, ME, "w", PREFIX) == m.Skip("other event")


@pytest.mark.parametrize(("payload", "problem"), [
    ("nope", "not an event_callback"),
    ({"type": "url_verification", "challenge": "x"}, "not an event_callback"),
    ({"type": "event_callback", "event_id": "Ev1"}, "no 'event'"),
    ({"type": "event_callback", "event": {"type": "message"}}, "no 'event_id'"),
    ({"type": "event_callback", "event_id": "Ev1", "event": {"type": "message", "user": "U2", "ts": "1.2"}},
     "no 'channel'"),
    ({"type": "event_callback", "event_id": "Ev1", "event": {"type": "message", "user": "U2", "channel": "C1"}},
     "no 'ts'"),
    ({"type": "event_callback", "event_id": "Ev1",
      "event": {"type": "message", "channel": "C1", "ts": "1.2", "text": "x"}}, "no 'user' or 'bot_id'"),
    ({"type": "event_callback", "event_id": "Ev1",
      "event": {"type": "message", "user": "U2", "channel": "C1", "ts": "1.2", "text": 5}}, "'text' is not"),
    ({"type": "event_callback", "event_id": "Ev1",
      "event": {"type": "message", "subtype": "message_changed", "channel": "C1", "ts": "1.2"}}, "no 'message'"),
    ({"type": "event_callback", "event_id": "Ev1",
      "event": {"type": "message", "user": "U2", "channel": "C1", "ts": "1.2", "thread_ts": "x"}}, "not a Slack"),
])
def test_malformed_payloads_say_what_is_wrong(payload, problem):
    with pytest.raises(m.BadInput, match=problem):
        m.event_message(payload, ME, "w", PREFIX)


# -- repeats -------------------------------------------------------------------------------------------------------


def test_a_mention_arriving_as_message_and_app_mention_is_one_post():
    window = m.RepeatWindow(600)
    window.remember(m.repeat_keys(MESSAGE), now=0.0)
    assert window.seen(m.repeat_keys(APP_MENTION), now=1.0)


def test_a_redelivered_event_is_a_repeat_within_the_window_only():
    window = m.RepeatWindow(600)
    keys = m.repeat_keys(MESSAGE)
    assert not window.seen(keys, now=0.0)
    window.remember(keys, now=0.0)
    assert window.seen(keys, now=599.0)
    assert not window.seen(keys, now=600.0)
    assert len(window) == 0


def test_an_edit_is_not_a_repeat_of_its_post():
    window = m.RepeatWindow(600)
    window.remember(m.repeat_keys(MESSAGE), now=0.0)
    changed = edit("new")
    changed["event_id"] = "Ev333"
    assert not window.seen(m.repeat_keys(changed), now=1.0)


def test_the_window_holds_at_most_size_keys_dropping_the_oldest():
    window = m.RepeatWindow(600, size=4)
    for n in range(3):
        window.remember([f"event:{n}", f"post:C:{n}"], now=float(n))
    assert len(window) == 4
    assert not window.seen(["event:0"], now=3.0) and window.seen(["event:2"], now=3.0)


def test_a_key_remembered_again_is_kept_from_its_latest_time():
    window = m.RepeatWindow(600)
    window.remember(["event:1", "post:C:1"], now=0.0)
    window.remember(["event:1"], now=300.0)  # a redelivery stored again
    assert window.seen(["event:1"], now=899.0) and not window.seen(["post:C:1"], now=899.0)
    assert len(window) == 1
    assert not window.seen(["event:1"], now=900.0) and len(window) == 0


def test_the_size_bound_drops_the_oldest_first_and_keeps_newer_times():
    window = m.RepeatWindow(600, size=3)
    window.remember(["a", "b"], now=0.0)
    window.remember(["a"], now=1.0)
    window.remember(["c", "d"], now=2.0)  # 4 keys: the first remember goes, "a" stays (remembered at 1.0)
    assert [window.seen([key], now=3.0) for key in "abcd"] == [True, False, True, True]


def test_remember_all_is_remember_for_each_in_order():
    window = m.RepeatWindow(600, size=3)
    window.remember_all([["a", "b"], ["e"]], now=0.0)
    window.remember_all([["a"], ["c", "d"]], now=1.0)  # 5 keys: the two oldest entries go, "a" stays (at 1.0)
    assert [window.seen([key], now=3.0) for key in "abcde"] == [True, False, True, True, False]
    assert not window.seen(["a"], now=601.0) and len(window) == 0


# -- text ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "text"), [
    ("a &amp; b &lt;tag&gt;", "a & b <tag>"),
    ("&amp;lt; stays literal", "&lt; stays literal"),
    ("hi <@U222>", "hi @alice"),
    ("hi <@U999|bob>", "hi @bob"),
    ("hi <@U999>", "hi @U999"),
    ("see <#C222|general>", "see #general"),
    ("see <#C222>", "see #general"),
    ("see <#C999>", "see #C999"),
    ("<!here> <!channel> <!everyone>", "@here @channel @everyone"),
    ("<!subteam^S123|@devs> ping", "@devs ping"),
    ("<!date^1392734382^{date_short}|Feb 18, 2014>", "Feb 18, 2014"),
    ("<https://example.com|the site>", "the site (https://example.com)"),
    ("<https://example.com>", "https://example.com"),
    ("<http://example.com|example.com>", "example.com"),
    ("<mailto:a@example.com|a@example.com>", "a@example.com"),
    ("<https://x.test/?a=1&amp;b=2|q &amp; a>", "q & a (https://x.test/?a=1&b=2)"),
])
def test_readable_text(body, text):
    assert m.readable(body, USERS, CHANNELS) == text


def test_escape_is_only_the_three_characters():
    assert m.escape("a & b <@U1> > c 'd' \"e\"") == "a &amp; b &lt;@U1&gt; &gt; c 'd' \"e\""
    assert m.readable(m.escape("x &amp; <y> & z")) == "x &amp; <y> & z"


def test_short_text_is_one_post_escaped():
    assert m.split_text("a & b") == ["a &amp; b"]


def test_long_text_splits_on_line_boundaries_and_keeps_every_line():
    lines = [f"line {n} & more" for n in range(400)]
    posts = m.split_text("\n".join(lines), limit=200)
    assert all(len(post) <= 200 for post in posts)
    assert "\n".join(posts) == m.escape("\n".join(lines))


def test_forty_thousand_characters_fit_slack_and_one_more_line_splits():
    text = "\n".join(["x" * 99] * 400)  # 39,999 characters
    assert m.split_text(text, limit=m.TEXT_LIMIT) == [text]
    posts = m.split_text(text + "\nlast", limit=100_000)  # capped at Slack's 40,000
    assert len(posts) == 2 and posts[1] == "last"


def test_a_line_longer_than_the_limit_is_cut_at_a_space():
    posts = m.split_text("word " * 30, limit=42)
    assert all(len(post) <= 42 for post in posts) and all(not post.startswith(" ") for post in posts)
    assert " ".join(posts).split() == ["word"] * 30


def test_a_line_without_spaces_is_cut_hard_but_never_inside_an_entity():
    posts = m.split_text("a" * 8 + "&&&&", limit=10)
    assert all(len(post) <= 10 for post in posts)
    assert "".join(posts) == "a" * 8 + "&amp;" * 4
    assert all(post.count("&") == post.count(";") for post in posts)


def test_a_limit_too_small_for_an_entity_still_ends():
    posts = m.split_text("&&", limit=3)
    assert "".join(posts) == "&amp;&amp;" and all(len(post) <= 3 for post in posts)


def test_blank_lines_alone_make_no_post():
    assert m.split_text("a\n\n\n", limit=1) == ["a"]


# -- reply channels ------------------------------------------------------------------------------------------------

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@pytest.mark.parametrize(("local", "target"), [
    (m.channel_local_id("C111"), m.Target("C111")),
    (m.thread_local_id("C111", "1610241741.000200"), m.Target("C111", "1610241741.000200")),
    (m.channel_local_id("c.weird/id é"), m.Target("c.weird/id é")),
])
def test_reply_ids_are_channel_name_safe_and_round_trip(local, target):
    assert set(local) <= NAME_CHARS and len(local) < m.LOCAL_ID_LIMIT
    assert m.target_of(local) == target


def test_reply_ids_are_stable_per_channel_and_per_thread():
    assert m.channel_local_id("C111") == "c.C111" == m.channel_local_id("C111")
    assert m.thread_local_id("C111", "1.2") != m.thread_local_id("C111", "1.3") != m.channel_local_id("C111")


@pytest.mark.parametrize("local", ["x.C1", "c.", "t.C1", "t.C1.abc", "k.abc"])
def test_other_local_ids_name_no_target(local):
    with pytest.raises(ValueError):
        m.target_of(local)


# -- replies -------------------------------------------------------------------------------------------------------

CHANNEL, THREAD = m.Target("C111"), m.Target("C111", "1610241741.000200")


def test_text_is_escaped_split_and_goes_in_the_thread_it_came_from():
    reply = m.parse_reply({"text": "a & b\n" + "c" * 10}, THREAD, limit=9)
    assert reply == m.Reply("message", ("a &amp; b", "ccccccccc", "c"), thread_ts="1610241741.000200")


def test_a_reply_on_a_channel_goes_in_no_thread_unless_it_names_one():
    assert m.parse_reply({"text": "hi"}, CHANNEL).thread_ts is None
    assert m.parse_reply({"text": "hi", "thread_ts": "1.5"}, CHANNEL).thread_ts == "1.5"


def test_thread_false_posts_in_the_channel_and_broadcast_needs_a_thread():
    assert m.parse_reply({"text": "hi", "thread": False}, THREAD).thread_ts is None
    assert m.parse_reply({"text": "hi", "broadcast": True}, THREAD).broadcast is True
    with pytest.raises(m.InvalidReply, match="no thread"):
        m.parse_reply({"text": "hi", "broadcast": True}, CHANNEL)


def test_mrkdwn_goes_as_written_and_blocks_with_their_fallback():
    assert m.parse_reply({"mrkdwn": "*bold* <@U1>"}, CHANNEL).texts == ("*bold* <@U1>",)
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*hi*"}}]
    reply = m.parse_reply({"blocks": blocks, "text": "hi & bye"}, CHANNEL)
    assert (reply.texts, reply.blocks) == (("hi &amp; bye",), tuple(blocks))
    assert m.parse_reply({"blocks": blocks}, CHANNEL).texts == ("",)


def test_ephemeral_reaction_and_update_replies():
    assert m.parse_reply({"text": "only you", "user": "U222"}, THREAD) == m.Reply(
        "ephemeral", ("only you",), thread_ts="1610241741.000200", user="U222")
    assert m.parse_reply({"type": "reaction", "name": ":thumbsup:", "ts": "1.2"}, CHANNEL) == m.Reply(
        "reaction", name="thumbsup", ts="1.2")
    assert m.parse_reply({"type": "update", "ts": "1.2", "text": "fixed <"}, CHANNEL) == m.Reply(
        "update", ("fixed &lt;",), ts="1.2")


@pytest.mark.parametrize(("content", "problem"), [
    ("hi", "must be a dict"),
    ({}, "nothing to post"),
    ({"text": ""}, "nothing to post"),
    ({"text": 5}, "'text' must be a string"),
    ({"text": "a", "mrkdwn": "b"}, "not both"),
    ({"text": "a", "colour": "red"}, "unknown keys .*'colour'"),
    ({"type": "poll"}, "unknown reply type"),
    ({"blocks": []}, "non-empty list"),
    ({"blocks": [{"text": "no type"}]}, "each with a 'type'"),
    ({"blocks": [{"type": "section"}], "text": "x" * 5000}, "fit in one"),
    ({"mrkdwn": "x" * 40_001}, "at most 40000"),
    ({"text": "a", "thread": "yes"}, "'thread' must be"),
    ({"text": "a", "thread_ts": "tomorrow"}, "'thread_ts' must be"),
    ({"text": "a", "broadcast": 1}, "'broadcast' must be"),
    ({"type": "ephemeral", "text": "a"}, "needs 'user'"),
    ({"type": "reaction", "name": "x"}, "needs 'ts'"),
    ({"type": "reaction", "ts": "1.2", "name": "two words"}, "emoji name"),
    ({"type": "update", "text": "a", "ts": "1"}, "needs 'ts'"),
    ({"type": "update", "ts": "1.2", "text": "x" * 5000}, "too long for one message"),
    ({"type": "reaction", "ts": "1.2", "name": "ok", "text": "a"}, "unknown keys"),
])
def test_invalid_replies_say_what_is_wrong(content, problem):
    with pytest.raises(m.InvalidReply, match=problem):
        m.parse_reply(content, CHANNEL)


# -- slash commands ------------------------------------------------------------------------------------------------


def test_a_slash_command_becomes_slack_command():
    message = m.command_message({**SLASH_COMMAND, "text": "deploy <#C222|general> &amp; tell <@U222>"}, "work",
                                PREFIX, users=USERS)
    assert message == {
        "reply_channel": PREFIX + m.command_local_id("111.222.xxx"), "command": "/hello-socket-mode",
        "body": "deploy <#C222|general> &amp; tell <@U222>", "team": "T111", "channel": "C111", "user": "U111",
        "user_name": "crossroads", "channel_name": "random", "trigger_id": "111.222.xxx",
        "response_url": "https://hooks.slack.com/commands/T111/111/xxx", "retry_attempt": 0, "network": "work",
        "protocol": "slack", "sender": "crossroads", "room": "random", "text": "deploy #general & tell @alice",
    }


def test_each_slash_command_has_its_own_reply_channel():
    one = m.command_local_id("111.222.xxx")
    assert one != m.command_local_id("111.222.yyy") and set(one) <= NAME_CHARS


def test_a_form_encoded_slash_command_reads_like_the_socket_mode_one():
    body = (b"token=verification-token&team_id=T111&channel_id=C111&user_id=U111&command=%2Fhello-socket-mode"
            b"&text=a+%26+b&trigger_id=111.222.xxx&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1")
    fields = m.command_fields(body)
    assert (fields["command"], fields["text"], fields["response_url"]) == (
        "/hello-socket-mode", "a & b", "https://hooks.slack.com/commands/T1")
    assert m.command_message(fields, "w", PREFIX)["text"] == "a & b"


@pytest.mark.parametrize(("payload", "problem"), [
    ([], "not an object"), ({**SLASH_COMMAND, "command": "hello"}, "does not start with '/'"),
    ({k: v for k, v in SLASH_COMMAND.items() if k != "trigger_id"}, "no 'trigger_id'"),
    ({**SLASH_COMMAND, "text": ["a"]}, "'text' is not"),
])
def test_malformed_slash_commands_say_what_is_wrong(payload, problem):
    with pytest.raises(m.BadInput, match=problem):
        m.command_message(payload, "w", PREFIX)


def test_a_form_body_that_is_not_form_encoded_is_bad_input():
    with pytest.raises(m.BadInput):
        m.command_fields(b"\xff\xfe")


def test_slash_command_answers():
    assert m.parse_command_reply({"text": "done & dusted"}) == m.Reply(
        "message", ("done &amp; dusted",), response_type="ephemeral")
    assert m.parse_command_reply({"mrkdwn": "*ok*", "response_type": "in_channel"}).response_type == "in_channel"
    for content, problem in [({"text": "a", "user": "U1"}, "unknown keys"), ({"text": "a", "response_type": "x"},
                             "'response_type' must be"), ({"text": "x" * 40_001}, "too long")]:
        with pytest.raises(m.InvalidReply, match=problem):
            m.parse_command_reply(content)


# -- Events API requests -------------------------------------------------------------------------------------------

JSON, FORM = "application/json", "application/x-www-form-urlencoded"


@pytest.mark.parametrize("raw", [
    '{"envelope_id": "e1", "payload": {"a": [1, 2.5, null, true, "\\u00e9\\n"]}}', '{"a": 1, "a": 2}', " [] ",
    "NaN", "[Infinity, -Infinity]", '"\\ud800"', "\"\ud800\"", b'{"a": "\xc3\xa9"}', '{"a": 1}'.encode("utf-16"),
    "1.0000000000000002", '"\u2028"',
])
def test_parse_json_reads_what_json_reads(raw):
    # orjson first, json for what orjson refuses: one answer either way (NaN compared as text, being unequal to itself)
    assert repr(m.parse_json(raw)) == repr(json.loads(raw))


@pytest.mark.parametrize("raw", ["{not json", "", '{"a": 1', b"\xff", "[1,]"])
def test_parse_json_refuses_what_json_refuses(raw):
    with pytest.raises(ValueError):
        m.parse_json(raw)


def test_events_api_requests_are_told_apart():
    challenge = (b'{"token": "Jhj5dZrVaK7ZwHHjRyZWjbDl", '
                 b'"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"}')
    assert m.parse_events_request(challenge, JSON) == m.EventsRequest(
        "url_verification", json.loads(challenge), "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P")
    assert m.parse_events_request(json.dumps(MESSAGE).encode(), "application/json; charset=utf-8") == \
        m.EventsRequest("event", MESSAGE)
    assert m.parse_events_request(b"ssl_check=1&token=x", FORM).kind == "ssl_check"
    limited = b'{"token": "x", "type": "app_rate_limited", "team_id": "T1", "minute_rate_limited": 1518467820}'
    assert m.parse_events_request(limited, JSON).kind == "app_rate_limited"
    command = m.parse_events_request(b"command=%2Fdeploy&text=now&trigger_id=1.2.x&user_id=U1&channel_id=C1", FORM)
    assert (command.kind, command.payload["command"]) == ("command", "/deploy")


@pytest.mark.parametrize(("body", "content_type", "problem"), [
    (b"{not json", JSON, "not JSON"), (b"[1]", JSON, "not a JSON object"),
    (b'{"type": "url_verification"}', JSON, "'challenge'"), (b'{"type": "block_suggestion"}', JSON, "unknown type"),
    (b"\xff", FORM, "not form-encoded"),
])
def test_malformed_events_api_bodies_say_what_is_wrong(body, content_type, problem):
    with pytest.raises(m.BadInput, match=problem):
        m.parse_events_request(body, content_type)


# -- link messages -------------------------------------------------------------------------------------------------


def test_connect_and_disconnect_messages():
    up = m.connect_message("work", ME, "socket", "wss://wss-primary.slack.com/link")
    assert up == {"bridge": "work", "team": "T111", "user": "U111", "bot_id": "B111", "transport": "socket",
                  "url": "wss://wss-primary.slack.com/link", "protocol": "slack", "sender": "U111", "room": None,
                  "text": None}
    down = m.disconnect_message("work", ME, "socket", "refresh_requested")
    assert down["reason"] == "refresh_requested" and down["protocol"] == "slack"


# -- rate limits ---------------------------------------------------------------------------------------------------


def test_a_channel_posts_a_burst_then_one_a_second():
    limiter = m.ChannelLimiter(rate=1.0, burst=3)
    for _ in range(3):
        assert limiter.wait("C1", now=0.0) == 0
        limiter.take("C1", now=0.0)
    assert limiter.wait("C1", now=0.0) == pytest.approx(1.0)
    assert limiter.wait("C1", now=1.0) == 0


def test_retry_after_holds_that_channel_only():
    limiter = m.ChannelLimiter(rate=1.0, burst=3)
    limiter.take("C1", now=0.0)
    limiter.retry_after("C1", 30, now=0.0)
    assert limiter.wait("C1", now=10.0) == pytest.approx(20.0)
    assert limiter.wait("C2", now=10.0) == 0
    assert limiter.wait("C1", now=30.0) == 0


def test_a_shorter_retry_after_does_not_shorten_a_longer_one():
    limiter = m.ChannelLimiter()
    limiter.retry_after("C1", 30, now=0.0)
    limiter.retry_after("C1", 1, now=0.0)
    assert limiter.wait("C1", now=5.0) == pytest.approx(25.0)


def test_idle_channels_are_forgotten():
    limiter = m.ChannelLimiter(rate=1.0, burst=1)
    for n in range(1001):
        limiter.take(f"C{n}", now=0.0)
    limiter.take("late", now=10.0)
    assert len(limiter._buckets) == 1


# -- names ---------------------------------------------------------------------------------------------------------


def test_names_cache_is_bounded_lru_and_ages_out():
    cache = m.NamesCache(size=2, max_age=60)
    cache.put("U1", "alice", now=0.0)
    cache.put("U2", "bob", now=0.0)
    assert cache.get("U1", now=1.0) == "alice"  # U1 is now the most recent
    cache.put("U3", "carol", now=1.0)
    assert (cache.get("U2", now=1.0), cache.get("U1", now=1.0), len(cache)) == (None, "alice", 2)
    assert cache.get("U3", now=61.0) is None and len(cache) == 1


def test_a_text_only_reply_is_judged_as_with_its_defaults_spelled_out():
    # parse_reply's fast path for {"text": ...} must give what the full checks give.
    for target in (m.Target("C1"), m.Target("C1", "1700000001.000100")):
        for text in ("hi", "a & <b>", "   ", "line\n" * 3000, "x" * 5000, "\n\n"):
            assert m.parse_reply({"text": text}, target, limit=100) == m.parse_reply(
                {"text": text, "thread": True, "broadcast": False, "unfurl": True}, target, limit=100)


def test_claim_takes_as_wait_then_take_would():
    claimed, stepped = m.ChannelLimiter(rate=1.0, burst=3), m.ChannelLimiter(rate=1.0, burst=3)
    for limiter in (claimed, stepped):
        limiter.retry_after("C2", 5, now=0.0)
    for now in (0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.2, 2.5, 6.0, 6.0, 6.0, 6.0):
        for channel in ("C1", "C2"):
            wait = stepped.wait(channel, now)
            if wait == 0:
                stepped.take(channel, now)
            assert claimed.claim(channel, now) == pytest.approx(wait)
    assert {c: b.tokens for c, b in claimed._buckets.items()} == pytest.approx(
        {c: b.tokens for c, b in stepped._buckets.items()})


def test_claim_forgets_idle_buckets_as_take_does():
    limiter = m.ChannelLimiter(rate=1.0, burst=1)
    for n in range(1002):
        assert limiter.claim(f"C{n}", now=0.0) == 0
    assert limiter.claim("C0", now=0.5) == pytest.approx(0.5)  # still spent: not forgotten, nothing taken
    assert limiter.claim("C1", now=10.0) == 0
    assert len(limiter._buckets) == 1 and limiter.claim("C1", now=10.0) == pytest.approx(1.0)
