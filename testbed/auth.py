"""auth_svc settings for tests: cheap password hashing, a database of the test's own."""

from __future__ import annotations

from typing import Any

from auth_svc.settings import AuthSettings


def cheap_auth_settings(database_url: str, **overrides: Any) -> AuthSettings:
    fields: dict[str, Any] = {
        "database_url": database_url,
        "argon2_time_cost": 1,
        "argon2_memory_kib": 1024,
        **overrides,
    }
    return AuthSettings(**fields)
