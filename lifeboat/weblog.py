"""gunicorn's logging for Lifeboat: ``gunicorn --logger-class lifeboat.weblog.Logger``.

- The access log leaves out the requests that come every few seconds and succeed: the
  agents' and process servers' protocol (heartbeat, assignment, events, registration polls),
  ``/metrics`` scrapes, static files and the portal's HTMX polls of live panels. A console
  then shows people's requests; any of those that fails (status 400 or more) is still logged.
- With ``LIFEBOAT_LOG_FORMAT=json`` gunicorn's own lines (access and errors) are JSON lines
  too, like Django's (mobility/logs.py).
"""
from __future__ import annotations

import re

from gunicorn import glogging

from mobility.logs import ContextFilter, JsonFormatter, json_logs_wanted

# Paths polled by machines, answered without a line in the access log when they succeed.
QUIET_PATHS = re.compile(
    r"^/api/v1/(agents/[0-9a-f-]{36}/(heartbeat|assignment|events)"
    r"|agents/registrations/[0-9a-f-]{36}"
    r"|processServers/\d+/heartbeat)/?$"
    r"|^/metrics/?$"
    r"|^/static/"
)


def quiet_request(environ: dict, status: int) -> bool:
    """Whether a request is routine enough to leave out of the access log."""
    if status >= 400:
        return False
    if QUIET_PATHS.match(environ.get("PATH_INFO", "")):
        return True
    # The portal's live panels poll with HTMX every few seconds (a boosted link is a page view).
    return (environ.get("REQUEST_METHOD") == "GET" and environ.get("HTTP_HX_REQUEST") == "true"
            and environ.get("HTTP_HX_BOOSTED") != "true")


def _status(resp) -> int:
    status = getattr(resp, "status_code", None) or str(getattr(resp, "status", "") or "").split(" ")[0]
    try:
        return int(status)
    except (TypeError, ValueError):
        return 0


class Logger(glogging.Logger):
    def access(self, resp, req, environ, request_time):
        if quiet_request(environ, _status(resp)):
            return
        super().access(resp, req, environ, request_time)

    def setup(self, cfg):
        super().setup(cfg)
        if json_logs_wanted():
            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    handler.setFormatter(JsonFormatter())
                    handler.addFilter(ContextFilter())
