"""Settings of the test project: SQLite at $CROSSROADS_DJANGO_DB (the tests put it in a scratch folder), or the
PostgreSQL database at the URL $CROSSROADS_DJANGO_PG (tests/test_django_postgres.py starts a server of its own),
with $CROSSROADS_DJANGO_CONN_MAX_AGE (seconds, "none" for unlimited; 0 by default, as Django's) and
$CROSSROADS_DJANGO_HEALTH_CHECKS ("1": CONN_HEALTH_CHECKS)."""

import os
from pathlib import Path
from urllib.parse import urlsplit

SECRET_KEY = "test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "djsite",  # its Note model, which consumers write and read
]
STATIC_URL = "/static/"
STATICFILES_DIRS = [Path(__file__).resolve().parent / "static"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "djsite.urls"
if os.environ.get("CROSSROADS_DJANGO_PG"):
    _pg = urlsplit(os.environ["CROSSROADS_DJANGO_PG"])
    # application_name marks this project's connections in pg_stat_activity, apart from the tests' own.
    DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": _pg.path.lstrip("/"),
                             "USER": _pg.username, "HOST": _pg.hostname, "PORT": _pg.port,
                             "OPTIONS": {"application_name": "djsite"}}}
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["CROSSROADS_DJANGO_DB"]}}
_age = os.environ.get("CROSSROADS_DJANGO_CONN_MAX_AGE", "0")
DATABASES["default"]["CONN_MAX_AGE"] = None if _age == "none" else int(_age)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = os.environ.get("CROSSROADS_DJANGO_HEALTH_CHECKS") == "1"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins in tests
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
LOGGING = {"version": 1, "disable_existing_loggers": False}
