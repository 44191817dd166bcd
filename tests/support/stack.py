"""The whole stack as `esctl up`, on free ports, fresh databases and a vhost of the test's own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.ports import free_port

# Every port `esctl up` listens on, by the variable that sets it.
PORT_VARIABLES = (
    "AUTH_PORT",
    "USER_PORT",
    "AUTH_RELAY_PORT",
    "USER_RELAY_PORT",
    "USER_CONSUMER_PORT",
    "REPORTING_CONSUMER_PORT",
    "NOTIFY_CONSUMER_PORT",
    "INTEGRATION_CONSUMER_PORT",
    "GATEWAY_PORT",
    "GATEWAY_STATUS_PORT",
)
DATABASES = ("AUTH", "USER", "REPORTING", "NOTIFY", "INTEGRATION")


@dataclass
class Stack:
    env: dict[str, str]
    log: Path  # the processes' log lines (their stderr)

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
def running_stack(
    make_database: Callable[[str], str],
    make_vhost: Callable[[], str],
    work: Path,
    *,
    up_args: Sequence[str] = (),
    **extra_env: str,
) -> Iterator[Stack]:
    """Run `esctl up` until the block ends (SIGINT, as Ctrl-C would).

    Its output goes to work/stack.log, the processes' log lines (stderr) to work/stderr.log.
    """
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "AMQP_URL": make_vhost(),
        **{v: str(free_port()) for v in PORT_VARIABLES},
        **{f"{db}_DATABASE_URL": make_database(db.lower()) for db in DATABASES},
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
        proc = subprocess.Popen(
            [sys.executable, "-m", "esctl.main", "up", *up_args], env=env, stdout=out, stderr=log
        )
        try:
            deadline = time.monotonic() + 90
            while "eskit is running" not in out_path.read_text(errors="replace"):
                assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
                time.sleep(0.2)
            yield Stack(env, log_path)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
