"""The cost of tracing and metrics with no exporter endpoint: on against off, in one run.

- GET /users/me: two user_svc processes on the same database, one as deployed (tracing
  configured with no OTLP endpoint, request metrics on), one with `OTEL_SDK_DISABLED=true`
  and `METRICS_ENABLED=false`; wrk on each in turn (A B A B).
- The relay catching up a backlog whose events carry traceparents (as a traced request
  leaves them), each catch-up in a fresh process with tracing on or off (A B A B).

Target: on/off >= 0.9 for both.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx

from bench.harness import (
    auth_and_users,
    median,
    process,
    report,
    temp_database,
    temp_vhost,
    uvicorn_argv,
    wrk,
)
from testbed.ports import free_port

ROUNDS = 5
SECONDS = 5
BACKLOG = 20_000
BATCH = 500
OFF = {"OTEL_SDK_DISABLED": "true", "METRICS_ENABLED": "false"}


def _clean_env() -> None:
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[key]


def users_me() -> dict[str, object]:
    with auth_and_users() as (auth, users, users_db, _):
        off_port = free_port()
        off = f"http://127.0.0.1:{off_port}"
        env = {
            "USER_DATABASE_URL": users_db,
            "USER_JWKS_URL": f"{auth}/auth/.well-known/jwks.json",
            "LOG_LEVEL": "WARNING",
            **OFF,
        }
        with process(
            uvicorn_argv("user_svc.main:create_app", off_port), env, f"{off}/health/ready"
        ):
            body = {"email": "obs@example.com", "password": "benchmark password"}
            httpx.post(f"{auth}/auth/register", json=body, timeout=30).raise_for_status()
            token = httpx.post(f"{auth}/auth/login", json=body, timeout=30).json()["access_token"]
            bearer = {"Authorization": f"Bearer {token}"}
            for base in (users, off):
                httpx.get(f"{base}/users/me", headers=bearer, timeout=10).raise_for_status()
            on_runs: list[dict[str, float]] = []
            off_runs: list[dict[str, float]] = []
            for _ in range(ROUNDS):
                on_runs.append(
                    wrk(f"{users}/users/me", seconds=SECONDS, connections=64, headers=bearer)
                )
                off_runs.append(
                    wrk(f"{off}/users/me", seconds=SECONDS, connections=64, headers=bearer)
                )
    return {
        "benchmark": "GET /users/me, tracing+metrics on (no exporter endpoint) vs off",
        "baseline_rps": median([r["rps"] for r in off_runs]),
        "rps": median([r["rps"] for r in on_runs]),
        "p99_ms": median([r["p99_ms"] for r in on_runs]),
        "baseline_p99_ms": median([r["p99_ms"] for r in off_runs]),
        "errors": sum(r["errors"] for r in on_runs + off_runs),
    }


def fill_traced(db: str) -> None:
    """A backlog whose every event was appended inside a (non-exported) request span."""
    from servicekit import telemetry
    from servicekit.eventstore import eventsourcing_env
    from testbed.producer import Member, MemberApp

    telemetry.configure_tracing("bench")
    MemberApp(env=eventsourcing_env(db, create_table=True)).close()
    app = MemberApp(env=eventsourcing_env(db, pool_size=2))
    for start in range(0, BACKLOG, BATCH):
        with telemetry.use_span(telemetry.start_span("POST /bench")):
            app.save(*[Member.join(f"m{i}@example.com") for i in range(start, start + BATCH)])
    app.close()


async def catch_up(db: str, amqp_url: str) -> float:
    """One relay catch-up of the whole backlog in this process; events per second."""
    from bench.relay_backlog import relay_catch_up
    from servicekit import telemetry
    from servicekit.eventstore import eventsourcing_env
    from servicekit.relay import create_relay_table
    from testbed.producer import MemberApp

    telemetry.configure_tracing("bench.relay")
    create_relay_table(db)
    app = MemberApp(env=eventsourcing_env(db, pool_size=4))
    try:
        return await relay_catch_up(app, db, amqp_url)
    finally:
        app.close()


def relay() -> dict[str, object]:
    with temp_database("obs_relay") as db, temp_vhost() as amqp_url:
        fill_traced(db)
        on_runs: list[float] = []
        off_runs: list[float] = []
        for _ in range(2):
            for env, runs in (({}, on_runs), (OFF, off_runs)):
                out = subprocess.run(
                    [sys.executable, "-m", "bench.observability", "catch-up", db, amqp_url],
                    env={**os.environ, **env},
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                runs.append(float(out.strip().splitlines()[-1]))
    return {
        "benchmark": f"relay catching up {BACKLOG} traced events, tracing on (no endpoint) vs off",
        "baseline_events_per_s": median(off_runs),
        "events_per_s": median(on_runs),
    }


def main() -> None:
    _clean_env()
    if sys.argv[1:2] == ["catch-up"]:
        print(asyncio.run(catch_up(sys.argv[2], sys.argv[3])))
        return
    me, rel = users_me(), relay()
    result: dict[str, object] = {
        "benchmark": "observability overhead: tracing and metrics on (no exporter) vs off",
        "users_me_rps_on": me["rps"],
        "users_me_rps_off": me["baseline_rps"],
        "users_me_ratio": round(float(me["rps"]) / float(me["baseline_rps"]), 3),  # type: ignore[arg-type]
        "users_me_p99_ms_on": me["p99_ms"],
        "users_me_p99_ms_off": me["baseline_p99_ms"],
        "users_me_errors": me["errors"],
        "relay_events_per_s_on": rel["events_per_s"],
        "relay_events_per_s_off": rel["baseline_events_per_s"],
        "relay_ratio": round(
            float(rel["events_per_s"]) / float(rel["baseline_events_per_s"]),  # type: ignore[arg-type]
            3,
        ),
        "target": "users_me_ratio >= 0.9 and relay_ratio >= 0.9",
    }
    result["ratio"] = min(float(result["users_me_ratio"]), float(result["relay_ratio"]))  # type: ignore[arg-type]
    report("observability", result)


if __name__ == "__main__":
    main()
