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
    email_verified: bool | None = Field(
        default=None, description="Whether the address was confirmed (absent in older tokens)"
    )
    sid: uuid.UUID | None = Field(
        default=None, description="The session (refresh-token family) the token belongs to"
    )


# What the discovery document lists as `claims_supported`.
CLAIMS_SUPPORTED: tuple[str, ...] = tuple(AccessTokenClaims.model_fields)
