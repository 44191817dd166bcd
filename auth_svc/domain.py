"""Accounts and e-mail registrations: aggregates and their events. No I/O.

Time is passed in (`now`) and becomes the event's timestamp, so the rules can be tested
without a clock. Password hashing and token generation happen outside; the domain only sees
hashes (the account's argon2 hash, sha256 hashes of refresh tokens).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import math
import uuid
from datetime import datetime, timedelta
from typing import Any, Literal

from servicekit.eventstore import TracedAggregate

# Registrations stored before ids were keyed: uuid5 of the address in this namespace.
EMAIL_NAMESPACE = uuid.UUID("0b7d0f38-54a4-4f6b-9a3c-8d1e2f3a4b5c")

# Bounds on what one account remembers, so that its state (and snapshots) stay small.
MAX_REFRESH_FAMILIES = 50  # oldest sessions are dropped beyond this
MAX_SPENT_PER_FAMILY = 100  # older spent tokens are forgotten (then just "unknown")

# Why a session (refresh-token family) ended; `auth.session.revoked` carries it.
RevocationReason = Literal[
    "reuse",
    "logout",
    "ended",
    "logout_all",
    "password_changed",
    "password_reset",
    "account_deleted",
]
USER_AGENT_MAX = 256


def normalise_email(email: str) -> str:
    return email.strip().lower()


def registration_id(email: str, key: bytes) -> uuid.UUID:
    """The id of the address's EmailRegistration: an HMAC-SHA256 of the normalised address
    under the service's secret, so nobody without the secret can tell from an id (in the
    store, a log, a dump) which address it stands for. A UUID of version 8 (RFC 9562)."""
    digest = hmac.new(key, normalise_email(email).encode(), hashlib.sha256).digest()
    n = int.from_bytes(digest[:16], "big")
    n = (n & ~(0xF << 76)) | (0x8 << 76)  # version 8
    n = (n & ~(0x3 << 62)) | (0x2 << 62)  # the RFC 9562 variant
    return uuid.UUID(int=n)


def legacy_registration_id(email: str) -> uuid.UUID:
    """The id registrations had before ids were keyed (a plain uuid5 of the address): still
    looked up, so the accounts registered then keep logging in."""
    return uuid.uuid5(EMAIL_NAMESPACE, normalise_email(email))


# --- domain errors ----------------------------------------------------------------------


class AuthError(Exception):
    """A command the rules refuse. Translated to problem+json at the HTTP edge."""


class EmailAlreadyRegistered(AuthError):
    def __init__(self) -> None:
        super().__init__("This e-mail address is already registered.")


class InvalidCredentials(AuthError):
    """Unknown e-mail or wrong password: deliberately indistinguishable."""

    def __init__(self) -> None:
        super().__init__("The e-mail address or password is wrong.")


class WrongPassword(AuthError):
    def __init__(self) -> None:
        super().__init__("The current password is wrong.")


class AccountIsLocked(AuthError):
    def __init__(self, until: datetime, now: datetime) -> None:
        super().__init__("Too many failed logins: the account is locked for a while.")
        self.until = until
        self.retry_after_seconds = max(1, math.ceil((until - now).total_seconds()))


class InvalidRefreshToken(AuthError):
    """Unknown, expired, malformed or revoked refresh token."""

    def __init__(self) -> None:
        super().__init__("The refresh token is invalid or has expired.")


class RefreshTokenReused(InvalidRefreshToken):
    """A spent refresh token came back: its whole family was revoked."""


class InvalidLinkToken(AuthError):
    """An unknown, expired, spent, tampered or wrong-purpose verification or reset token:
    one answer for all, and nothing changes."""

    def __init__(self) -> None:
        super().__init__("The link is invalid or has expired.")


class EmailNotVerified(AuthError):
    def __init__(self) -> None:
        super().__init__(
            "The e-mail address of this account is not verified yet: follow the link in the "
            "welcome mail, or ask for a new one."
        )


class EmailAlreadyVerified(AuthError):
    def __init__(self) -> None:
        super().__init__("The e-mail address of this account is already verified.")


class SessionNotFound(AuthError):
    def __init__(self) -> None:
        super().__init__("The caller has no session with this id.")


class ErasureUnavailable(AuthError):
    """No personal data key is configured: a deletion could not erase anything."""

    def __init__(self) -> None:
        super().__init__(
            "Accounts cannot be deleted here: no personal data key is configured "
            "(AUTH_PERSONAL_DATA_KEY), so the stored personal data could not be erased."
        )


class AccountDeleted(AuthError):
    """The account was deleted: it refuses every command. Where an unknown account would be
    refused (login, refresh, a link), the application answers as for one."""

    def __init__(self) -> None:
        super().__init__("This account has been deleted.")


def _check_link_token(expected: dict[str, Any] | None, presented_hash: str, now: datetime) -> None:
    if expected is None or not hmac.compare_digest(presented_hash, expected["hash"]):
        raise InvalidLinkToken
    if expected["expires_at"] <= now:
        raise InvalidLinkToken


# --- aggregates ---------------------------------------------------------------------------


class Account(TracedAggregate):
    """A user's credentials, login attempts and refresh-token families.

    A family is one login session: each refresh spends the current token and issues the
    next one. `refresh_families[family_id]` holds the current token's hash and expiry and
    the hashes already spent, so presenting a spent token is recognised as theft. A family
    is also what the user sees as a session (`sid` in its access tokens).

    Verification and reset tokens are kept as sha256 hashes with their expiry (one of each
    at a time: a new request replaces the old one); their links travel only sealed.

    A deleted account (`Deleted`) refuses every command; its personal fields are erased
    afterwards by destroying the person's key (servicekit.shredding), not by an event.
    """

    class_version = 3  # v2: e-mail verification, password reset and sessions; v3: deletion

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["email_verified"] = False
        state["verification"] = None
        state["reset"] = None

    @staticmethod
    def upcast_v2_v3(state: dict[str, Any]) -> None:
        state["deleted"] = False

    class Registered(TracedAggregate.Created):
        """v2 records the first verification token's hash and its sealed link."""

        class_version = 2

        email: str
        password_hash: str
        display_name: str | None
        verification_hash: str | None
        verification_expires_at: datetime | None
        verification_link_sealed: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["verification_hash"] = None
            state["verification_expires_at"] = None
            state["verification_link_sealed"] = None

        def apply(self, aggregate: Account) -> None:
            aggregate.email = self.email
            aggregate.password_hash = self.password_hash
            aggregate.display_name = self.display_name
            if self.verification_hash and self.verification_expires_at:
                aggregate.verification = {
                    "hash": self.verification_hash,
                    "expires_at": self.verification_expires_at,
                }

    class LoginSucceeded(TracedAggregate.Event):
        """v2 records where the session was opened from (user agent, client IP)."""

        class_version = 2

        family_id: uuid.UUID
        refresh_token_hash: str
        refresh_expires_at: datetime
        user_agent: str | None
        client_ip: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["user_agent"] = None
            state["client_ip"] = None

        def apply(self, aggregate: Account) -> None:
            aggregate.failed_logins = 0
            aggregate.locked_until = None
            aggregate.forget_expired_families(self.timestamp)
            aggregate.refresh_families[str(self.family_id)] = {
                "current": self.refresh_token_hash,
                "expires_at": self.refresh_expires_at,
                "spent": [],
                "created_at": self.timestamp,
                "last_used_at": self.timestamp,
                "user_agent": self.user_agent,
                "client_ip": self.client_ip,
            }
            while len(aggregate.refresh_families) > MAX_REFRESH_FAMILIES:
                oldest = min(
                    aggregate.refresh_families,
                    key=lambda f: aggregate.refresh_families[f]["expires_at"],
                )
                del aggregate.refresh_families[oldest]

    class LoginFailed(TracedAggregate.Event):
        consecutive_failures: int

        def apply(self, aggregate: Account) -> None:
            aggregate.failed_logins = self.consecutive_failures

    class Locked(TracedAggregate.Event):
        """v2 records the lockout it applied (`lockout_seconds`): the setting may change
        between deploys, and the event keeps the one in force when the lock was set."""

        class_version = 2

        locked_until: datetime
        failed_attempts: int
        lockout_seconds: int

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            # v1 set `locked_until` to its own timestamp plus the lockout, so it is exact.
            lockout = state["locked_until"] - state["timestamp"]
            state["lockout_seconds"] = round(lockout.total_seconds())

        def apply(self, aggregate: Account) -> None:
            aggregate.locked_until = self.locked_until
            aggregate.failed_logins = 0  # counting starts again once the lock expires

    class PasswordChanged(TracedAggregate.Event):
        password_hash: str

        def apply(self, aggregate: Account) -> None:
            aggregate.password_hash = self.password_hash
            aggregate.refresh_families.clear()

    class PasswordRehashed(TracedAggregate.Event):
        """Same password, stronger hash parameters (private)."""

        password_hash: str

        def apply(self, aggregate: Account) -> None:
            aggregate.password_hash = self.password_hash

    class RefreshTokenRotated(TracedAggregate.Event):
        family_id: uuid.UUID
        spent_hash: str
        refresh_token_hash: str
        refresh_expires_at: datetime

        def apply(self, aggregate: Account) -> None:
            family = aggregate.refresh_families[str(self.family_id)]
            family["spent"] = [*family["spent"], self.spent_hash][-MAX_SPENT_PER_FAMILY:]
            family["current"] = self.refresh_token_hash
            family["expires_at"] = self.refresh_expires_at
            family["last_used_at"] = self.timestamp
            aggregate.forget_expired_families(self.timestamp)

    class RefreshFamilyRevoked(TracedAggregate.Event):
        family_id: uuid.UUID
        reason: str  # RevocationReason

        def apply(self, aggregate: Account) -> None:
            aggregate.refresh_families.pop(str(self.family_id), None)

    class EmailVerificationRequested(TracedAggregate.Event):
        """A new link (resend): its token's hash replaces the previous one."""

        token_hash: str
        expires_at: datetime
        link_sealed: str | None

        def apply(self, aggregate: Account) -> None:
            aggregate.verification = {"hash": self.token_hash, "expires_at": self.expires_at}

    class EmailVerified(TracedAggregate.Event):
        email: str  # the address confirmed

        def apply(self, aggregate: Account) -> None:
            aggregate.email_verified = True
            aggregate.verification = None

    class PasswordResetRequested(TracedAggregate.Event):
        token_hash: str
        expires_at: datetime
        link_sealed: str | None

        def apply(self, aggregate: Account) -> None:
            aggregate.reset = {"hash": self.token_hash, "expires_at": self.expires_at}

    class PasswordReset(TracedAggregate.Event):
        """The reset token is spent, every session was revoked, any lock is lifted."""

        password_hash: str

        def apply(self, aggregate: Account) -> None:
            aggregate.password_hash = self.password_hash
            aggregate.reset = None
            aggregate.refresh_families.clear()
            aggregate.failed_logins = 0
            aggregate.locked_until = None

    class Deleted(TracedAggregate.Event):
        """Deleted at its owner's request. It carries no personal data; every session was
        revoked just before it (`RefreshFamilyRevoked`, reason `account_deleted`)."""

        def apply(self, aggregate: Account) -> None:
            aggregate.deleted = True
            aggregate.refresh_families.clear()
            aggregate.verification = None
            aggregate.reset = None
            aggregate.failed_logins = 0
            aggregate.locked_until = None

    def __init__(self) -> None:
        self.email = ""
        # None once erased (auth_svc/personal.py): an erased account has no password.
        self.password_hash: str | None = ""
        self.display_name: str | None = None
        self.failed_logins = 0
        self.locked_until: datetime | None = None
        # family id (str) -> {"current": hash, "expires_at": datetime, "spent": [hash, ...],
        # "created_at", "last_used_at", "user_agent", "client_ip"}
        self.refresh_families: dict[str, dict[str, Any]] = {}
        self.email_verified = False
        self.verification: dict[str, Any] | None = None  # {"hash", "expires_at"}
        self.reset: dict[str, Any] | None = None  # {"hash", "expires_at"}
        self.deleted = False

    def __deepcopy__(self, memo: dict[int, Any]) -> Account:
        """The copy a command works on (the repository copies its cached account for each).

        `copy.deepcopy` walks every session's dict, list and datetime: with 50 sessions that
        was a third of a login's CPU outside argon2. A session's values are immutable (str,
        datetime, None) or its `spent` list, which events replace and never change in place;
        so a new dict per session is as independent as a deep copy. The rest is deep-copied.
        """
        clone: Account = object.__new__(type(self))
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            if name == "refresh_families":
                clone.__dict__[name] = {f: dict(family) for f, family in value.items()}
            else:
                clone.__dict__[name] = copy.deepcopy(value, memo)
        return clone

    @classmethod
    def register(
        cls,
        *,
        email: str,
        password_hash: str,
        display_name: str | None,
        now: datetime,
        account_id: uuid.UUID | None = None,
        verification_hash: str | None = None,
        verification_expires_at: datetime | None = None,
        verification_link_sealed: str | None = None,
    ) -> Account:
        account: Account = cls._create(
            cls.Registered,
            id=account_id or uuid.uuid4(),
            timestamp=now,
            email=normalise_email(email),
            password_hash=password_hash,
            display_name=display_name,
            verification_hash=verification_hash,
            verification_expires_at=verification_expires_at,
            verification_link_sealed=verification_link_sealed,
        )
        return account

    # --- queries --------------------------------------------------------------------------

    def is_locked(self, now: datetime) -> bool:
        return self.locked_until is not None and now < self.locked_until

    def has_refresh_family(self, family_id: uuid.UUID) -> bool:
        return str(family_id) in self.refresh_families

    def _refuse_if_deleted(self, refusal: type[AuthError] = AccountDeleted) -> None:
        if self.deleted:
            raise refusal

    # --- deletion ---------------------------------------------------------------------------

    def delete(self, *, now: datetime) -> None:
        """The caller has checked the password. Every session ends, then the account."""
        self._refuse_if_deleted()
        self.end_every_session(reason="account_deleted", now=now)
        self.trigger_event(self.Deleted, timestamp=now)

    # --- login ------------------------------------------------------------------------------

    def ensure_can_log_in(self, now: datetime) -> None:
        """While locked, a login is refused before the password is even looked at."""
        self._refuse_if_deleted()
        if self.locked_until is not None and now < self.locked_until:
            raise AccountIsLocked(self.locked_until, now)

    def record_failed_login(self, *, now: datetime, threshold: int, lockout_seconds: int) -> None:
        self.ensure_can_log_in(now)
        failures = self.failed_logins + 1
        self.trigger_event(self.LoginFailed, timestamp=now, consecutive_failures=failures)
        if failures >= threshold:
            self.trigger_event(
                self.Locked,
                timestamp=now,
                locked_until=now + timedelta(seconds=lockout_seconds),
                failed_attempts=failures,
                lockout_seconds=lockout_seconds,
            )

    def record_login(
        self,
        *,
        family_id: uuid.UUID,
        refresh_token_hash: str,
        refresh_expires_at: datetime,
        now: datetime,
        user_agent: str | None = None,
        client_ip: str | None = None,
    ) -> None:
        self.ensure_can_log_in(now)
        self.trigger_event(
            self.LoginSucceeded,
            timestamp=now,
            family_id=family_id,
            refresh_token_hash=refresh_token_hash,
            refresh_expires_at=refresh_expires_at,
            user_agent=user_agent[:USER_AGENT_MAX] if user_agent else None,
            client_ip=client_ip,
        )

    def rehash_password(self, password_hash: str, *, now: datetime) -> None:
        self._refuse_if_deleted()
        self.trigger_event(self.PasswordRehashed, timestamp=now, password_hash=password_hash)

    def change_password(self, password_hash: str, *, now: datetime) -> None:
        """The caller has checked the current password. Every refresh token is revoked."""
        self._refuse_if_deleted()
        self.end_every_session(reason="password_changed", now=now)
        self.trigger_event(self.PasswordChanged, timestamp=now, password_hash=password_hash)

    # --- e-mail verification and password reset --------------------------------------------

    def request_verification(
        self, *, token_hash: str, expires_at: datetime, link_sealed: str | None, now: datetime
    ) -> None:
        self._refuse_if_deleted()
        if self.email_verified:
            raise EmailAlreadyVerified
        self.trigger_event(
            self.EmailVerificationRequested,
            timestamp=now,
            token_hash=token_hash,
            expires_at=expires_at,
            link_sealed=link_sealed,
        )

    def verify_email(self, presented_hash: str, *, now: datetime) -> None:
        self._refuse_if_deleted(InvalidLinkToken)
        _check_link_token(self.verification, presented_hash, now)
        self.trigger_event(self.EmailVerified, timestamp=now, email=self.email)

    def request_password_reset(
        self, *, token_hash: str, expires_at: datetime, link_sealed: str | None, now: datetime
    ) -> None:
        self._refuse_if_deleted()
        self.trigger_event(
            self.PasswordResetRequested,
            timestamp=now,
            token_hash=token_hash,
            expires_at=expires_at,
            link_sealed=link_sealed,
        )

    def ensure_reset_token(self, presented_hash: str, *, now: datetime) -> None:
        self._refuse_if_deleted(InvalidLinkToken)
        _check_link_token(self.reset, presented_hash, now)

    def reset_password(self, presented_hash: str, password_hash: str, *, now: datetime) -> None:
        """Spend the reset token: new password, every session revoked, any lock lifted."""
        self._refuse_if_deleted(InvalidLinkToken)
        _check_link_token(self.reset, presented_hash, now)
        self.end_every_session(reason="password_reset", now=now)
        self.trigger_event(self.PasswordReset, timestamp=now, password_hash=password_hash)

    # --- sessions ---------------------------------------------------------------------------

    def sessions(self, now: datetime) -> list[tuple[str, dict[str, Any]]]:
        """Live sessions, newest first."""
        live = [(f, fam) for f, fam in self.refresh_families.items() if fam["expires_at"] > now]
        return sorted(live, key=lambda item: item[1].get("created_at") or now, reverse=True)

    def end_session(self, family_id: uuid.UUID, *, now: datetime) -> None:
        self._refuse_if_deleted()
        family = self.refresh_families.get(str(family_id))
        if family is None or family["expires_at"] <= now:
            raise SessionNotFound
        self.trigger_event(
            self.RefreshFamilyRevoked, timestamp=now, family_id=family_id, reason="ended"
        )

    def end_every_session(self, *, reason: RevocationReason, now: datetime) -> None:
        self._refuse_if_deleted()
        for family_id in list(self.refresh_families):
            self.trigger_event(
                self.RefreshFamilyRevoked,
                timestamp=now,
                family_id=uuid.UUID(family_id),
                reason=reason,
            )

    # --- refresh tokens -------------------------------------------------------------------

    def rotate_refresh_token(
        self,
        *,
        family_id: uuid.UUID,
        presented_hash: str,
        new_hash: str,
        new_expires_at: datetime,
        now: datetime,
    ) -> None:
        """Spend the presented token and make `new_hash` the family's current one.

        A spent token presented again means someone else holds a copy: the whole family is
        revoked (the event is recorded, then RefreshTokenReused is raised).
        """
        family = self._current_family(family_id, presented_hash, now)
        self.trigger_event(
            self.RefreshTokenRotated,
            timestamp=now,
            family_id=family_id,
            spent_hash=family["current"],
            refresh_token_hash=new_hash,
            refresh_expires_at=new_expires_at,
        )

    def log_out(self, *, family_id: uuid.UUID, presented_hash: str, now: datetime) -> None:
        self._current_family(family_id, presented_hash, now)
        self.trigger_event(
            self.RefreshFamilyRevoked, timestamp=now, family_id=family_id, reason="logout"
        )

    def _current_family(
        self, family_id: uuid.UUID, presented_hash: str, now: datetime
    ) -> dict[str, Any]:
        self._refuse_if_deleted(InvalidRefreshToken)
        family = self.refresh_families.get(str(family_id))
        if family is None:
            raise InvalidRefreshToken
        if presented_hash in family["spent"]:
            self.trigger_event(
                self.RefreshFamilyRevoked, timestamp=now, family_id=family_id, reason="reuse"
            )
            raise RefreshTokenReused
        if not hmac.compare_digest(presented_hash, family["current"]):
            raise InvalidRefreshToken
        if family["expires_at"] <= now:
            raise InvalidRefreshToken
        return family

    def forget_expired_families(self, now: datetime) -> None:
        expired = [f for f, fam in self.refresh_families.items() if fam["expires_at"] <= now]
        for family_id in expired:
            del self.refresh_families[family_id]


class EmailRegistration(TracedAggregate):
    """Claims an e-mail address for one account: its id is derived from the address (keyed:
    `registration_id`), so a second registration of the address conflicts on save
    (optimistic concurrency).

    Deleting the account releases the address (`Released`); a later registration claims it
    again for a new account (`Reclaimed`), which conflicts on save just the same when two
    registrations race. Only `Claimed` carries the address (a personal field); the others
    carry account ids only.
    """

    class Claimed(TracedAggregate.Created):
        email: str
        account_id: uuid.UUID

        def apply(self, aggregate: EmailRegistration) -> None:
            aggregate.email = self.email
            aggregate.account_id = self.account_id

    class Released(TracedAggregate.Event):
        account_id: uuid.UUID  # the deleted account that held it

        def apply(self, aggregate: EmailRegistration) -> None:
            aggregate.released = True

    class Reclaimed(TracedAggregate.Event):
        account_id: uuid.UUID  # the new account

        def apply(self, aggregate: EmailRegistration) -> None:
            aggregate.account_id = self.account_id
            aggregate.released = False

    def __init__(self) -> None:
        self.email = ""
        self.account_id = uuid.UUID(int=0)
        self.released = False

    @classmethod
    def claim(
        cls, account: Account, *, registration_id: uuid.UUID, now: datetime
    ) -> EmailRegistration:
        """`registration_id` is `registration_id(account.email, key)`."""
        registration: EmailRegistration = cls._create(
            cls.Claimed,
            id=registration_id,
            timestamp=now,
            email=account.email,
            account_id=account.id,
        )
        return registration

    def holder(self) -> uuid.UUID | None:
        """The account the address belongs to, or None once released."""
        return None if self.released else self.account_id

    def release(self, account_id: uuid.UUID, *, now: datetime) -> None:
        """Give the address up for the deleted account `account_id`; nothing if it is not
        (or no longer) the holder, so a repeated deletion changes nothing."""
        if self.holder() == account_id:
            self.trigger_event(self.Released, timestamp=now, account_id=account_id)

    def reclaim(self, account: Account, *, holder_deleted: bool, now: datetime) -> None:
        """Claim a released address (or one whose holder was deleted before releasing it)
        for the new `account`."""
        if not self.released and not holder_deleted:
            raise EmailAlreadyRegistered
        self.trigger_event(self.Reclaimed, timestamp=now, account_id=account.id)
