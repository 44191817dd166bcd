"""Chaos: a RabbitMQ node of a three-node cluster goes down under load.

The module starts a private PostgreSQL and a PRIVATE three-node RabbitMQ cluster
(testbed/servers.py: three nodes of this machine, one cookie), and the stack's
processes with AMQP_URL listing the three nodes (each through its own TCP proxy), so that a
client whose node goes away fails over to the next one. Quorum queues and the history stream
have a member on every node.

The case stops the node that leads the consumer queues (the one leading most of them),
mid-load, and keeps it down: within 30 s of the stop, a new registration must be published
and projected end to end through the two remaining nodes. Then the node is started again
(it rejoins by itself) and every check of the chaos suite must hold: nothing lost, nothing
applied twice, every effect once, the dead-letter queues empty.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from shared_contracts.names import HISTORY_STREAM, live_queue
from testbed.audit import AUDIT_QUEUE
from testbed.cases import RECOVERY_BOUND, AuditedStack, audited_stack, run_fault
from testbed.servers import PrivateRabbitCluster, private_cluster_servers
from testbed.stack import DLQ_SERVICES

CONSUMER_QUEUES = [live_queue(service) for service in DLQ_SERVICES]


@dataclass
class World(AuditedStack):
    cluster: PrivateRabbitCluster


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with (
        private_cluster_servers() as (postgres, cluster),
        audited_stack(postgres, cluster, logs="eskit-cluster-logs-") as running,
    ):
        yield World(running.stack, running.audit, cluster)


def _wait_all_online(cluster: PrivateRabbitCluster, queues: list[str], timeout: float) -> float:
    """Seconds until every member of `queues` is online again."""
    started = time.monotonic()
    everyone = sorted(n.node for n in cluster.nodes)
    while True:
        info = cluster.queue_info()
        offline = {q: sorted(info[q].get("online") or []) for q in queues}
        if all(online == everyone for online in offline.values()):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"members still offline after {timeout:.0f}s: {offline}")
        time.sleep(0.5)


def test_the_cluster_has_three_running_nodes_and_every_queue_on_each(world: World) -> None:
    cluster = world.cluster
    assert sorted(cluster.running_nodes()) == sorted(n.node for n in cluster.nodes)
    assert len(cluster.nodes) == 3
    queues = [*CONSUMER_QUEUES, *(f"{s}.dlq" for s in DLQ_SERVICES), HISTORY_STREAM, AUDIT_QUEUE]
    cluster.assert_replicated(queues)
    info = cluster.queue_info()
    assert info[HISTORY_STREAM]["type"] == "stream"
    assert all(info[q]["type"] == "quorum" for q in CONSUMER_QUEUES)
    # Every process reaches the broker with the three nodes' URLs.
    assert world.stack.env["AMQP_URL"].count(",") == 2


async def test_stopping_the_node_leading_the_consumer_queues_loses_nothing(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    stack, audit, cluster = world.stack, world.audit, world.cluster
    info = await asyncio.to_thread(cluster.queue_info)
    leaders = Counter(cluster.index_of(info[q]["leader"]) for q in CONSUMER_QUEUES)
    reporting = cluster.index_of(info[live_queue("reporting_svc")]["leader"])
    target = max(leaders, key=lambda i: (leaders[i], i == reporting))
    node = cluster.nodes[target].node
    led_during: list[dict[str, str]] = []
    running_during: list[list[str]] = []

    def stop() -> None:
        cluster.stop_node(target)

    def start() -> None:
        if not cluster.nodes[target].running:  # the node is down: look before it returns
            info = cluster.queue_info()
            led_during.append({q: str(info[q]["leader"]) for q in CONSUMER_QUEUES})
            running_during.append(cluster.running_nodes())
        cluster.start_node(target)

    try:
        # Recovery is timed from the node's stop: it stays down until `start`.
        case = await run_fault(stack, audit, "cluster-node-stop", begin=stop, end=start)
    finally:
        cluster.start_node(target)  # idempotent: never leave the node down
    online_after = await asyncio.to_thread(_wait_all_online, cluster, CONSUMER_QUEUES, 60)
    ready_after = await asyncio.to_thread(stack.wait_ready, 60)
    with capsys.disabled():
        print(
            f"\n{case.summary(stack, audit)} stopped {node} (led {leaders[target]} of "
            f"{len(CONSUMER_QUEUES)} consumer queues); members online again "
            f"{online_after:.1f}s after its start, stack ready {ready_after:.1f}s"
        )
    case.assert_held(stack)
    assert case.recovery <= RECOVERY_BOUND
    # While it was down, the two others ran the cluster and led every consumer queue.
    assert running_during and node not in running_during[0]
    assert led_during and node not in led_during[0].values(), led_during
    assert sorted(cluster.running_nodes()) == sorted(n.node for n in cluster.nodes)
