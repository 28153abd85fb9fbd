"""Django settings for the LowMag portal.

Every value is read from the environment (see ``deploy/SETTINGS.md``). With nothing set,
the portal runs embedded: SQLite and local files under ``LOWMAG_DATA_DIR`` (default
``./data``), an in-process worker and an in-memory channel layer.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from portal.env import database_from_url, env_bool, env_int, env_list, env_str

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY") or ("insecure-local-only-" + "x" * 40)
if not env_str("SECRET_KEY") and not DEBUG and env_bool("LOWMAG_PRODUCTION", False):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured("SECRET_KEY must be set when LOWMAG_PRODUCTION=true")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

DATA_DIR = Path(env_str("LOWMAG_DATA_DIR") or BASE_DIR / "data").resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)  # the embedded SQLite database lives here
MEDIA_ROOT = DATA_DIR / "media"
MEDIA_URL = "/media/"
UPLOAD_DIR = DATA_DIR / "uploads"
SLIDE_DIR = DATA_DIR / "slides"
BUNDLE_DIR = DATA_DIR / "bundles"

REDIS_URL = env_str("REDIS_URL")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "channels",
    "axes",
    "portal.core",
    "portal.cases",
    "portal.analyses",
    "portal.reviews",
    "portal.api",
    "portal.uploads",
    "portal.integrations",
    "portal.viewer",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "portal.core.middleware.SecurityHeadersMiddleware",
    "axes.middleware.AxesMiddleware",
]

# Repeated wrong passwords lock the account (django-axes; portal.core.throttle audits them):
# page, admin and API logins and the signing password all count.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("LOWMAG_LOGIN_FAILURE_LIMIT", 10)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("LOWMAG_LOGIN_LOCKOUT_MINUTES", 30))
AXES_LOCKOUT_PARAMETERS = ["username"]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "portal.core.throttle.lockout_response"
AXES_VERBOSE = False
# Locking by user name alone is deliberate: a hospital's clients share a few NAT addresses.
SILENCED_SYSTEM_CHECKS = ["axes.W006"]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"
ASGI_APPLICATION = "portal.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "portal" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASES = {
    "default": database_from_url(
        env_str("DATABASE_URL") or f"sqlite:///{DATA_DIR / 'lowmag.sqlite3'}"
    )
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # WAL: readers never wait for the writer. IMMEDIATE: a write transaction takes the write
    # lock at BEGIN, waiting up to `timeout` seconds for it, instead of failing with "database
    # is locked" when a read turns into a write while another writer holds the lock.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": env_int("LOWMAG_SQLITE_BUSY_TIMEOUT_S", 20),
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL",
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "static"
STATICFILES_DIRS = [p for p in [BASE_DIR / "frontend" / "dist"] if p.exists()]

LOGIN_URL = "/login/"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Token first: an anonymous request then gets 401 with "WWW-Authenticate: Token".
        "portal.api.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "portal.api.schema.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "portal.api.filters.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "portal.api.filters.QueryParamFilter",
        "rest_framework.filters.SearchFilter",
        "rest_framework.filters.OrderingFilter",
    ],
    "EXCEPTION_HANDLER": "portal.api.exceptions.exception_handler",
    "DEFAULT_THROTTLE_RATES": {"wrong_token": env_str("LOWMAG_WRONG_TOKEN_RATE", "20/min")},
}

SPECTACULAR_SETTINGS = {
    "TITLE": "LowMag API",
    "DESCRIPTION": "Low-magnification telepathology: cases, slides, AI analyses, reviews.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Several models have a `status` field with different choices: name each enum.
    "ENUM_NAME_OVERRIDES": {
        "CaseStatusEnum": "portal.cases.models.Case.STATUSES",
        "SlideStatusEnum": "portal.cases.models.Slide.STATUSES",
        "DiagnosisStatusEnum": "portal.reviews.models.Diagnosis.STATUSES",
        "SecondOpinionStatusEnum": "portal.reviews.models.SecondOpinionRequest.STATUSES",
        "WebhookDeliveryStatusEnum": "portal.integrations.models.WebhookDelivery.STATUSES",
        "JobStateEnum": "portal.analyses.models.AnalysisJob.STATES",
    },
}

# Shared by every process of the portal: throttle counts and the tile grants version
# (portal.viewer.tileservice). Redis in production; files under DATA_DIR on one machine.
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "lowmag",
        }
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(DATA_DIR / "cache"),
        }
    }

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Celery: the production scale-out engine (Redis broker). Without REDIS_URL, tasks run in a
# background thread of the web process through portal.core.dispatch (same task code).
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "cpu"
# Analyses and training go to the GPU workers; every other task (whatever module defines it) to
# the CPU ones.
CELERY_TASK_ROUTES = {
    "portal.analyses.tasks.run_analysis": {"queue": "gpu"},
    "portal.analyses.training.run_training": {"queue": "gpu"},
    "portal.analyses.shadow.run_shadow": {"queue": "gpu"},
    "portal.analyses.extraction.extract_slide_features": {"queue": "gpu"},
}
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("LOWMAG_VISIBILITY_TIMEOUT", 3600)}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_TIME_LIMIT = env_int("LOWMAG_TASK_TIME_LIMIT", 1800)
CELERY_TASK_SOFT_TIME_LIMIT = env_int("LOWMAG_TASK_SOFT_TIME_LIMIT", 1500)
CELERY_WORKER_SEND_TASK_EVENTS = True
LOWMAG_TASK_MODE = env_str("LOWMAG_TASK_MODE")  # celery | thread | sync; see portal.core.dispatch

# Torch threads per worker process (1 is sane per Celery child on small machines).
LOWMAG_TORCH_THREADS = env_int("LOWMAG_TORCH_THREADS", 0)
# Torch device of analysis workers: empty/auto = cuda when present, else cpu (analysis.devices).
LOWMAG_DEVICE = env_str("LOWMAG_DEVICE", "")
# A worker child loads the active models when it starts (set for the gpu queue's workers).
LOWMAG_PRELOAD_MODELS = env_bool("LOWMAG_PRELOAD_MODELS", False)
# Slides one analysis task may take together for one model (the waiting ones, claimed under a
# lease and encoded in shared batches); 1 analyses each slide in its own task.
LOWMAG_GPU_BATCH_SLIDES = env_int("LOWMAG_GPU_BATCH_SLIDES", 4, minimum=1)
# How long a claimed job stays with its worker without a progress report (each one renews it);
# past it, the job's own message runs it again (the worker is presumed dead).
LOWMAG_CLAIM_LEASE_S = env_int("LOWMAG_CLAIM_LEASE_S", 120, minimum=5)
LOWMAG_MAX_UPLOAD_BYTES = env_int("LOWMAG_MAX_UPLOAD_BYTES", 20 * 1024**3)

# Webhook receivers on internal addresses, allowed on purpose (host names, IPs, networks).
LOWMAG_WEBHOOK_ALLOWED_HOSTS = env_list("LOWMAG_WEBHOOK_ALLOWED_HOSTS", [])

# Security: off by default (plain HTTP on localhost); production values in deploy/SETTINGS.md.
# TLS ends at nginx or the ingress, which sets X-Forwarded-Proto.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", False)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
# Probes and scrapers speak plain HTTP to the pod: never redirect them.
SECURE_REDIRECT_EXEMPT = env_list("SECURE_REDIRECT_EXEMPT", [r"^healthz$", r"^metrics$"])
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
# /metrics: a bearer token; when empty, only loopback clients may read it (portal.core.metrics).
METRICS_TOKEN = env_str("METRICS_TOKEN")

# LOG_FORMAT=json: one JSON object per line (portal.core.logging.JsonFormatter).
LOG_FORMAT = env_str("LOG_FORMAT", "plain").strip().lower()
if LOG_FORMAT not in ("plain", "json"):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(f"LOG_FORMAT={LOG_FORMAT!r} is not supported: use plain or json")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "portal.core.logging.JsonFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}
