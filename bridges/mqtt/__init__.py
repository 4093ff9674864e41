"""The MQTT bridge: ``messages.py`` (pure translation) and ``bridge.py`` (paho on the reactor); docs/spec/mqtt.md."""
