"""user_svc's relay: publishes the profile events of its store to `user.events`."""

from __future__ import annotations

from servicekit.eventstore import eventsourcing_env
from servicekit.relay import Relay
from servicekit.runners import serve_relay
from shared_contracts.names import USER_EVENTS
from user_svc.application import ProfileService
from user_svc.contracts import to_contract
from user_svc.settings import UserSettings


def relay_user_events(settings: UserSettings) -> Relay:
    store = ProfileService(env=eventsourcing_env(settings.database_url, pool_size=2))
    return Relay(
        store,
        producer="user_svc",
        exchange=USER_EVENTS,
        to_contract=to_contract,
        amqp_url=settings.amqp_url,
        database_url=settings.database_url,
    )


def main() -> None:
    settings = UserSettings()
    serve_relay(relay_user_events(settings), settings, port=settings.relay_port)
