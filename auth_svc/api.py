"""HTTP edge of auth_svc: request/response models, dependencies, routes under /auth.

Routes that hash passwords or touch the event store are plain `def` (FastAPI runs them in its
thread pool). Domain errors become problem+json here, in one place.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import OAuth2PasswordRequestForm
from prometheus_client import Counter
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    ValidationError,
)

from auth_svc.application import AuthService, TokenPair
from auth_svc.domain import (
    AccountIsLocked,
    AuthError,
    EmailAlreadyRegistered,
    InvalidCredentials,
    InvalidRefreshToken,
    WrongPassword,
)
from auth_svc.keys import KeyStore
from servicekit.problems import header, problem_response, problem_responses
from servicekit.tokens import CurrentUser

# --- request and response models ------------------------------------------------------------


def _normalise_email(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


Email = Annotated[EmailStr, BeforeValidator(_normalise_email)]
NewPassword = Annotated[str, StringConstraints(min_length=8, max_length=128)]
# Any attempt is checked against the stored hash: a too-short guess is just a wrong password.
GivenPassword = Annotated[str, StringConstraints(min_length=1, max_length=128)]
# No NUL: it cannot be stored in a PostgreSQL text column by any projection of the name.
DisplayName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=r"^[^\x00]*$"),
]
RefreshToken = Annotated[str, StringConstraints(min_length=1, max_length=512)]


class StrictModel(BaseModel):
    """Unknown fields are an error (422), not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class RegisterRequest(StrictModel):
    email: Email
    password: NewPassword
    display_name: DisplayName | None = None


class LoginRequest(StrictModel):
    email: Email
    password: GivenPassword


class RefreshRequest(StrictModel):
    refresh_token: RefreshToken


class ChangePasswordRequest(StrictModel):
    current_password: GivenPassword
    new_password: NewPassword


class RegisteredAccount(BaseModel):
    user_id: uuid.UUID
    email: str


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - a scheme name
    expires_in: int = Field(description="Seconds until the access token expires")
    refresh_token: str

    @classmethod
    def of(cls, pair: TokenPair) -> TokenResponse:
        return cls(
            access_token=pair.access_token,
            expires_in=pair.expires_in,
            refresh_token=pair.refresh_token,
        )


class JsonWebKeySet(BaseModel):
    keys: list[dict[str, Any]]


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    return problem_responses(
        {c: _DESCRIPTIONS.get(c, "Error") for c in (*codes, 400, 413, 422)},
        headers={423: {"Retry-After": header("Seconds until the lockout ends.", "integer")}},
    )


_DESCRIPTIONS = {
    400: "Malformed JSON",
    401: "Not authenticated",
    409: "Conflict",
    413: "Request body over 64 KiB",
    422: "Invalid request",
    423: "Account locked; see Retry-After",
}

API_DESCRIPTION = (
    "Accounts and tokens: registration, login (an access token and a refresh token), "
    "refresh, logout, password change, and the public keys (JWKS) that verify access tokens "
    "(RS256, `kid` in the header)."
)

# --- dependencies ---------------------------------------------------------------------------


async def _auth_service(request: Request) -> AuthService:
    service: AuthService = request.app.state.auth_service
    return service


async def _key_store(request: Request) -> KeyStore:
    keys: KeyStore = request.app.state.key_store
    return keys


AuthServiceDep = Annotated[AuthService, Depends(_auth_service)]
KeyStoreDep = Annotated[KeyStore, Depends(_key_store)]
PasswordForm = Annotated[OAuth2PasswordRequestForm, Depends()]

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

# --- routes ---------------------------------------------------------------------------------

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    response_model=RegisteredAccount,
    operation_id="register",
    summary="Create an account",
    responses=problems(409),
)
def register(body: RegisterRequest, auth: AuthServiceDep) -> RegisteredAccount:
    """Create an account. The e-mail address is trimmed and lower-cased."""
    user_id = auth.register(body.email, body.password, body.display_name)
    return RegisteredAccount(user_id=user_id, email=body.email)


LOGINS = Counter("auth_logins_total", "Login attempts by outcome", ["outcome"])
_LOGIN_OUTCOMES = {o: LOGINS.labels(o) for o in ("succeeded", "failed", "locked")}


def counted_login(auth: AuthService, email: str, password: str) -> TokenPair:
    """Log in, counting the attempt as succeeded, failed (401) or locked (423)."""
    try:
        pair = auth.login(email, password)
    except AccountIsLocked:
        _LOGIN_OUTCOMES["locked"].inc()
        raise
    except InvalidCredentials:
        _LOGIN_OUTCOMES["failed"].inc()
        raise
    _LOGIN_OUTCOMES["succeeded"].inc()
    return pair


@router.post(
    "/login",
    response_model=TokenResponse,
    operation_id="login",
    summary="Log in with e-mail and password",
    responses=problems(401, 423),
)
def login(body: LoginRequest, auth: AuthServiceDep, response: Response) -> TokenResponse:
    """Exchange e-mail and password for an access token and a refresh token."""
    response.headers.update(NO_STORE)
    return TokenResponse.of(counted_login(auth, body.email, body.password))


@router.post(
    "/token",
    response_model=TokenResponse,
    operation_id="loginWithPasswordForm",
    summary="Log in with the OAuth2 password form",
    responses=problems(401, 423),
)
def token(form: PasswordForm, auth: AuthServiceDep, response: Response) -> TokenResponse:
    """OAuth2 password flow (what Swagger UI's Authorize sends): `username` is the e-mail."""
    try:
        body = LoginRequest(email=form.username, password=form.password)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    response.headers.update(NO_STORE)
    return TokenResponse.of(counted_login(auth, body.email, body.password))


@router.post(
    "/refresh",
    response_model=TokenResponse,
    operation_id="refreshTokens",
    summary="Spend a refresh token for a new pair",
    responses=problems(401),
)
def refresh(body: RefreshRequest, auth: AuthServiceDep, response: Response) -> TokenResponse:
    """Spend a refresh token for a new pair. A spent token revokes its whole session."""
    response.headers.update(NO_STORE)
    return TokenResponse.of(auth.refresh(body.refresh_token))


@router.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="logout",
    summary="End a session",
    responses=problems(),
)
def logout(body: RefreshRequest, auth: AuthServiceDep) -> None:
    """End the refresh token's session. Unknown tokens are accepted silently."""
    auth.logout(body.refresh_token)


@router.post(
    "/password",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="changePassword",
    summary="Change the password",
    responses=problems(401),
)
def change_password(body: ChangePasswordRequest, user: CurrentUser, auth: AuthServiceDep) -> None:
    """Change the password (the current one is required); every refresh token is revoked."""
    auth.change_password(user.sub, body.current_password, body.new_password)


@router.get(
    "/.well-known/jwks.json",
    response_model=JsonWebKeySet,
    operation_id="getJwks",
    summary="Public keys that verify access tokens",
)
def jwks(keys: KeyStoreDep, response: Response) -> JsonWebKeySet:
    """Public keys that may verify a live access token (`kid`, `alg`: RS256)."""
    response.headers["Cache-Control"] = "public, max-age=5"
    return JsonWebKeySet.model_validate(keys.jwks())


# --- domain errors -> problem+json, once ----------------------------------------------------

_STATUS: dict[type[AuthError], int] = {
    EmailAlreadyRegistered: 409,
    InvalidCredentials: 401,
    WrongPassword: 401,
    InvalidRefreshToken: 401,
    AccountIsLocked: 423,
}
_TITLES = {401: "Unauthorized", 409: "Conflict", 423: "Locked"}


def problem_for(exc: AuthError) -> JSONResponse:
    status_code = next((s for t, s in _STATUS.items() if isinstance(exc, t)), 400)
    headers: dict[str, str] = {}
    if isinstance(exc, AccountIsLocked):
        headers["Retry-After"] = str(exc.retry_after_seconds)
    return problem_response(
        status_code, _TITLES.get(status_code, "Bad request"), str(exc), headers=headers
    )


def install_error_handlers(app: FastAPI) -> None:
    async def _auth_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AuthError)
        return problem_for(exc)

    app.add_exception_handler(AuthError, _auth_error)
