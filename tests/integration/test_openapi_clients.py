"""The OpenAPI documents as a client's developer uses them: a Python client generated from
each service's served document (openapi-python-client), imported, and driven against a
running stack (`esctl up`, real PostgreSQL and RabbitMQ): register, log in, read the profile,
and get typed 412 and 422 problems back; through the gateway, the headers it adds."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testbed.up import EsctlUp, esctl_up

PASSWORD = "correct horse battery"
OPENAPI_PYTHON_CLIENT = Path(sys.executable).parent / "openapi-python-client"


@pytest.fixture(scope="module")
def stack(
    make_database: Callable[[str], str],
    make_vhost: Callable[[], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EsctlUp]:
    work = tmp_path_factory.mktemp("openapi-clients")
    # The whole stack starts in about 15 s on a quiet machine; give a busy one time.
    with esctl_up(make_database, make_vhost, work, ready_timeout=180) as up:
        yield up


def generate_client(document: dict[str, Any], package: str, where: Path) -> Any:
    """Generate `package` from `document` into `where` (a temporary directory), import it."""
    (where / "openapi.json").write_text(json.dumps(document))
    # No post hooks: they would run ruff on the generated code, which is not ours to lint.
    (where / "config.yml").write_text(f"package_name_override: {package}\npost_hooks: []\n")
    command = [str(OPENAPI_PYTHON_CLIENT), "generate", "--path", str(where / "openapi.json")]
    command += ["--config", str(where / "config.yml"), "--meta", "none", "--fail-on-warning"]
    command += ["--output-path", str(where / package)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sys.path.insert(0, str(where))
    try:
        return importlib.import_module(package)
    finally:
        sys.path.remove(str(where))


@pytest.fixture(scope="module")
def clients(stack: EsctlUp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The generated packages, by service, from the documents the services serve."""
    packages = {
        "auth": ("eskit_auth_client", stack.auth),
        "users": ("eskit_user_client", stack.users),
    }
    found: dict[str, Any] = {}
    for name, (package, url) in packages.items():
        document = httpx.get(f"{url}/openapi.json", timeout=10).json()
        found[name] = generate_client(document, package, tmp_path_factory.mktemp(package))
    yield found
    for package, _ in packages.values():
        for module in [m for m in sys.modules if m == package or m.startswith(f"{package}.")]:
            del sys.modules[module]


def sub(package: Any, name: str) -> Any:
    return importlib.import_module(f"{package.__name__}.{name}")


def test_a_generated_client_registers_logs_in_and_reads_the_profile(
    stack: EsctlUp, clients: dict[str, Any]
) -> None:
    auth, users = clients["auth"], clients["users"]
    auth_models, user_models = sub(auth, "models"), sub(users, "models")
    email = f"openapi-{uuid.uuid4().hex[:10]}@example.com"
    anonymous = auth.Client(base_url=stack.auth, raise_on_unexpected_status=True)

    registered = sub(auth, "api.auth.register").sync_detailed(
        client=anonymous,
        body=auth_models.RegisterRequest(email=email, password=PASSWORD, display_name="Ada"),
    )
    assert registered.status_code == 201
    assert isinstance(registered.parsed, auth_models.RegisteredAccount)
    assert registered.parsed.email == email

    logged_in = sub(auth, "api.auth.login").sync_detailed(
        client=anonymous, body=auth_models.LoginRequest(email=email, password=PASSWORD)
    )
    assert isinstance(logged_in.parsed, auth_models.TokenResponse), logged_in.content
    assert logged_in.parsed.token_type == "bearer"
    assert "X-Request-ID" in logged_in.headers

    signed_in = users.AuthenticatedClient(base_url=stack.users, token=logged_in.parsed.access_token)
    profile = sub(users, "api.users.get_my_profile").sync_detailed(client=signed_in)
    assert isinstance(profile.parsed, user_models.ProfileOut), profile.content
    assert str(profile.parsed.user_id) == str(registered.parsed.user_id)
    assert profile.parsed.email == email
    assert profile.headers["ETag"] == f'"{profile.parsed.version}"'


def test_a_generated_client_gets_typed_412_and_422_problems(
    stack: EsctlUp, clients: dict[str, Any]
) -> None:
    auth, users = clients["auth"], clients["users"]
    auth_models, user_models = sub(auth, "models"), sub(users, "models")
    update = sub(users, "api.users.update_my_profile")
    email = f"openapi-{uuid.uuid4().hex[:10]}@example.com"
    anonymous = auth.Client(base_url=stack.auth)
    sub(auth, "api.auth.register").sync(
        client=anonymous, body=auth_models.RegisterRequest(email=email, password=PASSWORD)
    )
    tokens = sub(auth, "api.auth.login").sync(
        client=anonymous, body=auth_models.LoginRequest(email=email, password=PASSWORD)
    )
    assert isinstance(tokens, auth_models.TokenResponse)
    signed_in = users.AuthenticatedClient(base_url=stack.users, token=tokens.access_token)
    read = sub(users, "api.users.get_my_profile").sync_detailed(client=signed_in)
    etag = read.headers["ETag"]

    changed = update.sync_detailed(
        client=signed_in, body=user_models.ProfilePatch(locale="en-GB"), if_match=etag
    )
    assert isinstance(changed.parsed, user_models.ProfileOut), changed.content
    assert changed.parsed.locale == "en-GB"

    stale = update.sync_detailed(
        client=signed_in, body=user_models.ProfilePatch(locale="fr-FR"), if_match=etag
    )
    assert stale.status_code == 412
    assert isinstance(stale.parsed, user_models.ProblemDetail), stale.content
    assert stale.parsed.status == 412
    assert stale.parsed.title == "Precondition failed"
    assert stale.parsed.request_id == stale.headers["X-Request-ID"]
    assert stale.headers["ETag"] == f'"{changed.parsed.version}"'

    invalid = update.sync_detailed(
        client=signed_in, body=user_models.ProfilePatch(avatar_url="ftp://example.com/ada.png")
    )
    assert invalid.status_code == 422
    assert isinstance(invalid.parsed, user_models.ValidationProblem), invalid.content
    assert invalid.parsed.status == 422
    assert [e.field for e in invalid.parsed.errors] == ["avatar_url"]
    assert invalid.headers["content-type"] == "application/problem+json"


def test_through_the_gateway_a_generated_client_sees_the_documented_headers(
    stack: EsctlUp, clients: dict[str, Any]
) -> None:
    """The gateway adds `RateLimit-*` (documented on every response) to what it proxies."""
    auth = clients["auth"]
    through_gateway = auth.Client(base_url=stack.gateway)
    get_jwks = sub(auth, "api.auth.get_jwks")
    deadline = time.monotonic() + 60
    # Right after start (or on a machine under load) HAProxy may not have seen auth_svc pass
    # its health check yet, and answers 503 itself.
    while (answer := get_jwks.sync_detailed(client=through_gateway)).status_code == 503:
        assert time.monotonic() < deadline, "the gateway never routed to auth_svc"
        time.sleep(0.5)
    assert isinstance(answer.parsed, sub(auth, "models").JsonWebKeySet), answer.content
    assert answer.parsed.keys
    for name in ("X-Request-ID", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"):
        assert name in answer.headers, name
    assert int(answer.headers["RateLimit-Remaining"]) < int(answer.headers["RateLimit-Limit"])
