"""The test project's consumers without django_view: [django] view (on by default) appends it."""

from crossroads import route

from .consumers import http_whoami

routes = [route("http.request", http_whoami, path=r"^/crossroads/whoami/$")]
