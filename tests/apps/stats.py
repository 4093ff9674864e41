"""An included routing table: mounted under a path prefix by tests/apps/chat.py."""

from crossroads import route


def stats_page(message, **kwargs):
    message.reply_channel.send({"text": f"stats for {message['path']} rest={kwargs}"})


def stats_detail(message, name):
    message.reply_channel.send({"text": f"detail {name}"})


routes = [
    route("http.request", stats_detail, path=r"^detail/(?P<name>\w+)/$"),
    route("http.request", stats_page, path=r"^$"),
]
