"""Dockerfile, docker-compose and Kubernetes: validated offline, and in step with the code and
with compose/kong.yml (nothing here can run Docker or a cluster)."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic_settings import BaseSettings

import registry
from gateway.kong import k8s_credentials, load_kong
from gateway.settings import GatewaySettings
from servicekit.amqp import amqp_urls
from servicekit.telemetry import TelemetrySettings
from testbed.cli import esctl

ROOT = Path(__file__).parents[2]
BIN = ROOT / ".venv" / "bin"
COMPOSE = ROOT / "compose" / "docker-compose.yml"
COMPOSE_ENV_EXAMPLE = ROOT / "compose" / ".env.example"
K8S_SECRETS_EXAMPLE = ROOT / "k8s" / "secrets.example.env"
RABBITMQ_NODES = 3  # compose and Kubernetes both describe a three-node RabbitMQ cluster
# Read by the image itself (its HEALTHCHECK), not by a settings class.
IMAGE_ENV = {"HEALTH_PORT"}
SHARED_ENV = (
    IMAGE_ENV
    | {"AMQP_URL", "LOG_LEVEL", "LOG_FORMAT"}
    | {
        # read by servicekit.telemetry.TelemetrySettings in every process
        name
        for name in TelemetrySettings.model_json_schema(by_alias=True)["properties"]
    }
)
# Settings class of each service (and of the gateway), by environment prefix.
SETTINGS: dict[str, type[BaseSettings]] = {
    str(cls.model_config.get("env_prefix", "")): cls
    for cls in (*(s.settings for s in registry.SERVICES), GatewaySettings)
}
# Every process of the stack, as `esctl <verb> <service>` (compose and k8s run each one).
PROCESSES = {tuple(p.command) for p in registry.processes()}


def settings_class(prefix: str) -> type[BaseSettings] | None:
    return SETTINGS.get(prefix)


def env_names(cls: type[BaseSettings]) -> set[str]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    names = set()
    for field_name, info in cls.model_fields.items():
        alias = info.validation_alias
        choices = getattr(alias, "choices", None)
        names.add(str(choices[0]) if choices else f"{prefix}{field_name}".upper())
    return names


def check_env_names(where: str, names: Iterator[str] | set[str]) -> list[str]:
    """Names no settings class reads; skips (once all else passed) for missing classes."""
    unknown, missing = [], set()
    for name in names:
        if name in SHARED_ENV:
            continue
        prefix = next((p for p in SETTINGS if name.startswith(p)), None)
        if prefix is None:
            unknown.append(f"{where}: {name}")
            continue
        cls = settings_class(prefix)
        if cls is None:
            missing.add(prefix)
        elif name not in env_names(cls):
            unknown.append(f"{where}: {name}")
    assert unknown == []
    return sorted(missing)


def env_file(path: Path) -> dict[str, str]:
    """The KEY=VALUE lines of an env file (`docker compose --env-file`, `--from-env-file`)."""
    lines = (line.strip() for line in path.read_text().splitlines())
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def rabbitmq_conf(text: str) -> dict[str, str]:
    """The settings of a rabbitmq.conf (sysctl format: `key = value`, `#` comments)."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    pairs = (line.split("=", 1) for line in lines if line)
    return {key.strip(): value.strip() for key, value in pairs}


def node_addresses(amqp_url: str) -> set[tuple[str | None, int]]:
    """(host, port) of each node of an AMQP_URL, split as the runtime splits it."""
    return {(parts.hostname, parts.port or 5672) for parts in map(urlsplit, amqp_urls(amqp_url))}


# --- Dockerfile -------------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), str(ROOT / "Dockerfile")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_multi_stage_non_root_with_a_healthcheck_and_deps_before_code() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    # Both stages on the official slim Python image by default (tests/image passes a stand-in).
    assert sum(line.startswith("FROM ${BASE_IMAGE} AS ") for line in lines) == 2
    (base,) = [line for line in lines if line.startswith("ARG BASE_IMAGE=")]
    assert base.split("=", 1)[1].startswith("python:") and "slim" in base
    user = next(line for line in lines if line.startswith("USER "))
    assert user.split()[1].split(":")[0] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    sync_deps = next(i for i, line in enumerate(lines) if "--no-install-project" in line)
    first_code = next(i for i, line in enumerate(lines) if line.startswith("COPY servicekit"))
    assert sync_deps < first_code


# --- docker-compose ---------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def test_the_compose_file_follows_the_compose_spec() -> None:
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_every_process_healthy_and_in_order() -> None:
    services = compose()["services"]
    commands = {name: tuple(s.get("command", ())) for name, s in services.items()}
    expected = {
        ("db", "init"),
        ("gateway", "render", "--out", "/kong/kong.yml"),
        *PROCESSES,
    }
    assert expected <= set(commands.values())
    assert services["kong"]["image"] == "kong:3.9.3"
    assert services["kong"]["environment"]["KONG_DATABASE"] == "off"
    assert "postgres" in services
    assert all(s["image"].endswith("-management") for s in rabbitmq_nodes().values())
    one_shots = {n for n, c in commands.items() if c[:1] in (("db",), ("gateway",))}
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services
            wanted = "service_completed_successfully" if dependency in one_shots else None
            assert condition["condition"] in (wanted or "service_healthy", "service_started")
            if dependency not in ("mailpit",):
                assert condition["condition"] != "service_started", (name, dependency)
        if name not in one_shots and name != "mailpit":
            assert service["healthcheck"]["test"], name


def test_compose_health_checks_probe_the_port_each_process_is_told_to_listen_on() -> None:
    for name, service in compose()["services"].items():
        env = service.get("environment") or {}
        ports = [
            v
            for k, v in env.items()
            if k.endswith("_PORT") and not k.startswith("KONG") and k not in IMAGE_ENV
        ]
        test = " ".join(service.get("healthcheck", {}).get("test") or [])
        if ports and "health/ready" in test:
            assert f"127.0.0.1:{ports[0]}/health/ready" in test, name
            assert len(ports) == 1, name
            # The image's own HEALTHCHECK probes HEALTH_PORT: the same port.
            assert env["HEALTH_PORT"] == ports[0], name


def test_the_image_owns_the_paths_compose_mounts_fresh_volumes_on() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "# syntax=" not in dockerfile  # BuildKit would fetch a frontend from Docker Hub
    (created,) = re.findall(r"install -d -o 10001 -g 10001 (?:-m \d+ )?([^\n]+)", dockerfile)
    owned = set(created.split())
    services = compose()["services"]
    render = services["kong-config"]
    out = Path(render["command"][render["command"].index("--out") + 1])
    assert str(out.parent) in {v.split(":")[1] for v in render["volumes"]}
    assert str(out.parent) in owned
    notify = services["notify_svc"]
    maildir = notify["environment"]["NOTIFY_MAILDIR"]
    assert maildir in owned
    assert maildir in {v.split(":")[1] for v in notify["volumes"]}
    assert f"NOTIFY_MAILDIR={maildir}" in dockerfile.replace(" ", "")


def test_kong_config_that_cannot_write_its_file_says_so_in_one_line(
    make_database: Callable[[str], str], tmp_path: Path
) -> None:
    """As compose's kong-config on a volume it may not write: esctl's one-line error, exit 1."""
    from auth_svc.settings import AuthSettings

    database = make_database("kongcfg")
    registry.service("auth_svc").init_db(AuthSettings(database_url=database))
    blocker = tmp_path / "kong"
    blocker.write_text("a file where the directory should be")
    env = {**os.environ, "AUTH_DATABASE_URL": database}
    result = esctl("gateway", "render", "--out", str(blocker / "kong.yml"), env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: could not write {blocker / 'kong.yml'}: "), line


def rabbitmq_nodes() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return {n: s for n, s in services.items() if str(s.get("image", "")).startswith("rabbitmq:")}


def compose_interpolated(value: str) -> str:
    """`value` as docker compose interpolates it with the values of compose/.env.example."""
    env = env_file(COMPOSE_ENV_EXAMPLE)

    def substitute(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2) or "", match.group(3) or ""
        if env.get(name):
            return env[name]
        assert "?" not in operator, f"{name} is required and compose/.env.example lacks it"
        return argument if "-" in operator else ""

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", substitute, value)


def test_compose_runs_a_three_node_rabbitmq_cluster_sharing_one_cookie() -> None:
    nodes = rabbitmq_nodes()
    assert len(nodes) == RABBITMQ_NODES
    assert len({s["image"] for s in nodes.values()}) == 1  # one version in the cluster
    assert all(s["image"].startswith("rabbitmq:3.13") for s in nodes.values())
    node_names = set()
    for name, service in nodes.items():
        assert service["hostname"] == name  # the node name is rabbit@<host name>
        node_names.add(f"rabbit@{service['hostname']}")
        assert "rabbitmq-diagnostics" in service["healthcheck"]["test"], name
    # One cookie, from the env file, and a placeholder for it in the example.
    cookies = {s["environment"]["RABBITMQ_ERLANG_COOKIE"] for s in nodes.values()}
    assert len(cookies) == 1
    (cookie,) = cookies
    assert cookie.startswith("${RABBITMQ_ERLANG_COOKIE")
    assert env_file(COMPOSE_ENV_EXAMPLE).get("RABBITMQ_ERLANG_COOKIE")
    # Each node its own data volume; all of them the same rabbitmq.conf.
    data, configs = [], set()
    for service in nodes.values():
        mounts = {
            target: source for source, target, *_ in (v.split(":") for v in service["volumes"])
        }
        data.append(mounts["/var/lib/rabbitmq"])
        configs.add(mounts["/etc/rabbitmq/rabbitmq.conf"])
    assert len(set(data)) == RABBITMQ_NODES
    assert set(data) <= set(compose()["volumes"])
    (config,) = configs
    conf = rabbitmq_conf((COMPOSE.parent / config).read_text())
    assert conf["cluster_formation.peer_discovery_backend"] in ("classic_config", "classic")
    listed = {v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes.")}
    assert listed == node_names
    assert conf["cluster_partition_handling"] == "pause_minority"
    # The management UI of one node, on the loopback interface only.
    published = [p for s in nodes.values() for p in s.get("ports", [])]
    assert len(published) == 1
    assert published[0].startswith("127.0.0.1:")
    assert published[0].endswith(":15672")


def test_every_compose_process_lists_the_three_nodes_and_waits_for_them_healthy() -> None:
    nodes = rabbitmq_nodes()
    expected = {(s["hostname"], 5672) for s in nodes.values()}
    users = {
        compose_interpolated(s["environment"]["RABBITMQ_DEFAULT_USER"]) for s in nodes.values()
    }
    passwords = {
        compose_interpolated(s["environment"]["RABBITMQ_DEFAULT_PASS"]) for s in nodes.values()
    }
    processes = 0
    for name, service in compose()["services"].items():
        if not str(service.get("image", "")).startswith("${ESKIT_IMAGE"):
            continue
        url = compose_interpolated(service["environment"]["AMQP_URL"])
        assert node_addresses(url) == expected, name
        assert {urlsplit(u).username for u in amqp_urls(url)} == users, name
        assert {urlsplit(u).password for u in amqp_urls(url)} == passwords, name
        if service["command"][:1] in (["db"], ["gateway"]):
            continue  # one-shots that do not use the broker
        processes += 1
        depends = service.get("depends_on") or {}
        for node in nodes:
            assert depends[node]["condition"] == "service_healthy", (name, node)
    assert processes >= len(PROCESSES)  # REST services, relays and consumers


def test_compose_sets_only_variables_the_code_reads() -> None:
    missing: set[str] = set()
    for name, service in compose()["services"].items():
        if not str(service.get("image", "")).startswith("${ESKIT_IMAGE"):
            continue
        missing |= set(check_env_names(name, set(service.get("environment") or {})))
    if missing:
        pytest.skip(f"settings not importable yet, their names are unchecked: {sorted(missing)}")


# --- Kubernetes -------------------------------------------------------------------------------


@cache
def rendered(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def strict_validation(manifest: Path) -> subprocess.CompletedProcess[str]:
    """`kubernetes-validate --strict` of a manifest file."""
    return subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(manifest)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_both_overlays_render_and_pass_strict_validation(overlay: str, tmp_path: Path) -> None:
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered(overlay)))
    result = strict_validation(manifest)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_credentials_render_of_esctl_validates_for_kubernetes(tmp_path: Path) -> None:
    manifest = tmp_path / "credentials.yaml"
    manifest.write_text(yaml.safe_dump_all(k8s_credentials({"kid-1": "-----BEGIN..."})))
    result = strict_validation(manifest)
    assert result.returncode == 0, result.stdout + result.stderr


def env_names_read(container: dict[str, Any]) -> list[str]:
    """The container's variables, less those that only feed others (as `$(NAME)`)."""
    values = " ".join(str(e.get("value", "")) for e in container.get("env", []))
    return [e["name"] for e in container.get("env", []) if f"$({e['name']})" not in values]


def expanded_env(container: dict[str, Any]) -> dict[str, str]:
    """Each variable's value as the kubelet expands it: $(NAME) of a variable defined earlier in
    the list (literal values, or `<NAME>` for values from a Secret or the Downward API)."""
    defined: dict[str, str] = {}
    for entry in container.get("env", []):
        value = str(entry.get("value", f"<{entry['name']}>"))
        for reference in re.findall(r"\$\((\w+)\)", value):
            assert reference in defined, f"{entry['name']} uses $({reference}) before it is defined"
            value = value.replace(f"$({reference})", defined[reference])
        defined[entry["name"]] = value
    return defined


def _app_for(args: list[str]) -> FastAPI:
    if args[0] == "serve":
        service = registry.service(args[1])
        assert service.app is not None
        return service.app(service.settings())
    from servicekit.web import create_app

    return create_app(title=" ".join(args))  # relays and consumers: the shared worker shell


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_deployment_has_probes_resources_and_a_restricted_security_context(
    overlay: str,
) -> None:
    deployments = [d for d in rendered(overlay) if d["kind"] == "Deployment"]
    commands = set()
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            name = f"{deployment['metadata']['name']}/{container['name']}"
            commands.add(tuple(container["args"]))
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), name
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            client = TestClient(_app_for(container["args"]))  # no lifespan: routes only
            for probe, path in (
                ("readinessProbe", "/health/ready"),
                ("livenessProbe", "/health/live"),
            ):
                get = container[probe]["httpGet"]
                assert get["path"] == path, name
                assert client.get(get["path"]).status_code != 404, name
                port = next(p for p in container["ports"] if p["name"] == get["port"])
                env = {e["name"]: e.get("value") for e in container["env"]}
                assert str(port["containerPort"]) in env.values(), name
            missing = check_env_names(name, set(env_names_read(container)))
            assert missing == []
    assert commands >= PROCESSES


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_rest_services_scale_and_every_deployment_has_a_disruption_budget(overlay: str) -> None:
    docs = rendered(overlay)
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    statefulsets = {d["metadata"]["name"] for d in docs if d["kind"] == "StatefulSet"}
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert all(h["apiVersion"] == "autoscaling/v2" for h in hpas)
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == {"auth-svc", "user-svc"}
    budgets = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for d in docs
        if d["kind"] == "PodDisruptionBudget"
    }
    assert budgets == deployments | statefulsets
    (job,) = [d for d in docs if d["kind"] == "Job"]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "init"]
    assert not [d for d in docs if d["kind"] == "Secret"]  # referenced, never committed


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def rabbitmq_statefulset(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (sts,) = [
        d
        for d in docs
        if d["kind"] == "StatefulSet"
        and d["spec"]["template"]["spec"]["containers"][0]["image"].startswith("rabbitmq:")
    ]
    return sts


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_rabbitmq_is_a_three_node_statefulset_that_forms_its_cluster_by_peer_discovery(
    overlay: str,
) -> None:
    docs = rendered(overlay)
    sts = rabbitmq_statefulset(docs)
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] == RABBITMQ_NODES
    assert spec["podManagementPolicy"] == "Parallel"  # OrderedReady deadlocks a full restart
    (container,) = pod["containers"]
    assert container["image"].startswith("rabbitmq:3.13")
    # Stable node names from the headless service, resolvable before the nodes are ready.
    headless = one(docs, "Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert selects(headless["spec"]["selector"], labels)
    clients = [
        d
        for d in docs
        if d["kind"] == "Service"
        and d["spec"].get("clusterIP") != "None"
        and selects(d["spec"].get("selector", {}), labels)
    ]
    assert [p["port"] for c in clients for p in c["spec"]["ports"] if p["name"] == "amqp"] == [5672]
    env = {e["name"]: e for e in container["env"]}
    suffix = env["K8S_HOSTNAME_SUFFIX"]["value"]
    assert suffix.startswith(f".{spec['serviceName']}.")
    assert env["RABBITMQ_NODENAME"]["value"] == f"rabbit@$(MY_POD_NAME){suffix}"
    assert env["RABBITMQ_USE_LONGNAME"]["value"] == "true"
    # Peer discovery through the Kubernetes API, with the rights it needs.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config = mounts["/etc/rabbitmq/rabbitmq.conf"]
    plugins = mounts["/etc/rabbitmq/enabled_plugins"]
    assert config["name"] == plugins["name"]
    configmap = one(docs, "ConfigMap", volumes[config["name"]]["configMap"]["name"])
    conf = rabbitmq_conf(configmap["data"][config["subPath"]])
    assert conf["cluster_formation.peer_discovery_backend"] in ("rabbit_peer_discovery_k8s", "k8s")
    assert conf["cluster_formation.k8s.service_name"] == spec["serviceName"]
    assert conf["cluster_formation.k8s.address_type"] == "hostname"
    assert conf["cluster_partition_handling"] == "pause_minority"
    assert conf["queue_leader_locator"] == "balanced"
    assert "rabbitmq_peer_discovery_k8s" in configmap["data"][plugins["subPath"]]
    assert pod["automountServiceAccountToken"] is True
    account = one(docs, "ServiceAccount", pod["serviceAccountName"])["metadata"]
    subject = {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding" and subject in d["subjects"]]
    role = one(docs, "Role", binding["roleRef"]["name"])
    assert any(
        "endpoints" in rule["resources"] and "get" in rule["verbs"] for rule in role["rules"]
    )
    # The Erlang cookie from the Secret, written to $HOME/.erlang.cookie before the node starts.
    (cookie,) = [v for v in volumes.values() if "projected" in v]
    (source,) = cookie["projected"]["sources"]
    assert source["secret"]["name"] == "eskit-secrets"
    assert [i["key"] for i in source["secret"]["items"]] == ["erlang-cookie"]
    (init,) = pod["initContainers"]
    home = mounts["/var/lib/rabbitmq"]["name"]
    assert {m["name"] for m in init["volumeMounts"]} == {cookie["name"], home}
    assert "/var/lib/rabbitmq/.erlang.cookie" in " ".join(init["command"])
    # Its data on a volume claim per node; one node down at a time at most.
    (claim,) = spec["volumeClaimTemplates"]
    assert mounts["/var/lib/rabbitmq/mnesia"]["name"] == claim["metadata"]["name"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    (budget,) = [
        d
        for d in docs
        if d["kind"] == "PodDisruptionBudget"
        and selects(d["spec"]["selector"]["matchLabels"], labels)
    ]
    assert budget["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in budget["spec"]
    # Probes through rabbitmq-diagnostics, resources, and the restricted security profile.
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"][0] == "rabbitmq-diagnostics"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for each in (container, init):
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(each["resources"][kind]), each["name"]
        sc = each["securityContext"]
        assert sc["runAsNonRoot"] is True, each["name"]
        assert sc["readOnlyRootFilesystem"] is True, each["name"]
        assert sc["allowPrivilegeEscalation"] is False, each["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], each["name"]


def test_in_production_no_two_rabbitmq_nodes_share_a_machine() -> None:
    sts = rabbitmq_statefulset(rendered("prod"))
    pod = sts["spec"]["template"]["spec"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert selects(term["labelSelector"]["matchLabels"], labels)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_process_lists_every_rabbitmq_node_in_amqp_url(overlay: str) -> None:
    docs = rendered(overlay)
    sts = rabbitmq_statefulset(docs)
    name, headless = sts["metadata"]["name"], sts["spec"]["serviceName"]
    expected = {(f"{name}-{i}.{headless}", 5672) for i in range(sts["spec"]["replicas"])}
    broker_env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    credentials = (
        broker_env["RABBITMQ_DEFAULT_USER"]["valueFrom"],
        broker_env["RABBITMQ_DEFAULT_PASS"]["valueFrom"],
    )
    processes = 0
    for doc in docs:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            where = f"{doc['metadata']['name']}/{container['name']}"
            url = expanded_env(container)["AMQP_URL"]
            assert node_addresses(url) == expected, where
            # The user the broker creates, from the same Secret keys (expanded_env leaves
            # `<NAME>` for a value from a Secret).
            (user,) = {urlsplit(u).username for u in amqp_urls(url)}
            (password,) = {urlsplit(u).password for u in amqp_urls(url)}
            env = {e["name"]: e for e in container["env"]}
            sources = (env[user.strip("<>")]["valueFrom"], env[password.strip("<>")]["valueFrom"])
            assert sources == credentials, where
            processes += 1
    assert processes >= len(PROCESSES) + 1  # REST services, relays, consumers, db-init


def test_every_secret_key_the_manifests_use_is_in_the_example() -> None:
    keys = set(env_file(K8S_SECRETS_EXAMPLE))
    used = set()
    for overlay in ("dev", "prod"):
        for doc in rendered(overlay):
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                for entry in container.get("env", []):
                    ref = entry.get("valueFrom", {}).get("secretKeyRef")
                    if ref and ref["name"] == "eskit-secrets":
                        used.add(ref["key"])
            for volume in pod.get("volumes", []):
                sources = volume.get("projected", {}).get("sources", [])
                secrets = [s["secret"] for s in sources if "secret" in s]
                for secret in [*secrets, volume.get("secret", {})]:
                    if "eskit-secrets" in (secret.get("name"), secret.get("secretName")):
                        used |= {item["key"] for item in secret["items"]}
    assert used == keys


def test_the_ingress_and_kong_resources_mirror_kong_yml() -> None:
    docs = rendered("prod")
    kong = load_kong(GatewaySettings().config)
    k8s_service = {"auth_svc": "auth-svc", "user_svc": "user-svc"}
    plugins = {d["metadata"]["name"]: d for d in docs if d["kind"] == "KongPlugin"}

    def canonical(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return sorted((p["name"], yaml.safe_dump(p.get("config"), sort_keys=True)) for p in entries)

    def effective(route: dict[str, Any]) -> list[dict[str, Any]]:
        """kong.yml's plugins of a route and its global plugins: a route's own plugin
        replaces the global one of the same name, as in Kong."""
        own = route.get("plugins", [])
        names = {p["name"] for p in own}
        return [*own, *(p for p in kong["plugins"] if p["name"] not in names)]

    expected = {
        (path, k8s_service[s["name"]], tuple(canonical(effective(r))))
        for s in kong["services"]
        for r in s["routes"]
        for path in r["paths"]
    }
    actual = set()
    for ingress in (d for d in docs if d["kind"] == "Ingress"):
        assert ingress["spec"]["ingressClassName"] == "kong"
        annotations = ingress["metadata"].get("annotations", {})
        assert annotations["konghq.com/strip-path"] == "false"
        names = [n for n in annotations.get("konghq.com/plugins", "").split(",") if n]
        assert len({plugins[n]["plugin"] for n in names}) == len(names), names  # one of a kind
        attached = [{"name": plugins[n]["plugin"], "config": plugins[n]["config"]} for n in names]
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                service = path["backend"]["service"]["name"]
                actual.add((path["path"], service, tuple(canonical(attached))))
    assert actual == expected
    (consumer,) = [d for d in docs if d["kind"] == "KongConsumer"]
    assert consumer["username"] == kong["consumers"][0]["username"]


def test_each_overlays_ingresses_answer_a_host_of_their_own() -> None:
    """Without a host an Ingress takes every host: dev and prod on one Kong would each route
    the other's requests (the same paths, two backends)."""
    hosts = {}
    for overlay in ("dev", "prod"):
        rules = [
            rule for d in rendered(overlay) if d["kind"] == "Ingress" for rule in d["spec"]["rules"]
        ]
        assert rules and all(rule.get("host") for rule in rules), overlay
        hosts[overlay] = {rule["host"] for rule in rules}
        assert len(hosts[overlay]) == 1, hosts[overlay]  # one API host per overlay
    assert not hosts["dev"] & hosts["prod"]


# Kinds that exist once per cluster: an overlay must not create any but its own Namespace, so
# that dev and prod (or another application) in one cluster never change each other.
CLUSTER_SCOPED = {
    "Namespace",
    "KongClusterPlugin",
    "ClusterRole",
    "ClusterRoleBinding",
    "IngressClass",
    "CustomResourceDefinition",
    "PriorityClass",
    "StorageClass",
    "PersistentVolume",
}


@pytest.mark.parametrize(("overlay", "namespace"), [("dev", "eskit-dev"), ("prod", "eskit")])
def test_an_overlay_changes_nothing_outside_its_namespace(overlay: str, namespace: str) -> None:
    docs = rendered(overlay)
    (ns,) = [d for d in docs if d["kind"] == "Namespace"]
    assert ns["metadata"]["name"] == namespace
    assert [d["kind"] for d in docs if d["kind"] in CLUSTER_SCOPED] == ["Namespace"]
    others = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert others == {namespace}
    # The Kong plugins are namespaced; none is global for the whole Kong.
    plugins = [d for d in docs if d["kind"] == "KongPlugin"]
    assert plugins
    assert not [p for p in plugins if p["metadata"].get("labels", {}).get("global")]


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_each_deployment_spreads_its_own_replicas_only(overlay: str) -> None:
    docs = rendered(overlay)
    deployments = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        constraints = deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
        if deployment["kind"] == "Deployment":  # (prod's RabbitMQ nodes spread over zones)
            assert {c["topologyKey"] for c in constraints} >= {"kubernetes.io/hostname"}, name
        for constraint in constraints:
            selector = constraint["labelSelector"]["matchLabels"]
            assert selector == deployment["spec"]["selector"]["matchLabels"], name
            chosen = [
                d["metadata"]["name"]
                for d in deployments
                if selects(selector, d["spec"]["template"]["metadata"]["labels"])
            ]
            assert chosen == [name], (name, chosen)


# --- NetworkPolicies: each flow the architecture needs, and a few it must not allow ---------


@dataclass(frozen=True)
class Peer:
    """One end of a connection: a pod (of ours, or of Kong, Prometheus, DNS) or an address
    outside the cluster."""

    namespace: str | None = None  # None: outside the cluster
    labels: tuple[tuple[str, str], ...] = ()
    ports: tuple[tuple[str, int], ...] = ()  # named container ports
    ip: str | None = None

    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions)."""
    if not selects(selector.get("matchLabels", {}), labels):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def peer_matches(rule_peer: dict[str, Any], peer: Peer, namespace: str) -> bool:
    if "ipBlock" in rule_peer:
        if peer.ip is None:
            return False
        block = rule_peer["ipBlock"]
        address = ipaddress.ip_address(peer.ip)
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if peer.namespace is None:
        return False
    if "namespaceSelector" in rule_peer:
        ns_labels = {"kubernetes.io/metadata.name": peer.namespace}
        if not matches(rule_peer["namespaceSelector"], ns_labels):
            return False
    elif peer.namespace != namespace:
        return False
    return matches(rule_peer.get("podSelector", {}), peer.label_map())


def port_matches(rule_ports: list[dict[str, Any]] | None, port: int, target: Peer) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        wanted = entry.get("port")
        if isinstance(wanted, str):
            wanted = dict(target.ports).get(wanted)
        if wanted is None or wanted == port or wanted <= port <= entry.get("endPort", wanted):
            return True
    return False


def allowed(
    policies: list[dict[str, Any]], namespace: str, source: Peer, target: Peer, port: int
) -> bool:
    """Whether TCP from `source` to `target:port` passes the egress policies of the source and
    the ingress policies of the target (only pods of `namespace` are subject to ours)."""

    def side(pod: Peer, other: Peer, direction: str, key: str) -> bool:
        if pod.namespace != namespace:
            return True
        chosen = [
            p
            for p in policies
            if direction in p["spec"].get("policyTypes", [])
            and matches(p["spec"]["podSelector"], pod.label_map())
        ]
        if not chosen:
            return True
        return any(
            (not rule.get(key) or any(peer_matches(r, other, namespace) for r in rule[key]))
            and port_matches(rule.get("ports"), port, target)
            for policy in chosen
            for rule in policy["spec"].get(direction.lower(), [])
        )

    return side(source, target, "Egress", "to") and side(target, source, "Ingress", "from")


def pods_of(docs: list[dict[str, Any]], namespace: str) -> dict[str, Peer]:
    pods = {}
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        template = doc["spec"]["template"]
        ports = tuple(
            (p["name"], p["containerPort"])
            for c in template["spec"]["containers"]
            for p in c.get("ports", [])
            if "name" in p
        )
        labels = tuple(sorted(template["metadata"]["labels"].items()))
        pods[doc["metadata"]["name"]] = Peer(namespace, labels, ports)
    return pods


KONG = Peer("kong", (("app.kubernetes.io/name", "kong"),))
PROMETHEUS = Peer("monitoring", (("app.kubernetes.io/name", "prometheus"),))
KUBE_DNS = Peer("kube-system", (("k8s-app", "kube-dns"),))
# The peers outside the cluster at the example addresses both overlays set.
POSTGRES = Peer(ip="10.20.0.5")  # a managed PostgreSQL outside the cluster
SMTP_RELAY = Peer(ip="10.20.0.25")
API_SERVER = Peer(ip="10.96.0.1")  # the `kubernetes` Service's ClusterIP
API_ENDPOINT = Peer(ip="10.0.0.2")  # the API server behind it
PUBLIC = Peer(ip="93.184.215.14")
PRIVATE = Peer(ip="10.0.3.7")
METADATA = Peer(ip="169.254.169.254")
SHARED_METADATA = Peer(ip="100.100.100.200")  # a cloud metadata service in 100.64.0.0/10
# The base's placeholders for those peers (RFC 5737): an overlay that keeps one lets nothing
# through to that peer.
PLACEHOLDERS = ipaddress.ip_network("192.0.2.0/24")
# The one egress rule that may go to any address (on 443, private ranges excepted).
OPEN_EGRESS = {"integration-svc-webhooks"}


@pytest.mark.parametrize(("overlay", "namespace"), [("dev", "eskit-dev"), ("prod", "eskit")])
def test_network_policies_let_through_exactly_the_flows_of_the_architecture(
    overlay: str, namespace: str
) -> None:
    docs = rendered(overlay)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = pods_of(docs, namespace)
    processes = [n for n in pods if n not in ("rabbitmq", "eskit-db-init")]
    assert len(processes) == len(PROCESSES)
    rabbitmq, auth, users = pods["rabbitmq"], pods["auth-svc"], pods["user-svc"]

    def ok(source: Peer, target: Peer, port: int) -> bool:
        return allowed(policies, namespace, source, target, port)

    # Default deny: a policy that selects every pod, both ways, with no rule.
    assert any(
        p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in policies
    )
    # The gateway reaches the REST services, and only them.
    assert ok(KONG, auth, 8101)
    assert ok(KONG, users, 8102)
    for name in processes:
        if name not in ("auth-svc", "user-svc"):
            assert not ok(KONG, pods[name], dict(pods[name].ports)["http"]), name
    assert not ok(KONG, rabbitmq, 5672)
    # user_svc reads auth_svc's JWKS; nothing else calls auth_svc inside the cluster.
    assert ok(users, auth, 8101)
    assert not ok(pods["reporting-svc"], auth, 8101)
    # Every process (and db-init): DNS, the broker, PostgreSQL; nothing else by default.
    for name in [*processes, "eskit-db-init"]:
        pod = pods[name]
        assert ok(pod, KUBE_DNS, 53), name
        assert ok(pod, rabbitmq, 5672), name
        assert ok(pod, POSTGRES, 5432), name
        assert not ok(pod, PUBLIC, 5432), name  # PostgreSQL at its address only
        assert not ok(pod, rabbitmq, 15672), name  # not the management API
        assert not ok(pod, API_SERVER, 443), name
        assert not ok(pod, API_ENDPOINT, 6443), name
        if name != "integration-svc":
            assert not ok(pod, PUBLIC, 443), name
        if name != "notify-svc":
            assert not ok(pod, SMTP_RELAY, 587), name
    # Prometheus scrapes every process's /metrics port and RabbitMQ's :15692.
    for name in processes:
        assert ok(PROMETHEUS, pods[name], dict(pods[name].ports)["http"]), name
    assert ok(PROMETHEUS, rabbitmq, 15692)
    assert not ok(PROMETHEUS, rabbitmq, 5672)
    # The RabbitMQ nodes talk to each other and to the Kubernetes API (peer discovery).
    for port in (4369, 25672, 35672):
        assert ok(rabbitmq, rabbitmq, port), port
    assert not ok(pods["reporting-svc"], rabbitmq, 25672)
    assert ok(rabbitmq, API_SERVER, 443)
    assert ok(rabbitmq, API_ENDPOINT, 6443)
    assert not ok(rabbitmq, PUBLIC, 443)
    assert not ok(rabbitmq, PUBLIC, 80)
    # Webhooks to public HTTPS only; mail to the SMTP relay only, on its port.
    assert ok(pods["integration-svc"], PUBLIC, 443)
    assert not ok(pods["integration-svc"], PRIVATE, 443)
    for metadata in (METADATA, SHARED_METADATA):
        assert not ok(pods["integration-svc"], metadata, 443), metadata
        assert not ok(pods["integration-svc"], metadata, 80), metadata
    assert not ok(pods["integration-svc"], API_SERVER, 443)
    assert not ok(pods["integration-svc"], PUBLIC, 22)
    assert ok(pods["notify-svc"], SMTP_RELAY, 587)
    for port in (25, 465, 587):
        assert not ok(pods["notify-svc"], PUBLIC, port), port
    assert not ok(pods["notify-svc"], SMTP_RELAY, 25)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_no_egress_rule_but_the_webhooks_one_goes_to_any_address(overlay: str) -> None:
    """Each egress rule names its peers (a rule without `to` allows every destination), none
    but integration-svc's webhooks allows 0.0.0.0/0 (or ::/0, or any /0), and the overlay has
    replaced the base's placeholder addresses of the peers outside the cluster."""
    policies = [d for d in rendered(overlay) if d["kind"] == "NetworkPolicy"]
    for policy in policies:
        name = policy["metadata"]["name"]
        for i, rule in enumerate(policy["spec"].get("egress", [])):
            where = f"{overlay}: {name} egress[{i}]"
            assert rule.get("to"), f"{where} has no `to`: it allows every destination"
            for peer in rule["to"]:
                if "ipBlock" not in peer:
                    continue
                block = ipaddress.ip_network(peer["ipBlock"]["cidr"])
                if name in OPEN_EGRESS:
                    assert peer["ipBlock"].get("except"), where
                    assert {p["port"] for p in rule.get("ports", [])} == {443}, where
                    continue
                assert block.prefixlen > 0, f"{where} allows {block}"
                assert not (block.version == 4 and block.overlaps(PLACEHOLDERS)), (
                    f"{where}: {block} is the base's placeholder; set the address in the overlay"
                )
