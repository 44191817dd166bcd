"""Sealed boxes: a secret sealed to a recipient's X25519 public key, opened only with its
private key (ECIES: ephemeral X25519, HKDF-SHA256, ChaCha20-Poly1305, from `cryptography`).

auth_svc seals verification and reset links to notify_svc's public key, so a link crosses
the bus, `events.history` and every store but notify_svc's as ciphertext. A sealed value is
`v1.<key id>.<ephemeral public key + ciphertext>` (base64url): the key id (8 bytes of the
recipient key's SHA-256) lets the recipient keep old keys until their last link expires.

`python -m servicekit.sealing` prints a new key pair for the settings.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_VERSION = "v1"
_INFO = b"eskit sealed box v1"
_NONCE = bytes(12)  # every box has a fresh ephemeral key, hence a fresh AEAD key
_RAW = serialization.Encoding.Raw


class SealingError(ValueError):
    """A key or a sealed value that cannot be used."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise SealingError("not base64url") from None


def _public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(_RAW, serialization.PublicFormat.Raw)


def key_id(public: bytes) -> str:
    return _b64(hashlib.sha256(public).digest()[:8])


def _aead(shared: bytes, ephemeral: bytes, recipient: bytes) -> ChaCha20Poly1305:
    key = HKDF(hashes.SHA256(), 32, salt=None, info=_INFO + ephemeral + recipient).derive(shared)
    return ChaCha20Poly1305(key)


def public_key_from(text: str) -> bytes:
    raw = _unb64(text.strip())
    if len(raw) != 32:
        raise SealingError("an X25519 public key is 32 bytes (base64url)")
    return raw


def seal(public_key: str, plaintext: str) -> str:
    """`plaintext` sealed to the base64url X25519 `public_key`."""
    recipient = public_key_from(public_key)
    ephemeral = X25519PrivateKey.generate()
    eph_public = _public_bytes(ephemeral.public_key())
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    box = _aead(shared, eph_public, recipient).encrypt(_NONCE, plaintext.encode(), None)
    return f"{_VERSION}.{key_id(recipient)}.{_b64(eph_public + box)}"


class Opener:
    """Opens boxes sealed to any of its private keys (newest first, older ones kept for
    links sealed before a rotation)."""

    def __init__(self, private_keys: Iterable[str]) -> None:
        self._keys: dict[str, tuple[X25519PrivateKey, bytes]] = {}
        for text in private_keys:
            raw = _unb64(text.strip())
            if len(raw) != 32:
                raise SealingError("an X25519 private key is 32 bytes (base64url)")
            private = X25519PrivateKey.from_private_bytes(raw)
            public = _public_bytes(private.public_key())
            self._keys[key_id(public)] = (private, public)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def open(self, sealed: str) -> str:
        try:
            version, kid, body = sealed.split(".")
        except ValueError:
            raise SealingError("not a sealed value") from None
        if version != _VERSION:
            raise SealingError(f"unknown sealed-box version {version!r}")
        if kid not in self._keys:
            raise SealingError("sealed to a key this service does not hold")
        private, public = self._keys[kid]
        raw = _unb64(body)
        eph_public, box = raw[:32], raw[32:]
        try:
            shared = private.exchange(X25519PublicKey.from_public_bytes(eph_public))
            return _aead(shared, eph_public, public).decrypt(_NONCE, box, None).decode()
        except (InvalidTag, ValueError):
            raise SealingError("the sealed value does not open") from None


def new_key_pair() -> tuple[str, str]:
    """(private, public), base64url: the private key for notify_svc, the public for auth_svc."""
    private = X25519PrivateKey.from_private_bytes(secrets.token_bytes(32))
    raw = private.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return _b64(raw), _b64(_public_bytes(private.public_key()))


if __name__ == "__main__":
    private_key, public_key = new_key_pair()
    print(f"NOTIFY_LINK_OPENING_KEYS={private_key}")
    print(f"AUTH_LINK_SEALING_PUBLIC_KEY={public_key}")
