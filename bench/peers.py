"""The peer comparison: the whole stack (`esctl up`, relays and consumers included) against a
hello-world route and the plain CRUD user service a team would otherwise pick, in one run.

It runs `../shared/bench/peers/compare.py` (about 3 minutes) against `esctl up` on free
ports, fresh databases and a vhost of its own, with production argon2 parameters (t=2,
19 MiB, as the CRUD peer), and prints compare.py's JSON with the stack's settings beside it.
The figures that issue 14 judges:
- `GET /users/me`: project p99 against max(25 ms, 1.5 x hello's p99), req/s against hello;
- `PATCH /users/me` on one profile at 64 connections: project against CRUD, and errors;
- login at 4 connections: project against CRUD (target >= 0.9).

`PEERS_COMPARE` overrides the script's path; `PEERS_ARGS` adds arguments (e.g. `--rounds 1`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import report
from testbed.scratch import scratch_database, scratch_vhost
from testbed.up import esctl_up

COMPARE = Path(__file__).resolve().parents[2] / "shared" / "bench" / "peers" / "compare.py"
PRODUCTION_ARGON2 = {"AUTH_ARGON2_TIME_COST": "2", "AUTH_ARGON2_MEMORY_KIB": "19456"}
# The production defaults of what the test stack shortens (testbed.up re-reads keys every
# second for the rotation tests).
PRODUCTION = {**PRODUCTION_ARGON2, "AUTH_KEYS_REFRESH_SECONDS": "5"}


def run_compare(stack_env: dict[str, str], work: Path, crud_dsn: str) -> dict[str, Any]:
    script = Path(os.environ.get("PEERS_COMPARE", COMPARE))
    if not script.exists():
        msg = f"{script} not found: the peer comparison lives in ../shared/bench/peers/"
        raise SystemExit(msg)
    auth = f"http://127.0.0.1:{stack_env['AUTH_PORT']}"
    users = f"http://127.0.0.1:{stack_env['USER_PORT']}"
    gateway = f"http://127.0.0.1:{stack_env['GATEWAY_PORT']}"
    argv = [
        sys.executable,
        str(script),
        "--project-auth",
        auth,
        "--project-user",
        users,
        "--gateway",
        gateway,
        "--crud-dsn",
        crud_dsn,
        "--out",
        "-",
        *shlex.split(os.environ.get("PEERS_ARGS", "")),
    ]
    env = {**os.environ, "PEERS_RESULTS": str(work / "results")}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    sys.stderr.write(done.stderr[-6000:])
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        msg = f"compare.py failed ({done.returncode}): {done.stderr[-2000:]}"
        raise SystemExit(msg)
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp,
        contextlib.ExitStack() as on_exit,
    ):

        def database(name: str) -> str:
            return on_exit.enter_context(scratch_database(name, prefix="bench"))

        def vhost() -> str:
            return on_exit.enter_context(scratch_vhost(prefix="bench"))

        crud_dsn = database("crud_peer")
        stack = on_exit.enter_context(
            esctl_up(
                database,
                vhost,
                Path(tmp),
                ready_timeout=180,
                **PRODUCTION,
                LOG_FORMAT="json",
            )
        )
        result = run_compare(stack.env, Path(tmp), crud_dsn)
    result["stack"] = {"settings": PRODUCTION, "processes": "esctl up (every process)"}
    report("peers", result)


if __name__ == "__main__":
    main()
