"""Crypto-shredding's mapper on the library's in-memory store: personal fields are sealed per
person, open again, read as erased once the key is gone, and nothing else changes."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from eventsourcing.persistence import (
    JSONTranscoder,
    Mapper,
    MapperDeserialisationError,
    StoredEvent,
    UUIDAsHex,
)

from auth_svc.domain import Account, EmailRegistration
from auth_svc.personal import PERSONAL_DATA as AUTH_PERSONAL_DATA
from servicekit.eventstore import EventSourcedApplication, TracedAggregate, personal_data_env
from servicekit.shredding import (
    ENVELOPE,
    MemoryPersonalKeys,
    PersonalData,
    PersonalDataError,
    PersonalDataMapper,
    new_service_key,
    personal_fields,
    service_key_from,
)
from user_svc.domain import Profile
from user_svc.personal import PERSONAL_DATA as USER_PERSONAL_DATA

NOW = datetime(2026, 1, 1, tzinfo=UTC)
EMAIL = "ada.lovelace@example.com"


class Accounts(EventSourcedApplication):
    name = "accounts"
    personal_data = AUTH_PERSONAL_DATA
    snapshotting_intervals: ClassVar[dict[Any, int]] = {Account: 3}


class Profiles(EventSourcedApplication):
    name = "profiles"
    personal_data = USER_PERSONAL_DATA


def popo(**extra: str) -> dict[str, str]:
    return {
        "PERSISTENCE_MODULE": "eventsourcing.popo",
        "AGGREGATE_CACHE_MAXSIZE": "100",
        **personal_data_env(new_service_key()),
        **extra,
    }


def raw_states(app: EventSourcedApplication, originator_id: uuid.UUID) -> list[str]:
    records = app.recorder.select_events(originator_id)
    return [r.state.decode() for r in records]


def registered_account(app: Accounts) -> Account:
    account = Account.register(
        email=EMAIL, password_hash="argon2-hash", display_name="Ada L.", now=NOW
    )
    registration = EmailRegistration._create(
        EmailRegistration.Claimed,
        id=uuid.uuid4(),
        timestamp=NOW,
        email=account.email,
        account_id=account.id,
    )
    app.save(account, registration)
    return account


def test_personal_fields_are_stored_sealed_and_read_back_in_plain() -> None:
    app = Accounts(env=popo())
    account = registered_account(app)
    (stored,) = raw_states(app, account.id)
    assert EMAIL not in stored
    assert "Ada L." not in stored
    assert json.loads(stored)["email"].keys() == {ENVELOPE}
    assert "argon2-hash" not in stored  # the password hash goes with the person too
    assert json.loads(stored)["verification_hash"] is None  # only declared fields are sealed
    app.evict(account.id)
    loaded: Account = app.repository.get(account.id)
    assert (loaded.email, loaded.display_name) == (EMAIL, "Ada L.")


def test_an_erased_person_loads_with_erased_fields_and_the_rest_intact() -> None:
    app = Profiles(env=popo())
    user_id = uuid.uuid4()
    profile = Profile.create(user_id, email=EMAIL, display_name="Ada")
    profile.update({"bio": "Countess of Lovelace", "timezone": "Europe/London"})
    app.save(profile)
    assert app.erase_person(user_id) is True
    assert app.erase_person(user_id) is False  # idempotent
    assert app.person_erased_at(user_id) is not None
    erased: Profile = app.repository.get(user_id)  # evicted: read from the store
    assert erased.version == profile.version
    assert [erased.email, erased.display_name, erased.bio, erased.timezone] == [None] * 4
    events: list[Any] = list(app.events.get(user_id))
    assert events[1].changes == {}
    assert events[1].state == {}
    assert events[1].source == "user"  # not personal: still there


def test_a_snapshot_seals_the_personal_part_of_the_state_and_loads_after_erasure() -> None:
    app = Accounts(env=popo())
    account = registered_account(app)
    for n in range(3):
        account.record_login(
            family_id=uuid.uuid4(),
            refresh_token_hash=f"h{n}",
            refresh_expires_at=NOW + timedelta(days=1),
            now=NOW,
            user_agent="Firefox/999",
            client_ip="203.0.113.7",
        )
    app.save(account)
    assert app.snapshots is not None
    (snapshot,) = [r.state.decode() for r in app.snapshots.recorder.select_events(account.id)]
    for secret in (EMAIL, "Firefox/999", "203.0.113.7", "Ada L."):
        assert secret not in snapshot
        assert all(secret not in s for s in raw_states(app, account.id))
    app.evict(account.id)
    assert app.repository.get(account.id).refresh_families.keys() == account.refresh_families.keys()
    app.erase_person(account.id)
    erased: Account = app.repository.get(account.id)
    assert erased.version == account.version
    assert (erased.email, erased.display_name) == (None, None)  # type: ignore[comparison-overlap]
    # The snapshot's sessions read as {}; the login after it as a session without its origin.
    (family,) = erased.refresh_families.values()
    assert (family["user_agent"], family["client_ip"]) == (None, None)
    assert erased.password_hash is None  # erased with the person
    assert erased.failed_logins == 0  # the rest of the state is intact


def test_the_registration_keyed_to_its_account_is_erased_and_evicted_with_it() -> None:
    app = Accounts(env=popo())
    account = registered_account(app)
    registration_id = next(
        rid
        for rid in app.mapper.related.of(account.id)  # type: ignore[attr-defined]
    )
    assert app.repository.cache is not None
    app.repository.cache.put(registration_id, app.repository.get(registration_id))
    app.erase_person(account.id)
    with pytest.raises(KeyError):
        app.repository.cache.get(registration_id)
    registration: EmailRegistration = app.repository.get(registration_id)
    assert registration.email is None
    assert registration.account_id == account.id


def test_events_stored_before_encryption_still_load() -> None:
    plain = Profiles(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    profile = Profile.create(uuid.uuid4(), email=EMAIL, display_name="Ada")
    (stored,) = [plain.mapper.to_stored_event(e) for e in profile.collect_events()]
    assert EMAIL in stored.state.decode()
    sealing = Profiles(env=popo())
    event: Any = sealing.mapper.to_domain_event(stored)
    assert (event.email, event.display_name) == (EMAIL, "Ada")


def test_a_field_moved_to_another_field_or_person_fails_loudly() -> None:
    app = Profiles(env=popo())
    profile = Profile.create(uuid.uuid4(), email=EMAIL, display_name="Ada")
    (stored,) = [app.mapper.to_stored_event(e) for e in profile.collect_events()]
    state = json.loads(stored.state)
    state["email"], state["display_name"] = state["display_name"], state["email"]
    swapped = StoredEvent(
        stored.originator_id, stored.originator_version, stored.topic, json.dumps(state).encode()
    )
    with pytest.raises(MapperDeserialisationError, match="does not open"):
        app.mapper.to_domain_event(swapped)
    other = uuid.uuid4()
    app.mapper.keys.cipher_for(other, create=True)  # type: ignore[attr-defined]
    moved = StoredEvent(other, stored.originator_version, stored.topic, stored.state)
    with pytest.raises(MapperDeserialisationError):
        app.mapper.to_domain_event(moved)


def test_an_envelope_without_a_configured_key_is_an_error_not_a_silent_none() -> None:
    app = Profiles(env=popo())
    profile = Profile.create(uuid.uuid4(), email=EMAIL)
    (stored,) = [app.mapper.to_stored_event(e) for e in profile.collect_events()]
    keyless = Profiles(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    with pytest.raises(MapperDeserialisationError, match="no personal data key"):
        keyless.mapper.to_domain_event(stored)


def test_new_events_of_an_erased_person_keep_no_personal_data() -> None:
    app = Profiles(env=popo())
    user_id = uuid.uuid4()
    app.erase_person(user_id)
    app.save(Profile.create(user_id, email=EMAIL, display_name="Ada"))
    (stored,) = raw_states(app, user_id)
    assert EMAIL not in stored
    assert json.loads(stored)["email"] is None


def test_encryption_off_stores_plain_and_still_reads_sealed_events() -> None:
    key = new_service_key()
    on = Profiles(env=popo(**personal_data_env(key)))
    profile = Profile.create(uuid.uuid4(), email=EMAIL)
    (sealed,) = [on.mapper.to_stored_event(e) for e in profile.collect_events()]
    assert isinstance(on.mapper, PersonalDataMapper)
    off = PersonalDataMapper(
        on.mapper.transcoder, personal=USER_PERSONAL_DATA, keys=on.mapper.keys, encrypt=False
    )
    assert (
        EMAIL
        in off.to_stored_event(
            Profile.create(uuid.uuid4(), email=EMAIL).collect_events()[0]
        ).state.decode()
    )
    assert off.to_domain_event(sealed).email == EMAIL


class Member(TracedAggregate):
    class Joined(TracedAggregate.Created):
        """v2 derives the address's domain: its upcaster reads the (opened) address."""

        class_version = 2
        email: str | None
        domain: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            email = state["email"]
            state["domain"] = email.split("@")[1] if email else None


def test_upcasters_see_the_opened_values() -> None:
    transcoder = JSONTranscoder()
    transcoder.register(UUIDAsHex())
    from eventsourcing.persistence import DatetimeAsISO

    transcoder.register(DatetimeAsISO())
    mapper = PersonalDataMapper(
        transcoder,
        personal=PersonalData(personal_fields(Member.Joined, "email")),
        keys=MemoryPersonalKeys(),
    )
    member = Member._create(Member.Joined, id=uuid.uuid4(), email=EMAIL, domain="x", metadata={})
    stored = mapper.to_stored_event(member.collect_events()[0])
    state = json.loads(stored.state)
    state.pop("class_version")
    state.pop("domain")  # as a v1 event was stored
    v1 = StoredEvent(
        stored.originator_id, stored.originator_version, stored.topic, json.dumps(state).encode()
    )
    assert mapper.to_domain_event(v1).domain == "example.com"
    assert isinstance(Mapper(transcoder).to_domain_event(stored), Member.Joined)


def test_a_service_key_must_be_32_bytes_of_base64url() -> None:
    assert len(service_key_from(new_service_key())) == 32
    with pytest.raises(PersonalDataError, match="32 bytes"):
        service_key_from("c2hvcnQ")
    with pytest.raises(PersonalDataError):
        Profiles(env=popo(PERSONAL_DATA_KEY="not base64!"))


def test_an_erased_profile_refuses_edits_and_registration_fill_ins() -> None:
    from user_svc.domain import ProfileErased

    profile = Profile.create(uuid.uuid4(), email=None)
    assert profile.erase() is True
    assert profile.erase() is False  # once
    with pytest.raises(ProfileErased):
        profile.update({"bio": "back"})
    assert profile.fill_in_from_registration("a@example.com", "Ada") == []
    assert [type(e) for e in profile.collect_events()] == [Profile.Created, Profile.Erased]


def test_the_profile_cache_drops_a_profile_when_it_is_erased() -> None:
    from user_svc.api import render_profile
    from user_svc.cache import ProfileCache
    from user_svc.views import ProfileView

    cache = ProfileCache(render_profile, max_entries=10)
    cache.reset(enabled=True)
    profile = Profile.create(uuid.uuid4(), email=EMAIL, display_name="Ada")
    profile.collect_events()
    cache.put(ProfileView.of(profile), cache.epoch)
    assert cache.get(profile.id) is not None
    profile.erase()
    (erased,) = profile.collect_events()
    cache.apply(erased)
    assert cache.get(profile.id) is None
