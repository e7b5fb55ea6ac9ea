"""Structured logs (LIFEBOAT_LOG_FORMAT=json, mobility/logs.py): one JSON object a line, with
the job and item a record is about; and a web console without the machines' routine calls."""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from django.db import transaction

from core.choices import JobState
from core.jobs import HANDLERS, JobHandler, job_create
from core.models import Job
from lifeboat.weblog import quiet_request
from mobility.logs import ContextFilter, JsonFormatter, json_logs_wanted, log_context
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
ITEM = str(uuid.uuid4())


def _copies(ctx):
    with ctx.step("Copy"):
        logging.getLogger("lifeboat.tests.copy").info("copied %d MiB of disk %d", 8, 0)
    return {}


@pytest.fixture
def json_lines():
    """Every record of this process, as the JSON console handler writes it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in out.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_a_record_is_one_json_line_with_its_fields_and_context():
    formatter = JsonFormatter()
    try:
        raise ValueError("disk 2 is gone")
    except ValueError:
        record = logging.getLogger("lifeboat.x").makeRecord(
            "lifeboat.x", logging.ERROR, __file__, 1, "apply of %s failed:\nsee below", ("vm-01",),
            sys.exc_info(), extra={"item_id": "from-extra", "bytes": 4096})
    with log_context(job_id="j-1", item_id="from-context"):
        line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["logger"] == "lifeboat.x"
    assert entry["message"] == "apply of vm-01 failed:\nsee below"
    assert entry["item_id"] == "from-extra" and entry["job_id"] == "j-1" and entry["bytes"] == 4096
    assert "ValueError: disk 2 is gone" in entry["exc_info"]
    assert entry["time"].endswith("Z") and entry["time"][:4].isdigit()
    assert json_logs_wanted({"LIFEBOAT_LOG_FORMAT": "JSON"}) and not json_logs_wanted({})
    with pytest.raises(ValueError, match="must be 'json' or 'plain'"):
        json_logs_wanted({"LIFEBOAT_LOG_FORMAT": "yaml"})


def test_a_job_run_on_the_worker_logs_lines_with_its_job_and_item_ids(celery_worker, json_lines):
    HANDLERS["T_COPY"] = JobHandler(run=_copies, queue="control")
    try:
        with transaction.atomic():
            job = job_create(job_type="T_COPY", target_type="protected_item", target_id=ITEM, target_name="vm-01",
                             steps=["Copy"])
        wait_for(lambda: Job.objects.filter(pk=job.pk, state=JobState.SUCCEEDED).exists(), message="the job to end")
        wait_for(lambda: any(e.get("job_state") for e in json_lines()), message="the job's last line")
    finally:
        HANDLERS.pop("T_COPY")
    mine = [e for e in json_lines() if e.get("job_id") == str(job.pk)]
    copy = next(e for e in mine if e["logger"] == "lifeboat.tests.copy")
    assert copy["message"] == "copied 8 MiB of disk 0"
    assert (copy["item_id"], copy["job_type"], copy["level"]) == (ITEM, "T_COPY", "INFO")
    end = next(e for e in mine if e.get("job_state"))
    assert end["job_state"] == "SUCCEEDED" and end["logger"] == "core.jobs" and "succeeded after" in end["message"]
    assert any("starts" in e["message"] for e in mine)


def test_the_settings_turn_json_on_for_every_record(tmp_path):
    code = ("import django, logging; django.setup(); "
            "logging.getLogger('lifeboat.probe').warning('item %s is late', 'vm-9', extra={'item_id': 'i-9'})")
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="lifeboat.settings", LIFEBOAT_DEMO="1",
               LIFEBOAT_DATA_DIR=str(tmp_path), LIFEBOAT_LOG_FORMAT="json")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    entry = json.loads(out.stderr.strip().splitlines()[-1])
    assert entry["message"] == "item vm-9 is late" and entry["item_id"] == "i-9" and entry["level"] == "WARNING"
    bad = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, LIFEBOAT_LOG_FORMAT="xml"),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "LIFEBOAT_LOG_FORMAT must be 'json' or 'plain'" in bad.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_web_access_log_leaves_out_routine_calls(tmp_path):
    agent = "/api/v1/agents/0b6a2f0e-1111-4222-8333-944445555666"
    assert quiet_request({"PATH_INFO": agent + "/heartbeat", "REQUEST_METHOD": "POST"}, 204)
    assert quiet_request({"PATH_INFO": "/api/v1/processServers/3/heartbeat", "REQUEST_METHOD": "POST"}, 200)
    assert not quiet_request({"PATH_INFO": agent + "/heartbeat", "REQUEST_METHOD": "POST"}, 403)  # failures show
    assert not quiet_request({"PATH_INFO": "/items/", "REQUEST_METHOD": "GET"}, 200)
    assert quiet_request({"PATH_INFO": "/items/x/", "REQUEST_METHOD": "GET", "HTTP_HX_REQUEST": "true"}, 200)
    assert not quiet_request({"PATH_INFO": "/items/x/", "REQUEST_METHOD": "GET", "HTTP_HX_REQUEST": "true",
                              "HTTP_HX_BOOSTED": "true"}, 200)

    # A real gunicorn with the demo's flags: a page view is logged, static files and polls are not.
    port = _free_port()
    env = dict(os.environ, LIFEBOAT_DEMO="1", LIFEBOAT_DATA_DIR=str(tmp_path), LIFEBOAT_LOG_FORMAT="json")
    log_path = tmp_path / "web.log"
    with open(log_path, "wb") as log:
        web = subprocess.Popen([sys.executable, "-m", "gunicorn", "lifeboat.wsgi", "-b", f"127.0.0.1:{port}", "-w", "1",
                                "--access-logfile", "-", "--logger-class", "lifeboat.weblog.Logger"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def get(path: str, **headers) -> int:
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status

        wait_for(lambda: _answers(get, "/login/"), timeout=60, message="gunicorn to answer")
        assert get("/static/css/lifeboat.css") == 200
        assert get("/login/", **{"HX-Request": "true"}) == 200
        assert get("/login/?after=1") == 200
        time.sleep(0.5)
    finally:
        web.terminate()
        web.wait(timeout=30)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    access = [e["message"] for e in lines if e["logger"] == "gunicorn.access"]
    # The first page view that answered, and the last one; not the static file nor the poll.
    assert len(access) == 2, access
    assert '"GET /login/ HTTP/1.1" 200' in access[0] and '"GET /login/?after=1 HTTP/1.1" 200' in access[1]
    assert any(e["logger"] == "gunicorn.error" for e in lines)  # gunicorn's own lines are JSON too


def _answers(get, path: str) -> bool:
    try:
        return get(path) == 200
    except OSError:
        return False
