"""Personal API tokens: made, listed and revoked in the portal and the API; only a hash is
kept; expired and revoked tokens are refused with a sentence; nobody sees another's tokens."""
from __future__ import annotations

import hashlib
import re
from datetime import timedelta

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from core.models import ApiToken
from core.tokens import token_create

pytestmark = pytest.mark.django_db

VAULTS = "/api/v1/vaults/"
TOKENS = "/api/v1/apiTokens/"


def bearer(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def stored_columns(token_id: int) -> str:
    """Every column of the token's row, as the database holds it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM core_apitoken WHERE id = %s", [token_id])
        return " ".join(str(v) for v in cursor.fetchone())


def test_api_create_list_use_and_revoke(admin_user):
    owner = APIClient()
    owner.force_authenticate(admin_user)
    expires = (timezone.now() + timedelta(days=30)).replace(microsecond=0)
    created = owner.post(TOKENS, {"name": "nightly report", "expires_at": expires.isoformat()}, format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    secret = body["secret"]
    assert secret.startswith("lbt_") and len(secret) >= 40
    assert body["name"] == "nightly report" and body["state"] == "active" and body["last_used_at"] is None
    assert secret.startswith(body["prefix"])

    # Stored hashed: the row holds the SHA-256 and a short prefix, never the secret.
    row = ApiToken.objects.get(pk=body["id"])
    assert row.digest == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in stored_columns(row.pk)
    assert len(row.prefix) < len(secret) / 3

    # Shown once: neither the list nor the detail carries it again.
    listed = owner.get(TOKENS).json()
    assert [t["name"] for t in listed["results"]] == ["nightly report"]
    assert "secret" not in listed["results"][0] and secret not in owner.get(TOKENS).content.decode()
    assert "secret" not in owner.get(f"{TOKENS}{row.pk}/").json()

    # The token works, as a Bearer and as a Token header, and records its use.
    client = bearer(secret)
    assert client.get(VAULTS).status_code == 200
    other_header = APIClient()
    other_header.credentials(HTTP_AUTHORIZATION=f"Token {secret}")
    assert other_header.get(VAULTS).status_code == 200
    row.refresh_from_db()
    assert row.last_used_at is not None

    # Revoked: refused at once with a sentence, still listed as revoked.
    assert owner.delete(f"{TOKENS}{row.pk}/").status_code == 204
    refused = client.get(VAULTS)
    assert refused.status_code == 401
    assert "was revoked on" in refused.json()["error"]["message"]
    assert owner.get(f"{TOKENS}{row.pk}/").json()["state"] == "revoked"


def test_expired_token_refused_with_a_sentence(admin_user):
    token, secret = token_create(user=admin_user, name="short-lived", expires_at=timezone.now() + timedelta(hours=1))
    client = bearer(secret)
    assert client.get(VAULTS).status_code == 200
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    refused = client.get(VAULTS)
    assert refused.status_code == 401
    assert "expired on" in refused.json()["error"]["message"]
    assert APIClient().get(VAULTS).status_code == 401
    token.refresh_from_db()
    assert token.state == "expired"


def test_unknown_or_disabled_user_token_refused(admin_user, viewer_user):
    refused = bearer("lbt_" + "x" * 43).get(VAULTS)
    assert refused.status_code == 401 and "not known" in refused.json()["error"]["message"]
    _, secret = token_create(user=viewer_user, name="ci")
    viewer_user.is_active = False
    viewer_user.save()
    refused = bearer(secret).get(VAULTS)
    assert refused.status_code == 401 and "disabled" in refused.json()["error"]["message"]


def test_last_used_written_at_most_once_a_minute(admin_user):
    token, secret = token_create(user=admin_user, name="poller")
    client = bearer(secret)
    assert client.get(VAULTS).status_code == 200
    token.refresh_from_db()
    first = token.last_used_at
    assert first is not None
    assert client.get(VAULTS).status_code == 200
    token.refresh_from_db()
    assert token.last_used_at == first  # within the minute: not written again
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=first - timedelta(seconds=61))
    assert client.get(VAULTS).status_code == 200
    token.refresh_from_db()
    assert token.last_used_at > first - timedelta(seconds=61)


def test_another_users_tokens_are_invisible(admin_user, viewer_user):
    theirs, their_secret = token_create(user=admin_user, name="admin automation")
    _, mine = token_create(user=viewer_user, name="viewer script")
    client = bearer(mine)
    assert [t["name"] for t in client.get(TOKENS).json()["results"]] == ["viewer script"]
    assert client.get(f"{TOKENS}{theirs.pk}/").status_code == 404
    assert client.delete(f"{TOKENS}{theirs.pk}/").status_code == 404
    assert bearer(their_secret).get(VAULTS).status_code == 200  # untouched
    assert client.delete(f"{TOKENS}9223372036854775808/").status_code == 404


@pytest.mark.parametrize(
    "body, sentence",
    [
        ({"name": ""}, "name"),
        ({"name": "two\r\nlines"}, "line breaks"),
        ({"name": "past", "expires_at": "2001-01-01T00:00:00Z"}, "in the future"),
        ({"name": "x" * 101}, "name"),
    ],
)
def test_bad_token_requests_are_400_and_change_nothing(admin_user, body, sentence):
    owner = APIClient()
    owner.force_authenticate(admin_user)
    answer = owner.post(TOKENS, body, format="json")
    assert answer.status_code == 400
    assert sentence in answer.content.decode()
    assert not ApiToken.objects.exists()


def test_admin_site_drf_tokens_keep_working(admin_user):
    legacy = Token.objects.create(user=admin_user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {legacy.key}")
    assert client.get(VAULTS).status_code == 200


def test_portal_create_shows_secret_once_then_revoke(client, admin_user, viewer_user):
    token_create(user=admin_user, name="someone else's")
    client.force_login(viewer_user)
    url = reverse("portal:tokens")
    page = client.get(url)
    assert page.status_code == 200 and "No token yet." in page.content.decode()
    assert "someone else" not in page.content.decode()

    created = client.post(url, {"name": "laptop script", "expires_in_days": "30"})
    assert created.status_code == 200
    assert created["Cache-Control"] == "no-store"
    html = created.content.decode()
    secret = re.search(r'value="(lbt_[A-Za-z0-9_-]+)"', html).group(1)
    token = ApiToken.objects.get(user=viewer_user)
    assert token.name == "laptop script"
    assert timedelta(days=29) < token.expires_at - timezone.now() <= timedelta(days=30)
    assert secret not in stored_columns(token.pk)

    again = client.get(url).content.decode()
    assert "laptop script" in again and secret not in again and token.prefix in again
    assert bearer(secret).get(VAULTS).status_code == 200

    revoked = client.post(reverse("portal:token-revoke", args=[token.pk]), follow=True)
    assert "revoked" in revoked.content.decode()
    assert bearer(secret).get(VAULTS).status_code == 401
    # Another user's token cannot be revoked from here.
    other = ApiToken.objects.get(user=admin_user)
    client.post(reverse("portal:token-revoke", args=[other.pk]))
    other.refresh_from_db()
    assert other.revoked_at is None


def test_portal_bad_name_is_refused(client, viewer_user):
    client.force_login(viewer_user)
    answer = client.post(reverse("portal:tokens"), {"name": "a\nb"})
    assert answer.status_code == 400
    assert "line breaks" in answer.content.decode()
    assert not ApiToken.objects.exists()
