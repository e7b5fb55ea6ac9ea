"""Lifeboat settings, all from the environment.

The embedded default (no variables set) needs no servers: a SQLite file, a broker on the
local file system, the simulated VMware site and local-disk storage under LIFEBOAT_DATA_DIR.
Production sets DATABASE_URL (PostgreSQL) and CELERY_BROKER_URL (Redis).
"""
from __future__ import annotations

import os
from pathlib import Path

import dj_database_url

from mobility.logs import PLAIN_FORMAT as PLAIN_LOG_FORMAT
from mobility.logs import json_logs_wanted

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("LIFEBOAT_DATA_DIR", BASE_DIR / "var")).resolve()


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str = "") -> list[str]:
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


DEBUG = env_bool("DEBUG", False)
# The demo (``make run``) on the embedded defaults. Without it or DEBUG, Lifeboat refuses to
# start with a missing or default SECRET_KEY or LIFEBOAT_SECRETS_KEY (core/checks.py).
LIFEBOAT_DEMO = env_bool("LIFEBOAT_DEMO", False)
EMBEDDED_SECRET_KEY = "lifeboat-embedded-default-change-me-" + "x" * 24
SECRET_KEY = os.environ.get("SECRET_KEY") or EMBEDDED_SECRET_KEY
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")
# Key that encrypts secrets at rest (vCenter passwords, per-vault keys), apart from the
# signing key: production must set it, to another value than SECRET_KEY (core/checks.py);
# the demo and DEBUG fall back to one derived from SECRET_KEY.
LIFEBOAT_SECRETS_KEY = os.environ.get("LIFEBOAT_SECRETS_KEY", "")
# Behind a TLS-terminating proxy that sets X-Forwarded-Proto: secure cookies, HSTS, and
# request.is_secure() from the proxy's header. Never set it without such a proxy in front:
# a client could then claim https itself.
LIFEBOAT_BEHIND_TLS = env_bool("LIFEBOAT_BEHIND_TLS", False)
if LIFEBOAT_BEHIND_TLS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = int(os.environ.get("LIFEBOAT_HSTS_SECONDS", str(365 * 24 * 3600)))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("LIFEBOAT_HSTS_INCLUDE_SUBDOMAINS", False)
    # Off by default: agents and process servers may reach the web service inside the
    # network over plain HTTP; the proxy redirects browsers.
    SECURE_SSL_REDIRECT = env_bool("LIFEBOAT_SSL_REDIRECT", False)
SESSION_COOKIE_HTTPONLY = True

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "django_celery_beat",
    "core",
    "vault",
    "replication",
    "recovery_plans",
    "failback",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "lifeboat.urls"
WSGI_APPLICATION = "lifeboat.wsgi.application"
ASGI_APPLICATION = "lifeboat.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "core.context_processors.portal",
            ],
        },
    }
]

_default_db = f"sqlite:///{DATA_DIR / 'lifeboat.sqlite3'}"
DATABASES = {"default": dj_database_url.parse(os.environ.get("DATABASE_URL", _default_db), conn_max_age=60)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web, worker and beat share the file: WAL and immediate transactions serialize writers
    # instead of failing with "database is locked".
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "portal:overview"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.environ.get("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# htmx and Chart.js come from the npm registry at set-up time (package.json); never committed.
for _prefix, _dir in (("vendor/htmx", "node_modules/htmx.org/dist"), ("vendor/chart", "node_modules/chart.js/dist")):
    if (BASE_DIR / _dir).is_dir():
        STATICFILES_DIRS.append((_prefix, BASE_DIR / _dir))
STATIC_ROOT = BASE_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)  # whitenoise serves from the finders; it only wants the folder
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

# --- REST API -----------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Token first: an unauthenticated API call is answered 401 with WWW-Authenticate.
        # Personal tokens (core/tokens.py); then the admin site's DRF tokens, kept working.
        "core.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "core.api.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "core.api.exception_handler",
    # Bounded versions of DRF's parsers: a body too large is 413, JSON nested too deep is 400.
    "DEFAULT_PARSER_CLASSES": [
        "core.api.JSONParser",
        "core.api.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Lifeboat API",
    "DESCRIPTION": "Disaster recovery for VMware virtual machines: vaults, replication, failover.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # The error responses of every operation and the agents' bearer scheme (core/schema.py).
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "core.schema.error_responses"],
    # Two choice sets whose fields are both named after the recovery point type: one name each.
    "ENUM_NAME_OVERRIDES": {
        "PlanRecoveryPointEnum": "recovery_plans.models.PlanRecoveryPoint",
        "RecoveryPointKindEnum": "replication.choices.RecoveryPointType",
        "FailbackStateEnum": "failback.transitions.FailbackState",
        "FailbackTypeEnum": "failback.services.FAILBACK_TYPE_CHOICES",
    },
}

# --- Celery ---------------------------------------------------------------------------
# The embedded default broker is a SQLite file (kombu's SQLAlchemy transport): no server,
# and safe with web, worker and beat writing to it at once.
DATA_DIR.mkdir(parents=True, exist_ok=True)
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", f"sqla+sqlite:///{DATA_DIR / 'broker.sqlite3'}")
if CELERY_BROKER_URL.startswith("sqla+"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {"connect_args": {"timeout": 30}}  # handed to create_engine
else:
    # Above the longest task: a task not acknowledged within this is redelivered.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 6 * 3600}
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "control"
# One queue per workload (core/queues.py). Jobs choose theirs when they are enqueued.
CELERY_TASK_ROUTES = {
    "replication.apply_item": {"queue": "apply"},
    "replication.apply_items": {"queue": "apply"},
    "replication.apply_sweep": {"queue": "maintenance"},
    "replication.monitor": {"queue": "maintenance"},
    "replication.offhours_resync": {"queue": "maintenance"},
    "replication.app_consistent_sweep": {"queue": "maintenance"},
    "core.reap_jobs": {"queue": "maintenance"},
    "core.wake_jobs": {"queue": "maintenance"},
    "vault.rediscover": {"queue": "maintenance"},
}
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = TIME_ZONE
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# --- Cache ----------------------------------------------------------------------------
# Every web process (gunicorn's workers, several web hosts) must see the same counts of
# wrong passphrases and passwords (core/throttling.py), so the cache is shared: Redis when
# the broker is Redis (LIFEBOAT_CACHE_URL names another one; keys under "lifeboat:", apart
# from the broker's), else a file cache under LIFEBOAT_DATA_DIR, which the processes of the
# embedded demo share on their one machine. Neither needs a table or a migration.
CACHE_URL = os.environ.get("LIFEBOAT_CACHE_URL") or CELERY_BROKER_URL
if CACHE_URL.startswith(("redis://", "rediss://", "unix://")):
    CACHES = {"default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": CACHE_URL,
        "KEY_PREFIX": "lifeboat",
    }}
else:
    CACHES = {"default": {
        "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
        "LOCATION": str(DATA_DIR / "cache"),
        # Culling drops entries at random: far above what the demo ever holds.
        "OPTIONS": {"MAX_ENTRIES": 10000},
    }}

# Wrong secrets a client may send before it is locked out for a period (core/throttling.py),
# as "N/period" (s, min, hour, day; "5/30s"): past N wrong registration passphrases from one
# address (429 with Retry-After), or N wrong sign-in passwords from one address or for one
# user name (the sign-in page says so), every attempt is refused for a period, right or not.
LIFEBOAT_FAILED_ATTEMPT_LIMITS = {
    "agent_register": os.environ.get("LIFEBOAT_REGISTER_FAILURE_LIMIT", "10/min"),
    "login": os.environ.get("LIFEBOAT_LOGIN_FAILURE_LIMIT", "10/min"),
}
# Proxies in front of the web service that append the client's address to X-Forwarded-For.
# 0 (the default): the header is ignored, since any client can write it, and the limits
# count REMOTE_ADDR; with N, they count the address N entries from the header's right.
REST_FRAMEWORK["NUM_PROXIES"] = int(os.environ.get("LIFEBOAT_NUM_PROXIES", "0"))

# --- E-mail ---------------------------------------------------------------------------
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "127.0.0.1")
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "25"))
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_TIMEOUT = 10
EMAIL_FILE_PATH = os.environ.get("EMAIL_FILE_PATH", str(DATA_DIR / "mail"))  # for the file backend
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "lifeboat@localhost")

# --- Lifeboat -------------------------------------------------------------------------
# A running job that has not reported for this long is failed by the reaper.
LIFEBOAT_JOB_HEARTBEAT_TIMEOUT = int(os.environ.get("LIFEBOAT_JOB_HEARTBEAT_TIMEOUT", "300"))
# A queued job no worker claimed within this many seconds lost its message: the reaper
# sends it again (three sends in all), then fails it with a sentence.
LIFEBOAT_JOB_QUEUE_TIMEOUT = int(os.environ.get("LIFEBOAT_JOB_QUEUE_TIMEOUT", "120"))
LIFEBOAT_STORAGE = {"kind": "local", "root": str(DATA_DIR / "storage")}
if os.environ.get("LIFEBOAT_AZURE_CONNECTION_STRING"):
    LIFEBOAT_STORAGE = {
        "kind": "azure",
        "connection_string": os.environ["LIFEBOAT_AZURE_CONNECTION_STRING"],
        "container": os.environ.get("LIFEBOAT_AZURE_CONTAINER", "lifeboat"),
    }

# LIFEBOAT_LOG_FORMAT=json: every record is one JSON line (time, level, logger, message, and
# the job and item ids when known: mobility/logs.py); plain (the default) is for people.
LIFEBOAT_LOG_FORMAT = "json" if json_logs_wanted() else "plain"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": PLAIN_LOG_FORMAT},
        "json": {"()": "mobility.logs.JsonFormatter"},
    },
    "filters": {"log_context": {"()": "mobility.logs.ContextFilter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LIFEBOAT_LOG_FORMAT,
                             "filters": ["log_context"]}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}

# --- Monitoring -----------------------------------------------------------------------
# An agent or process server silent for this long is reported (ASR uses 15 minutes).
LIFEBOAT_HEARTBEAT_TIMEOUT = int(os.environ.get("LIFEBOAT_HEARTBEAT_TIMEOUT", "900"))
# An apply pass that takes this long is logged with where its time went (replication/engine.py).
LIFEBOAT_SLOW_APPLY_SECONDS = float(os.environ.get("LIFEBOAT_SLOW_APPLY_SECONDS", "10"))
# A problem that ends and starts again within this many seconds is the same alert: no new
# e-mail, and the "resolved" e-mail waits until it has stayed resolved this long.
LIFEBOAT_ALERT_QUIET_SECONDS = int(os.environ.get("LIFEBOAT_ALERT_QUIET_SECONDS", "600"))
LIFEBOAT_PORTAL_URL = os.environ.get("LIFEBOAT_PORTAL_URL", "http://127.0.0.1:8000")
# Initial copies running at once per process server; more wait their turn.
LIFEBOAT_MAX_CONCURRENT_INITIAL = int(os.environ.get("LIFEBOAT_MAX_CONCURRENT_INITIAL", "4"))
# How agents reach the configuration server (this service).
LIFEBOAT_CONFIG_URL = os.environ.get("LIFEBOAT_CONFIG_URL", "http://127.0.0.1:8000")
# How long enabling replication waits for a hand-installed agent to register.
LIFEBOAT_AGENT_INSTALL_TIMEOUT = int(os.environ.get("LIFEBOAT_AGENT_INSTALL_TIMEOUT", "900"))
# A planned failover waits this long (s) for the source's last writes to be replicated.
LIFEBOAT_FAILOVER_DRAIN_TIMEOUT = int(os.environ.get("LIFEBOAT_FAILOVER_DRAIN_TIMEOUT", "600"))

# --- Metrics --------------------------------------------------------------------------
# GET /metrics (Prometheus text format, lifeboat/metrics.py). With a token set, a scraper
# must send "Authorization: Bearer <token>" (from any address); without one, only clients on
# this host (127.0.0.1, ::1) are answered.
LIFEBOAT_METRICS_TOKEN = os.environ.get("LIFEBOAT_METRICS_TOKEN", "")
# The data path's rates (bytes/s sent, uploaded, applied) are averaged over this many seconds
# of process-server heartbeats (replication/data_path.py).
LIFEBOAT_DATA_PATH_RATE_WINDOW = int(os.environ.get("LIFEBOAT_DATA_PATH_RATE_WINDOW", "300"))

from lifeboat.schedules import BEAT_SCHEDULE as CELERY_BEAT_SCHEDULE  # noqa: E402,F401
