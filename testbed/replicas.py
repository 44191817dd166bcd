"""More replicas of a relay or consumer, run inside a network namespace
(testbed/netns.py) and reaching the servers directly at the namespace's host address, so
that a blackhole cuts them off silently; and what the broker says of a queue's consumers.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import httpx

import registry
from testbed.netns import NetworkNamespace
from testbed.servers import PrivateRabbit, PrivateRabbitCluster, pick_port
from testbed.stack import Stack

# -- replicas in a network namespace ------------------------------------------------------


class NamespacedReplica:
    """One more replica of a relay or consumer of `stack`, run inside `ns`.

    It reaches PostgreSQL and RabbitMQ DIRECTLY at the namespace's host address (the servers
    must listen there: `private_servers(listen=[ns.host_ip], ...)`), with no proxy whose
    kernel would keep its sessions alive through `ns.blackhole()`. Its health server listens
    on the namespace's address (`url`). It is not one of `stack.procs`: nothing restarts it,
    and the stack's readiness does not count it.
    """

    def __init__(self, stack: Stack, ns: NetworkNamespace, name: str) -> None:
        process = next(p for p in registry.processes() if p.name == name)
        service = process.service
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
            service.variable("database_url"): stack.postgres.url(
                stack.databases[service.name], host=ns.host_ip
            ),
            service.variable("host"): ns.ns_ip,
            process.port_variable: str(self.port),
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
