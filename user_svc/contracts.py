"""Stored profile events -> public contract events (`user.profile.*`)."""

from __future__ import annotations

from typing import Any

from shared_contracts.events import ContractEvent, ProfileCreated, ProfileUpdated
from user_svc.domain import STATE_FIELDS, Profile


def to_contract(event: Any) -> ContractEvent | None:
    """The public event for a stored one, or None for a private event.

    Both contracts carry the whole public profile after the event, so consumers need no
    history; `ProfileUpdated.changed` names what changed.
    """
    if isinstance(event, Profile.Created):
        return ProfileCreated(
            user_id=event.originator_id, **{name: getattr(event, name) for name in STATE_FIELDS}
        )
    if isinstance(event, Profile.Updated):
        state = {name: event.state.get(name) for name in STATE_FIELDS}
        return ProfileUpdated(user_id=event.originator_id, **state, changed=sorted(event.changes))
    return None
