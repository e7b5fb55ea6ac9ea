"""Process servers as the vault sees them: their configuration file."""
from __future__ import annotations

import os

from django.conf import settings

from replication.tokens import item_token_generations, process_server_token
from vault.models import ProcessServer
from vault.services import encode_key, vault_keys


def process_server_config(*, server: ProcessServer, cache_dir: str | None = None) -> dict:
    """What ``python -m replication.dataplane.process_server --config FILE`` reads."""
    seal_key, auth_key = vault_keys(vault=server.vault)
    return {
        "listen": f"{server.host}:{server.data_port}",
        "cache_dir": cache_dir or os.path.join(str(settings.DATA_DIR), "process-servers", server.name, "cache"),
        "auth_key": encode_key(auth_key),
        "seal_key": encode_key(seal_key),
        "storage": settings.LIFEBOAT_STORAGE,
        "report_url": f"{settings.LIFEBOAT_CONFIG_URL.rstrip('/')}/api/v1/processServers/{server.pk}/heartbeat",
        # New logs in storage are applied at once (replication/engine.py, "Passes on upload").
        "uploaded_url": f"{settings.LIFEBOAT_CONFIG_URL.rstrip('/')}/api/v1/processServers/{server.pk}/uploaded",
        "report_token": process_server_token(server=server),
        # Revoked item tokens are refused from the first start (the heartbeat keeps this current).
        "token_generations": item_token_generations(vault=server.vault),
    }
