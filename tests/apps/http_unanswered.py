"""An HTTP app that routes http.request and nothing else, answering nothing (its clients leave first)."""

from crossroads import route


def unanswered(message):
    pass


routes = [route("http.request", unanswered)]
