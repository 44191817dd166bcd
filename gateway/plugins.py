"""Kong's plugins as HAProxy rules: one translator per plugin, each answering a client with
Kong's status codes, headers and bodies.

A translator appends its rules to the proxy frontend's `Rules`; `on` is the condition that
selects the routes one configuration of the plugin applies to (`on_routes`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.kong import GatewayConfigError

RATE_WINDOWS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
SIZE_UNITS = {"bytes": 1, "kilobytes": 1024, "megabytes": 1024 * 1024}


def _json_str(value: str) -> str:
    """A JSON string literal safe inside an HAProxy single-quoted argument."""
    return json.dumps(value).replace("'", "\\u0027")


def reply(status: int, body: str, *headers: tuple[str, str]) -> str:
    """An answer from the gateway itself, as Kong gives it: JSON, with these headers."""
    extra = "".join(f' hdr {name} "{value}"' for name, value in headers)
    return (
        f"http-request return status {status} content-type application/json "
        f"lf-string '{body}'{extra}"
    )


def kong_message(text: str) -> str:
    """Kong's error body: the message, and the request id Kong adds to it."""
    return '{"message":' + _json_str(text) + ',"request_id":"%[var(txn.request_id)]"}'


class Rules:
    """The proxy frontend's rules, in the order HAProxy evaluates them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str, cond: str = "") -> None:
        self.lines.append(f"    {line} if {cond}" if cond else f"    {line}")

    def comment(self, text: str) -> None:
        self.lines.append(f"    # {text}")


def on_routes(routes: list[str]) -> str:
    """The condition that holds on these routes (the route a request matched is `txn.route`)."""
    return "{ var(txn.route) -m str -- " + " ".join(routes) + " }"


def render_correlation_id(r: Rules, config: Mapping[str, Any]) -> None:
    r.comment("correlation-id: keep the client's id or make one; pass it on; echo it")
    header = config.get("header_name", "Kong-Request-ID")
    if config.get("generator", "uuid#counter") not in ("uuid", "uuid#counter"):
        raise GatewayConfigError("correlation-id: only the uuid generators are reproduced")
    if config:
        r.add(
            f"http-request set-header {header} %[unique-id]",
            f"!{{ req.hdr({header}) -m len gt 0 }}",
        )
        r.add(f"http-request set-var(txn.request_id) req.hdr({header})")
        if config.get("echo_downstream", False):
            r.add(f"http-after-response set-header {header} %[var(txn.request_id)]")
    else:
        r.add("http-request set-var(txn.request_id) unique-id")


def render_cors(r: Rules, config: Mapping[str, Any], on: str) -> None:
    origins = config.get("origins") or ["*"]
    methods = ",".join(config.get("methods") or ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE"])
    r.comment("cors")
    if "*" in origins:
        r.add("http-request set-var(txn.cors_origin) str(*)", on)
    else:
        r.add(
            "http-request set-var(txn.cors_origin) req.hdr(origin)",
            f"{on} {{ req.hdr(origin) -m str -- {' '.join(origins)} }}",
        )
    preflight = f"{on} METH_OPTIONS {{ req.hdr(access-control-request-method) -m found }}"
    headers = [("Vary", "Origin")]
    if not config.get("preflight_continue", False):
        allow = [("Access-Control-Allow-Methods", methods)]
        if config.get("headers"):
            allow.append(("Access-Control-Allow-Headers", ",".join(config["headers"])))
        if config.get("max_age") is not None:
            allow.append(("Access-Control-Max-Age", str(config["max_age"])))
        r.add(
            "http-request return status 200 hdr Access-Control-Allow-Origin "
            '"%[var(txn.cors_origin)]" '
            + " ".join(f'hdr {n} "{v}"' for n, v in [*allow, *headers]),
            f"{preflight} {{ var(txn.cors_origin) -m found }}",
        )
        r.add("http-request return status 200 hdr Vary Origin", preflight)
    r.add(
        "http-after-response set-header Access-Control-Allow-Origin %[var(txn.cors_origin)]",
        "{ var(txn.cors_origin) -m found }",
    )
    if config.get("exposed_headers"):
        r.add(
            "http-after-response set-header Access-Control-Expose-Headers "
            f'"{",".join(config["exposed_headers"])}"',
            "{ var(txn.cors_origin) -m found }",
        )
    if config.get("credentials"):
        r.add(
            "http-after-response set-header Access-Control-Allow-Credentials true",
            "{ var(txn.cors_origin) -m found }",
        )


def render_jwt(
    r: Rules,
    config: Mapping[str, Any],
    on: str,
    credentials: Mapping[str, tuple[str, str]],
    *,
    key_dir: Path,
    index: int,
) -> None:
    claim = config.get("key_claim_name", "iss")
    realm = config.get("realm")
    www = f'Bearer realm=\\"{realm}\\"' if realm else "Bearer"
    bad = ("WWW-Authenticate", f'{www} error=\\"invalid_token\\"')
    r.comment(f"jwt #{index}: credential by `{claim}`, then algorithm, signature, claims")
    if not config.get("run_on_preflight", True):
        r.add("http-request set-var(txn.jwt_skip) bool(true)", f"{on} METH_OPTIONS")
    on = f"{on} !{{ var(txn.jwt_skip) -m bool }}"
    for param in config.get("uri_param_names", ["jwt"]):
        r.add(
            f"http-request set-var(txn.jwt) url_param({param})",
            f"{on} !{{ var(txn.jwt) -m found }}",
        )
    for cookie in config.get("cookie_names", []):
        r.add(
            f"http-request set-var(txn.jwt) req.cook({cookie})",
            f"{on} !{{ var(txn.jwt) -m found }}",
        )
    for name in config.get("header_names", ["authorization"]):
        r.add(
            f"http-request set-var(txn.jwt) http_auth_bearer({name})",
            f"{on} !{{ var(txn.jwt) -m found }}",
        )
    r.add(
        reply(401, kong_message("Unauthorized"), ("WWW-Authenticate", www)),
        f"{on} !{{ var(txn.jwt) -m len gt 0 }}",
    )
    r.add("http-request set-var(txn.jwt_alg) var(txn.jwt),jwt_header_query('$.alg')", on)
    r.add(
        reply(401, kong_message("Bad token; invalid JSON"), bad),
        f"{on} !{{ var(txn.jwt_alg) -m found }}",
    )
    r.add(f"http-request set-var(txn.jwt_key) var(txn.jwt),jwt_payload_query('$.{claim}')", on)
    r.add(
        f"http-request set-var(txn.jwt_key) var(txn.jwt),jwt_header_query('$.{claim}')",
        f"{on} !{{ var(txn.jwt_key) -m found }}",
    )
    r.add(
        reply(401, kong_message(f"No mandatory '{claim}' in claims"), bad),
        f"{on} !{{ var(txn.jwt_key) -m found }}",
    )
    for i, (kid, (algorithm, pem)) in enumerate(sorted(credentials.items())):
        if not algorithm.startswith(("RS", "ES", "PS")) or not pem:
            raise GatewayConfigError(
                f"jwt credential {kid}: only public-key algorithms are reproduced"
            )
        key_file = key_dir / f"{hashlib.sha256(kid.encode()).hexdigest()[:24]}.pem"
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(pem)
        cred = f"{{ var(txn.jwt_key) -m str -- {kid} }}"
        r.add(f"http-request set-var(txn.jwt_cred) int({i})", f"{on} {cred}")
        r.add(
            reply(401, kong_message("Invalid algorithm"), bad),
            f"{on} {{ var(txn.jwt_cred) -m int {i} }} !{{ var(txn.jwt_alg) -m str {algorithm} }}",
        )
        r.add(
            f'http-request set-var(txn.jwt_ok) var(txn.jwt),jwt_verify("{algorithm}","{key_file}")',
            f"{on} {{ var(txn.jwt_cred) -m int {i} }}",
        )
    r.add(
        reply(401, kong_message(f"No credentials found for given '{claim}'"), bad),
        f"{on} !{{ var(txn.jwt_cred) -m found }}",
    )
    r.add(
        reply(401, kong_message("Invalid signature"), bad), f"{on} !{{ var(txn.jwt_ok) -m int 1 }}"
    )
    claims = config.get("claims_to_verify") or []
    if claims:
        r.add("http-request set-var(txn.now) date", on)
    for name in claims:
        r.add(
            f"http-request set-var(txn.jwt_{name}) "
            f"var(txn.jwt),jwt_payload_query('$.{name}','int')",
            on,
        )
        r.add(
            reply(401, '{"' + name + '":"must be a number"}', bad),
            f"{on} !{{ var(txn.jwt_{name}) -m found }}",
        )
        if name == "exp":  # expired when exp <= now
            failed = "{ var(txn.now),sub(txn.jwt_exp) -m int ge 0 }"
            r.add(reply(401, '{"exp":"token expired"}', bad), f"{on} {failed}")
        elif name == "nbf":  # not valid before nbf
            failed = "{ var(txn.jwt_nbf),sub(txn.now) -m int gt 0 }"
            r.add(reply(401, '{"nbf":"token not valid yet"}', bad), f"{on} {failed}")
        else:
            raise GatewayConfigError(f"jwt: claims_to_verify {name!r} is not a Kong claim")
    if config.get("maximum_expiration", 0):
        raise GatewayConfigError("jwt: maximum_expiration is not reproduced locally")


def render_size_limit(r: Rules, config: Mapping[str, Any], on: str) -> None:
    limit = (
        int(config.get("allowed_payload_size", 128))
        * SIZE_UNITS[config.get("size_unit", "megabytes")]
    )
    r.comment("request-size-limiting")
    if config.get("require_content_length"):
        r.add(
            reply(411, kong_message("A valid Content-Length header is required")),
            f"{on} !{{ req.hdr(content-length) -m found }} "
            "{ req.hdr(transfer-encoding) -m found }",
        )
    r.add(
        reply(413, kong_message("Request size limit exceeded")),
        f"{on} {{ req.hdr_val(content-length) gt {limit} }}",
    )


def render_rate_limit(r: Rules, config: Mapping[str, Any], on: str, index: int) -> str:
    windows = [(w, config[w]) for w in RATE_WINDOWS if config.get(w)]
    if len(windows) != 1 or any(config.get(w) for w in ("month", "year")):
        raise GatewayConfigError(
            "rate-limiting: the local gateway reproduces one window per plugin"
        )
    if config.get("limit_by", "consumer") != "ip" or config.get("policy", "local") != "local":
        raise GatewayConfigError("rate-limiting: only limit_by ip with policy local is reproduced")
    window, limit = windows[0]
    seconds = RATE_WINDOWS[window]
    limit = int(limit)
    table = f"rate_limit_{index}"
    r.comment(f"rate-limiting #{index}: {limit} per {window} per client IP, fixed windows")
    r.add(f"http-request set-var(txn.rl_window) date,div({seconds})", on)
    r.add("http-request set-var(txn.rl_key) src,concat(@,txn.rl_window)", on)
    r.add(f"http-request track-sc0 var(txn.rl_key) table {table}", on)
    r.add("http-request set-var(txn.rl_count) sc_inc_gpc0(0)", on)
    r.add(f"http-request set-var(txn.rl_limit) int({limit})", on)
    r.add("http-request set-var(txn.rl_remaining) var(txn.rl_limit),sub(txn.rl_count)", on)
    r.add(
        "http-request set-var(txn.rl_remaining) int(0)",
        f"{on} {{ var(txn.rl_remaining) -m int lt 0 }}",
    )
    r.add(f"http-request set-var(txn.rl_reset) date,mod({seconds}),neg,add({seconds})", on)
    if not config.get("hide_client_headers", False):
        title = window.capitalize()
        after = "{ var(txn.rl_limit) -m found }"
        for name, var in (
            ("RateLimit-Limit", "rl_limit"),
            ("RateLimit-Remaining", "rl_remaining"),
            ("RateLimit-Reset", "rl_reset"),
            (f"X-RateLimit-Limit-{title}", "rl_limit"),
            (f"X-RateLimit-Remaining-{title}", "rl_remaining"),
        ):
            r.add(f"http-after-response set-header {name} %[var(txn.{var})]", after)
    message = config.get("error_message", "API rate limit exceeded")
    r.add(
        reply(
            int(config.get("error_code", 429)),
            kong_message(message),
            ("Retry-After", "%[var(txn.rl_reset)]"),
        ),
        f"{on} {{ var(txn.rl_count) -m int gt {limit} }}",
    )
    return "\n".join(
        [
            f"backend {table}",
            f"    stick-table type string len 64 size 200k expire {2 * seconds}s store gpc0",
            "",
        ]
    )
