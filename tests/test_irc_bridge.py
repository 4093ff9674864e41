"""The IRC bridge against a real ngircd, with a second IRC user written here (a raw asyncio socket).

As in tests/test_websocket_bridge.py, the reactor fixture installs Twisted's
asyncio reactor on a loop of its own and ``run`` checks that nothing is left
on it after each test. The "consumer" is the test itself: it takes the
bridge's messages from the layer and answers on their reply channels, and
what the IRC user receives is what the server relayed, so every assertion is
about what a person on IRC sees. Waits have deadlines; none is a bare sleep.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

import pytest
from servers import NgircdServer, take, write_test_certificates

from crossroads import layer
from crossroads.bridges.base import OptionError
from crossroads.bridges.irc.bridge import IrcBridge

# -- a person on IRC -----------------------------------------------------------------------------------------


class IrcUser:
    """A raw IRC client: registers, answers PING, and keeps every line it receives (with the time it came)."""

    def __init__(self, port: int, nick: str) -> None:
        self.port, self.nick = port, nick
        self.lines: list[tuple[float, str]] = []
        self.arrived = asyncio.Event()

    async def connect(self, password: str = "") -> IrcUser:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.task = asyncio.ensure_future(self._read())
        if password:
            self.send(f"PASS {password}")
        self.send(f"NICK {self.nick}", f"USER {self.nick} 0 * :test user")
        await self.expect(lambda line: f" 001 {self.nick} " in line)
        return self

    def send(self, *lines: str) -> None:
        self.writer.write("".join(line + "\r\n" for line in lines).encode())

    async def _read(self) -> None:
        while True:
            raw = await self.reader.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith("PING"):
                self.send("PONG" + line[4:])
            self.lines.append((time.monotonic(), line))
            self.arrived.set()

    async def expect(self, predicate, timeout: float = 10, start: int = 0) -> str:
        """The first line from index ``start`` matching ``predicate``, waiting for it."""
        deadline = time.monotonic() + timeout
        seen = start
        while True:
            for _, line in self.lines[seen:]:
                seen += 1
                if predicate(line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.nick} did not get the line; got: {[x for _, x in self.lines[start:]]}")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except TimeoutError:
                pass

    async def join(self, channel: str) -> None:
        self.send(f"JOIN {channel}")
        await self.expect(lambda line: f" 366 {self.nick} {channel} " in line)

    def said(self, command: str = "PRIVMSG", start: int = 0) -> list[str]:
        """The trailing parts of the ``command`` lines received (from index ``start``)."""
        return [line.split(" :", 1)[1] for _, line in self.lines[start:] if f" {command} " in line.split(" :", 1)[0]]

    async def close(self) -> None:
        self.send("QUIT :bye")
        self.writer.close()
        await asyncio.gather(self.task, return_exceptions=True)
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


@asynccontextmanager
async def user(server: NgircdServer, nick: str, *channels: str, password: str = ""):
    person = await IrcUser(server.port, nick).connect(password)
    try:
        for channel in channels:
            await person.join(channel)
        yield person
    finally:
        await person.close()


# -- the bridge ----------------------------------------------------------------------------------------------


@asynccontextmanager
async def bridging(server: NgircdServer, options: dict | None = None, channel_layer=None, *, wait: bool = True):
    owned = channel_layer is None  # a layer from the channel_layer fixture is the fixture's to close
    channel_layer = channel_layer or layer.from_url("memory://", capacity=1000)
    options = {"server": server.url, "nick": "bridgebot", "flood_burst": 100, "flood_rate": 100,
               "reconnect_initial": 0.1, "reconnect_cap": 0.5, **(options or {})}
    bridge = IrcBridge("net", options, channel_layer)
    await bridge.start()
    try:
        if wait:
            await take(channel_layer, "irc-client.connect")
        yield bridge
    finally:
        await bridge.stop(timeout=5)
        if owned:
            await channel_layer.close()


async def degraded(bridge: IrcBridge, timeout: float = 10) -> dict:
    """The bridge's health once it turns degraded."""
    health = asyncio.get_running_loop().create_future()

    def listen(state: dict) -> None:
        if state["state"] == "degraded" and not health.done():
            health.set_result(dict(state))

    bridge.health_listeners.append(listen)
    if bridge.health["state"] == "degraded":
        return bridge.health
    return await asyncio.wait_for(health, timeout)


async def joined(bridge: IrcBridge, channel: str, nick: str | None = None) -> dict:
    nick = nick or bridge.client.nickname
    return await take(bridge.layer, "irc-client.join", where=lambda msg: msg["channel"] == channel
                      and msg["nick"] == nick)


# -- connecting and joining ----------------------------------------------------------------------------------


def test_connect_join_and_the_events_of_others(run, ngircd_server):
    async def scenario():
        async with bridging(ngircd_server, {"channels": ["#lobby"]}) as bridge:
            ours = await joined(bridge, "#lobby")
            assert bridge.health["state"] == "connected"
            async with user(ngircd_server, "alice", "#lobby") as alice:
                theirs = await joined(bridge, "#lobby", "alice")
                alice.send("PART #lobby :off to lunch")
                parted = await take(bridge.layer, "irc-client.part")
            return bridge, ours, theirs, parted

    bridge, ours, theirs, parted = run(scenario())
    assert ours["ours"] is True and ours["nick"] == "bridgebot" and ours["protocol"] == "irc"
    assert ours["reply_channel"].startswith(bridge.prefix) and ours["room"] == "#lobby"
    assert theirs["ours"] is False and theirs["user"].startswith("alice!")
    assert theirs["reply_channel"] == ours["reply_channel"]  # one stable reply channel per IRC channel
    assert parted["nick"] == "alice" and parted["how"] == "part" and parted["reason"] == "off to lunch"
    assert bridge.counters["errors"] == 0


def test_connect_message_and_control_messages_on_its_reply_channel(run, ngircd_server):
    async def scenario():
        async with user(ngircd_server, "carol", "#side") as carol:
            async with bridging(ngircd_server, wait=False) as bridge:
                connect = await take(bridge.layer, "irc-client.connect")
                start = len(carol.lines)
                await bridge.layer.send(connect["reply_channel"], {"type": "join", "channel": "#side"})
                await joined(bridge, "#side")
                await bridge.layer.send(connect["reply_channel"], {"type": "message", "channel": "#side",
                                                                   "body": "hello side"})
                await bridge.layer.send(connect["reply_channel"], {"type": "notice", "channel": "carol",
                                                                   "body": "psst"})
                await bridge.layer.send(connect["reply_channel"], {"text": "no target here"})  # invalid
                await bridge.layer.send(connect["reply_channel"], {"type": "part", "channel": "#side",
                                                                   "body": "done"})
                await carol.expect(lambda line: " PART #side" in line, start=start)
                return connect, carol.lines[start:], bridge.counters

    connect, lines, counters = run(scenario())
    assert connect["server"] == ["127.0.0.1", ngircd_server.port] and connect["nick"] == "bridgebot"
    texts = [line for _, line in lines]
    assert any(line.endswith("PRIVMSG #side :hello side") for line in texts)
    assert any(line.endswith("NOTICE carol :psst") for line in texts)
    assert any(line.endswith("PART #side :done") for line in texts)
    assert counters["invalid_replies"] == 1


def test_quits_and_kicks_become_parts_and_a_refused_join_is_reported(run, ngircd_server):
    async def scenario():
        async with user(ngircd_server, "opal", "#kick", "#locked") as opal:  # first in: channel operator
            opal.send("MODE #locked +k sesame")
            await opal.expect(lambda line: " MODE #locked +k" in line)
            async with bridging(ngircd_server, {"channels": ["#q1", "#q2", "#kick", "#locked"]}) as bridge:
                refused = await degraded(bridge)
                for channel in ("#q1", "#q2", "#kick"):  # in the order the bridge joins them
                    await joined(bridge, channel)
                async with user(ngircd_server, "quinn", "#q1", "#q2") as quinn:
                    await joined(bridge, "#q2", "quinn")
                    quinn.send("QUIT :gone fishing")
                    quits = [await take(bridge.layer, "irc-client.part") for _ in range(2)]
                opal.send("KICK #kick bridgebot :out")
                kicked = await take(bridge.layer, "irc-client.part", where=lambda msg: msg["channel"] == "#kick")
                return refused, quits, kicked

    refused, quits, kicked = run(scenario())
    assert "channel #locked: cannot join" in refused["reason"]
    assert sorted(q["channel"] for q in quits) == ["#q1", "#q2"]
    assert [(q["how"], q["nick"]) for q in quits] == [("quit", "quinn")] * 2
    assert all("gone fishing" in q["reason"] for q in quits)  # (ngircd quotes quit messages)
    assert kicked["ours"] is True and kicked["how"] == "kick" and kicked["by"] == "opal" and kicked["reason"] == "out"


# -- talking -------------------------------------------------------------------------------------------------


def test_channel_messages_actions_and_notices_reach_consumers_and_replies_reach_the_channel(run, ngircd_server,
                                                                                            channel_layer):
    async def scenario():
        async with bridging(ngircd_server, {"channels": ["#talk"]}, channel_layer) as bridge:
            await joined(bridge, "#talk")
            async with user(ngircd_server, "dave", "#talk") as dave:
                dave.send("PRIVMSG #talk :\x02hello\x02 \x0304,01bridge\x03",
                          "PRIVMSG #talk :\x01ACTION waves\x01", "NOTICE #talk :heads up")
                said = [await take(bridge.layer, "irc-client.receive") for _ in range(3)]
                start = len(dave.lines)
                await bridge.layer.send(said[0]["reply_channel"], {"text": "hi dave"})
                await bridge.layer.send(said[0]["reply_channel"], {"type": "action", "body": "bows"})
                await dave.expect(lambda line: "ACTION bows" in line, start=start)
                return said, dave.said(start=start)

    said, heard = run(scenario())
    message, action, notice = said
    assert message["type"] == "message" and message["body"] == "\x02hello\x02 \x0304,01bridge\x03"
    assert message["text"] == "hello bridge"  # formatting stripped in text, raw in body
    assert message["sender"] == message["nick"] == "dave" and message["user"] == "dave!~dave@127.0.0.1"
    assert message["room"] == message["channel"] == "#talk"
    assert message["private"] is False and message["protocol"] == "irc"
    assert action["type"] == "action" and action["body"] == "waves"
    assert notice["type"] == "notice" and notice["text"] == "heads up"
    assert len({m["reply_channel"] for m in said}) == 1
    assert heard == ["hi dave", "\x01ACTION bows\x01"]


def test_private_messages_have_a_reply_channel_per_peer(run, ngircd_server):
    async def scenario():
        async with bridging(ngircd_server) as bridge:
            async with user(ngircd_server, "erin") as erin, user(ngircd_server, "frank") as frank:
                erin.send("PRIVMSG bridgebot :psst")
                from_erin = await take(bridge.layer, "irc-client.receive")
                frank.send("PRIVMSG bridgebot :hey")
                from_frank = await take(bridge.layer, "irc-client.receive")
                erin.send("PRIVMSG BridgeBot :again")  # nicks are case-insensitive: the same peer
                again = await take(bridge.layer, "irc-client.receive")
                frank.send("PRIVMSG bridgebot :\x01VERSION\x01")  # answered by the bridge, not a message
                await frank.expect(lambda line: "NOTICE frank :\x01VERSION crossroads" in line)
                await bridge.layer.send(from_erin["reply_channel"], {"text": "only for erin"})
                await erin.expect(lambda line: "only for erin" in line)
                frank.send("PRIVMSG bridgebot :last")
                last = await take(bridge.layer, "irc-client.receive")
                return from_erin, from_frank, again, frank.said(), last

    from_erin, from_frank, again, frank_heard, last = run(scenario())
    assert last["body"] == "last"  # the CTCP VERSION before it never reached the layer
    assert from_erin["private"] is True and from_erin["channel"] is None and from_erin["room"] == "erin"
    assert from_erin["reply_channel"] != from_frank["reply_channel"]
    assert again["reply_channel"] == from_erin["reply_channel"]
    assert frank_heard == []


def test_our_own_words_are_not_input(run, ngircd_server):
    async def scenario():
        async with bridging(ngircd_server, {"channels": ["#echo"]}) as bridge:
            join = await joined(bridge, "#echo")
            async with user(ngircd_server, "gina", "#echo") as gina:
                await bridge.layer.send(join["reply_channel"], {"text": "from the bridge"})
                await gina.expect(lambda line: "from the bridge" in line)
                gina.send("PRIVMSG #echo :from gina")
                first = await take(bridge.layer, "irc-client.receive")
                return first

    assert run(scenario())["body"] == "from gina"  # not "from the bridge"


def test_long_and_multi_line_text(run, ngircd_server):
    long_text = "é" * 300 + " " + "word " * 120  # 600 bytes of é, then words: several lines
    async def scenario():
        async with bridging(ngircd_server, {"channels": ["#long"]}) as bridge:
            join = await joined(bridge, "#long")
            async with user(ngircd_server, "hank", "#long") as hank:
                await bridge.layer.send(join["reply_channel"], {"text": "one\ntwo\r\n\r\nthree"})
                await bridge.layer.send(join["reply_channel"], {"text": long_text})
                await bridge.layer.send(join["reply_channel"], {"text": "end"})
                await hank.expect(lambda line: line.endswith(":end"))
                raw = [line for _, line in hank.lines if " PRIVMSG #long " in line]
                return raw, hank.said()

    raw, heard = run(scenario())
    assert heard[:3] == ["one", "two", "three"] and heard[-1] == "end"
    pieces = heard[3:-1]
    assert len(pieces) >= 3 and "".join(pieces).replace(" ", "") == long_text.replace(" ", "")
    assert all(word == "word" for piece in pieces for word in piece.split() if "é" not in word)  # cut at spaces
    assert all(len(line.encode()) + 2 <= 512 for line in raw)  # as relayed, with the server's prefix
    assert max(len(line.encode()) for line in raw) > 400  # lines are used, not cut short needlessly


def test_crlf_and_nul_cannot_inject_commands(run, ngircd_server):
    async def scenario():
        async with bridging(ngircd_server, {"channels": ["#safe"]}) as bridge:
            join = await joined(bridge, "#safe")
            async with user(ngircd_server, "ivan", "#safe") as ivan:
                start = len(ivan.lines)
                await bridge.layer.send(join["reply_channel"], {"text": "a\rJOIN #evil\nPRIVMSG ivan :owned\0x"})
                await bridge.layer.send(join["reply_channel"], {"type": "message", "channel": "#safe\r\nQUIT",
                                                                "body": "x"})
                await bridge.layer.send(join["reply_channel"], {"type": "join", "channel": "#ok\r\nPART #safe"})
                await bridge.layer.send(join["reply_channel"], {"type": "part", "body": "bye\r\nJOIN #evil2"})
                await ivan.expect(lambda line: " PART #safe" in line, start=start)
                ivan.send("NAMES #evil", "WHOIS bridgebot")
                names = await ivan.expect(lambda line: " 353 " in line or " 366 ivan #evil " in line, start=start)
                whois = await ivan.expect(lambda line: " 318 " in line, start=start)
                return ivan.lines[start:], names, whois, bridge.counters

    lines, names, whois, counters = run(scenario())
    texts = [line for _, line in lines]
    said = [line.split(" :", 1)[1] for line in texts if " PRIVMSG #safe " in line]
    assert said == ["a", "JOIN #evil", "PRIVMSG ivan :ownedx"]  # text, each line said, never a command
    assert not any(" PRIVMSG ivan " in line for line in texts)
    assert " 353 " not in names  # nobody joined #evil
    assert not any(" 319 " in line and "#evil" in line for line in texts)
    assert any(line.endswith("PART #safe :bye JOIN #evil2") for line in texts)
    assert counters["invalid_replies"] == 2


def test_flood_control_sends_a_burst_then_paces(run, ngircd_server):
    rate, burst, total = 10.0, 3, 9

    async def scenario():
        options = {"channels": ["#flood"], "flood_rate": rate, "flood_burst": burst}
        async with bridging(ngircd_server, options) as bridge:
            join = await joined(bridge, "#flood")
            async with user(ngircd_server, "judy", "#flood") as judy:
                start = len(judy.lines)
                said = time.monotonic()
                await bridge.layer.send(join["reply_channel"], {"text": "\n".join(f"line {i}" for i in range(total))})
                await judy.expect(lambda line: line.endswith(f"line {total - 1}"), start=start)
                return said, [(t, line) for t, line in judy.lines[start:] if " PRIVMSG #flood " in line]

    said, arrivals = run(scenario())
    assert [line.rsplit(":", 1)[1] for _, line in arrivals] == [f"line {i}" for i in range(total)]
    # After the burst each line waits for a token: the last cannot arrive sooner after the reply was sent than
    # the rate allows. (Only a lower bound, from the send: a slow reader may see lines late, and so closer
    # together, but never before they were sent.)
    assert arrivals[-1][0] - said >= (total - burst) / rate * 0.9


def test_one_loud_channel_cannot_hold_another(run, ngircd_server, caplog):
    """A 300-line reply to #probe, paced at 2 lines/s, then one line to #other: with one FIFO it waited 150 s."""
    caplog.set_level(logging.WARNING, logger="crossroads")

    async def scenario():
        options = {"channels": ["#probe", "#other"], "flood_rate": 2, "flood_burst": 2}
        async with bridging(ngircd_server, options) as bridge:
            probe = await joined(bridge, "#probe")
            other = await joined(bridge, "#other")
            async with user(ngircd_server, "pat", "#probe") as pat, user(ngircd_server, "oli", "#other") as oli:
                await bridge.layer.send(probe["reply_channel"], {"text": "\n".join(f"probe {i}" for i in range(300))})
                await pat.expect(lambda line: line.endswith("probe 0"))
                await bridge.layer.send(other["reply_channel"], {"text": "hello other"})
                await oli.expect(lambda line: line.endswith("hello other"), timeout=30)
                probe_lines_before = len(pat.said())
                waiting = len(bridge.outgoing)
        return probe_lines_before, waiting, bridge.counters

    probe_lines_before, waiting, counters = run(scenario())
    # The burst, the lines sent while the #other reply travelled through the layer, then #other's turn: a handful,
    # not 300. (Counted in lines, not seconds: a slow machine sends the same lines, later.)
    assert probe_lines_before <= 8, probe_lines_before
    assert waiting >= 280
    stopped = [r.getMessage() for r in caplog.records if "lines not sent before stopping" in r.getMessage()]
    assert len(stopped) == 1 and counters["dropped"] >= 280, (stopped, counters)  # what stop() left is said once


def test_a_target_past_its_queue_bound_drops_and_logs_once_and_others_still_go(run, ngircd_server, caplog):
    caplog.set_level(logging.WARNING, logger="crossroads")

    async def scenario():
        options = {"channels": ["#probe", "#other"], "flood_rate": 1, "flood_burst": 1, "max_queued_per_target": 50}
        async with bridging(ngircd_server, options) as bridge:
            probe = await joined(bridge, "#probe")
            other = await joined(bridge, "#other")
            async with user(ngircd_server, "oli", "#other") as oli:
                await bridge.layer.send(probe["reply_channel"], {"text": "\n".join(f"probe {i}" for i in range(80))})
                await bridge.layer.send(probe["reply_channel"], {"text": "more\nand more"})
                await bridge.layer.send(other["reply_channel"], {"text": "hello other"})
                await oli.expect(lambda line: line.endswith("hello other"), timeout=30)
                return dict(bridge.counters)

    counters = run(scenario())
    assert counters["dropped"] == 32  # 80 + 2 lines for #probe, 50 kept
    overflow = [r.getMessage() for r in caplog.records if "waiting for #probe" in r.getMessage()]
    assert len(overflow) == 1, overflow


def test_default_flood_control_is_conservative():
    bridge = IrcBridge("net", {"server": "irc://127.0.0.1:1"}, layer.from_url("memory://"))
    assert bridge.options["flood_burst"] <= 5 and bridge.options["flood_rate"] <= 0.5


def test_bad_input_from_the_server_is_counted_and_survived(run, ngircd_server):
    async def scenario():
        async with bridging(ngircd_server, {"channels": ["#bytes"]}) as bridge:
            await joined(bridge, "#bytes")
            async with user(ngircd_server, "olga", "#bytes") as olga:
                olga.writer.write(b"PRIVMSG #bytes :caf\xe9 in Latin-1\r\n")
                latin1 = await take(bridge.layer, "irc-client.receive")
                olga.send("PRIVMSG #bytes :\x01ACTION\x01", "PRIVMSG #bytes :after")  # an empty action
                said = [await take(bridge.layer, "irc-client.receive") for _ in range(2)]
                return latin1, said, bridge.counters

    latin1, said, counters = run(scenario())
    assert latin1["body"] == "café in Latin-1" and counters["non_utf8_lines"] == 1
    assert [s["type"] for s in said] == ["action", "message"] and said[1]["body"] == "after"
    assert counters["errors"] == 0


def test_a_full_layer_drops_and_counts_and_the_bridge_carries_on(run, ngircd_server):
    async def scenario():
        small = layer.from_url("memory://", capacity=2)
        try:
            async with bridging(ngircd_server, {"channels": ["#full"]}, small) as bridge:
                await joined(bridge, "#full")
                async with user(ngircd_server, "pat", "#full") as pat:
                    await take(small, "irc-client.join")  # pat's join
                    pat.send(*(f"PRIVMSG #full :message {i}" for i in range(5)))
                    await degraded(bridge)  # nobody takes until the layer refused some
                    first = [await take(small, "irc-client.receive") for _ in range(2)]  # the two it held
                    pat.send("PRIVMSG #full :later")
                    later = await take(small, "irc-client.receive", where=lambda msg: msg["body"] == "later")
                    return first, later, bridge.counters
        finally:
            await small.close()

    first, later, counters = run(scenario())
    assert [m["body"] for m in first] == ["message 0", "message 1"]
    assert counters["refused"] >= 1 and counters["dropped"] >= 1 and later["body"] == "later"


# -- nicks, passwords, identification ------------------------------------------------------------------------


def test_nick_collision_uses_an_alternate_and_regains_the_nick(run, ngircd_server):
    async def scenario():
        async with user(ngircd_server, "bridgebot") as squatter:
            async with bridging(ngircd_server, {"alternate_nicks": ["bridgebot2"], "channels": ["#nicks"],
                                                      "nick_retry_interval": 0.2}) as bridge:
                await joined(bridge, "#nicks", "bridgebot2")
                alternate = bridge.client.nickname
                squatter.send("NICK somebodyelse")
                async with user(ngircd_server, "kim", "#nicks") as kim:
                    await kim.expect(lambda line: line.startswith(":bridgebot2!") and " NICK " in line)
                    return alternate, bridge.client.nickname

    assert run(scenario()) == ("bridgebot2", "bridgebot")


def test_nicks_fit_the_servers_nicklen(run, tmp_path, caplog):
    server = NgircdServer(tmp_path / "ngircd", max_nick_length=9).start()  # Debian's default ngircd.conf (RFC 1459)
    caplog.set_level(logging.INFO, logger="crossroads")
    try:
        async def scenario():
            async with bridging(server, {"nick": "crossroads", "channels": ["#fit"]}) as bridge:  # 10 characters
                ours = await joined(bridge, "#fit")
                async with user(server, "dana", "#fit") as dana:
                    dana.send("PRIVMSG #fit :hello bot")
                    said = await take(bridge.layer, "irc-client.receive")
                    await bridge.layer.send(ours["reply_channel"], {"text": "hi dana"})
                    heard = await dana.expect(lambda line: line.endswith("PRIVMSG #fit :hi dana"))
                await asyncio.to_thread(server.stop)
                await degraded(bridge)
                await asyncio.to_thread(server.start)
                again = await take(bridge.layer, "irc-client.connect", timeout=15)
            async with user(server, "ninechars"):
                async with bridging(server, {"nick": "ninechars"}) as taken:  # and ninechars_ is one too long
                    alternate = taken.client.nickname
            return ours, said, heard, again, alternate

        ours, said, heard, again, alternate = run(scenario())
        assert ours["nick"] == "crossroad" and said["body"] == "hello bot" and heard.startswith(":crossroad!")
        assert again["nick"] == "crossroad"
        refusals = [r.getMessage() for r in caplog.records if "refuses the nick" in r.getMessage()]
        # crossroads once: the reconnect asked for the nick that fits at once.
        assert refusals == [f"irc bridge 'net': the server refuses the nick {nick} (Nickname too long, max. 9 "
                            f"characters), trying {fitted}" for nick, fitted in [("crossroads", "crossroad"),
                                                                                  ("ninechars_", "ninechar_")]]
        assert alternate == "ninechar_"
    finally:
        server.stop()


def test_server_password_and_nickserv_identify(run, tmp_path):
    server = NgircdServer(tmp_path / "ngircd", password="s3cret").start()
    try:
        async def scenario():
            async with user(server, "NickServ", password="s3cret") as nickserv:
                async with bridging(server, {"password": "s3cret", "nickserv_password": "hunter2"}):
                    identify = await nickserv.expect(lambda line: "IDENTIFY" in line)
            async with bridging(server, {"password": "wrong"}, wait=False) as bridge:
                health = await degraded(bridge)
            return identify, health

        identify, health = run(scenario())
        assert identify.endswith("PRIVMSG NickServ :IDENTIFY bridgebot hunter2")
        assert "password" in health["reason"]
    finally:
        server.stop()


def test_sasl_failure_is_reported_not_ignored(run, ngircd_server):
    async def scenario():
        async with bridging(ngircd_server, {"sasl_password": "pw"}, wait=False) as bridge:
            return await degraded(bridge), bridge.counters

    health, counters = run(scenario())
    assert "SASL" in health["reason"] and counters["connects"] == 0


# -- surviving the server ------------------------------------------------------------------------------------


def test_server_killed_and_restarted_the_bridge_reconnects_and_rejoins(run, tmp_path):
    server = NgircdServer(tmp_path / "ngircd").start()
    try:
        async def scenario():
            async with bridging(server, {"channels": ["#stay", {"name": "#keyed", "key": "k1"}]}) as bridge:
                first = await joined(bridge, "#stay")
                await joined(bridge, "#keyed")
                await bridge.layer.send(first["reply_channel"], {"type": "join", "channel": "#later"})
                await joined(bridge, "#later")
                await asyncio.to_thread(server.stop)
                lost = await degraded(bridge)
                sent_before = bridge.counters["lines_sent"]
                await bridge.layer.send(first["reply_channel"], {"text": "said while away"})
                while not bridge.outgoing:  # the reply reached the bridge: it waits for the server
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(server.start)
                await take(bridge.layer, "irc-client.connect", timeout=15)
                rejoined = {(await take(bridge.layer, "irc-client.join"))["channel"] for _ in range(3)}
                assert not bridge.outgoing and bridge.counters["lines_sent"] == sent_before + 1  # after the JOINs
                assert "connection lost" in lost["reason"] or "cannot connect" in lost["reason"]
                async with user(server, "leo", "#stay") as leo:
                    await bridge.layer.send(first["reply_channel"], {"text": "still here"})
                    await leo.expect(lambda line: "still here" in line)
                return first, rejoined, bridge.counters

        first, rejoined, counters = run(scenario())
        assert rejoined == {"#stay", "#keyed", "#later"}
        assert counters["connects"] == 2
    finally:
        server.stop()


def test_a_silent_server_is_noticed_and_left(run, tmp_path):
    server = NgircdServer(tmp_path / "ngircd").start()
    try:
        async def scenario():
            options = {"channels": ["#hush"], "ping_interval": 0.3, "register_timeout": 1}
            async with bridging(server, options) as bridge:
                await joined(bridge, "#hush")
                first = bridge.client
                server.pause()
                try:
                    silent = await degraded(bridge)
                finally:
                    server.resume()
                await take(bridge.layer, "irc-client.connect", timeout=15)
                await joined(bridge, "#hush")
                return silent, bridge.client is not first

        silent, new_connection = run(scenario())
        assert "ping timeout" in silent["reason"] and new_connection
    finally:
        server.stop()


def test_server_pings_are_answered(run, tmp_path):
    server = NgircdServer(tmp_path / "ngircd", ping_timeout=5, pong_timeout=5).start()
    try:
        async def scenario():
            async with bridging(server, {"channels": ["#ping"]}) as bridge:
                join = await joined(bridge, "#ping")
                client = bridge.client
                pinged = asyncio.Queue()
                answer = client.irc_PING  # a spy on our own side: the PINGs are the real server's
                client.irc_PING = lambda prefix, params: (pinged.put_nowait(params), answer(prefix, params))
                for _ in range(2):  # ngircd (5 s at least) pings again only after the PONG came in time
                    await asyncio.wait_for(pinged.get(), 10)
                async with user(server, "mia", "#ping") as mia:
                    await bridge.layer.send(join["reply_channel"], {"text": "alive"})
                    await mia.expect(lambda line: "alive" in line)
                return bridge.client is client, bridge.counters["connects"]

        assert run(scenario()) == (True, 1)
    finally:
        server.stop()


# -- options -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "key"), [
    ({"server": "http://x"}, "server"),
    ({"server": "irc://x", "channels": ["nochan"]}, "channels"),
    ({"server": "irc://x", "nick": "9lives"}, "nick"),
    ({"server": "irc://x", "password": "a\r\nQUIT"}, "password"),
    ({}, "server"),
])
def test_bad_options_name_the_key(options, key):
    with pytest.raises(OptionError) as error:
        IrcBridge.validate_options(options)
    assert error.value.key == key


# -- TLS -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def irc_tls(tmp_path_factory):
    """A test CA and a server certificate for 127.0.0.1 (trustme): {"cert", "key", "ca"} PEM paths."""
    folder = tmp_path_factory.mktemp("irc-tls")
    folder.chmod(0o755)  # ngircd reads them as the unprivileged user it switches to
    return write_test_certificates(folder)


def test_ircs_verifies_the_server_certificate(run, tmp_path, irc_tls):
    server = NgircdServer(tmp_path / "ngircd", tls=irc_tls).start()
    tls_url = f"ircs://127.0.0.1:{server.tls_port}"
    try:
        async def scenario():
            async with bridging(server, {"server": tls_url, "tls_ca": irc_tls["ca"], "channels": ["#tls"]}) as bridge:
                join = await joined(bridge, "#tls")
                async with user(server, "nina", "#tls") as nina:  # plain port, same server
                    await bridge.layer.send(join["reply_channel"], {"text": "over TLS"})
                    await nina.expect(lambda line: "over TLS" in line)
            async with bridging(server, {"server": tls_url}, wait=False) as untrusting:  # the system's CAs only
                refused = await degraded(untrusting)
            return refused, untrusting.counters

        refused, counters = run(scenario())
        assert "cannot connect" in refused["reason"] and counters["connects"] == 0
    finally:
        server.stop()


# -- as a user runs it ---------------------------------------------------------------------------------------


def test_bridge_and_worker_as_separate_processes_over_redis(run, tmp_path, ngircd_server, redis_server, daemons):
    from test_cli import run as crossroads
    from test_cli import write_config
    from test_daemons import bridge_and_worker

    config = str(write_config(tmp_path, f"""
[layer]
url = "{redis_server.url}"
prefix = "irc-daemons"

[routing]
app = "apps.irc_echo:routes"

[bridges.libera]
type = "irc"
server = "{ngircd_server.url}"
nick = "procbot"
channels = ["#proc"]
"""))
    bridge, worker = bridge_and_worker(tmp_path, daemons, "libera", config)

    def procbot_is_in(line: str) -> bool:  # it joined after us, or was there before (NAMES)
        return line.startswith(":procbot!") and " JOIN " in line or (
            " 353 " in line and "procbot" in [nick.lstrip("~&@%+") for nick in line.split(" :", 1)[1].split()])

    async def scenario():
        async with user(ngircd_server, "ulla", "#proc") as ulla:
            await ulla.expect(procbot_is_in, timeout=20)
            ulla.send("PRIVMSG #proc :over redis", "PRIVMSG procbot :and in private")
            await ulla.expect(lambda line: line.endswith("PRIVMSG ulla :ulla said: and in private"))
            await ulla.expect(lambda line: line.endswith("PRIVMSG #proc :ulla said: over redis"))

    run(scenario())
    deadline = time.monotonic() + 20  # health is published every few seconds
    while "libera: connected" not in (status := crossroads("status", "--config", config)).stdout:
        assert time.monotonic() < deadline, status.stdout + status.stderr
    bridge.terminate()
    worker.terminate()


def test_the_echo_example_answers_over_irc(run, tmp_path, ngircd_server):
    """examples/echo as shipped, all-in-one (`crossroads run`), with its ports and IRC server pointed at ours."""
    from pathlib import Path

    from servers import free_port
    from test_daemons import Daemon

    example = Path(__file__).resolve().parent.parent / "examples" / "echo"
    text = (example / "crossroads.toml").read_text().replace("irc://127.0.0.1:6667", ngircd_server.url)
    text = text.replace("port = 8000", f"port = {free_port()}").replace("port = 8001", f"port = {free_port()}")
    config = tmp_path / "crossroads.toml"
    config.write_text(text.replace('type = "mqtt"', 'type = "mqtt"\nenabled = false'))
    (tmp_path / "echo.py").write_text((example / "echo.py").read_text())  # beside its config, as shipped
    gateway = Daemon(tmp_path, "run", "run", "--config", str(config))

    async def scenario():
        async with user(ngircd_server, "erin", "#echo") as erin:
            await erin.expect(lambda line: line.startswith(":echobot!") and " JOIN " in line, timeout=30)
            erin.send("PRIVMSG #echo :hello echo")
            return await erin.expect(lambda line: line.startswith(":echobot!") and " PRIVMSG " in line)

    try:
        gateway.wait_ready()
        assert run(scenario()).endswith("PRIVMSG #echo :hello echo")
        gateway.terminate()
    finally:
        gateway.close()
