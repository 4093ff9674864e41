"""The ``[django] identify`` hook: which Django user an MQTT message comes from.

crossroads.toml makes the MQTT bridge name the sender by the topic (``chat/from/<username>``, ``sender_level
= 3``) and ignore the ``sender`` user property, which any client may set to anything. A topic is something the
broker can vouch for: with mosquitto's ``pattern write chat/from/%u`` in its ACL file, only the broker user
alice may publish to chat/from/alice (docs/django.md shows the lines). IRC nicks are not vouched for (anyone
may take a free nick), so they map to nobody.
"""

from django.contrib.auth import get_user_model


def identify(protocol, sender, message):
    if protocol != "mqtt" or not sender:
        return None
    return get_user_model().objects.filter(username=sender, is_active=True).first()
