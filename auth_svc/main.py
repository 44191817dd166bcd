"""Composition root of auth_svc: database initialisation, the app factory and the relay.

`SERVICE` declares the service to the registry; nothing is built at import time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from auth_svc.api import API_DESCRIPTION, install_error_handlers, router
from auth_svc.application import AuthService
from auth_svc.contracts import to_contract
from auth_svc.keys import KeyStore, init_signing_keys
from auth_svc.settings import AuthSettings
from servicekit import web
from servicekit.eventstore import ensure_database, eventsourcing_env
from servicekit.openapi import api_servers
from servicekit.relay import Relay, create_relay_table
from servicekit.service import Service
from servicekit.tokens import TokenVerifier
from shared_contracts.names import AUTH_EVENTS

log = logging.getLogger("auth_svc.main")


def init_db(settings: AuthSettings | None = None) -> None:
    """Create the database, the event store's tables and the signing keys (run once:
    `esctl db init`). Idempotent."""
    settings = settings or AuthSettings()
    ensure_database(settings.database_url)
    AuthService(
        env=eventsourcing_env(settings.database_url, create_table=True, pool_size=1)
    ).close()
    init_signing_keys(settings)
    create_relay_table(settings.database_url)


def build_service(settings: AuthSettings, keys: KeyStore | None = None) -> AuthService:
    env = eventsourcing_env(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        # Every login appends to its account: keep recent accounts in memory and read only
        # the events appended since (fast-forward) instead of replaying from a snapshot.
        extra={
            "AGGREGATE_CACHE_MAXSIZE": "10000",
            "AGGREGATE_CACHE_FASTFORWARD": "y",
            **settings.personal_data_env(),
        },
    )
    return AuthService(env=env, settings=settings, signer=keys)


def create_app(settings: AuthSettings | None = None) -> FastAPI:
    settings = settings or AuthSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.link_sealing_public_key:
            log.warning(
                "AUTH_LINK_SEALING_PUBLIC_KEY is not set: verification and reset links "
                "cannot be mailed"
            )
        if not settings.address_id_key:
            log.warning(
                "AUTH_ADDRESS_ID_KEY is not set: ids derived from e-mail addresses are keyed "
                "with a public development key"
            )
        keys = KeyStore(settings)
        await asyncio.to_thread(keys.open)
        service = await asyncio.to_thread(build_service, settings, keys)
        app.state.key_store = keys
        app.state.auth_service = service
        app.state.token_verifier = TokenVerifier(
            keys.lookup, issuer=settings.issuer, audience=settings.audience
        )
        try:
            yield
        finally:
            await asyncio.to_thread(service.close)
            await asyncio.to_thread(keys.close)

    app = web.create_app(
        title="auth_svc",
        description=API_DESCRIPTION,
        servers=api_servers(settings.port),
        readiness_checks=[("database", web.database_ready(settings.database_url, timeout=3))],
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    return app


def relay(settings: AuthSettings) -> Relay:
    """Publishes the account events of auth_svc's store to `auth.events`."""
    return Relay.of_store(
        AuthService,
        settings,
        producer="auth_svc",
        exchange=AUTH_EVENTS,
        to_contract=to_contract,
    )


SERVICE = Service(
    name="auth_svc", settings=AuthSettings, init_db=init_db, app=create_app, relay=relay
)
