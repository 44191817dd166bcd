"""The auth application: registration, login, refresh tokens, password changes, e-mail
verification, password reset, sessions and account deletion.

Synchronous (the eventsourcing library is): call it from plain `def` routes. Every command
loads an Account, runs a domain method and saves. Commands on one account take turns in this
process (`servicekit.aggregates.Combiner`: those that queue meanwhile run in arrival order on
one load, with one save); a concurrent write from another process (eventsourcing
IntegrityError) reloads and runs the turn again after a jittered pause, and a 503 problem
(`Contended`) ends a conflict that outlasts every retry. Password hashes are verified before
the turn, so a turn never waits for argon2.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from auth_svc.domain import (
    Account,
    AccountDeleted,
    AuthError,
    EmailAlreadyRegistered,
    EmailNotVerified,
    EmailRegistration,
    ErasureUnavailable,
    InvalidCredentials,
    InvalidLinkToken,
    InvalidRefreshToken,
    WrongPassword,
    legacy_registration_id,
    normalise_email,
    registration_id,
)
from auth_svc.limits import SlidingWindow
from auth_svc.passwords import PasswordCheck, Passwords
from auth_svc.personal import PERSONAL_DATA
from auth_svc.screening import PasswordScreen
from auth_svc.settings import AuthSettings
from servicekit.aggregates import Combiner, retry_conflicts
from servicekit.eventstore import EventSourcedApplication
from servicekit.sealing import seal

T = TypeVar("T")
log = logging.getLogger("auth_svc.application")
QUARTER_HOUR = 900.0
HOUR = 3600.0
RESET_BACKLOG = 1000  # reset requests waiting for the background worker; more are dropped

SNAPSHOT_EVERY = 50  # every login appends an event; replay at most this many


class TokenSigner(Protocol):
    def sign(self, claims: dict[str, Any]) -> str: ...


@dataclass(frozen=True)
class _Command:
    run: Callable[[Account], Any]
    missing: type[AuthError]  # raised when the account does not exist
    # Other aggregates the command changed, saved with the account in one transaction.
    also_saved: Callable[[Account], Sequence[Any]] | None = None


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    expires_in: int
    refresh_token: str


@dataclass(frozen=True)
class Client:
    """Where a request came from: recorded with a new session."""

    user_agent: str | None = None
    ip: str | None = None


@dataclass(frozen=True)
class Session:
    id: uuid.UUID
    created_at: datetime | None
    last_used_at: datetime | None
    user_agent: str | None
    client_ip: str | None


@dataclass(frozen=True)
class _Signed:
    """What an access token says about the account, read in the account's turn."""

    email: str
    email_verified: bool


# --- refresh tokens: opaque to clients, self-locating for us -------------------------------

_REFRESH_TOKEN_VERSION = 1
_REFRESH_SECRET_BYTES = 32  # 256 bits of randomness
_REFRESH_TOKEN_BYTES = 1 + 16 + 16 + _REFRESH_SECRET_BYTES


def new_refresh_token(account_id: uuid.UUID, family_id: uuid.UUID) -> str:
    raw = (
        bytes([_REFRESH_TOKEN_VERSION])
        + account_id.bytes
        + family_id.bytes
        + secrets.token_bytes(_REFRESH_SECRET_BYTES)
    )
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def parse_refresh_token(token: str) -> tuple[uuid.UUID, uuid.UUID]:
    """(account id, family id) of a well-formed refresh token, else InvalidRefreshToken."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError:
        raise InvalidRefreshToken from None
    if len(raw) != _REFRESH_TOKEN_BYTES or raw[0] != _REFRESH_TOKEN_VERSION:
        raise InvalidRefreshToken
    return uuid.UUID(bytes=raw[1:17]), uuid.UUID(bytes=raw[17:33])


def refresh_token_hash(token: str) -> str:
    """Only this is ever stored: the token has 256 random bits, so a fast hash suffices."""
    return hashlib.sha256(token.encode()).hexdigest()


# --- verification and reset tokens: 256 random bits, a purpose, the account -----------------

_LINK_TOKEN_VERSION = 1
VERIFY_EMAIL = 1
RESET_PASSWORD = 2
_LINK_TOKEN_BYTES = 1 + 1 + 16 + 32


def new_link_token(account_id: uuid.UUID, purpose: int) -> str:
    raw = bytes([_LINK_TOKEN_VERSION, purpose]) + account_id.bytes + secrets.token_bytes(32)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def parse_link_token(token: str, purpose: int) -> uuid.UUID:
    """The account of a well-formed token of `purpose`, else InvalidLinkToken. The purpose is
    also covered by the stored hash: a token of the other kind never matches."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError:
        raise InvalidLinkToken from None
    if len(raw) != _LINK_TOKEN_BYTES or raw[0] != _LINK_TOKEN_VERSION or raw[1] != purpose:
        raise InvalidLinkToken
    return uuid.UUID(bytes=raw[2:18])


def link_token_hash(token: str) -> str:
    return hashlib.sha256(b"link:" + token.encode()).hexdigest()


class AuthService(EventSourcedApplication):
    """Commands and queries of auth_svc. The notification log is `auth_events`."""

    name = "auth"
    snapshotting_intervals = {Account: SNAPSHOT_EVERY}
    personal_data = PERSONAL_DATA  # sealed per person: erase_person shreds them

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        settings: AuthSettings | None = None,
        signer: TokenSigner | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        super().__init__(env=env)
        self.settings = settings or AuthSettings()
        self._signer = signer
        self._clock = clock or (lambda: datetime.now(UTC))
        self._passwords: Passwords | None = None
        self._commands: Combiner[uuid.UUID, _Command, Any] = Combiner(
            self._account_turn, app=self.name
        )
        self.screen = PasswordScreen(self.settings)
        limits = self.settings
        self.resend_limit = SlidingWindow(limits.resend_limit, HOUR)
        self.forgot_per_address = SlidingWindow(limits.forgot_limit_per_address, QUARTER_HOUR)
        self.forgot_per_ip = SlidingWindow(limits.forgot_limit_per_ip, QUARTER_HOUR)
        self.token_attempts = SlidingWindow(limits.token_attempts_per_ip, QUARTER_HOUR)
        # One paced worker: the links it issues cost the same CPU and database time in every
        # case, so a flood of known addresses cannot slow the answers to anyone (bench/forgot).
        self._resets = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auth-reset")
        self._reset_backlog = threading.BoundedSemaphore(RESET_BACKLOG)

    def close(self) -> None:
        self._resets.shutdown(wait=True, cancel_futures=False)
        super().close()

    @property
    def passwords(self) -> Passwords:
        # Built lazily: a relay reading the log never pays for the dummy hash.
        if self._passwords is None:
            self._passwords = Passwords(self.settings)
        return self._passwords

    # --- commands ---------------------------------------------------------------------------

    def register(self, email: str, password: str, display_name: str | None = None) -> uuid.UUID:
        """The new account's id (the user id). EmailAlreadyRegistered when taken. An address
        whose account was deleted registers again, as a new account."""
        existing = self._registration(email, fresh=True)
        holder_deleted = False
        if existing is not None and existing.holder() is not None:
            holder_deleted = self.is_deleted(existing.account_id)
            if not holder_deleted:
                raise EmailAlreadyRegistered
        self.screen.check(password)
        now = self._clock()
        account_id = uuid.uuid4()
        token = new_link_token(account_id, VERIFY_EMAIL)
        account = Account.register(
            email=email,
            password_hash=self.passwords.hash(password),
            display_name=display_name,
            now=now,
            account_id=account_id,
            verification_hash=link_token_hash(token),
            verification_expires_at=now + timedelta(seconds=self.settings.verification_ttl_seconds),
            verification_link_sealed=self._sealed_link(self.settings.verify_email_url, token),
        )
        keyed = registration_id(account.email, self.settings.address_id_secret)
        if existing is not None and existing.id == keyed:
            # Released (or its account deleted): claimed again at its next version, so two
            # registrations racing for it conflict on save like two first claims.
            existing.reclaim(account, holder_deleted=holder_deleted, now=now)
            registration = existing
        else:  # a first claim, or a legacy registration given up: the keyed id from now on
            registration = EmailRegistration.claim(account, registration_id=keyed, now=now)
        try:
            self.save(account, registration)
        except IntegrityError:
            # Our own save may have landed: when the connection breaks after COMMIT was sent,
            # the library retries the insert and meets our rows. Otherwise someone registered
            # the same address between our check and our save.
            if self.account_id_for(email, fresh=True) == account.id:
                return account.id
            raise EmailAlreadyRegistered from None
        return account.id

    def login(self, email: str, password: str, client: Client | None = None) -> TokenPair:
        account_id = self.account_id_for(email)
        try:
            return self._log_in(account_id, password, client or Client())
        except AccountDeleted:
            # The address's registration, as cached here, may be behind another replica's
            # (released, or claimed again by a new account): read it from the store.
            current = self.account_id_for(email, fresh=True)
            if current in (None, account_id):
                raise InvalidCredentials from None
            return self._log_in(current, password, client or Client())

    def _log_in(self, account_id: uuid.UUID | None, password: str, client: Client) -> TokenPair:
        if account_id is None:
            self.passwords.verify_nothing(password)
            raise InvalidCredentials
        family_id = uuid.uuid4()
        refresh_token = new_refresh_token(account_id, family_id)
        check = self._memoised_check(password)
        self._verify_ahead(account_id, check)
        settings = self.settings

        def log_in(account: Account) -> _Signed:
            now = self._clock()
            account.ensure_can_log_in(now)
            result = check(account.password_hash)
            if not result.matches:
                account.record_failed_login(
                    now=now,
                    threshold=settings.lockout_threshold,
                    lockout_seconds=settings.lockout_seconds,
                )
                raise InvalidCredentials
            if result.needs_rehash:
                account.rehash_password(self.passwords.hash(password), now=now)
            if settings.require_verified_email and not account.email_verified:
                raise EmailNotVerified
            account.record_login(
                family_id=family_id,
                refresh_token_hash=refresh_token_hash(refresh_token),
                refresh_expires_at=now + timedelta(seconds=settings.refresh_token_ttl_seconds),
                now=now,
                user_agent=client.user_agent,
                client_ip=client.ip,
            )
            return _Signed(account.email, account.email_verified)

        signed = self._update(account_id, log_in, missing=InvalidCredentials)
        return self._token_pair(account_id, signed, family_id, refresh_token)

    def refresh(self, refresh_token: str) -> TokenPair:
        """Spend `refresh_token` for a new pair; a spent one revokes its whole family."""
        account_id, family_id = parse_refresh_token(refresh_token)
        next_token = new_refresh_token(account_id, family_id)

        def rotate(account: Account) -> _Signed:
            now = self._clock()
            account.rotate_refresh_token(
                family_id=family_id,
                presented_hash=refresh_token_hash(refresh_token),
                new_hash=refresh_token_hash(next_token),
                new_expires_at=now + timedelta(seconds=self.settings.refresh_token_ttl_seconds),
                now=now,
            )
            return _Signed(account.email, account.email_verified)

        signed = self._update(account_id, rotate, missing=InvalidRefreshToken)
        return self._token_pair(account_id, signed, family_id, next_token)

    def logout(self, refresh_token: str) -> None:
        """Revoke the token's family. Unknown or spent tokens change nothing visible."""
        try:
            account_id, family_id = parse_refresh_token(refresh_token)

            def log_out(account: Account) -> None:
                account.log_out(
                    family_id=family_id,
                    presented_hash=refresh_token_hash(refresh_token),
                    now=self._clock(),
                )

            self._update(account_id, log_out, missing=InvalidRefreshToken)
        except InvalidRefreshToken:
            return

    def change_password(self, user_id: uuid.UUID, current_password: str, new_password: str) -> None:
        """Requires the current password; revokes every refresh token of the account."""
        check = self._memoised_check(current_password)
        self._verify_ahead(user_id, check)
        self.screen.check(new_password)
        new_hash = self.passwords.hash(new_password)

        def change(account: Account) -> None:
            if not check(account.password_hash).matches:
                raise WrongPassword
            account.change_password(new_hash, now=self._clock())

        self._update(user_id, change, missing=InvalidCredentials)

    # --- deletion -------------------------------------------------------------------------

    def delete_account(self, user_id: uuid.UUID, password: str) -> None:
        """Delete the account (the password is required) and erase the person.

        Two steps, each repeatable: the account's turn records every session's revocation,
        `Deleted` and the address's release in one transaction; then the person's key is
        destroyed (`erase_person`). A request repeated after a crash between them finds the
        account deleted and finishes the erasure; once both are done it is AccountDeleted
        (410). A wrong password changes nothing (WrongPassword); nor does anything happen
        without a personal data key (ErasureUnavailable: nothing could be erased).
        """
        if self.personal_keys is None:
            raise ErasureUnavailable
        check = self._memoised_check(password)
        self._verify_ahead(user_id, check)

        def delete(account: Account) -> bool:
            if account.deleted and account.password_hash is None:
                return False  # erased: its password hash went with its key (410 below)
            if not check(account.password_hash).matches:
                raise WrongPassword
            if account.deleted:
                return False
            account.delete(now=self._clock())
            return True

        registrations: set[uuid.UUID] = set()

        def release(account: Account) -> list[EmailRegistration]:
            if not account.email:  # erased already: its address was released before
                return []
            registration = self._registration(account.email, fresh=True)
            if registration is None:
                return []
            registrations.add(registration.id)
            registration.release(account.id, now=self._clock())
            return [registration]

        deleted_now = self._update(user_id, delete, missing=InvalidCredentials, also_saved=release)
        if not deleted_now and self.person_erased_at(user_id) is not None:
            raise AccountDeleted
        self.erase_person(user_id)
        # The registration's cached copy holds the address as it was read before the key went.
        for registration_key in registrations:
            self._evict(registration_key)

    # --- e-mail verification -------------------------------------------------------------

    def verify_email(self, token: str) -> None:
        """Spend a verification token; InvalidLinkToken for any token that does not verify."""
        account_id = parse_link_token(token, VERIFY_EMAIL)
        presented = link_token_hash(token)

        def verify(account: Account) -> None:
            account.verify_email(presented, now=self._clock())

        self._update(account_id, verify, missing=InvalidLinkToken)

    def resend_verification(self, user_id: uuid.UUID) -> None:
        """A new verification link for the account (rate-limited per account)."""
        self.resend_limit.hit(str(user_id))
        token = new_link_token(user_id, VERIFY_EMAIL)
        sealed = self._sealed_link(self.settings.verify_email_url, token)

        def request(account: Account) -> None:
            now = self._clock()
            account.request_verification(
                token_hash=link_token_hash(token),
                expires_at=now + timedelta(seconds=self.settings.verification_ttl_seconds),
                link_sealed=sealed,
                now=now,
            )

        self._update(user_id, request, missing=InvalidCredentials)

    # --- password reset -------------------------------------------------------------------

    def forgot_password(self, email: str, client_ip: str | None) -> None:
        """Count the request, then leave the rest to a background thread: the caller's answer
        and its timing are the same whether the address has an account or not."""
        self.forgot_per_ip.hit(client_ip or "unknown")
        self.forgot_per_address.hit(normalise_email(email))
        if not self._reset_backlog.acquire(blocking=False):
            log.warning("password reset backlog full: request dropped")
            return
        try:
            self._resets.submit(self._issue_reset_link, email)
        except RuntimeError:  # shutting down
            self._reset_backlog.release()

    def _issue_reset_link(self, email: str) -> None:
        started = time.monotonic()
        try:
            account_id = self.account_id_for(email)
            if account_id is None:
                return
            token = new_link_token(account_id, RESET_PASSWORD)
            sealed = self._sealed_link(self.settings.reset_password_url, token)

            def request(account: Account) -> None:
                now = self._clock()
                account.request_password_reset(
                    token_hash=link_token_hash(token),
                    expires_at=now + timedelta(seconds=self.settings.reset_ttl_seconds),
                    link_sealed=sealed,
                    now=now,
                )

            self._update(account_id, request, missing=InvalidCredentials)
        except AccountDeleted:
            pass  # its address was being released: no link, as for an unknown address
        except Exception:
            log.exception("a password reset link could not be issued")
        finally:
            pause = 1 / self.settings.reset_links_per_second - (time.monotonic() - started)
            if pause > 0:
                time.sleep(pause)
            self._reset_backlog.release()

    def reset_password(self, token: str, new_password: str) -> None:
        """Spend a reset token: the new password, every session revoked, any lock lifted."""
        account_id = parse_link_token(token, RESET_PASSWORD)
        presented = link_token_hash(token)
        try:
            account: Account = self.repository.get(account_id)
        except AggregateNotFoundError:
            raise InvalidLinkToken from None
        # Checked before the (costly) hash and the screening, so a bad token changes nothing.
        account.ensure_reset_token(presented, now=self._clock())
        self.screen.check(new_password)
        new_hash = self.passwords.hash(new_password)

        def reset(account: Account) -> None:
            account.reset_password(presented, new_hash, now=self._clock())

        self._update(account_id, reset, missing=InvalidLinkToken)

    # --- sessions -------------------------------------------------------------------------

    def session_is_live(self, user_id: uuid.UUID, session_id: uuid.UUID) -> bool:
        """Whether `session_id` is one of the account's live sessions, as stored: the cached
        account, fast-forwarded by one read of the events appended since (another replica's
        revocation included), so an ended session is refused on the next request."""
        try:
            account = self.get_account(user_id)
        except AggregateNotFoundError:
            return False
        family = account.refresh_families.get(str(session_id))
        return family is not None and bool(family["expires_at"] > self._clock())

    def sessions(self, user_id: uuid.UUID) -> list[Session]:
        try:
            account = self.get_account(user_id)
        except AggregateNotFoundError:
            return []
        return [
            Session(
                id=uuid.UUID(family_id),
                created_at=family.get("created_at"),
                last_used_at=family.get("last_used_at"),
                user_agent=family.get("user_agent"),
                client_ip=family.get("client_ip"),
            )
            for family_id, family in account.sessions(self._clock())
        ]

    def end_session(self, user_id: uuid.UUID, session_id: uuid.UUID) -> None:
        def end(account: Account) -> None:
            account.end_session(session_id, now=self._clock())

        self._update(user_id, end, missing=InvalidCredentials)

    def end_every_session(self, user_id: uuid.UUID) -> None:
        def end(account: Account) -> None:
            account.end_every_session(reason="logout_all", now=self._clock())

        self._update(user_id, end, missing=InvalidCredentials)

    # --- queries ----------------------------------------------------------------------------

    def account_id_for(self, email: str, *, fresh: bool = False) -> uuid.UUID | None:
        """The account registered with `email`, None if none holds it.

        A registration already in memory answers without reading the store (`fresh` reads
        it). It changes hands only when its account is deleted: a released one in memory is
        read again (it may have been claimed since), and a login that finds the account
        deleted asks again with `fresh`."""
        registration = self._registration(email, fresh=fresh)
        return None if registration is None else registration.holder()

    def _registration(self, email: str, *, fresh: bool) -> EmailRegistration | None:
        """The address's registration: at its keyed id, else at the legacy (unkeyed) id of a
        registration stored before ids were keyed."""
        normalised = normalise_email(email)
        for key in (
            registration_id(normalised, self.settings.address_id_secret),
            legacy_registration_id(normalised),
        ):
            registration: EmailRegistration | None = None if fresh else self._in_memory(key)
            if registration is None or registration.released:  # released: maybe reclaimed
                try:
                    registration = self.repository.get(key)
                except AggregateNotFoundError:
                    continue
            return registration
        return None

    def is_deleted(self, account_id: uuid.UUID) -> bool:
        try:
            return self.get_account(account_id).deleted
        except AggregateNotFoundError:
            return False

    def get_account(self, user_id: uuid.UUID) -> Account:
        account: Account = self.repository.get(user_id)
        return account

    # --- internals --------------------------------------------------------------------------

    def _update(
        self,
        account_id: uuid.UUID,
        command: Callable[[Account], T],
        *,
        missing: type[AuthError],
        also_saved: Callable[[Account], Sequence[Any]] | None = None,
    ) -> T:
        """Run `command` on the current Account in the account's turn, and save.

        A refused command may still have recorded facts (a failed login, a lock, a revoked
        family): those are saved before the refusal is raised. `also_saved`, run after the
        command succeeded, gives other aggregates it changed: saved in the same transaction.
        """
        result: T = self._commands.submit(account_id, _Command(command, missing, also_saved))
        return result

    def _account_turn(self, account_id: uuid.UUID, commands: Sequence[_Command]) -> list[Any]:
        """One load, the queued commands in order (each sees the ones before), one save."""

        def attempt() -> list[Any]:
            try:
                account: Account = self.repository.get(account_id)
            except AggregateNotFoundError:
                return [c.missing() for c in commands]
            results: list[Any] = []
            others: list[Any] = []
            for command in commands:
                try:
                    result = command.run(account)
                    if command.also_saved is not None:
                        others.extend(command.also_saved(account))
                    results.append(result)
                except AuthError as refused:
                    results.append(refused)
            if account.pending_events or any(o.pending_events for o in others):
                self.save(account, *others)
            return results

        return retry_conflicts(attempt, app=self.name, what="This account")

    def _verify_ahead(
        self, account_id: uuid.UUID, check: Callable[[str | None], PasswordCheck]
    ) -> None:
        """Verify the password against the stored hash before the account's turn.

        argon2 costs tens of milliseconds of CPU: done here, concurrent logins to one account
        verify in parallel, and the turn finds the result memoised (it verifies again only if
        the hash changed in between, so a copy a few events behind is good enough here). A
        locked account is not verified: its login is refused before the password is looked at.
        """
        account: Account | None = self._in_memory(account_id)
        if account is None:
            try:
                account = self.repository.get(account_id)
            except AggregateNotFoundError:
                return
        if not account.is_locked(self._clock()):
            check(account.password_hash)

    def _in_memory(self, aggregate_id: uuid.UUID) -> Any | None:
        """The repository's cached copy of an aggregate, without reading the store: possibly
        a few events behind, and shared, so only read (never changed) by the caller."""
        cache = self.repository.cache
        if cache is None:
            return None
        try:
            return cache.get(aggregate_id)
        except KeyError:
            return None

    def _evict(self, aggregate_id: uuid.UUID) -> None:
        cache = self.repository.cache
        if cache is not None:
            with contextlib.suppress(KeyError):
                cache.get(aggregate_id, evict=True)

    def _memoised_check(self, password: str) -> Callable[[str | None], PasswordCheck]:
        """Verify once per stored hash, however often a command is retried."""
        results: dict[str | None, PasswordCheck] = {}

        def check(password_hash: str | None) -> PasswordCheck:
            if password_hash not in results:
                results[password_hash] = self.passwords.verify(password_hash, password)
            return results[password_hash]

        return check

    def _sealed_link(self, page: str, token: str) -> str | None:
        """The link to `page` with `token`, sealed to notify_svc's key. Without a key (a
        misconfiguration, warned about at start) the token is recorded but no link is sent."""
        public_key = self.settings.link_sealing_public_key
        if not public_key:
            return None
        return seal(public_key, f"{page}#token={token}")

    def _token_pair(
        self, account_id: uuid.UUID, signed: _Signed, family_id: uuid.UUID, refresh_token: str
    ) -> TokenPair:
        if self._signer is None:
            msg = "AuthService was built without a token signer"
            raise RuntimeError(msg)
        now = int(self._clock().timestamp())
        ttl = self.settings.access_token_ttl_seconds
        claims = {
            "iss": self.settings.issuer,
            "sub": str(account_id),
            "aud": self.settings.audience,
            "iat": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            "email": signed.email,
            "email_verified": signed.email_verified,
            "sid": str(family_id),
        }
        return TokenPair(self._signer.sign(claims), ttl, refresh_token)
