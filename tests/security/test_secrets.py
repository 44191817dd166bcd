"""No secret in the repository, in the services' logs or in the messages they publish."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import jwt
import psycopg
from argon2 import PasswordHasher
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from auth_svc.application import AuthService
from auth_svc.main import relay as auth_relay
from servicekit.logs import JsonFormatter
from tests.security.conftest import running_services
from tests.security.secret_scan import files_to_scan, scan
from tests.support.amqp import subscribed
from user_svc.main import relay as user_relay

ROOT = Path(__file__).resolve().parents[2]


# --- the repository -----------------------------------------------------------------------------


def test_no_secret_is_committed() -> None:
    findings = scan(ROOT)
    assert findings == [], (
        "possible secrets in the tree (a true exception goes in "
        "tests/security/secrets-allowlist.txt with the reason):\n"
        + "\n".join(str(f) for f in findings)
    )


def test_the_scan_finds_every_kind_of_secret_and_ignores_placeholders(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    token = jwt.encode({"sub": "someone", "exp": 2_000_000_000}, key, algorithm="RS256")
    private_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key)
    digest = PasswordHasher(time_cost=1, memory_cost=64).hash("hunter22")
    aws = "AKIA" + "Q" * 16
    (tmp_path / ".gitignore").write_text("ignored/\n*.log\n")
    planted = {
        "key.pem": (pem, "private key"),
        "fixture.py": (f'TOKEN = "{token}"\n', "JSON web token"),
        "jwk.json": (private_jwk, "private JWK"),
        "users.csv": (f"ada,{digest}\n", "password hash"),
        "aws.txt": (f"key={aws}\n", "AWS access key"),
        "settings.py": ('URL = "postgresql://app:' + 's3cr3t-Pa55@db/app"\n', "password in a URL"),
        "deploy.yaml": ("  DB_PASSWORD: Sup3rS3cretValue\n", "secret in configuration"),
    }
    for name, (content, _rule) in planted.items():
        (tmp_path / name).write_text(content)
    harmless = {
        "README.md": "amqp://guest:guest@127.0.0.1:5672/ and -----BEGIN CERTIFICATE-----\n",
        ".env.example": "POSTGRES_PASSWORD=CHANGE_ME_postgres\nAPI_TOKEN=${API_TOKEN}\n",
        "compose.yml": "url: postgresql://postgres:${POSTGRES_PASSWORD}@postgres/auth\n",
        "code.py": 'PASSWORD = "correct horse battery"\n',
        "docs.md": "smtp://[user:password@]host[:port]\n",
    }
    for name, content in harmless.items():
        (tmp_path / name).write_text(content)
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "key.pem").write_text(pem)
    (tmp_path / "debug.log").write_text(token)

    found = {(f.path, f.rule) for f in scan(tmp_path, allowlist=set())}

    assert found == {(name, rule) for name, (_content, rule) in planted.items()}
    assert scan(tmp_path, allowlist={(n, r) for n, (_c, r) in planted.items()}) == []
    assert "ignored/key.pem" not in {
        p.relative_to(tmp_path).as_posix() for p in files_to_scan(tmp_path)
    }


# --- the services' logs and messages ------------------------------------------------------------


@contextlib.contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Every log record of this process, at DEBUG, formatted as the services write them."""
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Capture(level=logging.DEBUG)
    handler.setFormatter(JsonFormatter("any"))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


async def test_a_full_scenario_never_logs_or_publishes_a_secret(
    make_database: Callable[[str], str], make_vhost: Callable[[], str]
) -> None:
    amqp_url = make_vhost()
    password, new_password, guess = "correct horse battery", "a brand new secret", "guess w0rd!"
    email = f"secrets-{uuid.uuid4().hex[:8]}@example.com"
    issued: list[str] = []
    with (
        running_services(make_database, amqp_url=amqp_url) as services,
        captured_logs() as log_lines,
    ):
        logging.getLogger("auth_svc").info("capture works: canary-%s", "4d1f")
        relays = [
            auth_relay(services.auth_settings),
            user_relay(services.user_settings.model_copy(update={"amqp_url": amqp_url})),
        ]
        stop = asyncio.Event()
        async with (
            subscribed(amqp_url, "auth.events") as auth_events,
            subscribed(amqp_url, "user.events") as user_events,
        ):
            tasks = [asyncio.create_task(relay.run(stop)) for relay in relays]
            try:
                async with httpx.AsyncClient(timeout=10) as http:
                    a, u = services.auth_url, services.users_url
                    r = await http.post(
                        f"{a}/auth/register",
                        json={"email": email, "password": password, "display_name": "Ada"},
                    )
                    assert r.status_code == 201, r.text
                    user_id = uuid.UUID(r.json()["user_id"])
                    r = await http.post(f"{a}/auth/login", json={"email": email, "password": guess})
                    assert r.status_code == 401
                    first = (
                        await http.post(
                            f"{a}/auth/login", json={"email": email, "password": password}
                        )
                    ).json()
                    bearer = {"Authorization": f"Bearer {first['access_token']}"}
                    assert (await http.get(f"{u}/users/me", headers=bearer)).status_code == 200
                    r = await http.patch(f"{u}/users/me", headers=bearer, json={"bio": "hello"})
                    assert r.status_code == 200
                    second = (
                        await http.post(
                            f"{a}/auth/refresh", json={"refresh_token": first["refresh_token"]}
                        )
                    ).json()
                    r = await http.post(
                        f"{a}/auth/refresh", json={"refresh_token": first["refresh_token"]}
                    )
                    assert r.status_code == 401  # the replay
                    third = (
                        await http.post(
                            f"{a}/auth/login", json={"email": email, "password": password}
                        )
                    ).json()
                    old_hash = auth_service(services.auth_app).get_account(user_id).password_hash
                    r = await http.post(
                        f"{a}/auth/password",
                        headers={"Authorization": f"Bearer {third['access_token']}"},
                        json={"current_password": password, "new_password": new_password},
                    )
                    assert r.status_code == 204, r.text
                    fourth = (
                        await http.post(
                            f"{a}/auth/login", json={"email": email, "password": new_password}
                        )
                    ).json()
                    r = await http.post(
                        f"{a}/auth/logout", json={"refresh_token": fourth["refresh_token"]}
                    )
                    assert r.status_code == 204
                    r = await http.post(
                        f"{a}/auth/register",
                        content=f'{{"email": "{email}", "password": "{password}"',
                        headers={"content-type": "application/json"},
                    )
                    assert r.status_code == 400
                issued = [
                    t[k]
                    for t in (first, second, third, fourth)
                    for k in ("access_token", "refresh_token")
                ]
                new_hash = auth_service(services.auth_app).get_account(user_id).password_hash
                # registered, login failed, 3 logins succeeded, password changed
                await auth_events.wait_for(6)
                await user_events.wait_for(2)
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), timeout=15)
                for relay in relays:
                    relay.app.close()
        private_pem = signing_key_pem(services.auth_settings.database_url)

    messages = [
        m.body.decode() + json.dumps(m.headers or {}, default=str)
        for m in auth_events.messages + user_events.messages
    ]
    published_types = {json.loads(m.body)["event_type"] for m in auth_events.messages}
    assert {"auth.account.login_failed", "auth.account.password_changed"} <= published_types
    assert any("canary-4d1f" in line for line in log_lines), "the log capture saw nothing"
    assert any("relay is active" in line for line in log_lines)

    secrets = {
        "the password": password,
        "the new password": new_password,
        "a wrong guess": guess,
        "the old hash": old_hash,
        "the new hash": new_hash,
        "an argon2 hash": "$argon2",
        "a private key": "PRIVATE KEY",
        "the signing key": private_pem.splitlines()[1],
    }
    for token in issued:
        secrets[f"token {token[:12]}…"] = token
        secrets[f"the last part of token {token[:12]}…"] = token.rsplit(".", 1)[-1][-40:]
    leaks = [
        f"{what} in {where}"
        for where, texts in (("the logs", log_lines), ("a message", messages))
        for text in texts
        for what, secret in secrets.items()
        if secret in text
    ]
    assert leaks == []


def auth_service(app: object) -> AuthService:
    service: AuthService = app.state.auth_service  # type: ignore[attr-defined]
    return service


def signing_key_pem(database_url: str) -> str:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT private_key_pem FROM signing_keys LIMIT 1").fetchone()
    assert row is not None
    pem: str = row[0]
    return pem
