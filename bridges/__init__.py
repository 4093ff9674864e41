"""Protocol bridges: one package per protocol, plus the shared base.

Each bridge translates its protocol into channel-layer messages (``messages.py``,
pure) and does the I/O (``bridge.py``, thin). The bridges land with issues 3-6;
this package is their home.
"""
