"""The agent's small JSON files (settings, credentials, the cached assignment, requests),
written durably: after a crash a file holds its old content or its new one."""
from __future__ import annotations

import json
from typing import Any

from mobility.durable import replace_durably


def write_json(path: str, value: Any, *, mode: int = 0o600) -> None:
    replace_durably(path, json.dumps(value, sort_keys=True).encode(), mode=mode)


def read_json(path: str, default: Any = None) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default
