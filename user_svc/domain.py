"""The profile aggregate, its events and the rules its fields obey. No I/O.

A profile's id is its user's id: there is exactly one profile per user, whichever comes
first, the registration event from auth_svc or the user's first `GET /users/me`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import available_timezones

import langcodes

from servicekit.eventstore import TracedAggregate
from shared_contracts.events import PROFILE_FIELDS

DISPLAY_NAME_MAX = 100
BIO_MAX = 1000
AVATAR_URL_MAX = 2048
LOCALE_MAX = 64

# Fields a user may change (and clear, with None). `email` belongs to auth_svc.
# The public state carried whole by every event, so a consumer needs no history.
STATE_FIELDS = ("email", *PROFILE_FIELDS)

# Who changed a profile: its user, or the registration event filling it in.
UpdateSource = Literal["user", "registration"]

_BCP47_CHARS = re.compile(r"^[A-Za-z0-9]+(-[A-Za-z0-9]+)*$")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
# NUL cannot be stored in a PostgreSQL text column (every projection of a profile would choke
# on it) and a lone surrogate cannot be encoded as UTF-8 (the event store would fail: a 500).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class InvalidProfileField(ValueError):
    """A field value the profile refuses; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class ProfileErased(Exception):
    """The profile's user deleted their account (`auth.account.deleted`): gone for good."""

    def __init__(self) -> None:
        super().__init__("This profile was erased: its account has been deleted.")


def valid_display_name(value: str) -> str:
    name = value.strip()
    if not 1 <= len(name) <= DISPLAY_NAME_MAX:
        raise InvalidProfileField(
            "display_name", f"must be 1 to {DISPLAY_NAME_MAX} characters (not only spaces)"
        )
    return name


def valid_bio(value: str) -> str:
    if len(value) > BIO_MAX:
        raise InvalidProfileField("bio", f"must be at most {BIO_MAX} characters")
    return value


def valid_locale(value: str) -> str:
    """A well-formed, valid BCP 47 tag, returned in its standard form (`en-us` -> `en-US`)."""
    if (
        len(value) > LOCALE_MAX
        or not _BCP47_CHARS.match(value)
        or not langcodes.tag_is_valid(value)
    ):
        raise InvalidProfileField("locale", "must be a BCP 47 language tag such as 'en-GB'")
    return str(langcodes.standardize_tag(value))


@cache
def _iana_timezones() -> frozenset[str]:
    return frozenset(available_timezones())


def valid_timezone(value: str) -> str:
    if value not in _iana_timezones():
        raise InvalidProfileField(
            "timezone", "must be an IANA time zone name such as 'Europe/Berlin'"
        )
    return value


def valid_avatar_url(value: str) -> str:
    message = f"must be an absolute http(s) URL of at most {AVATAR_URL_MAX} characters"
    if len(value) > AVATAR_URL_MAX or _CONTROL_OR_SPACE.search(value):
        raise InvalidProfileField("avatar_url", message)
    try:
        parts = urlsplit(value)
        hostname = parts.hostname
    except ValueError:
        raise InvalidProfileField("avatar_url", message) from None
    if parts.scheme.lower() not in ("http", "https") or not hostname:
        raise InvalidProfileField("avatar_url", message)
    return value


VALIDATORS: Mapping[str, Callable[[str], str]] = {
    "display_name": valid_display_name,
    "bio": valid_bio,
    "locale": valid_locale,
    "timezone": valid_timezone,
    "avatar_url": valid_avatar_url,
}


def valid_value(field: str, value: str | None) -> str | None:
    """The normalised value of an editable field; None clears the field."""
    if field not in VALIDATORS:
        raise InvalidProfileField(field, "is not a field that can be changed")
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidProfileField(field, "must be a string or null")
    if _UNSTORABLE.search(value):
        raise InvalidProfileField(field, "must be Unicode text without NUL characters")
    return VALIDATORS[field](value)


def _usable_display_name(value: str | None) -> str | None:
    """A registered display name, or None when it breaks the profile's rules."""
    if value is None:
        return None
    try:
        return valid_display_name(value)
    except InvalidProfileField:
        return None


class Profile(TracedAggregate):
    """A user's public profile."""

    class Created(TracedAggregate.Created):
        email: str | None
        display_name: str | None
        bio: str | None
        locale: str | None
        timezone: str | None
        avatar_url: str | None

        def apply(self, aggregate: Profile) -> None:
            for name in STATE_FIELDS:
                setattr(aggregate, name, getattr(self, name))

    class Updated(TracedAggregate.Event):
        """Some fields changed. `state` is the whole public state after the change.

        v2 records who changed them (`source`): the user, or a registration event filling
        in a profile made before it arrived.
        """

        class_version = 2

        changes: dict[str, str | None]
        state: dict[str, str | None]
        source: UpdateSource | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            # A user can never change the address, so a v1 change of it came from the
            # registration; other v1 changes could come from either: not known (None).
            changes: dict[str, Any] = state["changes"]
            state["source"] = "registration" if "email" in changes else None

        def apply(self, aggregate: Profile) -> None:
            for name, value in self.changes.items():
                setattr(aggregate, name, value)

    class Erased(TracedAggregate.Event):
        """Its user's account was deleted. Carries no personal data: the fields stored
        before it are shredded by destroying the user's key (servicekit.shredding)."""

        def apply(self, aggregate: Profile) -> None:
            for name in STATE_FIELDS:
                setattr(aggregate, name, None)
            aggregate.erased = True

    email: str | None
    display_name: str | None
    bio: str | None
    locale: str | None
    timezone: str | None
    avatar_url: str | None
    erased: bool = False  # set by Erased; profiles stored before it never were

    @classmethod
    def create(
        cls, user_id: uuid.UUID, *, email: str | None, display_name: str | None = None
    ) -> Profile:
        """A new, otherwise empty profile. An unusable registered display name is dropped."""
        return cls._create(  # type: ignore[no-any-return]
            cls.Created,
            id=user_id,
            email=email,
            display_name=_usable_display_name(display_name),
            bio=None,
            locale=None,
            timezone=None,
            avatar_url=None,
        )

    @property
    def user_id(self) -> uuid.UUID:
        return self.id

    def state(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in STATE_FIELDS}

    def update(self, changes: Mapping[str, str | None]) -> list[str]:
        """Validate and apply changes; records only fields whose value differs.

        Returns the names of the fields that changed (none: no event).
        """
        if self.erased:
            raise ProfileErased
        normalised = {name: valid_value(name, value) for name, value in changes.items()}
        return self._change(normalised, source="user")

    def fill_in_from_registration(self, email: str | None, display_name: str | None) -> list[str]:
        """Complete a profile created before its registration event arrived.

        Only fields still unset are filled: a name the user chose meanwhile wins. An erased
        profile is never filled in again (a registration redelivered after the deletion).
        """
        if self.erased:
            return []
        changes: dict[str, str | None] = {}
        if self.email is None and email:
            changes["email"] = email
        name = _usable_display_name(display_name)
        if self.display_name is None and name is not None:
            changes["display_name"] = name
        return self._change(changes, source="registration")

    def _change(self, changes: Mapping[str, str | None], *, source: UpdateSource) -> list[str]:
        changed = {k: v for k, v in changes.items() if getattr(self, k) != v}
        if changed:
            state = self.state() | changed
            self.trigger_event(self.Updated, changes=changed, state=state, source=source)
        return sorted(changed)

    def erase(self) -> bool:
        """Erase the profile (its account was deleted); False when it already was."""
        if self.erased:
            return False
        self.trigger_event(self.Erased)
        return True
