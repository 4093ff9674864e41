"""The chat app: the ``Message`` model, the chat page, and the crossroads consumers that fill it."""
