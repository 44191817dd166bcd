"""kong.yml as the local gateway reads it: routes with their effective plugins, the services
behind them and the upstreams that serve those."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.kong import GatewayConfigError, jwt_consumer

# The plugins the local gateway reproduces, in Kong's order (higher priority runs first).
PLUGIN_PRIORITY = {
    "correlation-id": 100001,
    "cors": 2000,
    "jwt": 1450,
    "request-size-limiting": 951,
    "rate-limiting": 910,
    "prometheus": 13,
}


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
        if name not in PLUGIN_PRIORITY:
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
