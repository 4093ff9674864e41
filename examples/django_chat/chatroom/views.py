"""The chat page: the lobby's latest lines from the model, and a WebSocket (chatroom/consumers.py) for the rest."""

from django.shortcuts import render

from .models import Message

HISTORY = 50  # lines the page shows from before it opened


def chat(request):
    latest = list(Message.objects.select_related("author").order_by("-sent", "-id")[:HISTORY])
    return render(request, "chatroom/chat.html", {"history": reversed(latest)})
