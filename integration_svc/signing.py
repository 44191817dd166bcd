"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

The secret is `whsec_` + base64 of the key bytes. Each attempt is signed anew:
`webhook-signature: v1,` + base64(HMAC-SHA256(key, f"{webhook-id}.{webhook-timestamp}.{body}")).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

PREFIX = "whsec_"


class InvalidSecret(ValueError):
    pass


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    """The key bytes of a `whsec_...` secret."""
    if not secret.startswith(PREFIX):
        raise InvalidSecret("a webhook secret must look like whsec_<base64>")
    try:
        key = base64.b64decode(secret[len(PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSecret("a webhook secret must look like whsec_<base64>") from None
    if not 24 <= len(key) <= 64:
        raise InvalidSecret("a webhook secret's key must be 24 to 64 bytes")
    return key


def mask(secret: str) -> str:
    """What may be shown of a secret: its prefix and four characters."""
    return secret[: len(PREFIX) + 4] + "…"


def headers(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": f"v1,{signature}",
    }
