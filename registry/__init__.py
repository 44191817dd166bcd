"""Every service of the stack, each as it declares itself in its composition root.

Adding a service is one entry here. `esctl` (its commands and `esctl up`), the deployment
checks and the test harness read this tuple; nothing finds a service by its name as a string.
"""

from __future__ import annotations

from typing import Any

from auth_svc.main import SERVICE as AUTH
from integration_svc.main import SERVICE as INTEGRATION
from notify_svc.main import SERVICE as NOTIFY
from reporting_svc.main import SERVICE as REPORTING
from servicekit.service import Process, Role, Service
from user_svc.main import SERVICE as USERS

SERVICES: tuple[Service[Any], ...] = (AUTH, USERS, REPORTING, NOTIFY, INTEGRATION)

__all__ = ["SERVICES", "Process", "Role", "Service", "names", "processes", "service", "with_role"]


def service(name: str) -> Service[Any]:
    """The service called `name` (LookupError, listing the names, if there is none)."""
    for candidate in SERVICES:
        if candidate.name == name:
            return candidate
    raise LookupError(f"no service {name!r}; the services are {', '.join(names())}")


def names(services: tuple[Service[Any], ...] | list[Service[Any]] = SERVICES) -> list[str]:
    return [s.name for s in services]


def with_role(role: Role) -> list[Service[Any]]:
    """The services that run a process of this role (REST, relay, consumer)."""
    return [s for s in SERVICES if any(p.role is role for p in s.processes)]


def projections() -> list[Service[Any]]:
    """The services whose consumer is a projection (`esctl replay` rebuilds it)."""
    return [s for s in SERVICES if s.projection is not None]


def processes() -> list[Process]:
    """Every process of the stack, REST services first, as `esctl up` starts them."""
    order = {Role.API: 0, Role.RELAY: 1, Role.CONSUMER: 2}
    return sorted((p for s in SERVICES for p in s.processes), key=lambda p: order[p.role])
