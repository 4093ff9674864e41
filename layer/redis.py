"""The Redis channel layer (``redis://``, ``rediss://``, ``redis+sentinel://``, sharded with ``hosts=[...]``).

Owns how channels, groups and waiting map onto Redis. What a message is and
which names are valid belongs to ``base.py``; this module must not re-decide it.

Storage, per shard:

- ``{prefix}:q:{queue}``: a list of entries (``base.make_entry``): expiry time,
  channel name for process-local channels, msgpack body. One list per channel,
  and one per process prefix (``name!``) for process-local channels, so a
  process blocks on a single key for all of its replies.
- ``{prefix}:g:{group}``: a sorted set of member channels scored by expiry, on
  the shard of each member's queue, so one Lua call per shard can deliver to
  every member of a group without crossing shards.
- ``{prefix}:kv:{key}``: a key/value record, a hash of field -> msgpack value
  with a Redis expiry, on the shard its key hashes to.

Cost: a send is one ``EVALSHA`` (capacity check, expired-head trim and push in
one atomic script, no separate body key; for one message, a push taken back
only if it went over capacity); a receive is one ``BLMPOP`` (atomic
pop, no second fetch that could lose the message); ``send_many`` and
``receive_many`` are one round trip per shard; ``group_send`` is one script
call per shard; every key/value call is one round trip (a MULTI block sent in
one write where it changes several things).

Sharding: a queue lives on the shard its name hashes to on a consistent-hash
ring (160 points per shard, named by the shard's URL without credentials), so
adding a shard moves about 1/n of the queues. A receive that spans shards
blocks on every shard at once and, when one answers, wakes the others by
pushing to a private wake key each is also blocked on; anything they popped
meanwhile is kept in this process's buffer and returned by the next receive.
No sleep, no polling.

Connections: redis-py opens them (handshake, AUTH, TLS, Sentinel); each face
then speaks RESP on them itself with hiredis (``_Link``, ``_AsyncLink``) and keeps
its own idle ones, because redis-py's per-command layers cost more client CPU
than the rest of a one-at-a-time send or receive.

Faults: connection errors become ``LayerUnavailable`` at once (redis-py's own
retries are off, because retrying a send that may have run would deliver it
twice). A blocking receive instead waits out the outage with exponential
backoff and jitter and resumes.

Sentinel: a shard named ``redis+sentinel://[:password@]host:26379,host2:26379/SERVICE/DB``
(``rediss+sentinel://`` for TLS to the sentinels and the primary) asks the sentinels for
SERVICE's primary each time it connects (redis-py's ``SentinelConnectionPool``), so after a
failover the next connection goes to the promoted replica; a connection to a primary that was
demoted fails (``READONLY``) and is dropped. The shard's name on the ring is the URL without
credentials, so it does not change when the primary does. docs/spec/layer.md says what a
failover loses.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import math
import os
import random
import select
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import hiredis
import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from . import base
from .base import AuthenticationFailed, ChannelFull, Counters, GroupSendResult, LayerOptions, LayerUnavailable
from .sealing import Sealer, Undecryptable

log = logging.getLogger("crossroads.layer.redis")

CONNECT_TIMEOUT = 2.0  # seconds to open a connection before LayerUnavailable
COMMAND_TIMEOUT = 5.0  # seconds to wait for a non-blocking command's reply
SWEEP = 0.25  # seconds between the async face's timeout checks (its timeouts fire up to this late)
RING_POINTS = 160
_IO_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
_DEFAULT = object()  # read with the connection's own socket timeout

# Shared by the scripts below: when ``needed`` more entries would not fit, drop
# expired entries from the queue's head first (an entry's expiry is its first
# 8 bytes). Returns the queue's length and how many entries were dropped.
TRIM_EXPIRED_LUA = """
local function trim_expired(key, needed, capacity, now)
  local n = redis.call('LLEN', key)
  local dropped = 0
  while n > 0 and n + needed > capacity do
    local head = redis.call('LINDEX', key, 0)
    if struct.unpack('>d', head) >= now then break end
    redis.call('LPOP', key)
    n = n - 1
    dropped = dropped + 1
  end
  return n, dropped
end
"""

# Push a batch of entries per queue, as many as fit under its capacity, after
# dropping expired ones if it is too full. KEYS: the queue keys. ARGV: now, ttl, then per
# key: capacity, count, and that many entries in send order.
# Returns {expired count, {per key: how many of its last entries were refused}}.
SEND_LUA = TRIM_EXPIRED_LUA + """
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local refused = {}
local expired = 0
local p = 3
for i = 1, #KEYS do
  local key = KEYS[i]
  local capacity = tonumber(ARGV[p])
  local count = tonumber(ARGV[p + 1])
  p = p + 2
  local n, dropped = trim_expired(key, count, capacity, now)
  expired = expired + dropped
  local room = math.max(0, math.min(count, capacity - n))
  local pushed = 0
  while pushed < room do
    local last = math.min(room, pushed + 1000)  -- unpack() is bounded by the Lua stack
    redis.call('RPUSH', key, unpack(ARGV, p + pushed, p + last - 1))
    pushed = last
  end
  if room > 0 then
    redis.call('EXPIRE', key, ttl)
  end
  refused[i] = count - room
  p = p + count
end
return {expired, refused}
"""

# One message to one queue: what nearly every send is. Push first, and undo when
# that went over capacity: RPUSH answers with the new length, so a queue with room
# costs one RPUSH and one EXPIRE, against SEND_LUA's LLEN, loop and result tables
# (Redis CPU per send 68,400 -> 36,500 instructions, callgrind). The script is
# atomic, so no reader ever sees the undone entry, and capacity stays exact.
# KEYS[1]: the queue key. ARGV: entry, capacity, ttl, now.
# Returns how many expired entries were dropped to make room; -1 - that when refused.
SEND_ONE_LUA = """
local key = KEYS[1]
local capacity = tonumber(ARGV[2])
if redis.call('RPUSH', key, ARGV[1]) <= capacity then
  redis.call('EXPIRE', key, ARGV[3])
  return 0
end
redis.call('RPOP', key)
""" + TRIM_EXPIRED_LUA + """
local n, expired = trim_expired(key, 1, capacity, tonumber(ARGV[4]))
if n >= capacity then
  return -1 - expired
end
redis.call('RPUSH', key, ARGV[1])
redis.call('EXPIRE', key, ARGV[3])
return expired
"""

# Deliver one body to every unexpired member of a group on this shard.
# KEYS[1]: the group key. ARGV: now, ttl, expires_at, body, default capacity,
# queue key prefix, process queue capacity, then (Lua pattern, capacity) pairs for channel_capacity.
# Returns {delivered, dropped, expired}.
GROUP_SEND_LUA = TRIM_EXPIRED_LUA + """
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local expires_at = tonumber(ARGV[3])
local body = ARGV[4]
local default_capacity = tonumber(ARGV[5])
local queue_prefix = ARGV[6]
local process_capacity = tonumber(ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local plain_entry = struct.pack('>dH', expires_at, 0) .. body
local delivered, dropped, expired = 0, 0, 0
for _, channel in ipairs(members) do
  local queue, entry = channel, plain_entry
  local bang = string.find(channel, '!', 1, true)
  if bang then
    queue = string.sub(channel, 1, bang)
    entry = struct.pack('>dH', expires_at, #channel) .. channel .. body
  end
  local capacity = default_capacity
  if bang then capacity = process_capacity end
  for j = 8, #ARGV, 2 do
    if string.find(channel, ARGV[j]) then
      capacity = tonumber(ARGV[j + 1])
      break
    end
  end
  local key = queue_prefix .. queue
  local n, trimmed = trim_expired(key, 1, capacity, now)
  expired = expired + trimmed
  if n >= capacity then
    dropped = dropped + 1
  else
    redis.call('RPUSH', key, entry)
    redis.call('EXPIRE', key, ttl)
    delivered = delivered + 1
  end
end
return {delivered, dropped, expired}
"""


class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_SEND = _Script(SEND_LUA)
_SEND_ONE = _Script(SEND_ONE_LUA)
_GROUP_SEND = _Script(GROUP_SEND_LUA)


def glob_to_lua(pattern: str) -> str:
    """A ``channel_capacity`` glob (``*`` only) as an anchored Lua pattern."""
    magic = "^$()%.[]*+-?"
    parts = ["".join("%" + ch if ch in magic else ch for ch in part) for part in pattern.split("*")]
    return "^" + ".*".join(parts) + "$"


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379


class SentinelURL(NamedTuple):
    scheme: str
    sentinels: list[tuple[str, int]]
    service: str  # the name the sentinels monitor the primary as (`sentinel monitor NAME ...`)
    db: int
    username: str
    password: str  # the primary's (requirepass); the sentinels' is the query's sentinel_password
    query: dict[str, str]


def parse_sentinel_url(url: str) -> SentinelURL:
    """``redis+sentinel://[[user]:password@]host[:port],host2[:port]/SERVICE[/DB][?sentinel_password=..&ssl_..]``;
    a ValueError says what is wrong."""
    example = "like redis+sentinel://host1:26379,host2:26379/mymaster/0"
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"a Sentinel URL starts redis+sentinel:// or rediss+sentinel://, {example}")
    netloc, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    credentials, at, hosts = netloc.rpartition("@")
    username, _, password = credentials.partition(":") if at else ("", "", "")
    sentinels = []
    for host in hosts.split(","):
        name, colon, port = host.rpartition(":")
        if not colon or name.endswith(":"):  # no port (or a bare IPv6 address): the sentinels' default
            name, port = host, str(SENTINEL_PORT)
        name = name.strip("[]")
        if not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{host!r} is not a sentinel's host:port, {example}")
        sentinels.append((name, int(port)))
    service, _, db = path.partition("/")
    db = db.strip("/") or "0"
    if not service:
        raise ValueError(f"names no service (the name the sentinels monitor the primary as), {example}")
    if not db.isdigit():
        raise ValueError(f"the part after the service is the database number, got {db!r}, {example}")
    return SentinelURL(scheme.lower(), sentinels, unquote(service), int(db), unquote(username), unquote(password),
                       dict(parse_qsl(query)))


def make_pool(url: str, asynchronous: bool, options: dict[str, Any]) -> Any:
    """A redis-py connection pool for one shard's URL: a plain one, or one that asks the sentinels for the primary."""
    if url.split("://", 1)[0].lower() not in SENTINEL_SCHEMES:
        return (redis.asyncio.ConnectionPool if asynchronous else redis.ConnectionPool).from_url(url, **options)
    parsed = parse_sentinel_url(url)
    tls = {key: value for key, value in parsed.query.items() if key.startswith("ssl_")}
    secure = parsed.scheme == "rediss+sentinel"
    sentinel_options: dict[str, Any] = {"socket_connect_timeout": CONNECT_TIMEOUT, "socket_timeout": COMMAND_TIMEOUT,
                                        "retry": Retry(NoBackoff(), 0)}
    if parsed.query.get("sentinel_password"):
        sentinel_options["password"] = parsed.query["sentinel_password"]
    if secure:
        sentinel_options.update(ssl=True, **tls)
    module = redis.asyncio.sentinel if asynchronous else redis.sentinel
    manager = module.Sentinel(parsed.sentinels, sentinel_kwargs=sentinel_options)
    return module.SentinelConnectionPool(parsed.service, manager, db=parsed.db, username=parsed.username or None,
                                         password=parsed.password or None, ssl=secure, **(tls if secure else {}),
                                         **options)


def public_url(url: str) -> str:
    """The URL without its credentials and query: a shard's name on the ring (which must not change) and in logs."""
    if url.split("://", 1)[0].lower() in SENTINEL_SCHEMES:
        parsed = parse_sentinel_url(url)
        hosts = ",".join(f"{host}:{port}" for host, port in parsed.sentinels)
        return f"{parsed.scheme}://{hosts}/{parsed.service}/{parsed.db}"
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class HashRing:
    """Consistent hashing of queue names onto shards."""

    def __init__(self, names: list[str]) -> None:
        points = sorted(
            (self._hash(f"{name}#{i}"), index) for index, name in enumerate(names) for i in range(RING_POINTS)
        )
        self._hashes = [h for h, _ in points]
        self._shards = [s for _, s in points]
        self._single = len(names) == 1
        self._cache: dict[str, int] = {}

    @staticmethod
    def _hash(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")

    def shard(self, queue: str) -> int:
        if self._single:
            return 0
        try:
            return self._cache[queue]
        except KeyError:
            pass
        i = bisect.bisect(self._hashes, self._hash(queue)) % len(self._hashes)
        if len(self._cache) < 100000:
            self._cache[queue] = self._shards[i]
        return self._shards[i]


class _Wait:
    """One receive's bookkeeping, shared by both faces: its deadline, and its backoff while Redis is down."""

    def __init__(self, layer: RedisLayer, channels: Any, limit: int, timeout: float | None) -> None:
        self.layer = layer
        self.queues = layer._receive_plan(channels, limit)
        self.limit = limit
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.delays: Any = None  # made at the first outage only
        self.popped = False  # a receive with timeout=0 still makes one attempt

    def ready(self) -> list[tuple[str, dict]]:
        return self.layer._take_buffered(self.queues, self.limit)

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def over(self) -> bool:
        return self.popped and self.deadline is not None and time.monotonic() >= self.deadline

    def backoff(self, exc: BaseException) -> float | None:
        """The delay before reconnecting, or None if the deadline comes first."""
        if self.delays is None:
            self.delays = base.backoff_delays()
        delay = next(self.delays)
        if not self.layer._outage_logged:
            log.warning("%s; receive retrying with backoff (next in %.2fs)", exc, delay)
            self.layer._outage_logged = True
        if self.deadline is not None and time.monotonic() + delay > self.deadline:
            return None
        return delay

    def resumed(self) -> None:
        self.popped = True
        if self.layer._outage_logged:
            log.warning("Redis reachable again; receive resumed")
            self.layer._outage_logged = False
        self.delays = None


class RedisLayer(base.LayerErrors):
    """The Redis layer's async face; ``RedisLayer.sync`` is the blocking face."""

    def __init__(self, hosts: list[str] | str, **options: Any) -> None:
        if isinstance(hosts, str):
            hosts = [hosts]
        if not hosts:
            raise ValueError("a Redis layer needs at least one URL in hosts")
        self.hosts = list(hosts)
        self.names = [public_url(url) for url in self.hosts]
        keys = options.pop("symmetric_encryption_keys", None)
        self._sealer = Sealer(keys) if keys else None
        self.options = LayerOptions(**options)
        self.counters = Counters()
        self.ring = HashRing(self.names)
        self._key_prefix = f"{self.options.prefix}:q:"
        self._ttl = math.ceil(self.options.expiry) + 1
        self._lua_capacity: list[str] = []
        for pattern, capacity in self.options.channel_capacity.items():
            self._lua_capacity += [glob_to_lua(pattern), str(capacity)]
        self._buffer: dict[str, deque[bytes]] = {}  # queue -> entries popped but not yet returned
        self._buffer_lock = threading.Lock()
        self._plans: dict[Any, list[str]] = {}  # channels received on -> their queues, checked
        self._targets: dict[str, tuple[str, int]] = {}  # channels sent to -> (queue, shard), checked
        self._outage_logged = False
        self.sync = _SyncRedis(self)
        self._async_pools: list[redis.asyncio.ConnectionPool] = []
        self._async_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"RedisLayer({', '.join(self.names)})"

    # -- pure helpers shared by both faces --

    def _pool_options(self, socket_timeout: float | None = COMMAND_TIMEOUT) -> dict[str, Any]:
        return {
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_timeout": socket_timeout,
            "socket_keepalive": True,
            "retry": Retry(NoBackoff(), 0),
        }

    def key(self, queue: str) -> str:
        return self._key_prefix + queue

    def group_key(self, group: str) -> str:
        return f"{self.options.prefix}:g:{group}"

    def _send_plan(self, items: Iterable[tuple[str, dict]]) -> tuple[dict[int, dict[str, list]], int]:
        """Validate and serialize; per shard, per queue key: [capacity, channels, entries]."""
        expires_at = time.time() + self.options.expiry
        plan: dict[int, dict[str, list]] = {}
        targets = self._targets
        body = base.pack if self._sealer is None else self._body  # a call less per message when nothing is sealed
        count = 0
        last = None  # the channel of the message before (never None)
        for channel, message in items:
            # A bridge sends a run of messages to one channel: its checks, batch and entry header are found once.
            if channel is not last:
                target = targets.get(channel) if type(channel) is str else None
                if target is None:
                    target = self._target(channel)
                queue, shard = target
                queues = plan.get(shard)
                if queues is None:
                    queues = plan[shard] = {}
                batch = queues.get(queue)
                if batch is None:
                    batch = queues[queue] = [self.options.capacity_for(channel), [], []]
                channels, entries = batch[1], batch[2]
                head = base.entry_head(channel, expires_at)
                last = channel
            entries.append(head + body(message))
            channels.append(channel)
            count += 1
        return plan, count

    def _target(self, channel: Any) -> tuple[str, int]:
        """A channel's queue and shard, once its name is checked: remembered, because a worker's replies go to the
        same few channels, so a send to one of them is a dict lookup."""
        base.check_channel_name(channel)
        queue = base.queue_name(channel)
        target = (queue, self.ring.shard(queue))
        if len(self._targets) < 10000:  # bounded: '?' and '!' names are endless
            self._targets[channel] = target
        return target

    def _send_args(self, queues: dict[str, list]) -> tuple[list[str], list]:
        """KEYS and ARGV of SEND_LUA for one shard's part of a plan ([capacity, channels, entries, ...] per queue)."""
        keys = [self._key_prefix + queue for queue in queues]
        args: list = [repr(time.time()), self._ttl]
        for batch in queues.values():
            args += [batch[0], len(batch[2]), *batch[2]]
        return keys, args

    def _send_one_args(self, channel: str, message: dict) -> tuple[int, list[str], list]:
        """Validate and serialize one message: its shard, and KEYS and ARGV of SEND_ONE_LUA."""
        base.check_channel_name(channel)
        now = time.time()
        entry = base.make_entry(channel, self._body(message), now + self.options.expiry)
        queue = base.queue_name(channel)
        args = [entry, self.options.capacity_for(channel), self._ttl, repr(now)]
        return self.ring.shard(queue), [self._key_prefix + queue], args

    def _send_one_done(self, channel: str, reply: int) -> None:
        """Count SEND_ONE_LUA's answer; raise ``ChannelFull`` if it refused the message."""
        if reply >= 0:
            self.counters.expired += reply
            self.counters.sent += 1
            return
        self.counters.expired += -1 - reply
        self.counters.refused += 1
        raise base.refused_error([channel], 1, self.options.capacity_for)

    def _send_call(self, queues: dict[str, list]) -> tuple[_Script, list[str], list]:
        """The script call for one shard's part of a plan: SEND_ONE_LUA for a lone message (a worker's one
        reply), else SEND_LUA."""
        if len(queues) == 1:
            (queue, batch), = queues.items()
            if len(batch[2]) == 1:
                return _SEND_ONE, [self._key_prefix + queue], [batch[2][0], batch[0], self._ttl, repr(time.time())]
        return (_SEND, *self._send_args(queues))

    @staticmethod
    def _send_outcome(reply: Any) -> tuple[int, list[int]]:
        """(expired entries dropped, messages refused per queue) from either send script's reply."""
        if isinstance(reply, int):
            return (reply, [0]) if reply >= 0 else (-1 - reply, [1])
        return reply[0], reply[1]

    def _send_done(self, plan: dict[int, dict[str, list]], replies: dict[int, Any], count: int) -> None:
        refused: list[str] = []
        for shard, reply in replies.items():
            expired, refused_counts = self._send_outcome(reply)
            self.counters.expired += expired
            for (_, channels, _), n in zip(plan[shard].values(), refused_counts, strict=True):
                if n:
                    refused += channels[-n:]  # FIFO: the last ones found no room
        self.counters.sent += count - len(refused)
        self.counters.refused += len(refused)
        if refused:
            raise base.refused_error(refused, count, self.options.capacity_for)

    def _receive_plan(self, channels: Any, limit: int) -> list[str]:
        base.check_max_messages(limit)
        if not isinstance(channels, str):
            channels = tuple(channels)
        try:
            return self._plans[channels]  # a worker receives on the same channels every time: check them once
        except (KeyError, TypeError):  # TypeError: unhashable, so not valid names either; checked below
            pass
        queues = self._plan_queues(channels)
        if len(self._plans) < 1000:  # bounded: '?' names are endless
            self._plans[channels] = queues
        return queues

    def _plan_queues(self, channels: Any) -> list[str]:
        queues = []
        for channel in base.check_receive_channels(channels):
            queue = base.queue_name(channel)
            if queue not in queues:
                queues.append(queue)
        return queues

    def _by_shard(self, queues: list[str]) -> dict[int, list[str]]:
        if len(queues) == 1:  # nearly every receive: one queue, nothing to rotate
            return {self.ring.shard(queues[0]): [self._key_prefix + queues[0]]}
        plan: dict[int, list[str]] = {}
        for queue in queues:
            plan.setdefault(self.ring.shard(queue), []).append(self._key_prefix + queue)
        for shard, keys in plan.items():
            if len(keys) > 1:  # BLMPOP serves the first non-empty key: rotate so none starves
                turn = random.randrange(len(keys))
                plan[shard] = keys[turn:] + keys[:turn]
        return plan

    def _pop_command(self, keys: list[str], limit: int, timeout: float | None) -> tuple:
        if timeout is not None and timeout <= 0:
            return ("LMPOP", len(keys), *keys, "LEFT", "COUNT", limit)
        # BLMPOP's 0 means forever; never round a short positive wait down to it.
        wait = 0 if timeout is None else f"{max(timeout, 0.001):.3f}"
        return ("BLMPOP", wait, len(keys), *keys, "LEFT", "COUNT", limit)

    def _buffer_popped(self, reply: Any, wake_key: str | None = None) -> None:
        """Keep the entries of a BLMPOP reply for a later receive."""
        if not reply:
            return
        key = reply[0].decode()
        if key == wake_key:
            return
        queue = key[len(self._key_prefix) :]
        with self._buffer_lock:
            self._buffer.setdefault(queue, deque()).extend(reply[1])

    def _body(self, message: dict) -> bytes:
        """The stored body: msgpack, sealed when encryption keys are set (the size limit is on the message)."""
        body = base.pack(message)
        return body if self._sealer is None else self._sealer.seal(body)

    def _take_buffered(self, queues: list[str], limit: int) -> list[tuple[str, dict]]:
        """Return fresh messages from the buffer, dropping (and counting) expired ones."""
        if not self._buffer:
            return []
        taken: list[tuple[str, dict]] = []
        now = time.time()
        with self._buffer_lock:
            for queue in queues:
                entries = self._buffer.get(queue)
                while entries and len(taken) < limit:
                    self._open_entry(entries.popleft(), queue, now, taken)
                if entries is not None and not entries:
                    del self._buffer[queue]
        self.counters.received += len(taken)
        return taken

    def _take_popped(self, reply: Any) -> list[tuple[str, dict]]:
        """The messages of a (B)LMPOP reply, straight from it: for a receive that finds the buffer empty."""
        queue = reply[0].decode()[len(self._key_prefix) :]
        taken: list[tuple[str, dict]] = []
        now = time.time()
        if self._sealer is None:  # _open_entry inline: a call less per message on the worker's path
            read_entry, unpack = base.read_entry, base.unpack
            for entry in reply[1]:
                expires_at, channel, body = read_entry(entry, queue)
                if expires_at < now:
                    self.counters.expired += 1
                else:
                    taken.append((channel, unpack(body)))
        else:
            for entry in reply[1]:
                self._open_entry(entry, queue, now, taken)
        self.counters.received += len(taken)
        return taken

    def _open_entry(self, entry: bytes, queue: str, now: float, taken: list[tuple[str, dict]]) -> None:
        """Append the entry's (channel, message) to ``taken``, unless it expired or cannot be opened (counted)."""
        expires_at, channel, body = base.read_entry(entry, queue)
        if expires_at < now:
            self.counters.expired += 1
        elif self._sealer is None:
            taken.append((channel, base.unpack(body)))
        else:
            try:
                taken.append((channel, base.unpack(self._sealer.open(body))))
            except Undecryptable as exc:
                self.counters.undecryptable += 1
                log.error("dropped a message on %r: %s; do all processes share the keys?", channel, exc)

    def _group_args(self, message: dict) -> list:
        now = time.time()
        return [repr(now), self._ttl, repr(now + self.options.expiry), self._body(message),
                self.options.capacity, self._key_prefix, self.options.process_capacity, *self._lua_capacity]

    def _group_done(self, group: str, replies: list) -> GroupSendResult:
        result = GroupSendResult()
        for delivered, dropped, expired in replies:
            result.delivered += delivered
            result.dropped += dropped
            self.counters.expired += expired
        self.counters.sent += result.delivered
        self.counters.dropped += result.dropped
        if result.dropped:
            log.warning("group_send to %r dropped %d of %d deliveries: members full", group,
                        result.dropped, result.dropped + result.delivered)
        return result

    def _member_commands(self, group: str, channel: str, add: bool) -> tuple[int, list[tuple]]:
        base.check_group_name(group)
        base.check_channel_name(channel)
        shard = self.ring.shard(base.queue_name(channel))
        key = self.group_key(group)
        if add:
            expires_at = time.time() + self.options.group_expiry
            commands = [("ZADD", key, repr(expires_at), channel),
                        ("EXPIRE", key, math.ceil(self.options.group_expiry) + 1)]
        else:
            commands = [("ZREM", key, channel)]
        return shard, commands

    def _kv_get_command(self, key: str) -> tuple[int, tuple]:
        base.check_kv_key(key)
        return self.ring.shard(key), ("HGETALL", f"{self.options.prefix}:kv:{key}")

    def _kv_set_commands(self, key: str, fields: dict, ttl: float, replace: bool) -> tuple[int, list[tuple]]:
        """One atomic block: (for a replace) drop the old record, write the fields, set the expiry."""
        base.check_kv_key(key)
        packed = base.pack_fields(fields)
        milliseconds = max(1, round(base.check_ttl(ttl) * 1000))
        redis_key = f"{self.options.prefix}:kv:{key}"
        commands: list[tuple] = [("DEL", redis_key)] if replace else []
        if packed:
            commands += [("HSET", redis_key, *(part for item in packed.items() for part in item)),
                         ("PEXPIRE", redis_key, milliseconds)]
        elif not replace:
            commands.append(("PEXPIRE", redis_key, milliseconds))  # nothing to write: refresh the expiry
        if len(commands) > 1:
            commands = [("MULTI",), *commands, ("EXEC",)]
        return self.ring.shard(key), commands

    def _kv_delete_command(self, key: str) -> tuple[int, tuple]:
        base.check_kv_key(key)
        return self.ring.shard(key), ("DEL", f"{self.options.prefix}:kv:{key}")

    @staticmethod
    def _kv_decoded(reply: Any) -> dict[str, Any]:
        pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
        return base.unpack_fields({name.decode(): value for name, value in pairs})

    def _unavailable(self, shard: int, exc: BaseException) -> LayerUnavailable:
        # redis-py's AuthenticationError is a ConnectionError, but no restart of redis-server will fix it.
        if isinstance(exc, RedisAuthenticationError):
            return AuthenticationFailed(
                f"Redis at {self.names[shard]}: wrong password / authentication failed ({exc}): check [layer] url's "
                "password (redis://:PASSWORD@host:port/db) or REDIS_PASSWORD, whichever the URL takes it from")
        return LayerUnavailable(f"Redis at {self.names[shard]} is unreachable ({exc}); is redis-server running?")

    # -- the async face: I/O --

    def _pools(self) -> list[redis.asyncio.ConnectionPool]:
        loop = asyncio.get_running_loop()
        if self._async_loop is not loop:  # a pool's connections belong to one loop
            self._async_loop = loop
            # No socket timeout here: redis-py would wrap every write in a wait_for Task.
            # _commands bounds each command with one asyncio.timeout instead.
            self._async_pools = [make_pool(url, True, self._pool_options(None)) for url in self.hosts]
            self._async_idle: list[list[_AsyncLink]] = [[] for _ in self.hosts]
            self._async_links = _Deadlines(loop)  # every open link, idle or not: for close(), and its timeouts
            self._send_batch = _SendBatch(self, loop)
        return self._async_pools

    def _idle_link(self, shard: int) -> _AsyncLink | None:
        idle = self._async_idle[shard]
        while idle:
            link = idle.pop()
            if not link.closed:  # the loop told it when the server closed it
                return link
        return None

    async def _link(self, shard: int) -> _AsyncLink:
        pool = self._pools()[shard]
        link = self._idle_link(shard)
        if link is not None:
            return link
        conn = pool.make_connection()
        try:
            # The handshake's replies too: a frozen Redis accepts the connection but never answers.
            async with asyncio.timeout(CONNECT_TIMEOUT + COMMAND_TIMEOUT):
                await conn.connect()
        except _IO_ERRORS as exc:
            await conn.disconnect(nowait=True)
            reason = exc if str(exc) else TimeoutError("no answer to the connection's handshake")
            raise self._unavailable(shard, reason) from exc
        link = _AsyncLink(conn, self.hosts[shard].split("://", 1)[0].lower() in SENTINEL_SCHEMES, self._async_links)
        self._async_links.add(link)
        return link

    async def _commands(self, shard: int, commands: list[tuple], read_timeout: float | None = None) -> list:
        """Send commands in one write, read their replies, within COMMAND_TIMEOUT or ``read_timeout``
        (``math.inf``: for ever)."""
        # An idle link of this loop without a coroutine call of _link's, which only opens what is missing.
        link = self._idle_link(shard) if self._async_loop is asyncio.get_running_loop() else None
        if link is None:
            link = await self._link(shard)
        data = hiredis.pack_command(commands[0]) if len(commands) == 1 else b"".join(
            [hiredis.pack_command(command) for command in commands])
        timeout = COMMAND_TIMEOUT if read_timeout is None else read_timeout
        try:
            replies = await link.request(data, len(commands), None if timeout == math.inf else timeout)
        except _IO_ERRORS as exc:
            link.close()
            raise self._unavailable(shard, exc) from exc
        except BaseException:  # cancelled with a reply owed: never hand this on
            link.close()
            raise
        self._async_idle[shard].append(link)  # every reply was read, error replies too: clean
        for reply in replies:
            if isinstance(reply, RedisError):
                if link.sentinel and isinstance(reply, ReadOnlyError):
                    link.close()  # a primary demoted by a failover: the next connection asks the sentinels
                    raise self._unavailable(shard, RedisConnectionError("The previous master is now a slave"))
                raise reply
        return replies

    async def _call(self, shard: int, *args: Any, read_timeout: float | None = None) -> Any:
        return (await self._commands(shard, [args], read_timeout))[0]

    async def _script(self, shard: int, script: _Script, keys: list, args: list) -> Any:
        try:
            return await self._call(shard, "EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self._call(shard, "SCRIPT", "LOAD", script.source)
            return await self._call(shard, "EVALSHA", script.sha, len(keys), *keys, *args)

    async def send(self, channel: str, message: dict) -> None:
        """Send one message; sends made while one is in flight on its shard share its next script call."""
        if self._async_loop is not asyncio.get_running_loop():
            self._pools()  # this loop's connections and send batch
        await self._send_batch.add(channel, message)

    async def send_many(self, items: Iterable[tuple[str, dict]]) -> None:
        plan, count = self._send_plan(items)
        shards = list(plan)
        if len(shards) == 1:  # the common case: no Task per send
            replies = [await self._script(shards[0], *self._send_call(plan[shards[0]]))]
        else:
            replies = await asyncio.gather(*(self._script(s, *self._send_call(plan[s])) for s in shards))
        self._send_done(plan, dict(zip(shards, replies, strict=True)), count)

    async def receive(self, channels: Any, timeout: float | None = None) -> tuple[str | None, dict | None]:
        got = await self.receive_many(channels, 1, timeout)
        return got[0] if got else (None, None)

    async def receive_many(
        self, channels: Any, max_messages: int, timeout: float | None = None
    ) -> list[tuple[str, dict]]:
        wait = _Wait(self, channels, max_messages, timeout)
        while True:
            taken = wait.ready()
            if taken or wait.over():
                return taken
            try:
                taken = await self._pop(wait.queues, max_messages, wait.remaining())
            except LayerUnavailable as exc:
                delay = wait.backoff(exc)
                if delay is None:
                    return []
                await asyncio.sleep(delay)
                continue
            wait.resumed()
            if taken:
                return taken

    async def _pop(self, queues: list[str], limit: int, timeout: float | None) -> list[tuple[str, dict]]:
        """Pop what is waiting, as the blocking face's ``_pop`` does."""
        plan = self._by_shard(queues)
        read_timeout = math.inf if timeout is None else timeout + COMMAND_TIMEOUT
        if len(plan) == 1:
            (shard, keys), = plan.items()
            reply = (await self._commands(shard, [self._pop_command(keys, limit, timeout)], read_timeout))[0]
            if reply and not self._buffer:  # nothing popped before waits to go first: hand these on directly
                return self._take_popped(reply)
            self._buffer_popped(reply)
            return []
        wake_key = f"{self.options.prefix}:w:{uuid.uuid4().hex}"
        shards = list(plan)
        tasks = {}
        for shard in shards:
            command = self._pop_command(plan[shard] + [wake_key], limit, timeout)
            tasks[asyncio.ensure_future(self._call(shard, *command, read_timeout=read_timeout))] = shard
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        woken = [tasks[t] for t in pending]
        for shard in woken:
            try:
                await self._commands(shard, [("RPUSH", wake_key, b""), ("EXPIRE", wake_key, 60)])
            except LayerUnavailable:
                pass
        results = await asyncio.gather(*tasks, return_exceptions=True)
        failure = None
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, BaseException):
                failure = result
                continue
            self._buffer_popped(result, wake_key)
            if tasks[task] in woken and (not result or result[0].decode() != wake_key):
                await self._call(tasks[task], "DEL", wake_key)
        if failure is not None:
            raise failure
        return []

    async def new_channel(self, pattern: str) -> str:
        return base.new_channel_name(pattern)

    async def group_add(self, group: str, channel: str) -> None:
        shard, commands = self._member_commands(group, channel, add=True)
        await self._commands(shard, commands)

    async def group_discard(self, group: str, channel: str) -> None:
        shard, commands = self._member_commands(group, channel, add=False)
        await self._commands(shard, commands)

    async def group_channels(self, group: str) -> list[str]:
        key = self.group_key(base.check_group_name(group))
        now = repr(time.time())
        replies = await asyncio.gather(*(self._call(s, "ZRANGEBYSCORE", key, now, "+inf")
                                         for s in range(len(self.hosts))))
        return [member.decode() for reply in replies for member in reply]

    async def group_send(self, group: str, message: dict) -> GroupSendResult:
        key = self.group_key(base.check_group_name(group))
        args = self._group_args(message)
        replies = await asyncio.gather(*(self._script(s, _GROUP_SEND, [key], args) for s in range(len(self.hosts))))
        return self._group_done(group, replies)

    async def kv_get(self, key: str) -> dict[str, Any]:
        shard, command = self._kv_get_command(key)
        return self._kv_decoded(await self._call(shard, *command))

    async def kv_set(self, key: str, fields: dict, ttl: float) -> None:
        await self._commands(*self._kv_set_commands(key, fields, ttl, replace=True))

    async def kv_update(self, key: str, fields: dict, ttl: float) -> None:
        await self._commands(*self._kv_set_commands(key, fields, ttl, replace=False))

    async def kv_delete(self, key: str) -> None:
        shard, command = self._kv_delete_command(key)
        await self._call(shard, *command)

    async def flush(self) -> None:
        for shard in range(len(self.hosts)):
            async for keys in self._scan(shard, f"{self.options.prefix}:*"):
                await self._call(shard, "UNLINK", *keys)
        with self._buffer_lock:
            self._buffer.clear()

    async def _scan(self, shard: int, match: str):
        cursor = 0
        while True:
            cursor, keys = await self._call(shard, "SCAN", cursor, "MATCH", match, "COUNT", 1000)
            if keys:
                yield keys
            if int(cursor) == 0:
                return

    async def stats(self) -> dict[str, Any]:
        pending: dict[str, int] = {}
        for shard in range(len(self.hosts)):
            async for keys in self._scan(shard, self._key_prefix + "*"):
                self._count_pending(pending, keys, await self._commands(shard, [("LLEN", k) for k in keys]))
        return self._stats(pending)

    def _count_pending(self, pending: dict[str, int], keys: list[bytes], lengths: list[int]) -> None:
        start = len(self._key_prefix)
        pending.update((key.decode()[start:], n) for key, n in zip(keys, lengths, strict=True) if n)

    def _stats(self, pending: dict[str, int]) -> dict[str, Any]:
        return {"backend": "redis", "shards": self.names, "pending": pending, **self.counters.as_dict()}

    async def close(self) -> None:
        pools, self._async_pools, self._async_loop = self._async_pools, [], None
        for link in list(getattr(self, "_async_links", ())):
            link.close()
        if getattr(self, "_async_links", None) is not None:
            self._async_links.stop()
        self._async_idle = []
        for pool in pools:
            await pool.disconnect()
        self.sync.close()


class _AsyncLink(asyncio.Protocol):
    """One connection of the async face.

    redis-py opens it (handshake, AUTH, TLS, Sentinel's primary), then the link takes its transport over:
    replies are parsed as they arrive, by a hiredis reader of its own, and handed to the one request in flight,
    without redis-py's stream reader, per-command locks and observability hooks (the async face's client
    instructions per send were 404,000 against plain blocking redis-py's 144,000).
    """

    def __init__(self, conn: Any, sentinel: bool, links: _Deadlines) -> None:
        self.links = links
        self.transport = conn._writer.transport
        # The transport is ours now. Neither redis-py's connection nor the stream writer (which closes its
        # transport when collected) may close it when they go: the link keeps the streams, the connection not.
        self.streams = (conn._reader, conn._writer)
        conn._reader = conn._writer = None
        self.reader = hiredis.Reader(replyError=conn._parser.parse_error)
        self.sentinel = sentinel
        self.closed = False
        self.future: asyncio.Future | None = None
        self.callback: Any = None  # or this gets (replies, error), called from data_received itself
        self.expected = 0
        self.replies: list = []
        self.deadline: float | None = None  # loop time by which the request in flight must be answered
        self.transport.set_protocol(self)

    def request(self, data: bytes, count: int, timeout: float | None) -> asyncio.Future:
        """Write ``data``; the future gets its ``count`` replies (error replies as exceptions, in place)."""
        future = self.future = asyncio.get_running_loop().create_future()
        self.callback = None
        self._write(data, count, timeout)
        return future

    def request_then(self, data: bytes, count: int, timeout: float | None, callback: Any) -> None:
        """``request`` without a future: ``callback(replies, error)`` runs as the last reply arrives, one loop
        iteration sooner than a future's done-callback would."""
        self.future = None
        self.callback = callback
        self._write(data, count, timeout)

    def _write(self, data: bytes, count: int, timeout: float | None) -> None:
        if self.closed:
            self.loop_soon(RedisConnectionError("Connection closed by server."))
            return
        self.expected = count
        self.replies = []
        if timeout is not None:
            self.deadline = self.links.loop.time() + timeout
            self.links.watch()
        self.transport.write(data)

    def loop_soon(self, error: BaseException) -> None:
        """Fail the request from the loop, not from inside the caller's call."""
        asyncio.get_running_loop().call_soon(self._finish, None, error)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        while self.future is not None or self.callback is not None:
            reply = reader.gets()
            if reply is False:
                return
            self.replies.append(reply)
            if len(self.replies) == self.expected:
                self._finish(result=self.replies)

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        future, self.future = self.future, None
        callback, self.callback = self.callback, None
        self.deadline = None
        if callback is not None:
            callback(result, error)
        elif future is not None and not future.done():
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _timed_out(self) -> None:
        self._finish(error=RedisTimeoutError("Timeout reading from Redis"))
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.links.discard(self)
        self._finish(error=RedisConnectionError(f"Connection closed by server ({exc})" if exc else
                                                "Connection closed by server."))

    def close(self) -> None:
        self.closed = True
        self.links.discard(self)
        self.transport.close()


class _Deadlines(set):
    """The async face's open links (a set), and their requests' timeouts.

    One timer per loop ticks every SWEEP seconds while a request is in flight and fails those past their
    deadline, instead of a timer per request: call_later() and cancel() were 15% of an async send's
    instructions (152,000 -> 129,500 without). A request times out up to SWEEP late.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.handle: asyncio.TimerHandle | None = None

    def watch(self) -> None:
        if self.handle is None:
            self.handle = self.loop.call_later(SWEEP, self._sweep)

    def _sweep(self) -> None:
        self.handle = None
        now = self.loop.time()
        waiting = False
        for link in list(self):
            if link.deadline is not None:
                if link.deadline <= now:
                    link._timed_out()
                else:
                    waiting = True
        if waiting:
            self.watch()

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class _SendBatch:
    """The async sends: at most one script call in flight per shard, the sends made meanwhile gathered into the next.

    A send to a shard with no call in flight is written at once (one loop iteration fewer than waiting for the
    tick's end); the sends made while a call is in flight (the rest of that loop tick, and after) wait and go
    together, in one script call, as soon as its reply arrives. So a bridge answering many connections at once
    still pays one round trip per shard per batch, and a lone sender no extra loop iteration. Validation and
    serialization happen in ``add``, so bad input still raises in its sender; one call at a time per shard means
    messages enter each queue in ``add`` order; a message refused by a full queue raises ``ChannelFull`` in its
    own sender only (the queue keeps the earliest messages, as ``send_many`` does). When a call fails for the
    connection (reset, timeout), the sends waiting behind it fail too with ``LayerUnavailable``: not stored.
    """

    def __init__(self, layer: RedisLayer, loop: asyncio.AbstractEventLoop) -> None:
        self.layer = layer
        self.loop = loop
        self.busy: set[int] = set()  # shards with a script call in flight
        self.waiting: dict[int, list[tuple[str, bytes, asyncio.Future]]] = {}  # per busy shard, the sends after it
        self.tasks: set[asyncio.Task] = set()

    def add(self, channel: str, message: dict) -> asyncio.Future:
        layer = self.layer
        base.check_channel_name(channel)
        now = time.time()
        entry = base.make_entry(channel, layer._body(message), now + layer.options.expiry)
        future = self.loop.create_future()
        queue = base.queue_name(channel)
        shard = layer.ring.shard(queue)
        if shard in self.busy:
            self.waiting.setdefault(shard, []).append((channel, entry, future))
            return future
        # Nothing in flight on this shard: write now, SEND_ONE_LUA as _send_call would pick for a lone message.
        self.busy.add(shard)
        capacity = layer.options.capacity_for(channel)
        queues = {queue: [capacity, [channel], [entry], [future]]}
        link = layer._idle_link(shard)
        if link is None:  # a connection to open first: a task does that
            self._start(shard, queues)
        else:
            data = hiredis.pack_command(("EVALSHA", _SEND_ONE.sha, 1, layer._key_prefix + queue, entry, capacity,
                                         layer._ttl, repr(now)))
            self._write(shard, queues, link, data)
        return future

    def _flush(self, shard: int, items: list[tuple[str, bytes, asyncio.Future]]) -> None:
        """One script call for the sends that waited on ``shard``."""
        layer = self.layer
        queues: dict[str, list] = {}
        for channel, entry, future in items:
            queue = base.queue_name(channel)
            batch = queues.get(queue)
            if batch is None:
                batch = queues[queue] = [layer.options.capacity_for(channel), [], [], []]
            batch[1].append(channel)
            batch[2].append(entry)
            batch[3].append(future)
        self.busy.add(shard)
        link = layer._idle_link(shard)
        if link is None:
            self._start(shard, queues)
            return
        script, keys, args = layer._send_call(queues)
        self._write(shard, queues, link, hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *args)))

    def _write(self, shard: int, queues: dict[str, list], link: _AsyncLink, data: bytes) -> None:
        # No task: the senders are settled from data_received itself.
        link.request_then(data, 1, COMMAND_TIMEOUT,
                          lambda replies, error: self._answered(shard, queues, link, replies, error))

    def _next(self, shard: int, failure: LayerUnavailable | None = None) -> None:
        """The call in flight on ``shard`` is over: send what waited behind it, or fail it with the same outage."""
        self.busy.discard(shard)
        items = self.waiting.pop(shard, None)
        if not items:
            return
        if failure is None:
            self._flush(shard, items)
            return
        for _, _, future in items:
            if not future.done():
                future.set_exception(type(failure)(str(failure)))

    def _start(self, shard: int, queues: dict[str, list]) -> None:
        task = self.loop.create_task(self._send(shard, queues))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _answered(self, shard: int, queues: dict[str, list], link: _AsyncLink, replies: list | None,
                  error: BaseException | None) -> None:
        layer = self.layer
        if error is not None:
            link.close()
            failure = layer._unavailable(shard, error)
            self._fail(queues, failure)
            self._next(shard, failure)
            return
        reply = replies[0]
        layer._async_idle[shard].append(link)
        if isinstance(reply, NoScriptError):  # a restarted or flushed Redis: the task path loads the script
            self._start(shard, queues)
            return
        if isinstance(reply, ReadOnlyError) and link.sentinel:
            link.close()
            failure = layer._unavailable(shard, RedisConnectionError("The previous master is now a slave"))
            self._fail(queues, failure)
            self._next(shard, failure)
            return
        if isinstance(reply, RedisError):
            self._fail(queues, reply)
        else:
            self._settle(queues, reply)
        self._next(shard)

    async def _send(self, shard: int, queues: dict[str, list]) -> None:
        try:
            reply = await self.layer._script(shard, *self.layer._send_call(queues))
        except Exception as exc:
            self._fail(queues, exc)
            self._next(shard, exc if isinstance(exc, LayerUnavailable) else None)
            return
        except BaseException:  # cancelled (the loop closing): what waited is not sent either
            self.busy.discard(shard)
            raise
        self._settle(queues, reply)
        self._next(shard)

    def _fail(self, queues: dict[str, list], exc: Exception) -> None:
        for batch in queues.values():
            for future in batch[3]:
                if not future.done():
                    # A fresh error per sender, of the same class (AuthenticationFailed stays one).
                    future.set_exception(type(exc)(str(exc)) if isinstance(exc, LayerUnavailable) else exc)

    def _settle(self, queues: dict[str, list], reply: Any) -> None:
        """Resolve every sender's future from the script's reply (SEND_ONE_LUA's integer or SEND_LUA's pair)."""
        layer = self.layer
        if reply == 0:  # SEND_ONE_LUA (one queue, one sender) stored its message, nothing expired: nearly always
            (future,) = next(iter(queues.values()))[3]
            layer.counters.sent += 1
            if not future.done():
                future.set_result(None)
            return
        expired, refused_counts = layer._send_outcome(reply)
        layer.counters.expired += expired
        for (capacity, channels, _, futures), refused in zip(queues.values(), refused_counts, strict=True):
            kept = len(futures) - refused
            layer.counters.sent += kept
            layer.counters.refused += refused
            for i, future in enumerate(futures):
                if future.done():  # its sender was cancelled
                    continue
                if i < kept:
                    future.set_result(None)
                else:
                    future.set_exception(ChannelFull(f"channel {channels[i]!r} is full (capacity {capacity})"))


class _Link:
    """One connection of the blocking face.

    redis-py opens it (handshake, AUTH, SELECT, TLS, asking the sentinels for the primary); after that the layer
    writes RESP to its socket itself and parses the replies with a hiredis reader of its own. redis-py's
    per-command layers (its pool's locks and observability hooks, health checks, parser wrappers) cost a
    one-at-a-time send or receive more client CPU than all the rest of it (callgrind: 100,000+ of the 170,000
    instructions of a send).
    """

    __slots__ = ("conn", "sock", "reader", "buffer", "idle", "sentinel")

    def __init__(self, conn: Any, sentinel: bool) -> None:
        conn.connect()
        self.conn = conn
        self.sock = conn._sock
        # The parser redis-py itself would use maps error replies to its exception classes (NOSCRIPT, READONLY...).
        self.reader = hiredis.Reader(replyError=conn._parser.parse_error)
        self.buffer = bytearray(65536)
        self.idle = select.poll()
        self.idle.register(self.sock, select.POLLIN)
        self.sentinel = sentinel

    def stale(self) -> bool:
        """True if the server closed this idle connection (a restart, an idle timeout): it reads as ready."""
        return bool(self.idle.poll(0))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, timeout: Any = _DEFAULT) -> Any:
        """One reply; an error reply is raised as redis-py would, and a connection error as an OSError.

        The socket keeps its COMMAND_TIMEOUT: a longer wait (a blocking pop's, None for ever) repeats the read
        until its deadline, because each settimeout() is a system call, twice per receive.
        """
        reader = self.reader
        reply = reader.gets()
        deadline = None
        while reply is False:
            try:
                n = self.sock.recv_into(self.buffer)
            except TimeoutError:
                if timeout is _DEFAULT or timeout is not None and timeout <= COMMAND_TIMEOUT:
                    raise
                if deadline is None:
                    deadline = time.monotonic() - COMMAND_TIMEOUT + (math.inf if timeout is None else timeout)
                if time.monotonic() >= deadline:
                    raise
                continue
            if not n:
                raise RedisConnectionError("Connection closed by server.")
            reader.feed(self.buffer, 0, n)
            reply = reader.gets()
        if isinstance(reply, RedisError):
            if self.sentinel and isinstance(reply, ReadOnlyError):
                # A primary demoted by a failover: drop it, so the next connection asks the sentinels again.
                raise RedisConnectionError("The previous master is now a slave")
            raise reply
        return reply

    def ready(self) -> bool:
        """True if a reply (or part of one) is already here: buffered by the reader or by TLS, unseen by select()."""
        if self.reader.has_data():
            return True
        pending = getattr(self.sock, "pending", None)
        return bool(pending and pending())

    def close(self) -> None:
        self.conn.disconnect()


class _SyncRedis(base.LayerErrors):
    """The blocking face: the same methods on blocking sockets (``_Link``), no event loop."""

    def __init__(self, layer: RedisLayer) -> None:
        self.layer = layer
        self._pools = [make_pool(url, False, layer._pool_options()) for url in layer.hosts]
        self._sentinel = [url.split("://", 1)[0].lower() in SENTINEL_SCHEMES for url in layer.hosts]
        # Per shard, the connections not in use. list.pop() and append() are atomic, so threads share them
        # without a lock; _links holds every connection made, for close().
        self._idle: list[list[_Link]] = [[] for _ in layer.hosts]
        self._links: set[_Link] = set()
        self._pid = os.getpid()

    def _link(self, shard: int) -> _Link:
        if self._pid != os.getpid():  # a forked child: the parent's connections are not its to use
            self._pid = os.getpid()
            self._idle = [[] for _ in self._idle]
            self._links = set()
        idle = self._idle[shard]
        while idle:
            try:
                link = idle.pop()
            except IndexError:  # another thread took the last one
                break
            if not link.stale():
                return link
            self._drop(link)
        try:
            link = _Link(self._pools[shard].make_connection(), self._sentinel[shard])
        except _IO_ERRORS as exc:
            raise self.layer._unavailable(shard, exc) from exc
        self._links.add(link)
        return link

    def _drop(self, link: _Link) -> None:
        link.close()
        self._links.discard(link)

    def _commands(self, shard: int, commands: list[tuple], read_timeout: Any = _DEFAULT) -> list:
        """Send commands in one write, read their replies; ``read_timeout=None`` waits forever."""
        link = self._link(shard)
        try:
            if len(commands) == 1:
                link.send(hiredis.pack_command(commands[0]))
                replies = [link.read(read_timeout)]
            else:
                link.send(b"".join([hiredis.pack_command(command) for command in commands]))
                replies = [link.read(read_timeout) for _ in commands]
        except _IO_ERRORS as exc:
            self._drop(link)
            raise self.layer._unavailable(shard, exc) from exc
        except RedisError:
            if len(commands) > 1:  # an error reply (OOM, ...) left later replies unread: never hand this on
                self._drop(link)
            else:
                self._idle[shard].append(link)
            raise
        except BaseException:  # interrupted with a reply owed
            self._drop(link)
            raise
        self._idle[shard].append(link)
        return replies

    def _call(self, shard: int, *args: Any, read_timeout: Any = _DEFAULT) -> Any:
        return self._commands(shard, [args], read_timeout)[0]

    def kv_get(self, key: str) -> dict[str, Any]:
        shard, command = self.layer._kv_get_command(key)
        return self.layer._kv_decoded(self._call(shard, *command))

    def kv_set(self, key: str, fields: dict, ttl: float) -> None:
        self._commands(*self.layer._kv_set_commands(key, fields, ttl, replace=True))

    def kv_update(self, key: str, fields: dict, ttl: float) -> None:
        self._commands(*self.layer._kv_set_commands(key, fields, ttl, replace=False))

    def kv_delete(self, key: str) -> None:
        shard, command = self.layer._kv_delete_command(key)
        self._call(shard, *command)

    def _script(self, shard: int, script: _Script, keys: list, args: list) -> Any:
        try:
            return self._call(shard, "EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            self._call(shard, "SCRIPT", "LOAD", script.source)
            return self._call(shard, "EVALSHA", script.sha, len(keys), *keys, *args)

    def send(self, channel: str, message: dict) -> None:
        shard, keys, args = self.layer._send_one_args(channel, message)
        self.layer._send_one_done(channel, self._script(shard, _SEND_ONE, keys, args))

    def send_many(self, items: Iterable[tuple[str, dict]]) -> None:
        plan, count = self.layer._send_plan(items)
        replies = {shard: self._script(shard, *self.layer._send_call(queues)) for shard, queues in plan.items()}
        self.layer._send_done(plan, replies, count)

    def receive(self, channels: Any, timeout: float | None = None) -> tuple[str | None, dict | None]:
        got = self.receive_many(channels, 1, timeout)
        return got[0] if got else (None, None)

    def receive_many(self, channels: Any, max_messages: int, timeout: float | None = None) -> list[tuple[str, dict]]:
        wait = _Wait(self.layer, channels, max_messages, timeout)
        while True:
            taken = wait.ready()
            if taken or wait.over():
                return taken
            try:
                taken = self._pop(wait.queues, max_messages, wait.remaining())
            except LayerUnavailable as exc:
                delay = wait.backoff(exc)
                if delay is None:
                    return []
                time.sleep(delay)  # reconnect backoff, not a poll: messages wake BLMPOP
                continue
            wait.resumed()
            if taken:
                return taken

    def _pop(self, queues: list[str], limit: int, timeout: float | None) -> list[tuple[str, dict]]:
        """Pop what is waiting (blocking up to ``timeout``): returned when it can go straight to the caller, else
        kept in the buffer for the next look there."""
        layer = self.layer
        plan = layer._by_shard(queues)
        # None: block until Redis answers (a dead link still raises at once).
        read_timeout = None if timeout is None else timeout + COMMAND_TIMEOUT
        if len(plan) == 1:
            (shard, keys), = plan.items()
            command = layer._pop_command(keys, limit, timeout)
            reply = self._commands(shard, [command], read_timeout=read_timeout)[0]
            if reply and not layer._buffer:  # nothing popped before waits to go first: hand these on directly
                return layer._take_popped(reply)
            layer._buffer_popped(reply)
            return []
        self._pop_shards(plan, limit, timeout, read_timeout)
        return []

    def _pop_shards(self, plan: dict[int, list[str]], limit: int, timeout: float | None, read_timeout: Any) -> None:
        """Block on several shards at once; wake the rest when one answers."""
        layer = self.layer
        wake_key = f"{layer.options.prefix}:w:{uuid.uuid4().hex}"
        held: dict[int, _Link] = {}
        waiting: set[int] = set()
        broken: set[int] = set()
        failure: BaseException | None = None
        try:
            for shard, keys in plan.items():
                held[shard] = link = self._link(shard)
                waiting.add(shard)
                try:
                    link.send(hiredis.pack_command(layer._pop_command(keys + [wake_key], limit, timeout)))
                except _IO_ERRORS as exc:
                    raise layer._unavailable(shard, exc) from exc
            woken: set[int] = set()
            while waiting:
                ready = [s for s in waiting if held[s].ready()]
                if not ready:
                    socks = {held[s].sock: s for s in waiting}
                    wait = COMMAND_TIMEOUT if woken else read_timeout
                    readable, _, _ = select.select(list(socks), [], [], wait)
                    if not readable:
                        raise layer._unavailable(next(iter(waiting)), TimeoutError("no reply to a blocking pop"))
                    ready = [socks[sock] for sock in readable]
                for shard in ready:
                    waiting.discard(shard)
                    try:
                        reply = held[shard].read(COMMAND_TIMEOUT)
                    except _IO_ERRORS as exc:
                        broken.add(shard)
                        failure = layer._unavailable(shard, exc)
                        continue
                    layer._buffer_popped(reply, wake_key)
                    if shard in woken and (not reply or reply[0].decode() != wake_key):
                        self._call(shard, "DEL", wake_key)
                if waiting and not woken:
                    for shard in waiting:
                        self._commands(shard, [("RPUSH", wake_key, b""), ("EXPIRE", wake_key, 60)])
                    woken = set(waiting)
        finally:
            for shard, link in held.items():
                if shard in waiting or shard in broken:  # a reply is still owed: never hand this connection on
                    self._drop(link)
                else:
                    self._idle[shard].append(link)
        if failure is not None:
            raise failure

    def new_channel(self, pattern: str) -> str:
        return base.new_channel_name(pattern)

    def group_add(self, group: str, channel: str) -> None:
        shard, commands = self.layer._member_commands(group, channel, add=True)
        self._commands(shard, commands)

    def group_discard(self, group: str, channel: str) -> None:
        shard, commands = self.layer._member_commands(group, channel, add=False)
        self._commands(shard, commands)

    def group_channels(self, group: str) -> list[str]:
        key = self.layer.group_key(base.check_group_name(group))
        now = repr(time.time())
        return [m.decode() for s in range(len(self._pools)) for m in self._call(s, "ZRANGEBYSCORE", key, now, "+inf")]

    def group_send(self, group: str, message: dict) -> GroupSendResult:
        key = self.layer.group_key(base.check_group_name(group))
        args = self.layer._group_args(message)
        replies = [self._script(shard, _GROUP_SEND, [key], args) for shard in range(len(self._pools))]
        return self.layer._group_done(group, replies)

    def flush(self) -> None:
        for shard in range(len(self._pools)):
            for keys in self._scan(shard, f"{self.layer.options.prefix}:*"):
                self._call(shard, "UNLINK", *keys)
        with self.layer._buffer_lock:
            self.layer._buffer.clear()

    def _scan(self, shard: int, match: str):
        cursor = 0
        while True:
            cursor, keys = self._call(shard, "SCAN", cursor, "MATCH", match, "COUNT", 1000)
            if keys:
                yield keys
            if int(cursor) == 0:
                return

    def stats(self) -> dict[str, Any]:
        pending: dict[str, int] = {}
        for shard in range(len(self._pools)):
            for keys in self._scan(shard, self.layer._key_prefix + "*"):
                self.layer._count_pending(pending, keys, self._commands(shard, [("LLEN", k) for k in keys]))
        return self.layer._stats(pending)

    def close(self) -> None:
        links, self._links = self._links, set()
        self._idle = [[] for _ in self._idle]
        for link in links:
            link.close()
        for pool in self._pools:
            pool.disconnect()
