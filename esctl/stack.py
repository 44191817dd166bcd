"""What runs in the stack: every process `esctl up` starts, and what it needs to reach.

The processes come from the registry (`registry.processes()`), plus the local gateway.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

import registry
from gateway.settings import GatewaySettings
from servicekit.amqp import amqp_urls, broker_address
from servicekit.eventstore import connection_kwargs
from servicekit.service import Role


@dataclass(frozen=True)
class Process:
    name: str
    argv: list[str]
    host: str
    port: int
    public: bool  # a REST API (printed as a URL to use) or a worker (health/metrics only)
    what: str = ""  # how `esctl up` describes it, when not the default for public/worker

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def processes() -> list[Process]:
    """Every service's processes, each run as `python -m esctl.main <verb> <service>`."""
    esctl = [sys.executable, "-m", "esctl.main"]
    return [
        Process(p.name, [*esctl, *p.command], *p.address(), public=p.role is Role.API)
        for p in registry.processes()
    ]


def gateway_process() -> Process:
    """The local gateway (HAProxy rendered from compose/kong.yml); probed on its status port."""
    gw = GatewaySettings()
    return Process(
        "gateway",
        [sys.executable, "-m", "gateway"],
        gw.host,
        gw.status_port,
        False,
        what=f"gateway (Kong routes from {gw.config.name}) at http://{gw.host}:{gw.port}",
    )


def reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def dependency_problems() -> list[str]:
    """One line per unreachable dependency, naming host:port and how to start it."""
    problems: list[str] = []
    seen: set[tuple[str, int]] = set()
    settings = [service.settings() for service in registry.SERVICES]
    for url in (s.database_url for s in settings):
        kw = connection_kwargs(url)
        if (kw["host"], kw["port"]) in seen:
            continue
        seen.add((kw["host"], kw["port"]))
        if not reachable(kw["host"], kw["port"]):
            problems.append(
                f"PostgreSQL is not reachable at {kw['host']}:{kw['port']}. Start it with "
                "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` "
                "or point the services' *_DATABASE_URL variables at a running server."
            )
    amqp = settings[0].amqp_url
    nodes = [urlsplit(url) for url in amqp_urls(amqp)]
    if not any(reachable(n.hostname or "127.0.0.1", n.port or 5672) for n in nodes):
        problems.append(
            f"RabbitMQ is not reachable at {broker_address(amqp)}. Start it with "
            "`rabbitmq-server -detached && rabbitmqctl await_startup` or set AMQP_URL."
        )
    return problems
