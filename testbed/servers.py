"""Private PostgreSQL and RabbitMQ servers that a test (or the soak) may stop and restart.

The machine's shared servers (PostgreSQL on 5432, RabbitMQ on 5672) serve every other test
running at the same time, so chaos never touches them: each run starts its own PostgreSQL
cluster (`initdb` + `pg_ctl`, as the `postgres` user when run as root) and its own RabbitMQ
node (a second node name, its own ports, data and cookie) in a temporary directory, and
removes them afterwards, whatever happened.

RabbitMQ's CLI tools open an Erlang distribution port of their own at the node's
distribution port + 10000 (35672-35682 for the default node): the ports chosen here avoid
both ranges, or a colleague's `rabbitmqctl` would take our listener's port.

Both servers can also listen on extra addresses (`listen=`): the host side of a network
namespace (testbed/netns.py), so that a process inside it reaches them directly, with
no proxy whose kernel would keep the session alive through a silent partition. The
namespace must exist before the servers start (they bind its address).

`PrivateRabbitCluster` is three such nodes joined into one cluster (same cookie, their own
names, ports, distribution ports and data), for failover cases.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
# Ports RabbitMQ's CLI tools (ours or a colleague's) may bind: distribution port + 10000.
_RESERVED = range(35600, 35700)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


_handed_out: set[int] = set()


def pick_port(low: int = 20000, high: int = 30000) -> int:
    """A free port outside the ephemeral range and RabbitMQ's CLI ports, never handed out
    before by this process: a port picked for a process that has not bound it yet is still
    free, and a second pick could return it (two consumers of one chaos stack once got the
    same health port, and one of them never started)."""
    for _ in range(500):
        port = random.randint(low, high)
        if port in _handed_out or port in _RESERVED or port == 25672:
            continue
        if _bindable(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise RuntimeError("PostgreSQL's server binaries are not installed (pg_ctl not found)")
    return Path(found[-1]).parent


def _wait_port(port: int, up: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} still {'closed' if up else 'open'} after {timeout}s")


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on its own port, with trust authentication.

    `listen`: addresses to listen on besides 127.0.0.1 (e.g. a namespace's `host_ip`);
    `trust`: networks (CIDR, e.g. the namespace's subnet) whose clients are trusted too.
    """

    def __init__(
        self, root: Path, *, listen: Sequence[str] = (), trust: Sequence[str] = ()
    ) -> None:
        self.root = root
        self.data = root / "pgdata"
        self.port = pick_port()
        self.bin = _postgres_bin()
        self.listen = ["127.0.0.1", *listen]
        self.trust = list(trust)
        self._user = "postgres" if os.geteuid() == 0 else None

    def _run(self, *argv: str, timeout: float = 60) -> None:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self._user:
            command = ["runuser", "-u", self._user, "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stdout}\n{result.stderr}")

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._user:
            owner = pwd.getpwnam(self._user)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        if self.trust:
            with (self.data / "pg_hba.conf").open("a") as hba:
                for network in self.trust:
                    hba.write(f"host all all {network} trust\n")
        self.start()

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses={','.join(self.listen)} "
            "-c max_connections=300 -c fsync=off -c full_page_writes=off"
        )
        log = str(self.root / "pg.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-w", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """`fast` ends sessions cleanly; `immediate` is a crash (recovery at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, down_seconds: float = 2.0, mode: str = "immediate") -> None:
        self.stop(mode)
        time.sleep(down_seconds)
        self.start()

    def url(self, dbname: str = "postgres", host: str = "127.0.0.1") -> str:
        return f"postgresql://postgres@{host}:{self.port}/{dbname}"

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")


class PrivateRabbit:
    """A second RabbitMQ node on this machine, with its own name, ports, data and cookie.

    `listen`: addresses to listen on besides 127.0.0.1, same port (listeners.tcp.N in its
    rabbitmq.conf). `node`, `cookie` and `dist_port` are chosen by a cluster for its nodes.
    """

    def __init__(
        self,
        root: Path,
        *,
        listen: Sequence[str] = (),
        node: str | None = None,
        cookie: str | None = None,
        dist_port: int | None = None,
    ) -> None:
        self.root = root
        self.node = node or f"chaos-{uuid.uuid4().hex[:8]}@localhost"
        self.port = pick_port()
        self.dist_port = dist_port or pick_port(20000, 25000)
        self.listen = ["127.0.0.1", *listen]
        self.cookie = cookie
        self._server: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "HOME": str(self.root),  # the node's and the CLI's .erlang.cookie
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_PID_FILE": str(self.root / "rabbit.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        if len(self.listen) > 1:
            # The listeners come from rabbitmq.conf; these would override them.
            del env["RABBITMQ_NODE_IP_ADDRESS"], env["RABBITMQ_NODE_PORT"]
        return env

    def ctl(self, *args: str, timeout: float = 90) -> str:
        return self._cli("rabbitmqctl", *args, timeout=timeout)

    def queues(self, *args: str, timeout: float = 60) -> str:
        """`rabbitmq-queues -n NODE ARGS` (quorum queue membership and status)."""
        return self._cli("rabbitmq-queues", *args, timeout=timeout)

    def _cli(self, tool: str, *args: str, timeout: float) -> str:
        result = subprocess.run(
            [str(RABBITMQ_BIN / tool), "-n", self.node, *args],
            env=self.env,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)}: {result.stdout}{result.stderr}")
        return result.stdout

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "rabbitmq-env.conf").write_text("")
        conf = ["loopback_users = none"]
        if len(self.listen) > 1:
            conf += [f"listeners.tcp.{i} = {a}:{self.port}" for i, a in enumerate(self.listen, 1)]
        (self.root / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        (self.root / "enabled_plugins").write_text("[].\n")
        if self.cookie is not None:
            cookie = self.root / ".erlang.cookie"
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)
        self.start()

    def start(self) -> None:
        """Start the node (its Erlang VM and the broker) and wait until it serves AMQP."""
        self._server = subprocess.Popen(
            [str(RABBITMQ_BIN / "rabbitmq-server")],
            env=self.env,
            stdout=(self.root / "server.out").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so teardown reaches only it
        )
        deadline = time.monotonic() + 90
        while True:
            if self._server.poll() is not None:
                log = (self.root / "server.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the private RabbitMQ node exited while starting:\n{log}")
            try:
                self.ctl("await_startup", "--timeout", "5", timeout=20)
                break
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        _wait_port(self.port, up=True, timeout=30)

    def stop(self) -> None:
        """Stop the whole node (broker and VM), as a host going down cleanly would."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.ctl("stop", timeout=60)
        self._reap()
        _wait_port(self.port, up=False, timeout=30)

    def _reap(self) -> None:
        server = self._server
        if server is None:
            return
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.poll() is None

    def stop_app(self) -> None:
        self.ctl("stop_app")
        _wait_port(self.port, up=False, timeout=30)

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup")
        _wait_port(self.port, up=True, timeout=30)

    def restart(self, down_seconds: float = 2.0) -> None:
        self.stop_app()
        time.sleep(down_seconds)
        self.start_app()

    def url(self, vhost: str = "/", host: str = "127.0.0.1") -> str:
        return f"amqp://guest:guest@{host}:{self.port}/{quote(vhost, safe='')}"

    def amqp_url_list(self, vhost: str = "/", host: str = "127.0.0.1") -> str:
        """The node as AMQP_URL names it (as `PrivateRabbitCluster.amqp_url_list` does)."""
        return self.url(vhost, host)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.ctl("stop", timeout=60)
        server = self._server
        if server is not None and server.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


class PrivateRabbitCluster:
    """Three (`size`) private RabbitMQ nodes on this machine, joined into one cluster.

    Each node has its own name, AMQP port, distribution port and data; all share one cookie.
    Nodes 1.. join node 0 (`stop_app; join_cluster; start_app`). Quorum queues and streams
    declared once the cluster is formed get a member on every node without any argument
    (observed with 3.10.8 and three nodes, for `x-quorum-initial-group-size` and
    `x-initial-cluster-size` alike; `assert_replicated` checks it). The leader of a new
    queue is on the node its declaring client is connected to.
    `stop_node(i)` stops a whole node, `start_node(i)` boots it again (it rejoins by itself).
    """

    def __init__(self, root: Path, size: int = 3, *, listen: Sequence[str] = ()) -> None:
        self.root = root
        base = f"chaos-{uuid.uuid4().hex[:8]}"
        cookie = uuid.uuid4().hex.upper()
        dist_ports = _spread_ports(size)
        self.nodes = [
            PrivateRabbit(
                root / f"node{i}",
                listen=listen,
                node=f"{base}-{i}@localhost",
                cookie=cookie,
                dist_port=dist_ports[i],
            )
            for i in range(size)
        ]
        # Not bound yet, so pick_port could not see them: no two of them may be equal.
        while len({n.port for n in self.nodes} | set(dist_ports)) < 2 * size:
            for node in self.nodes:
                node.port = pick_port()

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(len(self.nodes)) as pool:  # boot them side by side
            list(pool.map(lambda n: n.init(), self.nodes))
        first = self.nodes[0].node
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first)
            node.ctl("start_app")
            node.ctl("await_startup")
        running = self.running_nodes()
        if sorted(running) != sorted(n.node for n in self.nodes):
            raise RuntimeError(f"the cluster did not form: running {running}")

    def running_nodes(self, via: int | None = None) -> list[str]:
        """The cluster's running nodes, as a running node (or node `via`) sees them."""
        node = self.nodes[via] if via is not None else self.a_running_node()
        status = json.loads(node.ctl("cluster_status", "--formatter", "json"))
        return list(status.get("running_nodes", []))

    def a_running_node(self) -> PrivateRabbit:
        for node in self.nodes:
            if node.running:
                return node
        raise RuntimeError("no node of the cluster is running")

    def url(self, vhost: str = "/", host: str = "127.0.0.1") -> str:
        """A running node's URL (for the test's own connections)."""
        return self.a_running_node().url(vhost, host)

    def node_url(self, index: int, vhost: str = "/", host: str = "127.0.0.1") -> str:
        return self.nodes[index].url(vhost, host)

    def amqp_url_list(self, vhost: str = "/", host: str = "127.0.0.1") -> str:
        """Every node's URL, comma-separated: the cluster as AMQP_URL names it."""
        return ",".join(n.url(vhost, host) for n in self.nodes)

    def stop_node(self, index: int) -> None:
        self.nodes[index].stop()

    def start_node(self, index: int, timeout: float = 60) -> None:
        """Boot a stopped node again and wait until the cluster sees it running."""
        node = self.nodes[index]
        if not node.running:
            node.start()
        deadline = time.monotonic() + timeout
        while node.node not in self.running_nodes():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.node} did not rejoin the cluster")
            time.sleep(0.5)

    def index_of(self, node_name: str) -> int:
        for i, node in enumerate(self.nodes):
            if node.node == node_name:
                return i
        raise KeyError(node_name)

    def queue_info(self, vhost: str = "/") -> dict[str, dict[str, Any]]:
        """name -> {type, leader, members, online} of every queue, as a running node says."""
        rows = json.loads(
            self.a_running_node().ctl(
                "list_queues",
                "-p",
                vhost,
                "name",
                "type",
                "leader",
                "members",
                "online",
                "--formatter",
                "json",
            )
        )
        return {row["name"]: row for row in rows}

    def leader_of(self, queue: str, vhost: str = "/") -> int:
        """Index of the node leading a quorum queue or stream."""
        info = self.queue_info(vhost).get(queue)
        if info is None:
            raise KeyError(f"no queue {queue!r}")
        return self.index_of(str(info["leader"]))

    def assert_replicated(self, queues: Sequence[str], vhost: str = "/") -> None:
        """Each of `queues` has a member on every node."""
        everyone = sorted(n.node for n in self.nodes)
        info = self.queue_info(vhost)
        for name in queues:
            members = sorted(info.get(name, {}).get("members") or [])
            if members != everyone:
                raise AssertionError(f"{name} has members {members}, not {everyone}")

    def destroy(self) -> None:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: n.destroy(), self.nodes))


def _spread_ports(count: int) -> list[int]:
    """Distribution ports at least 20 apart: the CLI tools take port + 10000 to + 10010."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = pick_port(20000, 25000)
        if all(abs(port - c) > 20 for c in chosen):
            chosen.append(port)
    return chosen


@contextlib.contextmanager
def private_servers(
    prefix: str = "eskit-chaos-",
    *,
    listen: Sequence[str] = (),
    trust: Sequence[str] = (),
) -> Iterator[tuple[PrivatePostgres, PrivateRabbit]]:
    """A private PostgreSQL and RabbitMQ, torn down (and their files removed) on the way out.

    `listen`: extra addresses both listen on; `trust`: networks PostgreSQL trusts as well.
    """
    with _servers_root(prefix) as root:
        postgres = PrivatePostgres(root / "pg", listen=listen, trust=trust)
        rabbit = PrivateRabbit(root / "rabbit", listen=listen)
        try:
            postgres.init()
            rabbit.init()
            yield postgres, rabbit
        finally:
            rabbit.destroy()
            postgres.destroy()


@contextlib.contextmanager
def private_cluster_servers(
    prefix: str = "eskit-cluster-", size: int = 3
) -> Iterator[tuple[PrivatePostgres, PrivateRabbitCluster]]:
    """A private PostgreSQL and a private RabbitMQ cluster of `size` nodes, started side by
    side, torn down (every node stopped, the files removed) on the way out."""
    with _servers_root(prefix) as root:
        postgres = PrivatePostgres(root / "pg")
        cluster = PrivateRabbitCluster(root / "rabbit", size)
        try:
            with ThreadPoolExecutor(2) as pool:
                started = [pool.submit(postgres.init), pool.submit(cluster.init)]
                for future in started:
                    future.result()
            yield postgres, cluster
        finally:
            cluster.destroy()
            postgres.destroy()


@contextlib.contextmanager
def _servers_root(prefix: str) -> Iterator[Path]:
    """A temporary directory for the servers' data and logs, removed on the way out."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)  # PostgreSQL runs as `postgres` and must reach its directory
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
