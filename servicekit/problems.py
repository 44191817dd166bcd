"""Errors as application/problem+json (RFC 9457), translated once at the HTTP edge."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import eventsourcing.persistence
import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from servicekit import context

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("servicekit.http")

# The database lost, restarting or out of connections: the request may succeed a moment later.
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    psycopg.OperationalError,  # psycopg_pool's PoolTimeout included
    psycopg.InterfaceError,
    eventsourcing.persistence.OperationalError,  # psycopg's, as the event store re-raises them
    eventsourcing.persistence.InterfaceError,
)


class Problem(Exception):
    """A client error with its HTTP status. Domain errors subclass it or map to it."""

    status: int = 400
    title: str = "Bad request"
    type: str = "about:blank"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        if title is not None:
            self.title = title
        self.headers = headers or {}
        self.extra = extra or {}


class ProblemDetail(BaseModel):
    """An RFC 9457 problem, served as application/problem+json.

    Extension members (e.g. a readiness check's `checks`) may follow the standard ones.
    """

    model_config = ConfigDict(extra="allow")

    type: str = Field(default="about:blank", description="A URI naming the kind of problem")
    title: str = Field(description="Short summary of the kind of problem")
    status: int = Field(description="The HTTP status code")
    detail: str = Field(description="What went wrong this time, for a person to read")
    request_id: str | None = Field(
        default=None, description="The request's id, as in the `X-Request-ID` header"
    )


class FieldError(BaseModel):
    """One invalid part of a request."""

    field: str = Field(description="Dotted path of the field, `body` for the whole body")
    message: str


class ValidationProblem(ProblemDetail):
    """A 422 problem: the request was well-formed but some of its fields are invalid."""

    errors: list[FieldError] = Field(default_factory=list)


def problem_schemas() -> dict[str, Any]:
    """The problem models as OpenAPI component schemas (`#/components/schemas/<name>`)."""
    _, schemas = models_json_schema(
        [(ProblemDetail, "serialization"), (ValidationProblem, "serialization")],
        ref_template="#/components/schemas/{model}",
    )
    found: dict[str, Any] = schemas.get("$defs", {})
    return found


def problem_content(status: int) -> dict[str, Any]:
    """The `content` of a problem response: problem+json with its schema."""
    model = ValidationProblem if status == 422 else ProblemDetail
    return {PROBLEM_JSON: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}


def problem_responses(
    described: Mapping[int, str], *, headers: Mapping[int, dict[str, Any]] | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the problems a route answers with.

    `headers`: per status, the header objects (see `header`) that status carries, e.g. 423's
    `Retry-After`; those of every response (`X-Request-ID`) are added by servicekit.openapi.
    """
    headers = headers or {}
    responses: dict[int | str, dict[str, Any]] = {}
    for status, text in described.items():
        responses[status] = {"description": text, "content": problem_content(status)}
        if status in headers:
            responses[status]["headers"] = headers[status]
    return responses


def header(description: str, schema_type: str = "string") -> dict[str, Any]:
    """An OpenAPI response header object."""
    return {"description": description, "schema": {"type": schema_type}}


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    type_: str = "about:blank",
    headers: Mapping[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail}
    request_id = context.current().request_id
    if request_id:
        body["request_id"] = request_id
    body.update(extra or {})
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    412: "Precondition failed",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    423: "Locked",
    428: "Precondition required",
    429: "Too many requests",
    503: "Service unavailable",
}


def _describe(errors: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    items = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        items.append({"field": ".".join(loc) or "body", "message": err.get("msg", "invalid")})
    detail = "; ".join(f"{i['field']}: {i['message']}" for i in items[:5])
    return detail or "The request is invalid.", items


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            exc.status, exc.title, exc.detail, type_=exc.type, headers=exc.headers, extra=exc.extra
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return problem_response(400, "Malformed JSON", "The request body is not valid JSON.")
        detail, items = _describe(errors)
        return problem_response(422, _TITLES[422], detail, extra={"errors": items})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = _TITLES.get(exc.status_code, "Error")
        detail = exc.detail if isinstance(exc.detail, str) else title
        return problem_response(exc.status_code, title, detail, headers=exc.headers)

    async def _database_unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning(
            "database unavailable; answered 503",
            extra={"error": f"{type(exc).__name__}: {str(exc)[:200]}"},
        )
        return problem_response(
            503,
            _TITLES[503],
            "The database is unavailable at this moment; retry shortly.",
            headers={"Retry-After": "1"},
        )

    for error in DATABASE_UNAVAILABLE:
        app.add_exception_handler(error, _database_unavailable)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Never leak a traceback, SQL or an internal host to the client.
        log.exception("unhandled error", exc_info=exc)
        return problem_response(500, "Internal error", "An unexpected error occurred.")
