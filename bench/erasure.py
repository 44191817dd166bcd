"""Crypto-shredding's cost: POST /auth/register and PATCH /users/me throughput with the
personal fields encrypted at rest (a key per person, servicekit.shredding) and without, in one
run. Two stacks (auth_svc + user_svc, each on fresh databases) run side by side, one with
`*_ENCRYPT_PERSONAL_DATA=true` and one with `false`; rounds alternate between them (on, off,
off, on, ...), so both see the same machine. PATCH cycles over many profiles (each its own key).

Target: each ratio (on / off) >= 0.9. argon2 is made cheap, so the store dominates a register.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.harness import Services, auth_and_users, median, report
from bench.patch_profile import LUA as PATCH_LUA  # one profile PATCH per request, tokens cycled
from servicekit.shredding import new_service_key

SECONDS = 6
THREADS = 8
USERS = 400  # profiles PATCHed in turn: each needs its own key
ROUNDS = 4
PASSWORD = "benchmark password"  # noqa: S105 - throwaway accounts in temp databases


def stack_env(encrypt: bool) -> dict[str, str]:
    flag = "true" if encrypt else "false"
    return {
        "AUTH_ARGON2_TIME_COST": "1",
        "AUTH_ARGON2_MEMORY_KIB": "1024",
        "AUTH_PERSONAL_DATA_KEY": new_service_key(),
        "USER_PERSONAL_DATA_KEY": new_service_key(),
        "AUTH_ENCRYPT_PERSONAL_DATA": flag,
        "USER_ENCRYPT_PERSONAL_DATA": flag,
    }


def registrations(auth: str, names: Iterator[int], tag: str) -> float:
    done = 0
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS

    def work() -> None:
        nonlocal done
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < deadline:
                with lock:
                    n = next(names)
                body = {
                    "email": f"{tag}{n}@example.com",
                    "password": PASSWORD,
                    "display_name": f"Person {n}",
                }
                client.post(f"{auth}/auth/register", json=body).raise_for_status()
                with lock:
                    done += 1

    with ThreadPoolExecutor(THREADS) as pool:
        for _ in range(THREADS):
            pool.submit(work)
    return done / SECONDS


def patch_script(stack: Services, tag: str) -> Path:
    """Many users, each with a profile (and so a key), and a wrk script PATCHing them in turn."""
    tokens = []
    with httpx.Client(timeout=30) as client:
        for i in range(USERS):
            body = {"email": f"{tag}-p{i}@example.com", "password": PASSWORD}
            client.post(f"{stack.auth}/auth/register", json=body).raise_for_status()
            token = client.post(f"{stack.auth}/auth/login", json=body).json()["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            client.get(f"{stack.users}/users/me", headers=headers).raise_for_status()
            tokens.append(token)
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(PATCH_LUA % ", ".join(f'"{t}"' for t in tokens))
    return script


def patches(stack: Services, script: Path) -> float:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{THREADS}", f"-d{SECONDS}s", "-s", str(script), stack.users],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"PATCH /users/me failed: {out}")
    return float(out.split("Requests/sec:")[1].split()[0])


def main() -> None:
    names = itertools.count()
    figures: dict[str, dict[str, list[float]]] = {
        "on": {"register": [], "patch": []},
        "off": {"register": [], "patch": []},
    }
    with contextlib.ExitStack() as stacks:
        on = stacks.enter_context(auth_and_users(stack_env(encrypt=True)))
        off = stacks.enter_context(auth_and_users(stack_env(encrypt=False)))
        scripts = {"on": patch_script(on, "on"), "off": patch_script(off, "off")}
        for round_ in range(ROUNDS):
            # on, off, then off, on: a drift of the shared machine's load hits both alike.
            order = [("on", on), ("off", off)][:: 1 if round_ % 2 == 0 else -1]
            for mode, stack in order:
                figures[mode]["register"].append(registrations(stack.auth, names, mode))
            for mode, stack in order:
                figures[mode]["patch"].append(patches(stack, scripts[mode]))
        for script in scripts.values():
            script.unlink()
    register_on, register_off = (median(figures[m]["register"]) for m in ("on", "off"))
    patch_on, patch_off = (median(figures[m]["patch"]) for m in ("on", "off"))
    result = {
        "benchmark": (
            f"POST /auth/register ({THREADS} clients) and PATCH /users/me ({THREADS} "
            f"connections, {USERS} profiles) with personal fields encrypted vs plain"
        ),
        "baseline_registers_per_s": register_off,
        "registers_per_s": register_on,
        "register_ratio": round(register_on / register_off, 3),
        "baseline_patches_per_s": patch_off,
        "patches_per_s": patch_on,
        "patch_ratio": round(patch_on / patch_off, 3),
        "rounds": figures,
        "target": "register_ratio >= 0.9 and patch_ratio >= 0.9",
    }
    report("erasure", result)


if __name__ == "__main__":
    main()
