"""The webhook dispatcher: sends the recorded deliveries, beside the consumer, never inside it.

Each endpoint has its own HTTP client (connection pool), concurrency limit, token-bucket rate
limit and circuit breaker. Claims are made per endpoint, for at most the endpoint's free room
(twice its concurrency), so a slow or dead endpoint only ever holds its own deliveries: the
others are claimed and sent meanwhile. Every attempt resolves the URL again and sends to the
address that passed the SSRF guard, signs anew (Standard Webhooks, `webhook-id` = event_id)
and is bounded by explicit timeouts. A failure is retried with exponential backoff and jitter
until the retry window ends, then the delivery is failed. An open breaker stops claims for
that endpoint for the cooldown, then lets one probe through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
from prometheus_client import Counter, Gauge, Histogram

from integration_svc import deliveries, egress, signing
from integration_svc.deliveries import NOTIFY_CHANNEL, Delivery, Outcome
from integration_svc.endpoints import Endpoint, load_all
from integration_svc.settings import IntegrationSettings
from servicekit.dispatch import (
    CircuitBreaker,
    DispatcherStatus,
    IntentDispatcher,
    RetrySchedule,
    TokenBucket,
)

log = logging.getLogger("integration_svc.dispatcher")

ATTEMPTS = Counter(
    "webhook_attempts_total",
    "Delivery attempts by endpoint and outcome: delivered, retried, failed",
    ["endpoint", "outcome"],
)
LATENCY = Histogram("webhook_attempt_seconds", "Duration of one delivery attempt", ["endpoint"])
BREAKER_OPEN = Gauge("webhook_breaker_open", "1 while an endpoint's breaker is open", ["endpoint"])

USER_AGENT = "eskit-webhooks/1"
COALESCE_SECONDS = 0.025
# Deliveries claimed ahead per endpoint, in units of its concurrency: enough to keep its
# connections busy between two claims, few enough to stay well within the lease.
BUFFER = 4


@dataclass
class EndpointState:
    endpoint: Endpoint
    key: bytes
    client: httpx.AsyncClient
    bucket: TokenBucket
    breaker: CircuitBreaker
    slots: asyncio.Semaphore  # requests on the wire at once
    pinned: egress.Target | None  # an address-literal URL, checked once; names: every time
    inflight: int = 0  # claimed and not yet settled (on the wire or queued for a slot)


@dataclass
class WebhookDispatcherStatus(DispatcherStatus):
    endpoints: dict[str, str] = field(default_factory=dict)  # endpoint -> breaker state
    delivered: int = 0


class WebhookDispatcher(IntentDispatcher):
    """Construct, then `await run(stop)`."""

    status: WebhookDispatcherStatus

    def __init__(self, settings: IntegrationSettings) -> None:
        self.settings = settings
        self.policy = egress.EgressPolicy.from_settings(
            allow_loopback=settings.allow_loopback,
            allow_private_networks=settings.allow_private_networks,
            allowed_networks=settings.allowed_networks,
        )
        super().__init__(
            name="integration_svc.dispatcher",
            database_url=settings.database_url,
            channel=NOTIFY_CHANNEL,
            pool_size=settings.db_pool_size,
        )
        self.status = WebhookDispatcherStatus()
        self.schedule = RetrySchedule(
            initial=settings.retry_initial_seconds,
            maximum=settings.retry_max_interval_seconds,
            window=settings.retry_window_seconds,
        )
        self.states: dict[str, EndpointState] = {}
        self._outcomes: list[Outcome] = []
        self._progress = asyncio.Event()  # an attempt finished
        self._loaded_at = 0.0

    async def _closing(self) -> None:
        for state in self.states.values():
            await state.client.aclose()

    # -- the loop -----------------------------------------------------------------------

    async def _dispatch(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        inflight: set[asyncio.Task[None]] = set()
        self.status.role = "dispatching"
        more = True  # the last claim filled every room: more may be due
        last_claim = last_expiry = 0.0
        try:
            while not stop.is_set():
                woken = self._wake.is_set()
                self._wake.clear()
                self._progress.clear()
                now = loop.time()
                async with self.pool.connection() as conn:
                    await self._flush(conn)
                    if woken or more or now - last_claim >= self.settings.dispatch_poll_seconds:
                        last_claim = now
                        await self._refresh_endpoints(conn, now, force=woken)
                        if now - last_expiry >= self.settings.dispatch_poll_seconds:
                            last_expiry = now
                            await deliveries.expire(conn, self.schedule.window)
                        room = self._room(now)
                        claimed = await deliveries.claim(
                            conn, room, lease=self.settings.lease_seconds
                        )
                        more = bool(room) and len(claimed) == sum(room.values())
                        for delivery in claimed:
                            self.states[delivery.endpoint_id].inflight += 1
                            task = asyncio.create_task(self._deliver(delivery))
                            inflight.add(task)
                            task.add_done_callback(inflight.discard)
                await self._wait(stop, self._next_breaker_probe(loop.time()))
        finally:
            if inflight:  # let attempts end; an abandoned one is resent after its lease
                await asyncio.wait(inflight, timeout=5)
                for task in inflight:
                    task.cancel()
            with contextlib.suppress(psycopg.Error, OSError):
                async with self.pool.connection() as conn:
                    await self._flush(conn)

    def _room(self, now: float) -> dict[str, int]:
        """How many deliveries each endpoint may take now."""
        room: dict[str, int] = {}
        budget = self.settings.dispatch_batch
        for endpoint_id, state in self.states.items():
            breaker = state.breaker.state(now)
            self.status.endpoints[endpoint_id] = breaker
            BREAKER_OPEN.labels(endpoint_id).set(1 if breaker == "open" else 0)
            if breaker == "open":
                continue
            free = BUFFER * self.settings.endpoint_concurrency - state.inflight
            if breaker == "half-open":
                free = 1 if state.inflight == 0 else 0
            free = min(free, budget)
            if free > 0:
                room[endpoint_id] = free
                budget -= free
        return room

    def _next_breaker_probe(self, now: float) -> float:
        wait = self.settings.dispatch_poll_seconds
        for state in self.states.values():
            if (probe_at := state.breaker.probe_at) is not None:
                wait = min(wait, max(probe_at - now, 0.01))
        return wait

    async def _wait(self, stop: asyncio.Event, seconds: float) -> None:
        waiters = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self._progress.wait()),
            asyncio.ensure_future(stop.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self._progress.is_set() and not (self._wake.is_set() or stop.is_set()):
            # Attempts end one by one: gather a few before the next round of queries.
            await asyncio.sleep(COALESCE_SECONDS)

    async def _flush(self, conn: psycopg.AsyncConnection[Any]) -> None:
        outcomes, self._outcomes = self._outcomes, []
        try:
            await deliveries.record(conn, outcomes)
        except BaseException:
            self._outcomes = outcomes + self._outcomes
            raise

    async def _refresh_endpoints(
        self, conn: psycopg.AsyncConnection[Any], now: float, *, force: bool
    ) -> None:
        """Pick up endpoints added, changed or removed (by the CLI) at most every 5 s."""
        if not force and self.states and now - self._loaded_at < 5.0:
            return
        self._loaded_at = now
        current = {e.id: e for e in await load_all(conn)}
        for endpoint_id in list(self.states):
            old = self.states[endpoint_id]
            if current.get(endpoint_id) != old.endpoint and old.inflight == 0:
                del self.states[endpoint_id]
                self.status.endpoints.pop(endpoint_id, None)
                await old.client.aclose()
        for endpoint_id, endpoint in current.items():
            if endpoint_id not in self.states:
                self.states[endpoint_id] = self._state(endpoint)

    def _state(self, endpoint: Endpoint) -> EndpointState:
        s = self.settings
        return EndpointState(
            endpoint=endpoint,
            key=signing.secret_key(endpoint.secret),
            client=httpx.AsyncClient(
                timeout=httpx.Timeout(s.request_timeout_seconds, connect=s.connect_timeout_seconds),
                limits=httpx.Limits(
                    max_connections=s.endpoint_concurrency,
                    max_keepalive_connections=s.endpoint_concurrency,
                ),
                follow_redirects=False,  # a redirect could lead anywhere, past the guard
                trust_env=False,
            ),
            bucket=TokenBucket(s.endpoint_rate_per_second),
            breaker=CircuitBreaker(s.breaker_failures, s.breaker_cooldown_seconds),
            slots=asyncio.Semaphore(s.endpoint_concurrency),
            pinned=egress.literal_target(endpoint.url, self.policy),
        )

    # -- one attempt --------------------------------------------------------------------

    async def _deliver(self, delivery: Delivery) -> None:
        state = self.states[delivery.endpoint_id]
        started = time.monotonic()
        try:
            outcome = await self._attempt(state, delivery)
        finally:
            state.inflight -= 1
            self._progress.set()
        LATENCY.labels(delivery.endpoint_id).observe(time.monotonic() - started)
        self._outcomes.append(outcome)
        ATTEMPTS.labels(delivery.endpoint_id, _outcome_label(outcome)).inc()
        if outcome.status == "delivered":
            self.status.delivered += 1
        elif outcome.status == "failed":
            self.status.failed += 1
            log.error(
                "webhook delivery failed for good",
                extra={
                    "delivery": delivery.id,
                    "event_id": str(delivery.event_id),
                    "endpoint": delivery.endpoint_id,
                    "attempts": delivery.attempt,
                    "error": outcome.error,
                },
            )
        else:
            self.status.retried += 1
            log.info(
                "webhook attempt failed; will retry",
                extra={
                    "delivery": delivery.id,
                    "endpoint": delivery.endpoint_id,
                    "attempt": delivery.attempt,
                    "retry_in_seconds": round(outcome.retry_in or 0, 2),
                    "error": outcome.error,
                },
            )

    async def _attempt(self, state: EndpointState, delivery: Delivery) -> Outcome:
        try:
            async with state.slots:
                response = await self._post(state, delivery)
        except egress.RefusedURL as exc:  # configuration, not the endpoint's health
            return Outcome(delivery, "failed", None, None, str(exc))
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            return self._failure(state, delivery, None, _describe(exc))
        if 200 <= response.status_code < 300:
            state.breaker.success()
            return Outcome(delivery, "delivered", None, response.status_code, None)
        return self._failure(state, delivery, response.status_code, f"HTTP {response.status_code}")

    async def _post(self, state: EndpointState, delivery: Delivery) -> httpx.Response:
        """One signed POST to the address that passes the SSRF guard now."""
        s = self.settings
        if (wait := state.bucket.reserve(time.monotonic())) > 0:
            await asyncio.sleep(wait)
        target = state.pinned or await egress.resolve(
            state.endpoint.url, self.policy, dns_timeout=s.connect_timeout_seconds
        )
        headers = signing.headers(
            state.key, str(delivery.event_id), int(time.time()), delivery.body
        )
        headers |= {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "host": target.host_header,
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        async with asyncio.timeout(s.connect_timeout_seconds + s.request_timeout_seconds):
            return await state.client.post(
                target.pinned_url, content=delivery.body, headers=headers, extensions=extensions
            )

    def _failure(
        self, state: EndpointState, delivery: Delivery, code: int | None, error: str
    ) -> Outcome:
        state.breaker.failure(asyncio.get_running_loop().time())
        self.status.last_error = f"{delivery.endpoint_id}: {error}"
        delay = self.schedule.retry_in(delivery.attempt, delivery.window_start)
        if delay is None:
            return Outcome(
                delivery,
                "failed",
                None,
                code,
                f"gave up after {delivery.attempt} attempts: {error}",
            )
        return Outcome(delivery, "pending", delay, code, error)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _outcome_label(outcome: Outcome) -> str:
    return {"pending": "retried"}.get(outcome.status, outcome.status)
