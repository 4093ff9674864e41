"""The consumers under Django's own test runner (``python manage.py test chatroom``), with crossroads' test Client.

``django.test.TestCase`` keeps each test in a transaction on the connection, so consumer runs are wrapped in
``connections_kept()`` (docs/django.md, The ORM in consumers). No server runs: the Client routes messages to
the consumers in this thread and keeps what they send.
"""

from django.contrib.auth.models import User
from django.test import Client as DjangoClient
from django.test import TestCase

from crossroads.django import connections_kept, set_identify
from crossroads.testing import Client

from .models import Message


class ConsumerTests(TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        set_identify("chatroom.identity:identify")  # what crossroads.toml's [django] identify does under crossroads

    def test_a_logged_in_socket_is_greeted_and_its_lines_are_saved(self):
        alice = User.objects.create_user("alice")
        browser = DjangoClient()
        browser.force_login(alice)
        cookie = f"sessionid={browser.cookies['sessionid'].value}".encode()
        client = Client("chatroom.consumers:routes")
        with connections_kept():
            client.send_and_consume("websocket.connect", {"path": "/chat/socket/", "headers": [[b"cookie", cookie]]})
            self.assertEqual(client.receive_all(), [{"accept": True}, {"text": "hello alice"}])
            client.send_and_consume("websocket.receive", {"path": "/chat/socket/", "text": "hi",
                                                          "protocol": "websocket"})
        self.assertEqual(client.receive(), {"text": "[websocket] alice: hi"})
        self.assertEqual(client.receive("mqtt.publish"), {"topic": "chat/lobby", "text": "[websocket] alice: hi"})
        saved = Message.objects.get()
        self.assertEqual((saved.author, saved.protocol, saved.sender, saved.text), (alice, "websocket", "alice", "hi"))

    def test_an_mqtt_topic_names_the_user_and_a_guest_socket_cannot_talk(self):
        bob = User.objects.create_user("bob")
        client = Client("chatroom.consumers:routes")
        with connections_kept():
            for sender in ("bob", "mallory"):
                client.send_and_consume("mqtt.receive", {"topic": f"chat/from/{sender}", "sender": sender,
                                                         "text": "hello", "protocol": "mqtt"})
            client.send_and_consume("websocket.connect", {"path": "/chat/socket/"})
            client.send_and_consume("websocket.receive", {"path": "/chat/socket/", "text": "hi",
                                                          "protocol": "websocket"})
        self.assertEqual([(m.author, m.sender) for m in Message.objects.all()], [(bob, "bob"), (None, "mallory")])
        self.assertEqual(client.receive_all(), [{"accept": True}, {"text": "hello guest: log in to talk"},
                                                {"text": "(not sent: log in to talk)"}])
