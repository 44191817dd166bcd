"""The stack as separate processes on private servers, each restarted when it dies.

Every process is one of the registry's (`registry.processes()`), started as `esctl <verb>
<service>` on ports of its own, and talks to RabbitMQ and PostgreSQL through a `TcpProxy`, so
a test can cut the network without touching the servers. A supervisor thread restarts any
process that dies, as Kubernetes would: a SIGKILL needs no manual step. Against a RabbitMQ
cluster, each node has its own proxy and AMQP_URL lists them all (comma-separated).

Used by tests/chaos (each fault, bounded) and bench/soak.py (minutes of mixed load).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg

import registry
from integration_svc.signing import new_secret
from servicekit.service import Role
from servicekit.shredding import new_service_key
from testbed.cli import ESCTL
from testbed.effects import (
    MAIL_FROM,
    WEBHOOK_ENDPOINT,
    WEBHOOK_EVENTS,
    MaildirReader,
    WebhookSink,
)
from testbed.proxy import TcpProxy
from testbed.servers import PrivatePostgres, PrivateRabbit, PrivateRabbitCluster, pick_port

# Every consumer process, and every service with a dead-letter queue, from the registry.
CONSUMERS = tuple(p.name for p in registry.processes() if p.role is Role.CONSUMER)
DLQ_SERVICES = tuple(s.name for s in registry.with_role(Role.CONSUMER))
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
        # Each service's own database, named as its settings name it by default.
        self.databases = {s.name: database_name(s) for s in registry.SERVICES}
        self.direct_db = {db: postgres.url(db) for db in self.databases.values()}
        self.maildir = MaildirReader(workdir / "maildir")
        self.sink = WebhookSink().start()
        self.webhook_secret = new_secret()
        self.procs = {
            p.name: Proc(p.name, [*ESCTL, *p.command], pick_port()) for p in registry.processes()
        }
        self.auth = self.procs["auth_svc"].url
        self.users = self.procs["user_svc"].url
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
            **{p.port_variable: str(self.procs[p.name].port) for p in registry.processes()},
            **{
                s.variable("database_url"): f"{via_pg}/{self.databases[s.name]}"
                for s in registry.SERVICES
            },
            "NOTIFY_MAILDIR": str(self.maildir.path),  # no NOTIFY_SMTP_URL: the maildir
            "NOTIFY_MAIL_FROM": MAIL_FROM,
            "NOTIFY_LEASE_SECONDS": str(EFFECT_LEASE_SECONDS),
            "INTEGRATION_ALLOW_LOOPBACK": "true",  # development only: the receiver is local
            "INTEGRATION_LEASE_SECONDS": str(EFFECT_LEASE_SECONDS),
            "INTEGRATION_RETRY_INITIAL_SECONDS": "1",
            "USER_JWKS_URL": f"{self.auth}/auth/.well-known/jwks.json",
            "AUTH_ARGON2_TIME_COST": "1",
            "AUTH_ARGON2_MEMORY_KIB": "1024",
            "AUTH_LOCKOUT_THRESHOLD": "1000",
            # Encryption at rest and keyed address ids, as in production.
            "AUTH_PERSONAL_DATA_KEY": new_service_key(),
            "USER_PERSONAL_DATA_KEY": new_service_key(),
            "AUTH_ADDRESS_ID_KEY": new_service_key(),
            "LOG_FORMAT": "json",
            "LOG_LEVEL": log_level,
        }
        self._lock = threading.Lock()
        self._held: set[str] = set()  # processes the supervisor must not restart
        self._stopping = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)

    # lifecycle

    def init_databases(self) -> None:
        """`esctl db init` on the private server (directly, not through the proxy), with the
        settings the processes get, then the test's webhook endpoint."""
        from integration_svc import endpoints
        from integration_svc.main import policy
        from integration_svc.settings import IntegrationSettings
        from servicekit.eventstore import connection_kwargs

        for service in registry.SERVICES:
            database = self.direct_db[self.databases[service.name]]
            service.init_db(service.settings(**self._settings_env(service, database)))
        # The endpoint, registered before integration_svc's consumer starts (as
        # `esctl webhooks add` does: checked by the same SSRF guard, loopback allowed).
        integration = IntegrationSettings(
            database_url=self.direct_db["integration"], allow_loopback=True
        )
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

    def settings_of(self, name: str) -> Any:
        """Service `name`'s settings as its processes have them (its keys included), with its
        database reached directly: for reading its store beside the stack."""
        service = registry.service(name)
        return service.settings(**self._settings_env(service, self.direct_db[self.databases[name]]))

    def _settings_env(self, service: Any, database: str) -> dict[str, Any]:
        """The fields of `service`'s settings that the stack's environment sets, with the
        database reached directly."""
        return {**settings_fields(service, self.env), "database_url": database}

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


def settings_fields(service: Any, env: dict[str, str]) -> dict[str, Any]:
    """The fields of `service`'s settings that `env` sets (under the service's own prefix)."""
    prefix = str(service.settings.model_config.get("env_prefix", ""))
    return {
        key[len(prefix) :].lower(): value
        for key, value in env.items()
        if key.startswith(prefix) and key[len(prefix) :].lower() in service.settings.model_fields
    }


def settings_from_env(service: Any, env: dict[str, str]) -> Any:
    """`service`'s settings as its processes read them from `env` (a stack's environment)."""
    return service.settings(**settings_fields(service, env))


def database_name(service: Any) -> str:
    """The database a service uses by default (its settings' URL), e.g. `users`."""
    return str(urlsplit(service.settings().database_url).path).lstrip("/")


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
