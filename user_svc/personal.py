"""The personal fields of user_svc's stored events, sealed per person (servicekit.shredding).

A profile is its user's: every field a user sets, and the address, identifies them. Once the
person's key is destroyed these read as None (`changes` and `state` as {}).
"""

from __future__ import annotations

from servicekit.shredding import PersonalData, personal_fields
from user_svc.domain import STATE_FIELDS, Profile

PERSONAL_DATA = PersonalData(
    personal_fields(Profile.Created, *STATE_FIELDS),
    personal_fields(Profile.Updated, changes={}, state={}),
)
