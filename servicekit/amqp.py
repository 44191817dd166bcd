"""RabbitMQ: connecting to a cluster, and the topology, declared once here for relays,
consumers and the CLI.

A broker setting (`AMQP_URL`) names one node or several, separated by commas: the nodes of a
cluster. `connect` tries them in turn, starting with the last one that worked, so a client
fails over when its node goes away. Every connection negotiates a heartbeat (5 s unless the
URL says otherwise) and its socket keeps TCP keepalives, so a node cut off without a word
(no RST) is noticed in about 11 s instead of the kernel's two hours.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
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
# backstop against a message that kills the process before it can be counted.
BROKER_DELIVERY_LIMIT = 1000


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


class _KeepAliveTransport(TransportFactory):
    """aiormq's own TCP or TLS transport, with `keep_alive` on its socket."""

    def __init__(self, inner: TransportFactory) -> None:
        self.inner = inner

    async def create(self, url: URL, **kwargs: Any) -> Any:
        reader, writer = await self.inner.create(url, **kwargs)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            keep_alive(sock)
        return reader, writer


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
    """`<service>.q` (quorum, single active consumer, dead-lettering) and `<service>.dlq`.

    `bindings` maps a producer exchange to the routing keys the service handles. A queue
    declared earlier with other arguments (an older build's delivery limit) cannot be
    redeclared (PRECONDITION_FAILED): it is then used as it is, with a warning. Declare
    before setting the channel's QoS: the failed declare closes and reopens the channel.
    """
    dlx = await channel.declare_exchange(
        dead_letter_exchange(service), aio_pika.ExchangeType.FANOUT, durable=True
    )
    dlq = await channel.declare_queue(
        dead_letter_queue(service), durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dlq.bind(dlx)
    arguments: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-delivery-limit": BROKER_DELIVERY_LIMIT,
        "x-dead-letter-exchange": dead_letter_exchange(service),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    try:
        queue = await channel.declare_queue(live_queue(service), durable=True, arguments=arguments)
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        log.warning(
            "queue %s exists with other arguments; using it as it is. Its broker delivery "
            "limit may dead-letter healthy messages after connection losses: move it to %d "
            "with a policy (rabbitmqctl set_policy) or recreate the queue when it is empty",
            live_queue(service),
            BROKER_DELIVERY_LIMIT,
            extra={"error": str(exc)},
        )
        await channel.reopen()  # a failed declare closes the channel
        queue = await channel.declare_queue(live_queue(service), passive=True)
    for exchange, routing_keys in bindings.items():
        declared = await declare_producer_exchange(channel, exchange)
        for key in routing_keys:
            await queue.bind(declared, routing_key=key)
    return queue
