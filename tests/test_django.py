"""A Django project (tests/djsite) served through crossroads: the HTTP bridge, a worker and ``django_view``.

In-process tests run the bridge on this module's reactor and the views on a ``Worker``'s threads over
``memory://``, driven by the stdlib's ``http.client`` (in a thread); Django's own test client serves the
same views as the oracle. The last tests run ``crossroads bridge`` and ``crossroads worker`` as processes
over a real redis-server, and ``crossroads check`` on good and broken settings. The database is SQLite in
a scratch folder, migrated once for the session. Waits have deadlines; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import re
import socket
import subprocess
import threading
import time
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
from servers import free_port, wait_for_port, wait_until
from test_cli import CROSSROADS, ENV, write_config
from test_daemons import Daemon
from test_http_bridge import serving
from websockets.asyncio.client import connect

from crossroads import layer
from crossroads.bridges.http.bridge import HttpBridge
from crossroads.bridges.websocket.bridge import WebsocketBridge
from crossroads.config import ConfigError, load_config
from crossroads.consumers.worker import Worker
from crossroads.django import (
    PART_SIZE,
    channel_session_user,
    connections_kept,
    set_identify,
    set_static,
    setup_django,
    wsgi_environ,
)
from crossroads.testing import Client

FILE_SIZE = 20 * 1024 * 1024


@pytest.fixture(scope="session")
def djsite(tmp_path_factory):
    """The test project set up in this process: its database migrated, a user alice, a 20 MB file."""
    folder = tmp_path_factory.mktemp("djsite")
    big = folder / "big.bin"
    big.write_bytes(os.urandom(FILE_SIZE))
    (folder / "marks").mkdir()
    env = {"CROSSROADS_DJANGO_DB": str(folder / "db.sqlite3"), "CROSSROADS_DJANGO_FILE": str(big),
           "CROSSROADS_DJANGO_MARKS": str(folder / "marks")}
    os.environ.update(env)
    setup_django("djsite.settings")
    from django.contrib.auth.models import User
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    User.objects.create_user("alice", password="wonderland")
    User.objects.create_user("bob", password="builder")
    set_identify("djsite.identity:identify")
    return {"env": env, "file": big, "marks": folder / "marks"}


@pytest.fixture
def channel_layer(run):
    made = layer.from_url("memory://")
    yield made
    run(made.close())


@pytest.fixture
def worker(djsite, channel_layer):
    started = Worker("djsite.routing:routes", channel_layer, threads=4)
    started.start()
    yield started
    started.stop()
    assert started.join(10), "the worker did not stop"


class Browser:
    """http.client with cookies kept as a browser keeps them (enough of RFC 6265 for one host)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                read: bool = True):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{name}={value}" for name, value in self.cookies.items())
        if body is not None:
            sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        for value in response.headers.get_all("Set-Cookie") or []:
            for name, morsel in SimpleCookie(value).items():
                if morsel["max-age"] == "0":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        if not read:
            return response, conn
        content = response.read()
        conn.close()
        return response.status, response.headers, content

    def csrf_token(self, path: str) -> str:
        status, _, page = self.request("GET", path)
        assert status == 200, page
        return re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1).decode()


def serve(run, channel_layer, scenario, **options):
    """Run ``scenario(browser)`` in a thread against a bridge on a free port; its result."""

    async def main():
        async with serving(channel_layer, **options) as bridge:
            return bridge, await asyncio.to_thread(scenario, Browser(bridge.port))

    return run(main(), timeout=120)


def django_client_get(path: str, **extra):
    from django.test import Client

    response = Client(raise_request_exception=False).get(path, **extra)
    return response.status_code, response.content


# -- the environ -------------------------------------------------------------------------------------------


def test_the_environ_is_pep_3333_from_the_message():
    environ = wsgi_environ({
        "method": "POST", "path": "/café/bob", "root_path": "/ça", "query_string": b"q=%C3%A9&x",
        "http_version": "1.1", "scheme": "https", "body": b"a=1", "client": ["10.0.0.1", 5123],
        "server": ["127.0.0.1", 8000],
        "headers": [[b"host", b"example.test"], [b"x-dup", b"one"], [b"content-type", b"text/plain"],
                    [b"cookie", b"a=1"], [b"x-dup", b"two"], [b"cookie", b"b=2"], [b"transfer-encoding", b"chunked"]],
    })
    assert environ["PATH_INFO"] == "/café/bob".encode().decode("latin-1")
    assert environ["SCRIPT_NAME"] == "/ça".encode().decode("latin-1")
    assert environ["QUERY_STRING"] == "q=%C3%A9&x"
    assert environ["CONTENT_TYPE"] == "text/plain" and environ["CONTENT_LENGTH"] == "3"  # chunked: the real length
    assert environ["HTTP_X_DUP"] == "one,two" and environ["HTTP_COOKIE"] == "a=1; b=2"
    assert environ["HTTP_HOST"] == "example.test" and "HTTP_CONTENT_TYPE" not in environ
    assert environ["REMOTE_ADDR"] == "10.0.0.1" and environ["REMOTE_PORT"] == "5123"
    assert environ["SERVER_NAME"] == "127.0.0.1" and environ["SERVER_PORT"] == "8000"
    assert environ["wsgi.url_scheme"] == "https" and environ["wsgi.input"].read() == b"a=1"
    unix = wsgi_environ({"method": "GET", "path": "/", "headers": [], "client": None, "server": ["/run/s", None]})
    assert "REMOTE_ADDR" not in unix and unix["SERVER_NAME"] == "localhost" and unix["CONTENT_LENGTH"] == "0"


# -- views through the bridge ------------------------------------------------------------------------------


def test_views_answer_as_under_django_test_client(run, channel_layer, worker):
    def scenario(browser):
        return (browser.request("GET", "/"), browser.request("GET", "/caf%C3%A9/b%C3%B6b/?q=%C3%A9"),
                browser.request("GET", "/missing/"))

    bridge, (hello, cafe, missing) = serve(run, channel_layer, scenario, root_path="/app")
    assert hello[0] == 200 and hello[2] == f"héllo from http://127.0.0.1:{bridge.port}/app/".encode()
    assert cafe[0] == 200 and cafe[2] == "böb|/app/café/böb/|/café/böb/|é".encode()
    assert cafe[2] == django_client_get("/café/böb/", SCRIPT_NAME="/app", QUERY_STRING="q=%C3%A9")[1]
    assert missing[0] == 404 and missing[0] == django_client_get("/missing/")[0]


def test_a_post_needs_its_csrf_token(run, channel_layer, worker):
    def scenario(browser):
        refused = browser.request("POST", "/form/", b"value=42")
        token = browser.csrf_token("/form/")
        accepted = browser.request("POST", "/form/", f"value=42&csrfmiddlewaretoken={token}".encode())
        return refused, accepted

    _, (refused, accepted) = serve(run, channel_layer, scenario)
    assert refused[0] == 403 and b"CSRF" in refused[2]
    assert accepted[0] == 200 and accepted[2] == b"got 42"


def test_login_session_messages_and_logout(run, channel_layer, worker):
    def scenario(browser):
        token = browser.csrf_token("/login/")
        wrong = browser.request("POST", "/login/", f"username=alice&password=x&csrfmiddlewaretoken={token}".encode())
        logged_in = browser.request("POST", "/login/",
                                    f"username=alice&password=wonderland&csrfmiddlewaretoken={token}".encode())
        session = browser.cookies.get("sessionid")
        first, again = browser.request("GET", "/whoami/"), browser.request("GET", "/whoami/")
        token = browser.csrf_token("/logout/")
        browser.request("POST", "/logout/", f"csrfmiddlewaretoken={token}".encode())
        return wrong, logged_in, session, first, again, browser.request("GET", "/whoami/"), browser.cookies

    _, (wrong, logged_in, session, first, again, after, cookies) = serve(run, channel_layer, scenario)
    assert wrong[0] == 403
    assert logged_in[0] == 302 and logged_in[1]["Location"] == "/whoami/" and session
    assert first[2] == b"alice|welcome, alice", "the login or its message did not reach the next request"
    assert again[2] == b"alice|", "a message is shown once"
    assert after[2] == b"anonymous|" and "sessionid" not in cookies


def test_allowed_hosts_refuses_another_host(run, channel_layer, worker):
    _, (status, _, body) = serve(run, channel_layer, lambda browser: browser.request(
        "GET", "/", headers={"Host": "evil.test"}))
    assert status == 400 == django_client_get("/", HTTP_HOST="evil.test")[0]


def test_redirects_and_cookies(run, channel_layer, worker):
    _, (status, headers, _) = serve(run, channel_layer, lambda browser: browser.request("GET", "/go/"))
    assert status == 302 and headers["Location"] == "/whoami/"
    assert headers.get_all("Set-Cookie") == ['flavour="oatmeal raisin"; Path=/']  # no leading space


def test_a_streamed_response_arrives_whole_in_parts(run, channel_layer, worker):
    def scenario(browser):
        return browser.request("GET", "/stream/?n=3&size=5"), browser.request("GET", "/stream/?n=40&size=100000")

    bridge, (small, large) = serve(run, channel_layer, scenario)
    assert small[0] == 200 and small[2] == b"000001111122222" and small[1]["Transfer-Encoding"] == "chunked"
    assert large[2] == b"".join(str(i % 10).encode() * 100000 for i in range(40))
    assert bridge.counters["replies"] == 3 + 40  # one reply per chunk the view yielded


def test_a_file_response_of_20_mb_arrives_whole_in_large_blocks(run, channel_layer, worker, djsite):
    bridge, (status, headers, body) = serve(run, channel_layer, lambda browser: browser.request("GET", "/file/"))
    assert status == 200 and len(body) == FILE_SIZE
    assert hashlib.sha256(body).digest() == hashlib.sha256(djsite["file"].read_bytes()).digest()
    assert headers["Content-Length"] == str(FILE_SIZE)
    assert headers["Content-Disposition"] == 'attachment; filename="big.bin"'
    assert bridge.counters["replies"] == FILE_SIZE // PART_SIZE, "the file went out in 256 KiB blocks"


def test_a_slow_client_takes_the_whole_file_without_being_cut_off(run, channel_layer, worker, djsite):
    """The flow reports' reason to be: without them the view pushes 20 MB at the bridge at once, and a client
    reading slower than the disk is cut off at max_response_buffer (4 MiB) behind."""
    def slow_download(browser):
        conn = http.client.HTTPConnection("127.0.0.1", browser.port, timeout=60)
        conn.connect()
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # a small window, as over a slow link
        conn.request("GET", "/file/")
        response = conn.getresponse()
        digest, size = hashlib.sha256(), 0
        while block := response.read(65536):
            digest.update(block)
            size += len(block)
            time.sleep(0.002)  # a client slower than the disk: this is the scenario, not a wait for a condition
        conn.close()
        return response.status, size, digest.digest()

    bridge, (status, size, digest) = serve(run, channel_layer, slow_download)
    assert status == 200 and size == FILE_SIZE
    assert digest == hashlib.sha256(djsite["file"].read_bytes()).digest()
    assert bridge.counters.get("slow_clients", 0) == 0


def test_head_of_a_file_response_has_its_length_and_no_body(run, channel_layer, worker):
    _, (status, headers, body) = serve(run, channel_layer, lambda browser: browser.request("HEAD", "/file/"))
    assert status == 200 and headers["Content-Length"] == str(FILE_SIZE) and body == b""


def test_a_raising_view_gets_djangos_500_and_the_worker_carries_on(run, channel_layer, worker):
    def scenario(browser):
        return browser.request("GET", "/boom/"), browser.request("GET", "/")

    _, (boom, after) = serve(run, channel_layer, scenario)
    assert boom[0] == 500 and b"<h1>Server Error (500)</h1>" in boom[2]
    assert boom[2] == django_client_get("/boom/")[1], "not Django's own 500 page"
    assert after[0] == 200
    assert worker.dispatcher.counters.errors == 0, "Django handled the exception, as under a WSGI server"


def test_request_signals_fire_and_the_response_is_closed(run, channel_layer, worker):
    from django.core.signals import request_finished, request_started

    seen = []
    finished_event = threading.Event()

    def started(**kwargs):
        seen.append("started")

    def finished(**kwargs):
        seen.append("finished")
        finished_event.set()

    request_started.connect(started)
    request_finished.connect(finished)
    try:
        serve(run, channel_layer, lambda browser: browser.request("GET", "/stream/?n=2&size=1"))
        # close() runs after the last part went out, so the client may have it first: wait, with a deadline
        assert finished_event.wait(10), "request_finished never fired: the response was not closed"
    finally:
        request_started.disconnect(started)
        request_finished.disconnect(finished)
    assert seen == ["started", "finished"]


def test_a_client_gone_mid_stream_stops_the_iteration(run, channel_layer, worker, djsite):
    closed = djsite["marks"] / "endless-closed"
    closed.unlink(missing_ok=True)

    def scenario(browser):
        response, conn = browser.request("GET", "/endless/", read=False)
        assert response.status == 200 and response.read(65536) == b"x" * 65536
        conn.sock.close()  # the client leaves mid-stream
        conn.close()
        wait_until(closed.exists, "the view's iterator to be closed", timeout=30)
        return browser.request("GET", "/")

    _, after = serve(run, channel_layer, scenario)
    assert closed.exists(), "the view's iterator was not closed after its client left"
    assert int(closed.read_text()) < 1_000_000
    assert after[0] == 200, "the worker thread was freed for the next request"


def test_static_files_are_served_only_when_asked(run, channel_layer, worker):
    def fetch_css(browser):
        return browser.request("GET", "/static/site.css")

    try:
        set_static(True)
        _, (status, headers, body) = serve(run, channel_layer, fetch_css)
        assert status == 200 and body == b"body { color: teal; }\n" and headers["Content-Type"].startswith("text/css")
        set_static(None)  # the default: only with DEBUG, which the test project has off
        _, (status, _, _) = serve(run, channel_layer, fetch_css)
        assert status == 404
    finally:
        set_static(None)


# -- users and the ORM in other consumers ---------------------------------------------------------------


def login(browser: Browser, username: str, password: str) -> None:
    token = browser.csrf_token("/login/")
    status, _, body = browser.request(
        "POST", "/login/", f"username={username}&password={password}&csrfmiddlewaretoken={token}".encode())
    assert status == 302, body


def test_a_login_reaches_the_websocket_consumer_and_logout_ends_it(run, channel_layer, worker):
    from django.contrib.auth.models import User

    async def talk(port, cookies, text):
        origin = f"http://127.0.0.1:{port}"
        header = "; ".join(f"{name}={value}" for name, value in cookies.items())
        async with connect(f"ws://127.0.0.1:{port}/chat/", origin=origin, open_timeout=10,
                           additional_headers={"Cookie": header} if header else {}) as ws:
            greeting = await asyncio.wait_for(ws.recv(), 10)
            answers = []
            for line in text:
                if callable(line):  # something to do between two frames of the one connection
                    await asyncio.to_thread(line)
                    continue
                await ws.send(line)
                answers.append(await asyncio.wait_for(ws.recv(), 10))
            return greeting, answers

    def change_bobs_password():
        bob = User.objects.get(username="bob")
        bob.set_password("another")
        bob.save()

    async def scenario():
        web = HttpBridge("web", {"port": 0, "websocket": "ws"}, channel_layer)
        ws = WebsocketBridge("ws", {"port": 1}, channel_layer)
        web.attach_companions({"web": web, "ws": ws})
        await ws.start()
        await web.start()
        try:
            alice = Browser(web.port)
            await asyncio.to_thread(login, alice, "alice", "wonderland")
            logged_in = await talk(web.port, alice.cookies, ["hi", "again"])
            token = await asyncio.to_thread(alice.csrf_token, "/logout/")
            await asyncio.to_thread(alice.request, "POST", "/logout/", f"csrfmiddlewaretoken={token}".encode())
            logged_out = await talk(web.port, alice.cookies, ["hi"])
            bob = Browser(web.port)
            await asyncio.to_thread(login, bob, "bob", "builder")
            changed = await talk(web.port, bob.cookies, ["before", change_bobs_password, "after"])
            return logged_in, logged_out, changed
        finally:
            await web.stop(timeout=5)
            await ws.stop(timeout=5)

    logged_in, logged_out, changed = run(scenario())
    assert logged_in == ("hello alice", ["alice: hi", "alice: again"]), "later frames did not know the user"
    assert logged_out == ("hello anonymous", ["anonymous: hi"])
    assert changed == ("hello bob", ["bob: before", "anonymous: after"]), \
        "a password change must end the logins of other sessions, as in Django"


def test_http_session_user_in_a_plain_http_consumer(run, channel_layer, worker):
    def scenario(browser):
        before = browser.request("GET", "/crossroads/whoami/")[2]
        login(browser, "alice", "wonderland")
        return before, browser.request("GET", "/crossroads/whoami/")[2]

    _, (before, after) = serve(run, channel_layer, scenario)
    assert (before, after) == (b"anonymous", b"alice")


def test_the_identify_hook_names_the_user_of_an_mqtt_message(djsite):
    from djsite import identity

    client = Client("djsite.routing:routes")
    identity.asked.clear()
    for sender in ("alice", "mallory"):
        client.send_and_consume("mqtt.receive", {"protocol": "mqtt", "sender": sender, "text": "hi",
                                                 "topic": f"chat/{sender}"})
    assert [reply["text"] for reply in client.receive_all()] == ["alice said hi", "anonymous said hi"]
    assert identity.asked == [("mqtt", "alice"), ("mqtt", "mallory")], "asked once per message"


def test_a_consumer_gets_django_connection_hygiene(djsite, run, channel_layer):
    from django.db import connections

    worker = Worker("djsite.routing:routes", channel_layer, threads=1)  # one thread: one connection to watch
    worker.start()
    answers = channel_layer.sync.new_channel("test.answers?")

    def ask():
        channel_layer.sync.send("test.db", {"reply_to": answers})
        got, answer = channel_layer.sync.receive([answers], timeout=10)
        assert got is not None, "the consumer did not answer"
        return answer

    settings = connections.settings["default"]
    try:
        ask()
        assert ask()["closed_at_start"], "CONN_MAX_AGE = 0: the connection is closed after every consumer"
        settings["CONN_MAX_AGE"] = 60
        ask()
        first, second = ask(), ask()
        assert not second["closed_at_start"] and first["connection"] == second["connection"], \
            "CONN_MAX_AGE = 60: one connection, kept across consumers"
        settings["CONN_MAX_AGE"] = 0
        with connections_kept():  # what a django.test.TestCase needs
            ask()
            assert not ask()["closed_at_start"]
    finally:
        settings["CONN_MAX_AGE"] = 0
        worker.stop()
        assert worker.join(10)


def test_the_orm_in_an_async_consumer_fails_with_djangos_error(djsite, caplog):
    client = Client("djsite.routing:routes")
    client.send_and_consume("test.async", {})
    assert client.counters.errors == 1
    assert "SynchronousOnlyOperation" in caplog.text
    with pytest.raises(TypeError, match="sync_to_async"):
        @channel_session_user
        async def consumer(message):
            pass


# -- config and check --------------------------------------------------------------------------------------


def test_the_django_table_is_checked(tmp_path):
    good = write_config(tmp_path, '[django]\nsettings = "mysite.settings"\n')
    assert load_config(good).django.settings == "mysite.settings"
    assert load_config(write_config(tmp_path, "[django]\n")).django.settings is None  # DJANGO_SETTINGS_MODULE
    assert load_config(write_config(tmp_path, "[layer]\n")).django is None
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, '[django]\nsettings = "my site"\nsetting = 1\nidentify = "a.b"\n'))
    text = str(caught.value)
    assert '[django] identify: must be "module:function"' in text
    with pytest.raises(ConfigError, match=r"\[django\] static: must be true or false"):
        load_config(write_config(tmp_path, '[django]\nstatic = "sometimes"\n'))
    assert '[django] settings: must be the import path of your settings module' in text
    assert '[django] setting: unknown key; did you mean "settings"?' in text


def check(tmp_path, settings_line: str, env: dict[str, str] | None = None):
    config = write_config(tmp_path, f"[django]\n{settings_line}\n")
    return subprocess.run([CROSSROADS, "check", "--config", str(config)], capture_output=True, text=True,
                          timeout=60, env={**ENV, **(env or {})})


def test_crossroads_check_sets_django_up_and_names_what_is_wrong(tmp_path, djsite):
    result = check(tmp_path, 'settings = "djsite.settings"', djsite["env"])
    assert result.returncode == 0, result.stderr
    assert re.search(r"django: djsite.settings \(Django 5\.2\.\d+\), system checks passed", result.stdout)
    missing = check(tmp_path, 'settings = "nosuchsite.settings"', djsite["env"])
    assert missing.returncode == 2
    assert "[django] settings: cannot import the settings module 'nosuchsite.settings': No module named " \
           "'nosuchsite'" in missing.stderr
    (tmp_path / "brokensite.py").write_text('SECRET_KEY = "x"\nINSTALLED_APPS = ["no_such_app"]\n')
    broken = check(tmp_path, 'settings = "brokensite"')
    assert broken.returncode == 2
    assert "Django refused the settings 'brokensite': ModuleNotFoundError: No module named 'no_such_app'" \
           in broken.stderr
    unset = check(tmp_path, "", {"DJANGO_SETTINGS_MODULE": ""})
    assert unset.returncode == 2 and "[django] settings: not set, and DJANGO_SETTINGS_MODULE is empty" in unset.stderr
    from_environment = check(tmp_path, "", {**djsite["env"], "DJANGO_SETTINGS_MODULE": "djsite.settings"})
    assert from_environment.returncode == 0, from_environment.stderr
    hook = check(tmp_path, 'settings = "djsite.settings"\nidentify = "djsite.identity:nobody"', djsite["env"])
    assert hook.returncode == 2 and "[django] identify: module 'djsite.identity' has no attribute 'nobody'" \
        in hook.stderr
    (tmp_path / "plainsite.py").write_text('SECRET_KEY = "x"\nINSTALLED_APPS = []\n')
    static = check(tmp_path, 'settings = "plainsite"\nstatic = true')
    assert static.returncode == 2 and "[django] static: static = true serves static files through " \
        "django.contrib.staticfiles, which is not in INSTALLED_APPS" in static.stderr
    good_hook = check(tmp_path, 'settings = "djsite.settings"\nidentify = "djsite.identity:identify"', djsite["env"])
    assert good_hook.returncode == 0, good_hook.stderr


def test_a_django_table_routes_unmatched_requests_to_django_view(tmp_path, djsite):
    from crossroads.cli import unheeded, with_unheeded
    from crossroads.consumers.routing import Router
    from crossroads.django import django_view, with_django_view

    router = with_django_view(Router("djsite.consumers_only:routes"))
    assert router.match("http.request", {"path": "/crossroads/whoami/"})[0].__name__ == "http_whoami"
    assert router.match("http.request", {"path": "/anything/"})[0] is django_view
    # A client gone before its response: taken off its channel, which would otherwise fill and refuse the rest.
    assert with_unheeded(router).match("http.disconnect", {"path": "/anything/"})[0] is unheeded
    alone = check(tmp_path, 'settings = "djsite.settings"', djsite["env"])
    assert "routing: django_view alone ([django]) consumes http.disconnect, http.request" in alone.stdout, alone.stderr
    config = write_config(tmp_path, '[django]\nsettings = "djsite.settings"\nview = false\n')
    result = subprocess.run([CROSSROADS, "check", "--config", str(config)], capture_output=True, text=True,
                            timeout=60, env={**ENV, **djsite["env"]})
    assert result.returncode == 0 and "routing: none set" in result.stdout, result.stderr


# -- as daemons over Redis ---------------------------------------------------------------------------------


DAEMON_CONFIG = """
[layer]
url = "{url}"
prefix = "django"

[routing]
app = "djsite.consumers_only:routes"   # django_view is appended by [django]

[django]
settings = "djsite.settings"

[bridges.web]
type = "http"
port = {port}
max_upload = 104857600
"""

UPLOAD_SIZE = 50 * 1024 * 1024


def multipart_upload(port: int) -> tuple[int, bytes, str]:
    """POST a 50 MB file as multipart/form-data, generated as it is sent; (status, body, its SHA-256)."""
    boundary = "crossroads-upload-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    block = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB
    digest = hashlib.sha256()

    def body():
        yield head
        for _ in range(UPLOAD_SIZE // len(block)):
            digest.update(block)
            yield block
        yield tail

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/upload/", body=body(), headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + UPLOAD_SIZE + len(tail))})
    response = conn.getresponse()
    answer = response.read()
    conn.close()
    return response.status, answer, digest.hexdigest()


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far, in bytes (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


def test_bridge_and_worker_as_daemons_over_redis(tmp_path, redis_server, daemons, djsite):
    port = free_port()
    config = str(write_config(tmp_path, DAEMON_CONFIG.format(url=redis_server.url, port=port)))
    started = (Daemon(tmp_path, "bridge", "bridge", "web", "--config", config, env=djsite["env"]),
               Daemon(tmp_path, "worker", "worker", "--config", config, env=djsite["env"]))
    daemons += started
    for daemon in started:
        daemon.wait_ready()
    wait_for_port(port, started[0].process)
    browser = Browser(port)
    token = browser.csrf_token("/login/")
    status, headers, _ = browser.request("POST", "/login/",
                                         f"username=alice&password=wonderland&csrfmiddlewaretoken={token}".encode())
    assert status == 302
    assert browser.request("GET", "/whoami/")[2] == b"alice|welcome, alice"
    status, _, body = browser.request("GET", "/file/")
    assert status == 200 and body == djsite["file"].read_bytes()
    assert browser.request("GET", "/boom/")[0] == 500
    assert browser.request("GET", "/stream/?n=3&size=2")[2] == b"001122"
    assert browser.request("GET", "/crossroads/whoami/")[2] == b"alice", "the routing table's own route first"
    peaks = [peak_rss(daemon.process.pid) for daemon in started]
    status, answer, digest = multipart_upload(port)
    assert status == 200, answer
    assert answer.decode() == f"{UPLOAD_SIZE} {digest} TemporaryUploadedFile"
    for daemon, before in zip(started, peaks, strict=True):
        grown = peak_rss(daemon.process.pid) - before
        assert grown < UPLOAD_SIZE // 4, f"crossroads {daemon.name} grew {grown} bytes for a 50 MB upload"
    started[0].terminate()
    started[1].terminate()
