"""Log records as one JSON object a line, for every Lifeboat process that is asked to
(``LIFEBOAT_LOG_FORMAT=json``): the web service, the Celery workers and beat, the process
server and the agent. A log shipper then reads fields instead of parsing sentences.

A line holds ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger`` and
``message``, then the ids of what the record is about when they are known (``job_id``,
``job_type``, ``item_id``...), the exception's traceback as ``exc_info``, and any other field
the call passed with ``extra=``. Ids come from ``extra=`` or from ``log_context``: code that
runs a job or an apply pass sets them once, and every record logged meanwhile, by any module,
carries them.

Standard library only, so that the agent and the data plane can use it as well as the apps.
"""
from __future__ import annotations

import contextvars
import json
import logging
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The ids a record is about, set for the time a job or an apply pass runs (``log_context``).
_CONTEXT: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("lifeboat_log_context", default={})

# What every LogRecord has; anything else on a record came from ``extra=`` or the context.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


@contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Attach ``ids`` (``job_id=``, ``item_id=``...) to every record logged inside the block,
    in this thread or task. Nested blocks add to the outer one's ids; ``None`` values are
    left out."""
    merged = {**_CONTEXT.get(), **{k: str(v) for k, v in ids.items() if v is not None}}
    token = _CONTEXT.set(merged)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_log_context() -> dict[str, str]:
    return dict(_CONTEXT.get())


class ContextFilter(logging.Filter):
    """Copies the ``log_context`` ids onto each record that passes through the handler (an
    id given with ``extra=`` wins), so plain and JSON formats can both use them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _CONTEXT.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, then the record's ids and extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():  # extra= and the ContextFilter's ids
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = _json_safe(value)
        for key, value in _CONTEXT.get().items():  # also without ContextFilter on the handler
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        # One line whatever the message holds: json.dumps escapes newlines.
        return json.dumps(entry, ensure_ascii=False)


def json_logs_wanted(environ: dict | None = None) -> bool:
    """Whether ``LIFEBOAT_LOG_FORMAT`` asks for JSON lines (``json``); anything else but
    ``plain`` or nothing is refused, so that a typo does not silently give plain logs."""
    value = (environ if environ is not None else os.environ).get("LIFEBOAT_LOG_FORMAT", "plain").strip().lower()
    if value not in ("json", "plain", ""):
        raise ValueError(f"LIFEBOAT_LOG_FORMAT must be 'json' or 'plain', not {value!r}")
    return value == "json"


def configure_logging(level: str = "INFO", *, environ: dict | None = None) -> None:
    """The root logger of a process without Django (process server, agent): one stream
    handler on stderr, plain or JSON as ``LIFEBOAT_LOG_FORMAT`` says."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if json_logs_wanted(environ) else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
