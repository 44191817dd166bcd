"""auth_svc's relay: publishes the account events of its store to `auth.events`."""

from __future__ import annotations

from auth_svc.application import AuthService
from auth_svc.contracts import to_contract
from auth_svc.settings import AuthSettings
from servicekit.eventstore import eventsourcing_env
from servicekit.relay import Relay
from servicekit.runners import serve_relay
from shared_contracts.names import AUTH_EVENTS


def relay_auth_events(settings: AuthSettings) -> Relay:
    store = AuthService(env=eventsourcing_env(settings.database_url, pool_size=2))
    return Relay(
        store,
        producer="auth_svc",
        exchange=AUTH_EVENTS,
        to_contract=to_contract,
        amqp_url=settings.amqp_url,
        database_url=settings.database_url,
    )


def main() -> None:
    settings = AuthSettings()
    serve_relay(relay_auth_events(settings), settings, port=settings.relay_port)
