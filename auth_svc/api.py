"""HTTP edge of auth_svc: request/response models, dependencies, routes under /auth.

Routes that hash passwords or touch the event store are plain `def` (FastAPI runs them in its
thread pool). Domain errors become problem+json here, in one place.
"""

from __future__ import annotations

import ipaddress
import uuid
from datetime import datetime
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

from auth_svc.application import AuthService, Client, TokenPair
from auth_svc.domain import (
    AccountDeleted,
    AccountIsLocked,
    AuthError,
    EmailAlreadyRegistered,
    EmailAlreadyVerified,
    EmailNotVerified,
    ErasureUnavailable,
    InvalidCredentials,
    InvalidLinkToken,
    InvalidRefreshToken,
    SessionNotFound,
    WrongPassword,
)
from auth_svc.keys import KeyStore
from auth_svc.limits import TooManyRequests
from auth_svc.screening import PasswordTooCommon, ScreeningUnavailable
from servicekit.problems import header, problem_response, problem_responses
from servicekit.tokens import CurrentUser, InvalidToken
from shared_contracts.tokens import ACCESS_TOKEN_ALGORITHM, CLAIMS_SUPPORTED, AccessTokenClaims

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
# A verification or reset token as the link carries it (67 base64url characters today).
LinkToken = Annotated[str, StringConstraints(min_length=1, max_length=512)]


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


class DeleteAccountRequest(StrictModel):
    password: GivenPassword = Field(description="The account's current password")


class VerifyEmailRequest(StrictModel):
    token: LinkToken


class ForgotPasswordRequest(StrictModel):
    email: Email


class ResetPasswordRequest(StrictModel):
    token: LinkToken
    new_password: NewPassword


class Accepted(BaseModel):
    detail: str


FORGOT_ACCEPTED = Accepted(
    detail="If an account uses this address, a link to reset its password is on its way."
)


class SessionOut(BaseModel):
    id: uuid.UUID = Field(description="The session id: the `sid` of its access tokens")
    created_at: datetime | None
    last_used_at: datetime | None = Field(description="When its refresh token was last used")
    user_agent: str | None
    client_ip: str | None = Field(description="The client's address as seen by the gateway")
    current: bool = Field(description="The session of the access token that asked")


class SessionList(BaseModel):
    sessions: list[SessionOut]


class OpenIdConfiguration(BaseModel):
    """The subset of OpenID Connect Discovery 1.0 metadata that applies to this issuer."""

    issuer: str
    jwks_uri: str
    token_endpoint: str
    grant_types_supported: list[str]
    response_types_supported: list[str]
    subject_types_supported: list[str]
    id_token_signing_alg_values_supported: list[str]
    token_endpoint_auth_methods_supported: list[str]
    claims_supported: list[str]


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
        headers={
            423: {"Retry-After": header("Seconds until the lockout ends.", "integer")},
            429: {"Retry-After": header("Seconds until a request may succeed.", "integer")},
            503: {"Retry-After": header("Seconds to wait before trying again.", "integer")},
        },
    )


_DESCRIPTIONS = {
    400: "Malformed JSON",
    401: "Not authenticated",
    403: "The account's e-mail address is not verified (type ends in email-not-verified)",
    404: "Not found",
    409: "Conflict",
    410: "The account is already deleted and erased",
    413: "Request body over 64 KiB",
    422: "Invalid request (or a password too common)",
    423: "Account locked; see Retry-After",
    429: "Too many requests of this kind; see Retry-After",
    503: "A dependency (links, breach check) is unavailable, or (deletion) no personal data "
    "key is configured",
}

API_DESCRIPTION = (
    "Accounts and tokens: registration, login (an access token and a refresh token), "
    "refresh, logout, password change, e-mail verification, password reset, sessions, account "
    "deletion (with erasure of the person's data), and the "
    "public keys (JWKS, discovery) that verify access tokens (RS256, `kid` in the header)."
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


def _live_user(user: CurrentUser, auth: AuthServiceDep) -> AccessTokenClaims:
    """The caller of one of auth_svc's own Bearer routes, refused (401, as user_svc refuses
    it) once the session of its token (`sid`) has ended: auth_svc knows its sessions, so it
    asks the account (cached, one read of the events since) instead of waiting for
    `auth.session.revoked`. A token without `sid` (issued before sessions) is taken as is.
    Plain `def`: FastAPI runs it in the thread pool, as the routes themselves."""
    if user.sid is not None and not auth.session_is_live(user.sub, user.sid):
        raise InvalidToken("The session of this token has ended.")
    return user


LiveUser = Annotated[AccessTokenClaims, Depends(_live_user)]


def _account_owner(user: CurrentUser, auth: AuthServiceDep) -> AccessTokenClaims:
    """As `_live_user`, except that the token of a deleted account gets through: deleting
    ended every session, and a deletion repeated after a crash must reach the account to
    finish the erasure (or learn it is done: 410)."""
    if (
        user.sid is not None
        and not auth.session_is_live(user.sub, user.sid)
        and not auth.is_deleted(user.sub)
    ):
        raise InvalidToken("The session of this token has ended.")
    return user


AccountOwner = Annotated[AccessTokenClaims, Depends(_account_owner)]

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def client_ip(request: Request, trusted: list[str]) -> str | None:
    """The client's address: the peer, unless the peer is a trusted proxy (the gateway), then
    the right-most address of `X-Forwarded-For` that is not a trusted proxy."""
    peer = request.client.host if request.client else None
    networks = [ipaddress.ip_network(n, strict=False) for n in trusted]

    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in networks)

    if peer is None or not is_trusted(peer):
        return peer
    forwarded = [
        part.strip()
        for value in request.headers.getlist("x-forwarded-for")
        for part in value.split(",")
        if part.strip()
    ]
    for address in reversed(forwarded):
        if not is_trusted(address):
            try:
                return str(ipaddress.ip_address(address))
            except ValueError:
                return peer  # garbage from beyond the gateway: trust only what we saw
    return forwarded[0] if forwarded else peer


def request_client(request: Request, auth: AuthService) -> Client:
    return Client(
        user_agent=request.headers.get("user-agent"),
        ip=client_ip(request, auth.settings.trusted_proxies),
    )


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


def counted_login(
    auth: AuthService, email: str, password: str, client: Client | None = None
) -> TokenPair:
    """Log in, counting the attempt as succeeded, failed (401) or locked (423)."""
    try:
        pair = auth.login(email, password, client)
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
    responses=problems(401, 403, 423),
)
def login(
    body: LoginRequest, auth: AuthServiceDep, request: Request, response: Response
) -> TokenResponse:
    """Exchange e-mail and password for an access token and a refresh token (a new
    session). With AUTH_REQUIRE_VERIFIED_EMAIL an unverified account gets a 403."""
    response.headers.update(NO_STORE)
    client = request_client(request, auth)
    return TokenResponse.of(counted_login(auth, body.email, body.password, client))


@router.post(
    "/token",
    response_model=TokenResponse,
    operation_id="loginWithPasswordForm",
    summary="Log in with the OAuth2 password form",
    responses=problems(401, 403, 423),
)
def token(
    form: PasswordForm, auth: AuthServiceDep, request: Request, response: Response
) -> TokenResponse:
    """OAuth2 password flow (what Swagger UI's Authorize sends): `username` is the e-mail."""
    try:
        body = LoginRequest(email=form.username, password=form.password)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    response.headers.update(NO_STORE)
    client = request_client(request, auth)
    return TokenResponse.of(counted_login(auth, body.email, body.password, client))


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
    responses=problems(401, 503),
)
def change_password(body: ChangePasswordRequest, user: LiveUser, auth: AuthServiceDep) -> None:
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


# --- e-mail verification, password reset, sessions ------------------------------------------


@router.post(
    "/email/verify",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="verifyEmail",
    summary="Confirm the e-mail address with the link's token",
    responses=problems(429),
)
def verify_email(body: VerifyEmailRequest, auth: AuthServiceDep, request: Request) -> None:
    """Spend the token of a verification link. Any token that does not verify (unknown,
    expired, spent, tampered, or a reset token) gets the same 400 and changes nothing."""
    auth.token_attempts.hit(request_client(request, auth).ip or "unknown")
    auth.verify_email(body.token)


@router.post(
    "/email/verify/resend",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="resendVerificationEmail",
    summary="Mail a new verification link",
    responses=problems(401, 409, 429),
)
def resend_verification(user: LiveUser, auth: AuthServiceDep) -> None:
    """Mail a new verification link to the caller's address (rate-limited per account);
    earlier links stop working."""
    auth.resend_verification(user.sub)


@router.post(
    "/password/forgot",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    operation_id="forgotPassword",
    summary="Mail a password reset link",
    responses=problems(429),
)
def forgot_password(
    body: ForgotPasswordRequest, auth: AuthServiceDep, request: Request
) -> Accepted:
    """Mail a single-use reset link if an account uses the address. The answer (body and
    timing) is the same whether it does or not; rate-limited per address and per client IP."""
    auth.forgot_password(body.email, request_client(request, auth).ip)
    return FORGOT_ACCEPTED


@router.post(
    "/password/reset",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="resetPassword",
    summary="Set a new password with a reset link's token",
    responses=problems(429, 503),
)
def reset_password(body: ResetPasswordRequest, auth: AuthServiceDep, request: Request) -> None:
    """Spend the reset token: the new password applies, every session is revoked and a
    lockout is lifted. An invalid or expired token gets a 400 and changes nothing."""
    auth.token_attempts.hit(request_client(request, auth).ip or "unknown")
    auth.reset_password(body.token, body.new_password)


@router.get(
    "/sessions",
    response_model=SessionList,
    operation_id="listSessions",
    summary="The caller's sessions",
    responses=problems(401),
)
def list_sessions(user: LiveUser, auth: AuthServiceDep, response: Response) -> SessionList:
    """Each login opens a session (its refresh tokens); `current` marks the caller's."""
    response.headers.update(NO_STORE)
    return SessionList(
        sessions=[
            SessionOut(
                id=s.id,
                created_at=s.created_at,
                last_used_at=s.last_used_at,
                user_agent=s.user_agent,
                client_ip=s.client_ip,
                current=s.id == user.sid,
            )
            for s in auth.sessions(user.sub)
        ]
    )


@router.delete(
    "/sessions/{session_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="endSession",
    summary="End one of the caller's sessions",
    responses=problems(401, 404),
)
def end_session(session_id: uuid.UUID, user: LiveUser, auth: AuthServiceDep) -> None:
    """Its refresh token stops working at once, its access tokens within about a second
    everywhere (`auth.session.revoked`)."""
    auth.end_session(user.sub, session_id)


@router.post(
    "/logout-all",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="logoutEverywhere",
    summary="End every session of the caller",
    responses=problems(401),
)
def logout_all(user: LiveUser, auth: AuthServiceDep) -> None:
    """End every session of the caller, this one included."""
    auth.end_every_session(user.sub)


ACCOUNT_DELETED = Accepted(
    detail="The account is deleted: every session has ended and the person's data is being "
    "erased in every service."
)


@router.delete(
    "/account",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    operation_id="deleteAccount",
    summary="Delete the caller's account and erase their data",
    responses=problems(401, 410, 503),
)
def delete_account(
    body: DeleteAccountRequest, user: AccountOwner, auth: AuthServiceDep
) -> Accepted:
    """Delete the caller's account (the current password is required): it can no longer log
    in, every session ends, auth_svc shreds the person's data in its store and publishes
    `auth.account.deleted`, on which every other service erases them (hence 202). The address
    may register again, as a new account. A wrong password (401) erases nothing; once the
    erasure is done, a repeated request gets 410."""
    auth.delete_account(user.sub, body.password)
    return ACCOUNT_DELETED


@router.get(
    "/.well-known/openid-configuration",
    response_model=OpenIdConfiguration,
    operation_id="getOpenIdConfiguration",
    summary="Discovery: issuer, JWKS, token endpoint, algorithms, claims",
)
def openid_configuration(auth: AuthServiceDep, request: Request) -> OpenIdConfiguration:
    """OpenID Connect Discovery metadata, so JOSE and gateway libraries configure
    themselves. URLs are absolute, on the host the caller used (the gateway's)."""
    base = str(request.base_url).rstrip("/")
    return OpenIdConfiguration(
        issuer=auth.settings.issuer,
        jwks_uri=f"{base}/auth/.well-known/jwks.json",
        token_endpoint=f"{base}/auth/token",
        grant_types_supported=["password", "refresh_token"],
        response_types_supported=["token"],
        subject_types_supported=["public"],
        id_token_signing_alg_values_supported=[ACCESS_TOKEN_ALGORITHM],
        token_endpoint_auth_methods_supported=["none"],
        claims_supported=list(CLAIMS_SUPPORTED),
    )


# --- domain errors -> problem+json, once ----------------------------------------------------

_STATUS: dict[type[AuthError], int] = {
    EmailAlreadyRegistered: 409,
    InvalidCredentials: 401,
    WrongPassword: 401,
    InvalidRefreshToken: 401,
    AccountIsLocked: 423,
    InvalidLinkToken: 400,
    EmailNotVerified: 403,
    EmailAlreadyVerified: 409,
    SessionNotFound: 404,
    AccountDeleted: 410,
    ErasureUnavailable: 503,
    PasswordTooCommon: 422,
    TooManyRequests: 429,
    ScreeningUnavailable: 503,
}
_TITLES = {
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    410: "Gone",
    422: "Unprocessable content",
    423: "Locked",
    429: "Too many requests",
    503: "Service unavailable",
}
# Problems a client tells apart by `type` rather than by status alone.
_TYPES: dict[type[AuthError], str] = {
    EmailNotVerified: "https://eskit.dev/problems/email-not-verified",
    InvalidLinkToken: "https://eskit.dev/problems/invalid-link-token",
    PasswordTooCommon: "https://eskit.dev/problems/password-too-common",
}


def problem_for(exc: AuthError) -> JSONResponse:
    status_code = next((s for t, s in _STATUS.items() if isinstance(exc, t)), 400)
    headers: dict[str, str] = {}
    if isinstance(exc, AccountIsLocked | TooManyRequests):
        headers["Retry-After"] = str(exc.retry_after_seconds)
    elif status_code == 503:
        headers["Retry-After"] = "30"
    type_ = next((u for t, u in _TYPES.items() if isinstance(exc, t)), "about:blank")
    return problem_response(
        status_code,
        _TITLES.get(status_code, "Bad request"),
        str(exc),
        type_=type_,
        headers=headers,
    )


def install_error_handlers(app: FastAPI) -> None:
    async def _auth_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AuthError)
        return problem_for(exc)

    app.add_exception_handler(AuthError, _auth_error)
