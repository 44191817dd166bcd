"""The gateway: Kong's declarative `compose/kong.yml`, its credentials, and a local stand-in.

`compose/kong.yml` is the single source of gateway truth. Two things are derived from it:

- the same file with the jwt consumer's credentials filled in, one per auth_svc signing key
  (Kong OSS has no JWKS support: it finds the credential by the token's `kid`), for Kong;
- an HAProxy configuration that behaves like Kong with that file for a client (same routes,
  same status codes and bodies for missing, bad and expired tokens, rate limits, body limits
  and request ids), for `esctl up` on a machine without Kong.

Only the plugins and fields Kong would accept are rendered, and only those this module can
reproduce; anything else is an error, so the two never drift apart silently.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_KONG_CONFIG = REPO_ROOT / "compose" / "kong.yml"
JWT_ALGORITHM = "RS256"
SUPPORTED_PLUGINS = (
    "correlation-id",
    "cors",
    "jwt",
    "request-size-limiting",
    "rate-limiting",
    "prometheus",
)
# Kong's plugin order (higher priority runs first); the local gateway keeps it.
PLUGIN_PRIORITY = {
    "correlation-id": 100001,
    "cors": 2000,
    "jwt": 1450,
    "request-size-limiting": 951,
    "rate-limiting": 910,
    "prometheus": 13,
}
RATE_WINDOWS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
SIZE_UNITS = {"bytes": 1, "kilobytes": 1024, "megabytes": 1024 * 1024}


class GatewaySettings(BaseSettings):
    """The local gateway of `esctl up`, read from `GATEWAY_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    host: str = Field(default="127.0.0.1", description="Interface the local gateway binds to.")
    port: int = Field(default=8000, description="Port of the local gateway (Kong's proxy port).")
    status_port: int = Field(
        default=8100,
        description="Port of the gateway's status listener: /health/ready, /metrics.",
    )
    config: Path = Field(
        default=DEFAULT_KONG_CONFIG, description="Kong declarative file the gateway follows."
    )
    work_dir: Path = Field(
        default=REPO_ROOT / "var" / "gateway",
        description="Where the rendered HAProxy configuration and public keys are written.",
    )
    haproxy: str = Field(default="haproxy", description="The HAProxy executable.")


class GatewayConfigError(ValueError):
    """kong.yml asks for something the local gateway cannot reproduce faithfully."""


# --- kong.yml and its credentials -------------------------------------------------------------


def load_kong(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    if not isinstance(document, dict) or document.get("_format_version") != "3.0":
        raise GatewayConfigError(f"{path}: not a Kong 3 declarative file (_format_version 3.0)")
    return document


def jwt_consumer(kong: Mapping[str, Any]) -> dict[str, Any]:
    """The one consumer that owns the jwt credentials (every token maps to it)."""
    owners = [c for c in kong.get("consumers", []) if "jwt_secrets" in c]
    if len(owners) != 1:
        raise GatewayConfigError("kong.yml needs exactly one consumer with `jwt_secrets`")
    consumer: dict[str, Any] = owners[0]
    return consumer


def with_credentials(kong: Mapping[str, Any], public_keys: Mapping[str, str]) -> dict[str, Any]:
    """kong.yml with one jwt credential per signing key (`key` = the key's `kid`)."""
    rendered = copy.deepcopy(dict(kong))
    jwt_consumer(rendered)["jwt_secrets"] = [
        {
            "key": kid,
            "algorithm": JWT_ALGORITHM,
            "rsa_public_key": pem,
            # Required by the schema, never used: Kong reads `secret` only for HS* algorithms,
            # and a token's `alg` must equal the credential's. Derived, so renders are stable.
            "secret": hashlib.sha256(pem.encode()).hexdigest(),
        }
        for kid, pem in sorted(public_keys.items())
    ]
    return rendered


def dump_kong(kong: Mapping[str, Any]) -> str:
    header = "# Rendered by `esctl gateway render` from compose/kong.yml: do not edit, re-render.\n"
    return header + yaml.safe_dump(dict(kong), sort_keys=False, width=100)


def k8s_credentials(
    public_keys: Mapping[str, str], *, consumer: str = "eskit-clients", namespace: str = "eskit"
) -> list[dict[str, Any]]:
    """Kong Ingress Controller objects for the same credentials: a Secret per key, and the
    KongConsumer listing them (apply with `kubectl apply --server-side`)."""
    secrets: list[dict[str, Any]] = []
    for kid, pem in sorted(public_keys.items()):
        name = "eskit-jwt-" + hashlib.sha256(kid.encode()).hexdigest()[:16]
        secrets.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": {
                        "konghq.com/credential": "jwt",
                        "app.kubernetes.io/part-of": "eskit",
                    },
                },
                "type": "Opaque",
                "stringData": {"key": kid, "algorithm": JWT_ALGORITHM, "rsa_public_key": pem},
            }
        )
    kong_consumer = {
        "apiVersion": "configuration.konghq.com/v1",
        "kind": "KongConsumer",
        "metadata": {
            "name": consumer,
            "namespace": namespace,
            "annotations": {"kubernetes.io/ingress.class": "kong"},
        },
        "username": consumer,
        "credentials": [s["metadata"]["name"] for s in secrets],
    }
    return [*secrets, kong_consumer]


def published_keys_reader() -> Any:
    """A callable returning kid -> public PEM of every key auth_svc publishes, re-read from
    auth_svc's database at most every `AUTH_KEYS_REFRESH_SECONDS`."""
    from auth_svc.keys import KeyStore
    from auth_svc.settings import AuthSettings

    store = KeyStore(AuthSettings())
    store.open()
    return store


# --- the route table and effective plugins ----------------------------------------------------


@dataclass
class Route:
    name: str
    service: str
    paths: list[str]
    methods: list[str]
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Upstream:
    name: str
    targets: list[str]
    health_path: str | None
    interval: float
    fall: int
    rise: int
    timeout: float


@dataclass
class Service:
    name: str
    upstream: str
    connect_timeout_ms: int
    read_timeout_ms: int
    retries: int


@dataclass
class GatewayModel:
    routes: list[Route]
    services: dict[str, Service]
    upstreams: dict[str, Upstream]
    credentials: dict[str, tuple[str, str]]  # kid -> (algorithm, public key PEM)
    globals: dict[str, dict[str, Any]]


def _plugins(entries: Iterable[Mapping[str, Any]], where: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for entry in entries:
        name = entry["name"]
        if entry.get("enabled", True) is False:
            continue
        if name not in SUPPORTED_PLUGINS:
            raise GatewayConfigError(f"{where}: plugin {name!r} has no local equivalent")
        found[name] = dict(entry.get("config") or {})
    return found


def gateway_model(kong: Mapping[str, Any], targets: Mapping[str, list[str]]) -> GatewayModel:
    """kong.yml as routes with their effective plugins (route > service > global, by name).

    `targets` replaces an upstream's targets (Docker host names mean nothing here)."""
    upstreams: dict[str, Upstream] = {}
    for up in kong.get("upstreams", []):
        active = (up.get("healthchecks") or {}).get("active") or {}
        healthy = active.get("healthy") or {}
        unhealthy = active.get("unhealthy") or {}
        upstreams[up["name"]] = Upstream(
            name=up["name"],
            targets=list(targets.get(up["name"], [t["target"] for t in up.get("targets", [])])),
            health_path=active.get("http_path") if healthy.get("interval", 0) else None,
            interval=float(healthy.get("interval") or 5),
            fall=int(unhealthy.get("http_failures") or 2),
            rise=int(healthy.get("successes") or 1),
            timeout=float(active.get("timeout") or 2),
        )
    globals_ = _plugins(kong.get("plugins", []), "global plugins")
    services: dict[str, Service] = {}
    routes: list[Route] = []
    for svc in kong.get("services", []):
        host = svc["host"]
        if host not in upstreams:
            upstreams[host] = Upstream(host, [f"{host}:{svc.get('port', 80)}"], None, 5, 2, 1, 2)
        if host in targets:
            upstreams[host].targets = list(targets[host])
        services[svc["name"]] = Service(
            name=svc["name"],
            upstream=host,
            connect_timeout_ms=int(svc.get("connect_timeout", 60000)),
            read_timeout_ms=int(svc.get("read_timeout", 60000)),
            retries=int(svc.get("retries", 5)),
        )
        service_plugins = _plugins(svc.get("plugins", []), f"service {svc['name']}")
        for r in svc.get("routes", []):
            if r.get("strip_path", True) is not False:
                raise GatewayConfigError(f"route {r['name']}: services own their prefixes")
            plugins = {**globals_, **service_plugins, **_plugins(r.get("plugins", []), r["name"])}
            routes.append(
                Route(
                    r["name"], svc["name"], list(r["paths"]), list(r.get("methods") or []), plugins
                )
            )
    credentials = {
        s["key"]: (s.get("algorithm", "HS256"), s.get("rsa_public_key", ""))
        for s in jwt_consumer(kong)["jwt_secrets"]
    }
    return GatewayModel(routes, services, upstreams, credentials, globals_)


# --- HAProxy ----------------------------------------------------------------------------------


def _json_str(value: str) -> str:
    """A JSON string literal safe inside an HAProxy single-quoted argument."""
    return json.dumps(value).replace("'", "\\u0027")


def _reply(status: int, body: str, *headers: tuple[str, str]) -> str:
    extra = "".join(f' hdr {name} "{value}"' for name, value in headers)
    return (
        f"http-request return status {status} content-type application/json "
        f"lf-string '{body}'{extra}"
    )


def _message(text: str) -> str:
    return '{"message":' + _json_str(text) + ',"request_id":"%[var(txn.request_id)]"}'


class _Rules:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str, cond: str = "") -> None:
        self.lines.append(f"    {line} if {cond}" if cond else f"    {line}")

    def comment(self, text: str) -> None:
        self.lines.append(f"    # {text}")


def _instances(model: GatewayModel, plugin: str) -> list[tuple[dict[str, Any], list[str]]]:
    """Each distinct config of `plugin` with the routes it applies to."""
    groups: list[tuple[dict[str, Any], list[str]]] = []
    for route in model.routes:
        config = route.plugins.get(plugin)
        if config is None:
            continue
        for existing, names in groups:
            if existing == config:
                names.append(route.name)
                break
        else:
            groups.append((config, [route.name]))
    return groups


def _on(routes: list[str]) -> str:
    return "{ var(txn.route) -m str " + " ".join(routes) + " }"


def render_haproxy(model: GatewayModel, settings: GatewaySettings, key_dir: Path) -> str:
    """An HAProxy 2.6 configuration equivalent, for a client, to Kong with this model."""
    r = _Rules()
    tables: list[str] = []
    r.comment("correlation-id: keep the client's id or make one; pass it on; echo it")
    corr = model.globals.get("correlation-id") or {}
    header = corr.get("header_name", "Kong-Request-ID")
    if corr.get("generator", "uuid#counter") not in ("uuid", "uuid#counter"):
        raise GatewayConfigError("correlation-id: only the uuid generators are reproduced")
    if corr:
        r.add(
            f"http-request set-header {header} %[unique-id]",
            f"!{{ req.hdr({header}) -m len gt 0 }}",
        )
        r.add(f"http-request set-var(txn.request_id) req.hdr({header})")
        if corr.get("echo_downstream", False):
            r.add(f"http-after-response set-header {header} %[var(txn.request_id)]")
    else:
        r.add("http-request set-var(txn.request_id) unique-id")

    r.comment("routes, longest path first (Kong's prefix matching)")
    pairs = sorted(
        ((p, route) for route in model.routes for p in route.paths), key=lambda x: -len(x[0])
    )
    for path, route in pairs:
        methods = f" {{ method {' '.join(route.methods)} }}" if route.methods else ""
        r.add(
            f"http-request set-var(txn.route) str({route.name})",
            f"!{{ var(txn.route) -m found }} {{ path_beg {path} }}{methods}",
        )
    r.add(
        _reply(
            404,
            '{"message":"no Route matched with those values",'
            '"request_id":"%[var(txn.request_id)]"}',
        ),
        "!{ var(txn.route) -m found }",
    )

    for plugin in sorted(PLUGIN_PRIORITY, key=lambda p: -PLUGIN_PRIORITY[p]):
        for index, (config, routes) in enumerate(_instances(model, plugin)):
            on = _on(routes)
            if plugin == "cors":
                _render_cors(r, config, on)
            elif plugin == "jwt":
                _render_jwt(r, config, on, model, key_dir=key_dir, index=index)
            elif plugin == "request-size-limiting":
                _render_size_limit(r, config, on)
            elif plugin == "rate-limiting":
                tables.append(_render_rate_limit(r, config, on, index))

    for service in model.services.values():
        routes = [route.name for route in model.routes if route.service == service.name]
        r.add(f"use_backend svc_{service.name}", _on(routes))

    lines = [
        "# Rendered by `esctl gateway run` from kong.yml: do not edit.",
        "global",
        "    maxconn 4096",
        "    tune.bufsize 32768",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    timeout http-request 10s",
        "    timeout http-keep-alive 60s",
        "    option http-keep-alive",
        "    option forwardfor",
        "",
        "frontend status",
        f"    bind {settings.host}:{settings.status_port}",
        "    http-request use-service prometheus-exporter if { path /metrics }",
    ]
    ready = " ".join(f"{{ nbsrv(svc_{s}) gt 0 }}" for s in model.services)
    lines += [
        "    http-request return status 200 content-type application/json "
        'string \'{"status":"ok"}\' if { path /health/live }',
        "    http-request return status 200 content-type application/json "
        f'string \'{{"status":"ok"}}\' if {{ path /health/ready /status/ready }} {ready}',
        "    http-request return status 503 content-type application/json "
        'string \'{"status":"unavailable"}\' if { path /health/ready /status/ready }',
        "    http-request return status 404",
        "",
        "frontend proxy",
        f"    bind {settings.host}:{settings.port}",
        "    unique-id-format %[uuid()]",
        *r.lines,
        "",
    ]
    for service in model.services.values():
        up = model.upstreams[service.upstream]
        lines += [
            f"backend svc_{service.name}",
            "    balance roundrobin",
            f"    retries {service.retries}",
            f"    timeout connect {service.connect_timeout_ms}ms",
            f"    timeout server {service.read_timeout_ms}ms",
        ]
        check = ""
        if up.health_path:
            lines += [
                f"    option httpchk GET {up.health_path}",
                "    http-check expect status 200",
                f"    timeout check {int(up.timeout * 1000)}ms",
            ]
            check = f" check inter {int(up.interval * 1000)}ms fall {up.fall} rise {up.rise}"
        for i, target in enumerate(up.targets):
            lines.append(f"    server t{i} {target}{check}")
        lines.append("")
    lines += tables
    return "\n".join(lines) + "\n"


def _render_cors(r: _Rules, config: Mapping[str, Any], on: str) -> None:
    origins = config.get("origins") or ["*"]
    methods = ",".join(config.get("methods") or ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE"])
    r.comment("cors")
    if "*" in origins:
        r.add("http-request set-var(txn.cors_origin) str(*)", on)
    else:
        r.add(
            "http-request set-var(txn.cors_origin) req.hdr(origin)",
            f"{on} {{ req.hdr(origin) -m str {' '.join(origins)} }}",
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


def _render_jwt(
    r: _Rules,
    config: Mapping[str, Any],
    on: str,
    model: GatewayModel,
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
        _reply(401, _message("Unauthorized"), ("WWW-Authenticate", www)),
        f"{on} !{{ var(txn.jwt) -m len gt 0 }}",
    )
    r.add("http-request set-var(txn.jwt_alg) var(txn.jwt),jwt_header_query('$.alg')", on)
    r.add(
        _reply(401, _message("Bad token; invalid JSON"), bad),
        f"{on} !{{ var(txn.jwt_alg) -m found }}",
    )
    r.add(f"http-request set-var(txn.jwt_key) var(txn.jwt),jwt_payload_query('$.{claim}')", on)
    r.add(
        f"http-request set-var(txn.jwt_key) var(txn.jwt),jwt_header_query('$.{claim}')",
        f"{on} !{{ var(txn.jwt_key) -m found }}",
    )
    r.add(
        _reply(401, _message(f"No mandatory '{claim}' in claims"), bad),
        f"{on} !{{ var(txn.jwt_key) -m found }}",
    )
    for i, (kid, (algorithm, pem)) in enumerate(sorted(model.credentials.items())):
        if not algorithm.startswith(("RS", "ES", "PS")) or not pem:
            raise GatewayConfigError(
                f"jwt credential {kid}: only public-key algorithms are reproduced"
            )
        key_file = key_dir / f"{hashlib.sha256(kid.encode()).hexdigest()[:24]}.pem"
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(pem)
        cred = f"{{ var(txn.jwt_key) -m str {kid} }}"
        r.add(f"http-request set-var(txn.jwt_cred) int({i})", f"{on} {cred}")
        r.add(
            _reply(401, _message("Invalid algorithm"), bad),
            f"{on} {{ var(txn.jwt_cred) -m int {i} }} !{{ var(txn.jwt_alg) -m str {algorithm} }}",
        )
        r.add(
            f'http-request set-var(txn.jwt_ok) var(txn.jwt),jwt_verify("{algorithm}","{key_file}")',
            f"{on} {{ var(txn.jwt_cred) -m int {i} }}",
        )
    r.add(
        _reply(401, _message(f"No credentials found for given '{claim}'"), bad),
        f"{on} !{{ var(txn.jwt_cred) -m found }}",
    )
    r.add(_reply(401, _message("Invalid signature"), bad), f"{on} !{{ var(txn.jwt_ok) -m int 1 }}")
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
            _reply(401, '{"' + name + '":"must be a number"}', bad),
            f"{on} !{{ var(txn.jwt_{name}) -m found }}",
        )
        if name == "exp":  # expired when exp <= now
            failed = "{ var(txn.now),sub(txn.jwt_exp) -m int ge 0 }"
            r.add(_reply(401, '{"exp":"token expired"}', bad), f"{on} {failed}")
        elif name == "nbf":  # not valid before nbf
            failed = "{ var(txn.jwt_nbf),sub(txn.now) -m int gt 0 }"
            r.add(_reply(401, '{"nbf":"token not valid yet"}', bad), f"{on} {failed}")
        else:
            raise GatewayConfigError(f"jwt: claims_to_verify {name!r} is not a Kong claim")
    if config.get("maximum_expiration", 0):
        raise GatewayConfigError("jwt: maximum_expiration is not reproduced locally")


def _render_size_limit(r: _Rules, config: Mapping[str, Any], on: str) -> None:
    limit = (
        int(config.get("allowed_payload_size", 128))
        * SIZE_UNITS[config.get("size_unit", "megabytes")]
    )
    r.comment("request-size-limiting")
    if config.get("require_content_length"):
        r.add(
            _reply(411, _message("A valid Content-Length header is required")),
            f"{on} !{{ req.hdr(content-length) -m found }} "
            "{ req.hdr(transfer-encoding) -m found }",
        )
    r.add(
        _reply(413, _message("Request size limit exceeded")),
        f"{on} {{ req.hdr_val(content-length) gt {limit} }}",
    )


def _render_rate_limit(r: _Rules, config: Mapping[str, Any], on: str, index: int) -> str:
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
        _reply(
            int(config.get("error_code", 429)),
            _message(message),
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


# --- running the local gateway ----------------------------------------------------------------


def local_targets() -> dict[str, list[str]]:
    """Where the upstreams of kong.yml are on this machine (from the services' settings)."""
    from auth_svc.settings import AuthSettings
    from user_svc.settings import UserSettings

    auth, users = AuthSettings(), UserSettings()
    return {
        "auth_svc.upstream": [f"{auth.host}:{auth.port}"],
        "user_svc.upstream": [f"{users.host}:{users.port}"],
    }


def write_local_config(
    settings: GatewaySettings, public_keys: Mapping[str, str], targets: Mapping[str, list[str]]
) -> Path:
    """Render kong.yml (with credentials) to an HAProxy file in the work dir; returns its path."""
    kong = with_credentials(load_kong(settings.config), public_keys)
    work = settings.work_dir
    work.mkdir(parents=True, exist_ok=True)
    text = render_haproxy(gateway_model(kong, targets), settings, work / "keys")
    path = work / "haproxy.cfg"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    (work / "kong.yml").write_text(dump_kong(kong))
    return path


def _check_config(settings: GatewaySettings, path: Path) -> None:
    result = subprocess.run(
        [settings.haproxy, "-c", "-q", "-f", str(path)], check=False, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise GatewayConfigError(f"haproxy rejected {path}:\n{result.stderr or result.stdout}")


app = typer.Typer(help="The Kong gateway config and the local gateway.", no_args_is_help=True)


@app.command("render")
def render(
    config: Annotated[
        Path | None, typer.Option(help="Kong declarative file (default: GATEWAY_CONFIG).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write here instead of printing.")] = None,
    k8s: Annotated[
        bool, typer.Option("--k8s", help="Kong Ingress Controller Secrets + KongConsumer instead.")
    ] = False,
    namespace: Annotated[str, typer.Option(help="Namespace of the --k8s objects.")] = "eskit",
) -> None:
    """Fill kong.yml's jwt credentials from auth_svc's published keys (run after a rotation)."""
    try:
        store = published_keys_reader()
    except Exception as exc:
        print(
            f"error: could not read auth_svc's keys: {exc} (has `esctl db init` run?)",
            file=sys.stderr,
        )
        raise typer.Exit(1) from None
    try:
        keys = store.public_keys()
    finally:
        store.close()
    kong = load_kong(config or GatewaySettings().config)
    if k8s:
        consumer = jwt_consumer(kong)["username"]
        text = yaml.safe_dump_all(k8s_credentials(keys, consumer=consumer, namespace=namespace))
    else:
        text = dump_kong(with_credentials(kong, keys))
    if out is None:
        sys.stdout.write(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(
            f"wrote {out} with {len(keys)} credential(s): {', '.join(sorted(keys))}",
            file=sys.stderr,
        )


@app.command("run")
def run() -> None:
    """Run the local gateway (HAProxy rendered from kong.yml); reload it when keys change."""
    from auth_svc.settings import AuthSettings

    settings = GatewaySettings()
    store = published_keys_reader()
    poll = max(min(AuthSettings().keys_refresh_seconds / 2, 2.0), 0.2)
    targets = local_targets()
    keys = store.public_keys()
    path = write_local_config(settings, keys, targets)
    _check_config(settings, path)
    # Master-worker mode: SIGUSR2 makes the master re-read the file and replace its workers.
    proxy = subprocess.Popen([settings.haproxy, "-W", "-db", "-f", str(path)])
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(
        f"gateway on http://{settings.host}:{settings.port} ({len(keys)} key(s))", file=sys.stderr
    )
    try:
        while not stopping:
            if proxy.poll() is not None:
                raise typer.Exit(proxy.returncode or 1)
            time.sleep(poll)
            try:
                store.reload()  # every poll, not the cached view: the key must beat its use
                current = store.public_keys()
            except Exception as exc:  # the database may be restarting: keep serving
                print(f"gateway: could not read keys: {exc}", file=sys.stderr)
                continue
            if current != keys:
                path = write_local_config(settings, current, targets)
                _check_config(settings, path)
                proxy.send_signal(signal.SIGUSR2)
                keys = current
                print(f"gateway: reloaded with keys {', '.join(sorted(keys))}", file=sys.stderr)
    finally:
        if proxy.poll() is None:
            proxy.send_signal(signal.SIGTERM)
            try:
                proxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait()
        store.close()


def haproxy_missing() -> str | None:
    """A one-line problem when HAProxy is not installed, else None."""
    from shutil import which

    binary = os.environ.get("GATEWAY_HAPROXY", "haproxy")
    if which(binary) is None:
        return f"{binary} is not installed: `apt-get install -y haproxy` (make up does it)"
    return None
