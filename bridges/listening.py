"""How a bridge that waits for clients listens (HTTP, WebSocket, SMTP and the Slack Events API listener).

Owns the listening options every such bridge declares (``listen_options``:
host and port, a Unix socket, a socket passed by systemd, TLS, the backlog),
their checks and errors (``ListeningBridge.validate_options``, so
``crossroads check`` reports them too), opening the listening socket
(``listen`` for a Twisted factory, ``listen_asyncio`` for an asyncio protocol
factory such as aiosmtpd's) and naming its peers' addresses. It must not know
any protocol: a bridge hands it its factory and gets the listening port back.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import stat
from typing import Any

from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from .base import Bridge, Option, OptionError, as_future, get_reactor
from .protocol import check_allowed_host, each, effective_allowed_hosts, port_number, positive

# Connections the kernel may hold for us before we accept them. Twisted's default, 50, overflows when a
# page reloads for hundreds of clients at once (the kernel then drops handshakes, and clients wait
# seconds for a retry); nginx uses 511. Linux caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024
# Client connections one listener holds at once. Each costs a file descriptor: with no cap, slow clients take every
# descriptor the process has and a legitimate request fails with EMFILE (seen with 400 at `ulimit -n 256`). The
# cap is lowered to what the open-files limit leaves room for (FD_RESERVE kept for the layer, logs, DNS).
MAX_CONNECTIONS = 10_000
FD_RESERVE = 128
RETRY_AFTER = 5  # seconds, in the 503 past max_connections


def listen_options(default_port: int) -> dict[str, Option]:
    """The options of a listening bridge, to spread into its ``OPTIONS`` (``{**listen_options(8000), ...}``)."""
    return {
        "host": Option(str, "127.0.0.1", "the address to listen on (0.0.0.0 or :: for every interface)"),
        "port": Option(int, default_port, "the TCP port to listen on; 0 picks a free one", port_number,
                       from_string=True),
        "unix_socket": Option(str, "", "listen on this Unix socket path instead of host and port"),
        "systemd_socket": Option(str, "", "take the listening socket from systemd socket activation: the "
                                          "FileDescriptorName= of the .socket unit (host, port, unix_socket unused)"),
        "tls_cert": Option(str, "", "PEM certificate (chain after it) to serve TLS with; needs tls_key"),
        "tls_key": Option(str, "", "PEM private key of tls_cert"),
        "backlog": Option(int, LISTEN_BACKLOG, "connections the kernel holds until they are accepted (capped by "
                                               "net.core.somaxconn; with systemd_socket, the unit's Backlog=)",
                          positive, from_string=True),
        "max_connections": Option(int, MAX_CONNECTIONS, "client connections open at once; past it a new one is "
                                                        "answered 503 (Retry-After) and closed, and counted",
                                  positive, from_string=True),
    }


# HTTP and WebSocket bridges answer only the Host names they are meant to: a DNS-rebinding page (evil.example
# resolving to 127.0.0.1) sends its own name as Host, and the same-origin check alone would let it in.
ALLOWED_HOSTS = Option(list, [], "Host names answered ('chat.example.com', '*.example.com', '*'); others get 400. "
                                 "Empty: the loopback names on a loopback listener (any host behind proxy_headers), "
                                 "any host elsewhere", each(check_allowed_host))


def allowed_hosts(options: dict[str, Any], listen_options: dict[str, Any], behind_proxy: bool = False) -> tuple:
    """What ``allowed_hosts`` in ``options`` means where ``listen_options`` listen (see ``ALLOWED_HOSTS``)."""
    bind = None if listen_options["unix_socket"] or listen_options["systemd_socket"] else listen_options["host"]
    return effective_allowed_hosts(options["allowed_hosts"], None if behind_proxy else bind)


def uses_tls(options: dict[str, Any]) -> bool:
    """Whether the options ask for TLS; ``OptionError`` when only one of ``tls_cert`` and ``tls_key`` is set.

    ``ListeningBridge.validate_options`` calls it, so ``crossroads check`` finds it, and a bridge is not made.
    """
    cert, key = options["tls_cert"], options["tls_key"]
    if bool(cert) != bool(key):
        raise OptionError("tls_key" if cert else "tls_cert",
                          "tls_cert and tls_key go together: set both to serve TLS, or neither")
    return bool(cert)


class ListeningBridge(Bridge):
    """A bridge that waits for clients; its ``OPTIONS`` include ``listen_options(its default port)``."""

    open_connections = 0  # client connections open now (kept by ``listen``'s cap), shown by ``status()``

    def status(self) -> dict[str, Any]:
        return {**super().status(), "open_connections": self.open_connections}

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        checked = super().validate_options(options)
        uses_tls(checked)  # the one rule between two options: each alone is checked by its Option
        return checked


def connection_cap(options: dict[str, Any], soft: int | None = None) -> tuple[int, str | None]:
    """``max_connections``, lowered to what the soft open-files limit (``soft``: this process's) leaves room for;
    and why, if it was."""
    import resource

    wanted = options["max_connections"]
    if soft is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = soft - FD_RESERVE if soft != resource.RLIM_INFINITY else wanted
    if room >= wanted:
        return wanted, None
    cap = max(1, room)
    return cap, (f"max_connections {wanted} is more than the open-files limit ({soft}) leaves room for: capped at "
                 f"{cap}; raise the limit (LimitNOFILE= in the unit, ulimit -n) or lower max_connections")


class CappedFactory:
    """``factory``'s connections, at most ``limit`` open at once; one past it gets ``refusal`` written and is closed.

    Counted where the connection's transport closes (not the protocol's
    ``connectionLost``): a protocol may hand its transport to another (the
    HTTP port splitter does, to the WebSocket bridge), and the slot must last
    as long as the socket does. The count is the bridge's ``open_connections``.
    """

    def __init__(self, factory: Any, bridge: ListeningBridge, limit: int, refusal: bytes) -> None:
        self.factory, self.bridge, self.limit, self.refusal = factory, bridge, limit, refusal

    def __getattr__(self, name: str) -> Any:  # the listening port calls doStart, doStop, logPrefix, ...
        return getattr(self.factory, name)

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 (Twisted's name)
        bridge = self.bridge
        if bridge.open_connections >= self.limit:
            _refused(bridge, self.limit)
            return _Refusal(self.refusal)
        built = self.factory.buildProtocol(addr)
        if built is None:
            return None
        bridge.open_connections += 1
        built.makeConnection = _Slot(bridge, built.makeConnection).make_connection
        return built


class _Slot:
    """One connection's place under ``max_connections``, given back where its transport closes (see ``CappedFactory``).

    A slotted object with two bound methods, not two closures: there is one per open connection."""

    __slots__ = ("bridge", "lost", "make")

    def __init__(self, bridge: ListeningBridge, make: Any) -> None:
        self.bridge: ListeningBridge | None = bridge
        self.make, self.lost = make, None

    def make_connection(self, transport: Any) -> None:
        make, self.make = self.make, None  # it holds the protocol: not kept past this call
        self.lost = transport.connectionLost
        transport.connectionLost = self.connection_lost
        make(transport)

    def connection_lost(self, reason: Any = None) -> None:
        if self.bridge is not None:  # once: the transport may be asked twice
            self.bridge.open_connections -= 1
            self.bridge = None
        self.lost(reason)


class _Refusal(Protocol):
    def __init__(self, refusal: bytes) -> None:
        self.refusal = refusal

    def connectionMade(self) -> None:  # noqa: N802
        if self.refusal:
            self.transport.write(self.refusal)
        self.transport.loseConnection()


def busy_response() -> bytes:
    """The HTTP answer to a connection past ``max_connections`` (HTTP and WebSocket handshakes alike)."""
    body = b"too many connections, try again later\n"
    return (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: %d\r\nConnection: close\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s"
            % (RETRY_AFTER, len(body), body))


async def listen(factory: Any, options: dict[str, Any], bridge: ListeningBridge | None = None,
                 refusal: bytes = b"") -> Any:
    """Start listening for ``factory``'s connections as ``listen_options`` in ``options`` say; the listening port.

    In order of precedence: the socket systemd passed as ``systemd_socket``, the
    Unix socket ``unix_socket`` (a stale socket file of an earlier run is
    removed first), TCP on ``host``:``port``. With ``tls_cert``/``tls_key`` TLS
    wraps whichever it is. ``OptionError`` names the option when a TLS file or
    the systemd socket is not usable; ``CannotListenError`` when the port is taken.
    """
    reactor = get_reactor()
    if bridge is not None:  # inside TLS: a refused client gets its answer encrypted, as it expects
        limit, lowered = connection_cap(options)
        if lowered:
            bridge.log.warning("%s: %s", bridge.label, lowered)
        factory = CappedFactory(factory, bridge, limit, refusal)
    if uses_tls(options):
        from twisted.protocols.tls import TLSMemoryBIOFactory

        factory = TLSMemoryBIOFactory(TlsContext(options["tls_cert"], options["tls_key"]), False, factory)
    if options["systemd_socket"]:
        return await as_future(inherited_endpoint(reactor, options["systemd_socket"]).listen(factory))
    path = options["unix_socket"]
    if path:
        _remove_stale_socket(path)
        return reactor.listenUNIX(path, factory, backlog=options["backlog"])
    return reactor.listenTCP(options["port"], factory, backlog=options["backlog"], interface=options["host"])


def _refused(bridge: Bridge, limit: int) -> None:
    bridge.count("connections_refused")
    refused = bridge.counters["connections_refused"]
    if refused in (1, 10, 100) or refused % 1000 == 0:  # a flood of refusals is a few log lines, not one each
        bridge.log.warning("%s: %d connections open, the most max_connections allows: refusing new ones with 503 "
                           "(%d so far)", bridge.label, limit, refused)


class _CountedProtocol(asyncio.Protocol):
    """An asyncio protocol, passed every event, holding one of its bridge's ``max_connections`` slots until it closes.

    (A wrapper, not a patched ``connection_lost``: aiohttp's handler has ``__slots__``.)
    """

    def __init__(self, inner: asyncio.BaseProtocol, bridge: ListeningBridge) -> None:
        self.inner, self.bridge = inner, bridge
        bridge.open_connections += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.bridge.open_connections -= 1
        self.inner.connection_lost(exc)


class _RefusingProtocol(asyncio.Protocol):
    def __init__(self, refusal: bytes) -> None:
        self.refusal = refusal

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.refusal:
            transport.write(self.refusal)
        transport.close()


def _capped_asyncio(protocol_factory: Any, options: dict[str, Any], bridge: ListeningBridge,
                    refusal: bytes) -> Any:
    limit, lowered = connection_cap(options)
    if lowered:
        bridge.log.warning("%s: %s", bridge.label, lowered)

    def make() -> asyncio.BaseProtocol:
        if bridge.open_connections >= limit:
            _refused(bridge, limit)
            return _RefusingProtocol(refusal)
        return _CountedProtocol(protocol_factory(), bridge)

    return make


async def listen_asyncio(protocol_factory: Any, options: dict[str, Any], tls: ssl.SSLContext | None = None,
                         bridge: ListeningBridge | None = None, refusal: bytes = b"") -> asyncio.Server:
    """``listen`` for an asyncio protocol factory (aiosmtpd's ``SMTP``), on the reactor's own loop.

    The same options in the same precedence; ``tls`` (from ``server_ssl_context``)
    wraps every connection from its first byte. A protocol that upgrades later
    (SMTP's STARTTLS) gets the context itself and passes no ``tls`` here. With
    ``bridge``, ``max_connections`` holds as in ``listen`` (``refusal`` written to
    one past it); without, the bridge keeps its own count (the SMTP server answers 421).
    ``OSError`` when the port is taken.
    """
    if bridge is not None:
        protocol_factory = _capped_asyncio(protocol_factory, options, bridge, refusal)
    loop = asyncio.get_running_loop()
    backlog = options["backlog"]
    if options["systemd_socket"]:
        endpoint = inherited_endpoint(get_reactor(), options["systemd_socket"])
        sock = socket.socket(endpoint.addressFamily, socket.SOCK_STREAM, fileno=os.dup(endpoint.fileno))
        return await loop.create_server(protocol_factory, sock=sock, ssl=tls, backlog=backlog)
    path = options["unix_socket"]
    if path:
        _remove_stale_socket(path)
        return await loop.create_unix_server(protocol_factory, path, ssl=tls, backlog=backlog)
    return await loop.create_server(protocol_factory, options["host"], options["port"], ssl=tls, backlog=backlog)


def _remove_stale_socket(path: str) -> None:
    if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
        os.unlink(path)  # left by a previous run; binding would fail with "address in use"


def server_ssl_context(options: dict[str, Any]) -> ssl.SSLContext:
    """The standard library's server TLS context from ``tls_cert``/``tls_key`` (asyncio protocols need it, not
    pyOpenSSL's): the same files and rules as ``TlsContext``, TLS 1.2 the oldest; ``OptionError`` naming the option."""
    _check_readable(options["tls_cert"], options["tls_key"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(options["tls_cert"], options["tls_key"])
    except (ssl.SSLError, ValueError) as exc:
        raise OptionError("tls_key", f"{options['tls_cert']!r} and {options['tls_key']!r} are not a PEM certificate "
                                     f"(chain) and its private key ({exc})") from None
    return context


def _check_readable(cert_path: str, key_path: str) -> None:
    for key, path in (("tls_cert", cert_path), ("tls_key", key_path)):
        if not os.access(path, os.R_OK):
            raise OptionError(key, f"cannot read {path!r}: no such file, or not readable")


def asyncio_tcp_port(server: asyncio.Server) -> int | None:
    """``tcp_port`` of an ``asyncio.Server``: the TCP port it took, None on a Unix socket."""
    address = server.sockets[0].getsockname() if server.sockets else None
    return address[1] if isinstance(address, tuple) else None


def tcp_port(listening: Any) -> int | None:
    """The TCP port a listening port took (the free one picked for ``port = 0``); None on a Unix socket."""
    return getattr(listening.getHost(), "port", None)


def address_of(address: Any) -> list | None:
    """``[host, port]`` of a Twisted address; None for a Unix socket's, which has no host."""
    host = getattr(address, "host", None)
    return None if host is None else [host, address.port]


def server_address(address: Any, options: dict[str, Any]) -> list:
    """The ``server`` key of a connection's messages: ``[host, port]``, or ``[unix socket path, None]``."""
    return address_of(address) or [options["unix_socket"], None]


@implementer(IOpenSSLServerConnectionCreator)
class TlsContext:
    """The server's TLS context from PEM files: the certificate with its chain after it, and its key.

    Built when the bridge starts, so a bad file fails the start naming the
    option, not every handshake later. The whole chain is served (clients fail
    on certificates from an intermediate otherwise); TLS 1.2 is the oldest offered.
    """

    def __init__(self, cert_path: str, key_path: str) -> None:
        from OpenSSL import SSL  # pyOpenSSL: imported only when TLS is asked for

        _check_readable(cert_path, key_path)
        try:
            context = SSL.Context(SSL.TLS_SERVER_METHOD)
            context.set_min_proto_version(SSL.TLS1_2_VERSION)
            context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
            context.use_certificate_chain_file(cert_path)
            context.use_privatekey_file(key_path)
            context.check_privatekey()
        except SSL.Error as exc:
            raise OptionError("tls_key", f"{cert_path!r} and {key_path!r} are not a PEM certificate (chain) and its "
                                         f"private key ({exc})") from None
        self.context = context

    def serverConnectionForTLS(self, protocol: Any) -> Any:  # noqa: N802 (Twisted's name)
        from OpenSSL import SSL

        return SSL.Connection(self.context, None)


def inherited_endpoint(reactor: Any, name: str) -> Any:
    """A server endpoint on the listening socket systemd passed with ``FileDescriptorName=name``.

    For socket activation: systemd opens the port (a privileged one, or one
    that must take connections while the service restarts) and passes it in
    ``LISTEN_FDS``/``LISTEN_FDNAMES``. Twisted reads those once, when
    ``twisted.internet.endpoints`` is imported, hence its endpoint parser.
    ``OptionError`` when no socket of that name was passed, saying how to pass one.
    """
    from twisted.internet.endpoints import serverFromString

    try:
        endpoint = serverFromString(reactor, f"systemd:domain=INET:name={name}")
    except KeyError:
        raise OptionError("systemd_socket", f"systemd passed no listening socket named {name!r}; start this bridge "
                                            f"through a .socket unit with FileDescriptorName={name} "
                                            "(docs/running.md)") from None
    probe = socket.socket(fileno=endpoint.fileno)
    try:
        if probe.type != socket.SOCK_STREAM:
            raise OptionError("systemd_socket", f"the socket named {name!r} is not a stream socket: use "
                                                "ListenStream= in the .socket unit")
        endpoint.addressFamily = probe.family  # INET above was a placeholder: IPv6 and Unix sockets work too
    finally:
        probe.detach()  # the fd stays open: the endpoint adopts it
    return endpoint
