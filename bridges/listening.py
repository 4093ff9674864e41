"""What the bridges that listen for clients share (HTTP, WebSocket): option checks and the TLS context.

Owns how a listening address and TLS files are validated; each bridge owns its protocol.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from .base import OptionError

# Connections the kernel may hold for us before we accept them. Twisted's default, 50, overflows when a
# page reloads for hundreds of clients at once (the kernel then drops handshakes, and clients wait
# seconds for a retry); nginx uses 511. Linux caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


def port_number(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a TCP port number from 0 to 65535 (0 picks a free one)"


def positive_seconds(value: float) -> str | None:
    return None if value > 0 else "must be a positive number of seconds"


@implementer(IOpenSSLServerConnectionCreator)
class TlsContext:
    """The server's TLS context from PEM files: the certificate with its chain after it, and its key.

    Built when the bridge starts, so a bad file fails the start naming the
    option, not every handshake later. The whole chain is served (clients fail
    on certificates from an intermediate otherwise); TLS 1.2 is the oldest offered.
    """

    def __init__(self, cert_path: str, key_path: str) -> None:
        from OpenSSL import SSL  # pyOpenSSL: imported only when TLS is asked for

        for key, path in (("tls_cert", cert_path), ("tls_key", key_path)):
            if not os.access(path, os.R_OK):
                raise OptionError(key, f"cannot read {path!r}: no such file, or not readable")
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
