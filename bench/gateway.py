"""GET /users/me through the local gateway (HAProxy rendered from compose/kong.yml) against
direct to user_svc, interleaved A B A B in one run.

Target: the gateway keeps >= 0.75 of the direct throughput. The gateway runs kong.yml as is,
with the rate limits raised so that the load measures the proxy (the limiter still runs).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import yaml

from bench.harness import auth_and_users, median, process, report, wrk
from gateway.kong import load_kong
from gateway.settings import DEFAULT_KONG_CONFIG
from testbed.ports import free_port

ROUNDS = 3
SECONDS = 5
CONNECTIONS = 64


def unlimited_kong_yml(directory: Path) -> Path:
    """kong.yml with every rate limit far above what the benchmark sends."""
    kong = load_kong(DEFAULT_KONG_CONFIG)
    plugins = list(kong.get("plugins", []))
    for service in kong["services"]:
        for route in service["routes"]:
            plugins += route.get("plugins", [])
    for plugin in plugins:
        if plugin["name"] == "rate-limiting":
            for window in ("second", "minute", "hour", "day"):
                if window in plugin["config"]:
                    plugin["config"][window] = 10**9
    path = directory / "kong.yml"
    path.write_text(yaml.safe_dump(kong, sort_keys=False))
    return path


def main() -> None:
    with auth_and_users() as (auth, users, _, auth_db), tempfile.TemporaryDirectory() as work:
        gw_port, status_port = free_port(), free_port()
        auth_url, users_url = urlsplit(auth), urlsplit(users)
        env = {
            "AUTH_DATABASE_URL": auth_db,
            "AUTH_PORT": str(auth_url.port),
            "USER_PORT": str(users_url.port),
            "GATEWAY_PORT": str(gw_port),
            "GATEWAY_STATUS_PORT": str(status_port),
            "GATEWAY_CONFIG": str(unlimited_kong_yml(Path(work))),
            "GATEWAY_WORK_DIR": work,
        }
        argv = [sys.executable, "-m", "gateway"]
        with process(argv, env, f"http://127.0.0.1:{status_port}/health/ready"):
            gateway = f"http://127.0.0.1:{gw_port}"
            body = {"email": "bench@example.com", "password": "benchmark password"}
            httpx.post(f"{auth}/auth/register", json=body, timeout=30).raise_for_status()
            token = httpx.post(f"{auth}/auth/login", json=body, timeout=30).json()["access_token"]
            bearer = {"Authorization": f"Bearer {token}"}
            httpx.get(f"{users}/users/me", headers=bearer, timeout=10).raise_for_status()
            httpx.get(f"{gateway}/users/me", headers=bearer, timeout=10).raise_for_status()
            direct, through = [], []
            for _ in range(ROUNDS):
                direct.append(
                    wrk(
                        f"{users}/users/me",
                        seconds=SECONDS,
                        connections=CONNECTIONS,
                        headers=bearer,
                    )
                )
                through.append(
                    wrk(
                        f"{gateway}/users/me",
                        seconds=SECONDS,
                        connections=CONNECTIONS,
                        headers=bearer,
                    )
                )
    result: dict[str, object] = {
        "benchmark": f"GET /users/me via the local gateway vs direct ({CONNECTIONS} connections)",
        "baseline_rps": median([r["rps"] for r in direct]),
        "baseline_p99_ms": median([r["p99_ms"] for r in direct]),
        "rps": median([r["rps"] for r in through]),
        "p99_ms": median([r["p99_ms"] for r in through]),
        "errors": sum(r["errors"] for r in through) + sum(r["errors"] for r in direct),
    }
    result["ratio"] = round(float(result["rps"]) / float(result["baseline_rps"]), 3)  # type: ignore[arg-type]
    result["target"] = "ratio >= 0.75 (the gateway costs <= 25% of throughput), errors == 0"
    report("gateway", result)


if __name__ == "__main__":
    main()
