"""RabbitMQ: connecting to a cluster, and the topology, declared once here for relays,
consumers and the CLI, with the policies that set what a running queue may change.

A broker setting (`AMQP_URL`) names one node or several, separated by commas: the nodes of a
cluster. `connect` tries them in turn, starting with the last one that worked, so a client
fails over when its node goes away. Every connection negotiates a heartbeat (5 s unless the
URL says otherwise) and its socket keeps TCP keepalives, so a node cut off without a word
(no RST) is noticed in about 11 s instead of the kernel's two hours.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import aio_pika
import httpx
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractQueue,
    UnderlayConnection,
)
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

from servicekit.eventstore import (
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE_SECONDS,
    KEEPALIVE_INTERVAL_SECONDS,
    TCP_USER_TIMEOUT_MS,
)
from shared_contracts.names import HISTORY_STREAM, dead_letter_queue, live_queue

log = logging.getLogger("servicekit.amqp")

DEFAULT_HEARTBEAT_SECONDS = 5  # the broker drops a silent peer after 2-3 missed intervals: ~12 s
CONNECT_TIMEOUT_SECONDS = 5.0  # per node: a cluster of three is tried in 15 s at most

# A quorum queue's own redelivery count rises for every unacked message each time its
# consumer's connection or channel goes away, so it counts broker trouble, not poison. The
# consumer counts handler failures itself (servicekit.consumer); the broker's limit stays as a
# backstop against a message that kills the process before it can be counted. It is set by a
# policy (`consumer_queue_policy`), so it can change on a running queue.
BROKER_DELIVERY_LIMIT = 1000

# What RabbitMQ takes only at declare time; everything else about a consumer's queue is a
# policy's. Neither can change on an existing queue, so a declare never fails for a setting.
CONSUMER_QUEUE_ARGUMENTS: Mapping[str, Any] = MappingProxyType(
    {"x-queue-type": "quorum", "x-single-active-consumer": True}
)

# Our policies: named `eskit.<queue>`, each matching exactly one queue of ours. Only one user
# policy applies to a queue (the highest priority); 10 beats the usual catch-all policies at 0
# on our queues only. Operators add limits with operator policies, which combine with ours.
POLICY_PREFIX = "eskit."
POLICY_PRIORITY = 10
MANAGEMENT_PORT = 15672
MANAGEMENT_TIMEOUT_SECONDS = 10.0


def amqp_urls(setting: str | Sequence[str]) -> list[str]:
    """The node URLs of a broker setting: one URL, or several separated by commas."""
    parts = setting.split(",") if isinstance(setting, str) else list(setting)
    urls = [p.strip() for p in parts if p.strip()]
    if not urls:
        msg = "no AMQP URL given"
        raise ValueError(msg)
    for url in urls:
        if urlsplit(url).scheme not in ("amqp", "amqps"):
            msg = f"not an amqp:// or amqps:// URL: {url!r}"
            raise ValueError(msg)
    return urls


def with_heartbeat(setting: str, seconds: int) -> str:
    """`setting` with `heartbeat=seconds` on every URL that does not choose its own."""
    out = []
    for url in amqp_urls(setting):
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        query.setdefault("heartbeat", str(seconds))
        out.append(urlunsplit(parts._replace(query=urlencode(query))))
    return ",".join(out)


def broker_address(amqp_url: str | Sequence[str]) -> str:
    """host:port of each node, for messages that tell an operator what to start."""
    return ", ".join(
        f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}"
        for parts in (urlsplit(u) for u in amqp_urls(amqp_url))
    )


def keep_alive(sock: socket.socket) -> None:
    """TCP keepalives and a user timeout on a socket, as on every PostgreSQL session."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_SECONDS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_SECONDS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS)


class _CorkedWriter:
    """A StreamWriter whose writes within one turn of the event loop leave in one send.

    aiormq writes each frame on its own, and the transport sends each at once: a relay's
    round of 15 publishes was 15 `send` calls (measured: 29% of the relay's CPU under
    login load), and as many segments for the broker to read. Here a write is buffered and
    flushed by a callback at the end of the loop's current turn (or by `close` and
    `write_eof`), so the frames that turn produced go out together, in order. Everything
    else is the wrapped writer's.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def writelines(self, data: Sequence[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if not self._writer.is_closing():
            self._writer.write(pending[0] if len(pending) == 1 else b"".join(pending))

    async def drain(self) -> None:
        # Flow control only, as StreamWriter's: wait while the transport is paused. What is
        # pending leaves at the end of this turn with whatever else the turn writes (aiormq
        # drains after every publish: flushing here would send each on its own again).
        await self._writer.drain()

    def write_eof(self) -> None:
        self._flush()
        self._writer.write_eof()

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


class _KeepAliveTransport(TransportFactory):
    """aiormq's own TCP or TLS transport, with `keep_alive` on its socket and corked
    writes (`_CorkedWriter`)."""

    def __init__(self, inner: TransportFactory) -> None:
        self.inner = inner

    async def create(self, url: URL, **kwargs: Any) -> Any:
        reader, writer = await self.inner.create(url, **kwargs)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            keep_alive(sock)
        return reader, _CorkedWriter(writer)


class _Connection(aio_pika.Connection):
    """aio-pika's connection, opening its socket through `_KeepAliveTransport`.

    aio-pika passes only whitelisted keywords on to aiormq, which is where the transport
    factory is chosen, hence this override of `connect`.
    """

    async def connect(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        inner = TLSTransportFactory() if self.url.scheme == "amqps" else TCPTransportFactory()
        self.transport = await UnderlayConnection.connect(
            self.url,
            self._on_connection_close,
            timeout=timeout,
            transport_factory=_KeepAliveTransport(inner),
            **self.kwargs,
        )
        await self._on_connected()


_last_good: dict[tuple[str, ...], int] = {}


async def connect(
    setting: str | Sequence[str], *, node_timeout: float = CONNECT_TIMEOUT_SECONDS
) -> AbstractConnection:
    """A connection to the first node of `setting` that answers, trying each in turn.

    The search starts at the node that last worked, so after a failover a client stays on
    the node it moved to. Raises the last node's error when none answers.
    """
    urls = amqp_urls(setting)
    key = tuple(urls)
    first = _last_good.get(key, 0)
    error: BaseException | None = None
    for i in range(len(urls)):
        index = (first + i) % len(urls)
        url = urls[index]
        if "heartbeat=" not in url:
            url = with_heartbeat(url, DEFAULT_HEARTBEAT_SECONDS)
        try:
            connection = await aio_pika.connect(
                url, timeout=node_timeout, connection_class=_Connection
            )
        except Exception as exc:  # noqa: BLE001 - try the next node, raise the last error
            error = exc
            if len(urls) > 1:
                log.warning(
                    "broker node unreachable; trying the next",
                    extra={"node": broker_address(url), "error": f"{type(exc).__name__}: {exc}"},
                )
            continue
        _last_good[key] = index
        return connection
    assert error is not None
    raise error


async def declare_producer_exchange(channel: AbstractChannel, exchange: str) -> AbstractExchange:
    """A producer's durable topic exchange, with the history stream bound to it."""
    declared = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    history = await declare_history_stream(channel)
    await history.bind(declared, routing_key="#")
    return declared


async def declare_history_stream(channel: AbstractChannel) -> AbstractQueue:
    """`events.history`: the retained log of every public event, read by replays."""
    return await channel.declare_queue(
        HISTORY_STREAM, durable=True, arguments={"x-queue-type": "stream"}
    )


def dead_letter_exchange(service: str) -> str:
    return f"{service}.dlx"


async def declare_consumer_queues(
    channel: AbstractChannel,
    service: str,
    bindings: dict[str, list[str]],
) -> AbstractQueue:
    """`<service>.q` (quorum, single active consumer) and `<service>.dlq`.

    `bindings` maps a producer exchange to the routing keys the service handles. The queue
    carries only what RabbitMQ fixes at declare time (`CONSUMER_QUEUE_ARGUMENTS`); its
    delivery limit and dead-lettering come from `consumer_queue_policy`, so they change on a
    running queue and no setting of the consumer makes the declare differ. A queue declared
    by an older build with x-arguments cannot be redeclared (PRECONDITION_FAILED): it is then
    used as it is, with a warning. Declare before setting the channel's QoS: the failed
    declare closes and reopens the channel.
    """
    dlx = await channel.declare_exchange(
        dead_letter_exchange(service), aio_pika.ExchangeType.FANOUT, durable=True
    )
    dlq = await channel.declare_queue(
        dead_letter_queue(service), durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dlq.bind(dlx)
    try:
        queue = await channel.declare_queue(
            live_queue(service), durable=True, arguments=dict(CONSUMER_QUEUE_ARGUMENTS)
        )
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        log.warning(
            "queue %s was declared with other x-arguments (an older build); using it as it "
            "is. Its x-dead-letter-exchange overrides the policy's and the lower of its "
            "x-delivery-limit and the policy's applies: recreate the queue when it is empty "
            "so that the policies alone decide (esctl db init applies them)",
            live_queue(service),
            extra={"error": str(exc)},
        )
        await channel.reopen()  # a failed declare closes the channel
        queue = await channel.declare_queue(live_queue(service), passive=True)
    for exchange, routing_keys in bindings.items():
        declared = await declare_producer_exchange(channel, exchange)
        for key in routing_keys:
            await queue.bind(declared, routing_key=key)
    return queue


@dataclass(frozen=True)
class QueuePolicy:
    """A RabbitMQ policy, as the management HTTP API takes it."""

    name: str
    pattern: str
    definition: Mapping[str, Any]
    priority: int = POLICY_PRIORITY
    apply_to: str = "queues"

    def body(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "definition": dict(self.definition),
            "priority": self.priority,
            "apply-to": self.apply_to,
        }


def consumer_queue_policy(
    service: str, *, delivery_limit: int = BROKER_DELIVERY_LIMIT
) -> QueuePolicy:
    """The settings of `<service>.q` that a running queue takes from a policy.

    Its pattern names that one queue and nothing else; the name starts with `POLICY_PREFIX`.
    Dead-lettering at least once needs `overflow: reject-publish`, hence both.
    """
    queue = live_queue(service)
    return QueuePolicy(
        name=f"{POLICY_PREFIX}{queue}",
        pattern=f"^{re.escape(queue)}$",
        definition={
            "delivery-limit": delivery_limit,
            "dead-letter-exchange": dead_letter_exchange(service),
            "dead-letter-strategy": "at-least-once",
            "overflow": "reject-publish",
        },
    )


# events.history's retention (issue 13): a stream cannot delete single messages, so how long
# personal data published to it stays is bounded by its age-based retention. RabbitMQ drops
# whole segments only, when it opens a new one: a message goes once the newest message of its
# segment is older than `max-age` and a later segment has begun. Segments small enough to
# roll over within hours keep that bound close to `max-age`.
HISTORY_MAX_AGE = "7D"
HISTORY_SEGMENT_BYTES = 10_000_000
MAX_AGE_SYNTAX = re.compile(r"^[1-9][0-9]*(Y|M|D|h|m|s)$")


def history_stream_policy(
    *, max_age: str = HISTORY_MAX_AGE, segment_bytes: int = HISTORY_SEGMENT_BYTES
) -> QueuePolicy:
    """events.history's retention by age, and the segment size that lets it act."""
    if not MAX_AGE_SYNTAX.match(max_age):
        msg = f"history max-age {max_age!r}: expected a number and one of Y, M, D, h, m, s (7D)"
        raise ValueError(msg)
    if segment_bytes < 1:
        raise ValueError("history segment size must be at least 1 byte")
    return QueuePolicy(
        name=f"{POLICY_PREFIX}{HISTORY_STREAM}",
        pattern=f"^{re.escape(HISTORY_STREAM)}$",
        definition={"max-age": max_age, "stream-max-segment-size-bytes": segment_bytes},
    )


class ManagementError(Exception):
    """The management HTTP API is unreachable or refused a request; the message says why."""


def management_api(
    amqp_setting: str, override: str | None = None
) -> tuple[list[str], str, tuple[str, str]]:
    """Base URLs of the management API (one per node), the vhost, and (user, password).

    Derived from the AMQP URLs: the same hosts on port 15672, the same credentials and
    vhost. `override` (e.g. `http://rabbit:15672`) replaces the base URLs; credentials in it
    win over the AMQP URL's.
    """
    urls = amqp_urls(amqp_setting)
    first = urlsplit(urls[0])
    vhost = unquote(first.path[1:]) if len(first.path) > 1 else "/"
    user, password = unquote(first.username or "guest"), unquote(first.password or "guest")
    if override:
        parts = urlsplit(override)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            msg = f"not an http:// or https:// URL: {override!r}"
            raise ManagementError(msg)
        if parts.username:
            user, password = unquote(parts.username), unquote(parts.password or "")
        port = f":{parts.port}" if parts.port else ""
        bases = [f"{parts.scheme}://{parts.hostname}{port}{parts.path.rstrip('/')}"]
    else:
        hosts = [urlsplit(u).hostname or "127.0.0.1" for u in urls]
        scheme = "https" if first.scheme == "amqps" else "http"
        bases = [f"{scheme}://{h}:{MANAGEMENT_PORT}" for h in dict.fromkeys(hosts)]
    return bases, vhost, (user, password)


async def _management(
    amqp_setting: str,
    override: str | None,
    method: str,
    path: str,
    body: Mapping[str, Any] | None = None,
) -> Any:
    """One request to the first node whose management API answers; its JSON (or None)."""
    bases, vhost, auth = management_api(amqp_setting, override)
    path = path.format(vhost=quote(vhost, safe=""))
    error = ""
    async with httpx.AsyncClient(auth=auth, timeout=MANAGEMENT_TIMEOUT_SECONDS) as client:
        for base in bases:
            try:
                response = await client.request(method, f"{base}/api/{path}", json=body)
            except httpx.HTTPError as exc:
                error = f"{base}: {type(exc).__name__} {exc}".strip()
                continue
            if response.status_code == 404 and method == "GET":
                return None
            if response.status_code >= 400:
                msg = (
                    f"RabbitMQ management API {method} /api/{path}: "
                    f"{response.status_code} {response.text.strip()[:200]}"
                )
                raise ManagementError(msg)
            return response.json() if response.content else None
    msg = (
        f"the RabbitMQ management API is not reachable ({error}); enable it with "
        "`rabbitmq-plugins enable rabbitmq_management` or set RABBITMQ_MANAGEMENT_URL"
    )
    raise ManagementError(msg)


async def apply_policies(
    amqp_setting: str, policies: Sequence[QueuePolicy], *, management_url: str | None = None
) -> str:
    """Create or update `policies` in the vhost of `amqp_setting`; the vhost's name.

    Only the named policies are written: an operator's own policies are left alone.
    """
    for policy in policies:
        await _management(
            amqp_setting,
            management_url,
            "PUT",
            f"policies/{{vhost}}/{quote(policy.name, safe='')}",
            policy.body(),
        )
    return management_api(amqp_setting, management_url)[1]


async def read_policies(
    amqp_setting: str, *, management_url: str | None = None
) -> list[dict[str, Any]]:
    """The vhost's policies whose name starts with `POLICY_PREFIX` (ours)."""
    found = await _management(amqp_setting, management_url, "GET", "policies/{vhost}") or []
    return [p for p in found if str(p.get("name", "")).startswith(POLICY_PREFIX)]


async def read_queue(
    amqp_setting: str, queue: str, *, management_url: str | None = None
) -> dict[str, Any] | None:
    """A queue as the management API shows it (arguments, policy), or None if absent."""
    result = await _management(
        amqp_setting, management_url, "GET", f"queues/{{vhost}}/{quote(queue, safe='')}"
    )
    return dict(result) if result else None
