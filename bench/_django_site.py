"""The Django project of ``bench/django_views.py``: settings, URLconf and views in one module (``DJANGO_SETTINGS_MODULE
= "_django_site"``, bench/ on ``PYTHONPATH``), served unchanged by every server the benchmark compares.

What ``django-admin startproject`` gives (its middleware, sessions, auth, messages) with two views: ``/`` says
hello, ``/orm/`` reads one row through the ORM (a ``User`` by primary key, SQLite at ``$BENCH_DJANGO_DB``, which
the benchmark migrates and fills before any server starts). Django's defaults everywhere else, ``CONN_MAX_AGE``
included (0: a connection per request), the same for every server.
"""

import os

from django.http import HttpResponse
from django.urls import path

SECRET_KEY = "bench-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions",
                  "django.contrib.messages"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "_django_site"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ.get("BENCH_DJANGO_DB", "")}}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"


def hello(request):
    return HttpResponse(b"Hello, world!", content_type="text/plain")


def orm(request):
    from django.contrib.auth.models import User  # (this module is the settings too: models load after it)

    user = User.objects.only("username").get(pk=1)
    return HttpResponse(f"Hello, {user.username}!", content_type="text/plain")


urlpatterns = [path("", hello), path("orm/", orm)]
