"""user_svc's composition root: database setup, the app factory, the relay and the consumer
that creates a profile for every registration.

`SERVICE` declares the service to the registry. Tables are created once by `init_db`
(`esctl db init`), never by a starting replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from servicekit import web
from servicekit.consumer import Consumer, one_at_a_time
from servicekit.eventstore import connection_kwargs, ensure_database, eventsourcing_env
from servicekit.logs import configure_logging
from servicekit.messages import Outcome
from servicekit.openapi import api_servers
from servicekit.relay import Relay, create_relay_table
from servicekit.revocations import RevocationFollower
from servicekit.service import Service
from servicekit.tokens import JwksKeys, KeyLookup, RevokedSessions, TokenVerifier
from shared_contracts.envelope import Envelope
from shared_contracts.events import AccountDeleted, AccountRegistered
from shared_contracts.names import AUTH_EVENTS, USER_EVENTS
from user_svc.api import API_DESCRIPTION, Profiles, render_profile, router
from user_svc.application import ERASURES_DDL, ProfileService
from user_svc.cache import CacheFollower, ProfileCache
from user_svc.contracts import to_contract
from user_svc.settings import UserSettings

# The cache's subscription pins one pooled connection to LISTEN and uses another to read
# (notes/eventsourcing.md, trap 4): on top of the handlers' share of the pool.
FOLLOWER_CONNECTIONS = 2


def init_db(settings: UserSettings | None = None) -> None:
    """Create the database and the event store's tables (idempotent; run once per deploy)."""
    settings = settings or UserSettings()
    ensure_database(settings.database_url)
    env = eventsourcing_env(settings.database_url, create_table=True, pool_size=1)
    ProfileService(env=env).close()  # with `personal_keys` (servicekit.shredding)
    create_relay_table(settings.database_url)
    with psycopg.connect(**connection_kwargs(settings.database_url), autocommit=True) as conn:
        conn.execute(ERASURES_DDL)


def profile_service(settings: UserSettings) -> ProfileService:
    return ProfileService(
        env=eventsourcing_env(
            settings.database_url,
            pool_size=settings.db_pool_size + FOLLOWER_CONNECTIONS,
            max_overflow=settings.db_max_overflow,
            lock_timeout=settings.db_lock_timeout_seconds,
            # Writes load the aggregate first: keep recent ones in memory and only read the
            # events appended since (fast-forward), instead of replaying each whole stream.
            extra={
                "AGGREGATE_CACHE_MAXSIZE": "10000",
                "AGGREGATE_CACHE_FASTFORWARD": "y",
                **settings.personal_data_env(),
            },
        )
    )


def create_app(
    settings: UserSettings | None = None, *, token_keys: KeyLookup | None = None
) -> FastAPI:
    """The user_svc app. `token_keys` replaces the JWKS lookup (tests sign their own tokens)."""
    settings = settings or UserSettings()
    configure_logging("user_svc", level=settings.log_level, fmt=settings.log_format)
    jwks: JwksKeys | None = None
    if token_keys is None:
        jwks = token_keys = JwksKeys(settings.jwks_url)
    revoked = RevokedSessions(settings.revoked_session_keep_seconds)
    verifier = TokenVerifier(
        token_keys,
        issuer=settings.issuer,
        audience=settings.audience,
        cache_size=settings.token_cache_size,
        revoked=revoked,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        profiles = await run_in_threadpool(profile_service, settings)
        cache = ProfileCache(render_profile, max_entries=settings.profile_cache_size)
        follower = CacheFollower(profiles, cache, retry_seconds=settings.cache_retry_seconds)
        follower.start()
        app.state.profiles = Profiles(service=profiles, cache=cache)
        app.state.token_verifier = verifier
        app.state.cache_follower = follower
        revocations: RevocationFollower | None = None
        if settings.follow_session_revocations:
            revocations = RevocationFollower(settings.amqp_url, revoked)
            revocations.start()
        app.state.revocations = revocations
        try:
            yield
        finally:
            if revocations is not None:
                await revocations.stop()
            await run_in_threadpool(follower.stop)
            await run_in_threadpool(profiles.close)
            if jwks is not None:
                await jwks.aclose()

    app = web.create_app(
        title="user_svc",
        description=API_DESCRIPTION,
        servers=api_servers(settings.port),
        readiness_checks=[("database", web.database_ready(settings.database_url))],
        lifespan=lifespan,
    )
    app.include_router(router)
    return app


def relay(settings: UserSettings) -> Relay:
    """Publishes the profile events of user_svc's store to `user.events`."""
    return Relay.of_store(
        ProfileService,
        settings,
        producer="user_svc",
        exchange=USER_EVENTS,
        to_contract=to_contract,
    )


def profiles_from_registrations(
    settings: UserSettings, profiles: ProfileService | None = None
) -> Consumer:
    """The consumer that creates a profile for every `auth.account.registered` and erases
    it on `auth.account.deleted`."""
    service = profiles or profile_service(settings)

    async def handle(envelope: Envelope) -> Outcome:
        if envelope.event_type == AccountDeleted.event_type:
            return await run_in_threadpool(service.on_account_deleted, envelope)
        return await run_in_threadpool(service.on_account_registered, envelope)

    return Consumer(
        service="user_svc",
        amqp_url=settings.amqp_url,
        bindings={AUTH_EVENTS: [AccountRegistered.event_type, AccountDeleted.event_type]},
        handler=one_at_a_time(handle),
        prefetch=settings.consumer_prefetch,
        delivery_limit=settings.consumer_delivery_limit,
    )


SERVICE = Service(
    name="user_svc",
    settings=UserSettings,
    init_db=init_db,
    app=create_app,
    relay=relay,
    consumer=profiles_from_registrations,
)
