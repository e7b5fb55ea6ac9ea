import gc
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lifeboat.settings")
application = get_wsgi_application()

from core.checks import refuse_unsafe_settings  # noqa: E402  (needs the apps loaded)

# gunicorn runs no system checks: refuse default keys here too (core/checks.py).
refuse_unsafe_settings()

from django.urls import get_resolver  # noqa: E402

# What is loaded now (Django, DRF, every view, serializer and template tag the URLconf
# imports) stays for the worker's life: frozen out of the garbage collector's reach, a full
# collection no longer walks its ~135,000 objects, which added ~100 ms to each request it
# landed in (the API lists' p95 in bench/bench_control_plane.py).
get_resolver().url_patterns
gc.collect()
gc.freeze()
# A list page of 50 items allocates some 100,000 objects: at the default thresholds (700,
# 10, 10) a collection of the older generations landed in every few requests and put
# 100-150 ms on the API lists' p95 (bench/bench_control_plane.py: the protected items
# list's p95 went from about 230 to 130 ms on one host). Collections are now rarer; a
# worker's memory settles some 20 MiB higher (measured over 600 list requests).
gc.set_threshold(50_000, 20, 100)
