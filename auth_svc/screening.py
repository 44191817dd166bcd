"""Password screening: a new password is refused when it is common or known to be breached.

Two checks, in order:
- the 20,000 most common passwords, bundled (`data/common-passwords.txt.gz`, from Django's
  CommonPasswordValidator; provenance and licence in `data/README.md`), compared
  case-insensitively;
- optionally (`AUTH_HIBP_ENABLED`), Have I Been Pwned's range API with k-anonymity: only the
  first 5 hex characters of the password's SHA-1 leave the service; the suffixes that come
  back are compared here. Bounded by a timeout; on failure the setting decides (open: accept,
  closed: 503).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from functools import cache
from importlib import resources

import httpx

from auth_svc.domain import AuthError
from auth_svc.settings import AuthSettings

log = logging.getLogger("auth_svc.screening")


class PasswordTooCommon(AuthError):
    def __init__(self) -> None:
        super().__init__(
            "This password is too common (or known from a breach): choose another one."
        )


class ScreeningUnavailable(AuthError):
    def __init__(self) -> None:
        super().__init__(
            "Passwords cannot be checked against known breaches right now: try again later."
        )


@cache
def common_passwords() -> frozenset[str]:
    raw = resources.files("auth_svc").joinpath("data/common-passwords.txt.gz").read_bytes()
    return frozenset(line.strip() for line in gzip.decompress(raw).decode().splitlines())


def is_common(password: str) -> bool:
    return password.lower().strip() in common_passwords()


class PasswordScreen:
    """Raises PasswordTooCommon for a refused password. Sync: called in the thread pool."""

    def __init__(self, settings: AuthSettings, client: httpx.Client | None = None) -> None:
        self.settings = settings
        self._client = client

    def check(self, password: str) -> None:
        if is_common(password):
            raise PasswordTooCommon
        if self.settings.hibp_enabled and self._breached(password):
            raise PasswordTooCommon

    def _breached(self, password: str) -> bool:
        digest = hashlib.sha1(password.encode(), usedforsecurity=False).hexdigest().upper()
        prefix, suffix = digest[:5], digest[5:]
        try:
            client = self._client or httpx.Client()
            try:
                response = client.get(
                    self.settings.hibp_url.rstrip("/") + "/" + prefix,
                    headers={"Add-Padding": "true"},
                    timeout=self.settings.hibp_timeout_seconds,
                )
                response.raise_for_status()
            finally:
                if self._client is None:
                    client.close()
        except httpx.HTTPError as exc:
            log.warning(
                "HIBP range check failed",
                extra={"error": type(exc).__name__, "fail_open": self.settings.hibp_fail_open},
            )
            if self.settings.hibp_fail_open:
                return False
            raise ScreeningUnavailable from None
        for line in response.text.splitlines():
            candidate, _, count = line.strip().partition(":")
            if candidate.upper() == suffix and count.strip() not in ("", "0"):
                return True  # padding entries have a count of 0
        return False
