"""What the chat keeps: every line said in the lobby, from whichever protocol, and who said it."""

from django.conf import settings
from django.db import models


class Message(models.Model):
    """One line of the chat. ``author`` is the Django user when crossroads knows one (a logged-in browser, an
    MQTT client the identify hook maps to a user); ``sender`` is the name shown, whatever the protocol."""

    author = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                               related_name="chat_messages")
    protocol = models.CharField(max_length=20)  # websocket, mqtt, irc: message.protocol
    sender = models.CharField(max_length=150)
    text = models.TextField()
    sent = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["sent", "id"]

    def __str__(self) -> str:
        return f"[{self.protocol}] {self.sender}: {self.text}"
