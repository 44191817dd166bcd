"""Private PostgreSQL and RabbitMQ servers that a test (or the soak) may stop and restart.

The machine's shared servers (PostgreSQL on 5432, RabbitMQ on 5672) serve every other test
running at the same time, so chaos never touches them: each run starts its own PostgreSQL
cluster (`initdb` + `pg_ctl`, as the `postgres` user when run as root) and its own RabbitMQ
node (a second node name, its own ports, data and cookie) in a temporary directory, and
removes them afterwards, whatever happened.

RabbitMQ's CLI tools open an Erlang distribution port of their own at the node's
distribution port + 10000 (35672-35682 for the default node): the ports chosen here avoid
both ranges, or a colleague's `rabbitmqctl` would take our listener's port.
"""

from __future__ import annotations

import contextlib
import glob
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
from collections.abc import Iterator
from pathlib import Path

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


def pick_port(low: int = 20000, high: int = 30000) -> int:
    """A free port outside the ephemeral range and RabbitMQ's CLI ports."""
    for _ in range(200):
        port = random.randint(low, high)
        if port not in _RESERVED and port != 25672 and _bindable(port):
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
    """A throwaway PostgreSQL cluster on its own port, with trust authentication."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "pgdata"
        self.port = pick_port()
        self.bin = _postgres_bin()
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
        self.start()

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
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

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")


class PrivateRabbit:
    """A second RabbitMQ node on this machine, with its own name, ports, data and cookie."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = f"chaos-{uuid.uuid4().hex[:8]}@localhost"
        self.port = pick_port()
        self.dist_port = pick_port(20000, 25000)
        self._server: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
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

    def ctl(self, *args: str, timeout: float = 90) -> str:
        result = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stdout}{result.stderr}")
        return result.stdout

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "rabbitmq-env.conf").write_text("")
        (self.root / "rabbitmq.conf").write_text("loopback_users = none\n")
        (self.root / "enabled_plugins").write_text("[].\n")
        self._server = subprocess.Popen(
            [str(RABBITMQ_BIN / "rabbitmq-server")],
            env=self.env,
            stdout=(self.root / "server.out").open("wb"),
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

    def url(self, vhost: str = "/") -> str:
        from urllib.parse import quote

        return f"amqp://guest:guest@127.0.0.1:{self.port}/{quote(vhost, safe='')}"

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.ctl("stop", timeout=60)
        server = self._server
        if server is not None and server.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


@contextlib.contextmanager
def private_servers(
    prefix: str = "eskit-chaos-",
) -> Iterator[tuple[PrivatePostgres, PrivateRabbit]]:
    """A private PostgreSQL and RabbitMQ, torn down (and their files removed) on the way out."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)  # PostgreSQL runs as `postgres` and must reach its directory
    postgres = PrivatePostgres(root / "pg")
    rabbit = PrivateRabbit(root / "rabbit")
    try:
        postgres.init()
        rabbit.init()
        yield postgres, rabbit
    finally:
        rabbit.destroy()
        postgres.destroy()
        shutil.rmtree(root, ignore_errors=True)
