"""Azurite, the Azure Storage emulator, as the real Azure peer of the data-plane tests.

Import the fixtures into a test module (``from azurite import azurite, storage``):

* ``azurite`` (session): starts ``node_modules/.bin/azurite-blob`` on a free port of
  127.0.0.1 with its data in a temporary directory, waits until it answers HTTP, yields a
  connection string for Azurite's well-known development account, and stops it at the end.
  When it is missing or does not start: outside CI the tests that need it are skipped with
  the reason; with ``CI=true`` they fail, so a CI run can never pass without Azure coverage.
* ``storage`` (per test, parametrized ``local`` / ``azure``): an empty ``Storage`` of each
  backend (the Azure one in a fresh container), so one contract test runs against both.
"""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from replication.dataplane.storage import Storage, open_storage

REPO = Path(__file__).resolve().parents[2]
# node_modules/.bin/azurite-blob (`npm install` in the repository), unless AZURITE_BLOB_BIN
# names another one.
AZURITE_BLOB = Path(os.environ.get("AZURITE_BLOB_BIN") or REPO / "node_modules" / ".bin" / "azurite-blob")
ACCOUNT = "devstoreaccount1"
# Azurite's published development account key (the same for every Azurite install).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
START_TIMEOUT_S = 30.0


def connection_string(port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    )


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"Azurite is required when CI=true but {reason}", pytrace=False)
    pytest.skip(f"Azurite unavailable: {reason}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", f"/{ACCOUNT}?comp=list")
        conn.getresponse().read()
        return True  # any HTTP answer means the server is up
    except OSError:
        return False
    finally:
        conn.close()


def _stop(proc: subprocess.Popen) -> None:
    # Azurite closes its server on SIGTERM but its node process can linger for a long time
    # afterwards; its data is throw-away, so a short grace period then SIGKILL.
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not AZURITE_BLOB.exists():
        _unavailable(f"{AZURITE_BLOB} is missing (run `npm install` in {REPO})")
    last_log = ""
    for _attempt in range(3):
        port = _free_port()
        location = tmp_path_factory.mktemp("azurite")
        log_path = location / "azurite.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    str(AZURITE_BLOB), "--blobHost", "127.0.0.1", "--blobPort", str(port),
                    "--location", str(location), "--silent", "--skipApiVersionCheck", "--loose",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline and not _answers(port):
            time.sleep(0.1)
        if proc.poll() is None and _answers(port):
            try:
                yield connection_string(port)
            finally:
                _stop(proc)
            return
        exited = proc.poll()
        _stop(proc)
        last_log = log_path.read_text(errors="replace")[-2000:]
        if "EADDRINUSE" not in last_log:  # only a lost port race is worth another try
            break
    what = (
        f"exited with code {exited}" if exited is not None
        else f"did not answer on 127.0.0.1:{port} within {START_TIMEOUT_S:.0f} s"
    )
    _unavailable(f"{AZURITE_BLOB} {what}; its output ends with:\n{last_log or '(nothing)'}")


@pytest.fixture(params=["local", pytest.param("azure", marks=pytest.mark.peer)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        s = open_storage({"kind": "local", "root": str(tmp_path / "storage")})
    else:
        cs = request.getfixturevalue("azurite")
        s = open_storage({"kind": "azure", "connection_string": cs, "container": f"t{uuid.uuid4().hex[:24]}"})
    try:
        yield s
    finally:
        s.close()


def storage_config(s: Storage) -> dict:
    """The ``open_storage`` config of a storage from the ``storage`` fixture, so that a
    subprocess can open the same one."""
    from replication.dataplane.storage.azure import AzureStorage
    from replication.dataplane.storage.local import LocalStorage

    if isinstance(s, LocalStorage):
        return {"kind": "local", "root": s.root, "chunk_bytes": s.chunk_bytes}
    if isinstance(s, AzureStorage):
        return {"kind": "azure", "connection_string": s.connection_string, "container": s.container_name}
    raise TypeError(f"unknown storage {s!r}")
