"""The test oracle for reporting_svc (testbed.history.expected_reports) rounds as PostgreSQL
does, so that a share on a tie (1 of 32 = 0.03125) is not a false failure of a chaos case."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from shared_contracts.events import PROFILE_FIELDS
from testbed.history import expected_reports


def test_a_share_on_a_tie_is_rounded_away_from_zero_as_postgresql_rounds() -> None:
    now = datetime.now(UTC).isoformat()
    envelopes = [
        {
            "event_type": "user.profile.created",
            "occurred_at": now,
            "data": {"user_id": str(uuid.uuid4()), "bio": "hello" if i == 0 else None},
        }
        for i in range(32)
    ]
    shares = {f: share for f, _, _, share in expected_reports(envelopes)["profile-completeness"]}
    assert "bio" in PROFILE_FIELDS
    assert str(shares["bio"]) == "0.0313"  # PostgreSQL: round(1::numeric / 32, 4) = 0.0313
