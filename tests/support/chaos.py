"""The stack as separate processes on private servers, a load generator with a ledger of what
was accepted and rejected, an audit of the exchanges, and the checks that nothing was lost.

Used by tests/chaos (each fault, bounded) and bench/soak.py (minutes of mixed load).

Every process talks to RabbitMQ and PostgreSQL through a `TcpProxy`, so a test can cut the
network without touching the servers. A supervisor thread restarts any process that dies,
as Kubernetes would: a SIGKILL needs no manual step. Against a RabbitMQ cluster, each node
has its own proxy and AMQP_URL lists them all (comma-separated).

A `NamespacedReplica` is one more replica of a relay or consumer, run inside a network
namespace (tests/support/netns.py) and reaching the servers directly at the namespace's
host address, so that a blackhole cuts it off silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import jwt
import psycopg

from integration_svc.signing import new_secret
from servicekit.amqp import declare_producer_exchange
from shared_contracts.envelope import event_id_for
from shared_contracts.names import AUTH_EVENTS, PRODUCER_EXCHANGES, USER_EVENTS, dead_letter_queue
from tests.support.chaos_effects import (
    MAIL_DOMAIN,
    MAIL_FROM,
    WEBHOOK_ENDPOINT,
    WEBHOOK_EVENTS,
    Effects,
    MaildirReader,
    Registration,
    WebhookSink,
    check_effects,
    effect_seen,
)
from tests.support.instances import (
    PrivatePostgres,
    PrivateRabbit,
    PrivateRabbitCluster,
    pick_port,
)
from tests.support.netns import NetworkNamespace
from tests.support.proxy import TcpProxy

RETRYABLE = {429, 500, 502, 503, 504}
AUDIT_QUEUE = "chaos.audit"
CONSUMERS = (
    "user_svc.consumer",
    "reporting_svc.consumer",
    "notify_svc.consumer",
    "integration_svc.consumer",
)
DLQ_SERVICES = ("user_svc", "reporting_svc", "notify_svc", "integration_svc")
# How long a claimed mail or webhook stays reserved: after a crash between sending and marking,
# it is sent again (same Message-ID / webhook-id) this long after the claim. Short here so that
# a case sees the resend within its catch-up bound (the default, 120 s, would outlast it).
EFFECT_LEASE_SECONDS = 10


# -- the processes ------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    argv: list[str]
    port: int
    popen: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    # `consumer_messages_total` of incarnations that are gone, by outcome.
    carried: Counter[str] = field(default_factory=Counter)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Stack:
    """auth_svc, user_svc, both relays and the four consumers (user_svc, reporting_svc,
    notify_svc, integration_svc), each its own process, as `esctl up` runs them. notify_svc
    writes its mails to a maildir in `workdir`; integration_svc delivers to a webhook endpoint
    on a loopback receiver the stack runs (subscribed to `WEBHOOK_EVENTS`)."""

    def __init__(
        self,
        postgres: PrivatePostgres,
        rabbit: PrivateRabbit | PrivateRabbitCluster,
        workdir: Path,
        *,
        restart_delay: float = 0.5,
        log_level: str = "INFO",
    ) -> None:
        self.postgres = postgres
        self.rabbit = rabbit
        self.workdir = workdir
        self.restart_delay = restart_delay
        # One proxy per broker node (a cluster has several); AMQP_URL lists them all.
        upstreams = rabbit.ports if isinstance(rabbit, PrivateRabbitCluster) else [rabbit.port]
        self.amqp_proxies = [TcpProxy(port).start() for port in upstreams]
        self.amqp_proxy = self.amqp_proxies[0]
        self.pg_proxy = TcpProxy(postgres.port).start()
        via_pg = f"postgresql://postgres@127.0.0.1:{self.pg_proxy.port}"
        self.direct_db = {
            n: postgres.url(n) for n in ("auth", "users", "reporting", "notify", "integration")
        }
        ports = {n: pick_port() for n in ("auth", "user", "ar", "ur", "uc", "rc", "nc", "ic")}
        self.maildir = MaildirReader(workdir / "maildir")
        self.sink = WebhookSink().start()
        self.webhook_secret = new_secret()
        self.auth = f"http://127.0.0.1:{ports['auth']}"
        self.users = f"http://127.0.0.1:{ports['user']}"
        inherited = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SMTP_URL", "INTEGRATION_WEBHOOKS_FILE")
        }
        self.env = {
            **inherited,
            "AMQP_URL": ",".join(
                f"amqp://guest:guest@127.0.0.1:{proxy.port}/" for proxy in self.amqp_proxies
            ),
            "AUTH_DATABASE_URL": f"{via_pg}/auth",
            "USER_DATABASE_URL": f"{via_pg}/users",
            "REPORTING_DATABASE_URL": f"{via_pg}/reporting",
            "AUTH_PORT": str(ports["auth"]),
            "USER_PORT": str(ports["user"]),
            "AUTH_RELAY_PORT": str(ports["ar"]),
            "USER_RELAY_PORT": str(ports["ur"]),
            "USER_CONSUMER_PORT": str(ports["uc"]),
            "REPORTING_CONSUMER_PORT": str(ports["rc"]),
            "NOTIFY_DATABASE_URL": f"{via_pg}/notify",
            "NOTIFY_CONSUMER_PORT": str(ports["nc"]),
            "NOTIFY_MAILDIR": str(self.maildir.path),  # no NOTIFY_SMTP_URL: the maildir
            "NOTIFY_MAIL_FROM": MAIL_FROM,
            "NOTIFY_LEASE_SECONDS": str(EFFECT_LEASE_SECONDS),
            "INTEGRATION_DATABASE_URL": f"{via_pg}/integration",
            "INTEGRATION_CONSUMER_PORT": str(ports["ic"]),
            "INTEGRATION_ALLOW_LOOPBACK": "true",  # development only: the receiver is local
            "INTEGRATION_LEASE_SECONDS": str(EFFECT_LEASE_SECONDS),
            "INTEGRATION_RETRY_INITIAL_SECONDS": "1",
            "USER_JWKS_URL": f"{self.auth}/auth/.well-known/jwks.json",
            "AUTH_ARGON2_TIME_COST": "1",
            "AUTH_ARGON2_MEMORY_KIB": "1024",
            "AUTH_LOCKOUT_THRESHOLD": "1000",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": log_level,
        }
        esctl = [sys.executable, "-m", "esctl.main"]
        self.procs = {
            p.name: p
            for p in (
                Proc("auth_svc", [*esctl, "serve", "auth_svc"], ports["auth"]),
                Proc("user_svc", [*esctl, "serve", "user_svc"], ports["user"]),
                Proc("auth_svc.relay", [*esctl, "relay", "auth_svc"], ports["ar"]),
                Proc("user_svc.relay", [*esctl, "relay", "user_svc"], ports["ur"]),
                Proc("user_svc.consumer", [*esctl, "consume", "user_svc"], ports["uc"]),
                Proc("reporting_svc.consumer", [*esctl, "consume", "reporting_svc"], ports["rc"]),
                Proc("notify_svc.consumer", [*esctl, "consume", "notify_svc"], ports["nc"]),
                Proc(
                    "integration_svc.consumer", [*esctl, "consume", "integration_svc"], ports["ic"]
                ),
            )
        }
        self._lock = threading.Lock()
        self._held: set[str] = set()  # processes the supervisor must not restart
        self._stopping = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)

    # lifecycle

    def init_databases(self) -> None:
        from auth_svc.main import init_db as init_auth
        from auth_svc.settings import AuthSettings
        from integration_svc import endpoints
        from integration_svc.main import init_db as init_integration
        from integration_svc.main import policy
        from integration_svc.settings import IntegrationSettings
        from notify_svc.main import init_db as init_notify
        from notify_svc.settings import NotifySettings
        from reporting_svc.main import init_db as init_reporting
        from reporting_svc.settings import ReportingSettings
        from servicekit.eventstore import connection_kwargs
        from user_svc.main import init_db as init_users
        from user_svc.settings import UserSettings

        init_auth(AuthSettings(database_url=self.direct_db["auth"]))
        init_users(UserSettings(database_url=self.direct_db["users"]))
        init_reporting(ReportingSettings(database_url=self.direct_db["reporting"]))
        init_notify(NotifySettings(database_url=self.direct_db["notify"], mail_from=MAIL_FROM))
        integration = IntegrationSettings(
            database_url=self.direct_db["integration"], allow_loopback=True
        )
        init_integration(integration)
        # The endpoint, registered before integration_svc's consumer starts (as
        # `esctl webhooks add` does: checked by the same SSRF guard, loopback allowed).
        endpoint = endpoints.validated(
            endpoints.Endpoint(
                WEBHOOK_ENDPOINT, self.sink.url, WEBHOOK_EVENTS, self.webhook_secret
            ),
            policy(integration),
        )
        with psycopg.connect(
            **connection_kwargs(self.direct_db["integration"]), autocommit=True
        ) as conn:
            endpoints.add(conn, endpoint)

    def start(self, timeout: float = 90) -> None:
        self.init_databases()
        for proc in self.procs.values():
            self._spawn(proc)
        self._supervisor.start()
        self.wait_ready(timeout)

    def _spawn(self, proc: Proc) -> None:
        log = (self.workdir / f"{proc.name}.log").open("ab")
        proc.popen = subprocess.Popen(proc.argv, env=self.env, stdout=log, stderr=log)
        proc.started_at = time.monotonic()
        log.close()

    def _supervise(self) -> None:
        while not self._stopping.wait(0.2):
            for proc in self.procs.values():
                with self._lock:
                    if proc.name in self._held:
                        continue
                    if proc.popen is not None and proc.popen.poll() is not None:
                        dead_for = time.monotonic() - proc.started_at
                        if dead_for < self.restart_delay:
                            continue
                        proc.restarts += 1
                        self._spawn(proc)

    def kill(self, name: str) -> None:
        """SIGKILL a process (after counting its metrics); the supervisor restarts it."""
        proc = self.procs[name]
        with contextlib.suppress(httpx.HTTPError):
            proc.carried.update(consumer_outcomes(proc.url))
        with self._lock:
            assert proc.popen is not None
            proc.popen.send_signal(signal.SIGKILL)
            proc.popen.wait(timeout=10)
            proc.started_at = time.monotonic()

    def hold(self, name: str) -> None:
        """SIGKILL a process and keep it down (the supervisor leaves it) until `release`."""
        with self._lock:
            self._held.add(name)
        self.kill(name)

    def release(self, name: str) -> None:
        """Let the supervisor restart a held process (counted as a restart)."""
        with self._lock:
            self._held.discard(name)

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor.is_alive():
            self._supervisor.join(timeout=5)
        for proc in self.procs.values():
            if proc.popen is not None and proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            if proc.popen is None:
                continue
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        for proxy in self.amqp_proxies:
            proxy.close()
        self.pg_proxy.close()
        self.sink.close()

    # observing

    def not_ready(self) -> list[str]:
        down = []
        with httpx.Client(timeout=2) as client:
            for proc in self.procs.values():
                try:
                    ok = client.get(f"{proc.url}/health/ready").status_code == 200
                except httpx.HTTPError:
                    ok = False
                if not ok:
                    down.append(proc.name)
        return down

    def wait_ready(self, timeout: float) -> float:
        started = time.monotonic()
        while down := self.not_ready():
            if time.monotonic() - started > timeout:
                raise AssertionError(f"not ready after {timeout:.0f}s: {down}\n{self.log_tail()}")
            time.sleep(0.2)
        return time.monotonic() - started

    def duplicates_suppressed(self) -> int:
        total = 0
        for name in CONSUMERS:
            proc = self.procs[name]
            try:
                live = consumer_outcomes(proc.url)
            except httpx.HTTPError:
                live = Counter()
            total += proc.carried["duplicate"] + live["duplicate"]
        return total

    def rss_mib(self) -> dict[str, float]:
        """Resident memory (MiB) of every process of the stack and of the private servers."""
        out = {}
        for proc in self.procs.values():
            if proc.popen is not None and proc.popen.poll() is None:
                out[proc.name] = _rss_mib([proc.popen.pid])
        postgres = _pids_of(f"-D {self.postgres.data}", parent=True)
        out["postgres (private, PSS)"] = _rss_mib(postgres, proportional=True)
        out["rabbitmq (private)"] = _rss_mib(_pids_of(f"beam.*{self.rabbit.root}"))
        return out

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for proc in self.procs.values():
            path = self.workdir / f"{proc.name}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {proc.name}\n" + "\n".join(t[:300] for t in tail))
        return "\n".join(parts)


def consumer_outcomes(url: str) -> Counter[str]:
    text = httpx.get(f"{url}/metrics", timeout=2).text
    found: Counter[str] = Counter()
    for m in re.finditer(r"^consumer_messages_total\{([^}]*)\} ([\d.e+]+)$", text, re.M):
        outcome = re.search(r'outcome="([^"]+)"', m.group(1))
        if outcome:
            found[outcome.group(1)] += int(float(m.group(2)))
    return found


def _pids_of(pattern: str, *, parent: bool = False) -> list[int]:
    result = subprocess.run(
        ["pgrep", "-f", "--", pattern], capture_output=True, text=True, check=False
    )
    pids = [int(p) for p in result.stdout.split()]
    if parent:  # the postmaster and its children
        children = (
            subprocess.run(
                ["pgrep", "-P", ",".join(map(str, pids))],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.split()
            if pids
            else []
        )
        pids += [int(p) for p in children]
    return pids


def _rss_mib(pids: list[int], *, proportional: bool = False) -> float:
    """Resident memory of `pids`; `proportional` shares shared pages among them (PSS), so
    that a server's many processes are not each charged its whole shared buffers."""
    total = 0
    for pid in pids:
        path, key = (
            (f"/proc/{pid}/smaps_rollup", "Pss:")
            if proportional
            else (f"/proc/{pid}/status", "VmRSS:")
        )
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    total += int(line.split()[1])
    return round(total / 1024, 1)


@contextlib.contextmanager
def running_stack(
    postgres: PrivatePostgres,
    rabbit: PrivateRabbit | PrivateRabbitCluster,
    workdir: Path,
    **kwargs: Any,
) -> Iterator[Stack]:
    stack = Stack(postgres, rabbit, workdir, **kwargs)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


# -- replicas in a network namespace ------------------------------------------------------

# process -> (its settings' prefix, the variable of its health port, its database)
REPLICA_SETTINGS = {
    "auth_svc.relay": ("AUTH", "AUTH_RELAY_PORT", "auth"),
    "user_svc.relay": ("USER", "USER_RELAY_PORT", "users"),
    "user_svc.consumer": ("USER", "USER_CONSUMER_PORT", "users"),
    "reporting_svc.consumer": ("REPORTING", "REPORTING_CONSUMER_PORT", "reporting"),
    "notify_svc.consumer": ("NOTIFY", "NOTIFY_CONSUMER_PORT", "notify"),
    "integration_svc.consumer": ("INTEGRATION", "INTEGRATION_CONSUMER_PORT", "integration"),
}


class NamespacedReplica:
    """One more replica of a relay or consumer of `stack`, run inside `ns`.

    It reaches PostgreSQL and RabbitMQ DIRECTLY at the namespace's host address (the servers
    must listen there: `private_servers(listen=[ns.host_ip], ...)`), with no proxy whose
    kernel would keep its sessions alive through `ns.blackhole()`. Its health server listens
    on the namespace's address (`url`). It is not one of `stack.procs`: nothing restarts it,
    and the stack's readiness does not count it.
    """

    def __init__(self, stack: Stack, ns: NetworkNamespace, name: str) -> None:
        prefix, port_variable, database = REPLICA_SETTINGS[name]
        rabbit = stack.rabbit
        amqp_url = (
            rabbit.amqp_url_list(host=ns.host_ip)
            if isinstance(rabbit, PrivateRabbitCluster)
            else rabbit.url(host=ns.host_ip)
        )
        self.name = name
        self.ns = ns
        self.port = pick_port()
        self.url = f"http://{ns.ns_ip}:{self.port}"
        self.argv = list(stack.procs[name].argv)
        self.log = stack.workdir / f"{name}.netns.log"
        self.env = {
            **stack.env,
            "AMQP_URL": amqp_url,
            f"{prefix}_DATABASE_URL": stack.postgres.url(database, host=ns.host_ip),
            f"{prefix}_HOST": ns.ns_ip,
            port_variable: str(self.port),
        }
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> NamespacedReplica:
        with self.log.open("ab") as log:
            self.popen = self.ns.popen(self.argv, self.env, stdout=log, stderr=log)
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def status(self) -> dict[str, Any] | None:
        """Its /status (None when it cannot be reached)."""
        try:
            response = httpx.get(f"{self.url}/status", timeout=2)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def role(self) -> str | None:
        """A relay's role, or a consumer's (its projection's consumer)."""
        status = self.status()
        if status is None:
            return None
        role = status.get("role") or (status.get("consumer") or {}).get("role")
        return str(role) if role is not None else None

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float) -> float:
        """Seconds until `predicate()` holds; fails (with its log) after `timeout`."""
        started = time.monotonic()
        while not predicate():
            if not self.alive():
                raise AssertionError(f"{self.name} (netns) exited\n{self.log_tail()}")
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"{self.name} (netns) not {what} after {timeout:.0f}s "
                    f"(role {self.role()})\n{self.log_tail()}"
                )
            time.sleep(0.2)
        return time.monotonic() - started

    def stop(self) -> None:
        popen = self.popen
        if popen is None or popen.poll() is not None:
            return
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=10)

    def log_tail(self, lines: int = 15) -> str:
        if not self.log.exists():
            return ""
        tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.name} (netns)\n" + "\n".join(t[:300] for t in tail)


def queue_consumers(
    rabbit: PrivateRabbit | PrivateRabbitCluster, queue: str
) -> list[tuple[str, bool]]:
    """(client address, active?) of each consumer of `queue`: with a single active consumer,
    one is active (none while the broker fails over) and the others wait behind it."""
    node = rabbit.a_running_node() if isinstance(rabbit, PrivateRabbitCluster) else rabbit
    listed = node.ctl(
        "list_consumers", "-p", "/", "queue_name", "channel_pid", "active", "--formatter", "json"
    )
    channels = node.ctl("list_channels", "pid", "name", "--formatter", "json")
    # A channel's name is "client-ip:port -> server-ip:port (n)".
    peers = {c["pid"]: c["name"].split(":")[0] for c in json.loads(channels)}
    return [
        (peers.get(c["channel_pid"], "?"), bool(c["active"]))
        for c in json.loads(listed)
        if c["queue_name"] == queue
    ]


def active_consumer_hosts(rabbit: PrivateRabbit | PrivateRabbitCluster, queue: str) -> list[str]:
    """Client addresses of the consumers the broker delivers `queue` to."""
    return [host for host, active in queue_consumers(rabbit, queue) if active]


# -- the audit: what reached the exchanges ------------------------------------------------


class Audit:
    """A durable quorum queue bound to both exchanges, read on its own thread, directly from
    the broker (not through the proxy). Reconnects when the broker restarts; given several
    node URLs (comma-separated, a cluster), it moves to the next node when one fails."""

    def __init__(self, amqp_url: str) -> None:
        self.amqp_url = amqp_url
        self._urls = [u.strip() for u in amqp_url.split(",") if u.strip()]
        self._node = 0
        # Keyed by producer and event id: an event id is unique per producer only (an
        # account and its profile share the aggregate id, so their first events share ids).
        self.envelopes: dict[tuple[str, str], dict[str, Any]] = {}
        self.copies: Counter[tuple[str, str]] = Counter()  # fresh deliveries seen
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> Audit:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the audit queue could not be declared")
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._consume(self._urls[self._node])
            except Exception:
                await asyncio.sleep(0.5)
            self._node = (self._node + 1) % len(self._urls)  # lost: try the next node

    async def _consume(self, url: str) -> None:
        connection = await aio_pika.connect(url, timeout=5)
        async with connection:
            closed = asyncio.Event()
            connection.close_callbacks.add(lambda *_: closed.set())
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=500)
            queue = await channel.declare_queue(
                AUDIT_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
            )
            for name in (AUTH_EVENTS, USER_EVENTS):
                await queue.bind(await declare_producer_exchange(channel, name), "#")
            self._ready.set()

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                body = json.loads(message.body)
                key = (body["producer"], body["event_id"])
                with self._lock:
                    self.envelopes.setdefault(key, body)
                    if not message.redelivered:
                        self.copies[key] += 1
                await message.ack()

            await queue.consume(on_message)
            while not self._stop.is_set() and not closed.is_set():
                await asyncio.sleep(0.1)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every distinct event seen, in position order per producer."""
        with self._lock:
            return sorted(self.envelopes.values(), key=lambda e: (e["producer"], e["position"]))

    def duplicates(self) -> int:
        with self._lock:
            return sum(c - 1 for c in self.copies.values() if c > 1)

    def find(self, event_type: str, email: str) -> dict[str, Any] | None:
        with self._lock:
            for env in self.envelopes.values():
                if env["event_type"] == event_type and env["data"].get("email") == email:
                    return env
        return None


async def inject_duplicates(
    amqp_url: str, envelopes: list[dict[str, Any]], *, seed: int = 1
) -> int:
    """Republish already published events, shuffled, as a broker redelivery or a relay
    re-send would: same ids, old positions, out of order."""
    sample = list(envelopes)
    random.Random(seed).shuffle(sample)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchanges = {
            n: await declare_producer_exchange(channel, n) for n in PRODUCER_EXCHANGES.values()
        }
        for env in sample:
            await exchanges[PRODUCER_EXCHANGES[env["producer"]]].publish(
                aio_pika.Message(
                    json.dumps(env).encode(),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=env["event_id"],
                    type=env["event_type"],
                    headers={"x-position": env["position"]},
                ),
                routing_key=env["event_type"],
            )
    return len(sample)


# -- the load generator and its ledger ----------------------------------------------------


@dataclass
class Ledger:
    """What the clients were told: accepted (2xx) and rejected writes, retries, latencies."""

    tag: str
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    retries: int = 0
    unresolved: int = 0  # gave up before a definitive answer (the check then fails)
    users: dict[str, str] = field(default_factory=dict)  # email -> user_id (registered)
    recovered_registrations: int = 0  # 409 after a failed try: an earlier try committed
    logins: Counter[str] = field(default_factory=Counter)  # user_id -> accepted logins
    ambiguous_logins: Counter[str] = field(default_factory=Counter)  # failed, may have landed
    bios: dict[str, str] = field(default_factory=dict)  # user_id -> last accepted bio
    rejected_bios: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)  # route -> failed attempts
    requests: Counter[str] = field(default_factory=Counter)  # route -> attempts


PASSWORD = "chaos password 1"


class LoadGenerator:
    """Clients that register, log in and edit their profile through the REST APIs, retrying
    whatever failed without a definitive answer (transport errors, 5xx) as a client would."""

    def __init__(self, stack: Stack, ledger: Ledger, *, give_up_after: float = 90.0) -> None:
        self.auth = stack.auth
        self.users = stack.users
        self.ledger = ledger
        self.give_up_after = give_up_after
        self.client = httpx.AsyncClient(timeout=10)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _request(
        self, route: str, method: str, url: str, **kwargs: Any
    ) -> tuple[httpx.Response | None, int]:
        """The first definitive response, and how many attempts failed before it."""
        failures = 0
        deadline = time.monotonic() + self.give_up_after
        while time.monotonic() < deadline:
            started = time.perf_counter()
            self.ledger.requests[route] += 1
            try:
                response = await self.client.request(method, url, **kwargs)
            except httpx.TransportError:
                response = None
            self.ledger.latencies[route].append(time.perf_counter() - started)
            if response is not None and response.status_code not in RETRYABLE:
                return response, failures
            failures += 1
            self.ledger.retries += 1
            self.ledger.errors[route] += 1
            await asyncio.sleep(0.2)
        return None, failures

    async def register(self, email: str) -> str | None:
        """Register; the user id once the account certainly exists (None if never)."""
        ledger = self.ledger
        ledger.sent += 1
        response, failures = await self._request(
            "POST /auth/register",
            "POST",
            f"{self.auth}/auth/register",
            json={"email": email, "password": PASSWORD, "display_name": ledger.tag},
        )
        if response is None:
            ledger.unresolved += 1
            return None
        if response.status_code == 201:
            ledger.accepted += 1
            ledger.users[email] = response.json()["user_id"]
            return ledger.users[email]
        if response.status_code == 409 and failures:
            # An earlier attempt committed but its answer was lost: accepted, exactly once.
            ledger.accepted += 1
            ledger.recovered_registrations += 1
            ledger.users[email] = ""  # the id comes with the first login
            return ""
        ledger.unexpected.append(f"register {email}: {response.status_code} {response.text}")
        return None

    async def login(self, email: str) -> str | None:
        """Log in; the access token (None if never)."""
        ledger = self.ledger
        ledger.sent += 1
        response, failures = await self._request(
            "POST /auth/login",
            "POST",
            f"{self.auth}/auth/login",
            json={"email": email, "password": PASSWORD},
        )
        if response is None or response.status_code != 200:
            ledger.unresolved += response is None
            if response is not None:
                ledger.unexpected.append(f"login {email}: {response.status_code}")
            return None
        token = str(response.json()["access_token"])
        user_id = str(jwt.decode(token, options={"verify_signature": False})["sub"])
        ledger.users[email] = ledger.users.get(email) or user_id
        ledger.accepted += 1
        ledger.logins[user_id] += 1
        ledger.ambiguous_logins[user_id] += failures
        return token

    async def edit_bio(self, token: str, user_id: str, bio: str) -> None:
        ledger = self.ledger
        ledger.sent += 1
        response, _ = await self._request(
            "PATCH /users/me",
            "PATCH",
            f"{self.users}/users/me",
            headers={"authorization": f"Bearer {token}"},
            json={"bio": bio},
        )
        if response is None:
            ledger.unresolved += 1
        elif response.status_code == 200:
            ledger.accepted += 1
            ledger.bios[user_id] = bio
        else:
            ledger.unexpected.append(f"patch {user_id}: {response.status_code} {response.text}")

    async def read_profile(self, token: str) -> None:
        response, _ = await self._request(
            "GET /users/me",
            "GET",
            f"{self.users}/users/me",
            headers={"authorization": f"Bearer {token}"},
        )
        if response is None or response.status_code != 200:
            self.ledger.unexpected.append(f"read: {response and response.status_code}")

    async def rejected_writes(self, email: str, token: str, user_id: str) -> None:
        """Writes the services must refuse, leaving no trace: a taken e-mail, a stale If-Match."""
        ledger = self.ledger
        ledger.sent += 2
        response, _ = await self._request(
            "POST /auth/register",
            "POST",
            f"{self.auth}/auth/register",
            json={"email": email, "password": PASSWORD, "display_name": "impostor"},
        )
        if response is not None and response.status_code == 409:
            ledger.rejected += 1
        else:
            ledger.unexpected.append(f"taken e-mail accepted? {response and response.status_code}")
        bio = f"rejected-{uuid.uuid4().hex[:8]}"
        ledger.rejected_bios.add(bio)
        response, _ = await self._request(
            "PATCH /users/me",
            "PATCH",
            f"{self.users}/users/me",
            headers={"authorization": f"Bearer {token}", "if-match": '"999999"'},
            json={"bio": bio},
        )
        if response is not None and response.status_code == 412:
            ledger.rejected += 1
        else:
            ledger.unexpected.append(
                f"stale If-Match accepted? {response and response.status_code}"
            )

    async def one_user(self, index: int) -> str | None:
        """A new user's session: register, log in, edit; every 5th also tries rejected writes.

        Returns the e-mail once registered."""
        email = f"{self.ledger.tag}-{index}-{uuid.uuid4().hex[:6]}@example.com"
        if await self.register(email) is None:
            return None
        token = await self.login(email)
        if token is None:
            return email
        user_id = self.ledger.users[email]
        await self.edit_bio(token, user_id, f"bio-{index}-{uuid.uuid4().hex[:6]}")
        if index % 5 == 0:
            await self.rejected_writes(email, token, user_id)
        return email

    async def run(
        self,
        seconds: float,
        *,
        concurrency: int = 4,
        pause: float = 0.05,
        until: asyncio.Event | None = None,
    ) -> None:
        """New users, `concurrency` at a time, for `seconds` (or until `until` is set; each
        user's session is finished first)."""
        deadline = time.monotonic() + seconds
        counter = iter(range(10**9))

        async def worker() -> None:
            while time.monotonic() < deadline and not (until and until.is_set()):
                await self.one_user(next(counter))
                await asyncio.sleep(pause)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


# -- the checks ---------------------------------------------------------------------------


@dataclass
class StoreEvent:
    producer: str
    position: int
    event_id: str
    event_type: str
    data: dict[str, Any]


def read_store(stack: Stack, producer: str) -> list[StoreEvent]:
    """Every public event in a producer's own event store (read directly, not via a proxy)."""
    from servicekit.eventstore import eventsourcing_env

    if producer == "auth_svc":
        from auth_svc.application import AuthService
        from auth_svc.contracts import to_contract

        app: Any = AuthService(env=eventsourcing_env(stack.direct_db["auth"], pool_size=1))
    else:
        from user_svc.application import ProfileService
        from user_svc.contracts import to_contract  # type: ignore[assignment]

        app = ProfileService(env=eventsourcing_env(stack.direct_db["users"], pool_size=1))
    events: list[StoreEvent] = []
    try:
        position = 0
        while True:
            page = app.recorder.select_notifications(
                start=position, limit=1000, inclusive_of_start=False
            )
            if not page:
                break
            for notification in page:
                event = app.mapper.to_domain_event(notification)
                contract = to_contract(event)
                if contract is not None:
                    events.append(
                        StoreEvent(
                            producer,
                            notification.id,
                            str(
                                event_id_for(
                                    producer, event.originator_id, event.originator_version
                                )
                            ),
                            contract.event_type,
                            contract.model_dump(mode="json"),
                        )
                    )
            position = page[-1].id
    finally:
        app.close()
    return events


async def dlq_depths(amqp_url: str) -> dict[str, int]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        depths = {}
        for service in DLQ_SERVICES:
            queue = await channel.declare_queue(dead_letter_queue(service), passive=True)
            depths[service] = int(queue.declaration_result.message_count or 0)
        return depths


@dataclass
class Verdict:
    """The outcome of one full check; `problems` is empty when every guarantee held."""

    problems: list[str]
    projected: int = 0  # this ledger's registrations counted by reporting_svc and profiled
    effects: Effects = field(default_factory=Effects)  # mails and webhooks


async def check_everything(stack: Stack, audit: Audit, ledgers: list[Ledger]) -> Verdict:
    """Event stores, exchanges and projections agree with what clients were told."""
    from reporting_svc.reports import REPORTS, read_report
    from servicekit.eventstore import eventsourcing_env
    from tests.support.history import expected_reports
    from user_svc.application import ProfileService

    problems: list[str] = []
    auth_events = await asyncio.to_thread(read_store, stack, "auth_svc")
    user_events = await asyncio.to_thread(read_store, stack, "user_svc")
    stored = auth_events + user_events

    registered: dict[str, list[StoreEvent]] = defaultdict(list)
    logins: Counter[str] = Counter()
    created: Counter[str] = Counter()
    bio: dict[str, str | None] = {}
    bios_ever: set[str] = set()
    for ev in auth_events:
        if ev.event_type == "auth.account.registered":
            registered[ev.data["email"]].append(ev)
        elif ev.event_type == "auth.account.login_succeeded":
            logins[ev.data["user_id"]] += 1
    for ev in user_events:
        if ev.event_type == "user.profile.created":
            created[ev.data["user_id"]] += 1
        bio[ev.data["user_id"]] = ev.data.get("bio")
        if ev.data.get("bio"):
            bios_ever.add(ev.data["bio"])

    # 1. The event stores: every accepted write exactly once, no rejected one.
    for ledger in ledgers:
        problems += [f"{ledger.tag}: unexpected answer {u}" for u in ledger.unexpected[:5]]
        if ledger.unresolved:
            problems.append(f"{ledger.tag}: {ledger.unresolved} writes never got an answer")
        mine = {e: evs for e, evs in registered.items() if e.startswith(f"{ledger.tag}-")}
        if set(mine) != set(ledger.users):
            problems.append(
                f"{ledger.tag}: registrations stored {len(mine)} != accepted {len(ledger.users)}"
            )
        for email, user_id in ledger.users.items():
            evs = registered.get(email, [])
            if len(evs) != 1:
                problems.append(f"{ledger.tag}: {email} registered {len(evs)} times")
            elif user_id and evs[0].data["user_id"] != user_id:
                problems.append(f"{ledger.tag}: {email} stored with another user id")
            owner = user_id or (evs[0].data["user_id"] if evs else "")
            if created[owner] != 1:
                problems.append(f"{ledger.tag}: {email} has {created[owner]} profiles")
        for user_id, accepted in ledger.logins.items():
            most = accepted + ledger.ambiguous_logins[user_id]
            if not accepted <= logins[user_id] <= most:
                problems.append(
                    f"{ledger.tag}: {user_id} logins stored {logins[user_id]}, "
                    f"accepted {accepted} (+{ledger.ambiguous_logins[user_id]} unanswered)"
                )
        for user_id, last in ledger.bios.items():
            if bio.get(user_id) != last:
                problems.append(f"{ledger.tag}: {user_id} bio {bio.get(user_id)!r} != {last!r}")
        if leaked := ledger.rejected_bios & bios_ever:
            problems.append(f"{ledger.tag}: rejected edits were stored: {sorted(leaked)[:3]}")

    # 2. The exchanges: every stored public event published (at least once), nothing else.
    published = {(e["producer"], e["event_id"]): e for e in audit.snapshot()}
    store_ids = {(e.producer, e.event_id) for e in stored}
    if missing := store_ids - set(published):
        problems.append(f"{len(missing)} stored events never reached an exchange")
    if extra := set(published) - store_ids:
        problems.append(f"{len(extra)} published events are in no event store")
    for ev in stored:
        env = published.get((ev.producer, ev.event_id))
        if env and (env["position"], env["event_type"]) != (ev.position, ev.event_type):
            problems.append(f"{ev.event_id} published with another position or type")
            break

    # 3. reporting_svc: its reports equal those computed independently from the events.
    envelopes = sorted(published.values(), key=lambda e: (e["producer"], e["position"]))
    expected = expected_reports(envelopes)
    for name in REPORTS:
        report = await asyncio.to_thread(read_report, stack.direct_db["reporting"], name)
        if report.rows != expected[name]:
            problems.append(f"report {name}: {report.rows[:3]} != expected {expected[name][:3]}")

    # 4. user_svc's consumer has seen every registration (its tracked position).
    profiles = ProfileService(env=eventsourcing_env(stack.direct_db["users"], pool_size=1))
    try:
        tracked = profiles.tracked_position("auth_svc")
    finally:
        profiles.close()
    last_registration = max((e.position for evs in registered.values() for e in evs), default=0)
    if tracked < last_registration:
        problems.append(f"user_svc consumer at {tracked}, registrations up to {last_registration}")

    # 5. notify_svc and integration_svc: one welcome intent and one webhook delivery per
    # stored registration (and per subscribed profile edit), each sent, and nothing else.
    subscribed_types = set(WEBHOOK_EVENTS)
    effects = await asyncio.to_thread(
        check_effects,
        notify_db=stack.direct_db["notify"],
        integration_db=stack.direct_db["integration"],
        maildir=stack.maildir,
        sink=stack.sink,
        secret=stack.webhook_secret,
        registrations=[
            Registration(
                ev.event_id, ev.data["email"], ev.data["user_id"], ev.data.get("display_name")
            )
            for evs in registered.values()
            for ev in evs
        ],
        subscribed={e.event_id: e.event_type for e in stored if e.event_type in subscribed_types},
        ledgers=[(lg.tag, lg.users, lg.rejected_bios) for lg in ledgers],
    )
    problems += effects.problems

    # 6. Nothing parked in a dead-letter queue.
    depths = await dlq_depths(stack.rabbit.url())
    if any(depths.values()):
        problems.append(f"dead-lettered: {depths}")

    projected = 0
    if ledgers:
        ledger = ledgers[-1]
        signed = {
            e["data"]["email"] for e in envelopes if e["event_type"] == "auth.account.registered"
        }
        projected = (
            sum(
                1
                for email in ledger.users
                if email in signed and created[registered[email][0].data["user_id"]] == 1
            )
            if not problems
            else 0
        )
    return Verdict(problems, projected, effects)


async def eventually(
    check: Callable[[], Awaitable[Verdict]], timeout: float
) -> tuple[Verdict, float]:
    """Poll `check` until it finds no problem or `timeout` passes; (verdict, seconds)."""
    started = time.monotonic()
    while True:
        verdict = await check()
        elapsed = time.monotonic() - started
        if not verdict.problems or elapsed > timeout:
            return verdict, elapsed
        await asyncio.sleep(0.5)


async def end_to_end_recovery(
    stack: Stack, audit: Audit, ledger: Ledger, since: float, timeout: float
) -> float:
    """Seconds from `since` until a new registration is accepted, published, applied by
    user_svc's and reporting_svc's consumers, and its welcome mail and webhook are out, with
    every process ready: the system works again, untouched."""
    from notify_svc.intents import message_id
    from notify_svc.projection import WELCOME
    from reporting_svc.reports import read_report

    load = LoadGenerator(stack, ledger, give_up_after=timeout)
    try:
        deadline = since + timeout
        email = f"{ledger.tag}-probe-{uuid.uuid4().hex[:6]}@example.com"
        if await load.register(email) is None:
            raise AssertionError(f"the probe registration failed\n{stack.log_tail()}")
        seen = "the probe was never published"
        while time.monotonic() < deadline:
            env = audit.find("auth.account.registered", email)
            if env is not None:
                seen = "published, but not every process was ready"
            if env is not None and not await asyncio.to_thread(stack.not_ready):
                signups = await asyncio.to_thread(
                    read_report, stack.direct_db["reporting"], "signups"
                )
                total = sum(row[1] for row in signups.rows)
                registrations = sum(
                    1 for e in audit.snapshot() if e["event_type"] == "auth.account.registered"
                )
                profile = await _profile_exists(stack, env["data"]["user_id"])
                event_id = env["event_id"]
                mail = message_id(uuid.UUID(event_id), WELCOME, MAIL_DOMAIN)
                sent = await asyncio.to_thread(
                    effect_seen, stack.maildir, stack.sink, event_id, mail
                )
                if total >= registrations and profile and sent:
                    return time.monotonic() - since
                seen = (
                    f"published; signups counted {total} of {registrations} registrations, "
                    f"profile {'made' if profile else 'missing'}, "
                    f"mail and webhook {'out' if sent else 'not out'}"
                )
            await asyncio.sleep(0.2)
    finally:
        await load.aclose()
    raise AssertionError(
        f"not recovered {timeout:.0f}s after the fault; last seen: {seen}; "
        f"not ready: {stack.not_ready()}\n" + stack.log_tail()
    )


async def _profile_exists(stack: Stack, user_id: str) -> bool:
    def created() -> bool:
        from servicekit.eventstore import eventsourcing_env
        from user_svc.application import ProfileService

        app = ProfileService(env=eventsourcing_env(stack.direct_db["users"], pool_size=1))
        try:
            return app.public_profile(uuid.UUID(user_id)) is not None
        finally:
            app.close()

    return await asyncio.to_thread(created)


# -- a fault that lasts until the system has recovered -----------------------------------


@dataclass
class LastingFaultCase:
    """What `run_lasting_fault` saw: `recovery` from the fault's start (while it lasted)."""

    ledger: Ledger
    verdict: Verdict
    recovery: float
    catch_up: float
    suppressed: int

    def summary(self, stack: Stack, audit: Audit) -> str:
        ledger, verdict = self.ledger, self.verdict
        restarts = {p.name: p.restarts for p in stack.procs.values() if p.restarts}
        return (
            f"[chaos] {ledger.tag}: sent={ledger.sent} accepted={ledger.accepted} "
            f"rejected={ledger.rejected} retried={ledger.retries} "
            f"projected={verdict.projected} mailed={verdict.effects.mails} "
            f"webhooks={verdict.effects.webhooks} duplicates suppressed={self.suppressed} "
            f"exchange duplicates(total)={audit.duplicates()} "
            f"resent(total) mails={verdict.effects.mail_copies} "
            f"webhooks={verdict.effects.webhook_copies} "
            f"recovery(since the fault began)={self.recovery:.1f}s "
            f"catch-up={self.catch_up:.1f}s restarts={restarts}"
        )


async def run_lasting_fault(
    stack: Stack,
    audit: Audit,
    tag: str,
    *,
    begin: Callable[[], None],
    end: Callable[[], None],
    load_seconds: float = 6.0,
    fault_after: float = 2.0,
    recovery_bound: float = 30.0,
    catch_up_bound: float = 45.0,
    diagnose: Callable[[], str] | None = None,
) -> LastingFaultCase:
    """Load for `load_seconds`; after `fault_after` s, `begin()` the fault and KEEP it: a new
    registration must go end to end within `recovery_bound` s of the fault's start while it
    lasts. Then `end()` undoes the fault (always, even when recovery failed or `begin` failed
    half-way: `end` must be idempotent) and every check must hold within `catch_up_bound` s.
    `diagnose()`, if given, says what it sees when recovery fails (the fault still on)."""
    ledger = Ledger(tag=tag)
    duplicates_before = await asyncio.to_thread(stack.duplicates_suppressed)
    load = LoadGenerator(stack, ledger)
    traffic = asyncio.create_task(load.run(load_seconds))
    try:
        await asyncio.sleep(fault_after)
        try:
            fault_began = time.monotonic()
            await asyncio.to_thread(begin)
            try:
                recovery = await end_to_end_recovery(
                    stack, audit, ledger, fault_began, recovery_bound
                )
            except AssertionError as exc:
                if diagnose is None:
                    raise
                seen = await asyncio.to_thread(_diagnosis, diagnose)
                raise AssertionError(f"{exc}\n--- while the fault lasted:\n{seen}") from None
            await traffic
        finally:
            await asyncio.to_thread(end)
    finally:
        with contextlib.suppress(Exception):
            await traffic
        await load.aclose()
    verdict, catch_up = await eventually(
        lambda: check_everything(stack, audit, [ledger]), catch_up_bound
    )
    suppressed = await asyncio.to_thread(stack.duplicates_suppressed) - duplicates_before
    return LastingFaultCase(ledger, verdict, recovery, catch_up, suppressed)


def _diagnosis(diagnose: Callable[[], str]) -> str:
    try:
        return diagnose()
    except Exception as exc:  # a diagnosis must not hide the failure it explains
        return f"(diagnosis failed: {type(exc).__name__}: {exc})"


def database_sessions(stack: Stack, database: str) -> str:
    """Every session on one of the stack's databases: client, state, waits, age, query."""
    from servicekit.eventstore import connection_kwargs

    kwargs = connection_kwargs(stack.direct_db[database])
    with psycopg.connect(**kwargs, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, client_addr, state, wait_event_type, wait_event, "
            "round(extract(epoch FROM now() - state_change))::int, left(query, 80) "
            "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return "\n".join(" | ".join(str(v) for v in row) for row in rows)
