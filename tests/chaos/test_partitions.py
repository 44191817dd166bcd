"""Chaos: SILENT partitions. A replica cut off without a word (no RST, no ICMP: every packet
dropped both ways) must lose its role to a standby on the other side, and nothing may be
lost, applied twice or sent twice beyond the allowed resend.

A TCP proxy cannot do this (its kernel keeps ACKing), so the cut-off replica runs inside a
network namespace joined to the host by a veth pair (testbed/netns.py) and reaches
the private PostgreSQL and RabbitMQ DIRECTLY at the namespace's host address; the blackhole
takes the host end of the pair down. Only TCP keepalives, user timeouts and AMQP heartbeats
can notice.

Each case makes the namespace replica the ACTIVE one (the host replica is held down while
it starts, then comes back as standby), puts clients under load, blackholes the namespace
and keeps it so: within 30 s of the blackhole's start, a new registration must be
published and projected end to end (the standby took over). Then the namespace is healed,
the namespace replica must come back as a standby, and every check of the chaos suite must
hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from shared_contracts.names import live_queue
from testbed.cases import (
    RECOVERY_BOUND,
    AuditedStack,
    FaultCase,
    audited_stack,
    database_sessions,
    run_fault,
)
from testbed.netns import NetworkNamespace, ip, netns_unavailable
from testbed.replicas import NamespacedReplica, active_consumer_hosts, queue_consumers
from testbed.servers import private_servers

TAKE_ROLE_BOUND = 60.0  # the namespace replica becoming the active one
REJOIN_BOUND = 60.0  # the namespace replica back as a standby after the heal


def _needs_namespaces() -> None:
    if reason := netns_unavailable():
        pytest.skip(reason)


# -- the namespace itself ------------------------------------------------------------------

_PEER = """
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
sock = socket.create_connection((host, port), timeout=5)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
sock.settimeout(None)
sock.sendall(b"hello")
started = time.monotonic()
try:
    data = sock.recv(100)
    print("received", data, flush=True)
except OSError as exc:
    print(type(exc).__name__, round(time.monotonic() - started, 1), flush=True)
"""


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def _connect_from_namespace(
    ns: NetworkNamespace, server: socket.socket
) -> tuple[subprocess.Popen[str], socket.socket]:
    port = server.getsockname()[1]
    peer = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, sys.executable, "-c", _PEER, ns.host_ip, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    conn, address = server.accept()
    assert address[0] == ns.ns_ip
    assert conn.recv(5) == b"hello"
    return peer, conn


def test_a_blackholed_namespace_drops_everything_silently() -> None:
    """The fault itself: after `blackhole()`, both ends of a connection time out (their
    keepalives go unanswered; a RST would be a reset, a live peer no error at all); after
    `heal()` a new connection works; teardown leaves no namespace, veth or route behind."""
    _needs_namespaces()
    with NetworkNamespace() as ns:
        with socket.create_server((ns.host_ip, 0)) as server:
            server.settimeout(15)
            peer, conn = _connect_from_namespace(ns, server)
            with conn:
                _keepalive(conn)
                conn.settimeout(30)
                ns.blackhole()
                try:
                    started = time.monotonic()
                    with pytest.raises(TimeoutError):  # not ConnectionResetError
                        conn.recv(100)
                    host_side = time.monotonic() - started
                    out, _ = peer.communicate(timeout=30)
                finally:
                    ns.heal()
            assert out.startswith("TimeoutError"), out  # the namespace's end: the same
            assert 2 < host_side < 15, host_side
            # Healed: a new connection from the namespace goes through.
            peer, conn = _connect_from_namespace(ns, server)
            with conn:
                conn.sendall(b"back")
                out, _ = peer.communicate(timeout=10)
            assert out.startswith("received b'back'"), out
        name, host_if, subnet = ns.name, ns.host_if, str(ns.subnet)
    assert name not in ip("netns", "list").stdout
    assert host_if not in ip("-o", "link").stdout
    assert subnet not in ip("route", "show", "table", "all").stdout


# -- the stack with replicas in the namespace ----------------------------------------------


@dataclass
class World(AuditedStack):
    ns: NetworkNamespace


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    _needs_namespaces()
    # The namespace first: both servers bind its host address as they start.
    with NetworkNamespace() as ns:
        servers = private_servers(
            prefix="eskit-partition-", listen=[ns.host_ip], trust=[str(ns.subnet)]
        )
        with (
            servers as (postgres, rabbit),
            audited_stack(postgres, rabbit, logs="eskit-partition-logs-") as running,
        ):
            yield World(running.stack, running.audit, ns)


def _status(url: str) -> dict[str, object]:
    return dict(httpx.get(f"{url}/status", timeout=2).json())


async def _make_active(
    world: World, replica: NamespacedReplica, is_active: Callable[[], bool]
) -> None:
    """Hold the host replica down, start the namespace one until it is the active one, then
    let the host replica come back (as a standby) and wait for the whole stack."""
    stack = world.stack
    stack.hold(replica.name)
    try:
        replica.start()
        await asyncio.to_thread(replica.wait_for, "active", is_active, TAKE_ROLE_BOUND)
    finally:
        stack.release(replica.name)
    await asyncio.to_thread(stack.wait_ready, 60)
    await asyncio.sleep(1)
    assert is_active(), f"{replica.name}: the host replica took the role back on its return"


def _heal_and_rejoin(
    ns: NetworkNamespace, replica: NamespacedReplica, rejoined: Callable[[], bool]
) -> float | None:
    """Heal, then seconds until the namespace replica has rejoined (None: not within
    REJOIN_BOUND). Never raises for a replica that stays away: the caller asserts."""
    ns.heal()
    healed = time.monotonic()
    while time.monotonic() - healed < REJOIN_BOUND and replica.alive():
        with contextlib.suppress(Exception):
            if rejoined():
                return round(time.monotonic() - healed, 1)
        time.sleep(0.2)
    return None


def _during(probe: Callable[[], object]) -> object:
    try:
        return probe()
    except Exception as exc:  # recorded: the test asserts on it
        return f"{type(exc).__name__}: {exc}"


def _report(capsys: pytest.CaptureFixture[str], world: World, case: FaultCase, extra: str) -> None:
    with capsys.disabled():
        print(f"\n{case.summary(world.stack, world.audit)} {extra}")


def _assert_checks(world: World, case: FaultCase) -> None:
    case.assert_held(world.stack)
    assert case.recovery <= RECOVERY_BOUND


async def _partition(
    world: World, tag: str, *, heal: Callable[[], None], diagnose: Callable[[], str]
) -> FaultCase:
    """The namespace blackholed under load, and kept so until `heal` (recovery is timed from
    the blackhole's start)."""
    return await run_fault(
        world.stack, world.audit, tag, begin=world.ns.blackhole, end=heal, diagnose=diagnose
    )


async def test_relay_leader_cut_off_from_the_database_is_replaced_by_its_standby(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """auth_svc's relay leader runs in the namespace (advisory lock on its PostgreSQL
    session); blackholed, PostgreSQL must end that session and release the lock, and the
    host standby take over, while the partition lasts."""
    stack, ns = world.stack, world.ns
    name = "auth_svc.relay"
    host_relay = stack.procs[name]
    replica = NamespacedReplica(stack, ns, name)
    try:
        await _make_active(world, replica, lambda: replica.role() == "leader")
        assert _status(host_relay.url)["role"] == "standby"
        roles_during: list[object] = []
        rejoined: list[float | None] = []

        def heal() -> None:  # still blackholed: the host relay must lead by now
            roles_during.append(_during(lambda: _status(host_relay.url).get("role")))
            rejoined.append(
                _heal_and_rejoin(
                    ns, replica, lambda: replica.role() == "standby" and replica.ready()
                )
            )

        case = await _partition(
            world,
            "partition-relay-leader",
            heal=heal,
            diagnose=lambda: (
                f"host relay: {_during(lambda: _status(host_relay.url))}\n"
                f"auth sessions (pid|client|state|wait|wait event|s|query):\n"
                f"{database_sessions(stack, 'auth')}"
            ),
        )
        _report(capsys, world, case, f"namespace replica a standby after heal: {rejoined[0]}s")
        _assert_checks(world, case)
        assert roles_during == ["leader"], "the host relay did not lead during the partition"
        assert rejoined[0] is not None, (
            f"not a standby {REJOIN_BOUND:.0f}s after the heal (role {replica.role()})\n"
            + replica.log_tail()
        )
        assert _status(host_relay.url)["role"] == "leader"
    finally:
        ns.heal()  # idempotent: a failure before the case's own heal leaves no blackhole
        replica.stop()
    assert not replica.alive()


async def test_active_consumer_cut_off_from_the_broker_is_replaced_by_its_standby(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """reporting_svc's single active consumer runs in the namespace; blackholed, RabbitMQ
    must notice (heartbeats) and hand the queue, with the unacked deliveries, to the host
    replica waiting behind it, while the partition lasts."""
    stack, ns, rabbit = world.stack, world.ns, world.stack.rabbit
    name = "reporting_svc.consumer"
    queue = live_queue("reporting_svc")
    replica = NamespacedReplica(stack, ns, name)

    def active() -> list[str]:
        return active_consumer_hosts(rabbit, queue)

    try:
        await _make_active(world, replica, lambda: replica.ready() and active() == [ns.ns_ip])
        actives_during: list[object] = []
        rejoined: list[float | None] = []

        def waiting_again() -> bool:
            waiting = [h for h, on in queue_consumers(rabbit, queue) if not on]
            return replica.ready() and replica.role() == "consuming" and ns.ns_ip in waiting

        def heal() -> None:  # still blackholed: the host replica must be the active one
            actives_during.append(_during(active))
            rejoined.append(_heal_and_rejoin(ns, replica, waiting_again))

        case = await _partition(
            world,
            "partition-active-consumer",
            heal=heal,
            diagnose=lambda: (
                f"consumers of {queue} (client, active): {queue_consumers(rabbit, queue)}\n"
                f"host consumer: {_during(lambda: _status(stack.procs[name].url))}\n"
                + rabbit.ctl("list_queues", "name", "messages_ready", "messages_unacknowledged")
                + rabbit.ctl("list_connections", "peer_host", "peer_port", "state", "timeout")
                + "reporting sessions (pid|client|state|wait|wait event|s|query):\n"
                + database_sessions(stack, "reporting")
                + "\n"
                + replica.log_tail()
            ),
        )
        _report(capsys, world, case, f"namespace replica waiting after heal: {rejoined[0]}s")
        _assert_checks(world, case)
        assert actives_during == [["127.0.0.1"]], actives_during  # the host replica, via proxy
        assert rejoined[0] is not None, (
            f"not waiting on {queue} {REJOIN_BOUND:.0f}s after the heal "
            f"(role {replica.role()}, consumers {queue_consumers(rabbit, queue)})\n"
            + replica.log_tail()
        )
        assert active() == ["127.0.0.1"], "the healed replica took the queue back"
    finally:
        ns.heal()
        replica.stop()
    assert not replica.alive()
