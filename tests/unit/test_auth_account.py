"""The Account and EmailRegistration rules, without a database or a clock."""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from auth_svc.application import new_refresh_token, parse_refresh_token, refresh_token_hash
from auth_svc.contracts import to_contract
from auth_svc.domain import (
    MAX_REFRESH_FAMILIES,
    Account,
    AccountDeleted,
    AccountIsLocked,
    AuthError,
    EmailAlreadyRegistered,
    EmailRegistration,
    InvalidLinkToken,
    InvalidRefreshToken,
    RefreshTokenReused,
    legacy_registration_id,
    registration_id,
)
from shared_contracts.events import (
    AccountDeleted as AccountDeletedContract,
)
from shared_contracts.events import (
    AccountLocked,
    AccountRegistered,
    LoginFailed,
    LoginSucceeded,
    PasswordChanged,
    SessionRevoked,
)

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
THRESHOLD = 3
LOCK_SECONDS = 900
ADDRESS_KEY = b"k" * 32


def new_account(now: datetime = T0) -> Account:
    return Account.register(
        email="  Ada@Example.COM ", password_hash="$argon2id$hash-1", display_name="Ada", now=now
    )


def fail(account: Account, now: datetime) -> None:
    account.record_failed_login(now=now, threshold=THRESHOLD, lockout_seconds=LOCK_SECONDS)


def log_in(account: Account, now: datetime = T0, family: uuid.UUID | None = None) -> uuid.UUID:
    family = family or uuid.uuid4()
    account.record_login(
        family_id=family, refresh_token_hash=f"h-{family}", refresh_expires_at=now + DAY, now=now
    )
    return family


def rotate(
    account: Account,
    family: uuid.UUID,
    new_hash: str,
    *,
    presented_hash: str | None = None,
    expires_at: datetime = T0 + DAY,
    now: datetime = T0,
) -> None:
    """Rotate `family`'s refresh token, presenting the one `log_in` issued unless told."""
    account.rotate_refresh_token(
        family_id=family,
        presented_hash=presented_hash or f"h-{family}",
        new_hash=new_hash,
        new_expires_at=expires_at,
        now=now,
    )


def event_names(account: Account) -> list[str]:
    return [type(e).__name__ for e in account.collect_events()]


def test_registration_normalises_the_email_and_records_one_event() -> None:
    account = new_account()
    assert account.email == "ada@example.com"
    assert account.display_name == "Ada"
    assert event_names(account) == ["Registered"]


def test_the_email_registration_id_is_the_same_for_any_spelling_of_the_address() -> None:
    account = new_account()
    registration = EmailRegistration.claim(
        account, registration_id=registration_id(account.email, ADDRESS_KEY), now=T0
    )
    assert registration.id == registration_id("ADA@example.com ", ADDRESS_KEY)
    assert registration.account_id == account.id


def test_events_take_the_time_they_are_given() -> None:
    account = new_account()
    log_in(account, now=T0 + DAY)
    assert account.modified_on == T0 + DAY


def test_a_login_is_one_event_carrying_the_new_refresh_family() -> None:
    account = new_account()
    account.collect_events()
    family = log_in(account)
    events = account.collect_events()
    assert [type(e).__name__ for e in events] == ["LoginSucceeded"]
    assert account.has_refresh_family(family)


def test_each_failed_login_counts_consecutive_failures() -> None:
    account = new_account()
    fail(account, T0)
    fail(account, T0)
    assert account.failed_logins == 2
    assert not account.is_locked(T0)


def test_the_threshold_th_failure_locks_the_account_for_the_lockout_period() -> None:
    account = new_account()
    account.collect_events()
    for _ in range(THRESHOLD):
        fail(account, T0)
    assert event_names(account) == ["LoginFailed"] * THRESHOLD + ["Locked"]
    assert account.locked_until == T0 + timedelta(seconds=LOCK_SECONDS)
    with pytest.raises(AccountIsLocked) as refused:
        account.ensure_can_log_in(T0 + timedelta(seconds=100))
    assert refused.value.retry_after_seconds == LOCK_SECONDS - 100


def test_a_locked_account_refuses_even_the_right_password() -> None:
    account = new_account()
    for _ in range(THRESHOLD):
        fail(account, T0)
    with pytest.raises(AccountIsLocked):
        log_in(account, now=T0 + timedelta(seconds=1))


def test_a_locked_account_records_no_further_failures() -> None:
    account = new_account()
    for _ in range(THRESHOLD):
        fail(account, T0)
    account.collect_events()
    with pytest.raises(AccountIsLocked):
        fail(account, T0 + timedelta(seconds=1))
    assert account.collect_events() == []


def test_after_the_lock_expires_logins_work_and_the_count_starts_again() -> None:
    account = new_account()
    for _ in range(THRESHOLD):
        fail(account, T0)
    later = T0 + timedelta(seconds=LOCK_SECONDS)
    account.ensure_can_log_in(later)
    fail(account, later)
    assert account.failed_logins == 1
    assert not account.is_locked(later)


def test_a_successful_login_resets_the_failure_count() -> None:
    account = new_account()
    fail(account, T0)
    fail(account, T0)
    log_in(account)
    assert account.failed_logins == 0
    fail(account, T0)
    assert not account.is_locked(T0)


def test_refresh_rotation_spends_the_presented_token() -> None:
    account = new_account()
    family = log_in(account)
    rotate(account, family, "h-2", expires_at=T0 + 2 * DAY)
    state = account.refresh_families[str(family)]
    assert state["current"] == "h-2"
    assert state["spent"] == [f"h-{family}"]


def test_presenting_a_spent_refresh_token_revokes_its_family() -> None:
    account = new_account()
    family = log_in(account)
    other = log_in(account)
    rotate(account, family, "h-2")
    account.collect_events()
    with pytest.raises(RefreshTokenReused):
        rotate(account, family, "h-3")
    events = account.collect_events()
    assert [type(e).__name__ for e in events] == ["RefreshFamilyRevoked"]
    assert events[0].reason == "reuse"  # type: ignore[attr-defined]
    assert not account.has_refresh_family(family)
    assert account.has_refresh_family(other), "other sessions are untouched"
    with pytest.raises(InvalidRefreshToken):  # even the thief's fresh token is dead now
        rotate(account, family, "h-4", presented_hash="h-2", expires_at=T0)


def test_an_unknown_refresh_token_is_refused_without_revoking_anything() -> None:
    account = new_account()
    family = log_in(account)
    account.collect_events()
    with pytest.raises(InvalidRefreshToken) as refused:
        rotate(account, family, "x", presented_hash="guess", expires_at=T0)
    assert not isinstance(refused.value, RefreshTokenReused)
    assert account.collect_events() == []
    assert account.has_refresh_family(family)


def test_an_expired_refresh_token_is_refused() -> None:
    account = new_account()
    family = log_in(account)
    with pytest.raises(InvalidRefreshToken):
        rotate(account, family, "x", expires_at=T0 + 3 * DAY, now=T0 + DAY)


def test_expired_families_are_forgotten_at_the_next_login() -> None:
    account = new_account()
    old = log_in(account)
    log_in(account, now=T0 + 2 * DAY)
    assert not account.has_refresh_family(old)


def test_an_account_keeps_a_bounded_number_of_sessions() -> None:
    account = new_account()
    first = log_in(account)
    for i in range(MAX_REFRESH_FAMILIES):
        log_in(account, now=T0 + timedelta(seconds=i + 1))
    assert len(account.refresh_families) == MAX_REFRESH_FAMILIES
    assert not account.has_refresh_family(first)


def test_logout_revokes_only_the_presented_family() -> None:
    account = new_account()
    family = log_in(account)
    other = log_in(account)
    account.log_out(family_id=family, presented_hash=f"h-{family}", now=T0)
    assert not account.has_refresh_family(family)
    assert account.has_refresh_family(other)


def test_a_password_change_revokes_every_refresh_token() -> None:
    account = new_account()
    log_in(account)
    log_in(account)
    account.change_password("$argon2id$hash-2", now=T0)
    assert account.password_hash == "$argon2id$hash-2"
    assert account.refresh_families == {}


def test_a_rehash_replaces_the_hash_and_keeps_the_sessions() -> None:
    account = new_account()
    family = log_in(account)
    account.rehash_password("$argon2id$stronger", now=T0)
    assert account.password_hash == "$argon2id$stronger"
    assert account.has_refresh_family(family)


def test_refresh_tokens_locate_their_account_and_family_and_carry_256_random_bits() -> None:
    account_id, family_id = uuid.uuid4(), uuid.uuid4()
    token = new_refresh_token(account_id, family_id)
    assert parse_refresh_token(token) == (account_id, family_id)
    assert token != new_refresh_token(account_id, family_id)
    assert len(token) >= 43 + 43  # ids plus 32 random bytes, base64url
    assert len(refresh_token_hash(token)) == 64


@pytest.mark.parametrize("garbage", ["", "abc", "!!!!", "A" * 87, "x" * 500])
def test_malformed_refresh_tokens_are_invalid(garbage: str) -> None:
    with pytest.raises(InvalidRefreshToken):
        parse_refresh_token(garbage)


def test_public_contracts_carry_no_secret() -> None:
    account = new_account()
    family = log_in(account)
    for _ in range(THRESHOLD):
        fail(account, T0 + timedelta(seconds=1))
    account.rehash_password("$argon2id$stronger", now=T0)
    account.change_password("$argon2id$hash-2", now=T0)
    events = account.collect_events()
    contracts = [to_contract(e) for e in events]
    assert [type(c) for c in contracts if c is not None] == [
        AccountRegistered,
        LoginSucceeded,
        *[LoginFailed] * THRESHOLD,
        AccountLocked,
        SessionRevoked,  # the session a password change ended (its id is the public `sid`)
        PasswordChanged,
    ]
    rendered = " ".join(c.model_dump_json() for c in contracts if c is not None)
    assert "argon2" not in rendered
    assert f"h-{family}" not in rendered


def test_private_events_have_no_contract() -> None:
    account = new_account()
    family = log_in(account)
    account.rehash_password("$argon2id$x", now=T0)
    account.rotate_refresh_token(
        family_id=family,
        presented_hash=f"h-{family}",
        new_hash="h-next",
        new_expires_at=T0 + timedelta(days=1),
        now=T0,
    )
    registration = EmailRegistration.claim(
        account, registration_id=registration_id(account.email, ADDRESS_KEY), now=T0
    )
    registration.release(account.id, now=T0)
    private = [*account.collect_events()[2:], *registration.collect_events()]
    assert private
    assert all(to_contract(e) is None for e in private)


# --- keyed address ids --------------------------------------------------------------------


def test_the_registration_id_is_keyed_not_a_plain_hash_of_the_address() -> None:
    keyed = registration_id("ada@example.com", ADDRESS_KEY)
    assert keyed != legacy_registration_id("ada@example.com")
    assert keyed != uuid.uuid5(uuid.NAMESPACE_DNS, "ada@example.com")
    assert keyed != registration_id("ada@example.com", b"another secret of 32 bytes......")
    assert keyed.version == 8
    assert keyed.variant == uuid.RFC_4122


def test_the_legacy_registration_id_is_the_uuid5_registrations_were_stored_under() -> None:
    namespace = uuid.UUID("0b7d0f38-54a4-4f6b-9a3c-8d1e2f3a4b5c")
    assert legacy_registration_id(" ADA@example.com") == uuid.uuid5(namespace, "ada@example.com")


# --- deletion -----------------------------------------------------------------------------


def test_deleting_ends_every_session_then_records_deleted_without_personal_data() -> None:
    account = new_account()
    first, second = log_in(account), log_in(account)
    account.collect_events()
    account.delete(now=T0 + DAY)
    events = account.collect_events()
    assert [type(e).__name__ for e in events] == [
        "RefreshFamilyRevoked",
        "RefreshFamilyRevoked",
        "Deleted",
    ]
    assert {e.family_id for e in events[:2]} == {first, second}  # type: ignore[attr-defined]
    assert {e.reason for e in events[:2]} == {"account_deleted"}  # type: ignore[attr-defined]
    assert account.deleted
    assert account.refresh_families == {}
    deleted = events[-1]
    assert set(deleted.__dict__) == {
        "originator_id",
        "originator_version",
        "timestamp",
        "metadata",
    }
    contracts = [to_contract(e) for e in events]
    assert contracts[-1] == AccountDeletedContract(user_id=account.id)
    assert [c.reason for c in contracts[:2]] == ["account_deleted"] * 2  # type: ignore[union-attr]


def test_a_deleted_account_refuses_every_command() -> None:
    account = new_account()
    family = log_in(account)
    account.delete(now=T0)
    account.collect_events()
    refusals: list[tuple[Any, type[AuthError]]] = [
        (lambda: account.delete(now=T0), AccountDeleted),
        (lambda: account.ensure_can_log_in(T0), AccountDeleted),
        (lambda: log_in(account), AccountDeleted),
        (lambda: fail(account, T0), AccountDeleted),
        (lambda: account.rehash_password("$argon2id$x", now=T0), AccountDeleted),
        (lambda: account.change_password("$argon2id$x", now=T0), AccountDeleted),
        (lambda: rotate(account, family, "h-next"), InvalidRefreshToken),
        (
            lambda: account.log_out(family_id=family, presented_hash=f"h-{family}", now=T0),
            InvalidRefreshToken,
        ),
        (lambda: account.end_session(family, now=T0), AccountDeleted),
        (lambda: account.end_every_session(reason="logout_all", now=T0), AccountDeleted),
        (
            lambda: account.request_verification(
                token_hash="t", expires_at=T0 + DAY, link_sealed=None, now=T0
            ),
            AccountDeleted,
        ),
        (lambda: account.verify_email("t", now=T0), InvalidLinkToken),
        (
            lambda: account.request_password_reset(
                token_hash="t", expires_at=T0 + DAY, link_sealed=None, now=T0
            ),
            AccountDeleted,
        ),
        (lambda: account.ensure_reset_token("t", now=T0), InvalidLinkToken),
        (lambda: account.reset_password("t", "$argon2id$x", now=T0), InvalidLinkToken),
    ]
    for command, refusal in refusals:
        with pytest.raises(refusal):
            command()
    assert account.collect_events() == []


def test_an_account_snapshotted_before_deletion_existed_loads_as_not_deleted() -> None:
    state: dict[str, Any] = {}
    Account.upcast_v2_v3(state)
    assert state == {"deleted": False}


# --- the address: released and claimed again -------------------------------------------------


def claimed(account: Account) -> EmailRegistration:
    return EmailRegistration.claim(
        account, registration_id=registration_id(account.email, ADDRESS_KEY), now=T0
    )


def test_a_released_address_is_claimed_again_by_a_new_account_at_the_next_version() -> None:
    old = new_account()
    registration = claimed(old)
    registration.release(old.id, now=T0)
    assert registration.holder() is None
    new = new_account()
    registration.reclaim(new, holder_deleted=False, now=T0 + DAY)
    assert registration.holder() == new.id
    assert new.id != old.id
    assert [type(e).__name__ for e in registration.collect_events()] == [
        "Claimed",
        "Released",
        "Reclaimed",
    ]
    assert registration.version == 3


def test_a_held_address_is_not_claimed_again_unless_its_holder_was_deleted() -> None:
    holder = new_account()
    registration = claimed(holder)
    registration.collect_events()
    with pytest.raises(EmailAlreadyRegistered):
        registration.reclaim(new_account(), holder_deleted=False, now=T0)
    newcomer = new_account()
    registration.reclaim(newcomer, holder_deleted=True, now=T0)
    assert registration.holder() == newcomer.id


def test_releasing_twice_or_for_another_account_changes_nothing() -> None:
    holder = new_account()
    registration = claimed(holder)
    registration.release(uuid.uuid4(), now=T0)
    registration.release(holder.id, now=T0)
    registration.release(holder.id, now=T0)
    assert [type(e).__name__ for e in registration.collect_events()] == ["Claimed", "Released"]


def test_the_address_events_after_the_claim_carry_account_ids_only() -> None:
    old, new = new_account(), new_account()
    registration = claimed(old)
    registration.release(old.id, now=T0)
    registration.reclaim(new, holder_deleted=False, now=T0)
    released, reclaimed = registration.collect_events()[1:]
    for event in (released, reclaimed):
        assert "ada@example.com" not in repr(event.__dict__)


def _state(account: Account) -> dict[str, Any]:
    return {k: v for k, v in vars(account).items() if k != "_pending_events"}


def test_the_copy_a_command_works_on_is_as_independent_as_a_deep_copy() -> None:
    """The repository copies its cached account for each command (`Account.__deepcopy__`,
    cheaper than the generic walk): whatever the command does to the copy, the cached
    account is unchanged, and the copy starts equal to a generic deep copy."""
    cached = new_account()
    families = [log_in(cached, now=T0 + timedelta(minutes=i)) for i in range(5)]
    rotate(cached, families[0], "h-rotated")
    cached.request_verification(token_hash="v-1", expires_at=T0 + DAY, link_sealed=None, now=T0)
    cached.collect_events()
    before = copy.deepcopy(_state(cached), {})
    generic = copy.deepcopy(_state(cached))

    command_copy = copy.deepcopy(cached)
    assert _state(command_copy) == generic
    rotate(command_copy, families[0], "h-again", presented_hash="h-rotated")
    rotate(command_copy, families[1], "h-next")
    command_copy.log_out(family_id=families[2], presented_hash=f"h-{families[2]}", now=T0)
    log_in(command_copy)
    command_copy.record_failed_login(now=T0, threshold=THRESHOLD, lockout_seconds=LOCK_SECONDS)

    assert _state(cached) == before
    assert cached.refresh_families[str(families[0])]["spent"] == [f"h-{families[0]}"]
    assert command_copy.refresh_families[str(families[0])]["spent"] == [
        f"h-{families[0]}",
        "h-rotated",
    ]
