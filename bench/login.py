"""POST /auth/login throughput against raw argon2id verifications per second with the same
parameters on the same cores (target >= 0.8). Interleaved A B A B."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from argon2 import PasswordHasher

from bench.harness import process, report, temp_database, uvicorn_argv, versus
from testbed.ports import free_port

SECONDS = 8
THREADS = 8
ROUNDS = 2
PASSWORD = "benchmark password"  # noqa: S105 - a throwaway account in a temp database


def raw_argon2(hasher: PasswordHasher) -> float:
    stored = hasher.hash(PASSWORD)
    done = 0
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS

    def work() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            hasher.verify(stored, PASSWORD)
            with lock:
                done += 1

    with ThreadPoolExecutor(THREADS) as pool:
        for _ in range(THREADS):
            pool.submit(work)
    return done / SECONDS


def login_count(auth: str, emails: list[str], *, seconds: float, password: str) -> int:
    """Logins done in `seconds`, one client per address, each logging in again at once."""
    done = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def work(email: str) -> None:
        nonlocal done
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < deadline:
                r = client.post(f"{auth}/auth/login", json={"email": email, "password": password})
                r.raise_for_status()
                with lock:
                    done += 1

    with ThreadPoolExecutor(len(emails)) as pool:
        list(pool.map(work, emails))
    return done


def logins(auth: str, emails: list[str]) -> float:
    return login_count(auth, emails, seconds=SECONDS, password=PASSWORD) / SECONDS


def main() -> None:
    from auth_svc.main import init_db
    from auth_svc.settings import AuthSettings

    settings = AuthSettings()
    hasher = PasswordHasher(
        time_cost=settings.argon2_time_cost,
        memory_cost=settings.argon2_memory_kib,
        parallelism=settings.argon2_parallelism,
    )
    with temp_database("auth") as db:
        init_db(AuthSettings(database_url=db))
        port = free_port()
        auth = f"http://127.0.0.1:{port}"
        env = {"AUTH_DATABASE_URL": db, "LOG_LEVEL": "WARNING"}
        with process(uvicorn_argv("auth_svc.main:create_app", port), env, f"{auth}/health/ready"):
            emails = [f"bench{i}@example.com" for i in range(THREADS)]
            for email in emails:
                httpx.post(
                    f"{auth}/auth/register", json={"email": email, "password": PASSWORD}, timeout=30
                ).raise_for_status()
            raw, login = [], []
            for _ in range(ROUNDS):
                raw.append(raw_argon2(hasher))
                login.append(logins(auth, emails))
    result = {
        "benchmark": (
            f"POST /auth/login ({THREADS} clients) vs raw argon2id verify ({THREADS} threads)"
        ),
        "argon2": {
            "t": settings.argon2_time_cost,
            "m_kib": settings.argon2_memory_kib,
            "p": settings.argon2_parallelism,
        },
        **versus(("baseline_verifies_per_s", raw), ("logins_per_s", login), target="ratio >= 0.8"),
    }
    report("login", result)


if __name__ == "__main__":
    main()
