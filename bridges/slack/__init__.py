"""The Slack bridge (type ``slack``, in progress): Socket Mode or the Events API, through slack-sdk.

``messages.py`` is the pure translation (no aiohttp, no slack-sdk I/O, no
asyncio); the I/O (``bridge.py``) comes later. docs/spec/slack.md is the
contract both follow.
"""
