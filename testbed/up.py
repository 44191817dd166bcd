"""`esctl up` itself, on free ports, fresh databases and a vhost of the test's own.

(testbed.stack runs the same processes one by one, on private servers, to fault them.)
Shared by the end-to-end tests and `bench.peers`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

import registry
from servicekit.process import stop_process
from testbed.cli import ESCTL
from testbed.ports import free_port
from testbed.stack import database_name

# Every port `esctl up` listens on, by the variable that sets it: each process of the
# registry's, and the gateway's two.
PORT_VARIABLES = (
    *(p.port_variable for p in registry.processes()),
    "GATEWAY_PORT",
    "GATEWAY_STATUS_PORT",
)
# Each service's database, by the variable that sets it, and the name to create it under.
DATABASES = {s.variable("database_url"): database_name(s) for s in registry.SERVICES}


@dataclass
class EsctlUp:
    env: dict[str, str]
    log: Path  # the processes' log lines (their stderr)
    pid: int = 0  # `esctl up` itself: its children are the stack's processes

    def child(self, name: str) -> int:
        """The pid of the stack's process `name` (`notify_svc.consumer`, `auth_svc`...)."""
        service, _, role = name.partition(".")
        verb = {"": "serve", "relay": "relay", "consumer": "consume"}[role]
        found = subprocess.run(
            ["pgrep", "-P", str(self.pid), "-f", f"esctl.main {verb} {service}$"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        assert len(found) == 1, f"{name}: {found}"
        return int(found[0])

    def url(self, port_variable: str) -> str:
        return f"http://127.0.0.1:{self.env[port_variable]}"

    @property
    def auth(self) -> str:
        return self.url("AUTH_PORT")

    @property
    def users(self) -> str:
        return self.url("USER_PORT")

    @property
    def gateway(self) -> str:
        return self.url("GATEWAY_PORT")

    @property
    def status(self) -> str:
        return self.url("GATEWAY_STATUS_PORT")

    @property
    def amqp_url(self) -> str:
        return self.env["AMQP_URL"]

    def client(self, source: str) -> httpx.Client:
        """A gateway client whose connections come from `source` (its own rate-limit bucket)."""
        return httpx.Client(
            base_url=self.gateway, transport=httpx.HTTPTransport(local_address=source), timeout=10
        )


@contextlib.contextmanager
def esctl_up(
    make_database: Callable[[str], str],
    make_vhost: Callable[[], str],
    work: Path,
    *,
    up_args: Sequence[str] = (),
    ready_timeout: float = 120,
    **extra_env: str,
) -> Iterator[EsctlUp]:
    """Run `esctl up` until the block ends (SIGINT, as Ctrl-C would).

    Its output goes to work/stack.log, the processes' log lines (stderr) to work/stderr.log.
    """
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "AMQP_URL": make_vhost(),
        **{v: str(free_port()) for v in PORT_VARIABLES},
        **{variable: make_database(name) for variable, name in DATABASES.items()},
        "GATEWAY_WORK_DIR": str(work / "gateway"),
        "NOTIFY_MAILDIR": str(work / "maildir"),
        "AUTH_ARGON2_TIME_COST": "1",
        "AUTH_ARGON2_MEMORY_KIB": "1024",
        "AUTH_KEYS_REFRESH_SECONDS": "1",
        "LOG_FORMAT": "json",
        **extra_env,
    }
    env["USER_JWKS_URL"] = f"http://127.0.0.1:{env['AUTH_PORT']}/auth/.well-known/jwks.json"
    out_path, log_path = work / "stack.log", work / "stderr.log"
    with out_path.open("wb") as out, log_path.open("wb") as log:
        argv = [*ESCTL, "up", "--ready-timeout", str(ready_timeout), *up_args]
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=log)
        try:
            deadline = time.monotonic() + ready_timeout + 30
            while "eskit is running" not in out_path.read_text(errors="replace"):
                assert proc.poll() is None, _why(out_path, log_path)
                assert time.monotonic() < deadline, _why(out_path, log_path)
                time.sleep(0.2)
            yield EsctlUp(env, log_path, proc.pid)
        finally:
            stop_process(proc, timeout=30, sig=signal.SIGINT)  # as Ctrl-C would


def _why(out_path: Path, log_path: Path) -> str:
    """What `esctl up` said, the lines that are not the services' JSON logs (HAProxy's
    alerts, tracebacks), and the tail of the log."""
    log = log_path.read_text(errors="replace")
    plain = [line for line in log.splitlines() if not line.startswith("{")]
    return "\n".join([out_path.read_text(errors="replace")[-1500:], *plain[-40:], log[-2000:]])
