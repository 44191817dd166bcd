"""user_svc's consumer: creates a profile for every `auth.account.registered`."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from servicekit.consumer import Consumer, Outcome, one_at_a_time
from servicekit.runners import serve_consumer
from shared_contracts.envelope import Envelope
from shared_contracts.events import AccountRegistered
from shared_contracts.names import AUTH_EVENTS
from user_svc.application import ProfileService
from user_svc.main import profile_service
from user_svc.settings import UserSettings

SERVICE = "user_svc"


def profiles_from_registrations(settings: UserSettings, profiles: ProfileService) -> Consumer:
    async def handle(envelope: Envelope) -> Outcome:
        return await run_in_threadpool(profiles.on_account_registered, envelope)

    return Consumer(
        service=SERVICE,
        amqp_url=settings.amqp_url,
        bindings={AUTH_EVENTS: [AccountRegistered.event_type]},
        handler=one_at_a_time(handle),
        prefetch=settings.consumer_prefetch,
        delivery_limit=settings.consumer_delivery_limit,
    )


def main() -> None:
    settings = UserSettings()
    consumer = profiles_from_registrations(settings, profile_service(settings))
    serve_consumer(consumer, settings, port=settings.consumer_port)
