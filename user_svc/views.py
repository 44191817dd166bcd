"""The immutable view of a profile that queries return and the cache holds."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from user_svc.domain import STATE_FIELDS, Profile


@dataclass(frozen=True)
class ProfileView:
    user_id: uuid.UUID
    email: str | None
    display_name: str | None
    bio: str | None
    locale: str | None
    timezone: str | None
    avatar_url: str | None
    version: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, profile: Profile) -> ProfileView:
        return cls(
            user_id=profile.user_id,
            **profile.state(),
            version=profile.version,
            created_at=profile.created_on,
            updated_at=profile.modified_on,
        )

    @classmethod
    def created_by(cls, event: Profile.Created) -> ProfileView:
        return cls(
            user_id=event.originator_id,
            **{name: getattr(event, name) for name in STATE_FIELDS},
            version=event.originator_version,
            created_at=event.timestamp,
            updated_at=event.timestamp,
        )

    def updated_by(self, event: Profile.Updated) -> ProfileView:
        """The view after `event`, which must be the next event of this profile."""
        assert event.originator_version == self.version + 1
        changes: dict[str, Any] = dict(event.changes)
        return replace(
            self, **changes, version=event.originator_version, updated_at=event.timestamp
        )
