"""The test project's [django] identify hook: an MQTT sender is the user of that name."""

from django.contrib.auth.models import User

asked = []


def identify(protocol, sender, message):
    asked.append((protocol, sender))
    if protocol != "mqtt":
        return None
    return User.objects.filter(username=sender).first()
