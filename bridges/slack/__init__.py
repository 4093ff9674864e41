"""The Slack bridge (type ``slack``): Socket Mode or the Events API, through slack-sdk.

``messages.py`` is the pure translation (no aiohttp, no slack-sdk I/O, no
asyncio); ``bridge.py`` is the I/O on the reactor's loop. docs/spec/slack.md
is the contract both follow.
"""
