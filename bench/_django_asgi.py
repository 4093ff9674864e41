"""Daphne's application in ``bench/django_views.py``: the ``_django_site`` project through Django's ASGI handler,
routed by Channels 4's ``ProtocolTypeRouter`` as Channels' docs set up an asgi.py (Channels 4 has no handler of
its own for views: its ``http`` entry is Django's ``get_asgi_application()``). Runs in the Channels
virtualenv with bench/ on ``PYTHONPATH``."""

from channels.routing import ProtocolTypeRouter
from django.core.asgi import get_asgi_application

application = ProtocolTypeRouter({"http": get_asgi_application()})
