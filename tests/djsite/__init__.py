"""A small Django project the Django integration's tests serve through crossroads (tests/test_django.py)."""
