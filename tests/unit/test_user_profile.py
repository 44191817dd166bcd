"""The profile aggregate: field rules, change recording, registration fill-in. No database."""

from __future__ import annotations

import uuid

import pytest

from shared_contracts.events import ProfileCreated, ProfileUpdated
from user_svc.contracts import to_contract
from user_svc.domain import InvalidProfileField, Profile, valid_value
from user_svc.views import ProfileView


def new_profile(**kw: str | None) -> Profile:
    profile = Profile.create(uuid.uuid4(), email=kw.pop("email", "ada@example.com"), **kw)
    profile.collect_events()
    return profile


@pytest.mark.parametrize(
    ("field", "value", "stored"),
    [
        ("display_name", "Ada", "Ada"),
        ("display_name", "  Ada Lovelace ", "Ada Lovelace"),
        ("display_name", "x" * 100, "x" * 100),
        ("bio", "", ""),
        ("bio", "b" * 1000, "b" * 1000),
        ("locale", "en", "en"),
        ("locale", "en-GB", "en-GB"),
        ("locale", "en-us", "en-US"),
        ("locale", "zh-Hant-TW", "zh-Hant-TW"),
        ("locale", "de-CH-1996", "de-CH-1996"),
        ("timezone", "Europe/Berlin", "Europe/Berlin"),
        ("timezone", "UTC", "UTC"),
        ("timezone", "America/Argentina/Buenos_Aires", "America/Argentina/Buenos_Aires"),
        ("avatar_url", "https://example.com/a.png", "https://example.com/a.png"),
        ("avatar_url", "http://cdn.example.org:8080/x?y=1", "http://cdn.example.org:8080/x?y=1"),
        ("avatar_url", "https://example.com/" + "a" * 2000, "https://example.com/" + "a" * 2000),
    ],
)
def test_valid_values_are_accepted_and_normalised(field: str, value: str, stored: str) -> None:
    profile = new_profile()
    assert profile.update({field: value}) == [field]
    assert getattr(profile, field) == stored


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("display_name", ""),
        ("display_name", "   "),
        ("display_name", "x" * 101),
        ("bio", "b" * 1001),
        ("locale", ""),
        ("locale", "english"),
        ("locale", "en_US"),
        ("locale", "en--US"),
        ("locale", "xx-!!"),
        ("locale", "abcdefghi"),
        ("locale", "en-" + "a" * 70),
        ("timezone", ""),
        ("timezone", "Mars/Olympus"),
        ("timezone", "europe/berlin"),
        ("timezone", "../../etc/passwd"),
        ("timezone", "+02:00"),
        ("avatar_url", "javascript:alert(1)"),
        ("avatar_url", "ftp://x"),
        ("avatar_url", "data:image/png;base64,AAAA"),
        ("avatar_url", "//example.com/a.png"),
        ("avatar_url", "https://"),
        ("avatar_url", "example.com/a.png"),
        ("avatar_url", "https://exa mple.com/a.png"),
        ("avatar_url", "https://example.com/\n"),
        ("avatar_url", "https://[::1"),
        ("avatar_url", "https://example.com/" + "a" * 2030),
    ],
)
def test_invalid_values_are_refused_naming_the_field(field: str, value: str) -> None:
    profile = new_profile()
    with pytest.raises(InvalidProfileField) as refused:
        profile.update({field: value})
    assert refused.value.field == field
    assert profile.pending_events == []


def test_email_and_unknown_fields_cannot_be_changed() -> None:
    profile = new_profile()
    for field in ("email", "user_id", "version", "nickname"):
        with pytest.raises(InvalidProfileField):
            profile.update({field: "x"})
    assert profile.pending_events == []


def test_a_value_that_is_not_text_is_refused() -> None:
    with pytest.raises(InvalidProfileField):
        valid_value("bio", 42)  # type: ignore[arg-type]


def test_update_records_only_the_fields_that_changed() -> None:
    profile = new_profile(display_name="Ada")
    changed = profile.update({"display_name": "Ada", "bio": "Mathematician", "locale": None})
    assert changed == ["bio"]
    [event] = profile.collect_events()
    assert isinstance(event, Profile.Updated)
    assert event.changes == {"bio": "Mathematician"}
    assert event.state == {
        "email": "ada@example.com",
        "display_name": "Ada",
        "bio": "Mathematician",
        "locale": None,
        "timezone": None,
        "avatar_url": None,
    }
    assert profile.version == 2


def test_an_update_that_changes_nothing_records_no_event() -> None:
    profile = new_profile(display_name="Ada")
    assert profile.update({"display_name": " Ada "}) == []
    assert profile.pending_events == []
    assert profile.version == 1


def test_null_clears_a_field() -> None:
    profile = new_profile()
    profile.update({"bio": "hello", "timezone": "Europe/Paris"})
    assert profile.update({"bio": None}) == ["bio"]
    assert profile.bio is None
    assert profile.timezone == "Europe/Paris"


def test_registration_fills_in_the_display_name_only_while_it_is_unset() -> None:
    profile = new_profile(email=None)
    assert profile.fill_in_from_registration("ada@example.com", "Ada") == [
        "display_name",
        "email",
    ]
    assert (profile.email, profile.display_name) == ("ada@example.com", "Ada")

    chosen = new_profile()
    chosen.update({"display_name": "Countess"})
    assert chosen.fill_in_from_registration("other@example.com", "Ada") == []
    assert (chosen.email, chosen.display_name) == ("ada@example.com", "Countess")


def test_registration_without_a_usable_display_name_changes_nothing() -> None:
    profile = new_profile()
    assert profile.fill_in_from_registration("ada@example.com", None) == []
    assert profile.fill_in_from_registration("ada@example.com", " " * 3) == []
    assert profile.pending_events == []


def test_a_profile_created_from_a_registration_keeps_a_valid_display_name_only() -> None:
    assert Profile.create(uuid.uuid4(), email="a@x.io", display_name=" Ada ").display_name == "Ada"
    assert Profile.create(uuid.uuid4(), email="a@x.io", display_name="x" * 101).display_name is None


def test_profile_id_is_the_user_id() -> None:
    user_id = uuid.uuid4()
    profile = Profile.create(user_id, email=None)
    assert profile.id == profile.user_id == user_id


def test_events_map_to_public_contracts_with_the_whole_state() -> None:
    profile = Profile.create(uuid.uuid4(), email="ada@example.com", display_name="Ada")
    profile.update({"bio": "hi", "locale": "en-GB"})
    created, updated = profile.collect_events()

    created_contract = to_contract(created)
    assert isinstance(created_contract, ProfileCreated)
    assert created_contract.user_id == profile.id
    assert created_contract.display_name == "Ada"
    assert created_contract.email == "ada@example.com"

    updated_contract = to_contract(updated)
    assert isinstance(updated_contract, ProfileUpdated)
    assert updated_contract.changed == ["bio", "locale"]
    assert updated_contract.display_name == "Ada"
    assert updated_contract.bio == "hi"
    assert updated_contract.email == "ada@example.com"
    assert to_contract(object()) is None


def test_the_view_follows_events_like_the_aggregate() -> None:
    profile = Profile.create(uuid.uuid4(), email="ada@example.com")
    profile.update({"bio": "hi"})
    profile.update({"bio": None, "timezone": "UTC"})
    created, *updates = profile.collect_events()
    assert isinstance(created, Profile.Created)
    view = ProfileView.created_by(created)
    for event in updates:
        assert isinstance(event, Profile.Updated)
        view = view.updated_by(event)
    assert view == ProfileView.of(profile)
