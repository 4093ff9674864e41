"""bridges/irc/messages.py: the pure half of the IRC bridge, every rule checked without a socket."""

from __future__ import annotations

import base64
import itertools

import pytest

from crossroads.bridges.irc import messages as m

# -- options -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("irc://irc.example.org", m.ServerAddress("irc.example.org", 6667, False)),
    ("ircs://irc.example.org", m.ServerAddress("irc.example.org", 6697, True)),
    ("irc://127.0.0.1:7000", m.ServerAddress("127.0.0.1", 7000, False)),
    ("ircs://[::1]:6697/", m.ServerAddress("::1", 6697, True)),
])
def test_server_urls(url, expected):
    assert m.parse_server(url) == expected


@pytest.mark.parametrize(("url", "problem"), [
    ("irc.example.org", "must name the scheme: \"ircs://irc.example.org\" \\(TLS"), ("irc://x:6667x", "bad port"),
    ("http://x", "must be irc://"), ("irc://", "no host"),
    ("irc://x:99999", "bad port"), ("irc://x/#chat", "channels go in"), ("irc://u:p@x", "only irc"),
])
def test_bad_server_urls_say_what_is_wrong(url, problem):
    with pytest.raises(ValueError, match=problem):
        m.parse_server(url)


def test_channels_option_takes_names_and_tables():
    assert m.parse_channels(["#chat", {"name": "#ops", "key": "k"}, {"name": "&local"}]) == [
        m.ChannelSpec("#chat"), m.ChannelSpec("#ops", "k"), m.ChannelSpec("&local")]


@pytest.mark.parametrize(("entry", "problem"), [
    ("chat", "must start with"), ("#a b", "may not contain"), ("#a,#b", "may not contain"), ("#a\r\n", "may not"),
    ("", "non-empty"), (5, "non-empty"), ({"name": "#x", "password": "p"}, "name and key"),
    ({"name": "#x", "key": "a b"}, "key of #x"), ({"name": "#x", "key": "k\nQUIT"}, "key of #x"),
    ({"key": "k"}, "non-empty"),
])
def test_bad_channels(entry, problem):
    with pytest.raises(ValueError, match=problem):
        m.parse_channels([entry])


@pytest.mark.parametrize("nick", ["bot", "Bot_2", "[away]", "a-b", "`x", "{x}|^"])
def test_valid_nicks(nick):
    assert m.nick_problem(nick) is None


@pytest.mark.parametrize("nick", ["", "9lives", "-x", "a b", "a\r\nQUIT", "#chan", "é", None, ":x"])
def test_invalid_nicks(nick):
    assert m.nick_problem(nick)


# -- names ---------------------------------------------------------------------------------------------------


def test_case_mappings():
    assert m.irc_lower("#Chat[1]~") == "#chat{1}^"
    assert m.irc_lower("#Chat[1]~", "strict-rfc1459") == "#chat{1}~"
    assert m.irc_lower("#Chat[1]~", "ascii") == "#chat[1]~"
    assert m.irc_lower("ÉCOLE", "ascii") == "École"  # only ASCII letters fold, as servers do


def test_local_ids_are_stable_valid_and_distinct():
    assert m.target_local_id("#Chat") == m.target_local_id("#chat") == "c._23chat"
    assert m.target_local_id("Alice") == "p.alice"
    assert m.target_local_id("a_b") != m.target_local_id("a.b")  # '_' is escaped too, so no two names meet
    assert m.target_local_id("#café") == "c._23caf_c3_a9"
    assert m.target_local_id("#chat") != m.target_local_id("chat")  # a channel and a nick never share one
    long = "#" + "x" * 100
    assert m.target_local_id(long) == m.target_local_id(long.upper()) and len(m.target_local_id(long)) <= 60
    for name in ["#Chat", "x[]\\`^{|}-", "#a.b", "&ops"]:
        assert all(ch.isalnum() and ch.isascii() or ch in "-_." for ch in m.target_local_id(name))


def test_nick_of_a_prefix():
    assert m.nick_of("alice!~a@host") == "alice"
    assert m.nick_of("alice@host") == "alice"
    assert m.nick_of("irc.example.org") == "irc.example.org"


def test_nick_candidates_without_a_limit():
    assert list(itertools.islice(m.nick_candidates("bot", ["bot2", "robot"]), 6)) == [
        "bot", "bot2", "robot", "bot_", "bot3", "bot4"]  # the generated bot2 is the configured one: asked once


@pytest.mark.parametrize("limit", [1, 2, 3, 8, 9, 10, 11, 30])
@pytest.mark.parametrize("length", [1, 2, 8, 9, 10, 11, 20])
@pytest.mark.parametrize("alternates", [[], ["alt"], ["crossroads-alternate", "CROSSROADS_", "x"]])
def test_nick_candidates_fit_the_limit(limit, length, alternates):
    nick = "crossroadsbridgebot"[:length]
    candidates = list(itertools.islice(m.nick_candidates(nick, alternates, limit), 1000))
    head: list[str] = []  # truncate first: the nick, then the alternates, each cut, each once
    for name in [nick, *alternates]:
        if m.irc_lower(name[:limit]) not in {m.irc_lower(h) for h in head}:
            head.append(name[:limit])
    assert candidates[:len(head)] == head
    for candidate in candidates:
        assert m.nick_problem(candidate) is None and 1 <= len(candidate) <= limit
    assert len({m.irc_lower(c) for c in candidates}) == len(candidates)  # never the same nick twice
    for varied in candidates[len(head):]:  # then vary: the nick cut so that its suffix fits
        stem = varied.rstrip("_0123456789") or varied[:1]
        suffix = varied[len(stem):]
        assert suffix == "_" or suffix.isdigit() and int(suffix) >= 2
        assert stem == nick[:min(len(nick), limit - len(suffix))]
    if limit >= 3:  # enough variations for every attempt of a registration
        assert len(candidates) >= m.MAX_NICK_ATTEMPTS
    elif limit == 1:
        assert candidates == head


def test_nick_choice_fits_a_nick_the_server_refuses_as_too_long():
    choice = m.NickChoice("crossroads", [])
    assert choice.next() == "crossroads"
    assert choice.refused("Nickname too long, max. 9 characters") == "crossroad"  # ngircd states its limit
    assert choice.next() == "crossroa_" and choice.next() == "crossroa2"  # taken: vary within the limit
    assert choice.refused("Erroneous nickname") is None  # it fits: the server refuses it for another reason
    choice = m.NickChoice("crossroads_bridge", ["crossroads_alternate"])
    choice.next()
    assert choice.refused("Erroneous nickname") == "crossroad"  # no limit stated: RFC 1459's 9, which all take
    assert choice.next() == "crossroa_"  # the alternate cut to 9 is the nick already asked for: skipped
    assert choice.wanted == "crossroad"


def test_nick_choice_skips_what_it_asked_for_before_a_refusal():
    choice = m.NickChoice("ninechars", [])
    assert choice.next() == "ninechars" and choice.next() == "ninechars_"  # taken, then one too long
    assert choice.refused("Nickname too long, max. 9 characters") == "ninechar_"
    assert choice.refused("Nickname too long, max. 12 characters") is None  # a longer limit never loosens ours


def test_nick_choice_gives_up_after_max_attempts():
    choice = m.NickChoice("bot", ["bot2"])
    asked = [choice.next() for _ in range(m.MAX_NICK_ATTEMPTS)]
    assert len(set(asked)) == m.MAX_NICK_ATTEMPTS and choice.next() is None
    assert m.NickChoice("b", [], limit=1).next() == "b"
    tiny = m.NickChoice("b", [], limit=1)
    tiny.next()
    assert tiny.next() is None  # nothing else fits in one character


def test_nick_choice_learns_the_advertised_nicklen():
    choice = m.NickChoice("crossroads", [], limit=9)  # guessed from a refusal
    choice.advertised(["CHANTYPES=#&+", "NICKLEN=30", "PENALTY"])
    assert choice.wanted == "crossroads"
    choice.advertised(["TOPICLEN=490"])  # a 005 line without NICKLEN changes nothing
    assert choice.limit == 30
    assert m.advertised_nick_length(["NICKLEN=x", "NICKLEN=0", "nicklen=12"]) == 12
    assert m.advertised_nick_length(["NICKLEN", "MAXNICKLEN=31"]) is None


# -- lines from the server -----------------------------------------------------------------------------------


def test_parse_lines():
    line = m.parse_line(":alice!~a@h PRIVMSG #chat :hello there :)")
    assert (line.prefix, line.command, line.params) == ("alice!~a@h", "PRIVMSG", ["#chat", "hello there :)"])
    assert m.parse_line("PING :irc.test").params == ["irc.test"]
    assert m.parse_line(":srv 001 bot :Welcome").command == "001"
    assert m.parse_line(":srv 005 bot A=1 B :are supported").params == ["bot", "A=1", "B", "are supported"]
    assert m.parse_line("@time=2026-01-01T00:00:00Z;x :a!b@c JOIN #x").tags == {"time": "2026-01-01T00:00:00Z",
                                                                              "x": ""}
    assert m.parse_line(":a!b@c PRIVMSG #x :").params == ["#x", ""]
    assert m.parse_line(":a!b@c  JOIN   #x").params == ["#x"]
    assert m.parse_line("privmsg #x :lower").command == "PRIVMSG"


@pytest.mark.parametrize("text", ["", ":prefix-only", ":p :x", "@tags-only", "   ", "P!NG :x"])
def test_unparseable_lines(text):
    with pytest.raises(m.BadLine):
        m.parse_line(text)


def test_decoding_falls_back_to_latin1():
    assert m.decode("café".encode()) == ("café", True)
    assert m.decode("café".encode("latin-1")) == ("café", False)


def test_strip_formatting():
    assert m.strip_formatting("\x02bold\x02 \x1ditalic\x1d \x1funder\x1f \x1estrike\x1e \x11mono\x11") == \
        "bold italic under strike mono"
    assert m.strip_formatting("\x0304red\x03 \x0304,12on blue\x03 \x03plain \x0f\x16rev") == "red on blue plain rev"
    assert m.strip_formatting("\x031234") == "34"  # colors take at most two digits
    assert m.strip_formatting("\x04ff0000hex\x04 \x04ff0000,00ff00both") == "hex both"
    assert m.strip_formatting("5\x03,3 not a bg") == "5,3 not a bg"


def test_ctcp():
    assert m.parse_ctcp("\x01ACTION waves\x01") == ("ACTION", "waves")
    assert m.parse_ctcp("\x01action waves") == ("ACTION", "waves")  # unterminated, as some clients send
    assert m.parse_ctcp("\x01VERSION\x01") == ("VERSION", "")
    assert m.parse_ctcp("hello") is None and m.parse_ctcp("\x01") is None


# -- lines to the server -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "a\0b"])
def test_command_refuses_line_breaks_and_nul_anywhere(bad):
    with pytest.raises(m.UnsafeText):
        m.command("PRIVMSG", "#x", trailing=bad)
    with pytest.raises(m.UnsafeText):
        m.command("PRIVMSG", bad, trailing="x")
    with pytest.raises(m.UnsafeText):
        m.command(bad)


@pytest.mark.parametrize("param", ["a b", ":x", ""])
def test_command_refuses_params_that_would_shift_the_others(param):
    with pytest.raises(m.UnsafeText):
        m.command("JOIN", param)


def test_breaks_lines():
    assert m.breaks_lines("a\rb") and m.breaks_lines("a\nb") and m.breaks_lines("a\0b")
    assert not m.breaks_lines("a b\x01\x02\u2028")  # other separators are cut by text_lines, not refused


def test_command():
    assert m.command("JOIN", "#x", "key") == "JOIN #x key"
    assert m.command("PRIVMSG", "#x", trailing=":) hi") == "PRIVMSG #x ::) hi"
    assert m.command("QUIT", trailing="") == "QUIT :"


def test_text_lines_cut_at_every_line_break():
    assert m.text_lines("a\nb\r\nc\rd\x0be\x0cf\x1cg\u2028h\x85i") == list("abcdefghi")
    assert m.text_lines("one\n\n  \ntwo") == ["one", "two"]
    assert m.text_lines("nul\0here") == ["nulhere"]
    assert m.text_lines("") == [] and m.text_lines("\r\n") == []


def test_split_utf8_on_character_boundaries():
    text = "é" * 10  # 2 bytes each
    assert m.split_utf8(text, 5) == ["éé", "éé", "éé", "éé", "éé"]
    assert m.split_utf8("😀" * 3, 7) == ["😀", "😀", "😀"]  # 4 bytes each: never half of one
    for piece in m.split_utf8("aé😀" * 50, 33):
        assert len(piece.encode()) <= 33
    assert "".join(m.split_utf8("aé😀" * 50, 33)) == "aé😀" * 50
    with pytest.raises(ValueError):
        m.split_utf8("x", 3)


def test_split_prefers_spaces_and_drops_them():
    assert m.split_utf8("aaaa bbbb cccc", 10) == ["aaaa bbbb", "cccc"]
    assert m.split_utf8("aaaaaaaaa bbbb", 9) == ["aaaaaaaaa", "bbbb"]  # the space right after the cut
    assert m.split_utf8("a bbbbbbbbbbbbbbbbbbb", 10) == ["a bbbbbbbb", "bbbbbbbbbbb"[:10], "b"]  # no space near


def test_prefix_length():
    assert m.prefix_length("bot", "~bot", "127.0.0.1") == len(":bot!~bot@127.0.0.1 ")
    assert m.prefix_length("bot", None, None) == len(":bot!") + 11 + 1 + 63 + 1  # the worst case until known


@pytest.mark.parametrize("kind", [m.MESSAGE, m.ACTION, m.NOTICE])
@pytest.mark.parametrize("target", ["#chat", "somebody"])
def test_say_lines_fit_512_bytes_as_relayed(kind, target):
    prefix = ":crossroads!~crossroads@some.host.example "
    text = ("ü" * 700) + "\n" + ("word " * 200) + "\n\nshort"
    lines = m.say_lines(kind, target, text, len(prefix.encode()))
    for line in lines:
        assert len((prefix + line + "\r\n").encode()) <= 512
    verb = "NOTICE" if kind == m.NOTICE else "PRIVMSG"
    assert all(line.startswith(f"{verb} {target} :") for line in lines)
    bodies = [line.split(" :", 1)[1] for line in lines]
    if kind == m.ACTION:
        assert all(b.startswith("\x01ACTION ") and b.endswith("\x01") for b in bodies)
        bodies = [b[8:-1] for b in bodies]
    umlauts = [b for b in bodies if "ü" in b]
    assert "".join(umlauts) == "ü" * 700 and bodies[-1] == "short"
    assert " ".join(bodies[len(umlauts):-1]) == ("word " * 200).strip()
    assert max(len((prefix + line + "\r\n").encode()) for line in lines) >= 500  # full lines, not timid ones


def test_say_lines_refuse_bad_targets():
    for target in ["#a b", "x\r\nQUIT", "", ":x"]:
        with pytest.raises(m.UnsafeText):
            m.say_lines(m.MESSAGE, target, "hi", 40)
    with pytest.raises(m.UnsafeText, match="too long"):
        m.say_lines(m.MESSAGE, "#" + "x" * 199, "hi", 300)


def test_say_lines_never_contain_line_breaks():
    lines = m.say_lines(m.MESSAGE, "#x", "a\rQUIT\nJOIN #evil\0\r\n", 40)
    assert lines == ["PRIVMSG #x :a", "PRIVMSG #x :QUIT", "PRIVMSG #x :JOIN #evil"]


def test_join_and_part_lines():
    assert m.join_line(m.ChannelSpec("#x")) == "JOIN #x"
    assert m.join_line(m.ChannelSpec("#x", "k")) == "JOIN #x k"
    assert m.part_line("#x") == "PART #x"
    assert m.part_line("#x", "bye\r\nQUIT") == "PART #x :bye QUIT"


def test_sasl_plain_pieces():
    assert m.sasl_plain("me", "pw") == [base64.b64encode(b"me\0me\0pw").decode()]
    long = m.sasl_plain("u", "p" * 600)
    assert all(len(piece) <= 400 for piece in long) and len(long) == 3
    assert base64.b64decode("".join(long)) == b"u\0u\0" + b"p" * 600
    exact = m.sasl_plain("u", "p" * 296)  # 300 bytes -> exactly 400 base64 characters
    assert len(exact[0]) == 400 and exact[1] == "+"


# -- the token bucket ----------------------------------------------------------------------------------------


def test_token_bucket_burst_then_rate():
    bucket = m.TokenBucket(rate=2.0, burst=3, now=0.0)
    for _ in range(3):
        assert bucket.wait(0.0) == 0
        bucket.take(0.0)
    assert bucket.wait(0.0) == pytest.approx(0.5)
    assert bucket.wait(0.25) == pytest.approx(0.25)
    assert bucket.wait(0.5) == 0
    bucket.take(0.5)
    assert bucket.wait(0.5) == pytest.approx(0.5)
    assert bucket.wait(100.0) == 0 and bucket.tokens == 3  # refills to the burst, never beyond


def test_token_bucket_debt_delays_later_lines():
    bucket = m.TokenBucket(rate=1.0, burst=1, now=0.0)
    for _ in range(3):  # e.g. three JOINs after a reconnect
        bucket.take(0.0)
    assert bucket.wait(0.0) == pytest.approx(3.0)


def test_token_bucket_claim_takes_as_wait_then_take_would():
    claimed, stepped = m.TokenBucket(rate=2.0, burst=3, now=0.0), m.TokenBucket(rate=2.0, burst=3, now=0.0)
    for now in (0.0, 0.0, 0.0, 0.0, 0.1, 0.5, 0.6, 2.0, 100.0, 100.0):
        wait = stepped.wait(now)
        if wait == 0:
            stepped.take(now)
        assert claimed.claim(now) == pytest.approx(wait)
        assert (claimed.tokens, claimed.stamp) == pytest.approx((stepped.tokens, stepped.stamp))
    claimed.take(100.0)
    claimed.take(100.0)  # in debt: a claim waits it out and takes nothing
    assert claimed.claim(100.0) == pytest.approx(1.0) and claimed.tokens == pytest.approx(-1.0)


# -- membership ----------------------------------------------------------------------------------------------


def test_membership_tells_where_a_quitting_user_was():
    who = m.Membership("rfc1459")
    who.names("#a", ["@Alice", "+bob", "bot"])
    who.joined("#B", "alice")
    who.joined("#c", "carol")
    assert sorted(who.quit("ALICE")) == ["#a", "#b"]
    assert who.quit("alice") == []
    who.renamed("bob", "robert")
    assert who.quit("bob") == [] and who.quit("Robert") == ["#a"]
    who.parted("#c", "carol")
    assert who.quit("carol") == []
    who.parted("#a", "bot", ours=True)
    assert "#a" not in who.channels
    who.clear()
    assert who.channels == {}


# -- messages to the layer -----------------------------------------------------------------------------------


SHARED = {"reply_channel", "protocol", "sender", "room", "text"}


def test_receive_message_in_a_channel():
    msg = m.receive_message("irc.n.x!c._23chat", m.MESSAGE, "alice!~a@h", "#chat", "\x02hi\x02", "libera")
    assert SHARED <= msg.keys()
    assert msg == {"reply_channel": "irc.n.x!c._23chat", "type": "message", "user": "alice!~a@h", "nick": "alice",
                   "channel": "#chat", "private": False, "body": "\x02hi\x02", "network": "libera", "protocol": "irc",
                   "sender": "alice", "room": "#chat", "text": "hi"}


def test_receive_message_in_private():
    msg = m.receive_message("r", m.ACTION, "alice!~a@h", "bot", "waves", "libera")
    assert msg["private"] is True and msg["channel"] is None and msg["room"] == "alice" and msg["type"] == "action"


def test_join_part_connect_messages():
    join = m.join_message("r", "#x", "bob!~b@h", False, "n")
    assert SHARED <= join.keys() and join["nick"] == join["sender"] == "bob" and join["ours"] is False
    part = m.part_message("r", "#x", "bob", False, "n", how="kick", reason="spam", by="op")
    assert (part["how"], part["reason"], part["by"], part["nick"]) == ("kick", "spam", "op", "bob")
    connect = m.connect_message("r", m.ServerAddress("h", 6667, False), "bot", "n")
    assert connect["server"] == ["h", 6667] and connect["nick"] == "bot" and SHARED <= connect.keys()


# -- replies -------------------------------------------------------------------------------------------------


def test_text_replies_say_to_the_target():
    assert m.interpret_reply({"text": "hi"}, "#chat") == [m.Say(m.MESSAGE, "#chat", "hi")]
    assert m.interpret_reply({"text": "\n\n"}, "#chat") == []  # nothing to say is not an error
    assert m.interpret_reply({"type": "message", "body": "b", "channel": None}, "bob") == [m.Say(m.MESSAGE, "bob", "b")]


@pytest.mark.parametrize("kind", [m.MESSAGE, m.ACTION, m.NOTICE])
def test_draft_control_messages(kind):
    assert m.interpret_reply({"type": kind, "body": "b"}, "#chat") == [m.Say(kind, "#chat", "b")]
    assert m.interpret_reply({"type": kind, "body": "b", "channel": "bob"}, "#chat") == [m.Say(kind, "bob", "b")]


def test_join_and_part_control_messages():
    assert m.interpret_reply({"type": "join", "channel": "#x", "key": "k"}, None) == [m.Join(m.ChannelSpec("#x", "k"))]
    assert m.interpret_reply({"type": "part"}, "#chat") == [m.Part("#chat", "")]
    assert m.interpret_reply({"type": "part", "channel": "#y", "body": "bye"}, "#chat") == [m.Part("#y", "bye")]


@pytest.mark.parametrize(("reply", "target", "problem"), [
    ("text", "#x", "must be a dict"),
    ({"text": "x"}, None, "no target of its own"),
    ({"text": 5}, "#x", "'text' must be str"),
    ({"text": b"x"}, "#x", "'text' must be str"),
    ({}, "#x", "needs 'text'"),
    ({"type": "message"}, "#x", "needs 'body'"),
    ({"type": "kick", "body": "x"}, "#x", "unknown type"),
    ({"type": "message", "body": "x", "channel": "#a\r\nQUIT"}, "#x", "may not contain"),
    ({"type": "message", "body": "x", "channel": "bad nick"}, "#x", "not a nickname"),
    ({"type": "join", "channel": "nochan"}, None, "not a nickname|must start"),
    ({"type": "join", "channel": "#x", "key": "a\nb"}, None, "key of #x"),
    ({"type": "part"}, "bob", "must start"),
    ({"type": "part", "body": 3}, "#x", "reason"),
])
def test_invalid_replies(reply, target, problem):
    with pytest.raises(m.InvalidReply, match=problem):
        m.interpret_reply(reply, target)
