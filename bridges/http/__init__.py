"""The HTTP bridge (type ``http``): ``messages.py`` translates, ``bridge.py`` serves; see docs/spec/http.md."""
