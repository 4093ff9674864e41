"""The Django settings of Channels' side of ``bench/worker.py`` (``_worker_channels.py``): the least
that runs Channels' worker. No database, no HTTP: only the channel layer, chosen by environment
variables the benchmark sets: channels_redis at ``BENCH_REDIS_URL``, or Channels' in-memory layer
when ``BENCH_CHANNEL_LAYER=memory``. Both keep their defaults (capacity 100, expiry 60 s), as
crossroads' layers do with theirs; the one exception is channels_redis' socket timeout (see below).
"""

import os

SECRET_KEY = "bench-only"  # required by Django; nothing here signs or serves anything
DEBUG = False
INSTALLED_APPS = ["channels"]
DATABASES: dict = {}
USE_TZ = True
ASGI_APPLICATION = "_worker_channels.application"
if os.environ.get("BENCH_CHANNEL_LAYER") == "memory":  # the worker and the sender in one process
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # socket_timeout=None: redis-py 8 made 5 s its default, which cuts channels_redis' blocking BZPOPMIN
            # short and kills every consumer left idle for 5 s (django/channels_redis#422). This is the
            # documented workaround, which any Channels user on redis-py 8 needs.
            "CONFIG": {"hosts": [{"address": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
                                  "socket_timeout": None}]},
        },
    }
