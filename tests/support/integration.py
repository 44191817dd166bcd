"""integration_svc's settings for the integration tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from integration_svc.main import init_db
from integration_svc.settings import IntegrationSettings


def integration_settings_in(
    make_database: Callable[[str], str],
    make_vhost: Callable[[], str],
    database: str,
    **fields: Any,
) -> IntegrationSettings:
    """integration_svc's settings in a database and a vhost of their own, initialised: the
    receiver on 127.0.0.1 allowed, retries and the dispatcher's poll made quick."""
    settings = IntegrationSettings(
        database_url=make_database(database),
        amqp_url=make_vhost(),
        allow_loopback=True,
        consumer_prefetch=50,
        retry_initial_seconds=0.2,
        retry_max_interval_seconds=0.4,
        dispatch_poll_seconds=0.2,
        **fields,
    )
    init_db(settings)
    return settings
