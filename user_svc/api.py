"""HTTP routes of user_svc: the caller's own profile and other users' public profiles.

Reads are `async def` end to end: the token is verified on the event loop (verified tokens
are remembered) and the profile comes from the in-process cache; only a cache miss or a
write goes to the event store, in the threadpool.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from servicekit.problems import Problem, header, problem_responses
from servicekit.tokens import BEARER_SECURITY, CurrentUser, authenticated
from shared_contracts.events import PROFILE_FIELDS
from shared_contracts.tokens import AccessTokenClaims
from user_svc.application import ProfileService, StaleProfileVersion
from user_svc.cache import CachedProfile, ProfileCache
from user_svc.domain import (
    AVATAR_URL_MAX,
    BIO_MAX,
    DISPLAY_NAME_MAX,
    InvalidProfileField,
    ProfileErased,
    valid_value,
)
from user_svc.views import ProfileView

JSON = "application/json"
MAX_ETAG_DIGITS = 18


API_DESCRIPTION = (
    "User profiles: the caller's own (with an `ETag`, for conditional changes with "
    "`If-Match`) and other users' public profiles. Bearer tokens are issued by auth_svc."
)


# --- models -----------------------------------------------------------------------------------


class PublicProfileOut(BaseModel):
    """What any signed-in user may see of another user's profile (no e-mail)."""

    model_config = ConfigDict(from_attributes=True)

    user_id: uuid.UUID
    display_name: str | None
    bio: str | None
    locale: str | None = Field(description="BCP 47 language tag", examples=["en-GB"])
    timezone: str | None = Field(description="IANA time zone", examples=["Europe/London"])
    avatar_url: str | None


class ProfileOut(PublicProfileOut):
    """The caller's own profile. `version` is also sent as the `ETag`."""

    email: str | None
    email_verified: bool | None = Field(
        default=None,
        description="Whether auth_svc has confirmed the address, as of the caller's access "
        "token (`email_verified` claim; a token issued after the confirmation says true)",
    )
    version: int = Field(ge=1, description="Increases with every change; the ETag's value")
    created_at: datetime
    updated_at: datetime


class ProfilePatch(BaseModel):
    """Fields to change; a field set to null is cleared, an absent field is left alone."""

    model_config = ConfigDict(extra="forbid")

    display_name: str | None = Field(
        default=None, description=f"1 to {DISPLAY_NAME_MAX} characters", examples=["Ada"]
    )
    bio: str | None = Field(default=None, description=f"At most {BIO_MAX} characters")
    locale: str | None = Field(default=None, description="BCP 47 tag", examples=["en-GB"])
    timezone: str | None = Field(
        default=None, description="IANA time zone name", examples=["Europe/London"]
    )
    avatar_url: str | None = Field(
        default=None,
        description=f"Absolute http(s) URL, at most {AVATAR_URL_MAX} characters",
        examples=["https://example.com/ada.png"],
    )

    @field_validator(*PROFILE_FIELDS)
    @classmethod
    def _domain_rules(cls, value: str | None, info: Any) -> str | None:
        return valid_value(info.field_name, value)


def _problems(**described: str) -> dict[int | str, dict[str, Any]]:
    return problem_responses(
        {int(key.removeprefix("p")): text for key, text in described.items()},
        headers={412: {"ETag": _ETAG_HEADER}},
    )


def _with_etag(responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """`responses`, and the 200 carries the profile's ETag."""
    return {200: {"headers": {"ETag": _ETAG_HEADER}}, **responses}


_ETAG_HEADER = header(
    'The profile\'s version as a strong entity tag, e.g. `"3"`: send it in `If-Match`.'
)


_TOKEN_PROBLEMS = {"p401": "Missing, expired or invalid bearer token"}
_ERASED = "The profile was erased: its account has been deleted"


def _gone(erased: ProfileErased) -> Problem:
    return Problem(str(erased), status=410, title="Gone")


# --- dependencies -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Profiles:
    """The profile service and its cache, built once by the app's lifespan."""

    service: ProfileService
    cache: ProfileCache


async def _profiles(request: Request) -> Profiles:
    profiles: Profiles = request.app.state.profiles
    return profiles


# Dependencies are `async def`: a sync one would cost a threadpool hop per request.
ProfilesDep = Annotated[Profiles, Depends(_profiles)]


# --- rendering --------------------------------------------------------------------------------


def etag_of(version: int) -> str:
    return f'"{version}"'


def render_profile(view: ProfileView) -> CachedProfile:
    """Both JSON bodies of a profile version, rendered once and cached with it."""
    return CachedProfile(
        view=view,
        # `email_verified` comes from the caller's token, added per response.
        body=ProfileOut.model_validate(view).model_dump_json(exclude={"email_verified"}).encode(),
        public_body=PublicProfileOut.model_validate(view).model_dump_json().encode(),
        etag=etag_of(view.version),
    )


def _own_profile(entry: CachedProfile, user: AccessTokenClaims) -> Response:
    """The cached body, with the caller's `email_verified` (a fact of the token, not of the
    profile's version, so it is added to the rendered JSON object here)."""
    body = entry.body
    if user.email_verified is not None and body.endswith(b"}"):
        flag = b"true" if user.email_verified else b"false"
        body = body[:-1] + b',"email_verified":' + flag + b"}"
    return Response(body, media_type=JSON, headers={"ETag": entry.etag})


def parse_if_match(value: str | None) -> frozenset[int] | None:
    """The versions an If-Match accepts; None when any version will do (absent or `*`).

    Weak and unparseable tags match nothing (If-Match compares strongly), so they give 412.
    """
    if value is None or value.strip() == "*":
        return None
    versions: set[int] = set()
    for raw in value.split(","):
        tag = raw.strip()
        inner = tag[1:-1]
        quoted = len(tag) >= 3 and tag[0] == tag[-1] == '"'
        if quoted and inner.isdigit() and len(inner) <= MAX_ETAG_DIGITS:
            versions.add(int(inner))
    return frozenset(versions)


# --- routes -----------------------------------------------------------------------------------

router = APIRouter(prefix="/users", tags=["users"])


@router.get(
    "/me",
    response_model=ProfileOut,
    operation_id="getMyProfile",
    summary="The caller's profile",
    description="Created on the first call if the registration has not arrived yet. "
    "The `ETag` header carries the version, for `PATCH` with `If-Match`.",
    responses=_with_etag(_problems(p410=_ERASED, **_TOKEN_PROBLEMS)),
    openapi_extra=BEARER_SECURITY,
)
async def read_my_profile(request: Request) -> Response:
    # The hottest route takes only the request: no dependency for FastAPI to solve.
    user = await authenticated(request)
    profiles: Profiles = request.app.state.profiles
    entry = profiles.cache.get(user.sub)
    if entry is None:
        epoch = profiles.cache.epoch
        try:
            view = await run_in_threadpool(profiles.service.get_or_create, user.sub, user.email)
        except ProfileErased as erased:
            raise _gone(erased) from None
        entry = profiles.cache.put(view, epoch)
    return _own_profile(entry, user)


@router.patch(
    "/me",
    response_model=ProfileOut,
    operation_id="updateMyProfile",
    summary="Change the caller's profile",
    description="Send only the fields to change; `null` clears a field. With `If-Match` "
    '(the `ETag` of a `GET`, e.g. `"3"`, or `*`) the change applies only to that version.',
    responses=_with_etag(
        _problems(
            p400="Malformed JSON",
            p410=_ERASED,
            p412="The profile has changed since the `If-Match` version; the current ETag is sent",
            p413="Body larger than 64 KiB",
            p422="Invalid or unknown field",
            **_TOKEN_PROBLEMS,
        )
    ),
)
async def update_my_profile(
    patch: ProfilePatch,
    user: CurrentUser,
    profiles: ProfilesDep,
    if_match: Annotated[
        str | None, Header(description='`"<version>"` from the ETag, or `*`')
    ] = None,
) -> Response:
    expected = parse_if_match(if_match)
    changes = patch.model_dump(exclude_unset=True)
    epoch = profiles.cache.epoch
    try:
        view = await profiles.service.update_from_loop(
            user.sub, changes, expected, email=user.email
        )
    except StaleProfileVersion as stale:
        raise Problem(
            f"The profile is at version {stale.current.version}; "
            "fetch it again and retry with its ETag.",
            status=412,
            title="Precondition failed",
            headers={"ETag": etag_of(stale.current.version)},
        ) from None
    except ProfileErased as erased:
        raise _gone(erased) from None
    except InvalidProfileField as invalid:
        raise Problem(
            f"{invalid.field}: {invalid.message}",
            status=422,
            title="Unprocessable content",
            extra={"errors": [{"field": invalid.field, "message": invalid.message}]},
        ) from None
    return _own_profile(profiles.cache.put(view, epoch), user)


@router.get(
    "/{user_id}",
    response_model=PublicProfileOut,
    operation_id="getPublicProfile",
    summary="A user's public profile",
    responses=_problems(p404="No profile for this user id", p422="Not a UUID", **_TOKEN_PROBLEMS),
)
async def read_public_profile(
    user_id: uuid.UUID, _: CurrentUser, profiles: ProfilesDep
) -> Response:
    entry = profiles.cache.get(user_id)
    if entry is None:
        epoch = profiles.cache.epoch
        view = await run_in_threadpool(profiles.service.public_profile, user_id)
        if view is None:
            raise Problem(f"There is no profile for user {user_id}.", status=404, title="Not found")
        entry = profiles.cache.put(view, epoch)
    return Response(entry.public_body, media_type=JSON)
