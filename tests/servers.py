"""Real servers started from system binaries on free ports, the waits that go with them (each with a deadline)
and a bridge run in this process: the one place the tests and the benches (bench/*.py put tests/ on their
sys.path) take them from. No test imports the bench, and the bench imports nothing else of the tests.

It imports only the standard library at the top (redis-py and trustme inside the functions that need them),
because the benches run without pytest. A server whose binary is missing raises ``ServerError`` naming the
binary and the command that installs it: a test that needs it fails, it never skips.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

INSTALL_HINT = {
    "redis-server": "apt-get install -y redis-server",
    "systemd-analyze": "apt-get install -y systemd",
    "systemd-socket-activate": "apt-get install -y systemd",
    "chromium": "apt-get install -y chromium",
    "mosquitto": "apt-get install -y mosquitto",
    "mosquitto_passwd": "apt-get install -y mosquitto",
    "mosquitto_pub": "apt-get install -y mosquitto-clients",
    "mosquitto_sub": "apt-get install -y mosquitto-clients",
    "ngircd": "apt-get install -y ngircd",
    "dovecot": "apt-get install -y dovecot-imapd",
    "ip": "apt-get install -y iproute2",
    "tc": "apt-get install -y iproute2",
    "postgres": "apt-get install -y postgresql",
    "initdb": "apt-get install -y postgresql",
}


class ServerError(RuntimeError):
    """A server's binary is missing, or the server did not come up."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_binary(name: str) -> str:
    """The path of ``name``; ``ServerError`` naming it and how to install it if it is not installed.

    /usr/sbin and /sbin are searched too: Debian puts ngircd there, off a normal user's PATH.
    """
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if path is None:
        raise ServerError(f"{name} is not installed; the tests and benchmarks need a real one. Install it with: "
                          f"{INSTALL_HINT.get(name, 'apt-get install ' + name)} (or run `make test`, which does)")
    return path


# -- waiting, always with a deadline --


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    """Check ``condition()`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


async def wait_until_async(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    """``wait_until`` for a coroutine: the loop runs while it waits."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


async def take(channel_layer: Any, channel: str, timeout: float = 10.0,
               where: Callable[[dict], bool] | None = None) -> dict:
    """The next message on ``channel`` of a layer (the next one ``where`` accepts, skipping others)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        got, message = await channel_layer.receive([channel], timeout=max(left, 0.01))
        assert got == channel, f"nothing{' matching' if where else ''} on {channel} within {timeout} s"
        if where is None or where(message):
            return message


@asynccontextmanager
async def running_in_process(bridge: Any, app: str | None, threads: int = 1) -> AsyncIterator[Any]:
    """``bridge`` started, with a Worker running ``app`` (None: no worker) on its layer in this process; at the
    end the bridge stops, the worker finishes, and the layer closes."""
    from crossroads.consumers.worker import Worker

    await bridge.start()
    worker = Worker(app, bridge.layer, threads=threads) if app else None
    if worker is not None:
        worker.start()
    try:
        yield bridge
    finally:
        await bridge.stop(timeout=5)
        if worker is not None:
            worker.stop()
            await asyncio.to_thread(worker.join, 10)
        await bridge.layer.close()


def write_test_certificates(folder: Path, *names: str) -> dict[str, str]:
    """A test CA and a server certificate for ``names`` (default 127.0.0.1 and localhost) (trustme), as PEM files in
    ``folder``: {"cert", "key", "ca"} paths."""
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert(*(names or ("127.0.0.1", "localhost")))
    paths = {"cert": str(folder / "cert.pem"), "key": str(folder / "key.pem"), "ca": str(folder / "ca.pem")}
    issued.cert_chain_pems[0].write_to_path(paths["cert"])
    issued.private_key_pem.write_to_path(paths["key"])
    ca.cert_pem.write_to_path(paths["ca"])
    return paths


def wait_for_port(port: int, process: subprocess.Popen, deadline: float = 10.0, host: str = "127.0.0.1") -> None:
    """Wait until something accepts connections on ``host:port``; fail if the process died."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise ServerError(f"server on port {port} exited with {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise ServerError(f"server on port {port} did not accept connections within {deadline}s")


def _as_user(user: str | None) -> dict[str, Any]:
    """Popen's arguments that run a process as ``user`` (its own group, none of ours); none for None."""
    if user is None:
        return {}
    import pwd

    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [],
            "env": {**os.environ, "HOME": entry.pw_dir, "USER": user, "LOGNAME": user}}


class ServerProcess:
    """What every server here shares: one process in ``workdir``, its output in a log file, killed by ``stop()``.

    ``stop()`` is SIGKILL, like a crash: a bridge sees its connection drop as
    it would in production; ``start()`` again serves on the same ports.
    ``command_prefix`` goes before the command (a benchmark pins a server to a
    core with ``taskset -c N``, a test runs it on another host with ``ip netns
    exec NAME``); ``host`` is the address its ports are waited on. ``with
    Server(...) as server:`` starts it and stops it at the end.
    """

    workdir: Path
    binary: str
    process: subprocess.Popen | None = None
    command_prefix: tuple[str, ...] = ()
    host = "127.0.0.1"

    def launch(self, args: list[str], log_name: str, *ports: int | None, user: str | None = None) -> None:
        """Start ``args`` with its output in ``workdir/log_name``; return once every port accepts connections.
        ``user``: run it as that user (the tests run as root, and some servers refuse root)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / log_name, "ab") as log:
            self.process = subprocess.Popen([*self.command_prefix, *args], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, **_as_user(user))
        for port in ports:
            if port:
                try:
                    wait_for_port(port, self.process, host=self.host)
                except ServerError as exc:
                    self.stop()
                    raise ServerError(f"{' '.join(args)}: {exc}; its output is in {self.workdir / log_name}") from None

    def first_line_of(self, *args: str) -> str:
        """The first line the binary prints when run with ``args`` (its version, for a benchmark's record)."""
        run = subprocess.run([self.binary, *args], capture_output=True, text=True)
        return (run.stdout or run.stderr).split("\n")[0].strip()

    def start(self) -> ServerProcess:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


class ScratchServer(ServerProcess):
    """A server that, run as root, lives in a folder of its own outside pytest's (one its unprivileged user can
    reach, which pytest's root-owned folder is not), removed by ``cleanup()``; as a user, in ``workdir``."""

    outside: bool = False  # its folder is one of its own, to remove

    def scratch(self, workdir: Path, prefix: str) -> Path:
        self.outside = os.getuid() == 0
        return Path(tempfile.mkdtemp(prefix=prefix)) if self.outside else workdir

    def cleanup(self) -> None:
        """Stop it and, run as root, remove its folder outside pytest's."""
        self.stop()
        if self.outside:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    @property
    def version(self) -> str:
        return self.first_line_of("--version")


class RedisServer(ServerProcess):
    """One ``redis-server`` process on a free port, in its own directory, persisting nothing."""

    def __init__(self, workdir: Path, port: int | None = None, tls: dict[str, str] | None = None,
                 password: str = "", extra: tuple[str, ...] = (), host: str = "127.0.0.1") -> None:
        self.binary = require_binary("redis-server")
        self.host = host  # the one address it listens on (a test's other host has its own)
        self.extra = extra  # more redis-server arguments (--replicaof HOST PORT for a replica)
        self.workdir = workdir
        self.port = port or free_port()
        self.tls = tls  # {"cert": path, "key": path, "ca": path}: serve TLS only
        self.password = password  # requirepass: clients must AUTH with it (the url carries it)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}{self.host}:{self.port}/0?ssl_ca_certs={self.tls['ca']}"
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self) -> RedisServer:
        listen = ["--port", str(self.port)]
        if self.tls:
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls["cert"],
                      "--tls-key-file", self.tls["key"], "--tls-ca-cert-file", self.tls["ca"],
                      "--tls-auth-clients", "no"]
        if self.password:
            listen += ["--requirepass", self.password]
        self.launch([self.binary, *listen, "--bind", self.host, "--save", "", "--appendonly", "no",
                     "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"), *self.extra],
                    "redis.out", self.port)
        return self

    def command(self, *args: str | int) -> object:
        """Run one command on a plain redis-py client, for checks that must bypass the layer."""
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=5)
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    @property
    def version(self) -> str:
        return self.command("INFO", "server")["redis_version"]


class SentinelGroup:
    """A Redis primary, its replica and three sentinels (Debian's redis-server in --sentinel mode, which is what
    its redis-sentinel package runs) on free ports, the sentinels quick to fail over (a primary is down after
    ``down_after`` ms unanswered; two of three must agree). ``url`` is the layer's redis+sentinel:// URL."""

    def __init__(self, workdir: Path, service: str = "mymaster", down_after: int = 2000) -> None:
        self.workdir = workdir
        self.service = service
        self.down_after = down_after
        self.primary = RedisServer(workdir / "primary")
        self.replica = RedisServer(workdir / "replica", extra=("--replicaof", "127.0.0.1", str(self.primary.port)))
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def start(self) -> SentinelGroup:
        self.primary.start()
        self.replica.start()
        wait_until(lambda: self.primary.command("INFO", "replication")["connected_slaves"] == 1,
                   "the replica to connect to the primary", timeout=30)
        binary = require_binary("redis-server")
        for index, port in enumerate(self.sentinel_ports):
            folder = self.workdir / f"sentinel{index}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"  # a sentinel rewrites its config as it learns: a file of its own
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {folder}\nlogfile {folder / 'sentinel.log'}\n"
                            f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 2\n"
                            f"sentinel down-after-milliseconds {self.service} {self.down_after}\n"
                            f"sentinel failover-timeout {self.service} 10000\n"
                            f"sentinel parallel-syncs {self.service} 1\n")
            with open(folder / "sentinel.out", "ab") as out:
                process = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL)
            self.sentinels.append(process)
            wait_for_port(port, process)
        wait_until(lambda: all(self.sentinel_command(port, "SENTINEL", "REPLICAS", self.service)
                               for port in self.sentinel_ports), "every sentinel to see the replica", timeout=30)
        return self

    def sentinel_command(self, port: int, *args: str) -> object:
        import redis

        client = redis.Redis(port=port, socket_timeout=5)
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def primary_port(self) -> int:
        """The primary's port as the first sentinel says it now."""
        host, port = self.sentinel_command(self.sentinel_ports[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        for process in self.sentinels:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        self.sentinels = []
        self.replica.stop()
        self.primary.stop()


class NgircdServer(ServerProcess):
    """One ``ngircd`` process in the foreground on a free port, with its own config file.

    The config is permissive for tests: no PAM, no ident, no DNS lookups, no
    penalty delays (``MaxPenaltyTime = 0``: the server processes lines as fast
    as they come, so what a test measures at the receiver is the bridge's own
    pacing), 30-character nicks (``max_nick_length``), and many connections per IP. ``password`` sets
    the server password; ``tls`` ({"cert", "key"}) adds a TLS port
    (``tls_port``). ``stop()`` kills it (SIGKILL: the bridge sees the connection
    drop as it would in a crash); ``start()`` again serves on the same ports.
    """

    def __init__(self, workdir: Path, *, password: str = "", tls: dict[str, str] | None = None,
                 name: str = "irc.test", ping_timeout: int = 120, pong_timeout: int = 20,
                 max_nick_length: int = 30) -> None:
        self.binary = require_binary("ngircd")
        self.workdir = workdir
        self.port = free_port()
        self.tls = tls
        self.tls_port = free_port() if tls else None
        self.password = password
        self.name = name
        self.ping_timeout, self.pong_timeout = ping_timeout, pong_timeout
        self.max_nick_length = max_nick_length
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"irc://127.0.0.1:{self.port}"

    def config(self) -> str:
        lines = [
            "[Global]", f"Name = {self.name}", "Info = crossroads test server", "Listen = 127.0.0.1",
            f"Ports = {self.port}", "MotdPhrase = test server",
            f"Password = {self.password}" if self.password else "",
            "[Limits]", f"MaxNickLength = {self.max_nick_length}", "MaxConnectionsIP = 0", "MaxJoins = 0",
            "MaxPenaltyTime = 0",
            f"PingTimeout = {self.ping_timeout}", f"PongTimeout = {self.pong_timeout}",
            "[Options]", "PAM = no", "Ident = no", "DNS = no", "RequireAuthPing = no", "ConnectIPv6 = no",
            "OperCanUseMode = yes",
        ]
        if self.tls:
            lines += ["[SSL]", f"CertFile = {self.tls['cert']}", f"KeyFile = {self.tls['key']}",
                      f"Ports = {self.tls_port}"]
        return "\n".join(lines) + "\n"

    def start(self) -> NgircdServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "ngircd.conf"
        config.write_text(self.config())
        self.launch([self.binary, "-n", "-p", "-f", str(config)], "ngircd.log", self.port, self.tls_port)
        return self

    def pause(self) -> None:
        """SIGSTOP: connections stay open but the server says nothing (a hung server or a dead network path)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    @property
    def version(self) -> str:
        return self.first_line_of("--version")


class MosquittoServer(ServerProcess):
    """One ``mosquitto`` broker in the foreground on a free port, with its own config file.

    Anonymous clients are allowed and nothing is persisted, so ``stop()``
    (SIGKILL, like a crash) followed by ``start()`` brings back a broker on the
    same ports that remembers no session and no subscription: exactly what a
    bridge must survive by subscribing again. ``tls`` ({"cert", "key"}, PEM
    files) adds a second listener on ``tls_port``. Everything is logged
    (``wait_for_log`` reads it) unless ``log_types`` says less: a benchmark
    logs errors and warnings only, not every publish.
    """

    def __init__(self, workdir: Path, *, tls: dict[str, str] | None = None, users: dict[str, str] | None = None,
                 extra: str = "", log_types: tuple[str, ...] = ("all",)) -> None:
        self.binary = require_binary("mosquitto")
        self.users = users  # {name: password}: only these may connect (mosquitto_passwd writes the file)
        self.workdir = workdir
        self.port = free_port()
        self.tls = tls
        self.tls_port = free_port() if tls else None
        self.extra = extra  # more mosquitto.conf lines, for a test that needs them
        self.log_types = log_types
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def config(self) -> str:
        import getpass

        # Run as root (in a container), mosquitto would drop to the user "mosquitto", who cannot read our files.
        lines = [f"user {getpass.getuser()}", "per_listener_settings false",
                 f"allow_anonymous {'false' if self.users else 'true'}", "persistence false",
                 f"log_dest file {self.workdir / 'mosquitto.log'}", *(f"log_type {kind}" for kind in self.log_types),
                 f"listener {self.port} 127.0.0.1"]
        if self.tls:
            lines += [f"listener {self.tls_port} 127.0.0.1", f"certfile {self.tls['cert']}",
                      f"keyfile {self.tls['key']}"]
        if self.users:
            passwords = self.workdir / "passwords"
            passwords.write_text("")
            for name, password in self.users.items():
                subprocess.run([require_binary("mosquitto_passwd"), "-b", str(passwords), name, password], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            lines.append(f"password_file {passwords}")
        return "\n".join(lines) + "\n" + self.extra + "\n"

    def start(self) -> MosquittoServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "mosquitto.conf"
        config.write_text(self.config())
        self.launch([self.binary, "-c", str(config)], "mosquitto.out", self.port, self.tls_port)
        return self

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        """Until the broker has logged ``text`` (a SUBACK to a client, say)."""
        wait_until(lambda: text in self.log(), f"mosquitto to log {text!r}", timeout)

    @property
    def version(self) -> str:
        return self.first_line_of("-h").replace("mosquitto version", "").strip()


class Smarthost:
    """A real SMTP server for a bridge to send to: aiosmtpd's ``Controller`` (its own loop, in a thread) on a free
    port, recording every mail it takes; the tests' stand-in for the relay a user's bridge sends through.

    ``tls`` ({"cert", "key"}) offers STARTTLS and requires it (``require_starttls``), or with ``implicit`` serves
    TLS from the first byte (SMTPS); ``users`` ({login: password}) requires AUTH (after TLS). ``answers`` scripts
    the answers to the next DATAs ("451 4.3.0 busy"; a mail answered so is not recorded; "" takes it), ``refuse``
    answers RCPT TO of the addresses it names. ``stop()`` then ``start()`` serves again on the same port, what it
    recorded kept. ``connections`` counts the connections it accepted (aiosmtpd's ``Controller`` makes one of its
    own at ``start()`` to see it serves), ``open_connections`` those still open; ``drop_connections()`` closes them
    from its side (a smarthost ending idle connections).
    """

    def __init__(self, *, tls: dict[str, str] | None = None, users: dict[str, str] | None = None,
                 implicit: bool = False, port: int | None = None) -> None:
        import threading

        self.port = port or free_port()
        self.tls, self.users, self.implicit = tls, users, implicit
        self.received: list[dict[str, Any]] = []  # {"mail_from", "rcpt_tos", "data", "tls", "login"}
        self.answers: list[str] = []
        self.refuse: dict[str, str] = {}  # address -> RCPT TO answer
        self.sessions = 0  # connections it served (counted at EHLO)
        self.connections = 0  # connections it accepted
        self._open: set[Any] = set()  # the transports of those still open
        self._changed = threading.Condition()
        self._controller: Any = None

    @property
    def url(self) -> str:
        return f"{'smtps' if self.implicit else 'smtp'}://127.0.0.1:{self.port}"

    def start(self) -> Smarthost:
        import ssl
        import warnings

        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

        context = None
        if self.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.tls["cert"], self.tls["key"])
        sink = self

        class Handler:
            async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: N802
                session.host_name = hostname
                with sink._changed:
                    sink.sessions += 1
                return responses

            async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
                if address in sink.refuse:
                    return sink.refuse[address]
                envelope.rcpt_tos.append(address)
                return "250 OK"

            async def handle_DATA(self, server, session, envelope):  # noqa: N802
                with sink._changed:
                    answer = sink.answers.pop(0) if sink.answers else ""
                    if answer:
                        return answer
                    sink.received.append({
                        "mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos),
                        "data": envelope.original_content, "tls": session.ssl is not None or sink.implicit,
                        "login": session.auth_data.login.decode() if session.authenticated else None})
                    sink._changed.notify_all()
                return "250 2.0.0 OK"

        def authenticate(server, session, envelope, mechanism, auth_data):
            if isinstance(auth_data, LoginPassword) and sink.users is not None and \
                    sink.users.get(auth_data.login.decode()) == auth_data.password.decode():
                return AuthResult(success=True, auth_data=auth_data)
            return AuthResult(success=False, handled=False)

        parameters: dict[str, Any] = {"hostname": "127.0.0.1", "port": self.port, "server_hostname": "smarthost.test"}
        if self.tls and self.implicit:
            parameters["ssl_context"] = context
        elif self.tls:
            parameters.update(tls_context=context, require_starttls=True)
        if self.users is not None:
            parameters.update(authenticator=authenticate, auth_required=True,
                              auth_require_tls=not self.implicit)  # implicit TLS: aiosmtpd cannot tell
        if self.implicit and self.users is not None:  # aiosmtpd warns on every connection: it cannot see the TLS
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS", UserWarning)
        class Counted(SMTP):
            def connection_made(self, transport):
                if self.transport is None:  # the connection itself, not its STARTTLS upgrade
                    with sink._changed:
                        sink.connections += 1
                        sink._open.add(transport)
                        sink._changed.notify_all()
                super().connection_made(transport)

            def connection_lost(self, error):
                with sink._changed:
                    sink._open.discard(self._original_transport or self.transport)
                    sink._changed.notify_all()
                super().connection_lost(error)

        class CountingController(Controller):
            def factory(self):
                return Counted(self.handler, **self.SMTP_kwargs)

        self._controller = CountingController(Handler(), **parameters)
        self._controller.start()
        return self

    @property
    def open_connections(self) -> int:
        with self._changed:
            return len(self._open)

    def wait_open_connections(self, count: int, timeout: float = 10.0) -> None:
        """Until exactly ``count`` connections are open (blocking: call it in a thread)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._open) == count, timeout):
                raise AssertionError(f"the smarthost has {len(self._open)} connection(s) open, not {count}, "
                                     f"after {timeout} s")

    def drop_connections(self) -> None:
        """Close every open connection from the smarthost's side, as one ending idle connections does."""
        with self._changed:
            transports = list(self._open)
        for transport in transports:
            self._controller.loop.call_soon_threadsafe(transport.close)

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> Smarthost:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def received_mails(self) -> list[Any]:
        """What it took so far, parsed (``policy.default``)."""
        from email import message_from_bytes, policy

        with self._changed:
            return [message_from_bytes(entry["data"], policy=policy.default) for entry in self.received]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The first ``count`` mails received, once there are that many (blocking: call it in a thread)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.received) >= count, timeout):
                raise AssertionError(f"the smarthost received {len(self.received)} mail(s), not {count}, "
                                     f"within {timeout} s")
            return list(self.received[:count])
def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from /proc: each process's parent)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class DovecotServer(ScratchServer):
    """One Dovecot IMAP server (Debian's ``dovecot-imapd``) in the foreground, with a scratch config on free ports.

    No system service and nothing outside its own folder: the config, the
    passwd-file with the test users (``users``, {name: password}, PLAIN), the
    maildirs, Dovecot's runtime sockets and its log. ``port`` is plain IMAP
    (with STARTTLS when ``tls`` is given: {"cert", "key"}), ``tls_port`` IMAPS.
    Dovecot never lets a user read mail as root, so run as root everything
    runs as ``nobody``, in a folder of its own under the system's temporary
    folder (``nobody`` cannot reach into pytest's, which is root's alone); as
    any other user, everything runs as that user. ``stop()`` kills it
    (SIGKILL); ``start()`` again serves the same mailboxes on the same ports.
    """

    def __init__(self, workdir: Path, *, users: dict[str, str], tls: dict[str, str] | None = None,
                 idle: bool = True) -> None:
        self.binary = require_binary("dovecot")
        self.users = users
        self.tls = tls
        self.idle = idle  # False: a server without IDLE (the capability is left out), for the polling fallback
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.process: subprocess.Popen | None = None
        self.workdir = self.scratch(workdir, "crossroads-dovecot-")
        self.as_root = self.outside  # a folder nobody can reach
        self.log_path = self.workdir / "dovecot.log"

    def _account(self) -> tuple[str, int, int, str]:
        import grp
        import pwd

        entry = pwd.getpwnam("nobody") if self.as_root else pwd.getpwuid(os.getuid())
        group = grp.getgrgid(entry.pw_gid).gr_name
        return entry.pw_name, entry.pw_uid, entry.pw_gid, group

    def config(self) -> str:
        user, uid, gid, group = self._account()
        folder = self.workdir
        lines = [
            f"base_dir = {folder}/run", f"state_dir = {folder}/state", f"log_path = {self.log_path}",
            "protocols = imap", "listen = 127.0.0.1", "disable_plaintext_auth = no", "auth_mechanisms = plain login",
            f"default_internal_user = {user}", f"default_internal_group = {group}", f"default_login_user = {user}",
            f"first_valid_uid = {uid}", f"last_valid_uid = {uid}", f"first_valid_gid = {gid}",
            f"last_valid_gid = {gid}", f"mail_location = maildir:{folder}/mail/%u",
            "mail_debug = no", "auth_verbose = yes", "login_trusted_networks =", "ssl_client_require_valid_cert = no",
            "passdb {", "  driver = passwd-file", f"  args = scheme=PLAIN username_format=%u {folder}/users", "}",
            "userdb {", "  driver = static", f"  args = uid={uid} gid={gid} home={folder}/home/%u", "}",
            "service imap-login {", "  chroot =", "  inet_listener imap {", f"    port = {self.port}", "  }",
            "  inet_listener imaps {", f"    port = {self.tls_port or 0}", "    ssl = yes", "  }", "}",
            "service anvil {", "  chroot =", "}", "service stats {", "  unix_listener stats-reader {",
            f"    user = {user}", "  }", "  unix_listener stats-writer {", f"    user = {user}", "  }", "}",
        ]
        if self.tls:
            lines += ["ssl = yes", f"ssl_cert = <{self.tls['cert']}", f"ssl_key = <{self.tls['key']}"]
        else:
            lines += ["ssl = no"]
        if not self.idle:  # the capability list written out without IDLE: clients must poll
            lines += ["imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE LITERAL+ UIDPLUS MOVE "
                      "NAMESPACE UNSELECT CHILDREN SPECIAL-USE"]
        return "\n".join(line for line in lines if line is not None) + "\n"

    def start(self) -> DovecotServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tls and self.as_root:  # copies dovecot's config reader can open (it reads them as root anyway)
            for kind in ("cert", "key"):
                copy = self.workdir / f"imap-{kind}.pem"
                if Path(self.tls[kind]) != copy:  # (started again: the copies are there)
                    shutil.copyfile(self.tls[kind], copy)
                    self.tls = {**self.tls, kind: str(copy)}
        (self.workdir / "users").write_text("".join(f"{name}:{password}\n" for name, password in self.users.items()))
        config = self.workdir / "dovecot.conf"
        config.write_text(self.config())
        if self.as_root:
            _, uid, gid, _ = self._account()
            for path in [self.workdir, *self.workdir.rglob("*")]:
                os.chown(path, uid, gid)
        self.launch([self.binary, "-F", "-c", str(config)], "dovecot.out", self.port, self.tls_port)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGKILL to the master and every process it started (its login and mail processes would otherwise
        linger, serving their connections, until they noticed the master was gone): a crash of the whole server."""
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        family = _descendants(self.process.pid)
        super().stop()
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


POSTGRES_LIB = Path("/usr/lib/postgresql")  # where Debian's postgresql-VERSION packages put their programs


def postgres_binary(name: str) -> str:
    """A PostgreSQL server program (``postgres``, ``initdb``): Debian keeps them off PATH, in
    /usr/lib/postgresql/VERSION/bin (the newest installed version is taken), else PATH; ``ServerError`` naming it
    and the package that installs it if there is none."""
    versions = sorted(POSTGRES_LIB.glob(f"*/bin/{name}"),
                      key=lambda path: [int(part) for part in path.parts[-3].split(".") if part.isdigit()])
    return str(versions[-1]) if versions else require_binary(name)


class PostgresServer(ScratchServer):
    """One PostgreSQL server (Debian's ``postgresql`` binaries, not its system service) on a free port, its cluster
    made by ``initdb`` in a scratch folder: TCP on 127.0.0.1 only (no Unix socket, so nothing touches the system
    server's /var/run/postgresql), trust authentication for the superuser ``postgres``, no fsync.

    ``initdb`` and ``postgres`` refuse to run as root, so run as root both run as the ``postgres`` user, in a folder
    of its own under the system's temporary folder (``postgres`` cannot reach into pytest's, which is root's
    alone), removed by ``cleanup()``; as any other user, as that user, in ``workdir``. ``stop()`` is an immediate
    shutdown (SIGQUIT: no checkpoint, as in a crash; the postmaster takes its backends down with it, which a
    SIGKILL would leave behind); ``start()`` again serves the same cluster on the same port. ``connect()`` opens a
    psycopg connection of the test's own, beside whatever the code under test opens.
    """

    def __init__(self, workdir: Path, *, database: str = "crossroads", port: int | None = None) -> None:
        self.binary = postgres_binary("postgres")
        self.initdb = postgres_binary("initdb")
        self.port = port or free_port()
        self.database = database  # created by start(), empty, owned by postgres
        self.process: subprocess.Popen | None = None
        self.workdir = self.scratch(workdir, "crossroads-postgres-")
        self.user = "postgres" if self.outside else None
        if self.user:  # a folder only postgres reaches
            entry = _as_user(self.user)
            os.chown(self.workdir, entry["user"], entry["group"])
        self.data = self.workdir / "data"

    @property
    def url(self) -> str:
        """A libpq URL of ``database``, which psycopg and the tests' Django settings read."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> PostgresServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self.data / "PG_VERSION").exists():
            made = subprocess.run([self.initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                                   "--locale=C", "--no-sync"], capture_output=True, text=True, timeout=120,
                                  **_as_user(self.user))
            if made.returncode != 0:
                raise ServerError(f"{self.initdb} exited {made.returncode}: {made.stderr.strip()[-2000:]}")
            fresh = True
        else:
            fresh = False
        self.launch([self.binary, "-D", str(self.data), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                     "-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off", "-c", "max_connections=50"], "postgres.out", self.port,
                    user=self.user)
        self._wait_accepting()
        if fresh:
            with self.connect("postgres") as conn:
                conn.autocommit = True
                conn.execute(f'CREATE DATABASE "{self.database}"')
        return self

    def _wait_accepting(self, timeout: float = 30.0) -> None:
        """Until a connection is accepted: the port opens before recovery ends ("the database system is starting
        up")."""
        import psycopg

        def accepting() -> bool:
            try:
                psycopg.connect(self.url.rsplit("/", 1)[0] + "/postgres", connect_timeout=2).close()
                return True
            except psycopg.OperationalError as exc:
                if self.process is None or self.process.poll() is not None:
                    raise ServerError(f"postgres exited {self.process and self.process.returncode}: {exc}; its "
                                      f"output is in {self.workdir / 'postgres.out'}") from None
                return False

        wait_until(accepting, f"postgres on port {self.port} to accept connections", timeout)

    def connect(self, database: str | None = None) -> Any:
        """A psycopg connection (autocommit) of the test's own to ``database`` (default: ``self.database``)."""
        import psycopg

        return psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/{database or self.database}",
                               autocommit=True, connect_timeout=5)

    def query(self, sql: str, *params: Any) -> list[tuple]:
        """The rows of one statement, on a connection opened and closed for it."""
        with self.connect() as conn:
            return conn.execute(sql, params or None).fetchall()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # immediate shutdown: the postmaster ends its backends too
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

