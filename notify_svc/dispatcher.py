"""The mail dispatcher: sends the recorded intents, beside the consumer, never inside it.

The consumer only records intents, so a slow or dead SMTP server never holds a batch. The
dispatcher claims due intents (at most `send_concurrency` at a time), renders each with what
the live generation knows of the user, and sends it with an explicit timeout. A failure
schedules a retry with exponential backoff and jitter until the retry window ends; a refusal
for good (5xx, no address) fails the intent at once. After `breaker_failures` transient
failures in a row the breaker opens: nothing is claimed for `breaker_cooldown_seconds`, then
one mail probes the server before the rest follow.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from notify_svc import intents
from notify_svc.intents import NOTIFY_CHANNEL, Intent
from notify_svc.mail import MailTransport, PermanentMailError, render, transport
from notify_svc.projection import NotificationProjection
from notify_svc.settings import NotifySettings
from servicekit.dispatch import (
    CircuitBreaker,
    DispatcherStatus,
    IntentDispatcher,
    RetrySchedule,
)
from servicekit.sealing import Opener

log = logging.getLogger("notify_svc.dispatcher")

MAILS = Counter(
    "notify_mails_total", "Mail attempts by outcome: sent, retried, failed", ["outcome"]
)
BREAKER_OPEN = Gauge("notify_smtp_breaker_open", "1 while sending is paused after failures")


@dataclass
class MailDispatcherStatus(DispatcherStatus):
    transport: str
    breaker: str = "closed"  # closed | open | half-open
    sent: int = 0


class MailDispatcher(IntentDispatcher):
    """Construct, then `await run(stop)`."""

    status: MailDispatcherStatus

    def __init__(self, settings: NotifySettings, mail: MailTransport | None = None) -> None:
        self.settings = settings
        self.mail = mail or transport(
            settings.smtp_url, maildir=settings.maildir, timeout=settings.smtp_timeout_seconds
        )
        self.status = MailDispatcherStatus(transport=self.mail.describe())
        keys = [k for k in settings.link_opening_keys.split(",") if k.strip()]
        self.opener = Opener(keys) if keys else None
        super().__init__(
            name="notify_svc.dispatcher",
            database_url=settings.database_url,
            channel=NOTIFY_CHANNEL,
            pool_size=settings.db_pool_size,
        )
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_seconds)
        self.schedule = RetrySchedule(
            initial=settings.retry_initial_seconds,
            maximum=settings.retry_max_interval_seconds,
            window=settings.retry_window_seconds,
        )

    async def _dispatch(self, stop: asyncio.Event) -> None:
        inflight: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        self.status.role = "dispatching"
        try:
            while not stop.is_set():
                room = self._room(len(inflight), loop.time())
                claimed: list[Intent] = []
                if room > 0:
                    async with self.pool.connection() as conn:
                        await intents.expire(conn, self.schedule.window)
                        claimed = await intents.claim(
                            conn,
                            NotificationProjection.name,
                            limit=room,
                            lease=self.settings.lease_seconds,
                        )
                for intent in claimed:
                    task = asyncio.create_task(self._send(intent))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                if claimed and len(claimed) == room:
                    timeout = self.settings.smtp_timeout_seconds  # full: wait for a free slot
                else:
                    timeout = self.settings.dispatch_poll_seconds
                    probe_at = self.breaker.probe_at
                    if probe_at is not None and probe_at > loop.time():
                        timeout = min(timeout, probe_at - loop.time())
                await self._wait(stop, inflight, timeout)
        finally:
            if inflight:  # let sends finish; an abandoned one is resent after its lease
                await asyncio.wait(inflight, timeout=min(self.settings.smtp_timeout_seconds, 5))
                for task in inflight:
                    task.cancel()

    def _room(self, busy: int, now: float) -> int:
        state = self.breaker.state(now)
        if state == "closed":
            return self.settings.send_concurrency - busy
        if state == "open":
            return 0
        self.status.breaker = state  # the gauge stays up until the probe's outcome
        return 1 if busy == 0 else 0  # one probe at a time

    async def _wait(
        self, stop: asyncio.Event, inflight: set[asyncio.Task[None]], seconds: float
    ) -> None:
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(
                {*waiters, *inflight}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        self._wake.clear()

    async def _send(self, intent: Intent) -> None:
        try:
            message = render(intent, sender=self.settings.mail_from, opener=self.opener)
            await self.mail.send(message)
        except PermanentMailError as exc:
            await self._failed(intent, str(exc))
        except Exception as exc:  # noqa: BLE001 - any other failure is worth a retry
            await self._retry(intent, f"{type(exc).__name__}: {exc}")
        else:
            self.breaker.success()
            self._set_breaker("closed")
            async with self.pool.connection() as conn:
                await intents.mark_sent(conn, intent, str(message["To"]))
            MAILS.labels("sent").inc()
            self.status.sent += 1
            log.info(
                "mail sent",
                extra={
                    "event_id": str(intent.event_id),
                    "effect": intent.effect,
                    "message_id": intent.message_id,
                    "attempt": intent.attempts,
                },
            )

    async def _retry(self, intent: Intent, error: str) -> None:
        now = asyncio.get_running_loop().time()
        self.breaker.failure(now)
        self.status.last_error = error[:300]
        if self.breaker.state(now) == "open":
            self._set_breaker("open")
        delay = self.schedule.retry_in(intent.attempts, intent.created_at)
        if delay is None:
            await self._failed(intent, f"gave up after {intent.attempts} attempts: {error}")
            return
        async with self.pool.connection() as conn:
            await intents.mark_failed_attempt(conn, intent, error, retry_in=delay)
        MAILS.labels("retried").inc()
        self.status.retried += 1
        log.warning(
            "mail not sent; will retry",
            extra={
                "event_id": str(intent.event_id),
                "effect": intent.effect,
                "attempt": intent.attempts,
                "retry_in_seconds": round(delay, 2),
                "error": error[:300],
            },
        )

    async def _failed(self, intent: Intent, error: str) -> None:
        async with self.pool.connection() as conn:
            await intents.mark_failed_attempt(conn, intent, error, retry_in=None)
        MAILS.labels("failed").inc()
        self.status.failed += 1
        log.error(
            "mail failed for good",
            extra={"event_id": str(intent.event_id), "effect": intent.effect, "error": error},
        )

    def _set_breaker(self, state: str) -> None:
        if state != self.status.breaker:
            log.warning("SMTP breaker %s", state, extra={"transport": self.status.transport})
        self.status.breaker = state
        BREAKER_OPEN.set(1 if state == "open" else 0)
