"""kong.yml: read, its jwt credentials filled in from auth_svc's published keys, written back,
and the same credentials as Kong Ingress Controller objects for Kubernetes."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from shared_contracts.tokens import ACCESS_TOKEN_ALGORITHM

if TYPE_CHECKING:
    from auth_svc.keys import KeyStore

# Kong matches a token's `alg` against its credential's: the algorithm auth_svc signs with.
JWT_ALGORITHM = ACCESS_TOKEN_ALGORITHM


class GatewayConfigError(ValueError):
    """kong.yml asks for something the local gateway cannot reproduce faithfully."""


def load_kong(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    if not isinstance(document, dict) or document.get("_format_version") != "3.0":
        raise GatewayConfigError(f"{path}: not a Kong 3 declarative file (_format_version 3.0)")
    return document


def jwt_consumer(kong: Mapping[str, Any]) -> dict[str, Any]:
    """The one consumer that owns the jwt credentials (every token maps to it)."""
    owners = [c for c in kong.get("consumers", []) if "jwt_secrets" in c]
    if len(owners) != 1:
        raise GatewayConfigError("kong.yml needs exactly one consumer with `jwt_secrets`")
    consumer: dict[str, Any] = owners[0]
    return consumer


def with_credentials(kong: Mapping[str, Any], public_keys: Mapping[str, str]) -> dict[str, Any]:
    """kong.yml with one jwt credential per signing key (`key` = the key's `kid`)."""
    rendered = copy.deepcopy(dict(kong))
    jwt_consumer(rendered)["jwt_secrets"] = [
        {
            "key": kid,
            "algorithm": JWT_ALGORITHM,
            "rsa_public_key": pem,
            # Required by the schema, never used: Kong reads `secret` only for HS* algorithms,
            # and a token's `alg` must equal the credential's. Derived, so renders are stable.
            "secret": hashlib.sha256(pem.encode()).hexdigest(),
        }
        for kid, pem in sorted(public_keys.items())
    ]
    return rendered


def dump_kong(kong: Mapping[str, Any]) -> str:
    header = "# Rendered by `esctl gateway render` from compose/kong.yml: do not edit, re-render.\n"
    return header + yaml.safe_dump(dict(kong), sort_keys=False, width=100)


def k8s_credentials(
    public_keys: Mapping[str, str], *, consumer: str = "eskit-clients", namespace: str = "eskit"
) -> list[dict[str, Any]]:
    """Kong Ingress Controller objects for the same credentials: a Secret per key, and the
    KongConsumer listing them (apply with `kubectl apply --server-side`)."""
    secrets: list[dict[str, Any]] = []
    for kid, pem in sorted(public_keys.items()):
        name = "eskit-jwt-" + hashlib.sha256(kid.encode()).hexdigest()[:16]
        secrets.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": {
                        "konghq.com/credential": "jwt",
                        "app.kubernetes.io/part-of": "eskit",
                    },
                },
                "type": "Opaque",
                "stringData": {"key": kid, "algorithm": JWT_ALGORITHM, "rsa_public_key": pem},
            }
        )
    kong_consumer = {
        "apiVersion": "configuration.konghq.com/v1",
        "kind": "KongConsumer",
        "metadata": {
            "name": consumer,
            "namespace": namespace,
            "annotations": {"kubernetes.io/ingress.class": "kong"},
        },
        "username": consumer,
        "credentials": [s["metadata"]["name"] for s in secrets],
    }
    return [*secrets, kong_consumer]


def dump_k8s_credentials(
    kong: Mapping[str, Any], public_keys: Mapping[str, str], *, namespace: str
) -> str:
    """`k8s_credentials` for kong.yml's jwt consumer, as one YAML stream."""
    consumer = jwt_consumer(kong)["username"]
    return yaml.safe_dump_all(k8s_credentials(public_keys, consumer=consumer, namespace=namespace))


def published_keys_reader() -> KeyStore:
    """A store returning kid -> public PEM of every key auth_svc publishes, re-read from
    auth_svc's database at most every `AUTH_KEYS_REFRESH_SECONDS`."""
    from auth_svc.keys import KeyStore
    from auth_svc.settings import AuthSettings

    store = KeyStore(AuthSettings())
    store.open()
    return store
