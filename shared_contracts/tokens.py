"""Claims of the access tokens auth_svc issues and every other service verifies."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict, Field

ACCESS_TOKEN_ALGORITHM = "RS256"  # noqa: S105 - an algorithm name, not a secret
DEFAULT_ISSUER = "auth_svc"
DEFAULT_AUDIENCE = "eskit"


class AccessTokenClaims(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    iss: str
    sub: uuid.UUID = Field(description="The user id")
    aud: str | list[str]
    iat: int
    exp: int
    jti: str
    email: str | None = None
