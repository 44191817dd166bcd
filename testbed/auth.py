"""auth_svc settings for tests: cheap password hashing, a database of the test's own (with
auth_svc's tables, `auth_database`)."""

from __future__ import annotations

from typing import Any

from auth_svc.main import init_db
from auth_svc.settings import AuthSettings


def cheap_auth_settings(database_url: str, **overrides: Any) -> AuthSettings:
    fields: dict[str, Any] = {
        "database_url": database_url,
        "argon2_time_cost": 1,
        "argon2_memory_kib": 1024,
        **overrides,
    }
    return AuthSettings(**fields)


def auth_database(database_url: str, **overrides: Any) -> AuthSettings:
    """`cheap_auth_settings`, once auth_svc's tables are in the database (`esctl db init`)."""
    settings = cheap_auth_settings(database_url, **overrides)
    init_db(settings)
    return settings
