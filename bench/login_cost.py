"""Where a login's CPU goes: milliseconds of CPU per login, by process, with the whole stack
up (`esctl up`: relays and consumers included, production argon2), against the CRUD peer
(`../shared/bench/peers/crud_users.py`) and raw argon2 in the same run.

Throughput on 2 cores is bounded by the CPU each login costs everywhere, so this says why
login runs below the CRUD peer and what each process adds. Both are up together and driven
by the same closed loop, interleaved (peer, eskit, peer, eskit: LOGIN_COST_ROUNDS, default
2, since the host's speed drifts between minutes): 4 connections for LOGIN_COST_SECONDS
(default 20), then, for the stack, a pause for its consumers to catch up (their CPU counts).
Figures are the medians of the rounds. PostgreSQL is every backend of the machine's server
(this run's and any other's: run on a quiet machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from argon2 import PasswordHasher

from bench.harness import process, report, temp_database, temp_vhost, uvicorn_argv
from bench.login import login_count
from bench.peers import COMPARE, PRODUCTION
from testbed.ports import free_port
from testbed.up import esctl_up

SECONDS = float(os.environ.get("LOGIN_COST_SECONDS", "20"))
ROUNDS = int(os.environ.get("LOGIN_COST_ROUNDS", "2"))
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
    auth: str, processes: dict[str, list[int]], catch_up: float, round_: int = 0
) -> dict[str, float | dict[str, float]]:
    """Log in from 4 connections for SECONDS; CPU per login of each process."""
    emails = [f"cost-{round_}-{i}-{os.getpid()}@example.com" for i in range(CONNECTIONS)]
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


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the rounds (a process missing from a round: 0)."""
    names = {name for r in rounds for name in r["cpu_ms_per_login"]}
    per_login = {
        name: round(statistics.median(r["cpu_ms_per_login"].get(name, 0.0) for r in rounds), 2)
        for name in names
    }
    return {
        "logins_per_s": round(statistics.median(r["logins_per_s"] for r in rounds), 1),
        "logins_per_s_rounds": [r["logins_per_s"] for r in rounds],
        "cpu_ms_per_login": dict(sorted(per_login.items(), key=lambda kv: -kv[1])),
        "cpu_ms_per_login_total": round(
            statistics.median(r["cpu_ms_per_login_total"] for r in rounds), 2
        ),
    }


def main() -> None:
    argon2 = (
        int(PRODUCTION["AUTH_ARGON2_TIME_COST"]),
        int(PRODUCTION["AUTH_ARGON2_MEMORY_KIB"]),
        1,
    )
    peer_rounds: list[dict[str, Any]] = []
    eskit_rounds: list[dict[str, Any]] = []
    argon2_rounds: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-login-cost-") as tmp,
        contextlib.ExitStack() as ex,
    ):

        def database(name: str) -> str:
            return ex.enter_context(temp_database(name))

        def vhost() -> str:
            return ex.enter_context(temp_vhost())

        port = free_port()
        argv = uvicorn_argv("crud_users:app", port, factory=False, app_dir=str(COMPARE.parent))
        env = {"CRUD_DSN": database("crud_cost"), "CRUD_PORT": str(port)}
        peer_url = f"http://127.0.0.1:{port}"
        peer = ex.enter_context(process(argv, env, f"{peer_url}/healthz"))
        stack = ex.enter_context(
            esctl_up(database, vhost, Path(tmp), ready_timeout=180, **PRODUCTION)
        )
        processes = stack_processes(stack.pid)
        for round_ in range(ROUNDS):
            argon2_rounds.append(raw_argon2_cpu_ms(argon2))
            peer_rounds.append(measure(peer_url, {"crud peer": [peer.pid]}, 0, round_))
            eskit_rounds.append(measure(stack.auth, processes, CATCH_UP_SECONDS, round_))
    crud, eskit = medians(peer_rounds), medians(eskit_rounds)
    ratios = [
        round(float(e["logins_per_s"]) / float(c["logins_per_s"]), 3)
        for c, e in zip(peer_rounds, eskit_rounds, strict=True)
    ]
    result = {
        "baseline_raw_argon2_cpu_ms": round(statistics.median(argon2_rounds), 2),
        "crud_peer": crud,
        "eskit": eskit,
        "baseline_logins_per_s": crud["logins_per_s"],
        "logins_per_s": eskit["logins_per_s"],
        "ratio": round(float(eskit["logins_per_s"]) / float(crud["logins_per_s"]), 3),
        "ratio_rounds": ratios,
        "target": ">= 0.9 (issue 14)",
        "connections": CONNECTIONS,
        "seconds": SECONDS,
        "rounds": ROUNDS,
    }
    print(json.dumps(result, indent=1), file=sys.stderr)
    report("login_cost", result)


if __name__ == "__main__":
    main()
