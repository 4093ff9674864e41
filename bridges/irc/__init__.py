"""The IRC bridge (type ``irc``): the ASGI 1.0 ``irc-client`` draft, extended, over twisted.words.

``messages.py`` is the pure translation (no sockets, no reactor); ``bridge.py``
is the twisted.words glue. docs/spec/irc.md documents every key and option.
"""
