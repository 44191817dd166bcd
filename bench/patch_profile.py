"""PATCH /users/me throughput (64 users, 8 connections) against raw `app.save()` of one
profile update event from 8 threads, on the same database server, in one run.

Target: >= 0.6. Runs interleaved A B A B.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.harness import auth_and_users, report, versus
from servicekit.eventstore import eventsourcing_env

SECONDS = 6
THREADS = 8
USERS = 64
ROUNDS = 2

LUA = """
tokens = {%s}
counter = 0
request = function()
  counter = counter + 1
  local body = '{"bio": "bio ' .. counter .. '"}'
  return wrk.format("PATCH", "/users/me", {
    ["Authorization"] = "Bearer " .. tokens[(counter %% #tokens) + 1],
    ["Content-Type"] = "application/json"}, body)
end
"""


def raw_saves(db: str) -> float:
    from user_svc.application import ProfileService
    from user_svc.domain import Profile

    app = ProfileService(env=eventsourcing_env(db, pool_size=THREADS))
    profiles = [Profile.create(uuid.uuid4(), email=None) for _ in range(USERS)]
    app.save(*profiles)
    done = 0
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS

    def work(mine: list[Profile]) -> None:
        nonlocal done
        i = 0
        while time.monotonic() < deadline:
            profile = mine[i % len(mine)]
            profile.update({"bio": f"bio {i}"})
            app.save(profile)
            i += 1
            with lock:
                done += 1

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(work, [profiles[t::THREADS] for t in range(THREADS)]))
    app.close()
    return done / SECONDS


def main() -> None:
    cheap_hashing = {"AUTH_ARGON2_TIME_COST": "1", "AUTH_ARGON2_MEMORY_KIB": "1024"}
    with auth_and_users(cheap_hashing) as (auth, users, users_db, _):
        tokens = []
        for i in range(USERS):
            body = {"email": f"p{i}@example.com", "password": "benchmark password"}
            httpx.post(f"{auth}/auth/register", json=body, timeout=30).raise_for_status()
            tokens.append(httpx.post(f"{auth}/auth/login", json=body).json()["access_token"])
        for token in tokens:
            httpx.get(f"{users}/users/me", headers={"Authorization": f"Bearer {token}"})
        script = Path(tempfile.mkstemp(suffix=".lua")[1])
        script.write_text(LUA % ", ".join(f'"{t}"' for t in tokens))
        raw, patched = [], []
        for _ in range(ROUNDS):
            raw.append(raw_saves(users_db))
            out = subprocess.run(
                ["wrk", "-t2", f"-c{THREADS}", f"-d{SECONDS}s", "-s", str(script), users],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            patched.append(float(out.split("Requests/sec:")[1].split()[0]))
        script.unlink()
    result = {
        "benchmark": (
            f"PATCH /users/me ({THREADS} connections) vs raw app.save() ({THREADS} threads)"
        ),
        **versus(("baseline_saves_per_s", raw), ("patches_per_s", patched), target="ratio >= 0.6"),
    }
    report("patch_profile", result)


if __name__ == "__main__":
    main()
