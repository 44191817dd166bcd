"""Password hashing with argon2id; parameters come from settings (cheap in tests)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from auth_svc.settings import AuthSettings


@dataclass(frozen=True)
class PasswordCheck:
    matches: bool
    needs_rehash: bool = False


class Passwords:
    """Hashes and verifies passwords. Verifying for an unknown account costs the same as a
    wrong password (a dummy hash is verified), so timing does not reveal which e-mails exist.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self._hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
            type=Type.ID,
        )
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, password_hash: str | None, password: str) -> PasswordCheck:
        """Whether `password` matches; an erased hash (None) never does, in the same time."""
        if password_hash is None:
            self.verify_nothing(password)
            return PasswordCheck(matches=False)
        try:
            self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return PasswordCheck(matches=False)
        return PasswordCheck(
            matches=True, needs_rehash=self._hasher.check_needs_rehash(password_hash)
        )

    def verify_nothing(self, password: str) -> None:
        """Spend the time of a verification for an e-mail that has no account."""
        self.verify(self._dummy_hash, password)
