"""MQTT consumers for tests/test_mqtt_bridge.py: each topic prefix exercises one way to answer."""

from crossroads import Channel, Group, route


def echo(message):
    """Echo the payload (text or bytes) to wherever replies go; report what the bridge sent to ``test.mqtt``."""
    Channel("test.mqtt").send(dict(message.content), immediately=True)
    if message.text is not None:
        message.reply_channel.send({"text": message.text})
    else:
        message.reply_channel.send({"payload": message["payload"]})


def join(message):
    """``room/<anything>``: the topic's reply channel joins the room; ``say`` broadcasts to every member."""
    if message.text == "join":
        Group("mqtt-room").add(message.reply_channel)
        Channel("test.joined").send({"topic": message["topic"]}, immediately=True)
    else:
        Group("mqtt-room").send({"text": message.text})


def reply_elsewhere(message):
    """``to/<x>``: the payload names the topic the reply should go to (allow_publish decides)."""
    message.reply_channel.send({"text": "redirected", "topic": message.text, "qos": 1})


def publish(message):
    """``publish/<x>``: ask the bridge, through mqtt.publish, to publish to the topic in the payload."""
    Channel("mqtt.publish").send({"topic": message.text, "text": "published", "qos": 1,
                                  "properties": {"user_properties": [["by", "consumer"]]}})


def bad_reply(message):
    """``bad/<x>``: replies the bridge must refuse (logged and counted), then a good one."""
    message.reply_channel.send({"text": "both", "payload": b"both"})
    message.reply_channel.send({"text": "wildcard", "topic": "a/#"})
    message.reply_channel.send({"text": "ok"})


def link(message):
    Channel("test.links").send(dict(message.content), immediately=True)


routes = [
    route("mqtt.receive", join, topic=r"^room/"),
    route("mqtt.receive", reply_elsewhere, topic=r"^to/"),
    route("mqtt.receive", publish, topic=r"^publish/"),
    route("mqtt.receive", bad_reply, topic=r"^bad/"),
    route("mqtt.receive", echo),
    route(["mqtt.connect", "mqtt.disconnect"], link),
]
