"""The example Django project served through crossroads (examples/django_chat, docs/django.md walks through it)."""
