import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lifeboat.settings")
application = get_asgi_application()

from core.checks import refuse_unsafe_settings  # noqa: E402  (needs the apps loaded)

# gunicorn runs no system checks: refuse default keys here too (core/checks.py).
refuse_unsafe_settings()
