"""The test project's crossroads routing: every HTTP request to its Django views."""

from crossroads import route
from crossroads.django import django_view

routes = [route("http.request", django_view)]
