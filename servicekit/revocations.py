"""Following `auth.session.revoked` into a RevokedSessions set, in an API process.

Each process that verifies tokens declares its own exclusive, auto-deleted queue bound to
`auth.events` for that one routing key, so every replica hears every revocation (a shared
queue would hand each message to one replica only). A revocation reaches the set as fast as
the broker delivers it (milliseconds here), with no call to auth_svc. The connection is
re-established after a broker outage; revocations published while it was down are missed by
this process, and so are those from before it started: the set is a best-effort deny list
over the access tokens' short lifetime, not the source of truth (auth_svc refuses the
session's refresh token at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from datetime import datetime

from aio_pika import ExchangeType
from aio_pika.abc import AbstractIncomingMessage

from servicekit.amqp import connect
from servicekit.tokens import RevokedSessions
from shared_contracts.events import SessionRevoked
from shared_contracts.names import AUTH_EVENTS

log = logging.getLogger("servicekit.revocations")


def apply_revocation(revoked: RevokedSessions, body: bytes) -> uuid.UUID | None:
    """Add the session a `auth.session.revoked` message names; None for anything else."""
    try:
        envelope = json.loads(body)
        if envelope.get("event_type") != SessionRevoked.event_type:
            return None
        event = SessionRevoked.model_validate(envelope["data"])
        at = datetime.fromisoformat(envelope["occurred_at"]).timestamp()
    except (ValueError, KeyError, TypeError):
        log.warning("unreadable session revocation skipped")
        return None
    revoked.revoke(event.session_id, at=at)
    return event.session_id


class RevocationFollower:
    """`start()` in the app's lifespan, `await stop()` at its end."""

    def __init__(
        self, amqp_url: str, revoked: RevokedSessions, *, retry_seconds: float = 1.0
    ) -> None:
        self.amqp_url = amqp_url
        self.revoked = revoked
        self.retry_seconds = retry_seconds
        self.ready = asyncio.Event()  # set once the queue is bound
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="session-revocations")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect after any broker failure
                self.ready.clear()
                log.warning(
                    "session revocations: broker connection lost; reconnecting",
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )
                await asyncio.sleep(self.retry_seconds)

    async def _follow(self) -> None:
        connection = await connect(self.amqp_url)
        try:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(AUTH_EVENTS, ExchangeType.TOPIC, durable=True)
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(exchange, routing_key=SessionRevoked.event_type)
            closed = asyncio.Event()
            connection.close_callbacks.add(lambda *_: closed.set())

            async def on_message(message: AbstractIncomingMessage) -> None:
                apply_revocation(self.revoked, message.body)
                await message.ack()

            await queue.consume(on_message)
            self.ready.set()
            await closed.wait()
            raise ConnectionError("the broker connection closed")
        finally:
            with contextlib.suppress(Exception):
                await connection.close()
