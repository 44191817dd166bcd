"""What every benchmark shares: temporary databases and vhosts, processes, wrk, medians and
percentiles, and the result each one reports."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx

from testbed.ports import free_port
from testbed.scratch import scratch_database, scratch_vhost


@contextlib.contextmanager
def temp_database(name: str) -> Iterator[str]:
    with scratch_database(name, prefix="bench") as url:
        yield url


@contextlib.contextmanager
def temp_vhost() -> Iterator[str]:
    with scratch_vhost(prefix="bench") as url:
        yield url


@contextlib.contextmanager
def process(
    argv: list[str], env: dict[str, str], ready_url: str
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv} exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv} not ready")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def uvicorn_argv(
    app: str, port: int, *, factory: bool = True, app_dir: str | None = None
) -> list[str]:
    """The same server settings for a service and its baseline: 1 worker, uvloop, httptools.
    `app` is an app factory (`factory`) or an app; `app_dir` where to import it from."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        *(["--factory"] if factory else []),
        app,
        *(["--app-dir", app_dir] if app_dir else []),
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]


def wrk(url: str, *, seconds: int, connections: int, headers: dict[str, str]) -> dict[str, float]:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed: apt-get install -y wrk (make bench does it)")
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    text = subprocess.run([*argv, url], check=True, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", text).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"rps": rps, "p99_ms": p99, "errors": float(non2xx.group(1)) if non2xx else 0.0}


def _ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def percentile(seconds: list[float], q: float) -> float:
    """The nearest-rank `q` percentile of durations in seconds, in milliseconds (0 for none)."""
    if not seconds:
        return 0.0
    ordered = sorted(seconds)
    return round(ordered[max(math.ceil(q * len(ordered)) - 1, 0)] * 1000, 2)


def versus(
    baseline: tuple[str, list[float]], measured: tuple[str, list[float]], *, target: str
) -> dict[str, object]:
    """Figures of a run against its baseline (rounds of each): both medians, measured /
    baseline, and the target that ratio must meet."""
    (baseline_key, baseline_rounds), (measured_key, measured_rounds) = baseline, measured
    return {
        baseline_key: median(baseline_rounds),
        measured_key: median(measured_rounds),
        "ratio": round(median(measured_rounds) / median(baseline_rounds), 3),
        "target": target,
    }


def report(name: str, result: dict[str, object]) -> None:
    """Keep the result in bench/results/<day>-<name>.json and print it as the last line, one
    JSON object (what `make bench` reads)."""
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    day = time.strftime("%Y-%m-%d")
    (out / f"{day}-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


class Services(NamedTuple):
    auth: str
    users: str
    users_db: str
    auth_db: str


@contextlib.contextmanager
def auth_and_users(extra_env: dict[str, str] | None = None) -> Iterator[Services]:
    """auth_svc and user_svc on fresh databases, each its own uvicorn."""
    from auth_svc.main import init_db as init_auth
    from auth_svc.settings import AuthSettings
    from user_svc.main import init_db as init_users
    from user_svc.settings import UserSettings

    with temp_database("auth") as auth_db, temp_database("users") as users_db:
        init_auth(AuthSettings(database_url=auth_db))
        init_users(UserSettings(database_url=users_db))
        auth_port, user_port = free_port(), free_port()
        auth = f"http://127.0.0.1:{auth_port}"
        users = f"http://127.0.0.1:{user_port}"
        env = {
            "AUTH_DATABASE_URL": auth_db,
            "USER_DATABASE_URL": users_db,
            "USER_JWKS_URL": f"{auth}/auth/.well-known/jwks.json",
            "LOG_LEVEL": "WARNING",
            **(extra_env or {}),
        }
        with (
            process(
                uvicorn_argv("auth_svc.main:create_app", auth_port), env, f"{auth}/health/ready"
            ),
            process(
                uvicorn_argv("user_svc.main:create_app", user_port), env, f"{users}/health/ready"
            ),
        ):
            yield Services(auth, users, users_db, auth_db)
