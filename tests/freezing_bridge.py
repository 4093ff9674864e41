"""The toy line bridge with a way to block its event loop on purpose, for the systemd watchdog's tests.

A reply whose text is ``FREEZE`` (the toy echo app answers the line ``freeze`` so) makes the handler write
``frozen`` in the ``folder`` option's folder, then block the whole loop until a file ``thaw`` appears there:
what a bridge calling a blocking library by mistake does to its process.
"""

from __future__ import annotations

import time
from pathlib import Path

from toy_bridge import ToyBridge

from crossroads.bridges.base import Option


class FreezingBridge(ToyBridge):
    type_name = "freezing"
    OPTIONS = {**ToyBridge.OPTIONS, "folder": Option(str, "", "where the frozen and thaw files are")}

    def handle_reply(self, local_id: str, message: dict):
        if message.get("text") == "FREEZE":
            folder = Path(self.options["folder"])
            (folder / "frozen").write_text("frozen")
            while not (folder / "thaw").exists():  # blocks the loop: that is the point
                time.sleep(0.01)
        return super().handle_reply(local_id, message)
