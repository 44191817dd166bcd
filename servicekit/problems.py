"""Errors as application/problem+json (RFC 9457), translated once at the HTTP edge."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from servicekit import context

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("servicekit.http")


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
    """An RFC 9457 problem, served as application/problem+json."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    request_id: str | None = None


def problem_responses(described: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the problems a route answers with."""
    return {
        status: {
            "model": ProblemDetail,
            "description": text,
            "content": {PROBLEM_JSON: {}},
        }
        for status, text in described.items()
    }


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

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Never leak a traceback, SQL or an internal host to the client.
        log.exception("unhandled error", exc_info=exc)
        return problem_response(500, "Internal error", "An unexpected error occurred.")
