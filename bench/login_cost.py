"""Where a login's CPU goes: milliseconds of CPU per login, by process, with the whole stack
up (`esctl up`: relays and consumers included, production argon2), against the CRUD peer
(`../shared/bench/peers/crud_users.py`) and raw argon2 in the same run.

Throughput on 2 cores is bounded by the CPU each login costs everywhere, so this says why
login runs below the CRUD peer and what each process adds. Both are driven by the same
closed loop: 4 connections for LOGIN_COST_SECONDS (default 20) each, then a pause for the
stack's consumers to catch up (their CPU counts). PostgreSQL is every backend of the
machine's server (this run's and any other's: run on a quiet machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from argon2 import PasswordHasher

from bench.harness import process, report, temp_database, temp_vhost, uvicorn_argv
from bench.login import login_count
from bench.peers import COMPARE, PRODUCTION
from testbed.ports import free_port
from testbed.up import esctl_up

SECONDS = float(os.environ.get("LOGIN_COST_SECONDS", "20"))
CONNECTIONS = 4
CATCH_UP_SECONDS = 8
PASSWORD = "correct horse battery"  # noqa: S105 - throwaway accounts in scratch databases
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def pids(*pgrep: str) -> list[int]:
    found = subprocess.run(["pgrep", *pgrep], capture_output=True, text=True, check=False)
    return [int(p) for p in found.stdout.split()]


def stack_processes(root: int) -> dict[str, list[int]]:
    """The stack's processes by name (`consume reporting_svc`, `haproxy`...), and RabbitMQ."""
    named: dict[str, list[int]] = {}
    for pid in pids("-P", str(root)):
        argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        argv = [a for a in argv if a]
        name = " ".join(argv[-2:]) if "esctl.main" in argv else Path(argv[0]).name
        named.setdefault(name, []).append(pid)
    named["rabbitmq (beam.smp)"] = pids("-f", "beam.smp")
    return named


def measure(
    auth: str, processes: dict[str, list[int]], catch_up: float
) -> dict[str, float | dict[str, float]]:
    """Log in from 4 connections for SECONDS; CPU per login of each process."""
    emails = [f"cost-{i}-{os.getpid()}@example.com" for i in range(CONNECTIONS)]
    for email in emails:
        httpx.post(
            f"{auth}/auth/register",
            json={"email": email, "password": PASSWORD, "display_name": "cost"},
            timeout=30,
        ).raise_for_status()
    time.sleep(3)  # the registrations' events settle
    everything = {**processes, "postgresql (all backends)": pids("-u", "postgres")}
    before = {name: sum(map(cpu_seconds, ps)) for name, ps in everything.items()}
    done = login_count(auth, emails, seconds=SECONDS, password=PASSWORD)
    time.sleep(catch_up)
    everything["postgresql (all backends)"] = pids("-u", "postgres")  # backends come and go
    after = {name: sum(map(cpu_seconds, ps)) for name, ps in everything.items()}
    per_login = {
        name: round((after[name] - before.get(name, 0.0)) * 1000 / max(done, 1), 2)
        for name in everything
    }
    per_login = {k: v for k, v in sorted(per_login.items(), key=lambda kv: -kv[1]) if v > 0}
    return {
        "logins_per_s": round(done / SECONDS, 1),
        "cpu_ms_per_login": per_login,
        "cpu_ms_per_login_total": round(sum(per_login.values()), 2),
    }


def raw_argon2_cpu_ms(settings_cost: tuple[int, int, int], rounds: int = 50) -> float:
    time_cost, memory, parallelism = settings_cost
    hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory, parallelism=parallelism)
    stored = hasher.hash(PASSWORD)
    started = time.process_time()
    for _ in range(rounds):
        hasher.verify(stored, PASSWORD)
    return round((time.process_time() - started) * 1000 / rounds, 2)


def crud_peer(database: Callable[[str], str]) -> dict[str, float | dict[str, float]]:
    port = free_port()
    argv = uvicorn_argv("crud_users:app", port, factory=False, app_dir=str(COMPARE.parent))
    env = {"CRUD_DSN": database("crud_cost"), "CRUD_PORT": str(port)}
    base = f"http://127.0.0.1:{port}"
    with process(argv, env, f"{base}/healthz") as peer:
        return measure(base, {"crud peer": [peer.pid]}, catch_up=0)


def main() -> None:
    argon2 = (
        int(PRODUCTION["AUTH_ARGON2_TIME_COST"]),
        int(PRODUCTION["AUTH_ARGON2_MEMORY_KIB"]),
        1,
    )
    with (
        tempfile.TemporaryDirectory(prefix="bench-login-cost-") as tmp,
        contextlib.ExitStack() as ex,
    ):

        def database(name: str) -> str:
            return ex.enter_context(temp_database(name))

        def vhost() -> str:
            return ex.enter_context(temp_vhost())

        peer = crud_peer(database)
        stack = ex.enter_context(
            esctl_up(database, vhost, Path(tmp), ready_timeout=180, **PRODUCTION)
        )
        eskit = measure(stack.auth, stack_processes(stack.pid), catch_up=CATCH_UP_SECONDS)
    result = {
        "baseline_raw_argon2_cpu_ms": raw_argon2_cpu_ms(argon2),
        "crud_peer": peer,
        "eskit": eskit,
        "baseline_logins_per_s": peer["logins_per_s"],
        "logins_per_s": eskit["logins_per_s"],
        "ratio": round(float(eskit["logins_per_s"]) / float(peer["logins_per_s"]), 3),  # type: ignore[arg-type]
        "target": ">= 0.9 (issue 14)",
        "connections": CONNECTIONS,
        "seconds": SECONDS,
    }
    print(json.dumps(result, indent=1), file=sys.stderr)
    report("login_cost", result)


if __name__ == "__main__":
    main()
