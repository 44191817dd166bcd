"""compose/kong.yml: valid for decK, only what Kong 3.9 accepts, routed to real FastAPI routes,
and rendered faithfully (credentials, HAProxy) or refused."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI

from gateway.haproxy import render_haproxy
from gateway.kong import (
    GatewayConfigError,
    dump_kong,
    k8s_credentials,
    load_kong,
    with_credentials,
)
from gateway.kong39 import plugin_configs
from gateway.kong_schema import validate
from gateway.model import gateway_model
from gateway.settings import GatewaySettings

ROOT = Path(__file__).parents[2]
KONG_YML = ROOT / "compose" / "kong.yml"


def every_plugin(kong: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = [("global", p) for p in kong.get("plugins", [])]
    for service in kong["services"]:
        found += [(service["name"], p) for p in service.get("plugins", [])]
        for route in service.get("routes", []):
            found += [(route["name"], p) for p in route.get("plugins", [])]
    return found


def public_key_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def deck_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["deck", "validate", "-s", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_deck_validates_kong_yml_before_and_after_rendering(tmp_path: Path) -> None:
    result = deck_validate(KONG_YML)
    assert result.returncode == 0, result.stderr
    rendered = tmp_path / "kong.yml"
    rendered.write_text(dump_kong(with_credentials(load_kong(KONG_YML), {"k1": public_key_pem()})))
    result = deck_validate(rendered)
    assert result.returncode == 0, result.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(rendered.read_text().replace("strip_path: false", "strip_path: nope", 1))
    assert subprocess.run(
        ["deck", "validate", "-s", str(broken)], check=False, capture_output=True
    ).returncode


def test_kong_yml_is_valid_for_kong_39_before_and_after_rendering() -> None:
    kong = load_kong(KONG_YML)
    assert validate(kong) == []
    assert validate(with_credentials(kong, {"k1": public_key_pem()})) == []
    # Every plugin kong.yml uses has its own table (none is let through as "not tabled").
    assert {p["name"] for _, p in every_plugin(kong)} <= set(plugin_configs(dbless=True))


def test_the_jwt_plugin_finds_one_credential_per_signing_key_by_kid() -> None:
    kong = load_kong(KONG_YML)
    jwt = [p["config"] for _, p in every_plugin(kong) if p["name"] == "jwt"]
    assert jwt
    assert all(c["key_claim_name"] == "kid" and "exp" in c["claims_to_verify"] for c in jwt)
    keys = {"kid-old": public_key_pem(), "kid-new": public_key_pem()}
    (consumer,) = with_credentials(kong, keys)["consumers"]
    assert {(s["key"], s["algorithm"]) for s in consumer["jwt_secrets"]} == {
        ("kid-old", "RS256"),
        ("kid-new", "RS256"),
    }
    objects = k8s_credentials(keys)
    secrets = [o for o in objects if o["kind"] == "Secret"]
    assert {s["stringData"]["key"] for s in secrets} == set(keys)
    assert all(s["metadata"]["labels"]["konghq.com/credential"] == "jwt" for s in secrets)
    (kong_consumer,) = [o for o in objects if o["kind"] == "KongConsumer"]
    assert kong_consumer["credentials"] == [s["metadata"]["name"] for s in secrets]


def _apps() -> dict[str, FastAPI]:
    from auth_svc.main import create_app as auth_app
    from user_svc.main import create_app as user_app

    return {"auth_svc": auth_app(), "user_svc": user_app()}


def test_every_route_goes_to_an_existing_service_and_a_real_fastapi_route() -> None:
    kong = load_kong(KONG_YML)
    apps = _apps()
    upstreams = {u["name"] for u in kong["upstreams"]}
    routed: list[str] = []
    for service in kong["services"]:
        assert service["name"] in apps, f"{service['name']} is not a REST service"
        assert service["host"] in upstreams
        served = list(apps[service["name"]].openapi()["paths"])
        for route in service["routes"]:
            assert route["strip_path"] is False
            for path in route["paths"]:
                routed.append(path)
                assert any(p.startswith(path) for p in served), f"{path} serves nothing"
    # Nothing else is exposed: not the probes, not the metrics, not the root.
    for private in ("/health/ready", "/health/live", "/metrics", "/docs", "/"):
        assert not any(private.startswith(p) for p in routed), private


def test_the_local_gateway_config_is_accepted_by_haproxy(tmp_path: Path) -> None:
    # Key ids are random base64url: one beginning with '-' read as an ACL flag (CI failed).
    keys = {"k1": public_key_pem(), "-45d1A6nhBMfhB6VIcuG": public_key_pem()}
    kong = with_credentials(load_kong(KONG_YML), keys)
    targets = {"auth_svc.upstream": ["127.0.0.1:1"], "user_svc.upstream": ["127.0.0.1:2"]}
    text = render_haproxy(gateway_model(kong, targets), GatewaySettings(), tmp_path / "keys")
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    result = subprocess.run(
        ["haproxy", "-c", "-f", str(path)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "/users" in text
    assert "/metrics" not in text.split("frontend proxy")[1]


@pytest.mark.parametrize(
    "change",
    [
        lambda k: k["plugins"].append({"name": "key-auth", "config": {}}),
        lambda k: k["services"][0]["routes"][0].update(strip_path=True),
        lambda k: k["plugins"][2]["config"].update(hour=10_000),
    ],
    ids=["unknown plugin", "path stripping", "two rate windows"],
)
def test_what_the_local_gateway_cannot_reproduce_is_refused(change: Any) -> None:
    kong = load_kong(KONG_YML)
    change(kong)
    with pytest.raises(GatewayConfigError):
        gateway_model(kong, {})
        render_haproxy(gateway_model(kong, {}), GatewaySettings(), Path("/nonexistent"))
