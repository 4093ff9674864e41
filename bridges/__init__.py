"""Protocol bridges: one package per protocol, plus the shared base.

Each bridge translates its protocol into channel-layer messages (``messages.py``,
pure) and does the I/O (``bridge.py``, thin) on the base: ``base.py`` (lifecycle,
the reply queue and its demultiplexing, counters), ``inlet.py`` (into the layer,
in order), ``reactor.py``, ``options.py``, ``health.py``, ``reconnect.py`` and
``registry.py``; ``crossroads.bridges.base`` re-exports what bridge authors use.
docs/bridges.md says how to write one.

This package imports nothing on purpose: ``messages.py`` modules stay free of
Twisted, and nothing here may install a reactor.
"""
