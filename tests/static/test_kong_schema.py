"""kong.yml against Kong 3.9's schema (gateway/kong39.py): what Kong would refuse is refused,
with the path of the field and the reason, before Kong ever reads the file."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from esctl.main import app
from gateway.kong import load_kong
from gateway.kong39 import plugin_configs
from gateway.kong_schema import validate

KONG_YML = Path(__file__).parents[2] / "compose" / "kong.yml"
Kong = dict[str, Any]


def kong() -> Kong:
    return copy.deepcopy(load_kong(KONG_YML))


def plugin_at(document: Kong, name: str) -> tuple[str, dict[str, Any]]:
    """The path and the entity of the first plugin of that name, wherever kong.yml puts it."""
    for i, plugin in enumerate(document.get("plugins", [])):
        if plugin["name"] == name:
            return f"plugins[{i}]", plugin
    for s, service in enumerate(document["services"]):
        for r, route in enumerate(service.get("routes", [])):
            for p, plugin in enumerate(route.get("plugins", [])):
                if plugin["name"] == name:
                    return f"services[{s}].routes[{r}].plugins[{p}]", plugin
    raise AssertionError(f"kong.yml has no {name} plugin")


def with_config(document: Kong, name: str, **change: Any) -> str:
    """Change the first `name` plugin's config (its own copy: YAML anchors are shared)."""
    path, plugin = plugin_at(document, name)
    plugin["config"] = {**plugin.get("config", {}), **change}
    return path


def refused(document: Kong, where: str, reason: str) -> None:
    problems = validate(document)
    assert any(p.startswith(where) and reason in p for p in problems), problems


def test_the_real_kong_yml_is_valid() -> None:
    assert validate(load_kong(KONG_YML)) == []


USED_PLUGINS: dict[str, tuple[dict[str, Any], str, str]] = {
    # plugin: (a change Kong refuses, the field it names, the reason)
    "rate-limiting": ({"minute": "lots"}, "config.minute", "expected a number, got 'lots'"),
    "jwt": (
        {"claims_to_verify": ["iat"]},
        "config.claims_to_verify[0]",
        "expected one of: exp, nbf",
    ),
    "correlation-id": ({"generator": "random"}, "config.generator", "expected one of"),
    "request-size-limiting": ({"max_size": 1}, "config.max_size", "unknown field"),
    "cors": ({"methods": ["GET", "FETCH"]}, "config.methods[1]", "expected one of"),
    "prometheus": ({"per_consumer": "yes"}, "config.per_consumer", "expected a boolean"),
}


@pytest.mark.parametrize("name", sorted(USED_PLUGINS))
def test_a_bad_value_in_each_plugin_kong_yml_uses_is_refused(name: str) -> None:
    change, field, reason = USED_PLUGINS[name]
    document = kong()
    path = with_config(document, name, **change)
    refused(document, f"{path}.{field}", reason)


def test_every_plugin_kong_yml_uses_has_a_negative_case_here() -> None:
    document = kong()
    used = {p["name"] for p in document["plugins"]}
    for service in document["services"]:
        for route in service.get("routes", []):
            used |= {p["name"] for p in route.get("plugins", [])}
    assert used <= set(USED_PLUGINS)


# Plugins a user would plausibly add: a valid config is accepted, a bad one refused.
OTHER_PLUGINS: dict[str, tuple[dict[str, Any], dict[str, Any], str, str]] = {
    "key-auth": (
        {"key_names": ["apikey"], "hide_credentials": True},
        {"key_in_header": "no"},
        "config.key_in_header",
        "expected a boolean",
    ),
    "acl": ({"allow": ["admins"]}, {"whitelist": ["admins"]}, "config.whitelist", "unknown field"),
    "ip-restriction": ({"deny": ["10.0.0.0/8"], "status": 403}, {}, "config", "at least one of"),
    "bot-detection": ({"deny": ["curl"]}, {"deny": "curl"}, "config.deny", "expected an array"),
    "request-transformer": (
        {"add": {"headers": ["x-from-gateway:1"]}},
        {"add": {"headers": ["no-colon"]}},
        "config.add.headers[0]",
        "is not 'name:value'",
    ),
    "response-transformer": (
        {"remove": {"headers": ["Server"]}},
        {"remove": {"body": ["x"]}},
        "config.remove.body",
        "unknown field",
    ),
    "proxy-cache": (
        {"strategy": "memory", "cache_ttl": 30},
        {"strategy": "memory", "cache_ttl": 0},
        "config.cache_ttl",
        "greater than 0",
    ),
}


@pytest.mark.parametrize("name", sorted(OTHER_PLUGINS))
def test_a_plugin_a_user_adds_is_checked_against_its_own_schema(name: str) -> None:
    good, bad, field, reason = OTHER_PLUGINS[name]
    document = kong()
    document["plugins"].append({"name": name, "config": good})
    assert validate(document) == []
    document["plugins"][-1]["config"] = bad
    refused(document, f"plugins[{len(document['plugins']) - 1}].{field}", reason)


# Rules read from Kong's source for the plugins a user adds (gateway/kong39.py's docstring says
# which file): (plugin, a config Kong 3.9 refuses, where under the plugin, the reason).
PLUGIN_RULES: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "acl: allow and deny together": (
        "acl",
        {"allow": ["admins"], "deny": ["guests"]},
        "config",
        "only one of these fields must be non-empty: 'config.allow', 'config.deny'",
    ),
    "acl: an empty allow list is unset": (
        "acl",
        {"allow": []},
        "config",
        "at least one of these fields must be non-empty: 'config.allow', 'config.deny'",
    ),
    "acl: include_consumer_groups is Enterprise only": (
        "acl",
        {"allow": ["admins"], "include_consumer_groups": True},
        "config.include_consumer_groups",
        "unknown field",
    ),
    "ip-restriction: not an IP or CIDR": (
        "ip-restriction",
        {"deny": ["10.0.0.0/8", "10.0.0.300"]},
        "config",
        "deny[1]: invalid ip or cidr range: '10.0.0.300'",
    ),
    "ip-restriction: empty lists are unset": (
        "ip-restriction",
        {"allow": [], "deny": []},
        "config",
        "at least one of these fields must be non-empty: 'config.allow', 'config.deny'",
    ),
    "bot-detection: a regex that does not compile": (
        "bot-detection",
        {"allow": ["(curl"]},
        "config",
        "allow[0]: invalid regex: '(curl'",
    ),
    "request-transformer: a body value is required": (
        "request-transformer",
        {"add": {"body": ["debug:"]}},
        "config.add",
        "body[0]: key 'debug' has no value",
    ),
    "request-transformer: an unclosed template": (
        "request-transformer",
        {"replace": {"querystring": ["id:$(headers.x"]}},
        "config.replace",
        "is not in supported format",
    ),
    "request-transformer: rename needs two header names": (
        "request-transformer",
        {"rename": {"headers": ["x-old:"]}},
        "config.rename.headers[0]",
        "two valid header names",
    ),
    "request-transformer: remove takes header names": (
        "request-transformer",
        {"remove": {"headers": ["x old"]}},
        "config.remove.headers[0]",
        "is not a valid header name",
    ),
    "response-transformer: a header name with a space": (
        "response-transformer",
        {"add": {"headers": ["X Frame:DENY"]}},
        "config.add.headers[0]",
        "valid header name",
    ),
    "response-transformer: json_types": (
        "response-transformer",
        {"append": {"json": ["n:1"], "json_types": ["int"]}},
        "config.append.json_types[0]",
        "expected one of: boolean, number, string",
    ),
}


@pytest.mark.parametrize("case", sorted(PLUGIN_RULES))
def test_a_rule_of_a_plugin_a_user_adds_is_enforced(case: str) -> None:
    name, config, field, reason = PLUGIN_RULES[case]
    document = kong()
    document["plugins"].append({"name": name, "config": config})
    refused(document, f"plugins[{len(document['plugins']) - 1}].{field}", reason)


ACCEPTED_PLUGINS: dict[str, dict[str, Any]] = {
    # What the same rules let through, as Kong 3.9 does.
    "acl": {"deny": ["guests", "guests"], "always_use_authenticated_groups": True},
    "ip-restriction": {"allow": ["192.0.2.1", "2001:db8::/32"], "deny": ["10.0.0.0/8"]},
    "bot-detection": {"deny": ["^curl/", "(?i)python-requests"]},
    "request-transformer": {
        "http_method": "POST",
        "rename": {"headers": ["x-old:x-new"], "querystring": ["a:b"]},
        "replace": {"uri": "/v2", "body": ["name:$(headers.x-name)"]},
        "append": {"headers": ["x-empty:"]},
    },
    "response-transformer": {
        "rename": {"json": ["old:new"], "headers": ["x-old:x-new"]},
        "add": {"json": ["flag:true"], "json_types": ["boolean"]},
    },
}


@pytest.mark.parametrize("name", sorted(ACCEPTED_PLUGINS))
def test_what_kong_39_accepts_in_those_plugins_is_accepted(name: str) -> None:
    document = kong()
    document["plugins"].append({"name": name, "config": ACCEPTED_PLUGINS[name]})
    assert validate(document) == []


def test_every_tabled_plugin_has_a_case_here() -> None:
    assert set(plugin_configs(dbless=True)) == set(USED_PLUGINS) | set(OTHER_PLUGINS)


def _add_route(document: Kong, **route: Any) -> None:
    document["services"][0]["routes"].append(route)


CASES: dict[str, tuple[Callable[[Kong], Any], str, str]] = {
    "unknown plugin": (
        lambda k: k["plugins"].append({"name": "rate-limiter"}),
        "plugins[",
        "'rate-limiter' is not a Kong 3.9 plugin",
    ),
    "bundled plugin without a table": (
        lambda k: k["plugins"].append({"name": "hmac-auth"}),
        "plugins[",
        "a Kong 3.9 plugin this project's table lacks",
    ),
    "unknown top-level key": (lambda k: k.update(service=[]), "service", "unknown top-level key"),
    "wrong format version": (
        lambda k: k.update(_format_version="1.1"),
        "_format_version",
        "expected '3.0'",
    ),
    "route without paths, hosts or methods": (
        lambda k: _add_route(k, name="nowhere", strip_path=False),
        "services[0].routes[",
        # the default protocols are http and https: Kong words it for https
        "must set one of 'methods', 'hosts', 'headers', 'paths', 'snis' when 'protocols' is "
        "'https'",
    ),
    "route path without a slash": (
        lambda k: _add_route(k, name="slashless", paths=["auth/x"]),
        "services[0].routes[",
        "should start with: /",
    ),
    "service with a bad protocol": (
        lambda k: k["services"][0].update(protocol="htp"),
        "services[0].protocol",
        "expected one of: grpc, grpcs, http, https",
    ),
    "service with a port out of range": (
        lambda k: k["services"][1].update(port=70000),
        "services[1].port",
        "between 0 and 65535",
    ),
    "service protocol ws (Enterprise only)": (
        lambda k: k["services"][0].update(protocol="ws"),
        "services[0].protocol",
        "expected one of: grpc, grpcs, http, https, tcp, tls, tls_passthrough, udp",
    ),
    "service host with a port": (
        lambda k: k["services"][0].update(host="auth_svc:8101"),
        "services[0]",
        "host: must not have a port",
    ),
    "service without host or url": (
        lambda k: k["services"][0].pop("host"),
        "services[0]",
        "host: required field missing",
    ),
    "service tls_verify on plain http": (
        lambda k: k["services"][0].update(tls_verify=True),
        "services[0]",
        "tls_verify can only be set when protocol is 'https' or 'tls'",
    ),
    "service ca_certificates not UUIDs": (
        lambda k: k["services"][0].update(protocol="https", ca_certificates=["my-ca"]),
        "services[0].ca_certificates[0]",
        "is not a UUID",
    ),
    "service path with an empty segment": (
        lambda k: k["services"][0].update(path="/api//v1"),
        "services[0].path",
        "have no empty segments",
    ),
    "service tag with a comma": (
        lambda k: k["services"][0].update(tags=["team,a"]),
        "services[0].tags[0]",
        "is not a valid tag",
    ),
    "route expression outside the expressions flavour": (
        lambda k: k["services"][0]["routes"][0].update(expression='http.path == "/x"'),
        "services[0].routes[0].expression",
        "unknown field",
    ),
    "route mixing http and tcp": (
        lambda k: k["services"][0]["routes"][0].update(protocols=["http", "tcp"]),
        "services[0].routes[0]",
        "protocols: these sets are mutually exclusive",
    ),
    "http route with sources": (
        lambda k: k["services"][0]["routes"][0].update(sources=[{"ip": "10.0.0.1"}]),
        "services[0].routes[0]",
        "cannot set 'sources' when 'protocols' is 'http' or 'https'",
    ),
    "plain http route with snis": (
        lambda k: k["services"][0]["routes"][0].update(protocols=["http"], snis=["a.test"]),
        "services[0].routes[0]",
        "'snis' can only be set when 'protocols' is 'grpcs', 'https', 'tls' or 'tls_passthrough'",
    ),
    "route matching on a host header": (
        lambda k: k["services"][0]["routes"][0].update(headers={"Host": ["a.test"]}),
        "services[0].routes[0]",
        "cannot contain 'host' header",
    ),
    "route path not normalized": (
        lambda k: k["services"][0]["routes"][0].update(paths=["/auth/../users"]),
        "services[0].routes[0]",
        "non-normalized path, consider use '/users' instead",
    ),
    "route regex path without its slash": (
        lambda k: k["services"][0]["routes"][0].update(paths=["~auth"]),
        "services[0].routes[0].paths[0]",
        "should start with: / (fixed path) or ~/ (regex path)",
    ),
    "route host with two wildcards": (
        lambda k: k["services"][0]["routes"][0].update(hosts=["*.example.*"]),
        "services[0].routes[0]",
        "hosts[0]: invalid wildcard: must have at most one wildcard",
    ),
    "grpc route stripping its path": (
        lambda k: k["services"][0]["routes"][0].update(protocols=["grpc"], strip_path=True),
        "services[0].routes[0]",
        "cannot set 'strip_path' when 'protocols' is 'grpc' or 'grpcs'",
    ),
    "tcp route with paths": (
        lambda k: k["services"][0]["routes"][0].update(protocols=["tcp"]),
        "services[0].routes[0]",
        "cannot set 'paths' when 'protocols' is 'tcp', 'tls', 'tls_passthrough' or 'udp'",
    ),
    "upstream named by an IP address": (
        lambda k: k["upstreams"][0].update(name="10.0.0.1"),
        "upstreams[0]",
        "Invalid name ('10.0.0.1'); no ip addresses allowed",
    ),
    "upstream fallback without hashing": (
        lambda k: k["upstreams"][0].update(hash_fallback="ip"),
        "upstreams[0]",
        "hash_fallback: must be 'none' when hash_on is 'none'",
    ),
    "upstream fallback header without its name": (
        lambda k: k["upstreams"][0].update(hash_on="ip", hash_fallback="header"),
        "upstreams[0]",
        "hash_fallback_header is required when hash_fallback is 'header'",
    ),
    "upstream hashing on the same header twice": (
        lambda k: k["upstreams"][0].update(
            hash_on="header",
            hash_on_header="x-user",
            hash_fallback="header",
            hash_fallback_header="x-user",
        ),
        "upstreams[0]",
        "values of these fields must be distinct: 'hash_on_header', 'hash_fallback_header'",
    ),
    "upstream cookie name with a space": (
        lambda k: k["upstreams"][0].update(hash_on="cookie", hash_on_cookie="session id"),
        "upstreams[0].hash_on_cookie",
        "is not a valid cookie name",
    ),
    "unknown service field": (
        lambda k: k["services"][0].update(timeout=5),
        "services[0].timeout",
        "unknown field",
    ),
    "route strip_path as a string": (
        lambda k: k["services"][0]["routes"][0].update(strip_path="nope"),
        "services[0].routes[0].strip_path",
        "expected a boolean",
    ),
    "upstream algorithm": (
        lambda k: k["upstreams"][0].update(algorithm="random"),
        "upstreams[0].algorithm",
        "expected one of: round-robin",
    ),
    "health check type": (
        lambda k: k["upstreams"][0]["healthchecks"]["active"].update(type="ping"),
        "upstreams[0].healthchecks.active.type",
        "expected one of",
    ),
    "target weight": (
        lambda k: k["upstreams"][0]["targets"][0].update(weight=-1),
        "upstreams[0].targets[0].weight",
        "between 0 and 65535",
    ),
    "jwt credential with an unknown algorithm": (
        lambda k: k["consumers"][0]["jwt_secrets"].append({"key": "k", "algorithm": "RS999"}),
        "consumers[0].jwt_secrets[0].algorithm",
        "expected one of",
    ),
    "RS256 credential without its public key": (
        lambda k: k["consumers"][0]["jwt_secrets"].append({"key": "k", "algorithm": "RS256"}),
        "consumers[0].jwt_secrets[0]",
        "rsa_public_key is required",
    ),
    "consumer without username or custom_id": (
        lambda k: k["consumers"].append({"tags": ["x"]}),
        "consumers[1]",
        "at least one of these fields must be non-empty: 'username', 'custom_id'",
    ),
    "cluster policy in DB-less mode": (
        lambda k: with_config(k, "rate-limiting", policy="cluster"),
        "",
        "config.policy: expected one of: local, redis",
    ),
    "rate limit windows out of order": (
        lambda k: with_config(k, "rate-limiting", second=100, minute=50),
        "",
        "cannot be lower than the limit for second",
    ),
    "rate limit without a window": (
        lambda k: plugin_at(k, "rate-limiting")[1].update(config={"limit_by": "ip"}),
        "",
        "at least one of these fields must be non-empty: 'second', 'minute'",
    ),
    "rate limit by header without its name": (
        lambda k: with_config(k, "rate-limiting", limit_by="header"),
        "",
        "header_name is required when limit_by is 'header'",
    ),
    "jwt maximum_expiration out of range": (
        lambda k: with_config(k, "jwt", maximum_expiration=31536001),
        "",
        "config.maximum_expiration: value should be between 0 and 31536000",
    ),
    "empty string": (
        lambda k: with_config(k, "correlation-id", header_name=""),
        "",
        "config.header_name: length must be at least 1",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_what_kong_39_refuses_is_refused_with_its_path_and_reason(case: str) -> None:
    change, where, reason = CASES[case]
    document = kong()
    change(document)
    refused(document, where, reason)


def test_cluster_policy_is_accepted_when_kong_has_a_database() -> None:
    document = kong()
    with_config(document, "rate-limiting", policy="cluster")
    assert validate(document, dbless=False) == []
    assert validate(document) != []


def test_esctl_gateway_validate_prints_one_line_per_error_and_fails(tmp_path: Path) -> None:
    document = kong()
    with_config(document, "rate-limiting", minute="lots")
    document["extra"] = 1
    broken = tmp_path / "kong.yml"
    broken.write_text(yaml.safe_dump(document))
    result = CliRunner().invoke(app, ["gateway", "validate", "--config", str(broken)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 2, lines
    assert any("config.minute: expected a number, got 'lots'" in line for line in lines)
    assert all(line.startswith(f"{broken}: ") for line in lines)
    ok = CliRunner().invoke(app, ["gateway", "validate", "--config", str(KONG_YML)])
    assert ok.exit_code == 0, ok.output
