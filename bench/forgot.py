"""POST /auth/password/forgot for addresses that have an account against addresses that have
none, in one run (interleaved A B B A): the throughput ratio must stay within 0.9-1.1, so that
under load the timing says nothing about which addresses exist. Known addresses really get a
reset link (a background write and a sealed link each); the limits are raised so that every
request counts."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import count

import httpx

from bench.harness import process, report, temp_database, uvicorn_argv, versus
from servicekit.sealing import new_key_pair
from testbed.ports import free_port

SECONDS = 4
THREADS = 8
ROUNDS = 6
ACCOUNTS = 40
PASSWORD = "benchmark password"  # noqa: S105 - throwaway accounts in a temp database


def forgot(auth: str, emails: list[str]) -> float:
    done = 0
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS
    picks = count()

    def work() -> None:
        nonlocal done
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < deadline:
                email = emails[next(picks) % len(emails)]
                r = client.post(f"{auth}/auth/password/forgot", json={"email": email})
                assert r.status_code == 202, r.text
                with lock:
                    done += 1

    with ThreadPoolExecutor(THREADS) as pool:
        for _ in range(THREADS):
            pool.submit(work)
    return done / SECONDS


def main() -> None:
    from auth_svc.main import init_db
    from auth_svc.settings import AuthSettings

    _, public_key = new_key_pair()
    with temp_database("auth") as db:
        init_db(AuthSettings(database_url=db))
        port = free_port()
        auth = f"http://127.0.0.1:{port}"
        env = {
            "AUTH_DATABASE_URL": db,
            "LOG_LEVEL": "WARNING",
            "AUTH_LINK_SEALING_PUBLIC_KEY": public_key,
            "AUTH_FORGOT_LIMIT_PER_ADDRESS": "100000000",
            "AUTH_FORGOT_LIMIT_PER_IP": "100000000",
        }
        with process(uvicorn_argv("auth_svc.main:create_app", port), env, f"{auth}/health/ready"):
            known = [f"known{i}@example.com" for i in range(ACCOUNTS)]
            unknown = [f"unknown{i}@example.com" for i in range(ACCOUNTS)]
            for email in known:
                httpx.post(
                    f"{auth}/auth/register", json={"email": email, "password": PASSWORD}, timeout=30
                ).raise_for_status()
            known_rounds, unknown_rounds = [], []
            for i in range(ROUNDS):  # A B B A ...: neither kind always runs first
                if i % 2 == 0:
                    unknown_rounds.append(forgot(auth, unknown))
                    known_rounds.append(forgot(auth, known))
                else:
                    known_rounds.append(forgot(auth, known))
                    unknown_rounds.append(forgot(auth, unknown))
    result = {
        "benchmark": f"POST /auth/password/forgot ({THREADS} clients): known vs unknown addresses",
        **versus(
            ("baseline_unknown_per_s", unknown_rounds),
            ("known_per_s", known_rounds),
            target="0.9 <= ratio <= 1.1",
        ),
        "rounds_known_per_s": known_rounds,
        "rounds_unknown_per_s": unknown_rounds,
    }
    report("forgot", result)


if __name__ == "__main__":
    main()
