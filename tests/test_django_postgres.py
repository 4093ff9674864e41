"""The ORM in consumers on a real PostgreSQL: the test project (tests/djsite) served by ``crossroads worker``.

The server is Debian's PostgreSQL binaries, started by ``servers.PostgresServer`` on a free port in a scratch
cluster (never the machine's own server on 5432). Each test starts a ``crossroads worker`` over a real
redis-server with the project's settings pointed at that database (``CROSSROADS_DJANGO_PG``, with
``CONN_MAX_AGE`` and ``CONN_HEALTH_CHECKS`` from the environment too), sends its consumers messages on the
layer, and watches the worker's connections from PostgreSQL's side: ``pg_stat_activity`` and the backend pid
each consumer reports. A worker process of its own, not this process: Django is set up once per process, and
tests/test_django.py sets this one up on SQLite.

To hold every worker thread inside a query at once without sleeping, the test takes an advisory lock on a
connection of its own and the consumers wait for it (``pg_advisory_xact_lock_shared``); the database itself
says when they all wait. Waits have deadlines.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest
from servers import PostgresServer, wait_until
from test_cli import ENV, write_config
from test_daemons import Daemon

from crossroads import layer

LOCK = 4242
_prefixes = itertools.count()

CONFIG = """
[layer]
url = "{url}"
prefix = "{prefix}"

[routing]
app = "djsite.routing:routes"

[django]
settings = "djsite.settings"
view = false

[worker]
threads = {threads}
prefetch = 1            # one message per thread at a time: a burst spreads over the threads
"""


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """The scratch PostgreSQL server, the test project migrated into its database."""
    with PostgresServer(tmp_path_factory.mktemp("postgres"), database="djsite") as server:
        migrated = subprocess.run([sys.executable, "-m", "django", "migrate", "--verbosity", "0"],
                                  env={**ENV, "DJANGO_SETTINGS_MODULE": "djsite.settings",
                                       "CROSSROADS_DJANGO_PG": server.url},
                                  capture_output=True, text=True, timeout=120)
        assert migrated.returncode == 0, migrated.stderr
        yield server


class PgWorker:
    """One ``crossroads worker`` on the project, and the test's end of its layer: ``ask`` sends a message and
    returns the consumer's answers."""

    def __init__(self, tmp_path, redis_server, daemons, postgres: PostgresServer, *, threads: int,
                 conn_max_age: str = "0", health_checks: bool = False) -> None:
        prefix = f"pg{next(_prefixes)}"  # its own keys on the shared redis-server, its own folder and log
        (tmp_path / prefix).mkdir()
        config = write_config(tmp_path / prefix, CONFIG.format(url=redis_server.url, prefix=prefix, threads=threads))
        env = {"CROSSROADS_DJANGO_PG": postgres.url, "CROSSROADS_DJANGO_CONN_MAX_AGE": conn_max_age,
               "CROSSROADS_DJANGO_HEALTH_CHECKS": "1" if health_checks else "0"}
        self.daemon = Daemon(tmp_path, f"worker-{prefix}", "worker", "--config", str(config), env=env)
        daemons.append(self.daemon)
        self.daemon.wait_ready()
        self.layer = layer.from_url(redis_server.url, prefix=prefix).sync
        self.answers = self.layer.new_channel("test.answers?")

    def send(self, channel: str, **fields) -> None:
        self.layer.send(channel, {"reply_to": self.answers, **fields})

    def receive(self, count: int = 1) -> list[dict]:
        got = []
        for _ in range(count):
            channel, answer = self.layer.receive([self.answers], timeout=30)
            if channel is None:
                raise self.daemon.fail(f"{len(got)} of {count} answers within 30 s")
            got.append(answer)
        return got

    def ask(self, channel: str = "test.pg", **fields) -> dict:
        self.send(channel, **fields)
        return self.receive()[0]

    def alive(self) -> None:
        if self.daemon.process.poll() is not None:
            raise self.daemon.fail(f"exited {self.daemon.process.returncode}")


@pytest.fixture
def start_worker(tmp_path, redis_server, daemons, postgres):
    return lambda **options: PgWorker(tmp_path, redis_server, daemons, postgres, **options)


def backends(postgres: PostgresServer) -> list[int]:
    """The pids of the project's connections (application_name "djsite"), as PostgreSQL lists them now."""
    return [pid for (pid,) in postgres.query("SELECT pid FROM pg_stat_activity WHERE application_name = 'djsite' "
                                             "AND backend_type = 'client backend'")]


def waiting_for_lock(postgres: PostgresServer) -> int:
    """How many of the project's connections wait for the test's advisory lock now."""
    return postgres.query("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                          "WHERE a.application_name = 'djsite' AND l.locktype = 'advisory' AND NOT l.granted")[0][0]


def test_a_consumer_writes_and_reads_a_model_in_postgresql(start_worker, postgres):
    with postgres.connect() as conn:
        conn.execute("DELETE FROM djsite_note")
    worker = start_worker(threads=4)
    assert worker.ask("test.note", text="first") == {"notes": ["first"]}
    assert worker.ask("test.note", text="ünïcode, 2nd") == {"notes": ["first", "ünïcode, 2nd"]}
    assert postgres.query("SELECT text FROM djsite_note ORDER BY id") == [("first",), ("ünïcode, 2nd",)], \
        "the rows are in PostgreSQL, where the worker wrote them"


def test_each_worker_thread_has_one_connection_never_more(start_worker, postgres):
    worker = start_worker(threads=4, conn_max_age="none")  # persistent: a thread keeps its one connection
    with postgres.connect() as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [LOCK])
        for _ in range(24):
            worker.send("test.pg", lock=LOCK)
        wait_until(lambda: waiting_for_lock(postgres) == 4, "every worker thread to wait in a query", timeout=30)
        assert len(backends(postgres)) == 4, "4 threads busy at once: 4 connections, not one per message"
        holder.execute("SELECT pg_advisory_unlock(%s)", [LOCK])
    answers = worker.receive(24)
    assert not [answer for answer in answers if "error" in answer]
    pids = {answer["thread"]: set() for answer in answers}
    for answer in answers:
        pids[answer["thread"]].add(answer["pid"])
    assert len(pids) == 4 and all(len(used) == 1 for used in pids.values()), \
        f"each of the 4 threads used one connection for all its messages: {pids}"
    assert len(set().union(*pids.values())) == 4, "and no two threads shared one"
    assert max(answer["backends"] for answer in answers) == 4, "never more than one connection per thread"
    assert sorted(backends(postgres)) == sorted(set().union(*pids.values()))


def test_conn_max_age_keeps_a_young_connection_and_closes_an_old_one(start_worker, postgres):
    closing = start_worker(threads=1)  # CONN_MAX_AGE = 0, Django's default: closed after every consumer
    first = closing.ask()
    wait_until(lambda: first["pid"] not in backends(postgres), "the connection to close after its consumer")
    second = closing.ask()
    assert first["closed_at_start"] and second["closed_at_start"] and second["pid"] != first["pid"]
    closing.daemon.terminate()

    age = 5
    keeping = start_worker(threads=1, conn_max_age=str(age))
    sent = time.monotonic()  # the connection opens after this...
    first = keeping.ask()
    answered = time.monotonic()  # ...and before this: it is old by answered + age at the latest
    again = keeping.ask()
    if time.monotonic() < sent + age:  # (always, unless one round trip took this machine `age` seconds)
        assert again["pid"] == first["pid"] and not again["closed_at_start"], \
            "a young connection is kept across consumers"
    wait_until(lambda: time.monotonic() > answered + age, f"the connection to be {age} s old", timeout=age + 1)
    assert first["pid"] in backends(postgres), "an old connection lingers until the next consumer looks at it"
    later = keeping.ask()
    assert later["closed_at_start"] and later["pid"] != first["pid"], "an old connection is closed before a consumer"
    wait_until(lambda: first["pid"] not in backends(postgres), "the old connection to be gone from PostgreSQL")


def test_a_backend_killed_mid_query_fails_that_consumer_and_the_next_reconnects(start_worker, postgres):
    worker = start_worker(threads=1, conn_max_age="none")
    before = worker.ask()
    with postgres.connect() as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [LOCK])
        worker.send("test.pg", lock=LOCK)
        wait_until(lambda: waiting_for_lock(postgres) == 1, "the consumer to wait in its query")
        assert holder.execute("SELECT pg_terminate_backend(%s)", [before["pid"]]).fetchone() == (True,)
        failed = worker.receive()[0]
    assert "OperationalError" in failed["error"], failed
    after = worker.ask()
    assert "error" not in after and after["pid"] != before["pid"], "the next consumer has a new connection"
    worker.alive()
    assert "OperationalError" in worker.daemon.log(), "the failed consumer is logged with Django's error"


@pytest.mark.parametrize("health_checks", [True, False], ids=["health-checks", "no-health-checks"])
def test_a_backend_killed_between_messages_is_replaced(start_worker, postgres, health_checks):
    worker = start_worker(threads=1, conn_max_age="none", health_checks=health_checks)
    before = worker.ask()
    assert postgres.query("SELECT pg_terminate_backend(%s)", before["pid"]) == [(True,)]
    wait_until(lambda: before["pid"] not in backends(postgres), "the backend to be gone")
    answer = worker.ask()
    if not health_checks:  # Django finds the connection dead only by using it: this consumer gets the error
        assert "OperationalError" in answer["error"], answer
        answer = worker.ask()  # and closes it after the consumer (errors_occurred): the next one reconnects
    assert "error" not in answer and answer["pid"] != before["pid"], answer
    worker.alive()
