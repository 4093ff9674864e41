"""The Django chat example (examples/django_chat) as shipped, run by `crossroads run` against real peers.

`crossroads run` serves the example's crossroads.toml (only its addresses changed) with a mosquitto and an
ngircd the tests start: headless Chromium (Playwright, Debian's /usr/bin/chromium) logs in on the login page
and talks on the chat page, an MQTT client publishes and subscribes with mosquitto_pub/mosquitto_sub, an IRC
user (a raw socket) talks in #lobby, and http.client with a session cookie reads the admin. Then `crossroads
bridge web` and `crossroads worker` run as processes over a real redis-server, and the last test puts the
broker's logins and docs/django.md's ACL in front of the MQTT side, which is what makes its topics worth the
identify hook's trust.

The example's database is SQLite in a scratch folder ($DJANGO_CHAT_DB), migrated once for the module. This
pytest process has Django set up already with another project (tests/djsite, test_django.py), and one process
serves one project: so the example's ORM is read through its own manage.py (`shell -c`) in a subprocess,
never imported here. Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from servers import MosquittoServer, NgircdServer, free_port, require_binary, wait_for_port
from test_chat_browser import CHROMIUM_ARGS
from test_chat_example import IrcUser, Lines
from test_cli import ENV
from test_daemons import Daemon
from test_django import Browser
from websockets.sync.client import connect

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "django_chat"
USERS = {"alice": "wonderland", "bob": "builder"}  # bob reaches the chat over MQTT only
STAFF = ("admin", "not-a-real-password")


class Site:
    """The example's database in ``folder``, and its ORM through ``manage.py`` in a subprocess."""

    def __init__(self, folder: Path) -> None:
        self.env = {"DJANGO_CHAT_DB": str(folder / "db.sqlite3"), "DJANGO_SETTINGS_MODULE": "chatsite.settings",
                    "PYTHONPATH": os.pathsep.join([str(EXAMPLE), ENV["PYTHONPATH"]])}

    def manage(self, *args: str) -> str:
        done = subprocess.run([sys.executable, str(EXAMPLE / "manage.py"), *args], env={**ENV, **self.env},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"manage.py {' '.join(args)} failed:\n{done.stderr}"
        return done.stdout

    def orm(self, code: str):
        """The JSON that ``code`` prints, run in ``manage.py shell`` (the example's models imported)."""
        return json.loads(self.manage("shell", "--no-imports", "-c",
                                      "import json\nfrom chatroom.models import Message\n"
                                      "from django.contrib.auth.models import User\n" + code))

    def saved(self, text: str) -> list[list]:
        """Each saved Message with this text, as [protocol, sender, its author's username or None]."""
        return self.orm(f"print(json.dumps([[m.protocol, m.sender, m.author and m.author.username] "
                        f"for m in Message.objects.filter(text={text!r})]))")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    made = Site(tmp_path_factory.mktemp("django_chat"))
    made.manage("migrate", "--verbosity", "0")
    made.orm("".join(f"User.objects.create_user({name!r}, password={password!r})\n"
                     for name, password in USERS.items())
             + f"User.objects.create_superuser({STAFF[0]!r}, password={STAFF[1]!r})\nprint(1)")
    return made


def example_config(folder: Path, web_port: int, replacements: tuple[tuple[str, str], ...]) -> str:
    """examples/django_chat/crossroads.toml written into ``folder`` with its addresses replaced."""
    text = (EXAMPLE / "crossroads.toml").read_text()
    for old, new in (("port = 8000", f"port = {web_port}"), *replacements):
        assert old in text, f"examples/django_chat/crossroads.toml no longer has {old!r}"
        text = text.replace(old, new)
    path = folder / "crossroads.toml"
    path.write_text(text)
    return str(path)


class Chat:
    """The example under `crossroads run`, with the peers it talks to and the people on them."""

    def __init__(self, url: str, mosquitto: MosquittoServer, listener: Lines, carol: IrcUser) -> None:
        self.url, self.mosquitto, self.listener, self.carol = url, mosquitto, listener, carol

    def publish(self, topic: str, text: str, *options: str) -> None:
        subprocess.run([require_binary("mosquitto_pub"), "-p", str(self.mosquitto.port), "-V", "5", "-q", "1",
                        "-t", topic, "-m", text, *options], check=True, timeout=20)

    def everyone_hears(self, said: str, irc: bool = True) -> None:
        """The MQTT subscriber of chat/lobby and (unless the line came from it) #lobby hear ``said``."""
        assert self.listener.next(repr(said)) == said
        if irc:
            line = self.carol.expect(lambda line: " PRIVMSG #lobby :" in line, repr(said))
            assert line.endswith(f"PRIVMSG #lobby :{said}"), line


@pytest.fixture(scope="module")
def chat(tmp_path_factory, site):
    folder = tmp_path_factory.mktemp("django_chat_run")
    mosquitto = MosquittoServer(folder / "mosquitto").start()
    irc = NgircdServer(folder / "ngircd", max_nick_length=9).start()
    web_port = free_port()
    config = example_config(folder, web_port, (("mqtt://127.0.0.1:1883", mosquitto.url),
                                               ("irc://127.0.0.1:6667", irc.url)))
    carol = IrcUser(irc.port, "carol")
    carol.send("JOIN #lobby")
    daemon = Daemon(folder, "django_chat", "run", "--config", config, env=site.env)
    listener = None
    try:
        daemon.wait_ready(60)
        wait_for_port(web_port, daemon.process)
        carol.expect(lambda line: line.startswith(":crossroad!") and "JOIN" in line, "the bridge joining #lobby")
        mosquitto.wait_for_log("Sending SUBACK to crossroads-mqtt", 20)
        listener = subprocess.Popen([require_binary("mosquitto_sub"), "-p", str(mosquitto.port), "-V", "5",
                                     "-i", "dave-sub", "-t", "chat/lobby"], stdout=subprocess.PIPE, text=True)
        lines = Lines(listener)
        mosquitto.wait_for_log("Sending SUBACK to dave-sub", 20)
        yield Chat(f"http://127.0.0.1:{web_port}", mosquitto, lines, carol)
        daemon.terminate()
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        carol.close()
        daemon.close()
        irc.stop()
        mosquitto.stop()


@pytest.mark.timeout(240)
def test_log_in_talk_from_chromium_and_log_out(chat, site):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=require_binary("chromium"), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            log = page.locator("#log li")
            page.goto(f"{chat.url}/")
            expect(page.locator("#log li").last).to_have_text("hello guest: log in to talk", timeout=20000)
            page.click("#login")
            page.fill("#id_username", "alice")
            page.fill("#id_password", "not her password")
            page.click("button[type=submit]")
            expect(page.locator("#error")).to_be_visible()
            page.fill("#id_username", "alice")
            page.fill("#id_password", USERS["alice"])
            page.click("button[type=submit]")
            page.wait_for_url(f"{chat.url}/chat/")
            expect(page.locator("#who")).to_contain_text("alice")
            expect(log.last).to_have_text("hello alice", timeout=20000)  # the WebSocket knows her from the cookie

            page.fill("#text", "hello from Chromium")
            page.press("#text", "Enter")
            expect(log.last).to_have_text("[websocket] alice: hello from Chromium", timeout=20000)
            chat.everyone_hears("[websocket] alice: hello from Chromium")
            assert site.saved("hello from Chromium") == [["websocket", "alice", "alice"]]
            chat.carol.send("PRIVMSG #lobby :hi alice, from IRC")
            expect(log.last).to_have_text("[irc] carol: hi alice, from IRC", timeout=20000)
            chat.everyone_hears("[irc] carol: hi alice, from IRC", irc=False)
            assert site.saved("hi alice, from IRC") == [["irc", "carol", None]]  # an IRC nick is nobody's login

            page.click("#logout")
            page.wait_for_url(f"{chat.url}/chat/")
            expect(page.locator("#login")).to_be_visible()
            expect(log.last).to_have_text("hello guest: log in to talk", timeout=20000)
            # The page shows the lobby's history from the model, the line said before logging out among it.
            expect(page.locator("#log li.history", has_text="[websocket] alice: hello from Chromium")).to_have_count(1)
            page.fill("#text", "am I still alice?")
            page.press("#text", "Enter")
            expect(log.last).to_have_text("(not sent: log in to talk)", timeout=20000)
        finally:
            browser.close()
    assert site.saved("am I still alice?") == []
    chat.publish("chat/from/bob", "after the logout")  # the next line the lobby relays is this, not alice's
    chat.everyone_hears("[mqtt] bob: after the logout")


def test_an_mqtt_client_is_the_django_user_its_topic_names(chat, site):
    # The topic names the sender; a "sender" user property claiming another user is not believed.
    chat.publish("chat/from/bob", "bob over MQTT", "-D", "publish", "user-property", "sender", "alice")
    chat.everyone_hears("[mqtt] bob: bob over MQTT")
    assert site.saved("bob over MQTT") == [["mqtt", "bob", "bob"]]
    chat.publish("chat/from/mallory", "nobody's login")  # no such user: said under the topic's name, no author
    chat.everyone_hears("[mqtt] mallory: nobody's login")
    assert site.saved("nobody's login") == [["mqtt", "mallory", None]]


def test_the_admin_lists_the_saved_messages_for_staff(chat, site):
    chat.publish("chat/from/bob", "a line for the admin")
    chat.everyone_hears("[mqtt] bob: a line for the admin")
    port = int(chat.url.rsplit(":", 1)[1])

    def log_in(browser: Browser, username: str, password: str) -> None:
        token = browser.csrf_token("/admin/login/")
        status, headers, body = browser.request("POST", "/admin/login/?next=/admin/", (
            f"username={username}&password={password}&csrfmiddlewaretoken={token}&next=/admin/").encode())
        assert status == 302, body

    staff = Browser(port)
    log_in(staff, *STAFF)
    status, _, page = staff.request("GET", "/admin/chatroom/message/")
    assert status == 200, page
    assert b"a line for the admin" in page and b"<td class=\"field-protocol\">mqtt</td>" in page
    status, headers, css = staff.request("GET", "/static/admin/css/base.css")  # DEBUG: django_view serves static
    assert status == 200 and headers["Content-Type"].startswith("text/css") and css
    # A user who is not staff gets the admin's login page, not the list.
    alice = Browser(port)
    token = alice.csrf_token("/login/")
    status, _, _ = alice.request("POST", "/login/", f"username=alice&password={USERS['alice']}&"
                                 f"csrfmiddlewaretoken={token}".encode())
    assert status == 302
    status, headers, _ = alice.request("GET", "/admin/chatroom/message/")
    assert status == 302 and headers["Location"].startswith("/admin/login/")


@pytest.mark.timeout(180)
def test_the_websocket_path_with_bridge_and_worker_over_redis(tmp_path, redis_server, site, daemons):
    web_port = free_port()
    config = example_config(tmp_path, web_port, (("[django]", f'[layer]\nurl = "{redis_server.url}"\n'
                                                              'prefix = "django-chat"\n\n[django]'),))
    started = (Daemon(tmp_path, "web", "bridge", "web", "--config", config, env=site.env),
               Daemon(tmp_path, "worker", "worker", "--config", config, env=site.env))
    daemons += started
    for daemon in started:
        daemon.wait_ready(60)
    wait_for_port(web_port, started[0].process)
    browser = Browser(web_port)
    token = browser.csrf_token("/login/")
    status, _, body = browser.request("POST", "/login/", f"username=alice&password={USERS['alice']}&"
                                      f"csrfmiddlewaretoken={token}".encode())
    assert status == 302 and "sessionid" in browser.cookies, body
    origin = f"http://127.0.0.1:{web_port}"
    cookie = {"Cookie": f"sessionid={browser.cookies['sessionid']}"}
    with connect(f"ws://127.0.0.1:{web_port}/chat/socket/", origin=origin, additional_headers=cookie,
                 open_timeout=20) as alice, connect(f"ws://127.0.0.1:{web_port}/chat/socket/", origin=origin,
                                                    open_timeout=20) as guest:
        assert alice.recv(timeout=20) == "hello alice"
        assert guest.recv(timeout=20) == "hello guest: log in to talk"
        alice.send("over redis")
        assert alice.recv(timeout=20) == guest.recv(timeout=20) == "[websocket] alice: over redis"
        guest.send("me too")
        assert guest.recv(timeout=20) == "(not sent: log in to talk)"
    assert site.saved("over redis") == [["websocket", "alice", "alice"]] and site.saved("me too") == []
    for daemon in reversed(started):
        daemon.terminate()


BROKER_ACL = """# docs/django.md's ACL: every user says things on chat/from/<own name> and hears the lobby
pattern write chat/from/%u
pattern read chat/lobby
user crossroads
topic read chat/from/#
topic write chat/lobby
"""


@pytest.mark.timeout(180)
def test_with_the_brokers_acl_an_mqtt_client_cannot_speak_as_another_user(tmp_path, site):
    """What makes the topic worth the identify hook's trust: the broker lets alice publish on her topic only."""
    logins = {"alice": "alice-broker-password", "crossroads": "bridge-broker-password", "dave": "dave-password"}
    (tmp_path / "acl").write_text(BROKER_ACL)
    mosquitto = MosquittoServer(tmp_path / "mosquitto", users=logins, extra=f"acl_file {tmp_path / 'acl'}").start()
    web_port = free_port()
    config = example_config(tmp_path, web_port, (
        ('broker = "mqtt://127.0.0.1:1883"',
         f'broker = "{mosquitto.url}"\nusername = "crossroads"\npassword = "${{BROKER_PASSWORD}}"'),
        ('type = "irc"', 'type = "irc"\nenabled = false')))
    daemon = Daemon(tmp_path, "django_chat", "run", "--config", config,
                    env={**site.env, "BROKER_PASSWORD": logins["crossroads"]})
    listener = None
    try:
        daemon.wait_ready(60)
        mosquitto.wait_for_log("Sending SUBACK to crossroads-mqtt", 20)
        listener = subprocess.Popen([require_binary("mosquitto_sub"), "-p", str(mosquitto.port), "-V", "5",
                                     "-u", "dave", "-P", logins["dave"], "-i", "dave-sub", "-t", "chat/lobby"],
                                    stdout=subprocess.PIPE, text=True)
        lines = Lines(listener)
        mosquitto.wait_for_log("Sending SUBACK to dave-sub", 20)

        def publish_as_alice(topic: str, text: str) -> None:
            subprocess.run([require_binary("mosquitto_pub"), "-p", str(mosquitto.port), "-V", "5", "-q", "1",
                            "-u", "alice", "-P", logins["alice"], "-t", topic, "-m", text],
                           timeout=20, capture_output=True)  # the refused one may exit non-zero: the broker said no

        publish_as_alice("chat/from/bob", "alice pretending to be bob")
        publish_as_alice("chat/from/alice", "alice as herself")
        assert lines.next("alice's own line") == "[mqtt] alice: alice as herself"  # the first the lobby heard
        assert site.saved("alice as herself") == [["mqtt", "alice", "alice"]]
        assert site.saved("alice pretending to be bob") == []
        daemon.terminate()
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        daemon.close()
        mosquitto.stop()
