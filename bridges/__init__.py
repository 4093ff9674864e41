"""Protocol bridges: one package per protocol, plus the shared base.

Each bridge translates its protocol into channel-layer messages (``messages.py``,
pure) and does the I/O (``bridge.py``, thin) on the base in ``bridges.base``:
lifecycle, the reply queue and its demultiplexing, sending into the layer,
reconnecting, health, counters, options and registration. docs/bridges.md says
how to write one.

This package imports nothing on purpose: ``messages.py`` modules stay free of
Twisted, and nothing here may install a reactor.
"""
