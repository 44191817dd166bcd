"""auth_svc and user_svc served for real (uvicorn, loopback), each on a fresh database.

The apps run in this process, in threads of their own, so that the tests talk to them over
HTTP exactly as a client (or the gateway) would, and can still read their state and logs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from auth_svc.main import create_app as create_auth_app
from auth_svc.settings import AuthSettings
from testbed.auth import auth_database
from testbed.ports import free_port
from user_svc.main import create_app as create_user_app
from user_svc.main import init_db as init_user_db
from user_svc.settings import UserSettings

LOCKOUT_THRESHOLD = 3


@contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail(f"the app on port {port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass
class Services:
    auth_url: str
    users_url: str
    auth_settings: AuthSettings
    user_settings: UserSettings
    auth_app: FastAPI
    user_app: FastAPI


@contextmanager
def running_services(
    make_database: Callable[[str], str], **auth_overrides: Any
) -> Iterator[Services]:
    """Both REST services on fresh databases; user_svc verifies tokens with auth_svc's JWKS."""
    auth_settings = auth_database(
        make_database("sec_auth"),
        **{"lockout_threshold": LOCKOUT_THRESHOLD, "keys_refresh_seconds": 0.2, **auth_overrides},
    )
    auth_app = create_auth_app(auth_settings)
    with served(auth_app) as auth_url:
        user_settings = UserSettings(
            database_url=make_database("sec_users"),
            jwks_url=f"{auth_url}/auth/.well-known/jwks.json",
        )
        init_user_db(user_settings)
        user_app = create_user_app(user_settings)
        with served(user_app) as users_url:
            yield Services(auth_url, users_url, auth_settings, user_settings, auth_app, user_app)


@pytest.fixture(scope="package")
def services(make_database: Callable[[str], str]) -> Iterator[Services]:
    with running_services(make_database) as running:
        yield running


@dataclass
class Account:
    email: str
    password: str
    user_id: str
    access_token: str
    refresh_token: str

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


PASSWORD = "correct horse battery"


def new_account(auth_url: str, *, password: str = PASSWORD, display_name: str = "Ada") -> Account:
    """Register a fresh account and log it in."""
    email = f"sec-{time.time_ns()}@example.com"
    with httpx.Client(base_url=auth_url, timeout=10) as http:
        registered = http.post(
            "/auth/register",
            json={"email": email, "password": password, "display_name": display_name},
        )
        assert registered.status_code == 201, registered.text
        pair = http.post("/auth/login", json={"email": email, "password": password})
        assert pair.status_code == 200, pair.text
    tokens = pair.json()
    return Account(
        email=email,
        password=password,
        user_id=registered.json()["user_id"],
        access_token=tokens["access_token"],
        refresh_token=tokens["refresh_token"],
    )
