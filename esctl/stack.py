"""What runs in the stack: every process `esctl up` starts, and how to reach it."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

from auth_svc.settings import AuthSettings
from integration_svc.settings import IntegrationSettings
from notify_svc.settings import NotifySettings
from reporting_svc.settings import ReportingSettings
from servicekit.amqp import amqp_urls, broker_address
from servicekit.eventstore import connection_kwargs
from user_svc.settings import UserSettings


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
    auth, users, reporting = AuthSettings(), UserSettings(), ReportingSettings()
    py = sys.executable
    esctl = [py, "-m", "esctl.main"]

    return [
        Process("auth_svc", [*esctl, "serve", "auth_svc"], auth.host, auth.port, True),
        Process("user_svc", [*esctl, "serve", "user_svc"], users.host, users.port, True),
        Process("auth_svc.relay", [*esctl, "relay", "auth_svc"], auth.host, auth.relay_port, False),
        Process(
            "user_svc.relay", [*esctl, "relay", "user_svc"], users.host, users.relay_port, False
        ),
        Process(
            "user_svc.consumer",
            [*esctl, "consume", "user_svc"],
            users.host,
            users.consumer_port,
            False,
        ),
        *(
            Process(f"{name}.consumer", [*esctl, "consume", name], s.host, s.consumer_port, False)
            for name, s in (
                ("reporting_svc", reporting),
                ("notify_svc", NotifySettings()),
                ("integration_svc", IntegrationSettings()),
            )
        ),
    ]


def gateway_process() -> Process:
    """The local gateway (HAProxy rendered from compose/kong.yml); probed on its status port."""
    from gateway.settings import GatewaySettings

    gw = GatewaySettings()
    return Process(
        "gateway",
        [sys.executable, "-m", "esctl.main", "gateway", "run"],
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
    for url in (
        AuthSettings().database_url,
        UserSettings().database_url,
        ReportingSettings().database_url,
        NotifySettings().database_url,
        IntegrationSettings().database_url,
    ):
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
    amqp = AuthSettings().amqp_url
    nodes = [urlsplit(url) for url in amqp_urls(amqp)]
    if not any(reachable(n.hostname or "127.0.0.1", n.port or 5672) for n in nodes):
        problems.append(
            f"RabbitMQ is not reachable at {broker_address(amqp)}. Start it with "
            "`rabbitmq-server -detached && rabbitmqctl await_startup` or set AMQP_URL."
        )
    return problems
