"""Running a recovery plan's script action: a shell command with a timeout, its exit code and
the ends of its output kept (plain Python, no Django)."""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from typing import Callable

# Output kept per stream: its last bytes (where a failing script says why), this many.
OUTPUT_KEEP_BYTES = 16 * 1024
# How often a running script's job reports that it is alive (the reaper's heartbeat).
HEARTBEAT_SECONDS = 2.0


def _tail(stream) -> str:
    stream.seek(0, os.SEEK_END)
    size = stream.tell()
    stream.seek(max(0, size - OUTPUT_KEEP_BYTES))
    text = stream.read().decode("utf-8", errors="replace")
    if size > OUTPUT_KEEP_BYTES:
        return f"[... the first {size - OUTPUT_KEEP_BYTES} bytes are not kept ...]\n{text}"
    return text


def _kill(proc: subprocess.Popen) -> None:
    """Kill the script and everything it started (it runs in its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def script_run(*, command: str, timeout: float, env: dict[str, str] | None = None,
               alive: Callable[[], None] | None = None) -> dict:
    """Run ``command`` with ``/bin/sh -c``; kill it (and its children) after ``timeout`` seconds.

    ``alive`` is called every few seconds while it runs (a job's heartbeat; it may raise to
    stop the script). Returns ``exit_code`` (None when killed), ``timed_out``, ``stdout``,
    ``stderr`` (their last ``OUTPUT_KEEP_BYTES`` each) and ``seconds``.
    """
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        timed_out = False
        try:
            while True:
                left = timeout - (time.monotonic() - started)
                if left <= 0:
                    timed_out = True
                    _kill(proc)
                    break
                try:
                    proc.wait(timeout=min(HEARTBEAT_SECONDS, left))
                    break
                except subprocess.TimeoutExpired:
                    if alive is not None:
                        alive()
        except BaseException:
            _kill(proc)
            raise
        return {
            "exit_code": None if timed_out else proc.returncode,
            "timed_out": timed_out,
            "stdout": _tail(out),
            "stderr": _tail(err),
            "seconds": round(time.monotonic() - started, 2),
        }
