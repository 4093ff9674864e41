"""The competitors of ``bench/slack.py``: what a user would hand-write instead of the bridge, and the floor.

Owns two Socket Mode clients, run as ``python bench/slack_clients.py '<json spec>'`` with the
``.bench-venvs/slack`` interpreter (slack-sdk and aiohttp alone, at ``.venv``'s versions):

- ``sdk``: slack-sdk's aiohttp ``SocketModeClient`` as its documentation shows it, a request listener that
  acks each envelope (``send_socket_mode_response``) and counts it; nothing posted back; with ``"echo": true``
  the listener then posts the event's text back with ``AsyncWebClient.chat_postMessage`` (a hand-written echo
  bot: what crossroads' bridge and consumer do together);
- ``raw``: a bare aiohttp WebSocket that answers every frame with its ack, no SDK: the emulator's ceiling,
  to show the emulator is not what limits the others.

Both print ``{"ready": true}`` once connected, then run until stdin closes, and print their counts last.
The emulator (bench/slack_peer.py) does the timing: the clients only ack.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


async def stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


async def sdk(spec: dict[str, Any]) -> dict[str, Any]:
    from slack_sdk.socket_mode.aiohttp import SocketModeClient
    from slack_sdk.socket_mode.request import SocketModeRequest
    from slack_sdk.socket_mode.response import SocketModeResponse
    from slack_sdk.web.async_client import AsyncWebClient

    echo = spec.get("echo", False)
    seen: set[str] = set()
    counts = {"received": 0}

    async def on_request(client: SocketModeClient, request: SocketModeRequest) -> None:
        await client.send_socket_mode_response(SocketModeResponse(envelope_id=request.envelope_id))
        counts["received"] += 1
        seen.add(request.payload.get("event_id", ""))
        if echo:
            event = request.payload.get("event") or {}
            await client.web_client.chat_postMessage(channel=event["channel"], text=event["text"])

    # One aiohttp session for the posts, as the bridge has: without one, AsyncWebClient opens a session (and a
    # connection) per call, several times slower.
    session = aiohttp.ClientSession()
    client = SocketModeClient(app_token=spec["app_token"],
                              web_client=AsyncWebClient(token=spec["bot_token"], base_url=spec["api_url"],
                                                        session=session))
    client.socket_mode_request_listeners.append(on_request)
    await client.connect()
    emit({"ready": True})
    cpu = time.process_time()
    await stdin_closed()
    cpu = time.process_time() - cpu
    await client.close()
    await session.close()
    return {"received": counts["received"], "distinct": len(seen), "cpu_s": cpu}


async def raw(spec: dict[str, Any]) -> dict[str, Any]:
    counts = {"received": 0}
    async with aiohttp.ClientSession() as session:
        async with session.post(spec["api_url"] + "apps.connections.open",
                                headers={"Authorization": f"Bearer {spec['app_token']}"}) as answer:
            url = (await answer.json())["url"]
        async with session.ws_connect(url) as ws:
            await ws.receive()  # hello
            emit({"ready": True})

            async def acking() -> None:
                async for frame in ws:
                    if frame.type == aiohttp.WSMsgType.TEXT:
                        envelope_id = json.loads(frame.data).get("envelope_id")
                        if envelope_id:
                            await ws.send_str(json.dumps({"envelope_id": envelope_id}))
                            counts["received"] += 1

            cpu = time.process_time()
            task = asyncio.ensure_future(acking())
            await stdin_closed()
            cpu = time.process_time() - cpu
            task.cancel()
    return {"received": counts["received"], "cpu_s": cpu}


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec["mode"] == "versions":
        import importlib.metadata

        emit({name: importlib.metadata.version(name) for name in spec["packages"]})
        return
    emit(asyncio.run({"sdk": sdk, "raw": raw}[spec["mode"]](spec)))


if __name__ == "__main__":
    main()
