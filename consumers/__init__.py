"""The programming model: Message, Channel, Group, routing, sessions, the worker.

It lands with issue 3; users import its public names from ``crossroads``.
"""
