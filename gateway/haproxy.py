"""The HAProxy configuration of the local gateway: the status listener, the proxy frontend
(request id, route matching, then each route's plugins in Kong's order) and a backend per
kong.yml service, health-checked as its upstream says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.model import PLUGIN_PRIORITY, GatewayModel
from gateway.plugins import (
    Rules,
    kong_message,
    on_routes,
    render_correlation_id,
    render_cors,
    render_jwt,
    render_rate_limit,
    render_size_limit,
    reply,
)
from gateway.settings import GatewaySettings


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


def render_haproxy(model: GatewayModel, settings: GatewaySettings, key_dir: Path) -> str:
    """An HAProxy 2.6 configuration equivalent, for a client, to Kong with this model."""
    r = Rules()
    tables: list[str] = []
    render_correlation_id(r, model.globals.get("correlation-id") or {})

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
        reply(404, kong_message("no Route matched with those values")),
        "!{ var(txn.route) -m found }",
    )

    for plugin in sorted(PLUGIN_PRIORITY, key=lambda p: -PLUGIN_PRIORITY[p]):
        for index, (config, routes) in enumerate(_instances(model, plugin)):
            on = on_routes(routes)
            if plugin == "cors":
                render_cors(r, config, on)
            elif plugin == "jwt":
                render_jwt(r, config, on, model.credentials, key_dir=key_dir, index=index)
            elif plugin == "request-size-limiting":
                render_size_limit(r, config, on)
            elif plugin == "rate-limiting":
                tables.append(render_rate_limit(r, config, on, index))

    for service in model.services.values():
        routes = [route.name for route in model.routes if route.service == service.name]
        r.add(f"use_backend svc_{service.name}", on_routes(routes))

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
