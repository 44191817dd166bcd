"""GET /users/me with a valid token, 64 connections, against a hello-world route.

Target: >= 0.5 of the hello-world throughput, p99 <= 25 ms. Runs interleaved A B A B.
"""

from __future__ import annotations

import httpx

from bench.harness import (
    auth_and_users,
    median,
    process,
    report,
    uvicorn_argv,
    wrk,
)
from testbed.ports import free_port

ROUNDS = 3
SECONDS = 5


def main() -> None:
    hello_port = free_port()
    hello_url = f"http://127.0.0.1:{hello_port}/hello"
    with (
        auth_and_users() as (auth, users, _, _),
        process(uvicorn_argv("bench.hello:create_app", hello_port), {}, hello_url),
    ):
        body = {"email": "bench@example.com", "password": "benchmark password"}
        httpx.post(f"{auth}/auth/register", json=body, timeout=30).raise_for_status()
        token = httpx.post(f"{auth}/auth/login", json=body, timeout=30).json()["access_token"]
        bearer = {"Authorization": f"Bearer {token}"}
        httpx.get(f"{users}/users/me", headers=bearer, timeout=10).raise_for_status()
        hello, target = [], []
        for _ in range(ROUNDS):
            hello.append(
                wrk(
                    hello_url,
                    seconds=SECONDS,
                    connections=64,
                    headers={},
                )
            )
            target.append(wrk(f"{users}/users/me", seconds=SECONDS, connections=64, headers=bearer))
    result = {
        "benchmark": "GET /users/me vs hello-world (64 connections, 1 uvicorn worker each)",
        "baseline_rps": median([r["rps"] for r in hello]),
        "baseline_p99_ms": median([r["p99_ms"] for r in hello]),
        "rps": median([r["rps"] for r in target]),
        "p99_ms": median([r["p99_ms"] for r in target]),
        "errors": sum(r["errors"] for r in target),
    }
    result["ratio"] = round(result["rps"] / result["baseline_rps"], 3)  # type: ignore[operator]
    result["target"] = "ratio >= 0.5 and p99_ms <= 25"
    report("users_me", result)


if __name__ == "__main__":
    main()
